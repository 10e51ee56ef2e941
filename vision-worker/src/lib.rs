//! The vision-worker: tiles, encodes (SigLIP) and projects images into the
//! image-token embeddings of the language model (`docs/ARCHITECTURE.md`;
//! `tessera.internal.v1.Vision`).
//!
//! - [`config`]: the typed [`Config`] (clap flags with `TESSERA_*` env fallbacks)
//! - [`server`]: [`run`] and [`serve`], the member lifecycle
//!   (`tessera_runtime::member`) around the service
//! - [`service`]: the `Vision` gRPC service ([`VisionService`]) and its [`Stats`]
//! - [`encoder`]: the model thread that runs one tower pass at a time
//! - [`cache`]: the LRU of encoded images keyed by content hash and cropping
//! - [`metrics`]: the worker's Prometheus families
//! - [`error`]: the crate's one error type and its mapping to `tonic::Status`

pub mod cache;
pub mod config;
pub mod encoder;
pub mod error;
pub mod metrics;
pub mod server;
pub mod service;

pub use cache::CacheStats;
pub use config::Config;
pub use error::{Error, Result};
pub use server::{run, serve};
pub use service::{Stats, VisionService};
