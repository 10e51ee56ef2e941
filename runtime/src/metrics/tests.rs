use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;

/// `GET path` over HTTP/1.0: the status code, the content type and the body.
async fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_owned())
        })
        .unwrap_or_default();
    (status, content_type, body.to_owned())
}

fn scrape() -> Scrape {
    Scrape::parse(&render()).unwrap()
}

#[test]
fn status_codes_become_snake_case_outcomes() {
    assert_eq!(outcome(tonic::Code::Ok), "ok");
    assert_eq!(outcome(tonic::Code::InvalidArgument), "invalid_argument");
    assert_eq!(
        outcome(tonic::Code::ResourceExhausted),
        "resource_exhausted"
    );
    assert_eq!(outcome(tonic::Code::DeadlineExceeded), "deadline_exceeded");
}

#[test]
fn services_of_one_process_report_under_their_own_member_ids() {
    let a = SchedulerMetrics::new("metrics-test-scheduler-a");
    let b = SchedulerMetrics::new("metrics-test-scheduler-b");
    a.waiting.set(3);
    b.waiting.set(5);
    a.steps.inc_by(2);
    let again = SchedulerMetrics::new("metrics-test-scheduler-a");
    again.steps.inc();
    let s = scrape();
    let waiting = |id| s.sum("tessera_scheduler_waiting_sequences", &[("scheduler", id)]);
    assert_eq!(waiting("metrics-test-scheduler-a"), 3.0);
    assert_eq!(waiting("metrics-test-scheduler-b"), 5.0);
    assert_eq!(
        s.sum(
            "tessera_scheduler_steps_total",
            &[("scheduler", "metrics-test-scheduler-a")]
        ),
        3.0,
        "a second handle for the same id adds to the same series"
    );

    let w = ExpertWorkerMetrics::new("metrics-test-worker");
    w.answered(tonic::Code::Ok);
    w.answered(tonic::Code::Ok);
    w.answered(tonic::Code::FailedPrecondition);
    w.forward_seconds.observe(0.002);
    let s = scrape();
    let worker = ("worker", "metrics-test-worker");
    assert_eq!(
        s.sum(
            "tessera_expert_worker_forward_total",
            &[worker, ("outcome", "ok")]
        ),
        2.0
    );
    assert_eq!(
        s.sum(
            "tessera_expert_worker_forward_total",
            &[worker, ("outcome", "failed_precondition")]
        ),
        1.0
    );
    assert_eq!(
        s.sum("tessera_expert_worker_forward_seconds_count", &[worker]),
        1.0
    );
    assert_eq!(
        s.sum(
            "tessera_expert_worker_forward_seconds_bucket",
            &[worker, ("le", "0.0025")]
        ),
        1.0
    );
}

#[test]
fn routed_tokens_and_forward_bytes_accumulate_by_label() {
    let d = ExpertDispatch::get();
    d.routed(901, 3, 4);
    d.routed(901, 3, 2);
    d.routed(901, 4, 1);
    d.sent("metrics-test-dispatch", 100);
    d.received("metrics-test-dispatch", 40, 0.01);
    d.failed("metrics-test-dispatch");
    let s = scrape();
    let routed = |e| {
        s.sum(
            "tessera_expert_routed_tokens_total",
            &[("layer", "901"), ("expert", e)],
        )
    };
    assert_eq!((routed("3"), routed("4")), (6.0, 1.0));
    let worker = ("worker", "metrics-test-dispatch");
    let bytes = |dir| {
        s.sum(
            "tessera_expert_forward_bytes_total",
            &[worker, ("direction", dir)],
        )
    };
    assert_eq!((bytes("sent"), bytes("received")), (100.0, 40.0));
    assert_eq!(
        s.sum("tessera_expert_forward_seconds_count", &[worker]),
        1.0
    );
    assert_eq!(
        s.sum("tessera_expert_forward_failures_total", &[worker]),
        1.0
    );
}

#[tokio::test]
async fn the_endpoint_serves_metrics_and_health_until_dropped() {
    let gateway = Gateway::get();
    let before = scrape().sum("tessera_requests_total", &[("outcome", "unavailable")]);
    gateway.finished("grpc", "unavailable");
    let vision = VisionMetrics::new("metrics-test-vision");
    vision.cache_hits.inc();

    let ready = Arc::new(AtomicBool::new(false));
    let flag = ready.clone();
    let endpoint = Endpoint::start("127.0.0.1:0".parse().unwrap(), move || {
        flag.load(Ordering::Relaxed)
    })
    .await
    .unwrap();
    let addr = endpoint.local_addr();

    let (status, content_type, body) = get(addr, "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(content_type, CONTENT_TYPE);
    let page = Scrape::parse(&body).unwrap();
    assert_eq!(
        page.sum("tessera_requests_total", &[("outcome", "unavailable")]),
        before + 1.0
    );
    assert_eq!(
        page.sum(
            "tessera_vision_cache_hits_total",
            &[("vision_worker", "metrics-test-vision")]
        ),
        1.0
    );
    assert!(body.contains("# TYPE tessera_time_to_first_token_seconds histogram"));

    assert_eq!(get(addr, "/health").await.0, 503);
    ready.store(true, Ordering::Relaxed);
    let (status, _, body) = get(addr, "/health").await;
    assert_eq!((status, body.as_str()), (200, "ok"));
    assert_eq!(get(addr, "/nothing").await.0, 404);

    // A second endpoint on the same port is refused with the address named.
    let err = Endpoint::start(addr, || true).await.unwrap_err();
    assert!(err.to_string().contains(&addr.to_string()), "{err}");

    drop(endpoint);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while TcpStream::connect(addr).await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the endpoint still accepts connections after it was dropped"
        );
        tokio::task::yield_now().await;
    }
}
