//! Fake vision-worker and scheduler for the gateway's tests: real gRPC servers on
//! loopback that answer from a script and record what they were sent.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use image::ImageReader;
use tessera_model::config::{ModelConfig, ProcessorConfig};
use tessera_model::image_tokens::cropping_enabled;
use tessera_model::processor::tiling_for;
use tessera_proto::MAX_MESSAGE_BYTES;
use tessera_proto::internal::v1::scheduler_server::{Scheduler, SchedulerServer};
use tessera_proto::internal::v1::vision_server::{Vision, VisionServer};
use tessera_proto::internal::v1::{
    CancelRequest, CancelResponse, Dtype, EncodeRequest, EncodeResponse, EncodedImage, Finished,
    StopReason, SubmitRequest, Tensor, TokenEvent, Tokens, token_event,
};
use tessera_runtime::{Discovery, Member, MemoryDiscovery, Registration, Role, telemetry};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Server;
use tonic::{Request, Response, Status};

use crate::common::serve;

/// What the fake vision-worker answers.
#[derive(Debug, Clone)]
pub enum VisionScript {
    /// The processor's tilings and zero embeddings of the right shape.
    Correct,
    /// Every image as a 1×1 tiling, whatever the plan.
    WrongTiling,
    /// This status.
    Fail(Status),
}

/// A vision-worker answering from a script; counts its calls.
#[derive(Clone)]
pub struct FakeVision {
    script: VisionScript,
    processor: ProcessorConfig,
    hidden: usize,
    pub calls: Arc<Mutex<Vec<EncodeRequest>>>,
}

impl FakeVision {
    pub fn new(snapshot: &Path, script: VisionScript) -> Self {
        Self {
            script,
            processor: ProcessorConfig::from_dir(snapshot).unwrap(),
            hidden: ModelConfig::from_dir(snapshot)
                .unwrap()
                .language
                .hidden_size,
            calls: Arc::default(),
        }
    }

    /// Serves it on loopback.
    pub async fn serve(self) -> SocketAddr {
        let server = VisionServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        serve(Server::builder().add_service(server)).await
    }

    fn encode_one(&self, data: &[u8], cropping: bool) -> EncodedImage {
        let (width, height) = ImageReader::new(std::io::Cursor::new(data))
            .with_guessed_format()
            .unwrap()
            .into_dimensions()
            .unwrap();
        let cropping = cropping && !matches!(self.script, VisionScript::WrongTiling);
        let tiling = tiling_for(width, height, cropping, &self.processor);
        let n = tiling.num_tokens();
        EncodedImage {
            width,
            height,
            tiles_x: tiling.width as u32,
            tiles_y: tiling.height as u32,
            num_tokens: n as u32,
            embeddings: Some(Tensor {
                dtype: Dtype::F32.into(),
                shape: vec![n as u64, self.hidden as u64],
                data: vec![0_u8; n * self.hidden * 4].into(),
            }),
        }
    }
}

#[tonic::async_trait]
impl Vision for FakeVision {
    async fn encode(
        &self,
        request: Request<EncodeRequest>,
    ) -> Result<Response<EncodeResponse>, Status> {
        let request = request.into_inner();
        self.calls.lock().unwrap().push(request.clone());
        if let VisionScript::Fail(status) = &self.script {
            return Err(status.clone());
        }
        let cropping = cropping_enabled(request.images.len());
        let images = request
            .images
            .iter()
            .map(|i| self.encode_one(&i.data, cropping))
            .collect();
        Ok(Response::new(EncodeResponse { images }))
    }
}

/// What the fake scheduler answers to every `Submit`.
#[derive(Debug, Clone)]
pub enum SchedulerScript {
    /// These token batches, then `finished` with this reason.
    Tokens(Vec<Vec<u32>>, StopReason),
    /// This status instead of a stream.
    Fail(Status),
    /// This first batch, then nothing until the call is cancelled.
    Hang(Vec<u32>),
    /// These token batches, then this status (a scheduler failing mid-stream).
    Break(Vec<Vec<u32>>, Status),
    /// These token batches, then the end of the stream without `finished`.
    Cut(Vec<Vec<u32>>),
}

