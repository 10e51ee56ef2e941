//! The OpenAI-compatible HTTP API: `POST /v1/chat/completions` (whole or as
//! server-sent events), `GET /v1/models`, `GET /v1/models/{model}`, `GET /health` and
//! `GET /metrics` (the process's Prometheus metrics, `tessera_runtime::metrics`).
//!
//! A completion is the gRPC `Generate`/`GenerateStream` call of the same
//! [`TesseraService`]: the body becomes a public `GenerateRequest` and goes through
//! the same checks, planning and scheduler; only the spelling of the answer differs.
//!
//! Before any of that the server bounds what a client can hold ([`Serving`]): a
//! connection must send each request head within the read timeout (which also closes
//! idle keep-alive connections) and its body within the same time again; at most
//! `max_connections` are open at once (more wait in the listen backlog); a body over
//! the size limit is refused as it arrives. Completions must be declared JSON, so a web
//! page cannot start one with a form or a `text/plain` "simple" request. Unknown paths
//! and methods get OpenAI-shaped errors.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use serde_json::{Value, json};
use tessera_proto::v1::generate_stream_response::Event;
use tessera_proto::v1::{GenerateRequest, GenerateStreamResponse, Usage};
use tessera_runtime::shutdown::CancellationToken;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataMap;

use crate::keys::Access;
use crate::model_files::ModelFiles;
use crate::openai::{self, ApiError, ChatRequest, ChunkHeader};
use crate::remote_image::RemoteImages;
use crate::service::{Api, Messages, TesseraService};

/// Server-sent events buffered for a slow client.
const EVENT_BUFFER: usize = 32;

/// How the HTTP server bounds its clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Serving {
    /// Refuse request bodies larger than this (413).
    pub max_body_bytes: usize,
    /// A connection must send each request head within this time of opening or of its
    /// previous response (else it is closed), and then its body within this time again
    /// (else 408).
    pub read_timeout: Duration,
    /// Most connections open at once; more wait in the listen backlog.
    pub max_connections: usize,
}

/// Seconds a client asked to retry later (429, 503) waits first.
const RETRY_AFTER_SECONDS: &str = "1";

/// Pause after a failed accept (e.g. out of file descriptors) before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

#[derive(Clone)]
struct AppState {
    service: TesseraService,
    serving: Serving,
    remote: RemoteImages,
}

/// The HTTP API over `service`, bounding bodies as `serving` says and fetching remote
/// image URLs through `remote`. With API keys required, `/metrics` needs one too
/// unless `open_metrics`; `/health` and the playground's page never do.
pub fn router(
    service: TesseraService,
    serving: Serving,
    remote: RemoteImages,
    open_metrics: bool,
) -> Router {
    let state = AppState {
        service,
        serving,
        remote,
    };
    let mut metrics = tessera_runtime::metrics::router();
    if !open_metrics {
        metrics = metrics.route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            with_key,
        ));
    }
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/v1/models/{*model}", get(model))
        .route("/health", get(health))
        .merge(crate::playground::router())
        .merge(metrics)
        .fallback(unknown_url)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// The admin key check, for `/metrics` (which names the members).
async fn with_key(
    State(state): State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let metadata = MetadataMap::from_headers(request.headers().clone());
    match state.service.authorize(&metadata) {
        Ok(Access::Admin) => next.run(request).await,
        Ok(Access::Client) => ApiError::forbidden("the metrics need an admin key").into_response(),
        Err(status) => ApiError::from_status(&status).into_response(),
    }
}

/// The API key check of a request's headers.
fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    if !state.service.keys_required() {
        return Ok(());
    }
    state
        .service
        .authorize(&MetadataMap::from_headers(headers.clone()))
        .map(drop)
        .map_err(|s| ApiError::from_status(&s))
}

/// Serves `router` on `listener` until `shutdown`, then lets open requests finish,
/// with the connection bounds of `serving`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
    serving: Serving,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(serving.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(serving.read_timeout);
    let mut full = false;
    loop {
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            () = shutdown.cancelled() => break,
        };
        if slots.available_permits() == 0 && !full {
            tracing::warn!(
                limit = serving.max_connections,
                "HTTP connection limit reached: further connections wait until one closes"
            );
        }
        full = slots.available_permits() == 0;
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let connection = http1.serve_connection(
            TokioIo::new(stream),
            TowerToHyperService::new(router.clone()),
        );
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            let _ = connection.await;
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = json_response(status, &self.body());
        if matches!(self.status, 429 | 503) {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECONDS),
            );
        }
        if self.status == 401 {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

async fn unknown_url(method: Method, uri: Uri) -> Response {
    ApiError::unknown_url(method.as_str(), uri.path()).into_response()
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    ApiError::method_not_allowed(method.as_str(), uri.path()).into_response()
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    let mut response = (status, body.to_string()).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn health(State(state): State<AppState>) -> Response {
    if state.service.is_loaded() {
        (StatusCode::OK, "ok").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "loading").into_response()
    }
}

fn model_object(id: &str) -> Value {
    json!({"id": id, "object": "model", "created": 0, "owned_by": "tessera"})
}

async fn models(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&state, &headers) {
        return e.into_response();
    }
    match state.service.model_names() {
        Ok(names) => json_response(
            StatusCode::OK,
            &json!({"object": "list", "data": names.iter().map(|n| model_object(n)).collect::<Vec<_>>()}),
        ),
        Err(status) => ApiError::from_status(&status).into_response(),
    }
}

