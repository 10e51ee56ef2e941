//! Prometheus metrics end to end: a real `tessera up` serves `/metrics` for every
//! service in its process, and the counters move by what each request did.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tessera_proto::MAX_MESSAGE_BYTES;
use tessera_proto::v1::tessera_client::TesseraClient;
use tessera_proto::v1::{self, GenerateRequest, ModelInfoRequest, part};
use tessera_runtime::metrics::Scrape;
use tonic::transport::Channel;

#[allow(dead_code)]
mod common;
#[allow(dead_code)]
#[path = "common/up.rs"]
mod up;

use common::fixture_dir;

const DEADLINE: Duration = Duration::from_secs(120);
const WORKERS: [&str; 2] = ["expert-worker-0", "expert-worker-1"];

fn tessera() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tessera"));
    for var in [
        "TESSERA_MODEL",
        "TESSERA_GRPC",
        "TESSERA_HTTP",
        "TESSERA_METRICS",
    ] {
        c.env_remove(var);
    }
    c.env("TESSERA_KV_CACHE_BYTES", "67108864");
    c
}

/// One HTTP/1.0 exchange: the status code and the body.
fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    let request = format!(
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

fn scrape(addr: &str) -> Scrape {
    let (status, body) = http(addr, "GET", "/metrics", "");
    assert_eq!(status, 200, "{body}");
    Scrape::parse(&body).unwrap()
}

/// Scrapes until `done` holds (the engine publishes its counters after the step
/// that ended a request, so they may trail the response a little).
fn scrape_until(addr: &str, done: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let s = scrape(addr);
        if done(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "the metrics did not settle");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What a series gained between two scrapes (summed over the labels not given).
fn gained(before: &Scrape, after: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    after.sum(name, labels) - before.sum(name, labels)
}

fn image_request(max_tokens: u32) -> GenerateRequest {
    let image = std::fs::read(fixture_dir("tiny-mha-softmax").join("img_640x480.png")).unwrap();
    let parts = vec![
        v1::Part {
            kind: Some(part::Kind::Image(v1::Image {
                data: image.into(),
                mime_type: "image/png".into(),
            })),
        },
        v1::Part {
            kind: Some(part::Kind::Text("Describe this image.".into())),
        },
    ];
    GenerateRequest {
        request_id: String::new(),
        messages: vec![v1::Message {
            role: v1::Role::User as i32,
            parts,
        }],
        sampling: None,
        stopping: Some(v1::StoppingParams {
            max_tokens: Some(max_tokens),
            stop: Vec::new(),
            ignore_eos: true,
        }),
    }
}

async fn client(grpc: &str) -> TesseraClient<Channel> {
    let channel = Channel::from_shared(format!("http://{grpc}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    TesseraClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

#[test]
fn counters_move_by_what_each_request_did() {
    let dir = fixture_dir("tiny-mha-softmax");
    let (_up, addrs) = up::start_with(
        tessera(),
        dir.to_str().unwrap(),
        "2",
        &["--http", "127.0.0.1:0"],
    );
    let web = addrs.http.unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut client = rt.block_on(client(&addrs.grpc));
    let info = rt
        .block_on(client.model_info(ModelInfoRequest {}))
        .unwrap()
        .into_inner();
    let moe_layers = f64::from(info.num_layers - info.num_dense_layers);
    let top_k = f64::from(info.num_experts_per_token);

    assert_eq!(http(&web, "GET", "/health", ""), (200, "ok".to_owned()));
    // Every routed expert is held twice (two replicas on the two workers) once the
    // workers have applied the placement.
    let all_experts = moe_layers * f64::from(info.num_routed_experts);
    let before = scrape_until(&web, |s| {
        s.sum("tessera_expert_worker_held_experts", &[]) == 2.0 * all_experts
    });
    for family in [
        "tessera_kv_blocks_used",
        "tessera_kv_blocks_free",
        "tessera_kv_blocks_cached",
        "tessera_scheduler_waiting_sequences",
        "tessera_scheduler_running_sequences",
        "tessera_time_to_first_token_seconds_count",
        "tessera_expert_worker_held_experts",
    ] {
        assert!(before.has(family), "{family} is missing before any request");
    }
    let kv_blocks = ["used", "cached", "free"]
        .map(|state| before.sum(&format!("tessera_kv_blocks_{state}"), &[]))
        .iter()
        .sum::<f64>();
    assert!(kv_blocks > 0.0, "the KV pool has blocks");
    for worker in WORKERS {
        let held = before.sum("tessera_expert_worker_held_experts", &[("worker", worker)]);
        assert!(held > 0.0, "{worker} holds a share of the experts");
    }

    // One request with an image.
    let response = rt
        .block_on(client.generate(image_request(4)))
        .unwrap()
        .into_inner();
    let usage = response.usage.unwrap();
    let completion = f64::from(usage.completion_tokens);
    assert_eq!(completion, 4.0);
    let after = scrape_until(&web, |s| {
        gained(&before, s, "tessera_scheduler_generated_tokens_total", &[]) >= completion
    });
    let d = |name: &str, labels: &[(&str, &str)]| gained(&before, &after, name, labels);
    let ok = [("api", "grpc"), ("outcome", "ok")];
    assert_eq!(d("tessera_requests_total", &ok), 1.0);
    assert_eq!(d("tessera_requests_total", &[]), 1.0);
    assert_eq!(d("tessera_time_to_first_token_seconds_count", &[]), 1.0);
    assert_eq!(d("tessera_time_per_output_token_seconds_count", &[]), 1.0);
    assert_eq!(d("tessera_request_duration_seconds_count", &[]), 1.0);
    assert_eq!(d("tessera_completion_tokens_total", &[]), completion);
    assert_eq!(
        d("tessera_prompt_tokens_total", &[]),
        f64::from(usage.prompt_tokens)
    );
    assert_eq!(after.sum("tessera_requests_in_flight", &[]), 0.0);

    assert_eq!(d("tessera_vision_cache_misses_total", &[]), 1.0);
    assert_eq!(d("tessera_vision_cache_hits_total", &[]), 0.0);
    assert_eq!(d("tessera_vision_images_encoded_total", &[]), 1.0);
    assert_eq!(d("tessera_vision_encode_seconds_count", &[]), 1.0);

    assert_eq!(d("tessera_scheduler_requests_total", &[]), 1.0);
    assert_eq!(
        d("tessera_scheduler_generated_tokens_total", &[]),
        completion
    );
    assert_eq!(
        d("tessera_scheduler_prefill_tokens_total", &[]),
        f64::from(usage.prompt_tokens),
        "a first request computes its whole prompt"
    );
    // Every position run through the model goes to top-k experts in every MoE layer.
    let positions = d("tessera_scheduler_batched_tokens_total", &[]);
    assert_eq!(positions, f64::from(usage.prompt_tokens) + completion - 1.0);
    assert_eq!(
        d("tessera_expert_routed_tokens_total", &[]),
        positions * moe_layers * top_k
    );
    assert_eq!(after.sum("tessera_kv_blocks_used", &[]), 0.0);

    for worker in WORKERS {
        let w = ("worker", worker);
        let calls = d("tessera_expert_forward_seconds_count", &[w]);
        assert!(calls > 0.0, "{worker} was called");
        assert_eq!(
            d(
                "tessera_expert_worker_forward_total",
                &[w, ("outcome", "ok")]
            ),
            calls,
            "{worker} answered every call the scheduler timed"
        );
        assert_eq!(
            d("tessera_expert_worker_forward_seconds_count", &[w]),
            calls
        );
        for direction in ["sent", "received"] {
            let bytes = d(
                "tessera_expert_forward_bytes_total",
                &[w, ("direction", direction)],
            );
            assert!(bytes > 0.0, "{worker}: no bytes {direction}");
        }
        assert!(d("tessera_expert_worker_tokens_total", &[w]) > 0.0);
    }
    assert_eq!(d("tessera_expert_forward_failures_total", &[]), 0.0);

    // The same image again, streamed: a vision-cache hit and a prefix-cache hit.
    let before = after;
    let mut stream = rt
        .block_on(client.generate_stream(image_request(4)))
        .unwrap()
        .into_inner();
    while rt.block_on(stream.message()).unwrap().is_some() {}
    let after = scrape_until(&web, |s| {
        gained(&before, s, "tessera_scheduler_generated_tokens_total", &[]) >= completion
    });
    let d = |name: &str, labels: &[(&str, &str)]| gained(&before, &after, name, labels);
    assert_eq!(d("tessera_requests_total", &ok), 1.0);
    assert_eq!(d("tessera_time_to_first_token_seconds_count", &[]), 1.0);
    assert_eq!(d("tessera_vision_cache_hits_total", &[]), 1.0);
    assert_eq!(d("tessera_vision_cache_misses_total", &[]), 0.0);
    assert_eq!(d("tessera_vision_images_encoded_total", &[]), 0.0);
    let reused = d("tessera_prefix_cache_hit_tokens_total", &[]);
    assert!(reused > 0.0, "the repeated prompt reuses cached blocks");
    assert_eq!(
        reused + d("tessera_scheduler_prefill_tokens_total", &[]),
        f64::from(usage.prompt_tokens)
    );

    // A bad request, and a completion through the HTTP API.
    let before = after;
    let mut bad = image_request(4);
    bad.messages.clear();
    let err = rt.block_on(client.generate(bad)).unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let body = json!({
        "model": info.model_id,
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 2,
    });
    let (status, answer) = http(&web, "POST", "/v1/chat/completions", &body.to_string());
    assert_eq!(status, 200, "{answer}");
    let answer: Value = serde_json::from_str(&answer).unwrap();
    let http_tokens = answer["usage"]["completion_tokens"].as_f64().unwrap();
    let after = scrape(&web);
    let d = |name: &str, labels: &[(&str, &str)]| gained(&before, &after, name, labels);
    let invalid = [("api", "grpc"), ("outcome", "invalid_argument")];
    assert_eq!(d("tessera_requests_total", &invalid), 1.0);
    let http_ok = [("api", "http"), ("outcome", "ok")];
    assert_eq!(d("tessera_requests_total", &http_ok), 1.0);
    assert_eq!(d("tessera_requests_total", &[]), 2.0);
    assert_eq!(d("tessera_completion_tokens_total", &[]), http_tokens);
    assert_eq!(
        d("tessera_time_to_first_token_seconds_count", &[]),
        1.0,
        "a refused request has no first token"
    );
}

/// Runs `tessera up --metrics 127.0.0.1:0`; returns the process and the
/// metrics address it prints before it serves.
fn up_with_metrics(model: &str) -> (up::Up, String) {
    let mut child = tessera()
        .args(["up", "--model", model, "--expert-workers", "2"])
        .args(["--grpc", "127.0.0.1:0", "--metrics", "127.0.0.1:0"])
        .args(["--grace-seconds", "5"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run tessera up");
    let stdout = child.stdout.take().unwrap();
    let process = up::Up(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut metrics = None;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(addr) = line.strip_prefix("tessera metrics on ") {
                metrics = Some(addr.to_owned());
            }
            if line.starts_with("tessera serving on ") {
                let _ = tx.send(metrics.take());
            }
        }
    });
    let metrics = rx
        .recv_timeout(DEADLINE)
        .expect("tessera up serves before the deadline")
        .expect("tessera up --metrics prints `tessera metrics on ADDR`");
    (process, metrics)
}

#[test]
fn up_serves_every_services_metrics_and_its_health_on_the_metrics_address() {
    let dir = fixture_dir("tiny-mha-softmax");
    let (_up, addr) = up_with_metrics(dir.to_str().unwrap());
    assert_eq!(http(&addr, "GET", "/health", ""), (200, "ok".to_owned()));
    let placed = |s: &Scrape| {
        WORKERS.iter().all(|worker| {
            s.sum(
                "tessera_expert_worker_placement_version",
                &[("worker", worker)],
            ) >= 1.0
        })
    };
    let s = scrape_until(&addr, placed);
    assert!(s.has("tessera_requests_in_flight"), "the gateway's metrics");
    let scheduler = s
        .matching("tessera_kv_blocks_free", &[])
        .next()
        .expect("the scheduler's metrics");
    assert!(scheduler.labels["scheduler"].starts_with("scheduler-"));
    assert!(
        s.has("tessera_vision_cache_hits_total"),
        "the vision-worker's"
    );
    assert_eq!(http(&addr, "GET", "/v1/models", "").0, 404);
}
