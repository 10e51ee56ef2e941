//! Command-line interface: one subcommand per module.
//!
//! - `generate`: in this process, no services (the network only to download a
//!   Hub id `--model`)
//! - `up`: the whole cluster in one process
//! - `gateway`, `vision-worker`, `scheduler`, `expert-worker`: one role each
//! - `ask`: a client of the public API

mod ask;
mod bench;
mod dev_certs;
mod discovery;
mod generate;
mod init_random;
mod parity;
mod roles;
mod up;

use clap::{Parser, Subcommand};

/// Tessera serves the DeepSeek-VL2 vision-language models.
#[derive(Debug, Parser)]
#[command(name = "tessera", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate a reply in this process (no services; the network only to download
    /// a Hub id --model).
    Generate(generate::GenerateArgs),
    /// Run the whole cluster in one process: gateway, vision-worker, scheduler and
    /// expert-workers on loopback ports, no etcd needed.
    Up(up::UpArgs),
    /// Run the gateway: the public gRPC API.
    Gateway(roles::GatewayArgs),
    /// Run a vision-worker: image tiling and encoding.
    VisionWorker(roles::VisionWorkerArgs),
    /// Run a scheduler: attention, sampling and expert dispatch.
    Scheduler(roles::SchedulerArgs),
    /// Run an expert-worker: a shard of the routed experts, assigned by the placement.
    ExpertWorker(roles::ExpertWorkerArgs),
    /// Ask a running cluster (the public gRPC API) and print the answer as it streams.
    Ask(ask::AskArgs),
    /// Load-test a running gateway (or an in-process cluster): latency
    /// percentiles and throughput.
    Bench(bench::BenchArgs),
    /// Write a random-weight checkpoint at a variant's real widths (offline benchmarks).
    InitRandom(init_random::InitRandomArgs),
    /// Write a development CA and member certificate for mutual TLS between members.
    DevCerts(dev_certs::DevCertsArgs),
    /// Check this binary on a device against a golden fixture (the reference's
    /// recorded logits and tokens); prints one JSON report.
    Parity(parity::ParityArgs),
}

/// Whether the subcommand serves (logs at info by default) or is a one-shot tool.
pub fn is_service(cli: &Cli) -> bool {
    !matches!(
        cli.command,
        Command::Generate(_)
            | Command::Ask(_)
            | Command::Bench(_)
            | Command::InitRandom(_)
            | Command::DevCerts(_)
            | Command::Parity(_)
    )
}

/// Runs the chosen subcommand.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Up(args) => block_on(up::run(args)),
        Command::Gateway(args) => block_on(roles::gateway(args)),
        Command::VisionWorker(args) => block_on(roles::vision_worker(args)),
        Command::Scheduler(args) => block_on(roles::scheduler(args)),
        Command::ExpertWorker(args) => block_on(roles::expert_worker(args)),
        Command::Ask(args) => block_on(ask::run(args)),
        Command::Bench(args) => bench::run(args),
        Command::InitRandom(args) => init_random::run(args),
        Command::DevCerts(args) => dev_certs::run(args),
        Command::Parity(args) => parity::run(args),
    }
}

fn block_on<F: Future<Output = anyhow::Result<()>>>(future: F) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(future)
}
