//! The scheduler's configuration: the service contract's flags plus its own,
//! parsed once at start-up (`tessera scheduler --help`).

use std::path::PathBuf;
use std::time::Duration;

use candle_core::DType;
use tessera_runtime::MemberArgs;
use tessera_runtime::pool::PoolArgs;

use crate::error::{Error, Result};

/// Default for `--max-waiting`.
pub const DEFAULT_MAX_WAITING: usize = 64;

/// Default for `--expert-timeout-ms`.
pub const DEFAULT_EXPERT_TIMEOUT_MS: u64 = 5000;

/// What one scheduler serves and how.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    #[command(flatten)]
    pub member: MemberArgs,
    /// Requests that may wait for a place among the `--max-seqs` that run; beyond it
    /// Submit answers RESOURCE_EXHAUSTED at once (HTTP 429 at the gateway).
    #[arg(
        long,
        alias = "max-queue",
        env = "TESSERA_MAX_WAITING",
        default_value_t = DEFAULT_MAX_WAITING
    )]
    pub max_waiting: usize,
    /// Seconds a MoE layer waits for a live owner of its experts (a ready
    /// placement) before its request fails with UNAVAILABLE.
    #[arg(long, env = "TESSERA_EXPERT_WAIT_SECONDS", default_value_t = 30)]
    pub expert_wait_seconds: u64,
    /// Milliseconds one expert `Forward` call may take; a call that fails or takes
    /// longer is sent at once to another replica of its experts (0: no limit).
    #[arg(long, env = "TESSERA_EXPERT_TIMEOUT_MS", default_value_t = DEFAULT_EXPERT_TIMEOUT_MS)]
    pub expert_timeout_ms: u64,
    /// How the engine batches, caches and overlaps.
    #[command(flatten)]
    pub engine: EngineConfig,
    /// How experts are placed over the pool (every scheduler and expert-worker
    /// places, so give all of them the same values).
    #[command(flatten)]
    pub pool: PoolArgs,
}

/// How the engine batches requests, sizes its KV cache and dispatches experts
/// (shared by `tessera scheduler`, `tessera up` and `tessera bench`).
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct EngineConfig {
    /// Tokens one engine step may run, over every sequence (decode tokens plus
    /// prefill chunks).
    #[arg(long, env = "TESSERA_MAX_BATCH_TOKENS", default_value_t = 2048)]
    pub max_batch_tokens: usize,
    /// Sequences running at once; more wait in the queue.
    #[arg(long, env = "TESSERA_MAX_SEQS", default_value_t = 64)]
    pub max_seqs: usize,
    /// Tokens per KV-cache block (the unit of allocation and of prefix reuse).
    #[arg(long, env = "TESSERA_KV_BLOCK_SIZE", default_value_t = 16)]
    pub kv_block_size: usize,
    /// Bytes of KV cache (the pool of blocks), allocated and made resident at start
    /// [default: what --max-seqs sequences of the model's whole context need, at
    /// most 10% of the memory limit (the cgroup's, else the machine's) and 8 GiB].
    #[arg(long, env = "TESSERA_KV_CACHE_BYTES")]
    pub kv_cache_bytes: Option<u64>,
    /// Prefill long prompts in chunks of at most this many tokens, interleaved
    /// with other sequences' decode steps.
    #[arg(long, env = "TESSERA_PREFILL_CHUNK", default_value_t = 512)]
    pub prefill_chunk: usize,
    /// Run every step as one batch instead of two micro-batches whose expert
    /// calls overlap the other's attention (for comparison).
    #[arg(long, env = "TESSERA_NO_OVERLAP")]
    pub no_overlap: bool,
    /// Do not reuse cached blocks of identical prompt prefixes.
    #[arg(long, env = "TESSERA_NO_PREFIX_CACHE")]
    pub no_prefix_cache: bool,
    /// Seconds a request may run before it is stopped with DEADLINE_EXCEEDED
    /// (0: no limit; a client's gRPC deadline applies too).
    #[arg(long, env = "TESSERA_REQUEST_TIMEOUT_SECONDS", default_value_t = 0)]
    pub request_timeout_seconds: u64,
    /// Precision of the hidden states sent to expert-workers and of the sums they
    /// answer with: `auto` is bf16 when the routed experts' weights are held in bf16
    /// (half the bytes of f32), otherwise the compute dtype.
    #[arg(long, env = "TESSERA_EXPERT_WIRE", value_enum, default_value_t = WireDtype::Auto)]
    pub expert_wire: WireDtype,
}

