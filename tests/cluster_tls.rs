//! A cluster whose members speak mutual TLS, with certificates from `tessera
//! dev-certs`, one process per role: a generation gives the reference's greedy tokens
//! through it, and every internal service refuses, at the handshake, a plaintext client, a client without a
//! certificate and a client whose certificate another CA signed, so `Expert.Unload`,
//! `Expert.Load`, `Expert.Forward`, `Scheduler.Submit`, `Scheduler.Cancel` and
//! `Vision.Encode` from outside the cluster fail. Discovery through a real
//! etcd that requires client certificates works over TLS too.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tessera_proto::internal::v1::expert_client::ExpertClient;
use tessera_proto::internal::v1::scheduler_client::SchedulerClient;
use tessera_proto::internal::v1::vision_client::VisionClient;
use tessera_proto::internal::v1::{
    CancelRequest, EncodeRequest, ForwardRequest, InfoRequest, LayerExperts, LoadRequest,
    SubmitRequest, UnloadRequest,
};
use tessera_proto::v1::tessera_client::TesseraClient;
use tessera_runtime::Discovery;
use tessera_runtime::discovery::{EtcdDiscovery, EtcdTls, Role};
use tessera_runtime::tls::{DEFAULT_SERVER_NAME, TlsArgs};
use tokio::io::{AsyncBufReadExt, BufReader};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

#[allow(dead_code)]
mod common;

#[allow(dead_code)]
#[path = "common/cluster.rs"]
mod cluster;
#[allow(dead_code)]
#[path = "common/etcd.rs"]
mod etcd;

use cluster::{Cluster, case_request, generate};

const LEASE: Duration = Duration::from_secs(2);
use common::{case, fixture_dir, json_ids};

/// `tessera dev-certs --out DIR`: the CA and member files in `dir`.
fn dev_certs(dir: &Path) {
    let made = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["dev-certs", "--out"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "tessera dev-certs: {}",
        String::from_utf8_lossy(&made.stderr)
    );
    let said = String::from_utf8_lossy(&made.stdout);
    assert!(said.contains("--tls-cert"), "{said}");
}

fn tls_args(dir: &Path) -> TlsArgs {
    TlsArgs {
        tls_cert: Some(dir.join("tls.crt")),
        tls_key: Some(dir.join("tls.key")),
        tls_ca: Some(dir.join("ca.crt")),
        tls_server_name: DEFAULT_SERVER_NAME.to_owned(),
    }
}

fn read(path: PathBuf) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

/// A member of the cluster as its own `tessera <role>` process, killed when dropped;
/// its log lines reach the test's stderr with the role in front.
struct Process {
    _child: tokio::process::Child,
}

fn spawn_role(role: &str, model: &Path, etcd: &str, certs: &Path) -> Process {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
        .arg(role)
        .arg("--model")
        .arg(model)
        .args(["--grpc", "127.0.0.1:0", "--id", role, "--etcd", etcd])
        .args(["--etcd-prefix", "/tls-processes", "--lease-seconds", "2"])
        .arg("--tls-cert")
        .arg(certs.join("tls.crt"))
        .arg("--tls-key")
        .arg(certs.join("tls.key"))
        .arg("--tls-ca")
        .arg(certs.join("ca.crt"))
        .env_remove("TESSERA_MODEL")
        .env("TESSERA_KV_CACHE_BYTES", "67108864")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let role = role.to_owned();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("[{role}] {line}");
        }
    });
    Process { _child: child }
}

