//! The OpenAI-compatible HTTP API between a fake vision-worker and a fake
//! scheduler: the same answers as gRPC (whole and streamed), `/v1/models`,
//! `/health`, and OpenAI-shaped errors after which the server keeps serving.

#[allow(dead_code)] // each test binary uses a different subset of the helpers
mod common;
#[allow(dead_code)]
mod fakes;

use std::net::SocketAddr;

use axum::body::Bytes;
use axum::http::{Method, Request, header};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use common::*;
use fakes::{FakeScheduler, FakeVision, SchedulerScript, VisionScript};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tessera_gateway::Config;
use tessera_model::chat::ChatTokenizer;
use tessera_proto::internal::v1::StopReason;
use tessera_proto::v1::ModelInfoRequest;
use tessera_runtime::{MemoryDiscovery, Registration};
use tonic::{Code, Status};

const FIXTURE: &str = "tiny-mha-softmax";
const ANSWER: &str = "Il fait très beau 中文 today.";
/// The HTTP body limit of the tests' gateway.
const MAX_BODY: usize = 16 << 10;

struct Cluster {
    gateway: Gateway,
    http: SocketAddr,
    vision: FakeVision,
    client: Client<HttpConnector, Full<Bytes>>,
    _members: Vec<Registration>,
}

/// A gateway with HTTP whose scheduler answers [`ANSWER`] in batches of 3 tokens.
async fn cluster() -> Cluster {
    let tok = ChatTokenizer::from_dir(&fixture(FIXTURE)).unwrap();
    let ids = tok.encode(ANSWER).unwrap();
    let batches = ids.chunks(3).map(<[u32]>::to_vec).collect();
    cluster_with(SchedulerScript::Tokens(batches, StopReason::Length)).await
}

/// A gateway with HTTP whose scheduler follows `script`.
async fn cluster_with(script: SchedulerScript) -> Cluster {
    cluster_and_scheduler(script).await.0
}

/// [`cluster_with`], and its scheduler.
async fn cluster_and_scheduler(script: SchedulerScript) -> (Cluster, FakeScheduler) {
    cluster_with_limit(script, MAX_BODY).await
}

/// [`cluster_and_scheduler`] refusing HTTP bodies over `max_body` bytes.
async fn cluster_with_limit(script: SchedulerScript, max_body: usize) -> (Cluster, FakeScheduler) {
    cluster_configured(script, |cfg| {
        cfg.public_limits.http_max_body_bytes = max_body
    })
    .await
}

/// [`cluster_and_scheduler`] with the gateway's configuration changed by `configure`.
async fn cluster_configured(
    script: SchedulerScript,
    configure: impl FnOnce(&mut Config),
) -> (Cluster, FakeScheduler) {
    let discovery = MemoryDiscovery::new();
    let vision = FakeVision::new(&fixture(FIXTURE), VisionScript::Correct);
    let scheduler = FakeScheduler::new(script);
    let members = fakes::register(&discovery, &vision, &scheduler).await;
    let mut cfg = Config::new(fixture(FIXTURE));
    cfg.public_limits.http_max_body_bytes = MAX_BODY;
    configure(&mut cfg);
    let gateway = Gateway::start_http(cfg, discovery).await;
    let cluster = Cluster {
        http: gateway.http.unwrap(),
        gateway,
        vision,
        client: Client::builder(TokioExecutor::new()).build_http(),
        _members: members,
    };
    (cluster, scheduler)
}

impl Cluster {
    /// Sends a request and returns its status, content type and whole body.
    async fn call(&self, method: Method, path: &str, body: Vec<u8>) -> (u16, String, String) {
        self.call_as(method, path, Some("application/json"), body)
            .await
    }

