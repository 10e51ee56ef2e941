//! The flags every member shares ([`MemberArgs`]) and the model they serve
//! ([`ModelArgs`], also taken by `up`, `generate` and `bench`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::device::ComputeArgs;
use crate::hub::{self, DEFAULT_REVISION, HubError, HubOptions};

/// Default for `--grace-seconds`: the Kubernetes default
/// `terminationGracePeriodSeconds` (30 s) less a margin.
pub const DEFAULT_GRACE_SECONDS: u64 = 25;

/// `--model` and `--revision`: a local snapshot folder, or a Hugging Face Hub id
/// resolved once, at start-up, to a folder in the Hub cache.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct ModelArgs {
    /// Snapshot folder of a DeepSeek-VL2 checkpoint (config.json, tokenizer.json,
    /// *.safetensors), or a Hub id such as deepseek-ai/deepseek-vl2-tiny (downloaded
    /// at start-up).
    #[arg(long = "model", env = "TESSERA_MODEL")]
    pub path: PathBuf,
    /// Branch, tag or commit of a Hub id --model. The Hub is `HF_ENDPOINT`, the cache
    /// `HF_HUB_CACHE` or `HF_HOME/hub`, the token `HF_TOKEN`.
    #[arg(long, env = "TESSERA_MODEL_REVISION", default_value = DEFAULT_REVISION)]
    pub revision: String,
}

impl ModelArgs {
    /// The snapshot folder `path` at the default revision.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            revision: DEFAULT_REVISION.to_string(),
        }
    }

    /// Replaces a Hub id with its snapshot folder (downloading it as needed).
    pub async fn resolve(&mut self) -> Result<(), HubError> {
        let folder = hub::resolve(&self.path, &self.options()).await?;
        self.resolved(folder);
        Ok(())
    }

    /// [`ModelArgs::resolve`] outside a tokio runtime.
    pub fn resolve_blocking(&mut self) -> Result<(), HubError> {
        let folder = hub::resolve_blocking(&self.path, &self.options())?;
        self.resolved(folder);
        Ok(())
    }

    fn options(&self) -> HubOptions {
        HubOptions::from_env(self.revision.clone())
    }

    fn resolved(&mut self, folder: PathBuf) {
        if folder != self.path {
            tracing::info!(model = %self.path.display(), snapshot = %folder.display(), "model resolved");
            self.path = folder;
        }
    }

    /// A clear error unless `path` is a local folder (a Hub id is resolved first).
    pub fn check_folder(&self) -> Result<(), HubError> {
        check_folder(&self.path)
    }
}

/// A clear error unless `path` is a local folder.
pub fn check_folder(path: &Path) -> Result<(), HubError> {
    if path.is_dir() {
        return Ok(());
    }
    Err(HubError::NoSuchFolder {
        path: path.to_path_buf(),
    })
}

/// What every member (gateway, vision-worker, scheduler, expert-worker) is
/// configured with besides its own flags: `#[command(flatten)]` it into a
/// service's `Config`.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct MemberArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// This member's id in discovery [default: "<role>-<advertised address>"].
    #[arg(long, env = "TESSERA_ID")]
    pub id: Option<String>,
    /// host:port other members reach this service at [default: the listener's address].
    #[arg(long, env = "TESSERA_ADVERTISE")]
    pub advertise: Option<String>,
    /// Seconds to drain in-flight requests after a shutdown signal.
    #[arg(long, env = "TESSERA_GRACE_SECONDS", default_value_t = DEFAULT_GRACE_SECONDS)]
    pub grace_seconds: u64,
    /// Serve Prometheus metrics (`GET /metrics`) and `GET /health` on this address
    /// [default: none].
    #[arg(long, env = "TESSERA_METRICS")]
    pub metrics: Option<SocketAddr>,
    /// Where and in what precision the member's weights are computed (the gateway
    /// holds none).
    #[command(flatten)]
    pub compute: ComputeArgs,
    /// Mutual TLS with the other members.
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,
}

impl MemberArgs {
    /// Every default, serving the snapshot folder `model`.
    pub fn new(model: impl Into<PathBuf>) -> Self {
        Self {
            model: ModelArgs::new(model),
            id: None,
            advertise: None,
            grace_seconds: DEFAULT_GRACE_SECONDS,
            metrics: None,
            compute: ComputeArgs::default(),
            tls: crate::tls::TlsArgs::plaintext(),
        }
    }

    /// The snapshot folder (once resolved).
    pub fn model_dir(&self) -> &Path {
        &self.model.path
    }

    /// How long shutdown drains in-flight requests.
    pub fn grace(&self) -> Duration {
        Duration::from_secs(self.grace_seconds)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        member: MemberArgs,
    }

    #[test]
    fn the_flag_defaults_are_the_constructor_defaults() {
        let cli = Cli::parse_from(["t", "--model", "/m"]);
        assert_eq!(cli.member, MemberArgs::new("/m"));
        let cli = Cli::parse_from([
            "t",
            "--model",
            "org/name",
            "--revision",
            "v2",
            "--id",
            "w-1",
            "--grace-seconds",
            "3",
            "--metrics",
            "127.0.0.1:9091",
            "--dtype",
            "bf16",
        ]);
        let m = cli.member;
        assert_eq!(m.model.revision, "v2");
        assert_eq!(m.id.as_deref(), Some("w-1"));
        assert_eq!(m.grace(), Duration::from_secs(3));
        assert_eq!(m.metrics, Some(([127, 0, 0, 1], 9091).into()));
        assert_eq!(m.compute.dtype, Some(crate::device::Precision::Bf16));
        assert!(m.model.check_folder().is_err());
    }
}