/// `--expert-wire`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum WireDtype {
    /// bf16 when the experts' weights are held in bf16, else the compute dtype.
    #[default]
    Auto,
    F32,
    Bf16,
}

impl WireDtype {
    /// The dtype sent, given how the routed experts' weights are held (`None`: no
    /// dense experts, e.g. int8) and the compute dtype.
    pub fn resolve(self, experts: Option<DType>, compute: DType) -> DType {
        match self {
            Self::Auto if experts == Some(DType::BF16) => DType::BF16,
            Self::Auto => compute,
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
        }
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch_tokens: 2048,
            max_seqs: 64,
            kv_block_size: 16,
            kv_cache_bytes: None,
            prefill_chunk: 512,
            no_overlap: false,
            no_prefix_cache: false,
            request_timeout_seconds: 0,
            expert_wire: WireDtype::Auto,
        }
    }
}

impl EngineConfig {
    /// Rejects values the engine cannot run with.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            (self.max_batch_tokens, "--max-batch-tokens"),
            (self.max_seqs, "--max-seqs"),
            (self.kv_block_size, "--kv-block-size"),
            (self.prefill_chunk, "--prefill-chunk"),
        ];
        if let Some((_, flag)) = positive.iter().find(|(v, _)| *v == 0) {
            return Err(Error::Config(format!("{flag} must be at least 1")));
        }
        if self.kv_cache_bytes == Some(0) {
            return Err(Error::Config("--kv-cache-bytes must be more than 0".into()));
        }
        Ok(())
    }
}

impl Config {
    /// The defaults for serving the snapshot at `model`.
    pub fn new(model: impl Into<PathBuf>) -> Self {
        Self {
            member: MemberArgs::new(model),
            max_waiting: DEFAULT_MAX_WAITING,
            expert_wait_seconds: 30,
            expert_timeout_ms: DEFAULT_EXPERT_TIMEOUT_MS,
            engine: EngineConfig::default(),
            pool: PoolArgs::default(),
        }
    }

    /// How long a layer waits for a ready owner of its experts.
    pub fn expert_wait(&self) -> Duration {
        Duration::from_secs(self.expert_wait_seconds)
    }

    /// How long one expert call may take (`None`: no limit).
    pub fn expert_timeout(&self) -> Option<Duration> {
        (self.expert_timeout_ms > 0).then(|| Duration::from_millis(self.expert_timeout_ms))
    }

    /// Rejects values the scheduler cannot run with.
    pub fn validate(&self) -> Result<()> {
        if self.max_waiting == 0 {
            return Err(Error::Config("--max-waiting must be at least 1".into()));
        }
        self.engine.validate()
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
        assert_eq!(cli.config.max_waiting, new.max_waiting);
        assert_eq!(cli.config.expert_wait_seconds, new.expert_wait_seconds);
        assert_eq!(cli.config.member, new.member);
        assert_eq!(cli.config.engine, new.engine);
        let cli = Cli::parse_from(["t", "--model", "/m", "--prefill-chunk", "0"]);
        assert!(cli.config.validate().is_err());
    }

    #[test]
    fn the_expert_wire_follows_the_experts_weights_unless_told() {
        let cli = Cli::parse_from(["t", "--model", "/m", "--expert-wire", "bf16"]);
        assert_eq!(cli.config.engine.expert_wire, WireDtype::Bf16);
        let auto = WireDtype::Auto;
        assert_eq!(auto.resolve(Some(DType::BF16), DType::F32), DType::BF16);
        assert_eq!(auto.resolve(Some(DType::F32), DType::F32), DType::F32);
        assert_eq!(auto.resolve(None, DType::F32), DType::F32);
        assert_eq!(
            WireDtype::F32.resolve(Some(DType::BF16), DType::F32),
            DType::F32
        );
        assert_eq!(WireDtype::Bf16.resolve(None, DType::F32), DType::BF16);
        assert!(Cli::try_parse_from(["t", "--model", "/m", "--expert-wire", "int8"]).is_err());
    }
}
