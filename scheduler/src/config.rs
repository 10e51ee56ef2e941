//! The scheduler's configuration: the service contract's flags plus its own,
//! parsed once at start-up (`tessera scheduler --help`).

use std::path::PathBuf;
use std::time::Duration;

use candle_core::DType;

use crate::error::{Error, Result};

/// Precision the language model runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Precision {
    F32,
    F16,
    Bf16,
}

impl Precision {
    /// The candle dtype.
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::F16 => DType::F16,
            Precision::Bf16 => DType::BF16,
        }
    }
}

/// What one scheduler serves and how.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Snapshot folder (config.json, tokenizer.json, *.safetensors).
    #[arg(long, env = "TESSERA_MODEL")]
    pub model: PathBuf,
    /// This member's id in discovery [default: "scheduler-<advertised address>"].
    #[arg(long, env = "TESSERA_ID")]
    pub id: Option<String>,
    /// host:port other members reach this service at [default: the listener's address].
    #[arg(long, env = "TESSERA_ADVERTISE")]
    pub advertise: Option<String>,
    /// Seconds to drain in-flight requests after a shutdown signal.
    #[arg(long, env = "TESSERA_GRACE_SECONDS", default_value_t = 25)]
    pub grace_seconds: u64,
    /// Precision of the attention layers, norms, gates, shared experts and lm_head.
    #[arg(long, env = "TESSERA_DTYPE", value_enum, default_value_t = Precision::F32)]
    pub dtype: Precision,
    /// Requests that may wait while one runs; beyond it Submit answers RESOURCE_EXHAUSTED.
    #[arg(long, env = "TESSERA_MAX_QUEUE", default_value_t = 64)]
    pub max_queue: usize,
    /// Seconds a MoE layer waits for a live owner of its experts (a ready
    /// placement) before its request fails with UNAVAILABLE.
    #[arg(long, env = "TESSERA_EXPERT_WAIT_SECONDS", default_value_t = 30)]
    pub expert_wait_seconds: u64,
    /// Prefill long prompts in chunks of this many tokens [default: in one step].
    #[arg(long, env = "TESSERA_PREFILL_CHUNK")]
    pub prefill_chunk: Option<usize>,
}

impl Config {
    /// The defaults for serving the snapshot at `model`.
    pub fn new(model: impl Into<PathBuf>) -> Self {
        Self {
            model: model.into(),
            id: None,
            advertise: None,
            grace_seconds: 25,
            dtype: Precision::F32,
            max_queue: 64,
            expert_wait_seconds: 30,
            prefill_chunk: None,
        }
    }

    /// How long shutdown drains in-flight requests.
    pub fn grace(&self) -> Duration {
        Duration::from_secs(self.grace_seconds)
    }

    /// How long a layer waits for a ready owner of its experts.
    pub fn expert_wait(&self) -> Duration {
        Duration::from_secs(self.expert_wait_seconds)
    }

    /// Rejects values the scheduler cannot run with.
    pub fn validate(&self) -> Result<()> {
        if self.max_queue == 0 {
            return Err(Error::Config("--max-queue must be at least 1".into()));
        }
        if self.prefill_chunk == Some(0) {
            return Err(Error::Config("--prefill-chunk must be at least 1".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        config: Config,
    }

    #[test]
    fn flags_parse_and_defaults_match_new() {
        let cli = Cli::parse_from(["t", "--model", "/m"]);
        let new = Config::new("/m");
        assert_eq!(cli.config.max_queue, new.max_queue);
        assert_eq!(cli.config.expert_wait_seconds, new.expert_wait_seconds);
        assert_eq!(cli.config.grace_seconds, new.grace_seconds);
        assert_eq!(cli.config.dtype, Precision::F32);
        let cli = Cli::parse_from([
            "t",
            "--model",
            "/m",
            "--dtype",
            "bf16",
            "--prefill-chunk",
            "0",
        ]);
        assert_eq!(cli.config.dtype.dtype(), DType::BF16);
        assert!(cli.config.validate().is_err());
    }
}