/// Every role registered in etcd under `prefix`: the address of each.
async fn registered(etcd: &str) -> HashMap<Role, String> {
    let discovery = EtcdDiscovery::connect(&[etcd.to_owned()], "/tls-processes", LEASE)
        .await
        .unwrap();
    tokio::time::timeout(cluster::DEADLINE, async {
        loop {
            let members: HashMap<Role, String> = discovery
                .members()
                .into_iter()
                .map(|m| (m.role, m.address))
                .collect();
            if members.len() == 4 {
                return members;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("all four roles register in time")
}

/// One call of every internal RPC with `channel` (or the connect error): what each
/// answered, as (RPC, `Ok` or the status).
async fn internal_calls(
    channel: &Result<Channel, tonic::transport::Error>,
    role: Role,
) -> Vec<(&'static str, Result<(), tonic::Status>)> {
    let channel = match channel {
        Ok(channel) => channel.clone(),
        Err(e) => {
            let refused = Err(tonic::Status::unavailable(format!("connect: {e}")));
            let names: &[&str] = match role {
                Role::ExpertWorker => &["Expert.Unload", "Expert.Load", "Expert.Forward"],
                Role::Scheduler => &["Scheduler.Submit", "Scheduler.Cancel"],
                _ => &["Vision.Encode"],
            };
            return names.iter().map(|n| (*n, refused.clone())).collect();
        }
    };
    match role {
        Role::ExpertWorker => {
            let mut expert = ExpertClient::new(channel);
            let everything = LayerExperts {
                layer: 1,
                experts: (0..64).collect(),
            };
            vec![
                (
                    "Expert.Unload",
                    expert
                        .unload(UnloadRequest {
                            placement_version: 1_000_000,
                            experts: vec![everything.clone()],
                        })
                        .await
                        .map(drop),
                ),
                (
                    "Expert.Load",
                    expert
                        .load(LoadRequest {
                            placement_version: 1_000_000,
                            experts: vec![everything],
                        })
                        .await
                        .map(drop),
                ),
                (
                    "Expert.Forward",
                    expert.forward(ForwardRequest::default()).await.map(drop),
                ),
            ]
        }
        Role::Scheduler => {
            let mut scheduler = SchedulerClient::new(channel);
            vec![
                (
                    "Scheduler.Submit",
                    scheduler.submit(SubmitRequest::default()).await.map(drop),
                ),
                (
                    "Scheduler.Cancel",
                    scheduler
                        .cancel(CancelRequest {
                            request_id: "someone-elses-request".into(),
                            ..Default::default()
                        })
                        .await
                        .map(drop),
                ),
            ]
        }
        _ => {
            let mut vision = VisionClient::new(channel);
            vec![(
                "Vision.Encode",
                vision.encode(EncodeRequest::default()).await.map(drop),
            )]
        }
    }
}

/// A cluster of one process per role (gateway, vision-worker, scheduler,
/// expert-worker) speaking mutual TLS, registered in a real etcd: a generation through
/// the gateway gives the reference's greedy tokens, and every internal RPC from a
/// plaintext client, a TLS client without a certificate, or one whose certificate
/// another CA signed is refused at the connection, before any handler runs, so an
/// outside `Expert.Unload` cannot drop a worker's experts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_speak_mutual_tls_and_refuse_clients_without_a_cluster_certificate() {
    let certs = tempfile::tempdir().unwrap();
    let rogue = tempfile::tempdir().unwrap();
    dev_certs(certs.path());
    dev_certs(rogue.path());
    let server = etcd::EtcdServer::start();
    let etcd = server.endpoint();
    let dir = fixture_dir("tiny-mha-softmax");
    let _members: Vec<Process> = ["expert-worker", "vision-worker", "scheduler", "gateway"]
        .into_iter()
        .map(|role| spawn_role(role, &dir, &etcd, certs.path()))
        .collect();
    let addresses = registered(&etcd).await;

    let ca = Certificate::from_pem(read(certs.path().join("ca.crt")));
    let trusting = || {
        ClientTlsConfig::new()
            .ca_certificate(ca.clone())
            .domain_name(DEFAULT_SERVER_NAME)
    };
    let connect = |address: &str, config: Option<ClientTlsConfig>| {
        let endpoint = match config {
            Some(config) => Channel::from_shared(format!("https://{address}"))
                .unwrap()
                .tls_config(config)
                .unwrap(),
            None => Channel::from_shared(format!("http://{address}")).unwrap(),
        };
        async move { endpoint.connect().await }
    };
    // The public API: TLS with the cluster's certificate, no client certificate.
    let gateway = connect(&addresses[&Role::Gateway], Some(trusting()))
        .await
        .unwrap();
    cluster::wait_serving(gateway.clone()).await;
    let mut client = TesseraClient::new(gateway);
    let case = case("tiny-mha-softmax", "single_640x480");
    let want = json_ids(&case["greedy"]["new_token_ids"]);
    let got = generate(&mut client, case_request(&dir, &case, 16))
        .await
        .unwrap();
    assert_eq!(got.token_ids, want, "the same tokens over TLS");

    let rogue_identity = || {
        Identity::from_pem(
            read(rogue.path().join("tls.crt")),
            read(rogue.path().join("tls.key")),
        )
    };
    for role in [Role::ExpertWorker, Role::Scheduler, Role::VisionWorker] {
        let address = &addresses[&role];
        let attempts = [
            ("plaintext", None),
            ("TLS without a client certificate", Some(trusting())),
            (
                "a certificate from another CA",
                Some(trusting().identity(rogue_identity())),
            ),
        ];
        for (what, config) in attempts {
            let channel = connect(address, config).await;
            for (rpc, answer) in internal_calls(&channel, role).await {
                let status = answer.expect_err(&format!("{rpc} went through ({what})"));
                println!("{rpc} ({what}): {:?} {}", status.code(), status.message());
                // Refused by the transport, with the connection's error as the cause
                // (its code depends on where the handshake broke off): no handler
                // answered, as one would with a status of its own and no cause.
                assert!(
                    std::error::Error::source(&status).is_some(),
                    "{rpc} ({what}) reached a handler: {status:?}"
                );
            }
        }
    }

    // A member's certificate reaches the handlers: the worker still holds its experts.
    let member = trusting().identity(Identity::from_pem(
        read(certs.path().join("tls.crt")),
        read(certs.path().join("tls.key")),
    ));
    let channel = connect(&addresses[&Role::ExpertWorker], Some(member))
        .await
        .unwrap();
    let info = ExpertClient::new(channel)
        .info(InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!info.held.is_empty(), "{info:?}");
    let got = generate(&mut client, case_request(&dir, &case, 16))
        .await
        .unwrap();
    assert_eq!(got.token_ids, want);
}

/// Every member reaches a real etcd (`--client-cert-auth`) over TLS with the member
/// certificate, and a client without one is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_through_etcd_over_tls() {
    let certs = tempfile::tempdir().unwrap();
    dev_certs(certs.path());
    let server = etcd::EtcdServer::start_tls(certs.path());
    let endpoints = server.endpoints();
    assert!(endpoints[0].starts_with("https://"));
    let tls = EtcdTls {
        ca: read(certs.path().join("ca.crt")),
        cert: read(certs.path().join("tls.crt")),
        key: read(certs.path().join("tls.key")),
    };
    let lease = std::time::Duration::from_secs(2);
    let refused = EtcdDiscovery::connect(&endpoints, "/tls", lease).await;
    assert!(refused.is_err(), "etcd took a client without TLS");
    let mut pool = Vec::new();
    for _ in 0..4 {
        let d = EtcdDiscovery::connect_with(&endpoints, "/tls", lease, Some(tls.clone()))
            .await
            .unwrap();
        pool.push(d as Arc<dyn Discovery>);
    }
    let pool = std::sync::Mutex::new(pool);
    let dir = fixture_dir("tiny-mha-softmax");
    let mut cluster = Cluster::start_with(
        &dir,
        1,
        || pool.lock().unwrap().pop().unwrap(),
        &tls_args(certs.path()),
    )
    .await;
    let case = case("tiny-mha-softmax", "text_only");
    let want = json_ids(&case["greedy"]["new_token_ids"]);
    let got = generate(&mut cluster.client, case_request(&dir, &case, 16))
        .await
        .unwrap();
    assert_eq!(got.token_ids, want);
    cluster.stop().await;
}
