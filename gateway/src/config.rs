//! The gateway's configuration: the service contract's flags plus the request
//! limits, parsed once at start-up (`tessera gateway --help`).

use std::net::SocketAddr;
use std::path::PathBuf;

use tessera_model::processor::DEFAULT_MAX_PIXELS;
use tessera_runtime::MemberArgs;

use crate::error::{Error, Result};
use crate::remote_image::RemoteImageConfig;

/// Default for `--default-max-tokens`.
pub const DEFAULT_MAX_TOKENS: u32 = 512;
/// Default for `--max-images`.
pub const DEFAULT_MAX_IMAGES: usize = 16;
/// Default for `--request-timeout-seconds`.
pub const DEFAULT_REQUEST_TIMEOUT_SECONDS: u64 = 600;
/// Default for `--max-request-bytes`: 32 MiB.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 32 << 20;
/// Default for `--http-max-body-bytes`: 32 MiB.
pub const DEFAULT_HTTP_MAX_BODY_BYTES: usize = 32 << 20;
/// Default for `--http-read-timeout-seconds`.
pub const DEFAULT_HTTP_READ_TIMEOUT_SECONDS: u64 = 15;
/// Default for `--http-max-connections`.
pub const DEFAULT_HTTP_MAX_CONNECTIONS: usize = 1024;

/// What one gateway serves and how it limits requests.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// The flags every member shares (the gateway loads the snapshot's configs and
    /// tokenizer, no weights: `--device` and `--dtype` change nothing here).
    #[command(flatten)]
    pub member: MemberArgs,
    /// Most tokens to generate when a request does not set `max_tokens` (lowered to
    /// what fits in the model's maximum position).
    #[arg(long, env = "TESSERA_DEFAULT_MAX_TOKENS", default_value_t = DEFAULT_MAX_TOKENS)]
    pub default_max_tokens: u32,
    /// Most images one request may carry.
    #[arg(long, env = "TESSERA_MAX_IMAGES", default_value_t = DEFAULT_MAX_IMAGES)]
    pub max_images: usize,
    /// Refuse images with more pixels (width × height) than this, read from the header.
    #[arg(long, env = "TESSERA_MAX_IMAGE_PIXELS", default_value_t = DEFAULT_MAX_PIXELS)]
    pub max_image_pixels: u64,
    /// Seconds a request may take from arrival to its last token before it is
    /// cancelled with DEADLINE_EXCEEDED.
    #[arg(
        long,
        env = "TESSERA_REQUEST_TIMEOUT_SECONDS",
        default_value_t = DEFAULT_REQUEST_TIMEOUT_SECONDS
    )]
    pub request_timeout_seconds: u64,
    /// Also serve the OpenAI-compatible HTTP API on this address [default: no HTTP].
    #[arg(long = "http", env = "TESSERA_HTTP")]
    pub http: Option<SocketAddr>,
    /// The model's name in the APIs (`model` of a request, `/v1/models`, `ModelInfo`);
    /// repeat the flag or separate with commas to answer to several, the first being
    /// the name reported [default: the Hub id, else the snapshot folder's name].
    #[arg(
        long = "served-model-name",
        env = "TESSERA_SERVED_MODEL_NAME",
        value_delimiter = ','
    )]
    pub served_model_names: Vec<String>,
    /// How the public APIs bound what one client sends.
    #[command(flatten)]
    pub public_limits: PublicLimits,
    /// Who may call the public APIs.
    #[command(flatten)]
    pub auth: ClientAuth,
    /// Whether and how OpenAI `image_url` parts with http(s) URLs are fetched.
    #[command(flatten)]
    pub remote_images: RemoteImageConfig,
}

