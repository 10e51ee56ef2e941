//! Nothing lost when a member dies or the expert pool changes size, with one
//! process per role, a real etcd and SIGKILL:
//!
//! - chaos: 16 concurrent greedy streams on a gateway, 2 vision-workers, 2
//!   schedulers and 4 expert-workers holding every expert twice; expert-workers are
//!   killed with SIGKILL one after another (each restarted), and once each a
//!   vision-worker and a scheduler. No request fails and every output equals the
//!   undisturbed run's; the longest gap between two tokens of a stream is printed.
//! - scaling 4 → 3 → 4 expert-workers under the same kind of load, each worker with
//!   a memory budget its share after a leave does not fit: no request fails, the
//!   outputs do not change, and no worker's peak resident memory passes what it held
//!   before its experts plus its budget and 10%. Four workers starting together load
//!   no more than their final shares.
//! - SIGTERM of `tessera up` during a long stream: the stream completes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tessera_proto::MAX_MESSAGE_BYTES;
use tessera_proto::v1::tessera_client::TesseraClient;
use tessera_proto::v1::{ClusterStatusRequest, GenerateRequest, MemberRole};
use tessera_runtime::Discovery;
use tessera_runtime::discovery::{EtcdDiscovery, Role};
use tokio::io::{AsyncBufReadExt, BufReader};
use tonic::transport::Channel;

#[allow(dead_code)]
mod common;

#[allow(dead_code)]
#[path = "common/cluster.rs"]
mod cluster;
#[allow(dead_code)]
#[path = "common/etcd.rs"]
mod etcd;
#[allow(dead_code)]
#[path = "common/load.rs"]
mod load;
#[allow(dead_code)]
#[path = "common/up.rs"]
mod up_process;

use load::{after_tokens, load_until, poll, text_request, timed_stream, undisturbed, workload};

use cluster::DEADLINE;
use common::fixture_dir;

const LEASE: Duration = Duration::from_secs(2);

/// A member of the cluster as its own `tessera <role>` process, killed when dropped;
/// its log lines reach the test's stderr with its id in front.
struct Process {
    id: String,
    child: tokio::process::Child,
}

impl Process {
    /// SIGKILL, and wait until it is gone.
    async fn kill(&mut self) {
        self.child.start_kill().unwrap();
        self.child.wait().await.unwrap();
    }

    /// SIGTERM, and wait until it has drained and exited (successfully).
    async fn terminate(&mut self) {
        let pid = self.child.id().expect("running").to_string();
        let sent = tokio::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .unwrap();
        assert!(sent.success());
        let status = tokio::time::timeout(DEADLINE, self.child.wait())
            .await
            .expect("the member exits within the deadline")
            .unwrap();
        assert!(status.success(), "{} exited with {status:?}", self.id);
    }

    /// `(VmRSS, VmHWM)` in bytes from `/proc/PID/status`.
    fn memory(&self) -> (u64, u64) {
        let pid = self.child.id().expect("running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let field = |name: &str| -> u64 {
            let line = status.lines().find(|l| l.starts_with(name)).unwrap();
            line.split_whitespace()
                .nth(1)
                .unwrap()
                .parse::<u64>()
                .unwrap()
                * 1024
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

/// How to start members of one cluster: the model, etcd and the flags every
/// member of a role gets.
struct Launcher {
    model: PathBuf,
    etcd: String,
    prefix: &'static str,
    /// Flags per role (`expert-worker`, `scheduler`, ...) after the common ones.
    flags: BTreeMap<&'static str, Vec<String>>,
}

impl Launcher {
    fn spawn(&self, role: &'static str, id: &str) -> Process {
        let lease = LEASE.as_secs().to_string();
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
            .arg(role)
            .arg("--model")
            .arg(&self.model)
            .args(["--grpc", "127.0.0.1:0", "--id", id, "--etcd", &self.etcd])
            .args(["--etcd-prefix", self.prefix, "--lease-seconds", &lease])
            .args(["--grace-seconds", "5"])
            .args(self.flags.get(role).into_iter().flatten())
            .env_remove("TESSERA_MODEL")
            .env("TESSERA_KV_CACHE_BYTES", "67108864")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let tag = id.to_owned();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("[{tag}] {line}");
            }
        });
        Process {
            id: id.to_owned(),
            child,
        }
    }

    async fn discovery(&self) -> Arc<EtcdDiscovery> {
        EtcdDiscovery::connect(&[self.etcd.clone()], self.prefix, LEASE)
            .await
            .unwrap()
    }
}

/// The address `id` is registered at (with `role`), once it is.
async fn address_of(discovery: &EtcdDiscovery, role: Role, id: &str) -> String {
    poll(&format!("{id} registers"), || async {
        discovery
            .members()
            .into_iter()
            .find(|m| m.role == role && m.id == id)
            .map(|m| m.address)
    })
    .await
}

