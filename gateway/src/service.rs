//! The public `tessera.v1.Tessera` service: `Generate`, `GenerateStream`,
//! `ModelInfo` and `ClusterStatus`.
//!
//! A generation is prepared (checked, planned, images encoded) and submitted to a
//! scheduler inside the call, so bad input and a missing member fail the call itself;
//! a stream's tokens are then forwarded by a task that stops, and cancels the request
//! on the scheduler, as soon as the client goes away or the request times out. A
//! vision-worker or scheduler that fails is replaced by another one
//! (`crate::failover`), mid-stream too: the client sees one stream.
//! The HTTP API (`crate::http`) calls the same `generate_call` and `stream_call`,
//! which also count every generation in the process's metrics
//! (`crate::metrics::Gateway`): its outcome, time to first token, time
//! per output token, duration and tokens.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tessera_proto::v1::tessera_server::Tessera;
use tessera_proto::v1::{
    ClusterStatusRequest, ClusterStatusResponse, GenerateRequest, GenerateResponse,
    GenerateStreamResponse, ModelInfoRequest, ModelInfoResponse, Usage,
};
use tessera_runtime::Discovery;
use tessera_runtime::metrics;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::cluster::cluster_status;
use crate::cluster::redact;
use crate::config::{Config, Limits};
use crate::error::{Error, Result};
use crate::generation::{Answer, Running, TokenTimes};
use crate::key_limits::{Admitted, KeyLimits};
use crate::keys::{Access, ApiKeys};
use crate::metrics::Gateway;
use crate::model_files::ModelFiles;
use crate::prepare::prepare;
use crate::request::request_id;
use crate::upstream::Upstream;

/// Stream messages buffered for a slow client before the forwarding task waits.
const STREAM_BUFFER: usize = 32;

/// The messages of one streamed generation, as the forwarding task sends them.
pub(crate) type Messages = mpsc::Receiver<Result<GenerateStreamResponse, Status>>;

/// The front-end a generation came through: the `api` label of
/// `tessera_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// The public gRPC API (`tessera.v1.Tessera`).
    Grpc,
    /// The OpenAI-compatible HTTP API.
    Http,
}

impl Api {
    fn label(self) -> &'static str {
        match self {
            Api::Grpc => "grpc",
            Api::Http => "http",
        }
    }
}

/// One generation in the metrics: in flight from its arrival until it is
/// counted with its outcome (`cancelled` if dropped first: the client went away).
struct Call {
    api: Api,
    arrived: Instant,
    counted: bool,
}

impl Call {
    fn start(api: Api) -> Self {
        Gateway::get().in_flight.inc();
        Self {
            api,
            arrived: Instant::now(),
            counted: false,
        }
    }

    fn count(&mut self, code: tonic::Code) {
        self.counted = true;
        Gateway::get().finished(self.api.label(), metrics::outcome(code));
    }

    /// Counts a failure with `status`'s code.
    fn failed(mut self, status: &Status) {
        self.count(status.code());
    }

    /// Counts a success with its usage and its tokens' arrival times.
    fn succeeded(mut self, usage: Option<&Usage>, times: TokenTimes) {
        self.count(tonic::Code::Ok);
        let m = Gateway::get();
        let completion = usage.map_or(0, |u| u.completion_tokens);
        if let Some(usage) = usage {
            m.prompt_tokens.inc_by(u64::from(usage.prompt_tokens));
            m.completion_tokens.inc_by(u64::from(completion));
        }
        let arrived = self.arrived.into_std();
        if let (Some(first), Some(last)) = (times.first, times.last) {
            let to_first = first.saturating_duration_since(arrived);
            m.time_to_first_token.observe(to_first.as_secs_f64());
            if completion >= 2 {
                let decoding = last.saturating_duration_since(first).as_secs_f64();
                let between = decoding / f64::from(completion - 1);
                m.time_per_output_token.observe(between);
            }
        }
        m.request_duration.observe(arrived.elapsed().as_secs_f64());
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if !self.counted {
            self.count(tonic::Code::Cancelled);
        }
        Gateway::get().in_flight.dec();
    }
}

struct Inner {
    files: OnceLock<Arc<ModelFiles>>,
    key_limits: KeyLimits,
    /// `--served-model-name`: empty for the snapshot's own id.
    names: Vec<String>,
    keys: Arc<ApiKeys>,
    upstream: Arc<Upstream>,
    limits: Limits,
    timeout: Duration,
}

/// Serves `tessera.v1.Tessera`; answers UNAVAILABLE until its model files are set.
#[derive(Clone)]
pub struct TesseraService {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for TesseraService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TesseraService")
            .field("loaded", &self.inner.files.get().is_some())
            .field("limits", &self.inner.limits)
            .finish_non_exhaustive()
    }
}

