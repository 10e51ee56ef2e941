//! The vision-worker's one typed configuration: the flags every member shares
//! ([`MemberArgs`]: model, id, advertised address, grace period, metrics
//! address, device and precision) plus the image limit, the embedding cache and
//! the tower's queue depth.

use std::path::PathBuf;

use tessera_model::processor::{DEFAULT_MAX_PIXELS, ImageLimits};
use tessera_runtime::MemberArgs;

/// Default number of encoded images the cache keeps.
pub const DEFAULT_CACHE_ENTRIES: usize = 64;
/// Default number of tower passes that may wait for the model thread.
pub const DEFAULT_MAX_QUEUED: usize = 64;

/// What one vision-worker serves and how (`tessera vision-worker --help`).
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct Config {
    #[command(flatten)]
    pub member: MemberArgs,
    /// Refuse images with more pixels (width × height) than this, checked before decoding.
    #[arg(long, env = "TESSERA_MAX_IMAGE_PIXELS", default_value_t = DEFAULT_MAX_PIXELS)]
    pub max_image_pixels: u64,
    /// Encoded images kept in memory (least recently used first out); 0 disables the cache.
    #[arg(long, env = "TESSERA_VISION_CACHE_ENTRIES", default_value_t = DEFAULT_CACHE_ENTRIES)]
    pub cache_entries: usize,
    /// Tower passes that may wait for the model; further requests get RESOURCE_EXHAUSTED.
    #[arg(long, env = "TESSERA_VISION_MAX_QUEUED", default_value_t = DEFAULT_MAX_QUEUED)]
    pub max_queued: usize,
}

impl Config {
    /// The configuration for `model` with every other setting at its default.
    pub fn new(model: impl Into<PathBuf>) -> Self {
        Self {
            member: MemberArgs::new(model),
            max_image_pixels: DEFAULT_MAX_PIXELS,
            cache_entries: DEFAULT_CACHE_ENTRIES,
            max_queued: DEFAULT_MAX_QUEUED,
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
        assert_eq!(
            cli.config.member.metrics,
            Some(([127, 0, 0, 1], 9092).into())
        );
        assert_eq!(cli.config.cache_entries, 0);
        assert_eq!(
            cli.config.member.compute.dtype,
            Some(tessera_runtime::device::Precision::Bf16)
        );
        assert_eq!(cli.config.image_limits().max_pixels, 1000);
        assert!(Cli::try_parse_from(["vision-worker", "--model", "m", "--dtype", "f64"]).is_err());
    }
}