/// `GET /v1/models/{model}`: the served model, or a 404 naming it.
async fn model(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(asked): Path<String>,
) -> Response {
    if let Err(e) = authorize(&state, &headers) {
        return e.into_response();
    }
    match state.service.model_names() {
        Ok(names) if names.contains(&asked) => json_response(StatusCode::OK, &model_object(&asked)),
        Ok(names) => ApiError::model_not_found(&asked, &names).into_response(),
        Err(status) => ApiError::from_status(&status).into_response(),
    }
}

async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match complete(state, headers, body).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

/// Whether `headers` declare a JSON body (`application/json`, any parameters).
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
}

/// The whole body, refused beyond the size limit or the read timeout.
async fn read_body(body: Body, serving: Serving) -> Result<Bytes, ApiError> {
    let limited = Limited::new(body, serving.max_body_bytes);
    match tokio::time::timeout(serving.read_timeout, limited.collect()).await {
        Err(_) => Err(ApiError::body_timeout(serving.read_timeout.as_secs())),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => {
            Err(ApiError::too_large(serving.max_body_bytes))
        }
        Ok(Err(e)) => Err(ApiError::invalid(
            format!("the request body could not be read: {e}"),
            None,
        )),
    }
}

async fn complete(state: AppState, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    if !is_json(&headers) {
        let declared = headers
            .get(header::CONTENT_TYPE)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        return Err(ApiError::not_json(declared.as_deref()));
    }
    let body = read_body(body, state.serving).await?;
    let chat = ChatRequest::parse(&body)?;
    let names = state
        .service
        .model_names()
        .map_err(|s| ApiError::from_status(&s))?;
    if !names.contains(&chat.model) {
        return Err(ApiError::model_not_found(&chat.model, &names));
    }
    // Answers name the model as the request did (one of the served names).
    let model = chat.model.clone();
    let stream = chat.stream;
    let include_usage = chat.include_usage();
    // The tokenizer that names the tokens of `logprobs`, when they are asked for.
    let tokens = if chat.wants_logprobs() {
        Some(
            state
                .service
                .model_files()
                .map_err(|s| ApiError::from_status(&s))?,
        )
    } else {
        None
    };
    let n = chat.choices();
    let request = chat.into_generate(&state.remote).await?;
    let requests = choice_requests(request, n);
    let metadata = MetadataMap::from_headers(headers);
    let created = unix_seconds();
    if !stream {
        // Every choice runs as its own request, all at once.
        let calls: Vec<_> = requests
            .into_iter()
            .map(|request| {
                let service = state.service.clone();
                let metadata = metadata.clone();
                tokio::spawn(
                    async move { service.generate_call(Api::Http, &metadata, request).await },
                )
            })
            .collect();
        let mut answers = Vec::with_capacity(n);
        for call in calls {
            let response = call
                .await
                .map_err(|e| ApiError::from_status(&tonic::Status::internal(e.to_string())))?
                .map_err(|s| ApiError::from_status(&s))?;
            let logprobs = tokens.as_ref().map_or(Value::Null, |f| {
                openai::logprobs(&response.logprobs, &f.tokenizer)
            });
            answers.push((response, logprobs));
        }
        let body = if n == 1 {
            let (response, logprobs) = answers.pop().expect("one answer");
            openai::completion(&response, &model, created, logprobs)
        } else {
            openai::completions(&answers, &model, created)
        };
        return Ok(json_response(StatusCode::OK, &body));
    }
    let mut streams = Vec::with_capacity(n);
    let mut first_id = None;
    for request in requests {
        // A choice that cannot start fails the whole request; those started are
        // cancelled as their streams drop.
        let (id, messages) = state
            .service
            .stream_call(Api::Http, &metadata, request)
            .await
            .map_err(|s| ApiError::from_status(&s))?;
        first_id.get_or_insert(id);
        streams.push(messages);
    }
    let chunks = ChunkHeader {
        id: format!("chatcmpl-{}", first_id.expect("at least one choice")),
        model,
        created,
    };
    let (tx, rx) = mpsc::channel(EVENT_BUFFER);
    tokio::spawn(events(chunks, merge(streams), tx, include_usage, tokens));
    let mut response = Body::from_stream(ReceiverStream::new(rx)).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(response)
}

