//! How a single-role process finds the rest of its cluster: etcd (dynamic) or a
//! static member file (the embedded default when etcd is not given).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use tessera_runtime::discovery::{EtcdDiscovery, EtcdTls};
use tessera_runtime::{Discovery, StaticDiscovery};

/// Discovery flags shared by `gateway`, `vision-worker`, `scheduler` and `expert-worker`.
#[derive(Debug, Clone, Args)]
pub struct DiscoveryArgs {
    /// etcd endpoints (repeatable or comma-separated, e.g. http://etcd:2379): members
    /// register under a lease and the expert placement is shared through etcd.
    #[arg(long = "etcd", env = "TESSERA_ETCD", value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// Key prefix in etcd; clusters sharing one etcd use different prefixes.
    #[arg(long, env = "TESSERA_ETCD_PREFIX", default_value = "/tessera")]
    pub etcd_prefix: String,
    /// Seconds a registration outlives a process that died without deregistering
    /// (the etcd lease TTL): how long until a killed worker's experts move.
    #[arg(long, env = "TESSERA_LEASE_SECONDS", default_value_t = 5)]
    pub lease_seconds: u64,
    /// CA certificate (PEM) that signed etcd's certificate, for `https://` --etcd
    /// endpoints; needs --etcd-cert and --etcd-key (etcd's --client-cert-auth).
    #[arg(long, env = "TESSERA_ETCD_CA", requires_all = ["etcd_cert", "etcd_key"])]
    pub etcd_ca: Option<PathBuf>,
    /// This member's client certificate (PEM) for etcd.
    #[arg(long, env = "TESSERA_ETCD_CERT", requires_all = ["etcd_ca", "etcd_key"])]
    pub etcd_cert: Option<PathBuf>,
    /// This member's client key (PEM) for etcd.
    #[arg(long, env = "TESSERA_ETCD_KEY", requires_all = ["etcd_ca", "etcd_cert"])]
    pub etcd_key: Option<PathBuf>,
    /// Static discovery: a JSON file `{"members": [{"role", "id", "address"}]}` listing
    /// every member of the cluster (used when --etcd is not given).
    #[arg(long, env = "TESSERA_DISCOVERY_FILE", conflicts_with = "etcd")]
    pub discovery_file: Option<PathBuf>,
}

impl DiscoveryArgs {
    /// Connects to etcd or reads the static member file.
    pub async fn connect(&self) -> anyhow::Result<Arc<dyn Discovery>> {
        if !self.etcd.is_empty() {
            if self.lease_seconds == 0 {
                bail!("--lease-seconds must be at least 1");
            }
            let tls = match (&self.etcd_ca, &self.etcd_cert, &self.etcd_key) {
                (Some(ca), Some(cert), Some(key)) => {
                    let read = |p: &PathBuf| {
                        std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))
                    };
                    Some(EtcdTls {
                        ca: read(ca)?,
                        cert: read(cert)?,
                        key: read(key)?,
                    })
                }
                _ => None,
            };
            let discovery = EtcdDiscovery::connect_with(
                &self.etcd,
                &self.etcd_prefix,
                Duration::from_secs(self.lease_seconds),
                tls,
            )
            .await?;
            return Ok(discovery);
        }
        match &self.discovery_file {
            Some(path) => Ok(Arc::new(
                StaticDiscovery::from_file(path)
                    .with_context(|| "static discovery from --discovery-file")?,
            )),
            None => bail!(
                "no discovery configured: pass --etcd URL (dynamic) or --discovery-file FILE \
                 (static members); `tessera up` runs a whole cluster in one process without either"
            ),
        }
    }
}
