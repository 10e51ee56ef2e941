//! Routed experts on expert-workers: real gRPC servers on loopback, the
//! scheduler's remote backend, greedy generation through the engine compared
//! with in-process experts and the reference fixtures.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device};
use serde_json::Value;
use tessera_expert_worker::Config;
use tessera_model::chat::{ChatTokenizer, Message};
use tessera_model::generate::GenerationParams;
use tessera_model::language::LanguageModel;
use tessera_model::pipeline::Pipeline;
use tessera_model::weights::{Checkpoint, LoadTarget, WeightFormat};
use tessera_proto::MAX_MESSAGE_BYTES;
use tessera_proto::internal::v1::expert_client::ExpertClient;
use tessera_proto::internal::v1::{ForwardRequest, InfoRequest};
use tessera_runtime::placement::Placement;
use tessera_runtime::{CancellationToken, Discovery, MemoryDiscovery};
use tessera_scheduler::local::{LocalEngine, Prompt};
use tessera_scheduler::{EngineConfig, RemoteExperts};
use tokio::net::TcpListener;
use tokio::runtime::Runtime;

mod common;

use common::{case, fixture_dir, json_ids};
use tonic::transport::Channel;

const NEW_TOKENS: usize = 16;
const DEADLINE: Duration = Duration::from_secs(60);

/// Expert-workers serving one snapshot in this process, each on its own listener,
/// following the placement their in-process discovery publishes.
struct Cluster {
    runtime: Runtime,
    placement: Placement,
    fingerprint: String,
    clients: BTreeMap<String, ExpertClient<Channel>>,
    stop: CancellationToken,
    servers: Vec<tokio::task::JoinHandle<tessera_expert_worker::Result<()>>>,
}

