//! `tessera up`: the whole cluster in one process — a gateway, a vision-worker, a
//! scheduler and N expert-workers, each a real gRPC server on its own loopback
//! port, found through an in-process discovery (no etcd needed). [`start`] also
//! serves `tessera bench --model`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use clap::Args;
use tessera_runtime::device::ComputeArgs;
use tessera_runtime::member::{DEFAULT_GRACE_SECONDS, MemberArgs, check_folder};
use tessera_runtime::pool::PoolArgs;
use tessera_runtime::{CancellationToken, Discovery, MemoryDiscovery, ModelArgs, Role};
use tessera_scheduler::EngineConfig;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

#[derive(Debug, Args)]
pub struct UpArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Where and in what precision every service computes.
    #[command(flatten)]
    compute: ComputeArgs,
    /// Expert-workers to spread the routed experts over (each holds about 1/N).
    #[arg(long, env = "TESSERA_EXPERT_WORKERS", default_value_t = 2)]
    expert_workers: usize,
    /// Address of the public gRPC API (port 0 picks a free port; the address is printed).
    #[arg(long, env = "TESSERA_GRPC", default_value = "127.0.0.1:50051")]
    grpc: SocketAddr,
    /// Also serve the OpenAI-compatible HTTP API on this address (port 0 picks a
    /// free port; the address is printed) [default: no HTTP].
    #[arg(long, env = "TESSERA_HTTP")]
    http: Option<SocketAddr>,
    /// Serve the Prometheus metrics of every service (`GET /metrics`) and
    /// `GET /health` on this address (the address is printed) [default: none;
    /// `--http` serves `/metrics` too].
    #[arg(long, env = "TESSERA_METRICS")]
    metrics: Option<SocketAddr>,
    /// Seconds to drain in-flight requests on Ctrl-C / SIGTERM.
    #[arg(long, env = "TESSERA_GRACE_SECONDS", default_value_t = DEFAULT_GRACE_SECONDS)]
    grace_seconds: u64,
    /// Give up if the cluster is not ready after this many seconds (loading large
    /// models on CPU takes minutes).
    #[arg(long, default_value_t = 1800)]
    ready_timeout_seconds: u64,
    /// Requests that may wait for a place among the `--max-seqs` that run; beyond it
    /// a request is refused at once with RESOURCE_EXHAUSTED (HTTP 429).
    #[arg(
        long,
        env = "TESSERA_MAX_WAITING",
        default_value_t = tessera_scheduler::config::DEFAULT_MAX_WAITING
    )]
    max_waiting: usize,
    #[command(flatten, next_help_heading = "Engine")]
    engine: EngineConfig,
    /// The model's name in the APIs; repeat or separate with commas for several, the
    /// first being the one reported [default: the Hub id, else the snapshot folder's
    /// name].
    #[arg(
        long = "served-model-name",
        env = "TESSERA_SERVED_MODEL_NAME",
        value_delimiter = ','
    )]
    served_model_names: Vec<String>,
    #[command(flatten, next_help_heading = "API keys")]
    auth: tessera_gateway::ClientAuth,
    #[command(flatten, next_help_heading = "Public API limits")]
    public_limits: tessera_gateway::PublicLimits,
    #[command(flatten, next_help_heading = "Remote images (OpenAI API)")]
    remote_images: tessera_gateway::RemoteImageConfig,
    #[command(flatten, next_help_heading = "Expert placement")]
    pool: PoolArgs,
}

