//! The expert-worker: holds a shard of the routed experts of one snapshot and
//! computes their weighted outputs for the rows a scheduler sends
//! (ARCHITECTURE.md, "Expert dispatch"; `tessera.internal.v1.Expert`).
//!
//! - [`service`]: the `Expert` gRPC service over [`tessera_model::experts::LocalExperts`]
//! - [`error`]: the crate's one error type and its mapping to `tonic::Status`
//! - [`run`]: load the configured experts and serve them on a listener until shutdown

pub mod error;
pub mod service;

use std::collections::BTreeSet;
use std::future::Future;
use std::path::PathBuf;

use tessera_proto::MAX_MESSAGE_BYTES;
use tessera_proto::internal::v1::expert_server::ExpertServer;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

pub use error::{Error, Result};
pub use service::ExpertService;

/// What one expert-worker serves.
#[derive(Debug, Clone)]
pub struct Config {
    /// The snapshot folder (`config.json`, `*.safetensors`).
    pub model: PathBuf,
    /// The `(layer, expert)` pairs to hold.
    pub experts: BTreeSet<(usize, usize)>,
    /// Fingerprint of the model; `Forward` requests must carry the same one.
    pub fingerprint: String,
}

/// Loads the configured experts (f32, CPU) and serves `Expert` on `listener`
/// until `shutdown` completes.
pub async fn run(
    cfg: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let service = tokio::task::spawn_blocking(move || ExpertService::load(&cfg))
        .await
        .map_err(Error::Join)??;
    tracing::info!(
        experts = service.len(),
        addr = ?listener.local_addr().ok(),
        "expert-worker serving"
    );
    let server = ExpertServer::new(service)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    tonic::transport::Server::builder()
        .add_service(server)
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), shutdown)
        .await
        .map_err(Error::Transport)
}
