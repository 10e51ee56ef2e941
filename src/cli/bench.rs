//! `tessera bench`: a load generator for the public API, in the manner of vLLM's
//! `benchmark_serving.py` and SGLang's `bench_serving`. It drives a running
//! gateway (`--addr`) or a cluster it starts in this process (`--model`) with
//! streamed generations and reports throughput and latency percentiles.

mod load;
mod report;
mod workload;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tessera_proto::MAX_MESSAGE_BYTES;
use tessera_proto::v1::tessera_client::TesseraClient;
use tessera_runtime::CancellationToken;
use tessera_scheduler::EngineConfig;
use tonic::transport::Channel;

use load::{Call, Length, Pace};
use report::{Report, Rss};
use workload::{DEFAULT_PROMPT, Spec, Workload};

const DEFINITIONS: &str = "\
Measures (milliseconds; percentiles by nearest rank over the successful requests):
  TTFT        time to first token: request sent -> first streamed token
  TPOT        time per output token after the first: (latency - TTFT) / (output tokens - 1)
  latency     request sent -> end of its stream
Output tokens are counted from the streamed token ids. Duration runs from the first
measured request sent to the last one ended; tokens/s and requests/s are over it.
Failed requests are counted, not measured; if every request fails, the command exits
non-zero with the first error.";

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["addr", "model"])))]
#[command(after_help = DEFINITIONS)]
pub struct BenchArgs {
    /// A running gateway's gRPC address, e.g. http://127.0.0.1:50051.
    #[arg(long)]
    addr: Option<String>,
    /// Start a cluster in this process from this snapshot folder or Hub id (as
    /// `tessera up` does), print its load time, then benchmark it.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Branch, tag or commit of a Hub id --model.
    #[arg(long, env = "TESSERA_MODEL_REVISION", default_value = tessera_runtime::hub::DEFAULT_REVISION)]
    revision: String,
    /// Where and in what precision the in-process cluster (--model) computes.
    #[command(flatten)]
    compute: tessera_runtime::device::ComputeArgs,
    /// Expert-workers of the in-process cluster (--model) [default: 2].
    #[arg(long)]
    expert_workers: Option<usize>,
    /// Measured requests.
    #[arg(long, default_value_t = 64)]
    requests: usize,
    /// Run for this many seconds instead of --requests: a soak. New requests are sent
    /// until the time is up; those in flight then finish.
    #[arg(long)]
    duration_seconds: Option<u64>,
    /// Share of the requests (0 to 1, spread evenly) sent without the --image files.
    #[arg(long, default_value_t = 0.0)]
    text_share: f64,
    /// Share of the requests (0 to 1, spread evenly) that the client abandons after
    /// their first token, as a client that cancels does; counted apart, not measured.
    #[arg(long, default_value_t = 0.0)]
    cancel_share: f64,
    /// Sample this process's resident memory every few seconds and report it at the
    /// start, after a minute, at the end and at its peak [default with --model: this
    /// process, which holds the cluster].
    #[arg(long)]
    watch_pid: Option<u32>,
    /// API key for a gateway started with `--api-key-file` (sent as
    /// `authorization: Bearer KEY`).
    #[arg(long, env = "TESSERA_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// The CA that signed the gateway's certificate, for a gateway serving TLS
    /// (`--tls-cert`): connects with https and checks the certificate against
    /// --tls-server-name.
    #[arg(long, requires = "addr")]
    tls_ca: Option<PathBuf>,
    /// The name the gateway's certificate carries (with --tls-ca).
    #[arg(long, default_value = tessera_runtime::tls::DEFAULT_SERVER_NAME)]
    tls_server_name: String,
    /// Requests in flight at once: a new one is sent as soon as one ends.
    #[arg(long, default_value_t = 8, conflicts_with = "request_rate")]
    concurrency: usize,
    /// Send requests at this average rate (requests/s) with Poisson arrivals
    /// (exponential gaps), however many are in flight, instead of --concurrency.
    #[arg(long)]
    request_rate: Option<f64>,
    /// Seed of the --request-rate arrival times.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Requests sent one at a time before the measured run, not measured.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// The user message of every request.
    #[arg(long, default_value = DEFAULT_PROMPT)]
    prompt: String,
    /// Make the prompt roughly this many tokens long by repeating the words of
    /// --prompt (a common English word is about one token; the chat template and
    /// images add their own).
    #[arg(long)]
    prompt_tokens: Option<usize>,
    /// An image attached to every request (repeatable, in order). A prompt without
    /// `<image>` tags gets one `<image>` line per image in front.
    #[arg(long)]
    image: Vec<PathBuf>,
    /// Tokens every request generates: sent as max_tokens with ignore_eos, greedy.
    #[arg(long, default_value_t = 128)]
    output_tokens: u32,
    /// Start each prompt with its request number, so that no two requests share a
    /// cached prompt prefix beyond the chat template's first tokens.
    #[arg(long)]
    distinct_prompts: bool,
    /// Give every request its own copy of each --image, one pixel changed (sent as PNG),
    /// so that no request is served from the vision-worker's embedding cache or shares a
    /// prefix-cached image with another: the time to first token then includes the
    /// vision tower.
    #[arg(long)]
    fresh_images: bool,
    /// Give up on a request after this many seconds (it counts as failed).
    #[arg(long, default_value_t = 600)]
    timeout_seconds: u64,
    /// Print one JSON object on stdout instead of the table.
    #[arg(long)]
    json: bool,
    /// How the in-process cluster's scheduler batches (--model).
    #[command(flatten, next_help_heading = "Engine (with --model)")]
    engine: EngineConfig,
    #[command(flatten, next_help_heading = "Expert placement (with --model)")]
    pool: tessera_runtime::pool::PoolArgs,
}