type Task = (&'static str, anyhow::Result<()>);

async fn loopback() -> anyhow::Result<TcpListener> {
    TcpListener::bind("127.0.0.1:0")
        .await
        .context("cannot bind a loopback port")
}

/// What an in-process cluster runs: `tessera up`'s flags, also used by `tessera bench`.
#[derive(Debug, Clone)]
pub struct Options {
    pub model: PathBuf,
    pub compute: ComputeArgs,
    pub expert_workers: usize,
    /// Where the gateway listens (port 0 picks a free one).
    pub grpc: SocketAddr,
    /// Where the gateway serves the OpenAI-compatible HTTP API, if anywhere.
    pub http: Option<SocketAddr>,
    pub grace_seconds: u64,
    /// How long loading may take before `start` gives up.
    pub ready_timeout: Duration,
    pub engine: EngineConfig,
    /// Requests that may wait beyond the running ones before more are refused.
    pub max_waiting: usize,
    /// The model's names in the APIs (`--served-model-name`; empty for its own id).
    pub served_model_names: Vec<String>,
    /// Who may call the gateway's public APIs.
    pub auth: tessera_gateway::ClientAuth,
    /// How the gateway's public APIs bound their clients.
    pub public_limits: tessera_gateway::PublicLimits,
    /// Whether the gateway fetches http(s) image URLs, and within which limits.
    pub remote_images: tessera_gateway::RemoteImageConfig,
    /// How the routed experts are placed over the expert-workers.
    pub pool: PoolArgs,
}

impl Options {
    /// Rejects options no cluster can start with, before anything is loaded.
    pub fn validate(&self) -> anyhow::Result<()> {
        check_folder(&self.model)?;
        self.validate_flags()
    }

    /// [`Options::validate`] but for the model folder (checked before a download).
    pub fn validate_flags(&self) -> anyhow::Result<()> {
        if self.expert_workers == 0 {
            bail!("--expert-workers must be at least 1");
        }
        if self.max_waiting == 0 {
            bail!("--max-waiting must be at least 1");
        }
        self.compute.select()?;
        self.engine.validate()?;
        Ok(())
    }

    /// How the experts are placed: as `--expert-replicas` says, else one copy of each
    /// on a GPU, where every expert-worker of this process shares the one device (a
    /// second copy would take its memory and spread no work).
    fn pool(&self) -> PoolArgs {
        let mut pool = self.pool.clone();
        if pool.expert_replicas.is_none()
            && matches!(
                self.compute.device,
                tessera_runtime::device::DeviceSpec::Cuda(_)
            )
        {
            pool.expert_replicas = Some(1);
        }
        pool
    }

    /// The shared member flags of every service of the cluster.
    fn member(&self, id: Option<String>) -> MemberArgs {
        MemberArgs {
            id,
            grace_seconds: self.grace_seconds,
            compute: self.compute,
            ..MemberArgs::new(&self.model)
        }
    }
}

impl From<&UpArgs> for Options {
    fn from(args: &UpArgs) -> Self {
        Self {
            model: args.model.path.clone(),
            compute: args.compute,
            expert_workers: args.expert_workers,
            grpc: args.grpc,
            http: args.http,
            grace_seconds: args.grace_seconds,
            ready_timeout: Duration::from_secs(args.ready_timeout_seconds),
            engine: args.engine.clone(),
            max_waiting: args.max_waiting,
            served_model_names: args.served_model_names.clone(),
            auth: args.auth.clone(),
            public_limits: args.public_limits,
            remote_images: args.remote_images.clone(),
            pool: args.pool.clone(),
        }
    }
}

/// A started cluster: its public address and its services.
pub struct Running {
    /// The gateway's address (the public gRPC API).
    pub addr: SocketAddr,
    /// The gateway's HTTP address, when it serves HTTP.
    pub http: Option<SocketAddr>,
    /// Cancelling it stops every service.
    pub shutdown: CancellationToken,
    /// Start to ready.
    pub load_time: Duration,
    tasks: JoinSet<Task>,
}

impl Running {
    /// Runs until `shutdown` is cancelled or a service ends; then stops and joins
    /// them all.
    pub async fn wait(self) -> anyhow::Result<()> {
        wait(self.tasks, self.shutdown).await
    }

    /// Stops every service (draining within the grace period) and joins them.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.wait().await
    }
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let mut opts = Options::from(&args);
    opts.validate_flags()?;
    // Resolved once: every component loads the same folder.
    let mut model = args.model.clone();
    model.resolve().await?;
    opts.model = model.path;
    let shutdown = tessera_runtime::shutdown::on_signals();
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let metrics = match args.metrics {
        Some(addr) => {
            let (ready, shutdown) = (ready.clone(), shutdown.clone());
            let serving = move || {
                ready.load(std::sync::atomic::Ordering::Relaxed) && !shutdown.is_cancelled()
            };
            Some(tessera_runtime::metrics::Endpoint::start(addr, serving).await?)
        }
        None => None,
    };
    eprintln!(
        "tessera up: loading {} into 1 scheduler, 1 vision-worker and {} expert-workers…",
        opts.model.display(),
        opts.expert_workers
    );
    let running = start(opts, shutdown.clone()).await?;
    if !shutdown.is_cancelled() {
        let addr = running.addr;
        // Tests and scripts read these lines for the addresses; `serving` comes last,
        // once everything is listening.
        if let Some(http) = running.http {
            println!("tessera http on {http}");
        }
        if let Some(metrics) = &metrics {
            println!("tessera metrics on {}", metrics.local_addr());
        }
        ready.store(true, std::sync::atomic::Ordering::Relaxed);
        println!("tessera serving on {addr}");
        eprintln!(
            "tessera up: ready in {:.1}s; gRPC API at {addr} (tessera.v1.Tessera). Ctrl-C stops.",
            running.load_time.as_secs_f64()
        );
    }
    running.wait().await?;
    eprintln!("tessera up: stopped");
    Ok(())
}

