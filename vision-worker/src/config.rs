//! The vision-worker's one typed configuration: the shared service flags
//! (model, id, advertised address, grace period, metrics address) plus the image
//! limit, the embedding cache, the precision and the tower's queue depth.

use std::net::SocketAddr;
use std::path::PathBuf;

use candle_core::DType;
use clap::ValueEnum;
use tessera_model::processor::{DEFAULT_MAX_PIXELS, ImageLimits};

/// Default number of encoded images the cache keeps.
pub const DEFAULT_CACHE_ENTRIES: usize = 64;
/// Default number of tower passes that may wait for the model thread.
pub const DEFAULT_MAX_QUEUED: usize = 64;

/// Precision of the vision tower's weights, activations and returned embeddings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Precision {
    F32,
    F16,
    Bf16,
}

impl From<Precision> for DType {
    fn from(p: Precision) -> Self {
        match p {
            Precision::F32 => DType::F32,
            Precision::F16 => DType::F16,
            Precision::Bf16 => DType::BF16,
        }
    }
}

/// What one vision-worker serves and how (`tessera vision-worker --help`).
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct Config {
    /// Snapshot folder (config.json, tokenizer.json, *.safetensors), or a Hub id such as
    /// deepseek-ai/deepseek-vl2-tiny (downloaded at start-up).
    #[arg(long, env = "TESSERA_MODEL")]
    pub model: PathBuf,
    /// This member's id in discovery [default: "vision-worker-<advertised address>"].
    #[arg(long, env = "TESSERA_ID")]
    pub id: Option<String>,
    /// host:port other members reach this service at [default: the listener's address].
    #[arg(long, env = "TESSERA_ADVERTISE")]
    pub advertise: Option<String>,
    /// Seconds to drain in-flight requests after a shutdown signal.
    #[arg(long, env = "TESSERA_GRACE_SECONDS", default_value_t = 25)]
    pub grace_seconds: u64,
    /// Refuse images with more pixels (width × height) than this, checked before decoding.
    #[arg(long, env = "TESSERA_MAX_IMAGE_PIXELS", default_value_t = DEFAULT_MAX_PIXELS)]
    pub max_image_pixels: u64,
    /// Encoded images kept in memory (least recently used first out); 0 disables the cache.
    #[arg(long, env = "TESSERA_VISION_CACHE_ENTRIES", default_value_t = DEFAULT_CACHE_ENTRIES)]
    pub cache_entries: usize,
    /// Precision of the vision tower and of the embeddings it returns.
    #[arg(long, env = "TESSERA_DTYPE", value_enum, default_value_t = Precision::F32)]
    pub dtype: Precision,
    /// Tower passes that may wait for the model; further requests get RESOURCE_EXHAUSTED.
    #[arg(long, env = "TESSERA_VISION_MAX_QUEUED", default_value_t = DEFAULT_MAX_QUEUED)]
    pub max_queued: usize,
    /// Serve Prometheus metrics (`GET /metrics`) and `GET /health` on this address
    /// [default: none].
    #[arg(long, env = "TESSERA_METRICS")]
    pub metrics: Option<SocketAddr>,
}

impl Config {
    /// The configuration for `model` with every other setting at its default.
    pub fn new(model: impl Into<PathBuf>) -> Self {
        Self {
            model: model.into(),
            id: None,
            advertise: None,
            grace_seconds: 25,
            max_image_pixels: DEFAULT_MAX_PIXELS,
            cache_entries: DEFAULT_CACHE_ENTRIES,
            dtype: Precision::F32,
            max_queued: DEFAULT_MAX_QUEUED,
            metrics: None,
        }
    }

    /// The decoding limits for request images.
    pub fn image_limits(&self) -> ImageLimits {
        ImageLimits {
            max_pixels: self.max_image_pixels,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        config: Config,
    }

    #[test]
    fn new_has_the_same_defaults_as_the_command_line() {
        let cli = Cli::try_parse_from(["vision-worker", "--model", "snap"]).unwrap();
        assert_eq!(cli.config, Config::new("snap"));
        assert_eq!(
            Config::new("snap").image_limits(),
            ImageLimits::default(),
            "the image limit defaults to the model crate's (and `tessera generate`'s)"
        );
    }

    #[test]
    fn flags_parse() {
        let cli = Cli::try_parse_from([
            "vision-worker",
            "--model",
            "snap",
            "--cache-entries",
            "0",
            "--dtype",
            "bf16",
            "--max-image-pixels",
            "1000",
            "--metrics",
            "127.0.0.1:9092",
        ])
        .unwrap();
        assert_eq!(cli.config.metrics, Some(([127, 0, 0, 1], 9092).into()));
        assert_eq!(cli.config.cache_entries, 0);
        assert_eq!(DType::from(cli.config.dtype), DType::BF16);
        assert_eq!(cli.config.image_limits().max_pixels, 1000);
        assert!(Cli::try_parse_from(["vision-worker", "--model", "m", "--dtype", "f64"]).is_err());
    }
}
