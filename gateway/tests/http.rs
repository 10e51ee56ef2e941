//! The OpenAI-compatible HTTP API between a fake vision-worker and a fake
//! scheduler: the same answers as gRPC (whole and streamed), `/v1/models`,
//! `/health`, and OpenAI-shaped errors after which the server keeps serving.

#[allow(dead_code)] // each test binary uses a different subset of the helpers
mod common;
#[allow(dead_code)]
mod fakes;
#[allow(dead_code)]
mod openai_http;

use axum::body::Bytes;
use axum::http::{Method, Request, header};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use common::*;
use fakes::SchedulerScript;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use openai_http::*;
use serde_json::{Value, json};
use tessera_model::chat::ChatTokenizer;
use tessera_proto::internal::v1::StopReason;
use tonic::{Code, Status};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_is_the_grpc_answer() {
    let cluster = cluster().await;
    let (status, body) = cluster.chat(&ask_body("Say something.")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert!(body["created"].as_u64().unwrap() > 0);
    assert_eq!(body["model"], FIXTURE);
    let choice = &body["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["finish_reason"], "length");
    assert_eq!(choice["message"]["groundings"], json!([]));

    let grpc = cluster
        .gateway
        .client()
        .await
        .generate(with_max_tokens(
            tessera_proto::v1::GenerateRequest {
                messages: vec![
                    message(tessera_proto::v1::Role::System, vec![text("Be brief.")]),
                    message(tessera_proto::v1::Role::User, vec![text("Say something.")]),
                ],
                ..Default::default()
            },
            64,
        ))
        .await
        .unwrap()
        .into_inner();
    let usage = grpc.usage.unwrap();
    assert_eq!(choice["message"]["content"], grpc.text.as_str());
    assert_eq!(grpc.text, ANSWER);
    assert_eq!(body["usage"]["prompt_tokens"], usage.prompt_tokens);
    assert_eq!(body["usage"]["completion_tokens"], usage.completion_tokens);
    assert_eq!(
        body["usage"]["total_tokens"],
        usage.prompt_tokens + usage.completion_tokens
    );

    // An x-request-id header names the completion, as the gRPC metadata does.
    let request = Request::builder()
        .method(Method::POST)
        .uri(format!("http://{}/v1/chat/completions", cluster.http))
        .header(header::CONTENT_TYPE, "application/json")
        .header("x-request-id", "http-1")
        .body(Full::new(Bytes::from(ask_body("Hi.").to_string())))
        .unwrap();
    let response = cluster.client.request(request).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["id"], "chatcmpl-http-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_is_chunks_of_the_same_text_then_done() {
    let cluster = cluster().await;
    let mut body = ask_body("Say something.");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let (status, kind, events) = cluster
        .call(
            Method::POST,
            "/v1/chat/completions",
            body.to_string().into_bytes(),
        )
        .await;
    assert_eq!(status, 200, "{events}");
    assert_eq!(kind, "text/event-stream");
    let chunks = sse_chunks(&events);
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    let id = &chunks[0]["id"];
    assert!(chunks.iter().all(|c| &c["id"] == id));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, ANSWER);
    let with_choices: Vec<&Value> = chunks
        .iter()
        .filter(|c| !c["choices"].as_array().unwrap().is_empty())
        .collect();
    let (last, before) = with_choices.split_last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    assert!(
        before
            .iter()
            .all(|c| c["choices"][0]["finish_reason"].is_null())
    );
    let usage = &chunks.last().unwrap()["usage"];
    let (_, whole) = cluster.chat(&ask_body("Say something.")).await;
    assert_eq!(usage, &whole["usage"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_health_and_images() {
    let cluster = cluster().await;
    let (status, _, body) = cluster.call(Method::GET, "/v1/models", Vec::new()).await;
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        models,
        json!({"object": "list", "data": [
            {"id": FIXTURE, "object": "model", "created": 0, "owned_by": "tessera"}
        ]})
    );
    let (status, _, body) = cluster.call(Method::GET, "/health", Vec::new()).await;
    assert_eq!((status, body.as_str()), (200, "ok"));

    let png = STANDARD.encode(png(64, 48));
    let (status, body) = cluster
        .chat(&image_body(&format!("data:image/png;base64,{png}")))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], ANSWER);
    assert_eq!(cluster.vision.calls.lock().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_openai_errors_and_the_server_keeps_serving() {
    let cluster = cluster().await;

    let (status, body) = cluster.chat_raw(b"{\"model\": ".to_vec()).await;
    assert_eq!(status, 400);
    error_message(&body, "invalid_request_error");
    cluster.still_serves().await;

    let mut other = ask_body("Hi.");
    other["model"] = json!("gpt-4o");
    let (status, body) = cluster.chat(&other).await;
    assert_eq!(status, 404);
    error_message(&body, "invalid_request_error");
    assert_eq!(body["error"]["code"], "model_not_found");
    cluster.still_serves().await;

    let not_png = STANDARD.encode(b"this is not an image");
    let (status, body) = cluster
        .chat(&image_body(&format!("data:image/png;base64,{not_png}")))
        .await;
    assert_eq!(status, 400, "{body}");
    let message = error_message(&body, "invalid_request_error");
    assert!(message.contains("image"), "{message}");
    let (status, body) = cluster
        .chat(&image_body(&format!("data:text/plain;base64,{not_png}")))
        .await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = cluster
        .chat(&image_body("data:image/png;base64,not base64!"))
        .await;
    assert_eq!(status, 400, "{body}");
    cluster.still_serves().await;

    let (status, body) = cluster
        .chat(&image_body("http://example.com/cat.png"))
        .await;
    assert_eq!(status, 400);
    let message = error_message(&body, "invalid_request_error");
    assert!(
        message.contains("remote image URLs are not enabled"),
        "{message}"
    );
    cluster.still_serves().await;

    let mut zero = ask_body("Hi.");
    zero["max_tokens"] = json!(0);
    let (status, body) = cluster.chat(&zero).await;
    assert_eq!(status, 400, "{body}");
    error_message(&body, "invalid_request_error");

    let mut big = ask_body(&"x".repeat(2 * MAX_BODY));
    big["stream"] = json!(true);
    let (status, body) = cluster.chat(&big).await;
    assert_eq!(status, 413);
    error_message(&body, "invalid_request_error");
    cluster.still_serves().await;
    assert!(cluster.vision.calls.lock().unwrap().is_empty());
}

/// Completions must be declared JSON (so a web page's form or `text/plain` request
/// cannot start one); unknown paths and methods are OpenAI-shaped errors; a model is
/// found by its id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_json_completions_and_known_paths_are_served() {
    let cluster = cluster().await;
    let body = ask_body("Hi.").to_string().into_bytes();
    let path = "/v1/chat/completions";
    for kind in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        None,
    ] {
        let (status, _, answer) = cluster
            .call_as(Method::POST, path, kind, body.clone())
            .await;
        assert_eq!(status, 415, "{kind:?}: {answer}");
        let answer: Value = serde_json::from_str(&answer).unwrap();
        error_message(&answer, "invalid_request_error");
        assert_eq!(answer["error"]["code"], "unsupported_media_type");
    }
    let (status, _, answer) = cluster
        .call_as(
            Method::POST,
            path,
            Some("Application/JSON; charset=utf-8"),
            body,
        )
        .await;
    assert_eq!(status, 200, "{answer}");

    for (method, path, status, code) in [
        (Method::POST, "/v1/completions", 404, "unknown_url"),
        (Method::POST, "/v1/embeddings", 404, "unknown_url"),
        (Method::GET, "/nothing/here", 404, "unknown_url"),
        (
            Method::GET,
            "/v1/chat/completions",
            405,
            "method_not_allowed",
        ),
        (Method::DELETE, "/v1/models", 405, "method_not_allowed"),
        (Method::GET, "/v1/models/gpt-4o", 404, "model_not_found"),
    ] {
        let (got, kind, answer) = cluster.call(method.clone(), path, Vec::new()).await;
        assert_eq!(got, status, "{method} {path}: {answer}");
        assert_eq!(kind, "application/json", "{method} {path}");
        let answer: Value = serde_json::from_str(&answer).unwrap();
        let message = error_message(&answer, "invalid_request_error");
        assert_eq!(answer["error"]["code"], code, "{method} {path}");
        assert!(
            message.contains(path) || code == "model_not_found",
            "{message}"
        );
    }
    let (status, _, answer) = cluster
        .call(Method::GET, &format!("/v1/models/{FIXTURE}"), Vec::new())
        .await;
    assert_eq!(status, 200, "{answer}");
    let answer: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(answer["id"], FIXTURE);
    assert_eq!(answer["object"], "model");
    cluster.still_serves().await;
}

/// A gateway whose HTTP server closes connections after `read_timeout` seconds
/// without a request head and holds at most `max_connections`.
async fn bounded_cluster(read_timeout: u64, max_connections: usize) -> Cluster {
    let (mut cluster, _) = cluster_configured(answer_script(), |cfg| {
        cfg.public_limits.http_read_timeout_seconds = read_timeout;
        cfg.public_limits.http_max_connections = max_connections;
    })
    .await;
    // No pooled connections: the server closes idle ones after the short read
    // timeout, and a pooled one could be reused just as it closes.
    cluster.client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http();
    cluster
}

/// Reads until the server closes `stream`, within the tests' deadline; returns what
/// it sent first.
async fn until_closed(stream: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut got))
        .await
        .expect("the server closes the connection in time")
        .ok();
    String::from_utf8_lossy(&got).into_owned()
}

