//! The cluster with discovery through a real etcd (Debian's `etcd-server`,
//! started by the test on free ports): members register under leases, the
//! scheduler routes by the placement published in etcd, a joining worker takes a
//! share of the experts, and a worker killed mid-request (a real process,
//! SIGKILL) leaves no hang and no wrong answer.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tessera_proto::v1::tessera_client::TesseraClient;
use tessera_proto::v1::{ClusterStatusRequest, ClusterStatusResponse, MemberRole};
use tessera_runtime::Discovery;
use tessera_runtime::discovery::EtcdDiscovery;
use tokio::io::{AsyncBufReadExt, BufReader};
use tonic::transport::Channel;

#[allow(dead_code)]
mod common;

#[allow(dead_code)]
#[path = "common/cluster.rs"]
mod cluster;
#[allow(dead_code)]
#[path = "common/etcd.rs"]
mod etcd;

use cluster::{Cluster, DEADLINE, case_request, generate, start_worker, stream};
use common::{case, fixture_dir, json_ids};

const LEASE: Duration = Duration::from_secs(2);

async fn connect(endpoint: &str, prefix: &str) -> Arc<dyn Discovery> {
    EtcdDiscovery::connect(&[endpoint.to_string()], prefix, LEASE)
        .await
        .unwrap()
}

/// One etcd client per service, as if each ran in its own process.
async fn clients(endpoint: &str, prefix: &str, n: usize) -> Mutex<Vec<Arc<dyn Discovery>>> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(connect(endpoint, prefix).await);
    }
    Mutex::new(v)
}

/// Polls `ClusterStatus` until `done` holds.
async fn status_until(
    client: &mut TesseraClient<Channel>,
    done: impl Fn(&ClusterStatusResponse) -> bool,
) -> ClusterStatusResponse {
    tokio::time::timeout(DEADLINE, async {
        loop {
            let s = client
                .cluster_status(ClusterStatusRequest {})
                .await
                .unwrap()
                .into_inner();
            if done(&s) {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the cluster reaches the state before the deadline")
}

/// Expert-workers in the status that hold at least one expert.
fn holding(s: &ClusterStatusResponse) -> usize {
    s.members
        .iter()
        .filter(|m| m.role() == MemberRole::ExpertWorker && !m.experts.is_empty())
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_register_in_etcd_and_a_joining_worker_takes_a_share() {
    let server = etcd::EtcdServer::start();
    let endpoint = server.endpoint();
    let dir = fixture_dir("tiny-mha-softmax");
    let pool = clients(&endpoint, "/join", 5).await;
    let mut cluster = Cluster::start(&dir, 2, || pool.lock().unwrap().pop().unwrap()).await;

    let case = case("tiny-mha-softmax", "single_640x480");
    let want = json_ids(&case["greedy"]["new_token_ids"]);
    let before = status_until(&mut cluster.client, |s| holding(s) == 2).await;
    let got = generate(&mut cluster.client, case_request(&dir, &case, 16))
        .await
        .unwrap();
    assert_eq!(got.token_ids, want);

    // A third worker joins through its own etcd client.
    let third = start_worker(&dir, "expert-worker-2", connect(&endpoint, "/join").await).await;
    let after = status_until(&mut cluster.client, |s| {
        holding(s) == 3 && s.placement_version > before.placement_version
    })
    .await;
    println!(
        "placement version {} -> {} after a third worker joined",
        before.placement_version, after.placement_version
    );
    let got = generate(&mut cluster.client, case_request(&dir, &case, 16))
        .await
        .unwrap();
    assert_eq!(
        got.token_ids, want,
        "outputs unchanged after the placement moved"
    );

    third.stop.cancel();
    third.task.await.unwrap().unwrap();
    status_until(&mut cluster.client, |s| holding(s) == 2).await;
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_expert_worker_never_hangs_a_request_or_changes_its_answer() {
    let server = etcd::EtcdServer::start();
    let endpoint = server.endpoint();
    let dir = fixture_dir("small-mla-softmax");
    let pool = clients(&endpoint, "/kill", 4).await;
    let mut cluster = Cluster::start(&dir, 1, || pool.lock().unwrap().pop().unwrap()).await;

    // The second worker is a real process, so it can really die.
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["expert-worker", "--model"])
        .arg(&dir)
        .args([
            "--grpc",
            "127.0.0.1:0",
            "--id",
            "doomed",
            "--etcd",
            &endpoint,
        ])
        .args(["--etcd-prefix", "/kill", "--lease-seconds", "2"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("[doomed] {line}");
        }
    });
    status_until(&mut cluster.client, |s| holding(s) == 2).await;

    let case = case("small-mla-softmax", "multi_turn");
    let request = case_request(&dir, &case, 48);
    let reference = generate(&mut cluster.client, request.clone())
        .await
        .unwrap();
    assert_eq!(
        reference.token_ids[..16],
        json_ids(&case["greedy"]["new_token_ids"])[..]
    );

    // Kill the worker while a request is decoding.
    let mut client = cluster.client.clone();
    let running = tokio::spawn(async move { stream(&mut client, request).await });
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    let outcome = tokio::time::timeout(DEADLINE, running)
        .await
        .expect("the request ends (no hang)")
        .unwrap();
    match &outcome {
        Ok(_) => println!("the request running when the worker died completed"),
        Err(status) => println!("the request running when the worker died failed: {status:?}"),
    }
    match outcome {
        Ok(streamed) => assert_eq!(
            streamed.token_ids, reference.token_ids,
            "a request that survives a worker's death has the same answer"
        ),
        Err(status) => assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}"),
    }

    // Once the lease expires the survivor holds every expert and requests complete.
    status_until(&mut cluster.client, |s| {
        holding(s) == 1 && !s.members.iter().any(|m| m.id == "doomed")
    })
    .await;
    let after = generate(&mut cluster.client, case_request(&dir, &case, 48))
        .await
        .unwrap();
    assert_eq!(after.token_ids, reference.token_ids);
    cluster.stop().await;
}
