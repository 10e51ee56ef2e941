//! The scheduler (`docs/ARCHITECTURE.md`): holds embeddings, attention, norms,
//! gates, shared experts, dense layers and lm_head, runs requests through them and
//! sends each MoE layer's routed experts to the expert-workers that own them.
//! Serves `tessera.internal.v1.Scheduler`.
//!
//! - [`config`]: [`Config`], the flags
//! - [`service`]: the gRPC service (`Submit`, `Cancel`)
//! - [`request`]: up-front checks of a `SubmitRequest`
//! - [`active`]: the queued and running requests by id (cancel, uniqueness)
//! - [`cancel`]: a step's cancellation (any of its requests cancelled or out of time)
//! - [`engine`]: the model on its own thread: continuous batching over a paged KV
//!   cache, the one decode loop
//! - [`local`]: one generation in this process through the engine (`tessera generate`)
//! - [`remote_experts`]: [`RemoteExperts`], an [`ExpertBackend`](tessera_model::experts::ExpertBackend)
//!   that dispatches routes to expert-workers and retries a layer on newer routing tables
//! - [`sequence`]: one request inside the engine (tokens, sampler, stop strings, KV blocks)
//! - [`kv`]: the KV cache's block pool (allocation, prefix reuse, LRU eviction)
//! - [`dispatch`]: splitting one layer's routes into one batch per worker
//! - [`router`]: the task that keeps the routing table at the newest ready placement
//! - [`stats`]: request totals and the expert-bytes-per-token figure, exported as
//!   the scheduler's Prometheus metrics ([`metrics`])
//! - [`error`]: the crate's one error type and its gRPC codes
//! - [`run`]: the member lifecycle (`tessera_runtime::member`) around the service

pub mod active;
pub mod cancel;
pub mod config;
pub mod dispatch;
pub mod engine;
pub mod error;
pub mod kv;
pub mod local;
pub mod metrics;
pub mod remote_experts;
pub mod request;
pub mod router;
pub mod sequence;
pub mod service;
pub mod stats;

use std::sync::Arc;

use tessera_model::chat::ChatTokenizer;
use tessera_model::config::ModelConfig;
use tessera_model::language::LanguageModel;
use tessera_model::weights::Checkpoint;
use tessera_proto::Limited;
use tessera_proto::internal::v1::scheduler_server::SchedulerServer;
use tessera_runtime::device::Compute;
use tessera_runtime::discovery::{Discovery, Role};
use tessera_runtime::member::{self, Context, Grpc, Readiness};
use tessera_runtime::placer::{self, ExpertLayout};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use config::{Config, EngineConfig, WireDtype};

use crate::metrics::ExpertDispatch;

/// How much a load-aware placement must cut the busiest worker's expected load
/// (relative to the mean) before a scheduler publishes it: rebalancing moves
/// experts, so small gains are not worth it.
const REBALANCE_MIN_GAIN: f64 = 0.1;
pub use error::{Error, Result};
pub use remote_experts::{RemoteExperts, RoutingTable};
pub use service::SchedulerService;
pub use stats::{Stats, StatsSnapshot};

/// What loading produces, on a blocking thread.
pub struct Loaded {
    pub config: ModelConfig,
    pub model: LanguageModel,
    pub tokenizer: ChatTokenizer,
    pub fingerprint: String,
    /// Names of the tensors taken from the checkpoint.
    pub loaded: Vec<String>,
    /// The dtype routed experts' dense weights are held in wherever this compute
    /// loads them (`None`: no MoE layer, or int8).
    pub experts_dtype: Option<candle_core::DType>,
}

/// Loads what a scheduler holds from the snapshot `dir` onto `compute`: the
/// language model without its routed experts, and the tokenizer. Blocking.
pub fn load(dir: &std::path::Path, compute: &Compute) -> Result<Loaded> {
    let fail = |source| Error::Load {
        path: dir.to_path_buf(),
        source,
    };
    let config = ModelConfig::from_dir(dir).map_err(fail)?;
    let checkpoint = Checkpoint::open(dir).map_err(fail)?;
    let target = compute.target(&checkpoint);
    let model = LanguageModel::load(&config.language, target).map_err(fail)?;
    let tokenizer = ChatTokenizer::from_dir(dir).map_err(fail)?;
    let fingerprint = tessera_model::fingerprint(dir).map_err(fail)?;
    let loaded = checkpoint.loaded();
    let experts_dtype = config.language.moe_layers().first().and_then(|l| {
        let name = format!("language.model.layers.{l}.mlp.experts.0.gate_proj.weight");
        let stored = checkpoint.stored_dtype(&name).ok()?;
        compute.weights.dense_dtype(stored, compute.dtype)
    });
    Ok(Loaded {
        config,
        model,
        tokenizer,
        fingerprint,
        loaded,
        experts_dtype,
    })
}

/// The scheduler as the member lifecycle drives it.
struct Scheduler {
    cfg: Config,
    service: SchedulerService,
    stats: Arc<Stats>,
}