    /// [`Cluster::call`] declaring `content_type` (or no content type).
    async fn call_as(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> (u16, String, String) {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.http));
        if let Some(kind) = content_type {
            request = request.header(header::CONTENT_TYPE, kind);
        }
        let request = request.body(Full::new(Bytes::from(body))).unwrap();
        let response = tokio::time::timeout(DEADLINE, self.client.request(request))
            .await
            .expect("an answer in time")
            .unwrap();
        let status = response.status().as_u16();
        let kind = response
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let body = tokio::time::timeout(DEADLINE, response.into_body().collect())
            .await
            .expect("the whole body in time")
            .unwrap()
            .to_bytes();
        (status, kind, String::from_utf8(body.to_vec()).unwrap())
    }

    async fn chat(&self, body: &Value) -> (u16, Value) {
        self.chat_raw(body.to_string().into_bytes()).await
    }

    async fn chat_raw(&self, body: Vec<u8>) -> (u16, Value) {
        let (status, _, body) = self.call(Method::POST, "/v1/chat/completions", body).await;
        (status, serde_json::from_str(&body).unwrap())
    }

    /// A good request still gets the whole answer.
    async fn still_serves(&self) {
        let (status, body) = self.chat(&ask_body("Say something.")).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["choices"][0]["message"]["content"], ANSWER);
    }
}

fn ask_body(question: &str) -> Value {
    json!({
        "model": FIXTURE,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": question},
        ],
        "max_tokens": 64,
        "seed": 7,
    })
}

fn image_body(url: &str) -> Value {
    json!({
        "model": FIXTURE,
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is in this image?"},
            {"type": "image_url", "image_url": {"url": url}},
        ]}],
    })
}

/// Asserts an OpenAI-shaped error and returns its message.
fn error_message(body: &Value, kind: &str) -> String {
    let error = &body["error"];
    assert_eq!(error["type"], kind, "{body}");
    assert!(
        error.get("param").is_some() && error.get("code").is_some(),
        "{body}"
    );
    error["message"].as_str().unwrap().to_owned()
}

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
    let data: Vec<&str> = events
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix("data: ").expect("a data event"))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
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

/// `n` choices run as `n` requests, seeded one apart, and come back as indexed
/// choices, whole or streamed, with the answers' tokens summed in the usage; `n`
/// beyond 1 to 16 is a 400 naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_choices_are_n_requests() {
    let (cluster, scheduler) = cluster_and_scheduler({
        let tok = ChatTokenizer::from_dir(&fixture(FIXTURE)).unwrap();
        let ids = tok.encode(ANSWER).unwrap();
        SchedulerScript::Tokens(vec![ids], StopReason::Length)
    })
    .await;
    let one = {
        let (status, body) = cluster.chat(&ask_body("Hi.")).await;
        assert_eq!(status, 200, "{body}");
        body["usage"]["completion_tokens"].as_u64().unwrap()
    };
    let mut request = ask_body("Hi.");
    request["n"] = json!(3);
    request["seed"] = json!(40);
    request["temperature"] = json!(0.7);
    let (status, body) = cluster.chat(&request).await;
    assert_eq!(status, 200, "{body}");
    let choices = body["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3, "{body}");
    for (i, choice) in choices.iter().enumerate() {
        assert_eq!(choice["index"], i, "{body}");
        assert_eq!(choice["message"]["content"], ANSWER);
    }
    assert_eq!(
        body["usage"]["completion_tokens"].as_u64().unwrap(),
        3 * one
    );
    let mut seeds: Vec<u64> = scheduler
        .submitted
        .lock()
        .unwrap()
        .iter()
        .skip(1)
        .map(|s| s.1.sampling.as_ref().unwrap().seed)
        .collect();
    seeds.sort_unstable();
    assert_eq!(seeds, [40, 41, 42]);

    request["stream"] = json!(true);
    request["n"] = json!(2);
    request["stream_options"] = json!({"include_usage": true});
    let (status, _, text) = cluster
        .call(
            Method::POST,
            "/v1/chat/completions",
            request.to_string().into_bytes(),
        )
        .await;
    assert_eq!(status, 200, "{text}");
    let events: Vec<Value> = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    for index in 0..2 {
        let of_choice: Vec<&Value> = events
            .iter()
            .filter(|e| e["choices"].get(0).is_some_and(|c| c["index"] == index))
            .collect();
        let content: String = of_choice
            .iter()
            .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(content, ANSWER, "choice {index}: {text}");
        let finished = of_choice
            .iter()
            .filter(|e| !e["choices"][0]["finish_reason"].is_null())
            .count();
        assert_eq!(finished, 1, "choice {index}: {text}");
    }
    let usage = &events.last().unwrap()["usage"];
    assert_eq!(
        usage["completion_tokens"].as_u64().unwrap(),
        2 * one,
        "{text}"
    );

    for n in [0, 17] {
        let mut bad = ask_body("Hi.");
        bad["n"] = json!(n);
        let (status, body) = cluster.chat(&bad).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"]["param"], "n", "{body}");
    }
}