impl TesseraService {
    /// A service with `cfg`'s limits, calling the members of `discovery` and allowing
    /// the callers `keys` allows.
    pub fn new(
        cfg: &Config,
        discovery: Arc<dyn Discovery>,
        keys: Arc<ApiKeys>,
        tls: Option<Arc<tessera_runtime::tls::ClusterTls>>,
    ) -> Self {
        // The families appear on `/metrics` from the start, at zero.
        Gateway::get();
        Self {
            inner: Arc::new(Inner {
                files: OnceLock::new(),
                key_limits: KeyLimits::new(&cfg.auth),
                keys,
                upstream: Arc::new(Upstream::new(discovery, tls)),
                limits: cfg.limits(),
                names: cfg.served_model_names.clone(),
                timeout: Duration::from_secs(cfg.request_timeout_seconds),
            }),
        }
    }

    /// Starts serving generations with `files` (once; later calls are ignored).
    pub fn set_loaded(&self, files: Arc<ModelFiles>) {
        let _ = self.inner.files.set(files);
    }

    /// UNAUTHENTICATED unless `metadata` carries a key the gateway accepts (always
    /// OK without `--api-key-file`).
    pub(crate) fn authorize(&self, metadata: &MetadataMap) -> Result<Access, Status> {
        self.inner.keys.check(metadata).map_err(Status::from)
    }

    /// [`TesseraService::authorize`] for a generation, admitted under its key's limits
    /// (RESOURCE_EXHAUSTED over them); the generation holds the result while it runs.
    fn admit(&self, metadata: &MetadataMap) -> Result<Admitted, Status> {
        let (_, key) = self.inner.keys.caller(metadata).map_err(Status::from)?;
        self.inner
            .key_limits
            .admit(key.as_ref())
            .map_err(Status::from)
    }

    /// Whether calls need an API key.
    pub(crate) fn keys_required(&self) -> bool {
        self.inner.keys.required()
    }

    fn files(&self) -> Result<Arc<ModelFiles>> {
        self.inner.files.get().cloned().ok_or(Error::Loading)
    }

    fn timeout_error(&self) -> Error {
        Error::Timeout(self.inner.timeout.as_secs())
    }

    /// Prepares `request` and submits it, within `deadline`.
    async fn start(
        &self,
        request: GenerateRequest,
        id: String,
        deadline: Instant,
    ) -> Result<(Answer, Running)> {
        let files = self.files()?;
        let inner = &self.inner;
        let work = async {
            let prepared = prepare(&files, &inner.upstream, &inner.limits, request, id).await?;
            let running = Running::submit(&inner.upstream, &files, &prepared).await?;
            Ok((Answer::new(Arc::clone(&files), prepared), running))
        };
        tokio::time::timeout_at(deadline, work)
            .await
            .map_err(|_| self.timeout_error())?
    }

    async fn generate_whole(
        &self,
        request: GenerateRequest,
        id: String,
    ) -> Result<(GenerateResponse, TokenTimes)> {
        let deadline = Instant::now() + self.inner.timeout;
        let (mut answer, mut running) = self.start(request, id, deadline).await?;
        let response = tokio::time::timeout_at(deadline, answer.collect(&mut running))
            .await
            .map_err(|_| self.timeout_error())??;
        tracing::info!(
            finish_reason = response.finish_reason,
            completion_tokens = response.token_ids.len(),
            "generated"
        );
        Ok((response, answer.token_times()))
    }

    /// One whole generation, as both front-ends call it (`api` names which, for the
    /// metrics): the request id from `metadata` or the body, then check, plan,
    /// encode, submit and collect.
    pub(crate) async fn generate_call(
        &self,
        api: Api,
        metadata: &MetadataMap,
        request: GenerateRequest,
    ) -> Result<GenerateResponse, Status> {
        let call = Call::start(api);
        let admitted = match self.admit(metadata) {
            Ok(admitted) => admitted,
            Err(status) => {
                call.failed(&status);
                return Err(status);
            }
        };
        let result = match request_id(metadata, &request.request_id) {
            Ok(id) => {
                let span = tracing::info_span!("generate", request_id = %id);
                async { self.generate_whole(request, id).await.map_err(failed) }
                    .instrument(span)
                    .await
            }
            Err(e) => Err(failed(e)),
        };
        drop(admitted);
        match result {
            Ok((response, times)) => {
                call.succeeded(response.usage.as_ref(), times);
                Ok(response)
            }
            Err(status) => {
                call.failed(&status);
                Err(status)
            }
        }
    }