impl member::Service for Scheduler {
    type Loaded = Loaded;
    type Error = Error;
    const ROLE: Role = Role::Scheduler;

    fn grpc(&self) -> Grpc {
        Grpc::new(SchedulerServer::new(self.service.clone()).limited())
    }

    async fn load(&self, ctx: &Context) -> Result<Loaded> {
        let dir = self.cfg.member.model_dir().to_path_buf();
        let compute = ctx.compute.clone();
        tokio::task::spawn_blocking(move || load(&dir, &compute)).await?
    }

    fn fingerprint(loaded: &Loaded) -> String {
        loaded.fingerprint.clone()
    }

    async fn start(&self, loaded: Loaded, ctx: &Context) -> Result<Readiness> {
        let stats = &self.stats;
        stats.export_as(&ctx.id);
        let language = &loaded.config.language;
        let layout = ExpertLayout {
            moe_layers: language.moe_layers(),
            n_experts: language.moe.as_ref().map_or(0, |m| m.n_routed_experts),
        };
        stats.set_moe_layers(layout.moe_layers.len());
        stats.set_loaded(&loaded.loaded);
        let snapshot = stats.snapshot();
        tracing::info!(
            tensors = snapshot.weight_tensors,
            routed_expert_tensors = snapshot.routed_expert_tensors,
            weights = %ctx.compute.weights,
            held_bytes = tessera_model::held::Held::held_bytes(&loaded.model),
            "scheduler weights loaded (routed experts live on expert-workers)"
        );
        // Routing follows the placement until the drain is over: in-flight
        // requests still need it.
        let background: CancellationToken = ctx.stopped.clone();
        let (tables_tx, tables) = watch::channel(None);
        let n_experts = layout.n_experts;
        let loads = self
            .cfg
            .pool
            .rebalance_every()
            .map(|every| placer::LoadSource {
                measure: Arc::new(move || ExpertDispatch::get().loads(n_experts)),
                every,
                min_gain: REBALANCE_MIN_GAIN,
            });
        tokio::spawn(placer::run(
            ctx.discovery.clone(),
            layout,
            self.cfg.pool.policy(),
            loads,
            background.clone(),
        ));
        tokio::spawn(router::run(
            ctx.discovery.clone(),
            tables_tx,
            loaded.fingerprint.clone(),
            ctx.tls.clone(),
            background,
        ));
        let wire = (self.cfg.engine.expert_wire).resolve(loaded.experts_dtype, ctx.compute.dtype);
        tracing::info!(
            expert_wire = wire.as_str(),
            "hidden states to expert-workers"
        );
        let mut remote = RemoteExperts::following(
            tables,
            tokio::runtime::Handle::current(),
            loaded.fingerprint.clone(),
            self.cfg.expert_wait(),
        )
        .with_wire(wire);
        if let Some(timeout) = self.cfg.expert_timeout() {
            remote = remote.with_call_timeout(timeout);
        }
        let experts = Arc::new(remote);
        let (vocab_size, hidden_size) = (language.vocab_size, language.hidden_size);
        let (max_positions, eos_token_id) =
            (language.max_position_embeddings, language.eos_token_id);
        let engine = engine::Engine::start(
            loaded.model,
            loaded.tokenizer,
            experts,
            stats.clone(),
            self.cfg.max_waiting,
            self.cfg.engine.clone(),
        )?;
        let limits = request::Limits {
            vocab_size,
            hidden_size,
            max_positions,
            eos_token_id,
            cache_tokens: engine.cache_tokens(),
        };
        self.service.set_ready(service::Ready {
            engine,
            fingerprint: loaded.fingerprint,
            limits,
        });
        Ok(Readiness::Serving)
    }

    fn grace_expired(&self) {
        tracing::warn!(
            in_flight = self.service.active().len(),
            "grace period over; cancelling in-flight requests"
        );
        self.service.active().cancel_all();
    }
}

/// Serves the scheduler on `listener` until `shutdown` (`tessera_runtime::member`):
/// health NOT_SERVING while loading, SERVING and registered once loaded, then
/// drain for at most the grace period.
pub async fn run(
    cfg: Config,
    listener: TcpListener,
    discovery: Arc<dyn Discovery>,
    shutdown: CancellationToken,
) -> Result<()> {
    run_with_stats(cfg, listener, discovery, shutdown, Arc::default()).await
}

/// [`run`], keeping the request totals in `stats` (readable while it runs).
pub async fn run_with_stats(
    cfg: Config,
    listener: TcpListener,
    discovery: Arc<dyn Discovery>,
    shutdown: CancellationToken,
    stats: Arc<Stats>,
) -> Result<()> {
    cfg.validate()?;
    // The dispatch families appear on `/metrics` from the start.
    metrics::ExpertDispatch::get();
    let member = cfg.member.clone();
    let scheduler = Scheduler {
        service: SchedulerService::new(stats.clone()),
        cfg,
        stats,
    };
    member::run(scheduler, &member, listener, discovery, shutdown).await
}
