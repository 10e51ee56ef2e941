//! The scheduler (ARCHITECTURE.md): holds embeddings, attention, norms, gates,
//! shared experts, dense layers and lm_head, runs requests through them and sends
//! each MoE layer's routed experts to the expert-workers that own them. Serves
//! `tessera.internal.v1.Scheduler`.
//!
//! - [`config`]: [`Config`], the flags
//! - [`service`]: the gRPC service (`Submit`, `Cancel`)
//! - [`request`]: up-front checks of a `SubmitRequest`
//! - [`active`]: the queued and running requests by id (cancel, uniqueness)
//! - [`engine`]: the model on its own thread: continuous batching over a paged KV cache
//! - [`remote_experts`]: [`RemoteExperts`], an [`ExpertBackend`](tessera_model::experts::ExpertBackend)
//!   that dispatches routes to expert-workers and retries a layer on newer routing tables
//! - [`sequence`]: one request inside the engine (tokens, sampler, KV blocks)
//! - [`kv`]: the KV cache's block pool (allocation, prefix reuse, LRU eviction)
//! - [`dispatch`]: splitting one layer's routes into one batch per worker
//! - [`router`]: the task that keeps the routing table at the newest ready placement
//! - [`stats`]: request totals and the expert-bytes-per-token figure, exported as
//!   the scheduler's Prometheus metrics
//! - [`error`]: the crate's one error type and its gRPC codes
//! - [`run`]: the service lifecycle (load, register, serve, drain)

pub mod active;
pub mod config;
pub mod dispatch;
pub mod engine;
pub mod error;
pub mod kv;
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
use tessera_model::weights::{Checkpoint, LoadTarget};
use tessera_proto::MAX_MESSAGE_BYTES;
use tessera_proto::internal::v1::scheduler_server::SchedulerServer;
use tessera_runtime::discovery::check_same_model;
use tessera_runtime::discovery::{Discovery, Member, Role};
use tessera_runtime::metrics::{Endpoint, ExpertDispatch};
use tessera_runtime::placer::{self, ExpertLayout};
use tessera_runtime::serving;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;

pub use config::{Config, EngineConfig, Precision};
pub use error::{Error, Result};
pub use remote_experts::{RemoteExperts, RoutingTable};
pub use service::SchedulerService;
pub use stats::{Stats, StatsSnapshot};

/// What loading produces, on a blocking thread.
struct Loaded {
    config: ModelConfig,
    model: LanguageModel,
    tokenizer: ChatTokenizer,
    fingerprint: String,
    /// Names of the tensors taken from the checkpoint.
    loaded: Vec<String>,
}

fn load(cfg: &Config) -> Result<Loaded> {
    let dir = &cfg.model;
    let fail = |source| Error::Load {
        path: dir.clone(),
        source,
    };
    let config = ModelConfig::from_dir(dir).map_err(fail)?;
    let checkpoint = Checkpoint::open(dir).map_err(fail)?;
    let device = candle_core::Device::Cpu;
    let target = LoadTarget {
        checkpoint: &checkpoint,
        dtype: cfg.dtype.dtype(),
        device: &device,
    };
    let model = LanguageModel::load(&config.language, target).map_err(fail)?;
    let tokenizer = ChatTokenizer::from_dir(dir).map_err(fail)?;
    let fingerprint = tessera_model::fingerprint(dir).map_err(fail)?;
    let loaded = checkpoint.loaded();
    Ok(Loaded {
        config,
        model,
        tokenizer,
        fingerprint,
        loaded,
    })
}

