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
use std::time::Duration;

use tessera_proto::Limited;
use tessera_proto::internal::v1::expert_server::ExpertServer;
use tessera_runtime::member::{self, Context, Grpc, MemberArgs, Readiness};
use tessera_runtime::placer::{self, ExpertLayout};
use tessera_runtime::pool::PoolArgs;
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
    /// The most bytes of routed-expert weights this worker holds (e.g. 20GiB); the
    /// placement gives it no more, and it drops what it loses before loading what it
    /// gains when both do not fit [default: on a GPU, 85% of the GPU's free memory
    /// once the model is open; inside a container, 85% of its memory limit less what
    /// the process holds then; else no limit].
    #[arg(long, env = "TESSERA_EXPERT_MEMORY_BYTES", value_parser = parse_size, value_name = "SIZE")]
    pub expert_memory_bytes: Option<u64>,
    /// Milliseconds the published placement must stay unchanged before a starting
    /// worker loads its share (workers starting together each publish one; only the
    /// last is loaded).
    #[arg(long, env = "TESSERA_PLACEMENT_SETTLE_MS", default_value_t = DEFAULT_SETTLE_MS)]
    pub placement_settle_ms: u64,
    /// How experts are placed over the pool (every expert-worker and scheduler
    /// places, so give all of them the same values).
    #[command(flatten)]
    pub pool: PoolArgs,
}

/// Default for `--placement-settle-ms`.
pub const DEFAULT_SETTLE_MS: u64 = 1000;

fn parse_size(text: &str) -> std::result::Result<u64, String> {
    tessera_runtime::memory::parse_size(text)
}

impl Config {
    /// Defaults for the snapshot at `model`.
    pub fn new(model: impl Into<std::path::PathBuf>) -> Self {
        Self {
            member: MemberArgs::new(model),
            expert_memory_bytes: None,
            placement_settle_ms: DEFAULT_SETTLE_MS,
            pool: PoolArgs::default(),
        }
    }

    /// The expert budget: `--expert-memory-bytes`, else on a GPU 85% of its free
    /// memory, else derived from the cgroup's limit and what the process holds now
    /// (`None`: no limit).
    pub fn budget(&self, device: &candle_core::Device) -> Option<u64> {
        self.expert_memory_bytes.or_else(|| {
            if !device.is_cpu() {
                let (free, _total) = tessera_runtime::device::gpu_memory(device)?;
                return Some(free / 100 * 85);
            }
            let limit = tessera_runtime::memory::cgroup_limit()?;
            let held = tessera_runtime::memory::resident_bytes().unwrap_or(0);
            Some((limit / 100 * 85).saturating_sub(held))
        })
    }
}

/// The expert-worker as the member lifecycle drives it.
struct Worker {
    service: ExpertService,
    cfg: Config,
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
        let (service, dir) = (
            self.service.clone(),
            self.cfg.member.model_dir().to_path_buf(),
        );
        let (id, compute, cfg) = (ctx.id.clone(), ctx.compute.clone(), self.cfg.clone());
        tokio::task::spawn_blocking(move || {
            let budget = cfg.budget(&compute.device);
            service.open(&dir, &id, compute, budget)
        })
        .await
        .map_err(Error::Join)??;
        if let Some(capacity) = self.service.capacity() {
            tracing::info!(
                capacity,
                "expert budget: the most routed experts this worker holds"
            );
        }
        Ok(self.service.fingerprint().to_string())
    }

    fn fingerprint(fingerprint: &String) -> String {
        fingerprint.clone()
    }

    fn capacity(&self) -> Option<usize> {
        self.service.capacity()
    }

    async fn start(&self, _: String, ctx: &Context) -> Result<Readiness> {
        let (moe_layers, n_experts) = self.service.layout();
        let layout = ExpertLayout {
            moe_layers,
            n_experts,
        };
        // Both stop when shutdown begins: a draining worker keeps the shard it has.
        let tasks = ctx.shutdown.child_token();
        tokio::spawn(placer::run(
            ctx.discovery.clone(),
            layout,
            self.cfg.pool.policy(),
            None,
            tasks.clone(),
        ));
        tokio::spawn(follow::run(
            self.service.clone(),
            ctx.id.clone(),
            ctx.discovery.clone(),
            ctx.health.clone(),
            Duration::from_millis(self.cfg.placement_settle_ms),
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
        cfg: cfg.clone(),
    };
    member::run(worker, &cfg.member, listener, discovery, shutdown).await
}
