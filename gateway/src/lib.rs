//! The gateway: Tessera's public gRPC API (`tessera.v1.Tessera`). It loads no
//! weights — only the snapshot's configurations, tokenizer and fingerprint — and
//! splits each request between a vision-worker (images) and a scheduler (tokens).
//!
//! - [`config`]: the [`Config`] flags and the request [`Limits`]
//! - [`model_files`]: what the gateway reads from a snapshot
//! - [`request`]: checking a public request, conversation → chat messages
//! - [`planning`]: image headers → tilings → the tokenized prompt
//! - [`prepare`]: request → vision-worker → the scheduler's `SubmitRequest`
//! - [`generation`]: the scheduler's token stream → deltas and the closing message;
//!   a scheduler that fails mid-stream is replaced by another one
//! - [`failover`]: retrying a failed member's call on another one, and the request
//!   that resumes a generation on another scheduler
//! - [`detokenize`]: text deltas that concatenate exactly to the answer's text
//! - [`upstream`]: members from discovery, round-robin (skipping failed ones),
//!   cached channels
//! - [`cluster`]: `ClusterStatus` from discovery and the placement
//! - [`service`]: the gRPC service
//! - [`openai`]: OpenAI's chat-completions shapes ⇄ the public request and answer
//! - [`http`]: the OpenAI-compatible HTTP API over the same service
//! - [`remote_image`]: fetching `http(s)` image URLs of the HTTP API, when allowed
//! - [`playground`]: the web playground the HTTP API serves at `/`
//! - [`metrics`]: the gateway's Prometheus families
//! - [`error`]: the crate's one error type and its gRPC status
//! - [`run`], [`run_with`]: the member lifecycle (`tessera_runtime::member`)
//!   around the service, with the HTTP API beside gRPC

pub mod cluster;
pub mod config;
pub mod detokenize;
pub mod error;
pub mod failover;
pub mod generation;
pub mod http;
pub mod key_limits;
pub mod keys;
pub mod metrics;
pub mod model_files;
pub mod openai;
pub mod planning;
pub mod playground;
pub mod prepare;
pub mod remote_image;
pub mod request;
pub mod service;
pub mod upstream;

use std::sync::{Arc, Mutex, PoisonError};

use tessera_proto::MAX_MESSAGE_BYTES;
use tessera_proto::v1::tessera_server::TesseraServer;
use tessera_runtime::member::{self, Context, Grpc, Readiness, SideServer};
use tessera_runtime::shutdown::CancellationToken;
use tessera_runtime::{Discovery, Role};
use tokio::net::TcpListener;

pub use config::{ClientAuth, Config, Limits, PublicLimits};
pub use error::{Error, Result};
pub use keys::ApiKeys;
pub use model_files::ModelFiles;
pub use remote_image::{RemoteImageConfig, RemoteImages};
pub use service::TesseraService;

/// The generated server around [`TesseraService`], refusing requests over
/// `max_request_bytes` (`--max-request-bytes`) from their announced length.
pub fn server(service: TesseraService, max_request_bytes: usize) -> TesseraServer<TesseraService> {
    TesseraServer::new(service)
        .max_decoding_message_size(max_request_bytes)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// Serves the gateway on `listener` until `shutdown`, and the OpenAI-compatible
/// HTTP API on `cfg.http` when it is set (see [`run_with`]).
pub async fn run(
    cfg: Config,
    listener: TcpListener,
    discovery: Arc<dyn Discovery>,
    shutdown: CancellationToken,
) -> Result<()> {
    let http_listener = match cfg.http {
        Some(addr) => Some(TcpListener::bind(addr).await.map_err(Error::Listener)?),
        None => None,
    };
    run_with(cfg, listener, http_listener, discovery, shutdown).await
}

/// Serves the gateway on `listener` until `shutdown`, and the HTTP API on
/// `http_listener` when given (`cfg.http` is not read).
///
/// The member lifecycle (`tessera_runtime::member`): both APIs answer at once
/// (UNAVAILABLE, health NOT_SERVING, HTTP 503, while the model files load on a
/// blocking thread); once loaded the gateway reports SERVING and registers as
/// [`Role::Gateway`]. On `shutdown` it reports NOT_SERVING, deregisters, stops
/// accepting and drains in-flight calls (gRPC and HTTP) for at most the grace
/// period. Configuration and load errors are returned.
pub async fn run_with(
    cfg: Config,
    listener: TcpListener,
    http_listener: Option<TcpListener>,
    discovery: Arc<dyn Discovery>,
    shutdown: CancellationToken,
) -> Result<()> {
    cfg.validate()?;
    let remote = RemoteImages::new(&cfg.remote_images, cfg.max_images)?;
    let keys = ApiKeys::from_file(cfg.auth.api_key_file.as_deref())?;
    let tls = cfg.member.tls.load().map_err(|e| Error::Member(e.into()))?;
    if !keys.required() {
        let open = [
            listener.local_addr().ok(),
            http_listener.as_ref().and_then(|l| l.local_addr().ok()),
        ];
        if let Some(addr) = open.into_iter().flatten().find(|a| !a.ip().is_loopback()) {
            tracing::warn!(
                %addr,
                "the public API is reachable beyond this machine without API keys; \
                 anyone who reaches it can use it (see --api-key-file)"
            );
        }
    }
    tokio::spawn(Arc::clone(&keys).watch(shutdown.clone()));
    let gateway = Gateway {
        service: TesseraService::new(&cfg, discovery.clone(), keys, tls),
        http: Mutex::new(http_listener.map(|l| (l, remote))),
        cfg: cfg.clone(),
    };
    member::run(gateway, &cfg.member, listener, discovery, shutdown).await
}

/// The gateway as the member lifecycle drives it.
struct Gateway {
    cfg: Config,
    service: TesseraService,
    /// The HTTP API's listener and remote-image fetcher, taken when it starts.
    http: Mutex<Option<(TcpListener, RemoteImages)>>,
}

impl member::Service for Gateway {
    type Loaded = Arc<ModelFiles>;
    type Error = Error;
    const ROLE: Role = Role::Gateway;
    const PUBLIC: bool = true;

    fn grpc(&self) -> Grpc {
        Grpc::new(server(
            self.service.clone(),
            self.cfg.public_limits.max_request_bytes,
        ))
    }

    fn side_servers(&self, stop: &CancellationToken) -> Result<Vec<SideServer>> {
        let taken = self
            .http
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some((listener, remote)) = taken else {
            return Ok(Vec::new());
        };
        let address = listener.local_addr().map_err(Error::Listener)?;
        let serving = self.cfg.public_limits.serving();
        let router = http::router(
            self.service.clone(),
            serving,
            remote,
            self.cfg.auth.open_metrics,
        );
        tracing::info!(%address, "gateway HTTP API listening");
        Ok(vec![SideServer {
            name: "HTTP",
            task: tokio::spawn(http::serve(listener, router, stop.clone(), serving)),
        }])
    }

    /// Reads the snapshot's configs, tokenizer and fingerprint (no weights).
    async fn load(&self, _: &Context) -> Result<Arc<ModelFiles>> {
        let dir = self.cfg.member.model_dir().to_path_buf();
        let files = tokio::task::spawn_blocking(move || ModelFiles::load(&dir))
            .await
            .map_err(Error::Join)??;
        Ok(Arc::new(files))
    }

    fn fingerprint(files: &Arc<ModelFiles>) -> String {
        files.fingerprint.clone()
    }

    async fn start(&self, files: Arc<ModelFiles>, _: &Context) -> Result<Readiness> {
        self.service.set_loaded(files);
        Ok(Readiness::Serving)
    }
}