/// Whether the gRPC health service at `address` reports SERVING.
async fn serving(address: &str) -> bool {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let Ok(channel) = Channel::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
    else {
        return false;
    };
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .map(|r| r.into_inner().status());
    status.is_ok_and(|s| s == ServingStatus::Serving)
}

/// A client of the gateway registered in `discovery`.
async fn gateway_client(discovery: &EtcdDiscovery, id: &str) -> TesseraClient<Channel> {
    let address = address_of(discovery, Role::Gateway, id).await;
    let channel = Channel::from_shared(format!("http://{address}"))
        .unwrap()
        .connect_lazy();
    cluster::wait_serving(channel.clone()).await;
    TesseraClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// Polls `ClusterStatus` until `schedulers`, `visions` and `workers` are registered
/// and the placement puts every expert on `replicas` of the workers.
async fn wait_placed(
    client: &TesseraClient<Channel>,
    (schedulers, visions, workers): (usize, usize, usize),
    replicas: usize,
) {
    poll("the cluster is placed", || {
        let mut client = client.clone();
        async move {
            let status = client
                .cluster_status(ClusterStatusRequest {})
                .await
                .ok()?
                .into_inner();
            let count = |role| status.members.iter().filter(|m| m.role() == role).count();
            let mut owners: BTreeMap<(u32, u32), usize> = BTreeMap::new();
            for m in &status.members {
                for l in &m.experts {
                    for &e in &l.experts {
                        *owners.entry((l.layer, e)).or_default() += 1;
                    }
                }
            }
            let placed = !owners.is_empty() && owners.values().all(|&n| n == replicas);
            (count(MemberRole::Scheduler) == schedulers
                && count(MemberRole::VisionWorker) == visions
                && count(MemberRole::ExpertWorker) == workers
                && placed)
                .then_some(())
        }
    })
    .await;
}

/// Kills expert-worker `i` with SIGKILL after `step` more tokens, restarts it once
/// `step` more have streamed, and waits until the new process serves.
async fn kill_and_restart_worker(
    launcher: &Launcher,
    discovery: &EtcdDiscovery,
    workers: &mut [Process],
    i: usize,
    progress: &AtomicUsize,
    step: usize,
) {
    after_tokens(progress, progress.load(Ordering::Relaxed), step).await;
    let id = workers[i].id.clone();
    let old = address_of(discovery, Role::ExpertWorker, &id).await;
    eprintln!("chaos: SIGKILL {id}");
    workers[i].kill().await;
    after_tokens(progress, progress.load(Ordering::Relaxed), step).await;
    eprintln!("chaos: restarting {id}");
    workers[i] = launcher.spawn("expert-worker", &id);
    poll(&format!("{id} serves again"), || async {
        let now = discovery
            .members()
            .into_iter()
            .find(|m| m.role == Role::ExpertWorker && m.id == id && m.address != old)?;
        serving(&now.address).await.then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_any_member_loses_no_request_and_changes_no_answer() {
    let etcd = etcd::EtcdServer::start();
    let replicas = std::env::var("TESSERA_CHAOS_REPLICAS").unwrap_or_else(|_| "2".into());
    let pool = |extra: &[&str]| -> Vec<String> {
        ["--expert-replicas", replicas.as_str()]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect()
    };
    let launcher = Launcher {
        model: fixture_dir("tiny-mha-softmax"),
        etcd: etcd.endpoint(),
        prefix: "/chaos",
        flags: BTreeMap::from([
            ("expert-worker", pool(&["--placement-settle-ms", "300"])),
            (
                "scheduler",
                pool(&["--expert-timeout-ms", "2000", "--expert-wait-seconds", "60"]),
            ),
        ]),
    };
    let mut workers: Vec<Process> = (0..4)
        .map(|i| launcher.spawn("expert-worker", &format!("ew-{i}")))
        .collect();
    let mut visions: Vec<Process> = (0..2)
        .map(|i| launcher.spawn("vision-worker", &format!("vision-{i}")))
        .collect();
    let mut schedulers: Vec<Process> = (0..2)
        .map(|i| launcher.spawn("scheduler", &format!("scheduler-{i}")))
        .collect();
    let _gateway = launcher.spawn("gateway", "gateway");
    let discovery = launcher.discovery().await;
    let client = gateway_client(&discovery, "gateway").await;
    let replicas: usize = replicas.parse().unwrap();
    wait_placed(&client, (2, 2, 4), replicas).await;

    let requests = workload(96, true);
    let progress = Arc::new(AtomicUsize::new(0));
    let reference = undisturbed(&client, &requests, &progress).await;
    let per_wave = progress.load(Ordering::Relaxed);
    println!("undisturbed: {per_wave} tokens in 16 streams");

    let done = tessera_runtime::CancellationToken::new();
    let chaos = {
        let (progress, done) = (progress.clone(), done.clone());
        let step = per_wave / 6;
        async move {
            let discovery = launcher.discovery().await;
            kill_and_restart_worker(&launcher, &discovery, &mut workers, 0, &progress, step).await;
            after_tokens(&progress, progress.load(Ordering::Relaxed), step).await;
            eprintln!("chaos: SIGKILL {}", visions[0].id);
            visions[0].kill().await;
            kill_and_restart_worker(&launcher, &discovery, &mut workers, 1, &progress, step).await;
            after_tokens(&progress, progress.load(Ordering::Relaxed), step).await;
            eprintln!("chaos: SIGKILL {}", schedulers[0].id);
            schedulers[0].kill().await;
            kill_and_restart_worker(&launcher, &discovery, &mut workers, 2, &progress, step).await;
            kill_and_restart_worker(&launcher, &discovery, &mut workers, 3, &progress, step).await;
            done.cancel();
            (workers, visions, schedulers)
        }
    };
    let started = Instant::now();
    let (outcome, _members) = tokio::join!(
        load_until(&client, &requests, &reference, &progress, &done),
        chaos
    );
    println!(
        "chaos: {} streams answered in {:.1} s, {} failed, {} changed; longest gap between \
         two tokens of a stream: {} ms",
        outcome.answered,
        started.elapsed().as_secs_f64(),
        outcome.failed.len(),
        outcome.changed,
        outcome.longest_gap.as_millis()
    );
    assert!(outcome.failed.is_empty(), "failed: {:#?}", outcome.failed);
    assert_eq!(outcome.changed, 0, "outputs changed");
}

/// `tessera init-random` Tiny widths, 2 language layers (one MoE layer of 64
/// experts), one vision block, bf16, in `dir`.
fn tiny_width_checkpoint(dir: &Path) {
    let made = std::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["init-random", "--variant", "tiny", "--layers", "2"])
        .args(["--vision-layers", "1", "--force", "--out"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "init-random: {}",
        String::from_utf8_lossy(&made.stderr)
    );
}

/// A worker process with what it held before loading experts.
struct Budgeted {
    process: Process,
    base_rss: u64,
    metrics: String,
}

/// A free loopback port for a metrics endpoint.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One value of a Prometheus family scraped from `http://ADDR/metrics`.
async fn scrape(addr: &str, family: &str) -> f64 {
    let body = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    body.lines()
        .find(|l| l.starts_with(family) && !l.starts_with('#'))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{family} not in the metrics of {addr}:\n{body}"))
}

/// Polls until every worker of `workers` reports the published placement applied.
async fn wait_applied(client: &TesseraClient<Channel>, workers: &[Budgeted]) {
    poll("every worker applied the placement", || {
        let mut client = client.clone();
        async move {
            let status = client.cluster_status(ClusterStatusRequest {}).await.ok()?;
            let version = status.into_inner().placement_version as f64;
            for w in workers {
                let applied = scrape(&w.metrics, "tessera_expert_worker_placement_version").await;
                if applied < version {
                    return None;
                }
            }
            Some(())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scaling_the_pool_down_and_up_keeps_every_worker_within_its_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    tiny_width_checkpoint(&dir);
    let etcd = etcd::EtcdServer::start();
    // One expert of Tiny in bf16: 3 × 1280 × 896 × 2 bytes. 36 per worker: four
    // workers hold every expert twice (32 each); three cannot (43 each).
    let expert = 3 * 1280 * 896 * 2;
    let budget = 36 * expert as u64;
    let mut launcher = Launcher {
        model: dir.clone(),
        etcd: etcd.endpoint(),
        prefix: "/scale",
        flags: BTreeMap::new(),
    };
    let worker_flags = |metrics: u16| -> Vec<String> {
        [
            "--expert-memory-bytes".to_string(),
            budget.to_string(),
            "--placement-settle-ms".into(),
            "2000".into(),
            "--metrics".into(),
            format!("127.0.0.1:{metrics}"),
        ]
        .to_vec()
    };
    launcher.flags.insert(
        "scheduler",
        vec!["--expert-timeout-ms".into(), "5000".into()],
    );
    let discovery = launcher.discovery().await;
    let start_worker = |launcher: &mut Launcher, id: &str| {
        let port = free_port();
        launcher.flags.insert("expert-worker", worker_flags(port));
        (
            launcher.spawn("expert-worker", id),
            format!("127.0.0.1:{port}"),
        )
    };
    let mut started = Vec::new();
    for i in 0..4 {
        started.push(start_worker(&mut launcher, &format!("ew-{i}")));
    }
    let mut workers = Vec::new();
    for (process, metrics) in started {
        address_of(&discovery, Role::ExpertWorker, &process.id).await;
        let base_rss = process.memory().0;
        workers.push(Budgeted {
            process,
            base_rss,
            metrics,
        });
    }
    let _scheduler = launcher.spawn("scheduler", "scheduler");
    let _gateway = launcher.spawn("gateway", "gateway");
    let client = gateway_client(&discovery, "gateway").await;
    wait_placed(&client, (1, 0, 4), 2).await;
    wait_applied(&client, &workers).await;
    for w in &workers {
        let loaded = scrape(&w.metrics, "tessera_expert_worker_loaded_bytes_total").await;
        let held = scrape(&w.metrics, "tessera_expert_worker_held_bytes").await;
        println!(
            "{}: loaded {loaded} bytes at start-up, holds {held}",
            w.process.id
        );
        assert!(
            loaded <= held,
            "{} loaded more than its final share",
            w.process.id
        );
    }

    let requests: Vec<GenerateRequest> = (0..16).map(|i| text_request(i, 48)).collect();
    let progress = Arc::new(AtomicUsize::new(0));
    let reference = undisturbed(&client, &requests, &progress).await;
    let per_wave = progress.load(Ordering::Relaxed);

    let done = tessera_runtime::CancellationToken::new();
    let scale = {
        let (progress, done, discovery) = (progress.clone(), done.clone(), &discovery);
        let client = client.clone();
        async move {
            after_tokens(&progress, 0, per_wave + per_wave / 4).await;
            let mut leaving = workers.pop().unwrap();
            eprintln!("scale: SIGTERM {}", leaving.process.id);
            let leaving_peak = leaving.process.memory().1;
            leaving.process.terminate().await;
            // Three workers cannot hold every expert twice: some once.
            poll("three workers hold every expert", || {
                let mut client = client.clone();
                async move {
                    let status = client.cluster_status(ClusterStatusRequest {}).await.ok()?;
                    let holding = status
                        .into_inner()
                        .members
                        .iter()
                        .filter(|m| m.role() == MemberRole::ExpertWorker && !m.experts.is_empty())
                        .count();
                    (holding == 3).then_some(())
                }
            })
            .await;
            after_tokens(&progress, progress.load(Ordering::Relaxed), per_wave / 2).await;
            let (process, metrics) = start_worker(&mut launcher, "ew-3");
            address_of(discovery, Role::ExpertWorker, "ew-3").await;
            let base_rss = process.memory().0;
            workers.push(Budgeted {
                process,
                base_rss,
                metrics,
            });
            wait_placed(&client, (1, 0, 4), 2).await;
            after_tokens(&progress, progress.load(Ordering::Relaxed), per_wave / 2).await;
            done.cancel();
            (workers, (leaving, leaving_peak))
        }
    };
    let (outcome, (workers, (leaving, leaving_peak))) = tokio::join!(
        load_until(&client, &requests, &reference, &progress, &done),
        scale
    );
    println!(
        "scale 4 → 3 → 4: {} streams answered, {} failed, {} changed; longest gap {} ms",
        outcome.answered,
        outcome.failed.len(),
        outcome.changed,
        outcome.longest_gap.as_millis()
    );
    let peaks = workers
        .iter()
        .map(|w| (w, w.process.memory().1))
        .chain([(&leaving, leaving_peak)]);
    for (w, peak) in peaks {
        let bound = w.base_rss + budget + budget / 10;
        println!(
            "{}: {} MiB before experts, peak {} MiB, bound {} MiB",
            w.process.id,
            w.base_rss >> 20,
            peak >> 20,
            bound >> 20
        );
        assert!(peak <= bound, "{} went over its budget", w.process.id);
    }
    assert!(outcome.failed.is_empty(), "failed: {:#?}", outcome.failed);
    assert_eq!(outcome.changed, 0, "outputs changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_of_tessera_up_lets_a_long_stream_finish() {
    let model = fixture_dir("tiny-mha-softmax");
    let (mut up, addr) = tokio::task::spawn_blocking(move || {
        let mut tessera = std::process::Command::new(env!("CARGO_BIN_EXE_tessera"));
        tessera
            .env_remove("TESSERA_MODEL")
            .env_remove("TESSERA_GRPC");
        up_process::start(tessera, model.to_str().unwrap(), "2")
    })
    .await
    .unwrap();
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    let client = TesseraClient::new(channel);
    let progress = Arc::new(AtomicUsize::new(0));
    let tokens = 300;
    let stream = tokio::spawn(timed_stream(
        client,
        text_request(0, tokens),
        progress.clone(),
    ));
    after_tokens(&progress, 0, 4).await;
    let pid = up.0.id().to_string();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(sent.success());
    let answer = stream
        .await
        .unwrap()
        .expect("the stream in flight completes after SIGTERM");
    assert_eq!(answer.token_ids.len(), tokens as usize);
    let status = tokio::task::spawn_blocking(move || up.0.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "tessera up exited with {status:?}");
}
