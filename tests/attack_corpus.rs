//! The attack corpus, against one real `tessera up` that requires API keys: each case
//! gets its documented status, a good request still answers after each, no thread
//! panics, the process lives on, and its peak RSS grows by less than [`RSS_BOUND`]
//! over the whole corpus. The cases: a 200 MB prompt over gRPC and over HTTP, calls
//! without a key or with a wrong one, text that is not UTF-8, a second client reusing
//! (and abandoning) another client's request id, a `text/plain` POST, every OpenAI
//! field the server does not honour, unknown paths, a remote image on 127.0.0.1, 500
//! idle HTTP connections, and 300 concurrent requests against a small queue. The
//! internal RPCs without a client certificate are `tests/cluster_tls.rs`.

use std::net::TcpStream;
use std::process::Command;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tessera_proto::v1::tessera_client::TesseraClient;
use tessera_proto::v1::{
    GenerateRequest, Message, Part, Role, SamplingParams, StoppingParams, generate_stream_response,
    part,
};
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

#[allow(dead_code)]
mod common;
#[allow(dead_code)]
#[path = "common/raw_http.rs"]
mod raw_http;
#[path = "common/up.rs"]
mod up_process;

use common::fixture_dir;
use raw_http::{exchange, expect_error, peak_rss};

const MODEL_NAME: &str = "tiny-mha-softmax";
/// Most the server's peak RSS may grow, over the whole corpus, past its peak after a
/// first good request.
const RSS_BOUND: u64 = 300 << 20;
const DEADLINE: Duration = Duration::from_secs(120);
const KEY_A: &str = "client-a-0123456789abcdef";
const KEY_B: &str = "client-b-0123456789abcdef";
/// The scheduler's limits in this test: 2 running and 6 waiting.
const MAX_SEQS: usize = 2;
const MAX_WAITING: usize = 6;
/// Tokens each request of the burst asks for: long enough that the whole burst is
/// decided before the first admitted request finishes.
const BURST_TOKENS: u32 = 256;