/// The requests of `n` choices: the same request, each with its own seed (the client's
/// seed plus the choice's index, so a seeded request is reproducible; without one
/// the server picks a different seed for each).
fn choice_requests(request: GenerateRequest, n: usize) -> Vec<GenerateRequest> {
    (0..n)
        .map(|i| {
            let mut request = request.clone();
            if let Some(seed) = request.sampling.as_mut().and_then(|s| s.seed.as_mut()) {
                *seed = seed.wrapping_add(i as u64);
            }
            request
        })
        .collect()
}

/// One choice's stream message.
type Tagged = (usize, Result<GenerateStreamResponse, tonic::Status>);

/// The messages of every choice's stream in one channel, each with its choice's
/// index; the channel ends when every stream has. Dropping the receiver drops the
/// streams, which cancels their requests.
fn merge(streams: Vec<Messages>) -> mpsc::Receiver<Tagged> {
    let (tx, rx) = mpsc::channel(EVENT_BUFFER);
    for (index, mut messages) in streams.into_iter().enumerate() {
        let tx = tx.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    message = messages.recv() => match message {
                        Some(message) => {
                            if tx.send((index, message)).await.is_err() {
                                return;
                            }
                        }
                        None => return,
                    },
                    () = tx.closed() => return,
                }
            }
        });
    }
    rx
}

fn event(data: &Value) -> Result<String, Infallible> {
    Ok(format!("data: {data}\n\n"))
}

/// Turns the choices' stream messages into server-sent events: each choice's role, its
/// text deltas, its finish reason (with the groundings), then the usage if asked (the
/// prompt once, the answers' tokens summed), then `[DONE]`. When the client goes away
/// `messages` is dropped, which cancels the requests.
async fn events(
    chunks: ChunkHeader,
    mut messages: mpsc::Receiver<Tagged>,
    tx: mpsc::Sender<Result<String, Infallible>>,
    include_usage: bool,
    tokens: Option<Arc<ModelFiles>>,
) {
    let mut roles_sent = std::collections::HashSet::new();
    let mut usage: Option<Usage> = None;
    loop {
        let message = tokio::select! {
            message = messages.recv() => message,
            () = tx.closed() => return,
        };
        let Some((index, message)) = message else {
            break;
        };
        if roles_sent.insert(index) {
            let role = chunks.chunk_of(index, json!({"role": "assistant", "content": ""}), None);
            if tx.send(event(&role)).await.is_err() {
                return;
            }
        }
        let data = match message.map(|m| m.event) {
            Ok(Some(Event::Delta(delta))) => match &tokens {
                // Every token's log probability goes out with the chunk of its ids,
                // whatever text it has yet.
                Some(files) if !delta.logprobs.is_empty() => chunks.chunk_with_logprobs(
                    index,
                    json!({"content": delta.text}),
                    openai::logprobs(&delta.logprobs, &files.tokenizer),
                ),
                _ if delta.text.is_empty() => continue,
                _ => chunks.chunk_of(index, json!({"content": delta.text}), None),
            },
            Ok(Some(Event::Finished(finished))) => {
                let mut delta = json!({});
                if !finished.groundings.is_empty() {
                    delta["groundings"] = openai::groundings(&finished.groundings);
                }
                if let Some(u) = finished.usage {
                    let total = usage.get_or_insert(Usage {
                        completion_tokens: 0,
                        ..u
                    });
                    total.completion_tokens += u.completion_tokens;
                }
                chunks.chunk_of(
                    index,
                    delta,
                    Some(openai::finish_reason(finished.finish_reason)),
                )
            }
            Ok(None) => continue,
            Err(status) => {
                // One choice failed: the error ends the whole stream (and dropping the
                // others' streams cancels them).
                let _ = tx.send(event(&ApiError::from_status(&status).body())).await;
                let _ = tx.send(Ok("data: [DONE]\n\n".to_owned())).await;
                return;
            }
        };
        if tx.send(event(&data)).await.is_err() {
            return;
        }
    }
    if include_usage {
        let last = chunks.usage_chunk(usage.as_ref());
        if tx.send(event(&last)).await.is_err() {
            return;
        }
    }
    let _ = tx.send(Ok("data: [DONE]\n\n".to_owned())).await;
}
