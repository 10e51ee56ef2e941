//! Mutual TLS between the members of a cluster (`--tls-cert`, `--tls-key`,
//! `--tls-ca`), through tonic's rustls support.
//!
//! Every member presents a certificate signed by the cluster's CA and accepts only
//! peers that do: an internal service (vision-worker, scheduler, expert-worker)
//! refuses a client without such a certificate at the TLS handshake, before any RPC.
//! The gateway's public API uses the same certificate as its server certificate but
//! does not ask its clients for one (they authenticate with API keys). Members reach
//! each other by address (often a pod IP), so a peer's certificate is checked against
//! one name every member certificate carries, `--tls-server-name` (default
//! [`DEFAULT_SERVER_NAME`]), not against the address. The files are PEM, as a
//! Kubernetes TLS Secret or cert-manager mounts them (`tls.crt`, `tls.key`, `ca.crt`).
//! `tessera dev-certs` writes a development CA and member certificate.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

/// Default for `--tls-server-name`.
pub const DEFAULT_SERVER_NAME: &str = "tessera-cluster";

/// The TLS flags every member shares.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct TlsArgs {
    /// This member's certificate (PEM, its chain after it) for mutual TLS with the
    /// other members; needs --tls-key and --tls-ca [default: plaintext].
    #[arg(long, env = "TESSERA_TLS_CERT", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// This member's private key (PEM).
    #[arg(long, env = "TESSERA_TLS_KEY", requires_all = ["tls_cert", "tls_ca"])]
    pub tls_key: Option<PathBuf>,
    /// The cluster's CA certificate (PEM): members accept only peers whose certificate
    /// it signed.
    #[arg(long, env = "TESSERA_TLS_CA", requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
    /// The name every member certificate carries (a DNS subject alternative name);
    /// peers are checked against it rather than against their addresses.
    #[arg(long, env = "TESSERA_TLS_SERVER_NAME", default_value = DEFAULT_SERVER_NAME)]
    pub tls_server_name: String,
}

/// Why the TLS files cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("TLS: cannot read {path}: {source}")]
pub struct TlsError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

impl TlsArgs {
    /// No TLS, with the default server name.
    pub fn plaintext() -> Self {
        Self {
            tls_server_name: DEFAULT_SERVER_NAME.to_owned(),
            ..Self::default()
        }
    }

    /// The cluster TLS these flags name, read from their files; `None` for plaintext.
    pub fn load(&self) -> Result<Option<Arc<ClusterTls>>, TlsError> {
        let (Some(cert), Some(key), Some(ca)) = (&self.tls_cert, &self.tls_key, &self.tls_ca)
        else {
            return Ok(None);
        };
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| TlsError {
                path: path.to_owned(),
                source,
            })
        };
        Ok(Some(Arc::new(ClusterTls {
            identity: Identity::from_pem(read(cert)?, read(key)?),
            ca: Certificate::from_pem(read(ca)?),
            server_name: self.tls_server_name.clone(),
        })))
    }
}

/// A member's TLS identity and the cluster CA it trusts.
#[derive(Debug, Clone)]
pub struct ClusterTls {
    identity: Identity,
    ca: Certificate,
    server_name: String,
}

impl ClusterTls {
    /// The server side: this member's certificate; clients must present one the
    /// cluster CA signed unless `public` (the gateway's API, whose clients use keys).
    pub fn server(&self, public: bool) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity.clone())
            .client_ca_root(self.ca.clone())
            .client_auth_optional(public)
    }

    /// The client side: trusts the cluster CA, checks the peer against the server
    /// name, and presents this member's certificate.
    pub fn client(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(self.ca.clone())
            .identity(self.identity.clone())
            .domain_name(self.server_name.clone())
    }
}

/// An endpoint for another member at `address` (`host:port`, or a URI): plaintext
/// `http://`, or `https://` with the cluster's TLS when `tls` is set.
pub fn endpoint(address: &str, tls: Option<&ClusterTls>) -> Result<Endpoint, String> {
    let host_port = address.split_once("://").map_or(address, |(_, rest)| rest);
    let scheme = if tls.is_some() { "https" } else { "http" };
    let endpoint = Endpoint::from_shared(format!("{scheme}://{host_port}"))
        .map_err(|e| format!("{address:?} is not a valid address: {e}"))?;
    match tls {
        Some(tls) => endpoint
            .tls_config(tls.client())
            .map_err(|e| format!("TLS for {address}: {e}")),
        None => Ok(endpoint),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        tls: TlsArgs,
    }

    #[test]
    fn the_three_files_go_together() {
        let none = Cli::try_parse_from(["t"]).unwrap().tls;
        assert_eq!(none, TlsArgs::plaintext());
        assert!(none.load().unwrap().is_none());
        let err = Cli::try_parse_from(["t", "--tls-cert", "c.pem"])
            .err()
            .unwrap();
        assert!(err.to_string().contains("--tls-key"), "{err}");
        let all = Cli::try_parse_from([
            "t",
            "--tls-cert",
            "/nonexistent/c.pem",
            "--tls-key",
            "k.pem",
            "--tls-ca",
            "ca.pem",
        ])
        .unwrap()
        .tls;
        let err = all.load().unwrap_err().to_string();
        assert!(err.contains("/nonexistent/c.pem"), "{err}");
    }

    #[test]
    fn endpoints_follow_the_scheme_of_the_cluster() {
        let plain = endpoint("10.0.0.7:50051", None).unwrap();
        assert_eq!(plain.uri().to_string(), "http://10.0.0.7:50051/");
        let again = endpoint("http://10.0.0.7:50051", None).unwrap();
        assert_eq!(again.uri(), plain.uri());
        assert!(endpoint("not an address", None).is_err());
    }
}
