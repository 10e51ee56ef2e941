//! The scheduler test harness: fixture cases, a scheduler with real
//! expert-workers on loopback, request builders and stream readers.

#![allow(dead_code)] // each test binary uses a different part of the harness

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device};
use serde_json::Value;
use tessera_model::chat::Message;
use tessera_model::pipeline::Pipeline;
use tessera_model::weights::WeightFormat;
use tessera_proto::MAX_MESSAGE_BYTES;
use tessera_proto::internal::v1::scheduler_client::SchedulerClient;
use tessera_proto::internal::v1::token_event::Event;
use tessera_proto::internal::v1::{
    CancelRequest, Finished, ImageRun, Sampling, Stopping, SubmitRequest, TokenEvent,
};
use tessera_runtime::CancellationToken;
use tessera_runtime::discovery::{Discovery, MemoryDiscovery, Role};
use tessera_scheduler::{Config, Stats};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tonic::transport::Channel;
use tonic::{Status, Streaming};

/// Longest any step of a test may take before it counts as a hang.
pub const DEADLINE: Duration = Duration::from_secs(120);
/// A request long enough to still be running when the test acts on it.
pub const LONG: u32 = 3000;

pub fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

pub fn case(fixture: &str, name: &str) -> Value {
    let text = std::fs::read_to_string(fixture_dir(fixture).join("cases.json")).unwrap();
    let cases: Value = serde_json::from_str(&text).unwrap();
    cases["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no case {name} in {fixture}"))
        .clone()
}

pub fn json_ids(v: &Value) -> Vec<u32> {
    let ids = v.as_array().unwrap().iter();
    ids.map(|x| x.as_u64().unwrap() as u32).collect()
}

pub struct Worker {
    pub shutdown: CancellationToken,
    pub task: JoinHandle<tessera_expert_worker::Result<()>>,
}

impl Worker {
    /// Starts expert-worker `worker-{i}` of the snapshot `dir` in `discovery`.
    pub async fn spawn(dir: &Path, discovery: &Arc<MemoryDiscovery>, i: usize) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut cfg = tessera_expert_worker::Config::new(dir);
        cfg.member.id = Some(format!("worker-{i}"));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(tessera_expert_worker::run(
            cfg,
            listener,
            discovery.clone(),
            shutdown.clone(),
        ));
        Self { shutdown, task }
    }
}

/// A scheduler and its expert-workers in this process.
pub struct Cluster {
    pub discovery: Arc<MemoryDiscovery>,
    pub workers: Vec<Worker>,
    pub shutdown: CancellationToken,
    pub scheduler: JoinHandle<tessera_scheduler::Result<()>>,
    pub stats: Arc<Stats>,
    pub client: SchedulerClient<Channel>,
}

impl Cluster {
    pub async fn start(
        fixture: &str,
        n_workers: usize,
        configure: impl FnOnce(&mut Config),
    ) -> Self {
        let dir = fixture_dir(fixture);
        let discovery = Arc::new(MemoryDiscovery::new());
        let mut workers = Vec::new();
        for i in 0..n_workers {
            workers.push(Worker::spawn(&dir, &discovery, i).await);
        }
        let mut cfg = Config::new(&dir);
        cfg.member.grace_seconds = 5;
        // The default pool is resident at start and sized for every sequence's whole
        // context; the tests need far less.
        cfg.engine.kv_cache_bytes = Some(64 << 20);
        configure(&mut cfg);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(Stats::default());
        let shutdown = CancellationToken::new();
        let scheduler = tokio::spawn(tessera_scheduler::run_with_stats(
            cfg,
            listener,
            discovery.clone(),
            shutdown.clone(),
            stats.clone(),
        ));
        let mut members = discovery.subscribe();
        let registered = members.wait_for(|m| m.iter().any(|m| m.role == Role::Scheduler));
        timeout(DEADLINE, registered)
            .await
            .expect("the scheduler registers once loaded")
            .unwrap();
        let client = SchedulerClient::connect(format!("http://{addr}"))
            .await
            .unwrap()
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Self {
            discovery,
            workers,
            shutdown,
            scheduler,
            stats,
            client,
        }
    }

    /// Starts one more expert-worker, `worker-{i}`.
    pub async fn add_worker(&mut self, fixture: &str, i: usize) {
        let worker = Worker::spawn(&fixture_dir(fixture), &self.discovery, i).await;
        self.workers.push(worker);
    }

    pub async fn submit(&self, request: SubmitRequest) -> Result<Streaming<TokenEvent>, Status> {
        let response = timeout(DEADLINE, self.client.clone().submit(request)).await;
        response.expect("Submit answers").map(|r| r.into_inner())
    }