/// Serves the scheduler on `listener` until `shutdown` (see the service contract
/// in the crate docs of `tessera-runtime`): health NOT_SERVING while loading,
/// SERVING and registered once loaded, then drain for at most `grace_seconds`.
/// With `cfg.metrics` it also serves `GET /metrics` and `GET /health` there.
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
    let local = listener.local_addr().map_err(Error::Listener)?;
    let advertise = cfg.advertise.clone().unwrap_or_else(|| local.to_string());
    let id = cfg
        .id
        .clone()
        .unwrap_or_else(|| format!("scheduler-{advertise}"));

    type Server = SchedulerServer<SchedulerService>;
    stats.export_as(&id);
    // The dispatch families appear on `/metrics` from the start.
    ExpertDispatch::get();
    let service = SchedulerService::new(stats.clone());
    let (health, health_service) = serving::health::<Server>().await;
    let _metrics = Endpoint::start_for(cfg.metrics, &health)
        .await
        .map_err(Error::Listener)?;
    let stop_accepting = CancellationToken::new();
    let mut server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(serving::reflection())
            .add_service(
                SchedulerServer::new(service.clone())
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
            .serve_with_incoming_shutdown(
                TcpIncoming::from(listener).with_nodelay(Some(true)),
                stop_accepting.clone().cancelled_owned(),
            ),
    );
    tracing::info!(%local, model = %cfg.model.display(), "scheduler loading");

    let load_cfg = cfg.clone();
    let loaded = tokio::select! {
        loaded = tokio::task::spawn_blocking(move || load(&load_cfg)) => loaded,
        () = shutdown.cancelled() => {
            stop_accepting.cancel();
            return Ok(server.await??);
        }
    };
    let loaded = match loaded.map_err(Error::from).and_then(|l| l) {
        Ok(loaded) => loaded,
        Err(e) => {
            stop_accepting.cancel();
            let _ = server.await;
            return Err(e);
        }
    };

    let background = shutdown.child_token();
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
        "scheduler weights loaded (routed experts live on expert-workers)"
    );
    let (tables_tx, tables) = watch::channel(None);
    tokio::spawn(placer::run(discovery.clone(), layout, background.clone()));
    tokio::spawn(router::run(
        discovery.clone(),
        tables_tx,
        loaded.fingerprint.clone(),
        background.clone(),
    ));
    let experts = Arc::new(RemoteExperts::following(
        tables,
        tokio::runtime::Handle::current(),
        loaded.fingerprint.clone(),
        cfg.expert_wait(),
    ));
    let (vocab_size, hidden_size) = (language.vocab_size, language.hidden_size);
    let (max_positions, eos_token_id) = (language.max_position_embeddings, language.eos_token_id);
    let engine = engine::Engine::start(
        loaded.model,
        loaded.tokenizer,
        experts,
        stats,
        cfg.max_queue,
        cfg.engine.clone(),
    )?;
    let limits = request::Limits {
        vocab_size,
        hidden_size,
        max_positions,
        eos_token_id,
        cache_tokens: engine.cache_tokens(),
    };
    service.set_ready(service::Ready {
        engine,
        fingerprint: loaded.fingerprint.clone(),
        limits,
    });
    check_same_model(&discovery.members(), &loaded.fingerprint)?;
    health.serving::<Server>().await;
    let registration = discovery.register(
        Member::new(Role::Scheduler, id.clone(), advertise)
            .with_fingerprint(loaded.fingerprint.clone()),
    )?;
    tracing::info!(%id, fingerprint = %loaded.fingerprint, "scheduler serving");

    tokio::select! {
        () = shutdown.cancelled() => {}
        result = &mut server => {
            background.cancel();
            result??;
            return Ok(());
        }
    }
    tracing::info!(grace_s = cfg.grace_seconds, "scheduler shutting down");
    health.not_serving::<Server>().await;
    drop(registration);
    stop_accepting.cancel();
    let result = match tokio::time::timeout(cfg.grace(), &mut server).await {
        Ok(result) => result?.map_err(Error::from),
        Err(_) => {
            tracing::warn!(
                in_flight = service.active().len(),
                "grace period over; cancelling in-flight requests"
            );
            service.active().cancel_all();
            server.abort();
            Ok(())
        }
    };
    background.cancel();
    result
}