impl BenchArgs {
    /// How many requests, or for how long.
    fn length(&self) -> Length {
        match self.duration_seconds {
            Some(s) => Length::Duration(Duration::from_secs(s)),
            None => Length::Requests(self.requests),
        }
    }

    /// How requests are released; rejects values no run can use.
    fn pace(&self) -> anyhow::Result<Pace> {
        if self.requests == 0 {
            bail!("--requests must be at least 1");
        }
        if self.duration_seconds == Some(0) {
            bail!("--duration-seconds must be at least 1");
        }
        for (flag, share) in [
            ("--text-share", self.text_share),
            ("--cancel-share", self.cancel_share),
        ] {
            if !(0.0..=1.0).contains(&share) {
                bail!("{flag} must be between 0 and 1, got {share}");
            }
        }
        match self.request_rate {
            Some(r) if !(r.is_finite() && r > 0.0) => {
                bail!("--request-rate must be a positive number of requests per second")
            }
            Some(per_s) => Ok(Pace::Rate {
                per_s,
                seed: self.seed,
            }),
            None if self.concurrency == 0 => bail!("--concurrency must be at least 1"),
            None => Ok(Pace::Concurrency(self.concurrency)),
        }
    }
}

/// TLS to the gateway: its CA and the name its certificate carries.
type GatewayTls<'a> = Option<(&'a std::path::Path, &'a str)>;

async fn connect(
    addr: &str,
    timeout: Duration,
    tls: GatewayTls<'_>,
) -> anyhow::Result<TesseraClient<Channel>> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let addr = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("{scheme}://{addr}")
    };
    let mut endpoint = tonic::transport::Endpoint::from_shared(addr.clone())
        .with_context(|| format!("invalid --addr {addr}"))?;
    if let Some((ca, name)) = tls {
        let pem = std::fs::read(ca).with_context(|| format!("cannot read {}", ca.display()))?;
        let config = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(pem))
            .domain_name(name);
        endpoint = endpoint.tls_config(config).context("TLS to the gateway")?;
    }
    let channel = endpoint
        .connect_timeout(Duration::from_secs(10))
        .timeout(timeout)
        .connect()
        .await
        .with_context(|| format!("cannot reach Tessera at {addr} (is `tessera up` running?)"))?;
    Ok(TesseraClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

fn progress_bar(length: Length) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let (len, template) = match length {
        Length::Requests(n) => (
            Some(n as u64),
            "{elapsed:>4} [{bar:40}] {pos}/{len} requests",
        ),
        Length::Duration(_) => (None, "{elapsed:>4} {pos} requests"),
    };
    let bar = ProgressBar::with_draw_target(len, ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template(template)
        .expect("a valid template")
        .progress_chars("=> ");
    bar.set_style(style);
    bar
}

/// Whether request `n` is among the evenly spread `share` of all requests.
fn in_share(n: usize, share: f64) -> bool {
    (n as f64 * share).floor() != ((n + 1) as f64 * share).floor()
}

/// Seconds between two resident-memory samples.
const RSS_EVERY: Duration = Duration::from_secs(5);

/// The resident memory of process `pid` (`VmRSS`), in MB.
fn rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// Samples `pid`'s resident memory every [`RSS_EVERY`] until `stop`, then once more.
async fn watch_rss(pid: u32, stop: CancellationToken) -> Vec<(f64, f64)> {
    let started = std::time::Instant::now();
    let mut samples = Vec::new();
    loop {
        if let Some(mb) = rss_mb(pid) {
            samples.push((started.elapsed().as_secs_f64(), mb));
        }
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(RSS_EVERY) => {}
        }
    }
    if let Some(mb) = rss_mb(pid) {
        samples.push((started.elapsed().as_secs_f64(), mb));
    }
    samples
}