/// Sends `authorization: Bearer KEY` with every call (no header for `None`).
#[derive(Clone)]
struct Key(Option<&'static str>);

impl Interceptor for Key {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(key) = self.0 {
            let value: MetadataValue<_> = format!("Bearer {key}").parse().unwrap();
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}

type Client = TesseraClient<InterceptedService<Channel, Key>>;

async fn client(addr: &str, key: Option<&'static str>) -> Client {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect to the gRPC API");
    TesseraClient::with_interceptor(channel, Key(key))
}

fn ask(text: &str, max_tokens: u32, ignore_eos: bool) -> GenerateRequest {
    GenerateRequest {
        request_id: String::new(),
        messages: vec![Message {
            role: Role::User.into(),
            parts: vec![Part {
                kind: Some(part::Kind::Text(text.to_owned())),
            }],
        }],
        sampling: Some(SamplingParams {
            temperature: Some(0.0),
            ..Default::default()
        }),
        stopping: Some(StoppingParams {
            max_tokens: Some(max_tokens),
            stop: Vec::new(),
            ignore_eos,
        }),
    }
}

/// Streams `request` to its end: the tokens it got, or the status.
async fn stream_tokens(
    client: &mut Client,
    request: GenerateRequest,
) -> Result<u32, tonic::Status> {
    let mut stream = client.generate_stream(request).await?.into_inner();
    let mut tokens = 0;
    while let Some(message) = stream.message().await? {
        match message.event {
            Some(generate_stream_response::Event::Delta(delta)) => {
                tokens += delta.token_ids.len() as u32;
            }
            Some(generate_stream_response::Event::Finished(done)) => {
                assert_eq!(done.usage.unwrap().completion_tokens, tokens);
            }
            None => {}
        }
    }
    Ok(tokens)
}

fn chat(question: &str) -> Value {
    json!({
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 4,
        "temperature": 0,
    })
}

const JSON_WITH_KEY: &str =
    "Content-Type: application/json\r\nAuthorization: Bearer client-a-0123456789abcdef\r\n";

fn post_with_key(http: &str, path: &str, body: &[u8]) -> (u16, Value) {
    exchange(http, "POST", path, JSON_WITH_KEY, body)
}

struct Server {
    up: up_process::Up,
    http: String,
    grpc: String,
    logs: Receiver<String>,
}

impl Server {
    /// A good request still gets its answer over both APIs.
    async fn still_serves(&self) -> Duration {
        let started = Instant::now();
        let (status, body) = post_with_key(
            &self.http,
            "/v1/chat/completions",
            chat("Hello.").to_string().as_bytes(),
        );
        let http = started.elapsed();
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["usage"]["completion_tokens"], 4, "{body}");
        let mut grpc = client(&self.grpc, Some(KEY_A)).await;
        let answer = grpc
            .generate(ask("Hello.", 4, true))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.usage.unwrap().completion_tokens, 4);
        http
    }

    /// No thread has panicked and the process is alive.
    fn healthy(&mut self) {
        assert!(self.up.0.try_wait().unwrap().is_none(), "tessera up exited");
        for line in self.logs.try_iter() {
            assert!(!line.contains("panicked"), "a thread panicked: {line}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_attack_gets_its_status_and_the_server_keeps_serving() {
    let keys_dir = tempfile::tempdir().unwrap();
    let keys = keys_dir.path().join("keys");
    std::fs::write(&keys, format!("{KEY_A}\n{KEY_B}\n")).unwrap();
    let mut tessera = Command::new(env!("CARGO_BIN_EXE_tessera"));
    tessera
        .env_remove("TESSERA_MODEL")
        .env_remove("TESSERA_HTTP")
        .env_remove("TESSERA_API_KEY_FILE");
    let model = fixture_dir(MODEL_NAME);
    let (max_seqs, max_waiting) = (MAX_SEQS.to_string(), MAX_WAITING.to_string());
    let (up, addrs, logs) = up_process::start_logged(
        tessera,
        model.to_str().unwrap(),
        "1",
        &[
            "--http",
            "127.0.0.1:0",
            "--api-key-file",
            keys.to_str().unwrap(),
            "--max-seqs",
            &max_seqs,
            "--max-waiting",
            &max_waiting,
            "--http-read-timeout-seconds",
            "2",
            "--allow-remote-images",
        ],
    );
    let mut server = Server {
        up,
        http: addrs.http.expect("an HTTP address"),
        grpc: addrs.grpc,
        logs,
    };
    let path = "/v1/chat/completions";
    server.still_serves().await;
    let pid = server.up.0.id();
    let started = peak_rss(pid);

    // No key, a wrong key: 401 and UNAUTHENTICATED.
    let body = chat("Hello.").to_string();
    for auth in ["", "Authorization: Bearer client-c-not-a-key\r\n"] {
        let headers = format!("Content-Type: application/json\r\n{auth}");
        let got = exchange(&server.http, "POST", path, &headers, body.as_bytes());
        assert_eq!(got.1["error"]["code"], "invalid_api_key", "{}", got.1);
        expect_error(got, 401);
    }
    for key in [None, Some("client-c-not-a-key")] {
        let mut grpc = client(&server.grpc, key).await;
        let status = grpc.generate(ask("Hello.", 4, false)).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    }
    server.still_serves().await;

    // A 200 MB prompt over gRPC: refused at the transport (the 32 MiB default).
    let mut grpc = client(&server.grpc, Some(KEY_A)).await;
    let huge = ask(&"x".repeat(200 * 1000 * 1000), 4, false);
    let status = grpc.generate(huge).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    server.still_serves().await;

    // The same over HTTP: 413 before the body is read.
    let mut huge = chat("").to_string().into_bytes();
    huge.pop();
    huge.extend_from_slice(
        format!(r#","padding":"{}"}}"#, "x".repeat(200 * 1000 * 1000)).as_bytes(),
    );
    let message = expect_error(post_with_key(&server.http, path, &huge), 413);
    assert!(message.contains("--http-max-body-bytes"), "{message}");
    drop(huge);
    server.still_serves().await;

    // Text that is not UTF-8 over gRPC: INVALID_ARGUMENT.
    let status = not_utf8(&server.grpc).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    server.still_serves().await;

    // Client B reuses client A's request id while A's request runs, then abandons its
    // own: A's request is neither refused, nor cancelled, nor cut short.
    let mut a = client(&server.grpc, Some(KEY_A)).await;
    let mut b = client(&server.grpc, Some(KEY_B)).await;
    let mut long = ask("Tell me a long story.", 48, true);
    long.request_id = "shared-id".into();
    let running = tokio::spawn({
        let mut a = a.clone();
        let long = long.clone();
        async move { stream_tokens(&mut a, long).await }
    });
    let mut b_stream = b.generate_stream(long.clone()).await.unwrap().into_inner();
    let first = b_stream.message().await.unwrap();
    assert!(first.is_some(), "client B's request with the same id runs");
    drop(b_stream);
    let got = tokio::time::timeout(DEADLINE, running)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.unwrap(), 48, "client A's request ran to its end");
    let again = stream_tokens(&mut a, long).await.unwrap();
    assert_eq!(again, 48);
    server.still_serves().await;

    // A form or text/plain POST, as any web page can send: 415.
    for kind in ["text/plain", "application/x-www-form-urlencoded"] {
        let headers = format!("Content-Type: {kind}\r\nAuthorization: Bearer {KEY_A}\r\n");
        let got = exchange(&server.http, "POST", path, &headers, body.as_bytes());
        let message = expect_error(got, 415);
        assert!(message.contains("application/json"), "{message}");
    }

    // Every OpenAI field the server does not honour: 400 naming it.
    for (field, value) in [
        ("logit_bias", json!({"42": 10})),
        ("response_format", json!({"type": "json_object"})),
        (
            "tools",
            json!([{"type": "function", "function": {"name": "f"}}]),
        ),
        ("tool_choice", json!("auto")),
        ("audio", json!({"voice": "alloy", "format": "wav"})),
    ] {
        let mut request = chat("Hello.");
        request[field] = value;
        let got = post_with_key(&server.http, path, request.to_string().as_bytes());
        assert_eq!(got.1["error"]["param"], field, "{}", got.1);
        let message = expect_error(got, 400);
        assert!(message.contains(field), "{message}");
    }

    // Unknown paths and methods: OpenAI-shaped 404 and 405.
    for (method, unknown, status) in [
        ("POST", "/v1/completions", 404),
        ("POST", "/v1/embeddings", 404),
        ("GET", "/internal/admin", 404),
        ("DELETE", "/v1/chat/completions", 405),
    ] {
        let got = exchange(&server.http, method, unknown, JSON_WITH_KEY, b"");
        let message = expect_error(got, status);
        assert!(message.contains(unknown), "{message}");
    }

    // A remote image on the server's own loopback: 400, nothing fetched.
    let local = json!({
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": format!("http://{}/health", server.http)}},
        ]}],
    });
    let message = expect_error(
        post_with_key(&server.http, path, local.to_string().as_bytes()),
        400,
    );
    assert!(message.contains("--allow-private-image-hosts"), "{message}");
    server.still_serves().await;
    server.healthy();

    // 500 idle HTTP connections: a good request is still answered while they are open,
    // and the server closes every one after its read timeout.
    let idle: Vec<TcpStream> = (0..500)
        .map(|_| TcpStream::connect(&server.http).expect("an idle connection"))
        .collect();
    let took = server.still_serves().await;
    println!("a good HTTP request beside 500 idle connections: {took:?}");
    let reaped = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        for mut stream in idle {
            stream.set_read_timeout(Some(DEADLINE)).unwrap();
            let mut got = Vec::new();
            // The server closes it (a reset counts too).
            let _ = std::io::Read::read_to_end(&mut stream, &mut got);
        }
        started.elapsed()
    })
    .await
    .unwrap();
    assert!(reaped < DEADLINE, "the idle connections were closed");
    println!("500 idle connections closed within {reaped:?}");

    // 300 concurrent requests against 2 running and 6 waiting: every one either runs
    // to its end or is refused with RESOURCE_EXHAUSTED, and while the first eight
    // admitted requests have not finished, no further one is admitted.
    let burst = burst(&server.grpc, 300).await;
    server.still_serves().await;
    server.healthy();

    let grown = peak_rss(pid).saturating_sub(started);
    println!(
        "300 concurrent: {} answered, {} refused; peak RSS grew by {} MB over the corpus",
        burst.answered,
        burst.refused,
        grown >> 20
    );
    assert!(
        grown < RSS_BOUND,
        "the server's peak RSS grew by {grown} bytes, more than {RSS_BOUND}"
    );
}

