//! A whole Tessera cluster in the test process: expert-workers, a vision-worker, a
//! scheduler and a gateway, each a real gRPC server on its own `127.0.0.1:0`
//! port, and a client of the public API. Shared by the end-to-end tests.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tessera_model::chat::{Message, Role};
use tessera_proto::MAX_MESSAGE_BYTES;
use tessera_proto::v1::generate_stream_response::Event;
use tessera_proto::v1::tessera_client::TesseraClient;
use tessera_proto::v1::{self, GenerateRequest, GenerateResponse, part};
use tessera_runtime::tls::TlsArgs;
use tessera_runtime::{CancellationToken, Discovery};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// Generous bound on anything a test waits for; nothing should come near it.
pub const DEADLINE: Duration = Duration::from_secs(120);

type Service = JoinHandle<anyhow::Result<()>>;

/// One expert-worker of a [`Cluster`].
pub struct Worker {
    pub id: String,
    pub stop: CancellationToken,
    pub task: Service,
}

/// The services of one cluster and a client of its gateway.
pub struct Cluster {
    pub addr: SocketAddr,
    pub client: TesseraClient<Channel>,
    pub workers: Vec<Worker>,
    stop: CancellationToken,
    services: Vec<Service>,
}

async fn loopback() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.unwrap()
}

/// Starts an expert-worker with id `id`, registered through `discovery`.
pub async fn start_worker(model: &Path, id: &str, discovery: Arc<dyn Discovery>) -> Worker {
    start_worker_with(model, id, discovery, &TlsArgs::plaintext()).await
}

/// [`start_worker`] with the cluster's mutual TLS.
pub async fn start_worker_with(
    model: &Path,
    id: &str,
    discovery: Arc<dyn Discovery>,
    tls: &TlsArgs,
) -> Worker {
    let mut cfg = tessera_expert_worker::Config::new(model);
    cfg.member.tls = tls.clone();
    cfg.member.id = Some(id.to_string());
    cfg.member.grace_seconds = 5;
    let stop = CancellationToken::new();
    let run = tessera_expert_worker::run(cfg, loopback().await, discovery, stop.clone());
    Worker {
        id: id.to_string(),
        stop,
        task: tokio::spawn(async move { run.await.map_err(anyhow::Error::from) }),
    }
}

impl Cluster {
    /// Starts the cluster; `discovery()` gives each service its discovery client
    /// (the same in-process one, or one etcd client per service like separate
    /// processes). Waits until the gateway's health reports SERVING.
    pub async fn start(
        model: &Path,
        n_workers: usize,
        discovery: impl Fn() -> Arc<dyn Discovery>,
    ) -> Cluster {
        Self::start_with(model, n_workers, discovery, &TlsArgs::plaintext()).await
    }

    /// [`Cluster::start`] with every member on the mutual TLS of `tls`; the client of
    /// the gateway trusts its CA.
    pub async fn start_with(
        model: &Path,
        n_workers: usize,
        discovery: impl Fn() -> Arc<dyn Discovery>,
        tls: &TlsArgs,
    ) -> Cluster {
        let stop = CancellationToken::new();
        let mut workers = Vec::new();
        for i in 0..n_workers {
            let id = format!("expert-worker-{i}");
            workers.push(start_worker_with(model, &id, discovery(), tls).await);
        }
        let mut services: Vec<Service> = Vec::new();
        let mut vision = tessera_vision_worker::Config::new(model);
        vision.member.tls = tls.clone();
        vision.member.grace_seconds = 5;
        let run = tessera_vision_worker::run(vision, loopback().await, discovery(), stop.clone());
        services.push(tokio::spawn(async move {
            run.await.map_err(anyhow::Error::from)
        }));
        let mut scheduler = tessera_scheduler::Config::new(model);
        scheduler.member.tls = tls.clone();
        scheduler.member.grace_seconds = 5;
        scheduler.expert_wait_seconds = 20;
        // The default pool is resident at start and sized for every sequence's whole
        // context; the tests need far less.
        scheduler.engine.kv_cache_bytes = Some(64 << 20);
        let run = tessera_scheduler::run(scheduler, loopback().await, discovery(), stop.clone());
        services.push(tokio::spawn(async move {
            run.await.map_err(anyhow::Error::from)
        }));
        let public = loopback().await;
        let addr = public.local_addr().unwrap();
        let mut gateway = tessera_gateway::Config::new(model);
        gateway.member.tls = tls.clone();
        gateway.member.grace_seconds = 5;
        let run = tessera_gateway::run(gateway, public, discovery(), stop.clone());
        services.push(tokio::spawn(async move {
            run.await.map_err(anyhow::Error::from)
        }));

        let channel = match &tls.tls_ca {
            Some(ca) => {
                let ca = tonic::transport::Certificate::from_pem(std::fs::read(ca).unwrap());
                let client = tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(ca)
                    .domain_name(tls.tls_server_name.clone());
                Channel::from_shared(format!("https://{addr}"))
                    .unwrap()
                    .tls_config(client)
                    .unwrap()
                    .connect_lazy()
            }
            None => Channel::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect_lazy(),
        };
        wait_serving(channel.clone()).await;
        let mut client = TesseraClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        wait_members(&mut client, n_workers).await;
        Cluster {
            addr,
            client,
            workers,
            stop,
            services,
        }
    }

