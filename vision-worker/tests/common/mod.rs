//! Helpers shared by the vision-worker's tests: a real worker on 127.0.0.1:0 with
//! a `MemoryDiscovery`, its client, the tiny fixture, and the in-process reference
//! (`Pipeline::prepare`) the worker must reproduce.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use tessera_model::chat::Message;
use tessera_model::pipeline::{Pipeline, PreparedPrompt};
use tessera_model::processor::{ImageLimits, decode_image};
use tessera_model::weights::WeightFormat;
use tessera_proto::MAX_MESSAGE_BYTES;
use tessera_proto::internal::v1::vision_client::VisionClient;
use tessera_proto::internal::v1::{EncodeRequest, EncodeResponse, EncodedImage, ImageInput};
use tessera_runtime::{CancellationToken, Discovery, Member, MemoryDiscovery, Role};
use tessera_vision_worker::{Config, VisionService};
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// How long a test waits for the worker to load, register or stop.
pub const DEADLINE: Duration = Duration::from_secs(120);

/// The plain-MHA fixture snapshot.
pub fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-mha-softmax")
}

/// Every case of the fixture that has images.
pub fn image_cases() -> Vec<Value> {
    let text = std::fs::read_to_string(fixture().join("cases.json")).unwrap();
    let cases: Value = serde_json::from_str(&text).unwrap();
    cases["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["num_images"].as_u64().unwrap() > 0)
        .cloned()
        .collect()
}

/// A case's conversation and its image file names in prompt order.
pub fn conversation(case: &Value) -> (Vec<Message>, Vec<String>) {
    let messages: Vec<Message> = serde_json::from_value(case["conversation"].clone()).unwrap();
    let names = messages.iter().flat_map(|m| m.images.clone()).collect();
    (messages, names)
}

/// The bytes of a fixture image.
pub fn image_bytes(name: &str) -> Vec<u8> {
    std::fs::read(fixture().join(name)).unwrap()
}

/// A request for the fixture images `names`.
pub fn request(names: &[&str]) -> EncodeRequest {
    EncodeRequest {
        request_id: String::new(),
        model_fingerprint: String::new(),
        images: names
            .iter()
            .map(|n| ImageInput {
                data: image_bytes(n).into(),
                mime_type: "image/png".into(),
            })
            .collect(),
    }
}

/// The reference: `Pipeline::prepare` in one process.
pub fn prepare(dtype: DType, messages: &[Message], names: &[String]) -> PreparedPrompt {
    let pipeline = Pipeline::load(&fixture(), dtype, WeightFormat::Auto, &Device::Cpu).unwrap();
    let images: Vec<_> = names
        .iter()
        .map(|n| decode_image(&image_bytes(n), &ImageLimits::default()).unwrap())
        .collect();
    pipeline.prepare(messages, &images).unwrap()
}

/// The embeddings of one encoded image as an f32 (num_tokens, hidden) tensor.
pub fn embeddings(image: &EncodedImage) -> Tensor {
    let wire = image.embeddings.as_ref().expect("embeddings are set");
    tessera_proto::tensor::decode(wire, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

/// Largest absolute difference between two tensors of one shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// A worker serving on loopback.
pub struct Worker {
    pub address: String,
    pub service: VisionService,
    pub discovery: MemoryDiscovery,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<tessera_vision_worker::Result<()>>,
}

impl Worker {
    /// Starts a worker for `cfg` without waiting for it to load.
    pub async fn spawn(cfg: Config) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let service = VisionService::new(&cfg);
        let discovery = MemoryDiscovery::new();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(tessera_vision_worker::serve(
            cfg,
            service.clone(),
            listener,
            Arc::new(discovery.clone()),
            shutdown.clone(),
        ));
        Self {
            address,
            service,
            discovery,
            shutdown,
            task,
        }
    }

    /// Starts a worker for `cfg` and waits until it has registered.
    pub async fn start(cfg: Config) -> Self {
        let worker = Self::spawn(cfg).await;
        worker.registered().await;
        worker
    }

    /// Starts a worker with the fixture and default settings but `cache_entries`.
    pub async fn with_cache(cache_entries: usize) -> Self {
        Self::start(Config {
            cache_entries,
            ..Config::new(fixture())
        })
        .await
    }

    /// Waits (with a deadline) until a vision-worker is in discovery; returns it.
    pub async fn registered(&self) -> Member {
        let mut members = self.discovery.subscribe();
        let found = tokio::time::timeout(
            DEADLINE,
            members.wait_for(|m| m.iter().any(|m| m.role == Role::VisionWorker)),
        )
        .await
        .expect("the worker registers within the deadline")
        .expect("discovery stays alive")
        .clone();
        found.into_iter().next().unwrap()
    }

    /// A client with the message limits raised.
    pub async fn client(&self) -> VisionClient<Channel> {
        VisionClient::connect(format!("http://{}", self.address))
            .await
            .unwrap()
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// Encodes the fixture images `names`.
    pub async fn encode(&self, names: &[&str]) -> EncodeResponse {
        self.client()
            .await
            .encode(request(names))
            .await
            .unwrap()
            .into_inner()
    }

    /// Cancels the worker and waits for `run` to return.
    pub async fn stop(self) -> tessera_vision_worker::Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("the worker stops within the deadline")
            .expect("the worker task does not panic")
    }
}

/// Whether `discovery` lists no members.
pub fn is_empty(discovery: &MemoryDiscovery) -> bool {
    discovery.members().is_empty()
}