/// The outcome of [`burst`].
struct Burst {
    answered: usize,
    refused: usize,
}

/// Sends `n` long greedy requests at once over as many connections, and checks the
/// queue bound: refused ones are RESOURCE_EXHAUSTED, nothing fails otherwise, and at
/// most `MAX_SEQS + MAX_WAITING` requests are admitted before the first admitted one
/// finishes (requests are long, so the rest of the burst is refused by then).
async fn burst(grpc: &str, n: usize) -> Burst {
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        clients.push(client(grpc, Some(KEY_A)).await);
    }
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(n));
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            let start = start.clone();
            tokio::spawn(async move {
                start.wait().await;
                let outcome =
                    stream_tokens(&mut c, ask("Count to a hundred.", BURST_TOKENS, true)).await;
                (outcome, Instant::now())
            })
        })
        .collect();
    let mut answered = Vec::new();
    let mut refused = Vec::new();
    for task in tasks {
        let (outcome, at) = tokio::time::timeout(DEADLINE, task)
            .await
            .expect("every request ends in time")
            .unwrap();
        match outcome {
            Ok(tokens) => {
                assert_eq!(tokens, BURST_TOKENS, "an admitted request runs to its end");
                answered.push(at);
            }
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                refused.push(at);
            }
        }
    }
    let first_done = answered
        .iter()
        .min()
        .copied()
        .expect("some requests answered");
    let last_refused = refused
        .iter()
        .max()
        .copied()
        .expect("some requests refused");
    assert!(
        last_refused < first_done,
        "the whole burst was decided before the first admitted request finished"
    );
    assert!(
        answered.len() <= MAX_SEQS + MAX_WAITING,
        "{} admitted, more than {MAX_SEQS} running + {MAX_WAITING} waiting",
        answered.len()
    );
    Burst {
        answered: answered.len(),
        refused: refused.len(),
    }
}