    /// Cancels request `id`; whether the scheduler had it.
    pub async fn cancel(&self, id: &str) -> bool {
        let request = CancelRequest {
            request_id: id.into(),
        };
        let answer = timeout(DEADLINE, self.client.clone().cancel(request)).await;
        answer.expect("Cancel answers").unwrap().into_inner().found
    }

    /// Stops everything; each service must exit cleanly.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let scheduler = timeout(DEADLINE, self.scheduler)
            .await
            .expect("scheduler stops");
        scheduler.unwrap().unwrap();
        for worker in self.workers {
            worker.shutdown.cancel();
            let stopped = timeout(DEADLINE, worker.task).await.expect("worker stops");
            stopped.unwrap().unwrap();
        }
    }
}

/// A greedy request for `input_ids` (ignoring EOS).
pub fn request(
    id: &str,
    input_ids: Vec<u32>,
    image_runs: Vec<ImageRun>,
    max_tokens: u32,
) -> SubmitRequest {
    SubmitRequest {
        request_id: id.into(),
        model_fingerprint: String::new(),
        input_ids,
        image_runs,
        sampling: Some(Sampling {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            repetition_penalty: 1.0,
            seed: 0,
            ..Default::default()
        }),
        stopping: Some(Stopping {
            max_tokens,
            stop: Vec::new(),
            ignore_eos: true,
        }),
        resumed_tokens: 0,
    }
}

/// A case's prompt as a request for its 16 greedy tokens, and those tokens. Image
/// runs carry the embeddings `Pipeline::prepare` puts at their positions.
pub async fn case_request(fixture: &str, name: &str) -> (SubmitRequest, Vec<u32>) {
    let case = case(fixture, name);
    let ids = json_ids(&case["input_ids"]);
    let want = json_ids(&case["greedy"]["new_token_ids"]);
    let messages: Vec<Message> = serde_json::from_value(case["conversation"].clone()).unwrap();
    let runs = if messages.iter().all(|m| m.images.is_empty()) {
        Vec::new()
    } else {
        let dir = fixture_dir(fixture);
        let prepare = move || {
            let pipeline =
                Pipeline::load(&dir, DType::F32, WeightFormat::Auto, &Device::Cpu).unwrap();
            let images: Vec<image::RgbImage> = messages
                .iter()
                .flat_map(|m| &m.images)
                .map(|f| image::open(dir.join(f)).unwrap().to_rgb8())
                .collect();
            pipeline.prepare(&messages, &images).unwrap()
        };
        let prepared = tokio::task::spawn_blocking(prepare).await.unwrap();
        assert_eq!(prepared.encoded.input_ids, ids);
        let runs = prepared.encoded.image_runs.iter().map(|run| ImageRun {
            start: run.start as u32,
            len: run.len() as u32,
            embeddings: Some(
                tessera_proto::tensor::encode(
                    &prepared.embeds.narrow(0, run.start, run.len()).unwrap(),
                )
                .unwrap(),
            ),
            content_hash: Default::default(),
        });
        runs.collect()
    };
    (request(name, ids, runs, want.len() as u32), want)
}

/// Reads a stream to its end: the tokens, then the `Finished` event or the error.
pub async fn collect(stream: &mut Streaming<TokenEvent>) -> (Vec<u32>, Result<Finished, Status>) {
    let mut tokens = Vec::new();
    loop {
        let next = timeout(DEADLINE, stream.message())
            .await
            .expect("the stream moves on");
        match next {
            Ok(Some(TokenEvent {
                event: Some(Event::Tokens(t)),
            })) => tokens.extend(t.token_ids),
            Ok(Some(TokenEvent {
                event: Some(Event::Finished(f)),
            })) => {
                let after = timeout(DEADLINE, stream.message())
                    .await
                    .expect("the stream ends");
                assert!(
                    matches!(after, Ok(None)),
                    "nothing follows Finished: {after:?}"
                );
                return (tokens, Ok(f));
            }
            Ok(Some(TokenEvent { event: None })) => panic!("an empty event"),
            Ok(None) => panic!("the stream ended without Finished or an error"),
            Err(status) => return (tokens, Err(status)),
        }
    }
}

/// Runs `request` to the end; panics unless it finishes.
pub async fn generate(cluster: &Cluster, request: SubmitRequest) -> (Vec<u32>, Finished) {
    let mut stream = cluster.submit(request).await.unwrap();
    let (tokens, finished) = collect(&mut stream).await;
    (tokens, finished.unwrap())
}

/// Waits for the first `Tokens` event of a stream.
pub async fn first_token(stream: &mut Streaming<TokenEvent>) {
    let event = timeout(DEADLINE, stream.message())
        .await
        .expect("a first token");
    assert!(
        matches!(
            event,
            Ok(Some(TokenEvent {
                event: Some(Event::Tokens(_))
            }))
        ),
        "{event:?}"
    );
}