/// Starts every service of a cluster on loopback ports and waits until it is
/// ready (or `shutdown` is cancelled while loading: the caller checks). A service
/// failing while loading, or loading past the timeout, stops them all.
pub async fn start(opts: Options, shutdown: CancellationToken) -> anyhow::Result<Running> {
    opts.validate()?;
    let discovery = Arc::new(MemoryDiscovery::new());
    let shared: Arc<dyn Discovery> = discovery.clone();
    let started = Instant::now();
    let mut tasks: JoinSet<Task> = JoinSet::new();
    let stages = Stages::follow(&shutdown);

    for i in 0..opts.expert_workers {
        let cfg = tessera_expert_worker::Config {
            member: opts.member(Some(format!("expert-worker-{i}"))),
            pool: opts.pool(),
            ..tessera_expert_worker::Config::new(&opts.model)
        };
        let run = tessera_expert_worker::run(
            cfg,
            loopback().await?,
            shared.clone(),
            stages.backends.clone(),
        );
        tasks.spawn(async move { ("expert-worker", run.await.map_err(anyhow::Error::from)) });
    }
    let vision = tessera_vision_worker::Config {
        member: opts.member(None),
        ..tessera_vision_worker::Config::new(&opts.model)
    };
    let run = tessera_vision_worker::run(
        vision,
        loopback().await?,
        shared.clone(),
        stages.backends.clone(),
    );
    tasks.spawn(async move { ("vision-worker", run.await.map_err(anyhow::Error::from)) });
    let scheduler = tessera_scheduler::Config {
        member: opts.member(None),
        max_waiting: opts.max_waiting,
        engine: opts.engine.clone(),
        pool: opts.pool(),
        ..tessera_scheduler::Config::new(&opts.model)
    };
    let run = tessera_scheduler::run(
        scheduler,
        loopback().await?,
        shared.clone(),
        stages.scheduler.clone(),
    );
    let done = stages.scheduler_done.clone().drop_guard();
    tasks.spawn(async move {
        let _done = done;
        ("scheduler", run.await.map_err(anyhow::Error::from))
    });
    let public = match TcpListener::bind(opts.grpc).await {
        Ok(public) => public,
        Err(e) => {
            shutdown.cancel();
            return Err(anyhow::Error::from(e).context(format!(
                "cannot listen on {} (is the port in use? try --grpc 127.0.0.1:0)",
                opts.grpc
            )));
        }
    };
    let addr = public.local_addr()?;
    let http_listener = match opts.http {
        Some(http) => match TcpListener::bind(http).await {
            Ok(listener) => Some(listener),
            Err(e) => {
                shutdown.cancel();
                return Err(anyhow::Error::from(e).context(format!(
                    "cannot listen on {http} (is the port in use? try --http 127.0.0.1:0)"
                )));
            }
        },
        None => None,
    };
    let http = http_listener
        .as_ref()
        .map(TcpListener::local_addr)
        .transpose()?;
    let gateway = tessera_gateway::Config {
        member: opts.member(None),
        served_model_names: opts.served_model_names.clone(),
        public_limits: opts.public_limits,
        auth: opts.auth.clone(),
        remote_images: opts.remote_images.clone(),
        ..tessera_gateway::Config::new(&opts.model)
    };
    let run = tessera_gateway::run_with(
        gateway,
        public,
        http_listener,
        shared.clone(),
        shutdown.clone(),
    );
    let done = stages.gateway_done.clone().drop_guard();
    tasks.spawn(async move {
        let _done = done;
        ("gateway", run.await.map_err(anyhow::Error::from))
    });

    tokio::select! {
        ready = tokio::time::timeout(opts.ready_timeout, ready(&discovery, opts.expert_workers)) => {
            if ready.is_err() {
                shutdown.cancel();
                bail!("the cluster was not ready after {}s", opts.ready_timeout.as_secs());
            }
        }
        Some(joined) = tasks.join_next() => {
            shutdown.cancel();
            return Err(failure(joined));
        }
        _ = shutdown.cancelled() => {}
    }
    Ok(Running {
        addr,
        http,
        shutdown,
        load_time: started.elapsed(),
        tasks,
    })
}