/// `--served-model-name` twice: both names are listed and served, the first is the
/// one `ModelInfo` reports, and the snapshot's own name is no longer one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn served_model_names_replace_the_snapshot_name() {
    let tok = ChatTokenizer::from_dir(&fixture(FIXTURE)).unwrap();
    let ids = tok.encode(ANSWER).unwrap();
    let script = SchedulerScript::Tokens(vec![ids], StopReason::Length);
    let (cluster, _scheduler) = cluster_configured(script, |cfg| {
        cfg.served_model_names = vec!["vl2".into(), "vl2-tiny".into()];
    })
    .await;
    let (status, _, body) = cluster.call(Method::GET, "/v1/models", Vec::new()).await;
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&body).unwrap();
    let listed: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, ["vl2", "vl2-tiny"]);
    for name in ["vl2", "vl2-tiny"] {
        let (status, _, body) = cluster
            .call(Method::GET, &format!("/v1/models/{name}"), Vec::new())
            .await;
        assert_eq!(status, 200, "{body}");
        let mut request = ask_body("Hi.");
        request["model"] = json!(name);
        let (status, answer) = cluster.chat(&request).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["model"], name, "{answer}");
    }
    let (status, answer) = cluster.chat(&ask_body("Hi.")).await;
    assert_eq!(status, 404, "{answer}");
    let message = error_message(&answer, "invalid_request_error");
    assert!(message.contains("\"vl2\", \"vl2-tiny\""), "{message}");
    let mut grpc = cluster.gateway.client().await;
    let info = grpc
        .model_info(tessera_proto::v1::ModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.model_id, "vl2");
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
    let tok = ChatTokenizer::from_dir(&fixture(FIXTURE)).unwrap();
    let ids = tok.encode(ANSWER).unwrap();
    let batches = ids.chunks(3).map(<[u32]>::to_vec).collect();
    let discovery = MemoryDiscovery::new();
    let vision = FakeVision::new(&fixture(FIXTURE), VisionScript::Correct);
    let scheduler = FakeScheduler::new(SchedulerScript::Tokens(batches, StopReason::Length));
    let members = fakes::register(&discovery, &vision, &scheduler).await;
    let mut cfg = Config::new(fixture(FIXTURE));
    cfg.public_limits.http_read_timeout_seconds = read_timeout;
    cfg.public_limits.http_max_connections = max_connections;
    let gateway = Gateway::start_http(cfg, discovery).await;
    Cluster {
        http: gateway.http.unwrap(),
        gateway,
        vision,
        // No pooled connections: the server closes idle ones after the short read
        // timeout, and a pooled one could be reused just as it closes.
        client: Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build_http(),
        _members: members,
    }
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
    for (code, status, kind) in [
        (Code::ResourceExhausted, 429, "rate_limit_error"),
        (Code::Unavailable, 503, "service_unavailable"),
        (Code::Internal, 500, "server_error"),
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
        assert_eq!(error_message(&body, kind), "scheduler: busy");
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

/// With `--api-key-file`, every public call needs a key from the file, over HTTP
/// (`Authorization: Bearer`, 401 otherwise) and gRPC (metadata, UNAUTHENTICATED);
/// `/health` and the page stay open; `/metrics`, the members' addresses and the model's
/// path are for admin keys; a key added to the file works once the file is read again,
/// and a removed one stops working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_guard_both_apis_and_follow_the_file() {
    let dir = std::env::temp_dir().join(format!("tessera-http-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("keys");
    std::fs::write(
        &file,
        "# the team\nkey-alpha-0123456789\nadmin:ops-key-0123456789\n",
    )
    .unwrap();

    let tok = ChatTokenizer::from_dir(&fixture(FIXTURE)).unwrap();
    let ids = tok.encode(ANSWER).unwrap();
    let batches = ids.chunks(3).map(<[u32]>::to_vec).collect();
    let discovery = MemoryDiscovery::new();
    let vision = FakeVision::new(&fixture(FIXTURE), VisionScript::Correct);
    let scheduler = FakeScheduler::new(SchedulerScript::Tokens(batches, StopReason::Length));
    let _members = fakes::register(&discovery, &vision, &scheduler).await;
    let mut cfg = Config::new(fixture(FIXTURE));
    cfg.auth.api_key_file = Some(file.clone());
    let gateway = Gateway::start_http(cfg, discovery).await;
    let http = gateway.http.unwrap();
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();

    let send = |method: Method, path: &str, key: Option<&str>, body: Option<Value>| {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("http://{http}{path}"))
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(key) = key {
            request = request.header(header::AUTHORIZATION, format!("Bearer {key}"));
        }
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let request = request.body(Full::new(Bytes::from(body))).unwrap();
        let client = client.clone();
        async move {
            let response = tokio::time::timeout(DEADLINE, client.request(request))
                .await
                .expect("an answer in time")
                .unwrap();
            let status = response.status().as_u16();
            let challenge = response.headers().contains_key(header::WWW_AUTHENTICATE);
            let body = response.into_body().collect().await.unwrap().to_bytes();
            (status, challenge, String::from_utf8(body.to_vec()).unwrap())
        }
    };
    let chat = "/v1/chat/completions";
    for key in [None, Some("wrong-key"), Some("key-alpha-012345678")] {
        for (method, path, body) in [
            (Method::POST, chat, Some(ask_body("Hi."))),
            (Method::GET, "/v1/models", None),
            (Method::GET, "/metrics", None),
        ] {
            let (status, challenge, answer) = send(method.clone(), path, key, body).await;
            assert_eq!(status, 401, "{method} {path} with {key:?}: {answer}");
            assert!(challenge, "{path}: WWW-Authenticate");
            let answer: Value = serde_json::from_str(&answer).unwrap();
            error_message(&answer, "invalid_request_error");
            assert_eq!(answer["error"]["code"], "invalid_api_key");
        }
    }
    for path in ["/health", "/"] {
        let (status, _, _) = send(Method::GET, path, None, None).await;
        assert_eq!(status, 200, "{path} stays open");
    }
    let alpha = Some("key-alpha-0123456789");
    let (status, _, answer) = send(Method::POST, chat, alpha, Some(ask_body("Hi."))).await;
    assert_eq!(status, 200, "{answer}");
    let answer: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(answer["choices"][0]["message"]["content"], ANSWER);
    let (status, _, answer) = send(Method::GET, "/metrics", alpha, None).await;
    assert_eq!(status, 403, "{answer}");
    let ops = Some("ops-key-0123456789");
    let (status, _, _) = send(Method::GET, "/metrics", ops, None).await;
    assert_eq!(status, 200);

    // gRPC: metadata, the same keys.
    let mut grpc = gateway.client().await;
    let status = grpc.model_info(ModelInfoRequest {}).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let with_key = |key: &str| {
        let mut request = tonic::Request::new(ModelInfoRequest {});
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {key}").parse().unwrap());
        request
    };
    let status = grpc.model_info(with_key("wrong-key")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let info = grpc
        .model_info(with_key("key-alpha-0123456789"))
        .await
        .unwrap();
    assert_eq!(
        info.get_ref().model_path,
        "",
        "a client key does not see the path"
    );
    assert_eq!(info.get_ref().model_id, FIXTURE);
    let info = grpc
        .model_info(with_key("ops-key-0123456789"))
        .await
        .unwrap();
    assert!(!info.get_ref().model_path.is_empty());
    let status_of = |key: &str| {
        let mut request = tonic::Request::new(tessera_proto::v1::ClusterStatusRequest {});
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {key}").parse().unwrap());
        request
    };
    let seen = grpc
        .cluster_status(status_of("key-alpha-0123456789"))
        .await
        .unwrap()
        .into_inner();
    assert!(seen.members.len() >= 3, "{seen:?}");
    assert!(
        seen.members
            .iter()
            .all(|m| m.address.is_empty() && m.id.is_empty()),
        "{seen:?}"
    );
    let seen = grpc
        .cluster_status(status_of("ops-key-0123456789"))
        .await
        .unwrap()
        .into_inner();
    assert!(
        seen.members.iter().all(|m| !m.address.is_empty()),
        "{seen:?}"
    );
    let mut generate = tonic::Request::new(grpc_request("Hi."));
    generate
        .metadata_mut()
        .insert("authorization", "Bearer wrong-key".parse().unwrap());
    let status = grpc.generate(generate).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    // A new key works once the file is read again; the old one stops.
    std::fs::write(
        &file,
        "sha256:".to_owned() + &sha256_hex("key-beta-9876543210") + "\n",
    )
    .unwrap();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let (status, _, _) =
            send(Method::GET, "/v1/models", Some("key-beta-9876543210"), None).await;
        if status == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new key never took effect"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (status, _, _) = send(Method::GET, "/v1/models", alpha, None).await;
    assert_eq!(status, 401);
    let _ = std::fs::remove_dir_all(&dir);
}

fn sha256_hex(key: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn grpc_request(question: &str) -> tessera_proto::v1::GenerateRequest {
    tessera_proto::v1::GenerateRequest {
        messages: vec![tessera_proto::v1::Message {
            role: tessera_proto::v1::Role::User.into(),
            parts: vec![tessera_proto::v1::Part {
                kind: Some(tessera_proto::v1::part::Kind::Text(question.into())),
            }],
        }],
        ..Default::default()
    }
}

/// OpenAI fields this server does not honour are refused by name when they ask for
/// something, and accepted at their neutral values; `top_k` and `repetition_penalty`
/// reach the scheduler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_openai_fields_are_refused_by_name() {
    let (cluster, scheduler) = cluster_and_scheduler({
        let tok = ChatTokenizer::from_dir(&fixture(FIXTURE)).unwrap();
        let ids = tok.encode(ANSWER).unwrap();
        SchedulerScript::Tokens(
            ids.chunks(3).map(<[u32]>::to_vec).collect(),
            StopReason::Length,
        )
    })
    .await;
    for (field, value) in [
        ("logit_bias", json!({"42": 10})),
        ("response_format", json!({"type": "json_object"})),
        (
            "response_format",
            json!({"type": "json_schema", "json_schema": {"name": "x"}}),
        ),
        (
            "tools",
            json!([{"type": "function", "function": {"name": "f"}}]),
        ),
        ("tool_choice", json!("auto")),
        ("audio", json!({"voice": "alloy", "format": "wav"})),
        ("modalities", json!(["text", "audio"])),
    ] {
        let mut body = ask_body("Hi.");
        body[field] = value.clone();
        let (status, answer) = cluster.chat(&body).await;
        assert_eq!(status, 400, "{field}={value}: {answer}");
        let message = error_message(&answer, "invalid_request_error");
        assert_eq!(answer["error"]["param"], field, "{answer}");
        assert!(message.contains(field), "{message}");
    }
    assert!(scheduler.submitted.lock().unwrap().is_empty());

    let mut neutral = ask_body("Hi.");
    for (field, value) in [
        ("n", json!(1)),
        ("logprobs", json!(false)),
        ("presence_penalty", json!(0.4)),
        ("frequency_penalty", json!(-0.25)),
        ("response_format", json!({"type": "text"})),
        ("tools", json!([])),
        ("user", json!("someone")),
        ("top_k", json!(5)),
        ("repetition_penalty", json!(1.1)),
    ] {
        neutral[field] = value;
    }
    let (status, answer) = cluster.chat(&neutral).await;
    assert_eq!(status, 200, "{answer}");
    let submitted = scheduler.submitted.lock().unwrap();
    let sampling = submitted[0].1.sampling.clone().unwrap();
    assert_eq!(sampling.top_k, 5);
    assert_eq!(sampling.repetition_penalty, 1.1);
    assert_eq!(sampling.presence_penalty, 0.4);
    assert_eq!(sampling.frequency_penalty, -0.25);
}
