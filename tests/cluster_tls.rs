//! A cluster whose members speak mutual TLS, with certificates from `tessera
//! dev-certs`: a generation gives the reference's greedy tokens through it, and an
//! internal service refuses, at the handshake, a plaintext client, a client without a
//! certificate and a client whose certificate another CA signed, so `Expert.Unload`
//! from outside the cluster cannot drop a worker's experts. Discovery through a real
//! etcd that requires client certificates works over TLS too.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use tessera_proto::internal::v1::expert_client::ExpertClient;
use tessera_proto::internal::v1::{InfoRequest, LayerExperts, UnloadRequest};
use tessera_proto::v1::{ClusterStatusRequest, MemberRole};
use tessera_runtime::discovery::{EtcdDiscovery, EtcdTls};
use tessera_runtime::tls::{DEFAULT_SERVER_NAME, TlsArgs};
use tessera_runtime::{Discovery, MemoryDiscovery};
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

/// Asks the expert-worker at `address` to drop layer `layer`'s experts over `channel`;
/// the error, or `None` if the call went through.
async fn unload(channel: Result<Channel, tonic::transport::Error>, layer: u32) -> Option<String> {
    let channel = match channel {
        Ok(channel) => channel,
        Err(e) => return Some(format!("connect: {e}")),
    };
    let mut client = ExpertClient::new(channel);
    let request = UnloadRequest {
        placement_version: 1_000_000,
        experts: vec![LayerExperts {
            layer,
            experts: (0..64).collect(),
        }],
    };
    client.unload(request).await.err().map(|s| format!("{s:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_speak_mutual_tls_and_refuse_clients_without_a_cluster_certificate() {
    let certs = tempfile::tempdir().unwrap();
    let rogue = tempfile::tempdir().unwrap();
    dev_certs(certs.path());
    dev_certs(rogue.path());
    let tls = tls_args(certs.path());

    let dir = fixture_dir("tiny-mha-softmax");
    let discovery: Arc<dyn Discovery> = Arc::new(MemoryDiscovery::new());
    let mut cluster = Cluster::start_with(&dir, 1, || discovery.clone(), &tls).await;
    let case = case("tiny-mha-softmax", "single_640x480");
    let want = json_ids(&case["greedy"]["new_token_ids"]);
    let got = generate(&mut cluster.client, case_request(&dir, &case, 16))
        .await
        .unwrap();
    assert_eq!(got.token_ids, want, "the same tokens over TLS");

    let status = cluster
        .client
        .cluster_status(ClusterStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let worker = status
        .members
        .iter()
        .find(|m| m.role() == MemberRole::ExpertWorker)
        .expect("an expert-worker");
    let layer = worker.experts[0].layer;
    let address = worker.address.clone();
    let https = format!("https://{address}");
    let ca = Certificate::from_pem(read(certs.path().join("ca.crt")));
    let connect = |config: Option<ClientTlsConfig>| {
        let endpoint = match config {
            Some(config) => Channel::from_shared(https.clone())
                .unwrap()
                .tls_config(config)
                .unwrap(),
            None => Channel::from_shared(format!("http://{address}")).unwrap(),
        };
        async move { endpoint.connect().await }
    };
    let trusting = || {
        ClientTlsConfig::new()
            .ca_certificate(ca.clone())
            .domain_name(DEFAULT_SERVER_NAME)
    };
    let attempts = [
        ("plaintext", None),
        ("TLS without a client certificate", Some(trusting())),
        (
            "a certificate from another CA",
            Some(trusting().identity(Identity::from_pem(
                read(rogue.path().join("tls.crt")),
                read(rogue.path().join("tls.key")),
            ))),
        ),
    ];
    for (what, config) in attempts {
        let refused = unload(connect(config).await, layer).await;
        assert!(refused.is_some(), "{what}: Unload went through");
        println!("{what}: {}", refused.unwrap());
    }

    // The worker still holds its experts: a cluster member's certificate may ask.
    let member = trusting().identity(Identity::from_pem(
        read(certs.path().join("tls.crt")),
        read(certs.path().join("tls.key")),
    ));
    let mut client = ExpertClient::new(connect(Some(member)).await.unwrap());
    let info = client.info(InfoRequest {}).await.unwrap().into_inner();
    assert!(!info.held.is_empty(), "{info:?}");
    let got = generate(&mut cluster.client, case_request(&dir, &case, 16))
        .await
        .unwrap();
    assert_eq!(got.token_ids, want);
    cluster.stop().await;
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
