//! Remote images in the OpenAI API against a real image server on loopback: a
//! served PNG gives the same request as its data: URI, and a huge body, a slow
//! server, an HTML page, a 404 and a redirect to `file:` are 400s that say why,
//! after which the gateway keeps serving.

#[allow(dead_code)] // each test binary uses a different subset of the helpers
mod common;
#[allow(dead_code)]
mod fakes;

use std::convert::Infallible;
use std::net::SocketAddr;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{Method, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use common::*;
use fakes::{FakeScheduler, FakeVision, SchedulerScript, VisionScript};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tessera_gateway::{Config, RemoteImageConfig};
use tessera_model::chat::ChatTokenizer;
use tessera_proto::internal::v1::StopReason;
use tessera_runtime::{MemoryDiscovery, Registration};
use tokio::net::TcpListener;

const FIXTURE: &str = "tiny-mha-softmax";
const IMAGE: &str = "img_640x480.png";
const ANSWER: &str = "A picture.";
/// The gateway's cap on a remote image: above the fixture image, below `/huge`.
const MAX_BYTES: usize = 1 << 20;

/// A web server with one route per case.
async fn image_server() -> SocketAddr {
    let png = fixture_image(FIXTURE, IMAGE);
    let png_type = || [(header::CONTENT_TYPE, "image/png")];
    let chunks = |n: usize| {
        let chunk = Bytes::from(vec![0_u8; 64 << 10]);
        tokio_stream::iter((0..n).map(move |_| Ok::<_, Infallible>(chunk.clone())))
    };
    let router = Router::new()
        .route("/cat.png", get(move || async move { (png_type(), png) }))
        .route(
            "/huge",
            // Streamed without a length: the cap must hold while reading.
            get(move || async move { Body::from_stream(chunks(4 * MAX_BYTES / (64 << 10))) }),
        )
        .route(
            "/huge-announced",
            get(move || async move { (png_type(), vec![0_u8; 2 * MAX_BYTES]) }),
        )
        .route(
            "/slow",
            get(|| async {
                std::future::pending::<()>().await;
                StatusCode::OK
            }),
        )
        .route(
            "/stalls",
            get(move || async move {
                let first = tokio_stream::iter([Ok::<_, Infallible>(Bytes::from_static(
                    b"\x89PNG\r\n\x1a\n",
                ))]);
                let stall = tokio_stream::pending::<Result<Bytes, Infallible>>();
                Body::from_stream(tokio_stream::StreamExt::chain(first, stall))
            }),
        )
        .route(
            "/page.html",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/html")],
                    "<html><body>not a cat</body></html>",
                )
            }),
        )
        .route("/gone.png", get(|| async { StatusCode::NOT_FOUND }))
        .route("/to-file", get(|| async { redirect("file:///etc/passwd") }))
        .route(
            "/to-ftp",
            get(|| async { redirect("ftp://127.0.0.1/cat.png") }),
        )
        .route("/to-cat", get(|| async { redirect("/cat.png") }));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    addr
}

fn redirect(location: &'static str) -> Response {
    (StatusCode::FOUND, [(header::LOCATION, location)]).into_response()
}

struct Cluster {
    http: SocketAddr,
    vision: FakeVision,
    scheduler: FakeScheduler,
    client: Client<HttpConnector, Full<Bytes>>,
    _gateway: Gateway,
    _members: Vec<Registration>,
}

/// A gateway with HTTP, remote images as `remote` sets them.
async fn cluster(remote: RemoteImageConfig) -> Cluster {
    let tok = ChatTokenizer::from_dir(&fixture(FIXTURE)).unwrap();
    let answer = tok.encode(ANSWER).unwrap();
    let discovery = MemoryDiscovery::new();
    let vision = FakeVision::new(&fixture(FIXTURE), VisionScript::Correct);
    let scheduler = FakeScheduler::new(SchedulerScript::Tokens(vec![answer], StopReason::Eos));
    let members = fakes::register(&discovery, &vision, &scheduler).await;
    let mut cfg = Config::new(fixture(FIXTURE));
    cfg.remote_images = remote;
    let gateway = Gateway::start_http(cfg, discovery).await;
    Cluster {
        http: gateway.http.unwrap(),
        vision,
        scheduler,
        client: Client::builder(TokioExecutor::new()).build_http(),
        _gateway: gateway,
        _members: members,
    }
}

fn allowed(timeout_seconds: u64) -> RemoteImageConfig {
    RemoteImageConfig {
        allow_remote_images: true,
        remote_image_timeout_seconds: timeout_seconds,
        remote_image_max_bytes: MAX_BYTES,
        // The test servers are on loopback.
        allow_private_image_hosts: true,
    }
}

