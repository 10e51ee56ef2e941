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
fn families_defined_here_render_with_their_labels_and_buckets() {
    let c = counters(
        "tessera_test_calls_total",
        "Test calls.",
        &["member", "outcome"],
    );
    c.with_label_values(&["a", outcome(tonic::Code::Ok)])
        .inc_by(2);
    c.with_label_values(&["b", "ok"]).inc();
    let g = gauge("tessera_test_depth", "Test depth.");
    g.set(7);
    let h = histogram("tessera_test_seconds", "Test seconds.", FORWARD_BUCKETS);
    h.observe(0.002);
    let s = scrape();
    assert_eq!(
        s.sum(
            "tessera_test_calls_total",
            &[("member", "a"), ("outcome", "ok")]
        ),
        2.0
    );
    assert_eq!(s.sum("tessera_test_calls_total", &[]), 3.0);
    assert_eq!(s.sum("tessera_test_depth", &[]), 7.0);
    assert_eq!(
        s.sum("tessera_test_seconds_bucket", &[("le", "0.0025")]),
        1.0
    );
    assert_eq!(
        s.sum("tessera_test_seconds_bucket", &[("le", "0.001")]),
        0.0
    );
}

#[tokio::test]
async fn the_endpoint_serves_metrics_and_health_until_dropped() {
    let requests = counter("tessera_test_endpoint_total", "Test requests.");
    requests.inc();
    let hits = counters("tessera_test_hits_total", "Test hits.", &["vision_worker"]);
    hits.with_label_values(&["metrics-test-vision"]).inc();
    let _ttft = histogram("tessera_test_ttft_seconds", "Test TTFT.", TTFT_BUCKETS);

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
    assert_eq!(page.sum("tessera_test_endpoint_total", &[]), 1.0);
    assert_eq!(
        page.sum(
            "tessera_test_hits_total",
            &[("vision_worker", "metrics-test-vision")]
        ),
        1.0
    );
    assert!(body.contains("# TYPE tessera_test_ttft_seconds histogram"));

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