/// The order a cluster stops in: the gateway first (it refuses new requests and
/// drains the ones in flight within the grace period), then the scheduler, then the
/// vision-worker and the expert-workers, which the in-flight requests needed to
/// the end.
struct Stages {
    /// Cancelled once the gateway's task has ended.
    gateway_done: CancellationToken,
    /// Stops the scheduler.
    scheduler: CancellationToken,
    /// Cancelled once the scheduler's task has ended.
    scheduler_done: CancellationToken,
    /// Stops the vision-worker and the expert-workers.
    backends: CancellationToken,
}

impl Stages {
    /// Stages that start stopping when `shutdown` is cancelled (the gateway stops on
    /// `shutdown` itself).
    fn follow(shutdown: &CancellationToken) -> Self {
        let stages = Self {
            gateway_done: CancellationToken::new(),
            scheduler: CancellationToken::new(),
            scheduler_done: CancellationToken::new(),
            backends: CancellationToken::new(),
        };
        let (shutdown, gateway_done) = (shutdown.clone(), stages.gateway_done.clone());
        let (scheduler, scheduler_done) = (stages.scheduler.clone(), stages.scheduler_done.clone());
        let backends = stages.backends.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            gateway_done.cancelled().await;
            scheduler.cancel();
            scheduler_done.cancelled().await;
            backends.cancel();
        });
        stages
    }
}

/// Resolves once every member is registered and a placement over all
/// expert-workers is published.
async fn ready(discovery: &MemoryDiscovery, expert_workers: usize) {
    let mut members = discovery.subscribe();
    let mut placements = discovery.subscribe_placement();
    loop {
        let m = members.borrow_and_update().clone();
        let count = |role| m.iter().filter(|x| x.role == role).count();
        let placed = placements
            .borrow_and_update()
            .as_ref()
            .is_some_and(|p| p.workers().count() == expert_workers);
        if count(Role::Gateway) == 1
            && count(Role::Scheduler) == 1
            && count(Role::VisionWorker) == 1
            && count(Role::ExpertWorker) == expert_workers
            && placed
        {
            return;
        }
        tokio::select! {
            _ = members.changed() => {}
            _ = placements.changed() => {}
        }
    }
}

/// Runs until shutdown or until a service fails; then stops and joins them all.
async fn wait(mut tasks: JoinSet<Task>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        let failed = !matches!(&joined, Ok((_, Ok(()))));
        if failed && first_error.is_none() {
            first_error = Some(failure(joined));
        }
        // One service ending (failure or not) ends the cluster.
        shutdown.cancel();
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn failure(joined: Result<Task, tokio::task::JoinError>) -> anyhow::Error {
    match joined {
        Ok((role, Err(e))) => e.context(format!("the {role} failed")),
        Ok((role, Ok(()))) => anyhow!("the {role} stopped unexpectedly"),
        Err(e) => anyhow!("a service task panicked: {e}"),
    }
}