impl Config {
    /// The configuration for the snapshot at `model` with every default.
    pub fn new(model: impl Into<PathBuf>) -> Self {
        Self {
            member: MemberArgs::new(model),
            default_max_tokens: DEFAULT_MAX_TOKENS,
            max_images: DEFAULT_MAX_IMAGES,
            max_image_pixels: DEFAULT_MAX_PIXELS,
            request_timeout_seconds: DEFAULT_REQUEST_TIMEOUT_SECONDS,
            http: None,
            served_model_names: Vec::new(),
            public_limits: PublicLimits::default(),
            auth: ClientAuth::default(),
            remote_images: RemoteImageConfig::default(),
        }
    }

    /// Checks the values that have no sensible meaning at 0.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("--default-max-tokens", u64::from(self.default_max_tokens)),
            ("--request-timeout-seconds", self.request_timeout_seconds),
            ("--max-image-pixels", self.max_image_pixels),
            (
                "--max-request-bytes",
                self.public_limits.max_request_bytes as u64,
            ),
            (
                "--http-max-body-bytes",
                self.public_limits.http_max_body_bytes as u64,
            ),
            (
                "--http-read-timeout-seconds",
                self.public_limits.http_read_timeout_seconds,
            ),
            (
                "--http-max-connections",
                self.public_limits.http_max_connections as u64,
            ),
            (
                "--remote-image-timeout-seconds",
                self.remote_images.remote_image_timeout_seconds,
            ),
            (
                "--remote-image-max-bytes",
                self.remote_images.remote_image_max_bytes as u64,
            ),
        ];
        match positive.iter().find(|(_, v)| *v == 0) {
            Some((flag, _)) => Err(Error::Config(format!("{flag} must be at least 1"))),
            None => Ok(()),
        }
    }

    /// The request limits this configuration sets.
    pub fn limits(&self) -> Limits {
        Limits {
            default_max_tokens: self.default_max_tokens,
            max_images: self.max_images,
            max_image_pixels: self.max_image_pixels,
            max_text_bytes: usize::MAX,
        }
    }
}

/// How the public APIs bound what one client sends before any work is done (also on
/// `tessera up`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Args)]
pub struct PublicLimits {
    /// Refuse gRPC requests larger than this many bytes (RESOURCE_EXHAUSTED), judged
    /// from the message's length before it is read.
    #[arg(
        long,
        env = "TESSERA_MAX_REQUEST_BYTES",
        default_value_t = DEFAULT_MAX_REQUEST_BYTES
    )]
    pub max_request_bytes: usize,
    /// Refuse HTTP request bodies larger than this many bytes (413).
    #[arg(
        long,
        env = "TESSERA_HTTP_MAX_BODY_BYTES",
        default_value_t = DEFAULT_HTTP_MAX_BODY_BYTES
    )]
    pub http_max_body_bytes: usize,
    /// Close an HTTP connection that has not sent a whole request head this many
    /// seconds after it opened or after its previous response (slow or idle clients),
    /// and answer 408 to a body that takes longer than this after its head.
    #[arg(
        long,
        env = "TESSERA_HTTP_READ_TIMEOUT_SECONDS",
        default_value_t = DEFAULT_HTTP_READ_TIMEOUT_SECONDS
    )]
    pub http_read_timeout_seconds: u64,
    /// Most HTTP connections open at once; more wait in the listen backlog until one
    /// closes.
    #[arg(
        long,
        env = "TESSERA_HTTP_MAX_CONNECTIONS",
        default_value_t = DEFAULT_HTTP_MAX_CONNECTIONS
    )]
    pub http_max_connections: usize,
}

impl Default for PublicLimits {
    fn default() -> Self {
        Self {
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            http_max_body_bytes: DEFAULT_HTTP_MAX_BODY_BYTES,
            http_read_timeout_seconds: DEFAULT_HTTP_READ_TIMEOUT_SECONDS,
            http_max_connections: DEFAULT_HTTP_MAX_CONNECTIONS,
        }
    }
}

