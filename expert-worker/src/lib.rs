//! The expert-worker: holds a shard of the routed experts of one snapshot and
//! computes their weighted outputs for the rows a scheduler sends
//! (ARCHITECTURE.md, "Expert dispatch"; `tessera.internal.v1.Expert`).
//!
//! A worker registers in discovery as soon as it has read the model's config,
//! then follows the published placement: whenever a new one arrives it loads
//! exactly the experts the placement gives it (missing ones first, then it drops
//! the ones it no longer owns) and reports the placement's version in `Info`.
//!
//! - [`service`]: the `Expert` gRPC service over a swappable shard of
//!   [`tessera_model::experts::LocalExperts`]
//! - [`follow`]: the task that applies each new placement to the service
//! - [`error`]: the crate's one error type and its mapping to `tonic::Status`
//! - [`run`]: serve on a listener until shutdown

pub mod error;
pub mod follow;
pub mod service;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tessera_proto::MAX_MESSAGE_BYTES;
use tessera_proto::internal::v1::expert_server::ExpertServer;
use tessera_runtime::metrics::Endpoint;
use tessera_runtime::placer::{self, ExpertLayout};
use tessera_runtime::serving;
use tessera_runtime::{CancellationToken, Discovery, Member, Role};
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

pub use error::{Error, Result};
pub use service::ExpertService;

/// What one expert-worker serves. Which experts it holds is not configuration:
/// it comes from the placement published in discovery.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Snapshot folder (config.json, *.safetensors), or a Hub id such as
    /// deepseek-ai/deepseek-vl2-tiny (downloaded at start-up).
    #[arg(long, env = "TESSERA_MODEL")]
    pub model: PathBuf,
    /// This member's id in discovery [default: "expert-worker-<advertised address>"].
    #[arg(long, env = "TESSERA_ID")]
    pub id: Option<String>,
    /// host:port other members reach this service at [default: the listener's address].
    #[arg(long, env = "TESSERA_ADVERTISE")]
    pub advertise: Option<String>,
    /// Seconds to drain in-flight requests after a shutdown signal.
    #[arg(long, env = "TESSERA_GRACE_SECONDS", default_value_t = 25)]
    pub grace_seconds: u64,
    /// Serve Prometheus metrics (`GET /metrics`) and `GET /health` on this address
    /// [default: none].
    #[arg(long, env = "TESSERA_METRICS")]
    pub metrics: Option<SocketAddr>,
}

impl Config {
    /// Defaults for the snapshot at `model`.
    pub fn new(model: impl Into<PathBuf>) -> Self {
        Self {
            model: model.into(),
            id: None,
            advertise: None,
            grace_seconds: 25,
            metrics: None,
        }
    }
}

/// The gRPC service type, for health reports.
type Server = ExpertServer<ExpertService>;

/// Serves `Expert` on `listener`, registered in `discovery` and following its
/// placement, until `shutdown`; then reports NOT_SERVING, deregisters and drains
/// in-flight calls for at most `grace_seconds`. With `cfg.metrics` it also serves
/// `GET /metrics` and `GET /health` there.
pub async fn run(
    cfg: Config,
    listener: TcpListener,
    discovery: Arc<dyn Discovery>,
    shutdown: CancellationToken,
) -> Result<()> {
    let addr = listener.local_addr().map_err(Error::Bind)?;
    let advertise = cfg.advertise.clone().unwrap_or_else(|| addr.to_string());
    let id = cfg
        .id
        .clone()
        .unwrap_or_else(|| format!("expert-worker-{advertise}"));
    let (health, health_server) = serving::health::<Server>().await;
    let _metrics = Endpoint::start_for(cfg.metrics, &health)
        .await
        .map_err(Error::Metrics)?;
    let model = cfg.model.clone();
    let worker = id.clone();
    let service = tokio::task::spawn_blocking(move || ExpertService::open(&model, &worker))
        .await
        .map_err(Error::Join)??;

    tessera_runtime::discovery::check_same_model(&discovery.members(), service.fingerprint())
        .map_err(Error::Discovery)?;

    let stop_server = CancellationToken::new();
    let server = tonic::transport::Server::builder()
        .add_service(health_server)
        .add_service(serving::reflection())
        .add_service(
            ExpertServer::new(service.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            stop_server.clone().cancelled_owned(),
        );
    let server = tokio::spawn(server);

    let registration = discovery
        .register(
            Member::new(Role::ExpertWorker, &id, &advertise)
                .with_fingerprint(service.fingerprint()),
        )
        .map_err(Error::Discovery)?;
    tracing::info!(%id, %advertise, fingerprint = service.fingerprint(), "expert-worker registered");
    let (moe_layers, n_experts) = service.layout();
    let tasks = shutdown.child_token();
    let placer = tokio::spawn(placer::run(
        discovery.clone(),
        ExpertLayout {
            moe_layers,
            n_experts,
        },
        tasks.clone(),
    ));
    let follower = tokio::spawn(follow::run(
        service.clone(),
        id.clone(),
        discovery,
        health.clone(),
        tasks.clone(),
    ));

    shutdown.cancelled().await;
    tracing::info!(%id, "expert-worker shutting down");
    health.not_serving::<Server>().await;
    drop(registration);
    tasks.cancel();
    let _ = tokio::join!(placer, follower);
    stop_server.cancel();
    match tokio::time::timeout(Duration::from_secs(cfg.grace_seconds), server).await {
        Ok(joined) => joined.map_err(Error::Join)?.map_err(Error::Transport),
        Err(_) => {
            tracing::warn!(%id, "in-flight calls did not finish within the grace period");
            Ok(())
        }
    }
}