/// One `Submit` as received: its `x-request-id` metadata and its body.
pub type Submitted = (Option<String>, SubmitRequest);

/// A scheduler answering from a script; records submissions, their request-id
/// metadata, cancellations and abandoned streams.
#[derive(Clone)]
pub struct FakeScheduler {
    script: SchedulerScript,
    pub submitted: Arc<Mutex<Vec<Submitted>>>,
    pub cancelled: watch::Sender<Vec<String>>,
    pub abandoned: watch::Sender<usize>,
}

impl FakeScheduler {
    pub fn new(script: SchedulerScript) -> Self {
        Self {
            script,
            submitted: Arc::default(),
            cancelled: watch::Sender::new(Vec::new()),
            abandoned: watch::Sender::new(0),
        }
    }

    /// Serves it on loopback.
    pub async fn serve(self) -> SocketAddr {
        let server = SchedulerServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        serve(Server::builder().add_service(server)).await
    }
}

fn tokens(ids: Vec<u32>) -> Result<TokenEvent, Status> {
    Ok(TokenEvent {
        event: Some(token_event::Event::Tokens(Tokens {
            token_ids: ids,
            logprobs: Vec::new(),
        })),
    })
}

#[tonic::async_trait]
impl Scheduler for FakeScheduler {
    type SubmitStream = ReceiverStream<Result<TokenEvent, Status>>;

    async fn submit(
        &self,
        request: Request<SubmitRequest>,
    ) -> Result<Response<Self::SubmitStream>, Status> {
        let id = telemetry::request_id(request.metadata());
        let request = request.into_inner();
        let prompt_tokens = request.input_ids.len() as u32;
        self.submitted.lock().unwrap().push((id, request));
        let (tx, rx) = mpsc::channel(64);
        match self.script.clone() {
            SchedulerScript::Fail(status) => return Err(status),
            SchedulerScript::Tokens(batches, reason) => {
                let completion_tokens = batches.iter().map(Vec::len).sum::<usize>() as u32;
                for batch in batches {
                    tx.send(tokens(batch)).await.unwrap();
                }
                let finished = Finished {
                    reason: reason.into(),
                    prompt_tokens,
                    completion_tokens,
                };
                tx.send(Ok(TokenEvent {
                    event: Some(token_event::Event::Finished(finished)),
                }))
                .await
                .unwrap();
            }
            SchedulerScript::Break(batches, status) => {
                for batch in batches {
                    tx.send(tokens(batch)).await.unwrap();
                }
                tx.send(Err(status)).await.unwrap();
            }
            SchedulerScript::Cut(batches) => {
                for batch in batches {
                    tx.send(tokens(batch)).await.unwrap();
                }
            }
            SchedulerScript::Hang(first) => {
                tx.send(tokens(first)).await.unwrap();
                let abandoned = self.abandoned.clone();
                tokio::spawn(async move {
                    tx.closed().await;
                    abandoned.send_modify(|n| *n += 1);
                });
            }
        }
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn cancel(
        &self,
        request: Request<CancelRequest>,
    ) -> Result<Response<CancelResponse>, Status> {
        let id = request.into_inner().request_id;
        self.cancelled.send_modify(|ids| ids.push(id));
        Ok(Response::new(CancelResponse { found: true }))
    }
}

/// Serves `vision` and `scheduler` on loopback and registers them in `discovery` as
/// `vision-0` and `scheduler-0`; the registrations last as long as the returned value.
pub async fn register(
    discovery: &MemoryDiscovery,
    vision: &FakeVision,
    scheduler: &FakeScheduler,
) -> Vec<Registration> {
    let v = vision.clone().serve().await;
    let s = scheduler.clone().serve().await;
    vec![
        discovery
            .register(Member::new(Role::VisionWorker, "vision-0", v.to_string()))
            .unwrap(),
        discovery
            .register(Member::new(Role::Scheduler, "scheduler-0", s.to_string()))
            .unwrap(),
    ]
}
