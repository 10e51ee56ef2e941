//! OpenAI API features over HTTP between a fake vision-worker and a fake scheduler:
//! `n` choices, served model names, API keys, and the fields this server refuses by
//! name.

#[allow(dead_code)] // each test binary uses a different subset of the helpers
mod common;
#[allow(dead_code)]
mod fakes;
#[allow(dead_code)]
mod openai_http;

use axum::body::Bytes;
use axum::http::{Method, Request, header};
use common::*;
use fakes::{FakeScheduler, FakeVision, SchedulerScript, VisionScript};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use openai_http::*;
use serde_json::{Value, json};
use tessera_gateway::Config;
use tessera_model::chat::ChatTokenizer;
use tessera_proto::internal::v1::StopReason;
use tessera_proto::v1::ModelInfoRequest;
use tessera_runtime::MemoryDiscovery;
use tonic::Code;

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
    let events = sse_chunks(&text);
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
    let sampling = submitted[0].1.sampling.unwrap();
    assert_eq!(sampling.top_k, 5);
    assert_eq!(sampling.repetition_penalty, 1.1);
    assert_eq!(sampling.presence_penalty, 0.4);
    assert_eq!(sampling.frequency_penalty, -0.25);
}