    /// One streamed generation, as both front-ends call it (`api` names which, for
    /// the metrics): prepared and submitted inside the call, then forwarded by a
    /// task to the returned receiver (dropping it cancels the request). Returns the
    /// request id with the receiver.
    pub(crate) async fn stream_call(
        &self,
        api: Api,
        metadata: &MetadataMap,
        request: GenerateRequest,
    ) -> Result<(String, Messages), Status> {
        let call = Call::start(api);
        let admitted = match self.admit(metadata) {
            Ok(admitted) => admitted,
            Err(status) => {
                call.failed(&status);
                return Err(status);
            }
        };
        let id = match request_id(metadata, &request.request_id) {
            Ok(id) => id,
            Err(e) => {
                let status = failed(e);
                call.failed(&status);
                return Err(status);
            }
        };
        let span = tracing::info_span!("generate_stream", request_id = %id);
        let deadline = Instant::now() + self.inner.timeout;
        let started = self
            .start(request, id.clone(), deadline)
            .instrument(span.clone())
            .await;
        let (answer, running) = match started {
            Ok(started) => started,
            Err(e) => {
                let status = span.in_scope(|| failed(e));
                call.failed(&status);
                return Err(status);
            }
        };
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let stream = Stream {
            _admitted: admitted,
            answer,
            running,
            deadline,
            timeout: self.timeout_error(),
            call,
        };
        tokio::spawn(forward(stream, tx).instrument(span));
        Ok((id, rx))
    }

    /// The names the served model answers to, the reported one first
    /// (`--served-model-name`, else the snapshot's id); UNAVAILABLE while the model
    /// files load.
    pub(crate) fn model_names(&self) -> Result<Vec<String>, Status> {
        let files = self.files()?;
        if self.inner.names.is_empty() {
            Ok(vec![files.model_id()])
        } else {
            Ok(self.inner.names.clone())
        }
    }

    /// The loaded model files (UNAVAILABLE while they load).
    pub(crate) fn model_files(&self) -> Result<Arc<ModelFiles>, Status> {
        Ok(self.files()?)
    }

    /// Whether the model files are loaded and generations are served.
    pub(crate) fn is_loaded(&self) -> bool {
        self.inner.files.get().is_some()
    }
}

/// Logs a failed call and turns it into its status.
fn failed(e: Error) -> Status {
    match &e {
        Error::InvalidArgument(_) => tracing::info!(error = %e, "rejected"),
        _ => tracing::warn!(error = %e, "failed"),
    }
    e.into()
}

/// A submitted stream, as its forwarding task owns it.
struct Stream {
    /// The key's slot, held until the stream ends.
    _admitted: Admitted,
    answer: Answer,
    running: Running,
    deadline: Instant,
    timeout: Error,
    call: Call,
}

/// Forwards a running stream to the client until its end, the client leaving, or
/// the deadline.
async fn forward(stream: Stream, tx: mpsc::Sender<Result<GenerateStreamResponse, Status>>) {
    let Stream {
        _admitted,
        mut answer,
        mut running,
        deadline,
        timeout,
        call,
    } = stream;
    let result = tokio::select! {
        r = answer.stream(&mut running, &tx) => r,
        () = tx.closed() => Err(Error::ClientGone),
        () = tokio::time::sleep_until(deadline) => Err(timeout),
    };
    match result {
        Ok(finished) => {
            tracing::info!(
                finish_reason = finished.finish_reason,
                completion_tokens = finished.usage.as_ref().map_or(0, |u| u.completion_tokens),
                "streamed"
            );
            call.succeeded(finished.usage.as_ref(), answer.token_times());
            let _ = tx.send(Ok(answer.closing(finished))).await;
        }
        Err(Error::ClientGone) => {
            tracing::info!("the client went away");
            // Dropping `call` counts it as cancelled.
        }
        Err(e) => {
            let status = failed(e);
            call.failed(&status);
            let _ = tx.send(Err(status)).await;
        }
    }
    // Dropping an unfinished `running` cancels it on the scheduler.
    drop(running);
}

#[tonic::async_trait]
impl Tessera for TesseraService {
    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<GenerateResponse>, Status> {
        let (metadata, _, request) = request.into_parts();
        self.generate_call(Api::Grpc, &metadata, request)
            .await
            .map(Response::new)
    }

    type GenerateStreamStream = ReceiverStream<Result<GenerateStreamResponse, Status>>;

    async fn generate_stream(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let (metadata, _, request) = request.into_parts();
        let (_, rx) = self.stream_call(Api::Grpc, &metadata, request).await?;
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn model_info(
        &self,
        request: Request<ModelInfoRequest>,
    ) -> Result<Response<ModelInfoResponse>, Status> {
        let access = self.authorize(request.metadata())?;
        let mut info = self.files()?.info();
        if let Some(name) = self.inner.names.first() {
            info.model_id.clone_from(name);
        }
        if access < Access::Admin {
            // Where the snapshot lies is the operator's business.
            info.model_path.clear();
        }
        Ok(Response::new(info))
    }

    async fn cluster_status(
        &self,
        request: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        let access = self.authorize(request.metadata())?;
        let mut status = cluster_status(self.inner.upstream.discovery());
        if access < Access::Admin {
            redact(&mut status);
        }
        Ok(Response::new(status))
    }
}
