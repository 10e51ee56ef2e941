//! `tessera up`: the whole cluster in one process — a gateway, a vision-worker, a
//! scheduler and N expert-workers, each a real gRPC server on its own loopback
//! port, found through an in-process discovery (no etcd needed).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use clap::Args;
use tessera_runtime::{CancellationToken, Discovery, MemoryDiscovery, Role};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Snapshot folder of a DeepSeek-VL2 checkpoint (config.json, tokenizer.json, *.safetensors).
    #[arg(long, env = "TESSERA_MODEL")]
    model: PathBuf,
    /// Expert-workers to spread the routed experts over (each holds about 1/N).
    #[arg(long, env = "TESSERA_EXPERT_WORKERS", default_value_t = 2)]
    expert_workers: usize,
    /// Address of the public gRPC API (port 0 picks a free port; the address is printed).
    #[arg(long, env = "TESSERA_GRPC", default_value = "127.0.0.1:50051")]
    grpc: SocketAddr,
    /// Seconds to drain in-flight requests on Ctrl-C / SIGTERM.
    #[arg(long, env = "TESSERA_GRACE_SECONDS", default_value_t = 25)]
    grace_seconds: u64,
    /// Give up if the cluster is not ready after this many seconds (loading large
    /// models on CPU takes minutes).
    #[arg(long, default_value_t = 1800)]
    ready_timeout_seconds: u64,
}

type Task = (&'static str, anyhow::Result<()>);

async fn loopback() -> anyhow::Result<TcpListener> {
    TcpListener::bind("127.0.0.1:0")
        .await
        .context("cannot bind a loopback port")
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    super::check_model_path(&args.model)?;
    if args.expert_workers == 0 {
        bail!("--expert-workers must be at least 1");
    }
    let shutdown = tessera_runtime::shutdown::on_signals();
    let discovery = Arc::new(MemoryDiscovery::new());
    let shared: Arc<dyn Discovery> = discovery.clone();
    let started = Instant::now();
    let mut tasks: JoinSet<Task> = JoinSet::new();

    for i in 0..args.expert_workers {
        let mut cfg = tessera_expert_worker::Config::new(&args.model);
        cfg.id = Some(format!("expert-worker-{i}"));
        cfg.grace_seconds = args.grace_seconds;
        let run =
            tessera_expert_worker::run(cfg, loopback().await?, shared.clone(), shutdown.clone());
        tasks.spawn(async move { ("expert-worker", run.await.map_err(anyhow::Error::from)) });
    }
    let mut vision = tessera_vision_worker::Config::new(&args.model);
    vision.grace_seconds = args.grace_seconds;
    let run =
        tessera_vision_worker::run(vision, loopback().await?, shared.clone(), shutdown.clone());
    tasks.spawn(async move { ("vision-worker", run.await.map_err(anyhow::Error::from)) });
    let mut scheduler = tessera_scheduler::Config::new(&args.model);
    scheduler.grace_seconds = args.grace_seconds;
    let run = tessera_scheduler::run(
        scheduler,
        loopback().await?,
        shared.clone(),
        shutdown.clone(),
    );
    tasks.spawn(async move { ("scheduler", run.await.map_err(anyhow::Error::from)) });
    let public = TcpListener::bind(args.grpc).await.with_context(|| {
        format!(
            "cannot listen on {} (is the port in use? try --grpc 127.0.0.1:0)",
            args.grpc
        )
    })?;
    let addr = public.local_addr()?;
    let mut gateway = tessera_gateway::Config::new(&args.model);
    gateway.grace_seconds = args.grace_seconds;
    let run = tessera_gateway::run(gateway, public, shared.clone(), shutdown.clone());
    tasks.spawn(async move { ("gateway", run.await.map_err(anyhow::Error::from)) });

    eprintln!(
        "tessera up: loading {} into 1 scheduler, 1 vision-worker and {} expert-workers…",
        args.model.display(),
        args.expert_workers
    );
    let deadline = Duration::from_secs(args.ready_timeout_seconds);
    tokio::select! {
        ready = tokio::time::timeout(deadline, ready(&discovery, args.expert_workers)) => {
            if ready.is_err() {
                shutdown.cancel();
                bail!("the cluster was not ready after {}s", args.ready_timeout_seconds);
            }
        }
        Some(joined) = tasks.join_next() => {
            shutdown.cancel();
            return Err(failure(joined));
        }
        _ = shutdown.cancelled() => {}
    }
    if !shutdown.is_cancelled() {
        // Tests and scripts read this line for the address.
        println!("tessera serving on {addr}");
        eprintln!(
            "tessera up: ready in {:.1}s; gRPC API at {addr} (tessera.v1.Tessera). Ctrl-C stops.",
            started.elapsed().as_secs_f64()
        );
    }
    wait(tasks, shutdown).await
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
        None => {
            eprintln!("tessera up: stopped");
            Ok(())
        }
    }
}

fn failure(joined: Result<Task, tokio::task::JoinError>) -> anyhow::Error {
    match joined {
        Ok((role, Err(e))) => e.context(format!("the {role} failed")),
        Ok((role, Ok(()))) => anyhow!("the {role} stopped unexpectedly"),
        Err(e) => anyhow!("a service task panicked: {e}"),
    }
}
