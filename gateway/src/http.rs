//! The OpenAI-compatible HTTP API: `POST /v1/chat/completions` (whole or as
//! server-sent events), `GET /v1/models`, `GET /health` and `GET /metrics` (the
//! process's Prometheus metrics, `tessera_runtime::metrics`).
//!
//! A completion is the gRPC `Generate`/`GenerateStream` call of the same
//! [`TesseraService`]: the body becomes a public `GenerateRequest` and goes through
//! the same checks, planning and scheduler; only the spelling of the answer differs.

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tessera_proto::v1::generate_stream_response::Event;
use tessera_runtime::shutdown::CancellationToken;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataMap;

use crate::openai::{self, ApiError, ChatRequest, ChunkHeader};
use crate::remote_image::RemoteImages;
use crate::service::{Api, Messages, TesseraService};

/// Server-sent events buffered for a slow client.
const EVENT_BUFFER: usize = 32;

#[derive(Clone)]
struct AppState {
    service: TesseraService,
    max_body_bytes: usize,
    remote: RemoteImages,
}

/// The HTTP API over `service`, refusing bodies over `max_body_bytes` and fetching
/// remote image URLs through `remote`.
pub fn router(service: TesseraService, max_body_bytes: usize, remote: RemoteImages) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .merge(crate::playground::router())
        .merge(tessera_runtime::metrics::router())
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(AppState {
            service,
            max_body_bytes,
            remote,
        })
}

/// Serves `router` on `listener` until `shutdown`, then lets open requests finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        json_response(status, &self.body())
    }
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

async fn models(State(state): State<AppState>) -> Response {
    match state.service.model_id() {
        Ok(id) => json_response(
            StatusCode::OK,
            &json!({
                "object": "list",
                "data": [{"id": id, "object": "model", "created": 0, "owned_by": "tessera"}],
            }),
        ),
        Err(status) => ApiError::from_status(&status).into_response(),
    }
}

async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match complete(state, headers, body).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn complete(
    state: AppState,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(state.max_body_bytes)
        } else {
            ApiError::invalid(rejection.body_text(), None)
        }
    })?;
    let chat = ChatRequest::parse(&body)?;
    let model = state
        .service
        .model_id()
        .map_err(|s| ApiError::from_status(&s))?;
    if chat.model != model {
        return Err(ApiError::model_not_found(&chat.model, &model));
    }
    let stream = chat.stream;
    let include_usage = chat.include_usage();
    let request = chat.into_generate(&state.remote).await?;
    let metadata = MetadataMap::from_headers(headers);
    let created = unix_seconds();
    if !stream {
        let response = state
            .service
            .generate_call(Api::Http, &metadata, request)
            .await
            .map_err(|s| ApiError::from_status(&s))?;
        return Ok(json_response(
            StatusCode::OK,
            &openai::completion(&response, &model, created),
        ));
    }
    let (id, messages) = state
        .service
        .stream_call(Api::Http, &metadata, request)
        .await
        .map_err(|s| ApiError::from_status(&s))?;
    let chunks = ChunkHeader {
        id: format!("chatcmpl-{id}"),
        model,
        created,
    };
    let (tx, rx) = mpsc::channel(EVENT_BUFFER);
    tokio::spawn(events(chunks, messages, tx, include_usage));
    let mut response = Body::from_stream(ReceiverStream::new(rx)).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(response)
}

fn event(data: &Value) -> Result<String, Infallible> {
    Ok(format!("data: {data}\n\n"))
}

/// Turns the stream's messages into server-sent events: the role, the text deltas,
/// the finish reason (with the groundings), the usage if asked, then `[DONE]`. When
/// the client goes away `messages` is dropped, which cancels the request.
async fn events(
    chunks: ChunkHeader,
    mut messages: Messages,
    tx: mpsc::Sender<Result<String, Infallible>>,
    include_usage: bool,
) {
    let role = chunks.chunk(json!({"role": "assistant", "content": ""}), None);
    if tx.send(event(&role)).await.is_err() {
        return;
    }
    loop {
        let message = tokio::select! {
            message = messages.recv() => message,
            () = tx.closed() => return,
        };
        let Some(message) = message else { break };
        let data = match message.map(|m| m.event) {
            Ok(Some(Event::Delta(delta))) if delta.text.is_empty() => continue,
            Ok(Some(Event::Delta(delta))) => chunks.chunk(json!({"content": delta.text}), None),
            Ok(Some(Event::Finished(finished))) => {
                let mut delta = json!({});
                if !finished.groundings.is_empty() {
                    delta["groundings"] = openai::groundings(&finished.groundings);
                }
                let last = chunks.chunk(delta, Some(openai::finish_reason(finished.finish_reason)));
                if tx.send(event(&last)).await.is_err() {
                    return;
                }
                if !include_usage {
                    continue;
                }
                chunks.usage_chunk(finished.usage.as_ref())
            }
            Ok(None) => continue,
            Err(status) => ApiError::from_status(&status).body(),
        };
        if tx.send(event(&data)).await.is_err() {
            return;
        }
    }
    let _ = tx.send(Ok("data: [DONE]\n\n".to_owned())).await;
}
