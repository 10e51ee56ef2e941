//! The HTTP tests' cluster: a gateway with HTTP between a fake vision-worker and a
//! fake scheduler, and helpers to call it. Include it with `mod openai_http;` next to
//! `mod common;` and `mod fakes;`.

use std::net::SocketAddr;

use axum::body::Bytes;
use axum::http::{Method, Request, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tessera_gateway::Config;
use tessera_model::chat::ChatTokenizer;
use tessera_proto::internal::v1::StopReason;
use tessera_runtime::{MemoryDiscovery, Registration};

use crate::common::*;
use crate::fakes::{self, FakeScheduler, FakeVision, SchedulerScript, VisionScript};

pub const FIXTURE: &str = "tiny-mha-softmax";
pub const ANSWER: &str = "Il fait très beau 中文 today.";
/// The HTTP body limit of the tests' gateway.
pub const MAX_BODY: usize = 16 << 10;

pub struct Cluster {
    pub gateway: Gateway,
    pub http: SocketAddr,
    pub vision: FakeVision,
    pub client: Client<HttpConnector, Full<Bytes>>,
    pub _members: Vec<Registration>,
}

/// A gateway with HTTP whose scheduler answers [`ANSWER`] in batches of 3 tokens.
pub async fn cluster() -> Cluster {
    cluster_with(answer_script()).await
}

/// A scheduler script answering [`ANSWER`] in batches of 3 tokens.
pub fn answer_script() -> SchedulerScript {
    let tok = ChatTokenizer::from_dir(&fixture(FIXTURE)).unwrap();
    let ids = tok.encode(ANSWER).unwrap();
    let batches = ids.chunks(3).map(<[u32]>::to_vec).collect();
    SchedulerScript::Tokens(batches, StopReason::Length)
}

/// A gateway with HTTP whose scheduler follows `script`.
pub async fn cluster_with(script: SchedulerScript) -> Cluster {
    cluster_and_scheduler(script).await.0
}

/// [`cluster_with`], and its scheduler.
pub async fn cluster_and_scheduler(script: SchedulerScript) -> (Cluster, FakeScheduler) {
    cluster_with_limit(script, MAX_BODY).await
}

/// [`cluster_and_scheduler`] refusing HTTP bodies over `max_body` bytes.
pub async fn cluster_with_limit(
    script: SchedulerScript,
    max_body: usize,
) -> (Cluster, FakeScheduler) {
    cluster_configured(script, |cfg| {
        cfg.public_limits.http_max_body_bytes = max_body
    })
    .await
}

/// [`cluster_and_scheduler`] with the gateway's configuration changed by `configure`.
pub async fn cluster_configured(
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
    pub async fn call(&self, method: Method, path: &str, body: Vec<u8>) -> (u16, String, String) {
        self.call_as(method, path, Some("application/json"), body)
            .await
    }

    /// [`Cluster::call`] declaring `content_type` (or no content type).
    pub async fn call_as(
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

    pub async fn chat(&self, body: &Value) -> (u16, Value) {
        self.chat_raw(body.to_string().into_bytes()).await
    }

    pub async fn chat_raw(&self, body: Vec<u8>) -> (u16, Value) {
        let (status, _, body) = self.call(Method::POST, "/v1/chat/completions", body).await;
        (status, serde_json::from_str(&body).unwrap())
    }

    /// A good request still gets the whole answer.
    pub async fn still_serves(&self) {
        let (status, body) = self.chat(&ask_body("Say something.")).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["choices"][0]["message"]["content"], ANSWER);
    }
}

pub fn ask_body(question: &str) -> Value {
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

pub fn image_body(url: &str) -> Value {
    json!({
        "model": FIXTURE,
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is in this image?"},
            {"type": "image_url", "image_url": {"url": url}},
        ]}],
    })
}

/// Asserts an OpenAI-shaped error and returns its message.
pub fn error_message(body: &Value, kind: &str) -> String {
    let error = &body["error"];
    assert_eq!(error["type"], kind, "{body}");
    assert!(
        error.get("param").is_some() && error.get("code").is_some(),
        "{body}"
    );
    error["message"].as_str().unwrap().to_owned()
}

/// The chunks of a streamed completion's body: `data:` events, the last `[DONE]`.
pub fn sse_chunks(body: &str) -> Vec<Value> {
    let data: Vec<&str> = body
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix("data: ").expect("a data event"))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{body}");
    data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}