/// Connections that send nothing, or half a head, are closed after the read timeout;
/// while they hold every slot a good request waits, and is answered once they are
/// reaped; a body that stops arriving is a 408.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_clients_are_closed_and_the_connection_limit_holds() {
    use tokio::io::AsyncWriteExt;
    let cluster = bounded_cluster(1, 3).await;
    let mut idle = Vec::new();
    for i in 0..3 {
        let mut stream = tokio::net::TcpStream::connect(cluster.http).await.unwrap();
        if i == 1 {
            // Half a request head, never finished.
            stream
                .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
                .await
                .unwrap();
        }
        idle.push(stream);
    }
    // Every slot is held: this request is accepted only once an idle one is closed.
    let good = tokio::spawn({
        let client = cluster.client.clone();
        let uri = format!("http://{}/v1/chat/completions", cluster.http);
        async move {
            let request = Request::builder()
                .method(Method::POST)
                .uri(uri)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(ask_body("Hi.").to_string())))
                .unwrap();
            let response = client.request(request).await.unwrap();
            let status = response.status().as_u16();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8(body.to_vec()).unwrap())
        }
    });
    for stream in &mut idle {
        until_closed(stream).await;
    }
    let (status, body) = tokio::time::timeout(DEADLINE, good)
        .await
        .expect("the waiting request is answered in time")
        .unwrap();
    assert_eq!(status, 200, "{body}");

    // A body announced but never sent: 408 after the read timeout.
    let mut slow = tokio::net::TcpStream::connect(cluster.http).await.unwrap();
    slow.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Content-Length: 1000\r\n\r\n{\"model\": ",
    )
    .await
    .unwrap();
    let answer = until_closed(&mut slow).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    cluster.still_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_statuses_become_http_statuses() {
    // An UNAVAILABLE scheduler is tried once more elsewhere; with none other, the
    // message names it.
    let unserved = "no scheduler could serve the request (scheduler-0 failed; the last: \
                    scheduler: Unavailable: busy)";
    for (code, status, kind, message) in [
        (
            Code::ResourceExhausted,
            429,
            "rate_limit_error",
            "scheduler: busy",
        ),
        (Code::Unavailable, 503, "service_unavailable", unserved),
        (Code::Internal, 500, "server_error", "scheduler: busy"),
    ] {
        let cluster = cluster_with(SchedulerScript::Fail(Status::new(code, "busy"))).await;
        let request = Request::builder()
            .method(Method::POST)
            .uri(format!("http://{}/v1/chat/completions", cluster.http))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(ask_body("Hi.").to_string())))
            .unwrap();
        let response = cluster.client.request(request).await.unwrap();
        let retry = response.headers().get(header::RETRY_AFTER).cloned();
        assert_eq!(
            retry.is_some(),
            status != 500,
            "Retry-After on {status}: {retry:?}"
        );
        let (got, body) = cluster.chat(&ask_body("Hi.")).await;
        assert_eq!(got, status, "{body}");
        assert_eq!(error_message(&body, kind), message);
        let mut streamed = ask_body("Hi.");
        streamed["stream"] = json!(true);
        let (got, _) = cluster.chat(&streamed).await;
        assert_eq!(got, status);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_a_stream_cancels_the_request() {
    let tok = ChatTokenizer::from_dir(&fixture(FIXTURE)).unwrap();
    let first = tok.encode("Il fait").unwrap();
    let (cluster, scheduler) = cluster_and_scheduler(SchedulerScript::Hang(first)).await;
    let mut body = ask_body("Say something.");
    body["stream"] = json!(true);
    let request = Request::builder()
        .method(Method::POST)
        .uri(format!("http://{}/v1/chat/completions", cluster.http))
        .header(header::CONTENT_TYPE, "application/json")
        .header("x-request-id", "leaving-1")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let response = cluster.client.request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut seen = String::new();
    while !seen.contains("\"content\":\"Il") {
        let frame = tokio::time::timeout(DEADLINE, body.frame())
            .await
            .expect("a chunk in time")
            .unwrap()
            .unwrap();
        if let Ok(data) = frame.into_data() {
            seen.push_str(std::str::from_utf8(&data).unwrap());
        }
    }
    drop(body);
    let mut cancelled = scheduler.cancelled.subscribe();
    tokio::time::timeout(
        DEADLINE,
        cancelled.wait_for(|ids| ids.iter().any(|id| id.starts_with("leaving-1~"))),
    )
    .await
    .expect("the request is cancelled on the scheduler")
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_the_http_server_too() {
    let cluster = cluster().await;
    cluster.still_serves().await;
    cluster.gateway.shutdown.cancel();
    let Cluster { gateway, http, .. } = cluster;
    tokio::time::timeout(DEADLINE, gateway.task)
        .await
        .expect("the gateway stops in time")
        .unwrap()
        .unwrap();
    assert!(tokio::net::TcpStream::connect(http).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_playground_is_served_at_the_root() {
    let cluster = cluster().await;
    let mut tags = Vec::new();
    for (path, kind, needle) in [
        (
            "/",
            "text/html; charset=utf-8",
            r#"<script src="/playground.js""#,
        ),
        (
            "/playground.js",
            "text/javascript; charset=utf-8",
            "/v1/chat/completions",
        ),
        ("/playground.css", "text/css; charset=utf-8", ".box"),
    ] {
        let request = Request::builder()
            .uri(format!("http://{}{path}", cluster.http))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = cluster.client.request(request).await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        let headers = response.headers().clone();
        assert_eq!(headers[header::CONTENT_TYPE], kind, "{path}");
        assert_eq!(headers[header::CACHE_CONTROL], "no-cache", "{path}");
        let csp = headers[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
        assert!(csp.contains("connect-src 'self'"), "{csp}");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert!(String::from_utf8_lossy(&body).contains(needle), "{path}");

        // A browser that has the file revalidates and gets a 304 without a body.
        let etag = headers[header::ETAG].clone();
        let request = Request::builder()
            .uri(format!("http://{}{path}", cluster.http))
            .header(header::IF_NONE_MATCH, etag.clone())
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = cluster.client.request(request).await.unwrap();
        assert_eq!(response.status(), 304, "{path}");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert!(body.is_empty());
        tags.push(etag);
    }
    tags.dedup();
    assert_eq!(tags.len(), 3, "each file has its own entity tag");
    let (status, _, _) = cluster.call(Method::GET, "/nothing-here", Vec::new()).await;
    assert_eq!(status, 404);
}

/// An answer with grounding markup for the 640×480 fixture image: the red rectangle,
/// the blue circle, and two boxes for the shapes at the bottom.
const GROUNDED_ANSWER: &str = "<|ref|>The red rectangle<|/ref|><|det|>[[62, 125, 409, \
    458]]<|/det|> is left of <|ref|>the blue circle<|/ref|><|det|>[[515, 187, 827, \
    604]]<|/det|>; below them are <|ref|>a triangle and text<|/ref|><|det|>[[156, 583, \
    531, 899], [593, 687, 971, 911]]<|/det|>.";
/// The whole response the playground's browser test renders, recorded from this
/// gateway; `TESSERA_RECORD=1` writes it anew.
const RECORDED: &str = "../tests/fixtures/playground/grounding_response.json";

fn grounded_request() -> Value {
    let png = STANDARD.encode(fixture_image(FIXTURE, "img_640x480.png"));
    json!({
        "model": FIXTURE,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{png}")}},
            {"type": "text", "text": "\n<|grounding|>Where are the shapes?"},
        ]}],
        "max_tokens": 64,
    })
}

impl Cluster {
    /// POSTs a completion named `id` (its `x-request-id`); the status and the body.
    async fn chat_named(&self, body: &Value, id: &str) -> (u16, String) {
        let request = Request::builder()
            .method(Method::POST)
            .uri(format!("http://{}/v1/chat/completions", self.http))
            .header(header::CONTENT_TYPE, "application/json")
            .header("x-request-id", id)
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let response = tokio::time::timeout(DEADLINE, self.client.request(request))
            .await
            .expect("an answer in time")
            .unwrap();
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_recorded_grounding_response_is_what_the_gateway_answers() {
    let tok = ChatTokenizer::from_dir(&fixture(FIXTURE)).unwrap();
    let mut ids = tok.encode(GROUNDED_ANSWER).unwrap();
    ids.push(tok.special().eos);
    let batches = ids.chunks(4).map(<[u32]>::to_vec).collect();
    let script = SchedulerScript::Tokens(batches, StopReason::Eos);
    let (cluster, _) = cluster_with_limit(script, 4 << 20).await;
    let (status, text) = cluster
        .chat_named(&grounded_request(), "playground-grounding")
        .await;
    assert_eq!(status, 200, "{text}");
    let mut answer: Value = serde_json::from_str(&text).unwrap();
    let message = &answer["choices"][0]["message"];
    assert_eq!(message["content"], GROUNDED_ANSWER);
    // Boxes in pixels of the 640×480 image: int(v / 999 · size).
    assert_eq!(
        message["groundings"][0],
        json!({"label": "The red rectangle", "image_index": 0,
               "boxes": [{"x1": 39, "y1": 60, "x2": 262, "y2": 220}]})
    );
    assert_eq!(
        message["groundings"][2]["boxes"].as_array().unwrap().len(),
        2
    );

    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(RECORDED);
    answer["created"] = json!(0);
    if std::env::var_os("TESSERA_RECORD").is_some() {
        let pretty = serde_json::to_string_pretty(&answer).unwrap();
        std::fs::write(&path, pretty + "\n").unwrap();
    }
    let recorded: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .expect("the recorded response is JSON");
    assert_eq!(
        answer, recorded,
        "the gateway's answer differs from {RECORDED}; if the change is intended, \
         record it anew with TESSERA_RECORD=1"
    );

    // A stream carries the same groundings in the delta of its finishing chunk.
    let mut streamed = grounded_request();
    streamed["stream"] = json!(true);
    let (status, events) = cluster.chat_named(&streamed, "playground-stream").await;
    assert_eq!(status, 200, "{events}");
    let chunks: Vec<Value> = events
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, GROUNDED_ANSWER);
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        last["choices"][0]["delta"]["groundings"],
        recorded["choices"][0]["message"]["groundings"]
    );
    assert!(
        chunks[..chunks.len() - 1]
            .iter()
            .all(|c| c["choices"][0]["delta"].get("groundings").is_none())
    );
}