impl Cluster {
    fn start(dir: &Path, n_workers: usize) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let _inside = runtime.enter();
        let discovery = Arc::new(MemoryDiscovery::new());
        let stop = CancellationToken::new();
        let (mut servers, mut clients) = (Vec::new(), BTreeMap::new());
        for i in 0..n_workers {
            let id = format!("worker-{i}");
            let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
            let addr = listener.local_addr().unwrap();
            let mut worker = Config::new(dir);
            worker.member.id = Some(id.clone());
            // One owner per expert: each worker holds 1/N (replicas are the
            // failover tests' business).
            worker.pool.expert_replicas = Some(1);
            worker.placement_settle_ms = 100;
            servers.push(runtime.spawn(tessera_expert_worker::run(
                worker,
                listener,
                discovery.clone(),
                stop.clone(),
            )));
            let channel = Channel::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect_lazy();
            let client = ExpertClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES);
            clients.insert(id, client);
        }
        // Wait until the placement covers every worker and each has applied it.
        let placement = runtime.block_on(async {
            tokio::time::timeout(DEADLINE, async {
                loop {
                    if let Some(p) = discovery
                        .placement()
                        .filter(|p| p.workers().count() == n_workers)
                    {
                        let mut ready = true;
                        for client in clients.values() {
                            let info = client.clone().info(InfoRequest {}).await;
                            ready &=
                                info.is_ok_and(|i| i.into_inner().placement_version == p.version);
                        }
                        if ready {
                            return p;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await
            .expect("the workers apply a placement before the deadline")
        });
        Self {
            runtime,
            placement,
            fingerprint: tessera_model::fingerprint(dir).unwrap(),
            clients,
            stop,
            servers,
        }
    }

    fn remote_experts(&self) -> RemoteExperts {
        RemoteExperts::new(
            self.placement.clone(),
            self.clients.clone(),
            self.runtime.handle().clone(),
            self.fingerprint.clone(),
        )
    }

    /// Stops every worker and checks each exited cleanly.
    fn stop(self) {
        self.stop.cancel();
        for server in self.servers {
            self.runtime.block_on(server).unwrap().unwrap();
        }
    }
}

/// A case's conversation with its images (paths relative to the fixture folder).
fn case_prompt(pipeline: &Pipeline, dir: &Path, case: &Value) -> Prompt {
    let messages: Vec<Message> = serde_json::from_value(case["conversation"].clone()).unwrap();
    let images: Vec<image::RgbImage> = messages
        .iter()
        .flat_map(|m| &m.images)
        .map(|f| image::open(dir.join(f)).unwrap().to_rgb8())
        .collect();
    let prepared = pipeline.prepare(&messages, &images).unwrap();
    Prompt {
        input_ids: prepared.encoded.input_ids,
        image_runs: prepared.encoded.image_runs,
        image_embeds: prepared.image_embeds,
    }
}

/// The language model of `dir` without routed experts, as a scheduler loads it.
fn scheduler_side(dir: &Path) -> (LanguageModel, ChatTokenizer) {
    let config = tessera_model::config::ModelConfig::from_dir(dir).unwrap();
    let checkpoint = Checkpoint::open(dir).unwrap();
    let device = Device::Cpu;
    let target = LoadTarget {
        checkpoint: &checkpoint,
        dtype: DType::F32,
        weights: WeightFormat::Auto,
        device: &device,
    };
    let language = LanguageModel::load(&config.language, target).unwrap();
    (language, ChatTokenizer::from_dir(dir).unwrap())
}

/// An engine for one request of `prompt` and `NEW_TOKENS`.
fn engine_config(language: &LanguageModel, prompt: &Prompt) -> EngineConfig {
    EngineConfig::single(
        prompt.input_ids.len() + NEW_TOKENS,
        language.cache_bytes_per_token(),
        None,
    )
}

/// For 1, 2 and 3 workers: each holds about 1/N of the experts, and greedy
/// generation through them equals in-process experts and the reference.
fn dispatch_matches_in_process(fixture_name: &str, case_name: &str) {
    let dir = fixture_dir(fixture_name);
    let case = case(fixture_name, case_name);
    let want = json_ids(&case["greedy"]["new_token_ids"]);
    let pipeline = Pipeline::load(&dir, DType::F32, WeightFormat::Auto, &Device::Cpu).unwrap();
    let prompt = case_prompt(&pipeline, &dir, &case);
    let ids = prompt.input_ids.clone();
    assert_eq!(ids, json_ids(&case["input_ids"]));
    let eos = pipeline.config.language.eos_token_id;
    let params = GenerationParams {
        ignore_eos: true,
        ..GenerationParams::greedy(NEW_TOKENS, eos)
    };
    let n_layers = pipeline.config.language.moe_layers().len() as u64;
    let total = pipeline.experts.len();
    let Pipeline {
        language,
        experts,
        tokenizer,
        ..
    } = pipeline;
    let cfg = engine_config(&language, &prompt);
    let mut engine = LocalEngine::start(language, tokenizer, Arc::new(experts), cfg).unwrap();
    let local = engine.generate(&prompt, &params).unwrap().output_ids;
    drop(engine);
    assert_eq!(
        local, want,
        "{fixture_name}/{case_name}: in-process experts"
    );

    for n in 1..=3 {
        let cluster = Cluster::start(&dir, n);
        for (id, client) in &cluster.clients {
            let held = cluster.placement.experts_of(id);
            let info = cluster
                .runtime
                .block_on(client.clone().info(InfoRequest {}))
                .unwrap()
                .into_inner();
            let reported: BTreeSet<(usize, usize)> = info
                .held
                .iter()
                .flat_map(|l| l.experts.iter().map(|&e| (l.layer as usize, e as usize)))
                .collect();
            assert_eq!(&reported, held);
            let len = reported.len();
            assert!(
                len.abs_diff(total / n) <= n_layers as usize,
                "{id} of {n} holds {len} of {total}"
            );
            assert_eq!(info.model_fingerprint, cluster.fingerprint);
        }

        let remote = Arc::new(cluster.remote_experts());
        let (language, tokenizer) = scheduler_side(&dir);
        let cfg = engine_config(&language, &prompt);
        let mut engine = LocalEngine::start(language, tokenizer, remote.clone(), cfg).unwrap();
        // This (test) thread is outside the runtime; the engine has its own thread.
        let got = engine.generate(&prompt, &params).unwrap().output_ids;
        drop(engine);
        assert_eq!(got, local, "{fixture_name}/{case_name}: {n} expert-workers");

        let tokens = (ids.len() + NEW_TOKENS - 1) as u64;
        println!(
            "{fixture_name}/{case_name}: {n} worker(s): {} B sent + {} B received; \
             {:.0} B sent, {:.0} B received per token per MoE layer",
            remote.bytes_sent(),
            remote.bytes_received(),
            remote.bytes_sent() as f64 / (tokens * n_layers) as f64,
            remote.bytes_received() as f64 / (tokens * n_layers) as f64,
        );
        assert!(remote.bytes_sent() > 0 && remote.bytes_received() > 0);
        cluster.stop();
    }
}

/// `--expert-wire bf16`: the hidden states go out and the sums come back in bf16
/// (the workers compute in f32 between), so the rows' bytes halve in both directions.
/// Prints the bytes per token per MoE layer of both.
#[test]
fn bf16_hidden_states_on_the_wire_halve_the_bytes_per_token_per_layer() {
    let (fixture_name, case_name) = ("tiny-mha-softmax", "text_only");
    let dir = fixture_dir(fixture_name);
    let case = case(fixture_name, case_name);
    let pipeline = Pipeline::load(&dir, DType::F32, WeightFormat::Auto, &Device::Cpu).unwrap();
    let prompt = case_prompt(&pipeline, &dir, &case);
    let hidden = pipeline.config.language.hidden_size;
    let n_layers = pipeline.config.language.moe_layers().len() as f64;
    let eos = pipeline.config.language.eos_token_id;
    let params = GenerationParams {
        ignore_eos: true,
        ..GenerationParams::greedy(NEW_TOKENS, eos)
    };
    drop(pipeline);
    let tokens = (prompt.input_ids.len() + NEW_TOKENS - 1) as f64;
    let cluster = Cluster::start(&dir, 2);
    let mut per_token = Vec::new();
    for wire in [DType::F32, DType::BF16] {
        let remote = Arc::new(cluster.remote_experts().with_wire(wire));
        let (language, tokenizer) = scheduler_side(&dir);
        let cfg = engine_config(&language, &prompt);
        let mut engine = LocalEngine::start(language, tokenizer, remote.clone(), cfg).unwrap();
        let out = engine.generate(&prompt, &params).unwrap().output_ids;
        drop(engine);
        assert_eq!(out.len(), NEW_TOKENS, "{wire:?} on the wire");
        let sent = remote.bytes_sent() as f64 / (tokens * n_layers);
        let received = remote.bytes_received() as f64 / (tokens * n_layers);
        println!(
            "{fixture_name}/{case_name}, 2 workers, hidden {hidden}, {wire:?} on the wire: \
             {sent:.0} B sent, {received:.0} B received per token per MoE layer"
        );
        per_token.push((sent, received));
    }
    let [(sent_f32, received_f32), (sent_bf16, received_bf16)] = per_token[..] else {
        unreachable!()
    };
    // A response is the sums tensor alone; a request also carries the routes.
    assert!(
        received_bf16 < 0.55 * received_f32,
        "received per token per layer: bf16 {received_bf16:.0} B, f32 {received_f32:.0} B"
    );
    assert!(
        sent_bf16 < 0.75 * sent_f32,
        "sent per token per layer: bf16 {sent_bf16:.0} B, f32 {sent_f32:.0} B"
    );
    cluster.stop();
}

#[test]
fn tiny_mha_text_only_through_expert_workers_matches_in_process() {
    dispatch_matches_in_process("tiny-mha-softmax", "text_only");
}

#[test]
fn small_mla_multi_turn_through_expert_workers_matches_in_process() {
    dispatch_matches_in_process("small-mla-softmax", "multi_turn");
}

#[test]
fn tiny_mha_text_only_conversation_file_encodes_to_the_reference_ids() {
    let dir = fixture_dir("tiny-mha-softmax");
    let text = std::fs::read_to_string(dir.join("conversations/text_only.json")).unwrap();
    let messages: Vec<Message> = serde_json::from_str(&text).unwrap();
    let tokenizer = ChatTokenizer::from_dir(&dir).unwrap();
    let encoded = tokenizer.encode_conversation(&messages, &[]).unwrap();
    assert_eq!(
        encoded.input_ids,
        json_ids(&case("tiny-mha-softmax", "text_only")["input_ids"])
    );
}

#[test]
fn a_forward_for_an_expert_not_held_is_refused_and_the_worker_keeps_serving() {
    let dir = fixture_dir("tiny-mha-softmax");
    let cluster = Cluster::start(&dir, 2);
    let (id, client) = cluster.clients.iter().next().unwrap();
    let held = cluster.placement.experts_of(id);
    let &(layer, expert) = held.iter().next().unwrap();
    let not_held = (0..16)
        .find(|&e| !held.contains(&(layer, e)))
        .expect("worker holds only part of the layer");
    let hidden = tessera_model::config::ModelConfig::from_dir(&dir)
        .unwrap()
        .language
        .hidden_size;
    let rows = candle_core::Tensor::ones((2, hidden), DType::F32, &Device::Cpu).unwrap();
    let request = |expert: usize, fingerprint: &str| ForwardRequest {
        model_fingerprint: fingerprint.into(),
        layer: layer as u32,
        rows: Some(tessera_proto::tensor::encode(&rows).unwrap()),
        route_rows: vec![0, 1],
        route_experts: vec![expert as u32, expert as u32],
        route_weights: vec![0.5, 1.0],
    };
    let mut client = client.clone();

    let refused = cluster
        .runtime
        .block_on(client.forward(request(not_held, &cluster.fingerprint)))
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(refused.message().contains(&format!("expert {not_held}")));

    let mismatch = cluster
        .runtime
        .block_on(client.forward(request(expert, "another-model")))
        .unwrap_err();
    assert_eq!(mismatch.code(), tonic::Code::FailedPrecondition);

    // Still serving: a good request answers with the weighted sums.
    let ok = cluster
        .runtime
        .block_on(client.forward(request(expert, &cluster.fingerprint)))
        .unwrap()
        .into_inner();
    let sums = tessera_proto::tensor::decode(&ok.sums.unwrap(), &Device::Cpu).unwrap();
    assert_eq!(sums.dims(), [2, hidden]);
    let rows2 = sums.to_vec2::<f32>().unwrap();
    // Same input row, weights 0.5 and 1.0: the second is twice the first.
    for (a, b) in rows2[0].iter().zip(&rows2[1]) {
        assert!((2.0 * a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} {b}");
    }
    assert!(rows2[0].iter().any(|v| *v != 0.0));
    cluster.stop();
}