/// Warms up, runs the measured requests and summarises them.
async fn measure(
    args: &BenchArgs,
    client: &TesseraClient<Channel>,
    workload: &Workload,
    pace: Pace,
    load_s: Option<f64>,
) -> anyhow::Result<Report> {
    let call = Call {
        key: match &args.api_key {
            Some(key) => Some(
                format!("Bearer {key}")
                    .parse()
                    .context("--api-key is not a valid header value")?,
            ),
            None => None,
        },
    };
    // Numbers past any measured request's, so warm-up prompts are their own.
    let warmup_base = 1 << 40;
    for k in 0..args.warmup {
        let req = workload.request(format!("bench-warmup-{k}"), warmup_base + k);
        if let Err(e) = load::one(client.clone(), req, &call, false).await {
            bail!("the warm-up request failed: {e}");
        }
    }
    let text_only = std::sync::atomic::AtomicUsize::new(0);
    let make = |n: usize| {
        let id = format!("bench-{n}");
        let req = if in_share(n, args.text_share) {
            text_only.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            workload.text_request(id, n)
        } else {
            workload.request(id, n)
        };
        // Offset by half a period, so cancels and text-only requests interleave.
        (req, in_share(n + 1, args.cancel_share))
    };
    let watched = args
        .watch_pid
        .or_else(|| load_s.map(|_| std::process::id()));
    let stop_watching = CancellationToken::new();
    let watch = watched.map(|pid| tokio::spawn(watch_rss(pid, stop_watching.clone())));
    let length = args.length();
    let progress = progress_bar(length);
    let run = load::run(client, &make, length, pace, &call, &progress).await;
    progress.finish_and_clear();
    stop_watching.cancel();
    let samples = match watch {
        Some(task) => task.await.unwrap_or_default(),
        None => Vec::new(),
    };
    let mut report = Report::new(&run, pace, args.image.len(), load_s);
    report.fresh_images = args.fresh_images;
    report.text_only = text_only.into_inner();
    report.rss = watched.and_then(|pid| Rss::of(pid, &samples));
    if report.requests == 0 {
        bail!(
            "all {} requests failed; the first: {}",
            report.failed,
            report.errors.first().map_or("", String::as_str)
        );
    }
    Ok(report)
}

async fn bench(args: BenchArgs) -> anyhow::Result<Report> {
    let pace = args.pace()?;
    let workload = Workload::new(&Spec {
        prompt: &args.prompt,
        prompt_tokens: args.prompt_tokens,
        images: &args.image,
        output_tokens: args.output_tokens,
        distinct_prompts: args.distinct_prompts,
        fresh_images: args.fresh_images,
    })?;
    let timeout = Duration::from_secs(args.timeout_seconds);
    if let Some(addr) = &args.addr {
        if args.engine != EngineConfig::default() {
            eprintln!(
                "tessera bench: note: the engine flags configure the cluster of --model; \
                 the gateway at --addr runs with its own"
            );
        }
        if args.expert_workers.is_some() {
            bail!("--expert-workers sizes the cluster of --model; it does not go with --addr");
        }
        let tls = args
            .tls_ca
            .as_deref()
            .map(|ca| (ca, args.tls_server_name.as_str()));
        let client = connect(addr, timeout, tls).await?;
        return measure(&args, &client, &workload, pace, None).await;
    }
    let model = args.model.clone().expect("clap requires --addr or --model");
    let mut opts = super::up::Options {
        model: model.clone(),
        compute: args.compute,
        expert_workers: args.expert_workers.unwrap_or(2),
        grpc: ([127, 0, 0, 1], 0).into(),
        http: None,
        grace_seconds: 5,
        ready_timeout: Duration::from_secs(1800),
        engine: args.engine.clone(),
        max_waiting: tessera_scheduler::config::DEFAULT_MAX_WAITING,
        auth: Default::default(),
        public_limits: Default::default(),
        remote_images: Default::default(),
        served_model_names: Vec::new(),
        pool: args.pool.clone(),
    };
    opts.validate_flags()?;
    let mut model = tessera_runtime::ModelArgs {
        path: model,
        revision: args.revision.clone(),
    };
    model.resolve().await?;
    opts.model = model.path;
    eprintln!(
        "tessera bench: loading {} into 1 scheduler, 1 vision-worker and {} expert-workers…",
        opts.model.display(),
        opts.expert_workers
    );
    let cluster = super::up::start(opts, CancellationToken::new()).await?;
    let load_s = cluster.load_time.as_secs_f64();
    eprintln!("tessera bench: cluster ready in {load_s:.1}s");
    let report = match connect(&cluster.addr.to_string(), timeout, None).await {
        Ok(client) => measure(&args, &client, &workload, pace, Some(load_s)).await,
        Err(e) => Err(e),
    };
    let stopped = cluster.stop().await;
    let report = report?;
    stopped.context("the in-process cluster did not stop cleanly")?;
    Ok(report)
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let json = args.json;
    let mut report = None;
    super::block_on(async {
        report = Some(bench(args).await?);
        Ok(())
    })?;
    let report = report.expect("set on success");
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}
