//! Expert-workers following the placement: real servers on loopback, an
//! in-process discovery. Each worker holds exactly its share, about 1/N of the
//! expert memory, and the shares move when workers join or leave.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use tessera_expert_worker::Config;
use tessera_model::config::ModelConfig;
use tessera_model::experts::{ExpertSelection, LocalExperts};
use tessera_model::weights::{Checkpoint, LoadTarget, WeightFormat};
use tessera_proto::internal::v1::expert_client::ExpertClient;
use tessera_proto::internal::v1::{
    InfoRequest, InfoResponse, LayerExperts, LoadRequest, UnloadRequest,
};
use tessera_runtime::{CancellationToken, Discovery, MemoryDiscovery, Role};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const DEADLINE: Duration = Duration::from_secs(60);

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/small-mla-softmax")
}

struct Worker {
    id: String,
    client: ExpertClient<Channel>,
    channel: Channel,
    stop: CancellationToken,
    task: JoinHandle<tessera_expert_worker::Result<()>>,
}

async fn start(discovery: &Arc<MemoryDiscovery>, id: &str) -> Worker {
    start_with(discovery, id, fixture()).await
}

/// A worker serving the snapshot in `model`.
async fn start_with(discovery: &Arc<MemoryDiscovery>, id: &str, model: PathBuf) -> Worker {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut cfg = Config::new(model);
    cfg.member.id = Some(id.to_string());
    cfg.member.grace_seconds = 5;
    // One owner per expert, so that each worker's share is 1/N.
    cfg.pool.expert_replicas = Some(1);
    cfg.placement_settle_ms = 100;
    let stop = CancellationToken::new();
    let task = tokio::spawn(tessera_expert_worker::run(
        cfg,
        listener,
        discovery.clone(),
        stop.clone(),
    ));
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    Worker {
        id: id.to_string(),
        client: ExpertClient::new(channel.clone()),
        channel,
        stop,
        task,
    }
}

async fn info(w: &Worker) -> InfoResponse {
    w.client
        .clone()
        .info(InfoRequest {})
        .await
        .unwrap()
        .into_inner()
}

fn pairs(held: &[LayerExperts]) -> BTreeSet<(usize, usize)> {
    held.iter()
        .flat_map(|l| {
            l.experts
                .iter()
                .map(move |&e| (l.layer as usize, e as usize))
        })
        .collect()
}