/// A `Generate` whose text part is not UTF-8 (built with a look-alike message whose
/// text is bytes); the status it gets.
async fn not_utf8(grpc: &str) -> tonic::Status {
    mod raw {
        #[derive(Clone, PartialEq, prost::Message)]
        pub struct Part {
            #[prost(bytes = "vec", tag = "1")]
            pub text: Vec<u8>,
        }
        #[derive(Clone, PartialEq, prost::Message)]
        pub struct Message {
            #[prost(int32, tag = "1")]
            pub role: i32,
            #[prost(message, repeated, tag = "2")]
            pub parts: Vec<Part>,
        }
        #[derive(Clone, PartialEq, prost::Message)]
        pub struct GenerateRequest {
            #[prost(message, repeated, tag = "2")]
            pub messages: Vec<Message>,
        }
    }
    let channel = Channel::from_shared(format!("http://{grpc}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let request = raw::GenerateRequest {
        messages: vec![raw::Message {
            role: Role::User.into(),
            parts: vec![raw::Part {
                text: b"caf\xe9 \xff\xfe".to_vec(),
            }],
        }],
    };
    let mut request = tonic::Request::new(request);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {KEY_A}").parse().unwrap());
    grpc.unary(
        request,
        tonic::codegen::http::uri::PathAndQuery::from_static("/tessera.v1.Tessera/Generate"),
        tonic_prost::ProstCodec::<raw::GenerateRequest, tessera_proto::v1::GenerateResponse>::default(),
    )
    .await
    .map(drop)
    .unwrap_err()
}
