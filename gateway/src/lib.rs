//! The gateway: Tessera's public gRPC API (`tessera.v1.Tessera`). It loads no
//! weights — only the snapshot's configurations, tokenizer and fingerprint — and
//! splits each request between a vision-worker (images) and a scheduler (tokens).
//!
//! - [`config`]: the [`Config`] flags and the request [`Limits`]
//! - [`model_files`]: what the gateway reads from a snapshot
//! - [`request`]: checking a public request, conversation → chat messages
//! - [`planning`]: image headers → tilings → the tokenized prompt
//! - [`prepare`]: request → vision-worker → the scheduler's `SubmitRequest`
//! - [`generation`]: the scheduler's token stream → deltas and the closing message
//! - [`detokenize`]: text deltas that concatenate exactly to the answer's text
//! - [`upstream`]: members from discovery, round-robin, cached channels
//! - [`cluster`]: `ClusterStatus` from discovery and the placement
//! - [`service`]: the gRPC service
//! - [`openai`]: OpenAI's chat-completions shapes ⇄ the public request and answer
//! - [`http`]: the OpenAI-compatible HTTP API over the same service
//! - [`remote_image`]: fetching `http(s)` image URLs of the HTTP API, when allowed
//! - [`playground`]: the web playground the HTTP API serves at `/`
//! - [`error`]: the crate's one error type and its gRPC status
//! - [`run`], [`run_with`]: serve on a listener (and HTTP), register in discovery,
//!   drain on shutdown

pub mod cluster;
pub mod config;
pub mod detokenize;
pub mod error;
pub mod generation;
pub mod http;
pub mod model_files;
pub mod openai;
pub mod planning;
pub mod playground;
pub mod prepare;
pub mod remote_image;
pub mod request;
pub mod service;
pub mod upstream;

use std::sync::Arc;
use std::time::Duration;

use tessera_proto::MAX_MESSAGE_BYTES;
use tessera_proto::v1::tessera_server::TesseraServer;
use tessera_runtime::discovery::check_same_model;
use tessera_runtime::metrics::Endpoint;
use tessera_runtime::shutdown::CancellationToken;
use tessera_runtime::{Discovery, Member, Role, serving};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;

pub use config::{Config, Limits};
pub use error::{Error, Result};
pub use model_files::ModelFiles;
pub use remote_image::{RemoteImageConfig, RemoteImages};
pub use service::TesseraService;

/// The generated server around [`TesseraService`], with the raised message limits.
pub fn server(service: TesseraService) -> TesseraServer<TesseraService> {
    TesseraServer::new(service)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
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
/// The server answers at once (UNAVAILABLE and health NOT_SERVING while the model
/// files load on a blocking thread); once loaded it reports SERVING and registers as
/// [`Role::Gateway`] in `discovery`. On `shutdown` it reports NOT_SERVING,
/// deregisters, stops accepting calls and drains in-flight ones (gRPC and HTTP) for
/// at most `cfg.grace_seconds`. With `cfg.metrics` it also serves `GET /metrics` and
/// `GET /health` there until it returns. Configuration and load errors are returned.
pub async fn run_with(
    cfg: Config,
    listener: TcpListener,
    http_listener: Option<TcpListener>,
    discovery: Arc<dyn Discovery>,
    shutdown: CancellationToken,
) -> Result<()> {
    cfg.validate()?;
    let remote = RemoteImages::new(&cfg.remote_images, cfg.max_images)?;
    let local = listener.local_addr().map_err(Error::Listener)?;
    let advertise = cfg.advertise.clone().unwrap_or_else(|| local.to_string());
    let id = cfg
        .id
        .clone()
        .unwrap_or_else(|| format!("{}-{advertise}", Role::Gateway));
    let service = TesseraService::new(&cfg, discovery.clone());
    let (health, health_server) = serving::health::<TesseraServer<TesseraService>>().await;
    let _metrics = Endpoint::start_for(cfg.metrics, &health)
        .await
        .map_err(Error::Metrics)?;

    let stop_serving = CancellationToken::new();
    let mut server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health_server)
            .add_service(serving::reflection())
            .add_service(server(service.clone()))
            .serve_with_incoming_shutdown(
                TcpIncoming::from(listener).with_nodelay(Some(true)),
                stop_serving.clone().cancelled_owned(),
            ),
    );
    let http = match http_listener {
        Some(listener) => {
            let address = listener.local_addr().map_err(Error::Listener)?;
            let router = http::router(service.clone(), cfg.http_max_body_bytes, remote);
            tracing::info!(%address, "gateway HTTP API listening");
            Some(tokio::spawn(http::serve(
                listener,
                router,
                stop_serving.clone(),
            )))
        }
        None => None,
    };
    tracing::info!(%id, address = %local, model = %cfg.model.display(), "gateway loading");

    let dir = cfg.model.clone();
    let loading = tokio::task::spawn_blocking(move || ModelFiles::load(&dir));
    let files = tokio::select! {
        loaded = loading => loaded.map_err(Error::Join).and_then(|r| r),
        () = shutdown.cancelled() => {
            stop_serving.cancel();
            return finish(server, http, Duration::ZERO).await;
        }
    };
    let files = match files {
        Ok(files) => Arc::new(files),
        Err(e) => {
            stop_serving.cancel();
            server.abort();
            if let Some(http) = &http {
                http.abort();
            }
            return Err(e);
        }
    };
    tracing::info!(fingerprint = %files.fingerprint, "gateway model files loaded");
    let fingerprint = files.fingerprint.clone();
    check_same_model(&discovery.members(), &fingerprint).map_err(Error::Register)?;
    service.set_loaded(files);
    health.serving::<TesseraServer<TesseraService>>().await;
    let registration = discovery
        .register(Member::new(Role::Gateway, id, advertise).with_fingerprint(fingerprint))
        .map_err(Error::Register)?;
    tracing::info!("gateway serving");

    tokio::select! {
        () = shutdown.cancelled() => {}
        ended = &mut server => {
            // The server stopped on its own: a transport failure.
            drop(registration);
            if let Some(http) = &http {
                http.abort();
            }
            return ended.map_err(Error::Join)?.map_err(Error::Transport);
        }
    }
    tracing::info!(grace_seconds = cfg.grace_seconds, "gateway draining");
    health.not_serving::<TesseraServer<TesseraService>>().await;
    drop(registration);
    stop_serving.cancel();
    finish(server, http, Duration::from_secs(cfg.grace_seconds)).await
}

/// Waits at most `grace` for the stopped servers to drain their calls.
async fn finish(
    mut server: JoinHandle<Result<(), tonic::transport::Error>>,
    http: Option<JoinHandle<std::io::Result<()>>>,
    grace: Duration,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + grace;
    let grpc = match tokio::time::timeout_at(deadline, &mut server).await {
        Ok(ended) => ended.map_err(Error::Join)?.map_err(Error::Transport),
        Err(_) => {
            tracing::warn!("in-flight calls did not finish within the grace period");
            server.abort();
            Ok(())
        }
    };
    let Some(mut http) = http else {
        return grpc;
    };
    let http = match tokio::time::timeout_at(deadline, &mut http).await {
        Ok(ended) => ended.map_err(Error::Join)?.map_err(Error::Http),
        Err(_) => {
            tracing::warn!("in-flight HTTP requests did not finish within the grace period");
            http.abort();
            Ok(())
        }
    };
    grpc.and(http)
}