/// Polls until every worker reports the discovery's current placement (of at
/// least `version`) applied, and returns that version.
async fn settled(discovery: &MemoryDiscovery, workers: &[&Worker], version: u64) -> u64 {
    tokio::time::timeout(DEADLINE, async {
        loop {
            if let Some(p) = discovery.placement().filter(|p| p.version >= version) {
                let mut all = true;
                for w in workers {
                    let i = info(w).await;
                    all &= i.ready
                        && i.placement_version == p.version
                        && pairs(&i.held) == *p.experts_of(&w.id);
                }
                if all {
                    return p.version;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("workers apply the placement before the deadline")
}

fn total_expert_bytes() -> usize {
    let dir = fixture();
    let cfg = ModelConfig::from_dir(&dir).unwrap();
    let checkpoint = Checkpoint::open(&dir).unwrap();
    let target = LoadTarget {
        checkpoint: &checkpoint,
        dtype: DType::F32,
        weights: WeightFormat::Auto,
        device: &Device::Cpu,
    };
    LocalExperts::load(&cfg.language, target, &ExpertSelection::All)
        .unwrap()
        .bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_hold_their_share_and_shares_move_when_workers_join_and_leave() {
    let discovery = Arc::new(MemoryDiscovery::new());
    let a = start(&discovery, "a").await;
    let b = start(&discovery, "b").await;
    let v = settled(&discovery, &[&a, &b], 1).await;

    // Health turns SERVING once a placement is applied.
    let status = HealthClient::new(a.channel.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status();
    assert_eq!(status, ServingStatus::Serving);

    // Two workers: disjoint halves covering every expert, half the bytes each.
    let (ha, hb) = (pairs(&info(&a).await.held), pairs(&info(&b).await.held));
    assert!(ha.is_disjoint(&hb));
    let cfg = ModelConfig::from_dir(&fixture()).unwrap();
    let n = cfg.language.moe.as_ref().unwrap().n_routed_experts;
    assert_eq!(ha.len() + hb.len(), cfg.language.moe_layers().len() * n);
    assert_eq!(ha.len(), hb.len());

    // A third worker joins: a newer placement, each holds a third.
    let c = start(&discovery, "c").await;
    let v2 = settled(&discovery, &[&a, &b, &c], v + 1).await;
    assert!(v2 > v);
    let held: Vec<usize> = [&a, &b, &c]
        .iter()
        .map(|w| discovery.placement().unwrap().experts_of(&w.id).len())
        .collect();
    let total_pairs = cfg.language.moe_layers().len() * n;
    assert_eq!(held.iter().sum::<usize>(), total_pairs);
    for h in &held {
        assert!(
            h.abs_diff(total_pairs / 3) <= cfg.language.moe_layers().len(),
            "{held:?}"
        );
    }

    // A worker leaves: it deregisters, the others take its experts.
    c.stop.cancel();
    c.task.await.unwrap().unwrap();
    let members = discovery.members();
    assert!(
        !members
            .iter()
            .any(|m| m.role == Role::ExpertWorker && m.id == "c")
    );
    let v3 = settled(&discovery, &[&a, &b], v2 + 1).await;
    assert!(v3 > v2);
    let (ha, hb) = (pairs(&info(&a).await.held), pairs(&info(&b).await.held));
    assert_eq!(ha.len() + hb.len(), total_pairs);

    for w in [a, b] {
        w.stop.cancel();
        w.task.await.unwrap().unwrap();
    }
    assert!(discovery.members().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workers_memory_is_its_share_of_the_experts() {
    let discovery = Arc::new(MemoryDiscovery::new());
    let workers = [
        start(&discovery, "w0").await,
        start(&discovery, "w1").await,
        start(&discovery, "w2").await,
    ];
    let refs: Vec<&Worker> = workers.iter().collect();
    let version = settled(&discovery, &refs, 1).await;
    let p = discovery.placement().unwrap();
    assert_eq!(p.version, version);
    // Bytes held per worker are exactly its share of the full expert bytes.
    let total = total_expert_bytes();
    let total_pairs: usize = refs.iter().map(|w| p.experts_of(&w.id).len()).sum();
    for w in &refs {
        let share = p.experts_of(&w.id).len();
        let i = info(w).await;
        assert_eq!(pairs(&i.held).len(), share);
        // Every expert has the same size, so a worker's bytes are its share of the total.
        assert_eq!(i.held_bytes as usize, total * share / total_pairs);
        assert!(i.held_bytes > 0);
        println!(
            "worker {}: {share}/{total_pairs} experts, {} of {total} expert bytes",
            w.id, i.held_bytes
        );
    }
    for w in workers {
        w.stop.cancel();
        w.task.await.unwrap().unwrap();
    }
}

/// A copy of the fixture with every tensor rounded to bf16, in `dir`, removed on drop.
struct Bf16Snapshot(PathBuf);

impl Bf16Snapshot {
    fn new(test: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("tessera-expert-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for entry in std::fs::read_dir(fixture()).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_file() && entry.file_name() != "model.safetensors" {
                std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
            }
        }
        let tensors =
            candle_core::safetensors::load(fixture().join("model.safetensors"), &Device::Cpu)
                .unwrap();
        let bf16: HashMap<String, Tensor> = tensors
            .into_iter()
            .map(|(name, t)| (name, t.to_dtype(DType::BF16).unwrap()))
            .collect();
        candle_core::safetensors::save(&bf16, dir.join("model.safetensors")).unwrap();
        Self(dir)
    }

    /// Bytes the checkpoint stores for the routed experts in `pairs`.
    fn stored_bytes(&self, pairs: &BTreeSet<(usize, usize)>) -> usize {
        let tensors =
            candle_core::safetensors::load(self.0.join("model.safetensors"), &Device::Cpu).unwrap();
        let mut bytes = 0;
        for (layer, expert) in pairs {
            for m in ["gate_proj", "up_proj", "down_proj"] {
                let name = format!("language.model.layers.{layer}.mlp.experts.{expert}.{m}.weight");
                let t = &tensors[&name];
                assert_eq!(t.dtype(), DType::BF16);
                bytes += t.elem_count() * 2;
            }
        }
        bytes
    }
}

impl Drop for Bf16Snapshot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Given a bf16 checkpoint, a worker holds its share in bf16: the bytes it reports are
/// the checkpoint's stored bytes of exactly the experts it holds (half of an f32 worker's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_on_a_bf16_checkpoint_holds_its_share_at_bf16_size() {
    let snapshot = Bf16Snapshot::new("bf16-share");
    let discovery = Arc::new(MemoryDiscovery::new());
    let workers = [
        start_with(&discovery, "h0", snapshot.0.clone()).await,
        start_with(&discovery, "h1", snapshot.0.clone()).await,
    ];
    let refs: Vec<&Worker> = workers.iter().collect();
    settled(&discovery, &refs, 1).await;
    let total = total_expert_bytes();
    let mut sum = 0;
    for w in &refs {
        let i = info(w).await;
        let held = pairs(&i.held);
        assert!(!held.is_empty());
        let want = snapshot.stored_bytes(&held);
        println!(
            "worker {}: {} experts, {} bytes held, {want} stored in bf16",
            w.id,
            held.len(),
            i.held_bytes
        );
        assert_eq!(i.held_bytes as usize, want, "worker {}", w.id);
        sum += want;
    }
    // Together they hold every expert, at half the f32 bytes.
    assert_eq!(2 * sum, total);
    for w in workers {
        w.stop.cancel();
        w.task.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_and_unload_change_what_is_held_and_bad_layers_are_refused() {
    let discovery = Arc::new(MemoryDiscovery::new());
    let w = start(&discovery, "solo").await;
    settled(&discovery, &[&w], 1).await;
    let cfg = ModelConfig::from_dir(&fixture()).unwrap();
    let layer = cfg.language.moe_layers()[0] as u32;
    let all = pairs(&info(&w).await.held);
    let unloaded = w
        .client
        .clone()
        .unload(UnloadRequest {
            placement_version: 0,
            experts: vec![LayerExperts {
                layer,
                experts: vec![0, 1],
            }],
        })
        .await
        .unwrap()
        .into_inner();
    let after = pairs(&unloaded.held);
    assert_eq!(after.len(), all.len() - 2);
    assert!(!after.contains(&(layer as usize, 0)));
    // Its share is missing two experts: it loads them again and serves again.
    holds_its_share_again(&w, &all).await;
    // `Load` adds beyond the share (here: what it already holds, so nothing).
    let loaded = w
        .client
        .clone()
        .load(LoadRequest {
            placement_version: 0,
            experts: vec![LayerExperts {
                layer,
                experts: vec![0],
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pairs(&loaded.held), all);

    let err = w
        .client
        .clone()
        .load(LoadRequest {
            placement_version: 0,
            experts: vec![LayerExperts {
                layer: 0,
                experts: vec![0],
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("not an MoE layer"),
        "{}",
        err.message()
    );
    // Still serving.
    assert_eq!(pairs(&info(&w).await.held), all);
    w.stop.cancel();
    w.task.await.unwrap().unwrap();
}

/// Polls until `w` holds `share`, reports ready and its health SERVING.
async fn holds_its_share_again(w: &Worker, share: &BTreeSet<(usize, usize)>) {
    tokio::time::timeout(DEADLINE, async {
        loop {
            let i = info(w).await;
            let health = HealthClient::new(w.channel.clone())
                .check(HealthCheckRequest::default())
                .await
                .unwrap()
                .into_inner()
                .status();
            if i.ready && pairs(&i.held) == *share && health == ServingStatus::Serving {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the worker loads its share again before the deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_missing_part_of_its_share_is_not_ready_until_it_has_reloaded_it() {
    let discovery = Arc::new(MemoryDiscovery::new());
    let w = start(&discovery, "reloads").await;
    settled(&discovery, &[&w], 1).await;
    let all = pairs(&info(&w).await.held);
    let layer = all.iter().next().unwrap().0 as u32;
    // Unload, then ask at once: the answer is taken before the reload can finish
    // only sometimes, so what is checked is that a worker short of its share never
    // says it is ready.
    let mut saw_not_ready = false;
    for _ in 0..5 {
        w.client
            .clone()
            .unload(UnloadRequest {
                placement_version: 0,
                experts: vec![LayerExperts {
                    layer,
                    experts: (0..8).collect(),
                }],
            })
            .await
            .unwrap();
        let i = info(&w).await;
        let short = !pairs(&i.held).is_superset(&all);
        assert!(!(short && i.ready), "ready while missing part of its share");
        saw_not_ready |= !i.ready;
        holds_its_share_again(&w, &all).await;
    }
    println!("saw the worker not ready after an unload: {saw_not_ready}");
    w.stop.cancel();
    w.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_caps_what_a_worker_is_given_and_holds() {
    let discovery = Arc::new(MemoryDiscovery::new());
    let cfg = ModelConfig::from_dir(&fixture()).unwrap();
    let per_expert = total_expert_bytes()
        / (cfg.language.moe_layers().len() * cfg.language.moe.as_ref().unwrap().n_routed_experts);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut config = Config::new(fixture());
    config.member.id = Some("small".into());
    config.expert_memory_bytes = Some(10 * per_expert as u64);
    config.placement_settle_ms = 100;
    let stop = CancellationToken::new();
    let task = tokio::spawn(tessera_expert_worker::run(
        config,
        listener,
        discovery.clone(),
        stop.clone(),
    ));
    let client = ExpertClient::new(
        Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy(),
    );
    let big = start(&discovery, "big").await;
    // The worker registers its capacity, and the placement gives it no more.
    let registered = tokio::time::timeout(DEADLINE, async {
        loop {
            let member = discovery.members().into_iter().find(|m| m.id == "small");
            if let Some(capacity) = member.and_then(|m| m.capacity) {
                return capacity;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    assert_eq!(registered, 10);
    let p = tokio::time::timeout(DEADLINE, async {
        loop {
            if let Some(p) = discovery.placement().filter(|p| p.workers().count() == 2) {
                return p;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    assert!(
        p.experts_of("small").len() <= 10,
        "{:?}",
        p.experts_of("small")
    );
    assert!(p.is_complete(), "the unbounded worker holds the rest");
    let held = tokio::time::timeout(DEADLINE, async {
        loop {
            let i = client.clone().info(InfoRequest {}).await;
            if let Ok(i) = i.map(|r| r.into_inner())
                && i.ready
                && i.placement_version >= p.version
            {
                return i.held_bytes;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    assert!(held as usize <= 10 * per_expert, "{held} bytes held");
    stop.cancel();
    task.await.unwrap().unwrap();
    big.stop.cancel();
    big.task.await.unwrap().unwrap();
}
