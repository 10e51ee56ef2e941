//! Per-key limits through a gateway with API keys: one key's generations beyond
//! `--max-concurrent-per-key` or `--requests-per-minute-per-key` are refused with
//! RESOURCE_EXHAUSTED naming the flag, other keys are not affected, and a key's slot
//! comes back when its stream ends.

#[allow(dead_code)] // each test binary uses a different subset of the helpers
mod common;
#[allow(dead_code)]
mod fakes;

use std::time::Duration;

use common::*;
use fakes::{FakeScheduler, FakeVision, SchedulerScript, VisionScript};
use tessera_gateway::Config;
use tessera_proto::internal::v1::StopReason;
use tessera_proto::v1::{GenerateRequest, Message, Role};
use tessera_runtime::MemoryDiscovery;
use tonic::Code;

const DEADLINE: Duration = Duration::from_secs(60);

fn hello(key: &str) -> tonic::Request<GenerateRequest> {
    let mut request = tonic::Request::new(GenerateRequest {
        messages: vec![Message {
            role: Role::User.into(),
            parts: vec![text("Hello.")],
        }],
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    request
}

/// A gateway whose keys are `key-a…` and `key-b…`, configured by `limits`, in front
/// of a scheduler following `script`.
async fn gateway(
    script: SchedulerScript,
    limits: impl FnOnce(&mut Config),
) -> (Gateway, Vec<tessera_runtime::Registration>) {
    let dir = tempfile_dir();
    let keys = dir.join("keys");
    std::fs::write(&keys, "key-a-0123456789\nkey-b-0123456789\n").unwrap();
    let discovery = MemoryDiscovery::new();
    let vision = FakeVision::new(&fixture("tiny-mha-softmax"), VisionScript::Correct);
    let scheduler = FakeScheduler::new(script);
    let members = fakes::register(&discovery, &vision, &scheduler).await;
    let mut cfg = Config::new(fixture("tiny-mha-softmax"));
    cfg.auth.api_key_file = Some(keys);
    limits(&mut cfg);
    (Gateway::start(cfg, discovery).await, members)
}

/// A fresh folder for this test binary's key files.
fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tessera-key-limits-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_runs_at_most_its_concurrent_generations() {
    let (gateway, _members) = gateway(SchedulerScript::Hang(vec![5, 6]), |cfg| {
        cfg.auth.max_concurrent_per_key = 1;
    })
    .await;
    let mut client = gateway.client().await;
    let mut running = client
        .generate_stream(hello("key-a-0123456789"))
        .await
        .unwrap()
        .into_inner();
    assert!(
        running.message().await.unwrap().is_some(),
        "the first one runs"
    );

    let refused = client
        .generate_stream(hello("key-a-0123456789"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("--max-concurrent-per-key"),
        "{refused:?}"
    );

    let mut other = client
        .generate_stream(hello("key-b-0123456789"))
        .await
        .expect("another key is not limited by this one")
        .into_inner();
    assert!(other.message().await.unwrap().is_some());

    // The key's slot comes back once its stream is gone.
    drop(running);
    tokio::time::timeout(DEADLINE, async {
        loop {
            match client.generate_stream(hello("key-a-0123456789")).await {
                Ok(_) => break,
                Err(s) if s.code() == Code::ResourceExhausted => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(s) => panic!("{s:?}"),
            }
        }
    })
    .await
    .expect("the slot is released when the stream ends");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_starts_at_most_its_requests_per_minute() {
    let script = SchedulerScript::Tokens(vec![vec![5, 6]], StopReason::Length);
    let (gateway, _members) = gateway(script, |cfg| {
        cfg.auth.requests_per_minute_per_key = 2;
    })
    .await;
    let mut client = gateway.client().await;
    for _ in 0..2 {
        client.generate(hello("key-a-0123456789")).await.unwrap();
    }
    let refused = client
        .generate(hello("key-a-0123456789"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("retry in"), "{refused:?}");
    client
        .generate(hello("key-b-0123456789"))
        .await
        .expect("another key has its own allowance");
}