impl Cluster {
    /// Asks about the image at `url`: the status and the JSON body.
    async fn ask(&self, url: &str) -> (u16, Value) {
        let body = json!({
            "model": FIXTURE,
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "What is in this image?"},
                {"type": "image_url", "image_url": {"url": url}},
            ]}],
        });
        let request = Request::builder()
            .method(Method::POST)
            .uri(format!("http://{}/v1/chat/completions", self.http))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let response = tokio::time::timeout(DEADLINE, self.client.request(request))
            .await
            .expect("an answer in time")
            .unwrap();
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&body).unwrap())
    }

    /// Asks about the image at `url` and returns the 400's message.
    async fn refused(&self, url: &str) -> String {
        let (status, body) = self.ask(url).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
        let message = body["error"]["message"].as_str().unwrap().to_owned();
        assert!(message.starts_with("messages[0].content[1]: "), "{message}");
        message
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_served_image_is_the_same_request_as_its_data_uri() {
    let server = image_server().await;
    let cluster = cluster(allowed(10)).await;
    let png = fixture_image(FIXTURE, IMAGE);

    let (status, remote) = cluster.ask(&format!("http://{server}/cat.png")).await;
    assert_eq!(status, 200, "{remote}");
    let inline_url = format!("data:image/png;base64,{}", STANDARD.encode(&png));
    let (status, inline) = cluster.ask(&inline_url).await;
    assert_eq!(status, 200, "{inline}");
    let (status, redirected) = cluster.ask(&format!("http://{server}/to-cat")).await;
    assert_eq!(status, 200, "{redirected}");

    for body in [&remote, &redirected] {
        assert_eq!(body["choices"], inline["choices"]);
        assert_eq!(body["usage"], inline["usage"]);
    }
    assert_eq!(remote["choices"][0]["message"]["content"], ANSWER);
    // The vision-worker got the same bytes, and the scheduler the same prompt.
    let calls = cluster.vision.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 3);
    for call in &calls {
        assert_eq!(call.images.len(), 1);
        assert!(call.images[0].data == png, "the image bytes differ");
        assert_eq!(call.images[0].mime_type, "image/png");
    }
    let submitted = cluster.scheduler.submitted.lock().unwrap().clone();
    assert_eq!(submitted.len(), 3);
    assert_eq!(submitted[0].1.input_ids, submitted[1].1.input_ids);
    assert_eq!(submitted[2].1.input_ids, submitted[1].1.input_ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_remote_images_are_400s_that_say_why() {
    let server = image_server().await;
    let cluster = cluster(allowed(1)).await;
    let url = |path: &str| format!("http://{server}{path}");

    for path in ["/huge", "/huge-announced"] {
        let message = cluster.refused(&url(path)).await;
        assert!(
            message.contains(&format!(
                "larger than this server's limit of {MAX_BYTES} bytes"
            )),
            "{path}: {message}"
        );
        assert!(message.contains("--remote-image-max-bytes"), "{message}");
    }
    for path in ["/slow", "/stalls"] {
        let message = cluster.refused(&url(path)).await;
        assert!(message.contains("took longer than 1s"), "{path}: {message}");
    }
    let message = cluster.refused(&url("/page.html")).await;
    assert!(message.contains("did not return an image"), "{message}");
    assert!(message.contains("text/html"), "{message}");
    let message = cluster.refused(&url("/gone.png")).await;
    assert!(message.contains("HTTP 404"), "{message}");
    let message = cluster.refused(&url("/to-file")).await;
    assert!(message.contains("not an http(s) URL"), "{message}");
    assert!(!message.contains("/etc/passwd"), "{message}");
    let message = cluster.refused(&url("/to-ftp")).await;
    assert!(message.contains("redirected to a ftp: URL"), "{message}");
    // Nothing reached the workers, and a good image still works.
    assert!(cluster.vision.calls.lock().unwrap().is_empty());
    let (status, body) = cluster.ask(&url("/cat.png")).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_images_are_off_unless_allowed() {
    let server = image_server().await;
    let cluster = cluster(RemoteImageConfig::default()).await;
    let message = cluster.refused(&format!("http://{server}/cat.png")).await;
    assert!(
        message.contains("remote image URLs are not enabled"),
        "{message}"
    );
    assert!(message.contains("--allow-remote-images"), "{message}");
    assert!(message.contains("data:"), "{message}");
    assert!(cluster.vision.calls.lock().unwrap().is_empty());
}

/// Without `--allow-private-image-hosts` a URL naming a loopback or private address,
/// or a host name that resolves to one, is refused before any connection is made, and
/// the refusal says which flag allows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_addresses_are_refused_by_default() {
    // A listener that counts the connections it gets.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = std::sync::Arc::clone(&connections);
    tokio::spawn(async move {
        while listener.accept().await.is_ok() {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let cluster = cluster(RemoteImageConfig {
        allow_private_image_hosts: false,
        ..allowed(10)
    })
    .await;
    for url in [
        format!("http://127.0.0.1:{port}/cat.png"),
        format!("http://localhost:{port}/cat.png"),
        format!("http://[::1]:{port}/cat.png"),
        format!("http://2130706433:{port}/cat.png"),
        "http://169.254.169.254/latest/meta-data/".to_owned(),
        "http://10.0.0.1/cat.png".to_owned(),
    ] {
        let (status, body) = cluster.ask(&url).await;
        assert_eq!(status, 400, "{url}: {body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("--allow-private-image-hosts"),
            "{url}: {message}"
        );
    }
    assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), 0);
    assert!(cluster.scheduler.submitted.lock().unwrap().is_empty());
}
