//! The worker's lifecycle: UNAVAILABLE before its model is loaded, SERVING and
//! registered after, deregistered and returned after shutdown; a load error is
//! returned from `run` and nothing registers.

#[allow(dead_code)]
mod common;

use std::sync::Arc;

use common::{DEADLINE, Worker, fixture, request};
use tessera_proto::internal::v1::vision_server::Vision;
use tessera_runtime::{CancellationToken, Discovery, MemoryDiscovery, Role};
use tessera_vision_worker::{Config, Error, VisionService};
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_when_loaded_reports_serving_and_deregisters_on_shutdown() {
    let worker = Worker::spawn(Config::new(fixture())).await;
    let member = worker.registered().await;
    assert_eq!(member.role, Role::VisionWorker);
    assert_eq!(
        member.address, worker.address,
        "advertises the listener's address"
    );
    assert_eq!(member.id, format!("vision-worker-{}", worker.address));

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", worker.address))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    for service in ["tessera.internal.v1.Vision", ""] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "service {service:?}");
    }
    assert_eq!(worker.encode(&["img_384x384.png"]).await.images.len(), 1);

    let discovery = worker.discovery.clone();
    worker.stop().await.unwrap();
    assert!(common::is_empty(&discovery), "{:?}", discovery.members());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn id_and_advertised_address_come_from_the_config() {
    let mut cfg = Config::new(fixture());
    cfg.member.id = Some("vision-a".into());
    cfg.member.advertise = Some("vision-a.internal:7000".into());
    let worker = Worker::spawn(cfg).await;
    let member = worker.registered().await;
    assert_eq!(
        (member.id.as_str(), member.address.as_str()),
        ("vision-a", "vision-a.internal:7000")
    );
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_snapshot_is_a_load_error_and_never_registers() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let discovery = MemoryDiscovery::new();
    let missing = fixture().join("no-such-snapshot");
    let run = tessera_vision_worker::run(
        Config::new(&missing),
        listener,
        Arc::new(discovery.clone()),
        CancellationToken::new(),
    );
    let err = tokio::time::timeout(DEADLINE, run)
        .await
        .expect("run returns on a load error")
        .unwrap_err();
    assert!(matches!(err, Error::Load(_)), "{err}");
    assert!(err.to_string().contains("no-such-snapshot"), "{err}");
    assert!(discovery.members().is_empty());
}

#[tokio::test]
async fn requests_before_the_model_is_loaded_are_unavailable() {
    let service = VisionService::new(&Config::new(fixture()));
    let status = service
        .encode(tonic::Request::new(request(&["img_384x384.png"])))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains("still loading"),
        "{}",
        status.message()
    );
}
