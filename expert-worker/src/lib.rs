//! The expert-worker: holds a shard of the routed experts of one snapshot and
//! computes their weighted outputs for the rows a scheduler sends
//! (`docs/ARCHITECTURE.md`, "Expert dispatch"; `tessera.internal.v1.Expert`).
//!
//! A worker registers in discovery as soon as it has read the model's config,
//! then follows the published placement: whenever a new one arrives it loads
//! exactly the experts the placement gives it (missing ones first, then it drops
//! the ones it no longer owns) and reports the placement's version in `Info`.
//! It reports SERVING once the first placement is applied.
//!
//! - [`service`]: the `Expert` gRPC service over a swappable shard of
//!   [`tessera_model::experts::LocalExperts`]
//! - [`follow`]: the task that applies each new placement to the service
//! - [`metrics`]: the worker's Prometheus families
//! - [`error`]: the crate's one error type and its mapping to `tonic::Status`
//! - [`run`]: the member lifecycle (`tessera_runtime::member`) around the service

pub mod error;
pub mod follow;
pub mod metrics;
pub mod service;

use std::sync::Arc;

use tessera_proto::Limited;
use tessera_proto::internal::v1::expert_server::ExpertServer;
use tessera_runtime::member::{self, Context, Grpc, MemberArgs, Readiness};
use tessera_runtime::placer::{self, ExpertLayout};
use tessera_runtime::{CancellationToken, Discovery, Role};
use tokio::net::TcpListener;

pub use error::{Error, Result};
pub use service::ExpertService;

/// What one expert-worker serves. Which experts it holds is not configuration:
/// it comes from the placement published in discovery.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    #[command(flatten)]
    pub member: MemberArgs,
}

impl Config {
    /// Defaults for the snapshot at `model`.
    pub fn new(model: impl Into<std::path::PathBuf>) -> Self {
        Self {
            member: MemberArgs::new(model),
        }
    }
}

/// The expert-worker as the member lifecycle drives it.
struct Worker {
    service: ExpertService,
    member: MemberArgs,
}

impl member::Service for Worker {
    /// The model's fingerprint.
    type Loaded = String;
    type Error = Error;
    const ROLE: Role = Role::ExpertWorker;

    fn grpc(&self) -> Grpc {
        Grpc::new(ExpertServer::new(self.service.clone()).limited())
    }

    /// Reads the model's config and fingerprint; experts load as placements
    /// arrive.
    async fn load(&self, ctx: &Context) -> Result<String> {
        let (service, dir) = (self.service.clone(), self.member.model_dir().to_path_buf());
        let (id, compute) = (ctx.id.clone(), ctx.compute.clone());
        tokio::task::spawn_blocking(move || service.open(&dir, &id, compute))
            .await
            .map_err(Error::Join)??;
        Ok(self.service.fingerprint().to_string())
    }

    fn fingerprint(fingerprint: &String) -> String {
        fingerprint.clone()
    }

    async fn start(&self, _: String, ctx: &Context) -> Result<Readiness> {
        let (moe_layers, n_experts) = self.service.layout();
        let layout = ExpertLayout {
            moe_layers,
            n_experts,
        };
        // Both stop when shutdown begins: a draining worker keeps the shard it has.
        let tasks = ctx.shutdown.child_token();
        tokio::spawn(placer::run(ctx.discovery.clone(), layout, tasks.clone()));
        tokio::spawn(follow::run(
            self.service.clone(),
            ctx.id.clone(),
            ctx.discovery.clone(),
            ctx.health.clone(),
            tasks,
        ));
        Ok(Readiness::Later)
    }
}

/// Serves `Expert` on `listener`, registered in `discovery` and following its
/// placement, until `shutdown`; then reports NOT_SERVING, deregisters and drains
/// in-flight calls for at most the grace period (`tessera_runtime::member`).
pub async fn run(
    cfg: Config,
    listener: TcpListener,
    discovery: Arc<dyn Discovery>,
    shutdown: CancellationToken,
) -> Result<()> {
    let worker = Worker {
        service: ExpertService::new(),
        member: cfg.member.clone(),
    };
    member::run(worker, &cfg.member, listener, discovery, shutdown).await
}
