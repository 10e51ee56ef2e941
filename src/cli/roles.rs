//! `tessera gateway | vision-worker | scheduler | expert-worker`: one role per
//! process, for clusters spread over machines (Kubernetes).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use tessera_runtime::{CancellationToken, Discovery};
use tokio::net::TcpListener;

use super::discovery::DiscoveryArgs;

/// `tessera gateway`: the public API.
#[derive(Debug, Args)]
pub struct GatewayArgs {
    #[command(flatten)]
    config: tessera_gateway::Config,
    /// Address to serve gRPC on.
    #[arg(long, env = "TESSERA_GRPC", default_value = "0.0.0.0:50051")]
    grpc: SocketAddr,
    #[command(flatten)]
    discovery: DiscoveryArgs,
}

/// `tessera vision-worker`: image tiling and encoding.
#[derive(Debug, Args)]
pub struct VisionWorkerArgs {
    #[command(flatten)]
    config: tessera_vision_worker::Config,
    /// Address to serve gRPC on.
    #[arg(long, env = "TESSERA_GRPC", default_value = "0.0.0.0:50053")]
    grpc: SocketAddr,
    #[command(flatten)]
    discovery: DiscoveryArgs,
}

/// `tessera scheduler`: attention, sampling and expert dispatch.
#[derive(Debug, Args)]
pub struct SchedulerArgs {
    #[command(flatten)]
    config: tessera_scheduler::Config,
    /// Address to serve gRPC on.
    #[arg(long, env = "TESSERA_GRPC", default_value = "0.0.0.0:50052")]
    grpc: SocketAddr,
    #[command(flatten)]
    discovery: DiscoveryArgs,
}

/// `tessera expert-worker`: a shard of the routed experts.
#[derive(Debug, Args)]
pub struct ExpertWorkerArgs {
    #[command(flatten)]
    config: tessera_expert_worker::Config,
    /// Address to serve gRPC on.
    #[arg(long, env = "TESSERA_GRPC", default_value = "0.0.0.0:50054")]
    grpc: SocketAddr,
    #[command(flatten)]
    discovery: DiscoveryArgs,
}

/// Binds `addr`, connects discovery and runs one service until SIGTERM/SIGINT.
async fn serve<F, Fut, E>(
    role: &str,
    addr: SocketAddr,
    discovery: &DiscoveryArgs,
    run: F,
) -> anyhow::Result<()>
where
    F: FnOnce(TcpListener, Arc<dyn Discovery>, CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (is the port in use?)"))?;
    let discovery = discovery.connect().await?;
    let shutdown = tessera_runtime::shutdown::on_signals();
    tracing::info!(%role, %addr, "starting");
    run(listener, discovery, shutdown)
        .await
        .with_context(|| format!("{role} failed"))
}

pub async fn gateway(args: GatewayArgs) -> anyhow::Result<()> {
    let mut cfg = args.config;
    cfg.member.model.resolve().await?;
    serve("gateway", args.grpc, &args.discovery, |l, d, s| {
        tessera_gateway::run(cfg, l, d, s)
    })
    .await
}

pub async fn vision_worker(args: VisionWorkerArgs) -> anyhow::Result<()> {
    let mut cfg = args.config;
    cfg.member.model.resolve().await?;
    serve("vision-worker", args.grpc, &args.discovery, |l, d, s| {
        tessera_vision_worker::run(cfg, l, d, s)
    })
    .await
}

pub async fn scheduler(args: SchedulerArgs) -> anyhow::Result<()> {
    let mut cfg = args.config;
    cfg.member.model.resolve().await?;
    serve("scheduler", args.grpc, &args.discovery, |l, d, s| {
        tessera_scheduler::run(cfg, l, d, s)
    })
    .await
}

pub async fn expert_worker(args: ExpertWorkerArgs) -> anyhow::Result<()> {
    let mut cfg = args.config;
    cfg.member.model.resolve().await?;
    serve("expert-worker", args.grpc, &args.discovery, |l, d, s| {
        tessera_expert_worker::run(cfg, l, d, s)
    })
    .await
}