    /// Stops every service and checks each exited cleanly.
    pub async fn stop(self) {
        self.stop.cancel();
        for w in &self.workers {
            w.stop.cancel();
        }
        for task in self
            .services
            .into_iter()
            .chain(self.workers.into_iter().map(|w| w.task))
        {
            tokio::time::timeout(DEADLINE, task)
                .await
                .expect("service stops before the deadline")
                .unwrap()
                .unwrap();
        }
    }
}

/// Polls `ClusterStatus` until a scheduler, a vision-worker and `n_workers`
/// expert-workers holding experts are registered.
pub async fn wait_members(client: &mut TesseraClient<Channel>, n_workers: usize) {
    use tessera_proto::v1::{ClusterStatusRequest, MemberRole};
    tokio::time::timeout(DEADLINE, async {
        loop {
            let status = client
                .cluster_status(ClusterStatusRequest {})
                .await
                .unwrap()
                .into_inner();
            let count =
                |role: MemberRole| status.members.iter().filter(|m| m.role() == role).count();
            let holding = status
                .members
                .iter()
                .filter(|m| m.role() == MemberRole::ExpertWorker && !m.experts.is_empty())
                .count();
            if count(MemberRole::Scheduler) == 1
                && count(MemberRole::VisionWorker) == 1
                && holding == n_workers
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("every member registers before the deadline");
}

/// Polls the gRPC health service at `channel` until it reports SERVING.
pub async fn wait_serving(channel: Channel) {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let mut health = HealthClient::new(channel);
    tokio::time::timeout(DEADLINE, async {
        loop {
            let status = health
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .map(|r| r.into_inner().status());
            if status.is_ok_and(|s| s == ServingStatus::Serving) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the gateway reports SERVING before the deadline");
}

/// A fixture case's conversation as a public request: text parts with the
/// images (read from the fixture folder) where their `<image>` tags stand.
pub fn case_request(fixture: &Path, case: &Value, max_tokens: u32) -> GenerateRequest {
    let mut messages: Vec<Message> = serde_json::from_value(case["conversation"].clone()).unwrap();
    if messages
        .last()
        .is_some_and(|m| m.role == Role::Assistant && m.content.is_empty())
    {
        messages.pop();
    }
    let mut out = Vec::new();
    for m in &messages {
        let mut images = m.images.iter();
        let mut parts = Vec::new();
        let mut pieces = m.content.split("<image>").peekable();
        while let Some(text) = pieces.next() {
            if !text.is_empty() {
                parts.push(v1::Part {
                    kind: Some(part::Kind::Text(text.to_string())),
                });
            }
            if pieces.peek().is_some() {
                let file = images.next().expect("an image per <image> tag");
                let data = std::fs::read(fixture.join(file)).unwrap();
                parts.push(v1::Part {
                    kind: Some(part::Kind::Image(v1::Image {
                        data: data.into(),
                        mime_type: "image/png".into(),
                    })),
                });
            }
        }
        let role = match m.role {
            Role::System => v1::Role::System,
            Role::User => v1::Role::User,
            Role::Assistant => v1::Role::Assistant,
        };
        out.push(v1::Message {
            role: role as i32,
            parts,
        });
    }
    GenerateRequest {
        request_id: String::new(),
        messages: out,
        sampling: None,
        stopping: Some(v1::StoppingParams {
            max_tokens: Some(max_tokens),
            stop: Vec::new(),
            ignore_eos: true,
        }),
    }
}

/// The streamed answer: concatenated delta text and ids, and the closing message.
pub struct Streamed {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub finished: v1::GenerateFinished,
}

/// Runs `request` through `GenerateStream`.
pub async fn stream(
    client: &mut TesseraClient<Channel>,
    request: GenerateRequest,
) -> Result<Streamed, tonic::Status> {
    let mut s = client.generate_stream(request).await?.into_inner();
    let (mut text, mut token_ids, mut finished) = (String::new(), Vec::new(), None);
    while let Some(msg) = s.message().await? {
        match msg.event {
            Some(Event::Delta(d)) => {
                assert!(finished.is_none(), "a delta after `finished`");
                text.push_str(&d.text);
                token_ids.extend(d.token_ids);
            }
            Some(Event::Finished(f)) => finished = Some(f),
            None => panic!("a stream message without an event"),
        }
    }
    Ok(Streamed {
        text,
        token_ids,
        finished: finished.expect("the stream ends with `finished`"),
    })
}

/// Runs `request` through unary `Generate`.
pub async fn generate(
    client: &mut TesseraClient<Channel>,
    request: GenerateRequest,
) -> Result<GenerateResponse, tonic::Status> {
    Ok(client.generate(request).await?.into_inner())
}
