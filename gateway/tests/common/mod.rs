//! Helpers of the gateway's service tests: a real gateway on 127.0.0.1:0 with an
//! in-memory discovery, fixture paths, request builders and a loopback server for
//! fake members.

use std::io::Cursor;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use image::{DynamicImage, ImageFormat, RgbImage};
use tessera_gateway::Config;
use tessera_proto::MAX_MESSAGE_BYTES;
use tessera_proto::v1::tessera_client::TesseraClient;
use tessera_proto::v1::{GenerateRequest, Image, Message, Part, Role, StoppingParams, part};
use tessera_runtime::shutdown::CancellationToken;
use tessera_runtime::{Discovery, MemoryDiscovery, Role as MemberRole};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::transport::server::{Router, TcpIncoming};

/// Longest wait for anything a test polls for.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// A fixture snapshot folder of the workspace.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

/// The case called `name` of a fixture's `cases.json`.
pub fn case(fixture_name: &str, name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixture(fixture_name).join("cases.json")).unwrap();
    let cases: serde_json::Value = serde_json::from_str(&text).unwrap();
    cases["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no case {name} in {fixture_name}"))
        .clone()
}

/// A JSON array of ids.
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    serde_json::from_value(v.clone()).unwrap()
}

/// A running gateway.
pub struct Gateway {
    pub addr: SocketAddr,
    /// The OpenAI-compatible HTTP API's address, when started with one.
    pub http: Option<SocketAddr>,
    pub discovery: MemoryDiscovery,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<tessera_gateway::Result<()>>,
}

impl Gateway {
    /// A gateway for `cfg` on 127.0.0.1:0, returned once it registered in `discovery`.
    pub async fn start(cfg: Config, discovery: MemoryDiscovery) -> Self {
        Self::launch(cfg, discovery, false).await
    }

    /// Like [`Gateway::start`], also serving the HTTP API on another 127.0.0.1:0.
    pub async fn start_http(cfg: Config, discovery: MemoryDiscovery) -> Self {
        Self::launch(cfg, discovery, true).await
    }

    async fn launch(cfg: Config, discovery: MemoryDiscovery, with_http: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let http_listener = if with_http {
            Some(TcpListener::bind("127.0.0.1:0").await.unwrap())
        } else {
            None
        };
        let http = http_listener.as_ref().map(|l| l.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(tessera_gateway::run_with(
            cfg,
            listener,
            http_listener,
            Arc::new(discovery.clone()) as Arc<dyn Discovery>,
            shutdown.clone(),
        ));
        let mut members = discovery.subscribe();
        tokio::time::timeout(
            DEADLINE,
            members.wait_for(|m| m.iter().any(|m| m.role == MemberRole::Gateway)),
        )
        .await
        .expect("the gateway registers in time")
        .unwrap();
        Self {
            addr,
            http,
            discovery,
            shutdown,
            task,
        }
    }

    /// A gateway for a fixture with every default.
    pub async fn fixture(name: &str, discovery: MemoryDiscovery) -> Self {
        Self::start(Config::new(fixture(name)), discovery).await
    }

    /// A client with the raised message limits.
    pub async fn client(&self) -> TesseraClient<Channel> {
        TesseraClient::connect(format!("http://{}", self.addr))
            .await
            .unwrap()
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

/// Serves `router` on 127.0.0.1:0 until the test ends.
pub async fn serve(router: Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(router.serve_with_incoming(TcpIncoming::from(listener)));
    addr
}

pub fn text(s: &str) -> Part {
    Part {
        kind: Some(part::Kind::Text(s.into())),
    }
}

pub fn image(data: Vec<u8>) -> Part {
    Part {
        kind: Some(part::Kind::Image(Image {
            data: data.into(),
            mime_type: String::new(),
        })),
    }
}

pub fn message(role: Role, parts: Vec<Part>) -> Message {
    Message {
        role: role.into(),
        parts,
    }
}

/// A one-message user request.
pub fn ask(parts: Vec<Part>) -> GenerateRequest {
    GenerateRequest {
        messages: vec![message(Role::User, parts)],
        ..Default::default()
    }
}

/// `req` with `max_tokens` set.
pub fn with_max_tokens(mut req: GenerateRequest, max_tokens: u32) -> GenerateRequest {
    req.stopping = Some(StoppingParams {
        max_tokens: Some(max_tokens),
        ..req.stopping.unwrap_or_default()
    });
    req
}

/// A PNG of `width` × `height` black pixels.
pub fn png(width: u32, height: u32) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    DynamicImage::ImageRgb8(RgbImage::new(width, height))
        .write_to(&mut out, ImageFormat::Png)
        .unwrap();
    out.into_inner()
}

/// A fixture's image file.
pub fn fixture_image(fixture_name: &str, file: &str) -> Vec<u8> {
    std::fs::read(fixture(fixture_name).join(file)).unwrap()
}

/// A fixture case's conversation as a request, images read from the fixture.
pub fn case_request(fixture_name: &str, case: &serde_json::Value) -> GenerateRequest {
    let mut messages = Vec::new();
    for m in case["conversation"].as_array().unwrap() {
        let role = match m["role"].as_str().unwrap() {
            "<|User|>" => Role::User,
            "<|Assistant|>" => Role::Assistant,
            _ => Role::System,
        };
        let content = m["content"].as_str().unwrap();
        if role == Role::Assistant && content.is_empty() {
            continue; // the implied empty answer
        }
        let mut files = m["images"].as_array().into_iter().flatten();
        let mut parts = Vec::new();
        for (i, piece) in content.split("<image>").enumerate() {
            if i > 0 {
                let file = files.next().unwrap().as_str().unwrap();
                parts.push(image(fixture_image(fixture_name, file)));
            }
            parts.push(text(piece));
        }
        messages.push(message(role, parts));
    }
    GenerateRequest {
        messages,
        ..Default::default()
    }
}