impl PublicLimits {
    /// What the HTTP server does with these limits.
    pub fn serving(&self) -> crate::http::Serving {
        crate::http::Serving {
            max_body_bytes: self.http_max_body_bytes,
            read_timeout: std::time::Duration::from_secs(self.http_read_timeout_seconds),
            max_connections: self.http_max_connections,
        }
    }
}

/// Who may call the public APIs (also on `tessera up`).
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct ClientAuth {
    /// Require an API key (`Authorization: Bearer KEY`, over HTTP and as gRPC metadata)
    /// from the keys in this file: one per line, the key or `sha256:` and its hex
    /// SHA-256; `#` starts a comment. Read again when it changes or on SIGHUP
    /// [default: no keys, every call allowed].
    #[arg(long, env = "TESSERA_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    /// Serve `GET /metrics` on the HTTP API without a key even when keys are required
    /// (a separate `--metrics` address is always open).
    #[arg(long, env = "TESSERA_OPEN_METRICS")]
    pub open_metrics: bool,
    /// Generations one API key may have running at once; more are refused with
    /// RESOURCE_EXHAUSTED (HTTP 429) [default: 0, no limit]. Needs --api-key-file.
    #[arg(long, env = "TESSERA_MAX_CONCURRENT_PER_KEY", default_value_t = 0)]
    pub max_concurrent_per_key: usize,
    /// Generations one API key may start per minute (GCRA: evenly spaced, with a
    /// burst of the whole minute's allowance); more are refused with RESOURCE_EXHAUSTED
    /// (HTTP 429 with Retry-After) [default: 0, no limit]. Needs --api-key-file.
    #[arg(long, env = "TESSERA_REQUESTS_PER_MINUTE_PER_KEY", default_value_t = 0)]
    pub requests_per_minute_per_key: u32,
}

/// The limits a request is validated against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `max_tokens` of a request that does not set it.
    pub default_max_tokens: u32,
    /// Most images per request.
    pub max_images: usize,
    /// Most pixels per image.
    pub max_image_pixels: u64,
    /// Most bytes of text in one conversation, checked before it is tokenized: more
    /// cannot fit in the model's positions ([`crate::ModelFiles::max_text_bytes`]).
    pub max_text_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Config::new("").limits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        config: Config,
    }

    #[test]
    fn the_flag_defaults_are_the_constructor_defaults() {
        let parsed = Cli::try_parse_from(["gateway", "--model", "/snap"]).unwrap();
        let new = Config::new("/snap");
        assert_eq!(parsed.config.limits(), new.limits());
        assert_eq!(parsed.config.member, new.member);
        assert_eq!(
            parsed.config.request_timeout_seconds,
            new.request_timeout_seconds
        );
        let set = Cli::try_parse_from(["gateway", "--model", "/s", "--max-images", "2"]).unwrap();
        assert_eq!(set.config.max_images, 2);
        assert_eq!(parsed.config.http, new.http);
        assert_eq!(parsed.config.public_limits, new.public_limits);
        assert_eq!(parsed.config.remote_images, new.remote_images);
        assert!(!new.remote_images.allow_remote_images);
        let remote = Cli::try_parse_from([
            "gateway",
            "--model",
            "/s",
            "--allow-remote-images",
            "--remote-image-max-bytes",
            "1024",
        ])
        .unwrap();
        assert!(remote.config.remote_images.allow_remote_images);
        assert_eq!(remote.config.remote_images.remote_image_max_bytes, 1024);
        let metrics =
            Cli::try_parse_from(["gateway", "--model", "/s", "--metrics", "0.0.0.0:9090"]).unwrap();
        assert_eq!(
            metrics.config.member.metrics,
            Some(([0, 0, 0, 0], 9090).into())
        );
        assert!(new.validate().is_ok());
        let zero = Config {
            request_timeout_seconds: 0,
            ..new
        };
        let err = zero.validate().unwrap_err().to_string();
        assert!(err.contains("--request-timeout-seconds"), "{err}");
    }
}
