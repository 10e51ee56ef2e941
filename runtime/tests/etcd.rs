//! `EtcdDiscovery` against a real etcd started per test (the `etcd` binary must
//! be installed; Debian: `apt-get install -y etcd-server`).

#[allow(dead_code)]
#[path = "../../tests/common/etcd.rs"]
mod etcd;

use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd::EtcdServer;
use tessera_runtime::placement::PlacementPolicy;
use tessera_runtime::placer::{self, ExpertLayout};
use tessera_runtime::{
    CancellationToken, Discovery, Error, EtcdDiscovery, Member, Placement, Role, even_split,
};
use tokio::time::timeout;

const PREFIX: &str = "/tessera-test";
/// Short leases so that a dead member leaves quickly.
const TTL: Duration = Duration::from_secs(2);
/// Generous: CI machines are slow, and a lease takes TTL plus etcd's check.
const WAIT: Duration = Duration::from_secs(20);

async fn client(server: &EtcdServer) -> Arc<EtcdDiscovery> {
    EtcdDiscovery::connect(&server.endpoints(), PREFIX, TTL)
        .await
        .expect("connect to the test etcd")
}

fn worker(id: &str, port: u16) -> Member {
    Member::new(Role::ExpertWorker, id, format!("127.0.0.1:{port}"))
}

fn scheduler(id: &str) -> Member {
    Member::new(Role::Scheduler, id, "127.0.0.1:9000")
}

fn ids(members: &[Member]) -> Vec<String> {
    members.iter().map(|m| m.id.clone()).collect()
}

/// Waits until `d` lists exactly `want` (in its role-then-id order).
async fn wait_ids(d: &EtcdDiscovery, want: &[&str]) -> Vec<Member> {
    let mut rx = d.subscribe();
    let waited = timeout(WAIT, rx.wait_for(|m| ids(m) == want)).await;
    match waited {
        Ok(found) => found.expect("discovery alive").clone(),
        Err(_) => panic!("members {:?}, never {want:?}", ids(&d.members())),
    }
}

/// Waits until `d`'s placement satisfies `ok`.
async fn wait_placement(d: &EtcdDiscovery, ok: impl Fn(&Placement) -> bool) -> Placement {
    let mut rx = d.subscribe_placement();
    let waited = timeout(WAIT, rx.wait_for(|p| p.as_ref().is_some_and(&ok))).await;
    match waited {
        Ok(found) => found.expect("discovery alive").clone().unwrap(),
        Err(_) => panic!("placement stayed {:?}", d.placement()),
    }
}

#[tokio::test]
async fn clients_see_each_others_registrations_and_deregistrations() {
    let server = EtcdServer::start();
    let (a, b) = (client(&server).await, client(&server).await);
    assert!(a.members().is_empty());

    let w0 = a.register(worker("w0", 1).with_shard("0")).unwrap();
    let s0 = b.register(scheduler("s0")).unwrap();
    wait_ids(&a, &["s0", "w0"]).await;
    let seen = wait_ids(&b, &["s0", "w0"]).await;
    assert_eq!(seen[1], worker("w0", 1).with_shard("0"));

    w0.deregister();
    wait_ids(&b, &["s0"]).await;
    drop(s0);
    wait_ids(&a, &[]).await;

    // One client refuses a second live registration of an id it holds.
    let first = a.register(worker("x", 1)).unwrap();
    let err = a.register(worker("x", 2)).unwrap_err();
    assert!(
        matches!(err, Error::AlreadyRegistered { ref id } if id == "x"),
        "{err}"
    );
    drop(first);
    let _again = a.register(worker("x", 2)).unwrap();
    assert_eq!(wait_ids(&b, &["x"]).await[0].address, "127.0.0.1:2");

    let err = a.register(worker("", 3)).unwrap_err();
    assert!(matches!(err, Error::InvalidMember { .. }), "{err}");
}

#[tokio::test]
async fn an_id_held_by_another_process_is_taken_over_once_its_lease_ends() {
    let server = EtcdServer::start();
    let (old, new) = (client(&server).await, client(&server).await);
    let first = old.register(worker("w0", 1)).unwrap();
    wait_ids(&new, &["w0"]).await;

    // The same id from another process (e.g. a restarted worker) waits...
    let _second = new.register(worker("w0", 2)).unwrap();
    let mut rx = new.subscribe();
    let moved = timeout(
        TTL,
        rx.wait_for(|m| m.iter().any(|m| m.address.ends_with(":2"))),
    )
    .await;
    assert!(moved.is_err(), "took over a live registration");
    assert_eq!(new.members()[0].address, "127.0.0.1:1");

    // ... and takes over when the first one's lease is gone.
    drop(first);
    let mut rx = old.subscribe();
    let taken = rx.wait_for(|m| m.len() == 1 && m[0].address == "127.0.0.1:2");
    timeout(WAIT, taken).await.expect("taken over").unwrap();
}

#[tokio::test]
async fn a_member_whose_process_dies_leaves_when_its_lease_expires() {
    let server = EtcdServer::start();
    let observer = client(&server).await;
    let endpoints = server.endpoints();
    // The "process": its own runtime, stopped without deregistering anything.
    let died = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let d = rt
            .block_on(EtcdDiscovery::connect(&endpoints, PREFIX, TTL))
            .unwrap();
        let registration = d.register(worker("doomed", 1)).unwrap();
        rt.block_on(wait_ids(&d, &["doomed"]));
        rt.shutdown_background(); // its tasks and connections are gone
        let died = Instant::now();
        drop(registration); // nothing left to revoke the lease
        drop(d);
        died
    })
    .join()
    .unwrap();

    wait_ids(&observer, &["doomed"]).await;
    wait_ids(&observer, &[]).await;
    assert!(
        died.elapsed() >= Duration::from_secs(1),
        "left after {:?}: the lease was revoked, not expired",
        died.elapsed()
    );
}

#[tokio::test]
async fn placements_only_move_forward_across_clients() {
    let server = EtcdServer::start();
    let (a, b) = (client(&server).await, client(&server).await);
    let layers = [1, 2];
    let split = |version, workers: &[&str]| {
        let workers: Vec<String> = workers.iter().map(|w| w.to_string()).collect();
        even_split(version, &layers, 8, &workers).unwrap()
    };
    let v1 = split(1, &["w0"]);
    a.publish_placement(v1.clone()).unwrap();
    assert_eq!(a.placement(), Some(v1.clone()), "shown locally at once");
    assert_eq!(wait_placement(&b, |p| p.version == 1).await, v1);

    let v2 = split(2, &["w0", "w1"]);
    b.publish_placement(v2.clone()).unwrap();
    assert_eq!(wait_placement(&a, |p| p.version == 2).await, v2);

    // Refused against the local view: older, same version but different, incomplete.
    let err = a.publish_placement(v1.clone()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::StalePlacement {
                version: 1,
                current: 2
            }
        ),
        "{err}"
    );
    let err = a.publish_placement(split(2, &["w1"])).unwrap_err();
    assert!(
        matches!(
            err,
            Error::StalePlacement {
                version: 2,
                current: 2
            }
        ),
        "{err}"
    );
    let mut broken = split(3, &["w0", "w1"]);
    broken.assignment.get_mut("w0").unwrap().clear();
    let err = a.publish_placement(broken.clone()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::IncompletePlacement {
                version: 3,
                missing: 8
            }
        ),
        "{err}"
    );

    // Refused by etcd itself (the compare-and-swap), whatever the local view.
    let err = a.store_placement(&v1).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::StalePlacement {
                version: 1,
                current: 2
            }
        ),
        "{err}"
    );
    let err = b.store_placement(&split(2, &["w1"])).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::StalePlacement {
                version: 2,
                current: 2
            }
        ),
        "{err}"
    );
    let err = b.store_placement(&broken).await.unwrap_err();
    assert!(matches!(err, Error::IncompletePlacement { .. }), "{err}");

    // The same placement again, from either side, is harmless.
    a.publish_placement(v2.clone()).unwrap();
    b.store_placement(&v2).await.unwrap();
    let fresh = client(&server).await;
    assert_eq!(fresh.placement(), Some(v2.clone()), "etcd holds v2");

    let v3 = split(3, &["w1"]);
    a.store_placement(&v3).await.unwrap();
    assert_eq!(wait_placement(&b, |p| p.version == 3).await, v3);
    assert_eq!(wait_placement(&fresh, |p| p.version == 3).await, v3);
}

#[tokio::test]
async fn the_placer_on_etcd_follows_expert_workers_of_another_client() {
    let server = EtcdServer::start();
    let (scheduler_side, workers) = (client(&server).await, client(&server).await);
    let layout = ExpertLayout {
        moe_layers: vec![1, 2],
        n_experts: 8,
    };
    let shutdown = CancellationToken::new();
    let discovery: Arc<dyn Discovery> = scheduler_side.clone();
    let policy = PlacementPolicy::fixed(1);
    let task = tokio::spawn(placer::run(
        discovery,
        layout,
        policy,
        None,
        shutdown.clone(),
    ));
    let holders = |p: &Placement| p.workers().map(str::to_owned).collect::<Vec<_>>();

    let w0 = workers.register(worker("w0", 1)).unwrap();
    let p = wait_placement(&workers, |p| holders(p) == ["w0"]).await;
    assert_eq!(p.experts_of("w0").len(), 16);

    let _w1 = workers.register(worker("w1", 2)).unwrap();
    let p = wait_placement(&workers, |p| holders(p) == ["w0", "w1"]).await;
    assert_eq!((p.experts_of("w0").len(), p.experts_of("w1").len()), (8, 8));

    drop(w0);
    let last = wait_placement(&workers, |p| holders(p) == ["w1"]).await;
    assert_eq!(last.experts_of("w1").len(), 16);
    assert!(last.is_complete());
    assert!(last.version > p.version);
    shutdown.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn registrations_and_watches_survive_etcd_restarts() {
    let mut server = EtcdServer::start();
    let (a, b) = (client(&server).await, client(&server).await);
    let _w0 = a.register(worker("w0", 1)).unwrap();
    wait_ids(&b, &["w0"]).await;

    // etcd restarts with its data: the watch of `a` re-syncs.
    server.restart(true);
    let _s0 = b.register(scheduler("s0")).unwrap();
    wait_ids(&a, &["s0", "w0"]).await;

    // etcd comes back empty: the registrations are granted and put again.
    server.restart(false);
    let fresh = client(&server).await;
    wait_ids(&fresh, &["s0", "w0"]).await;
    let _w1 = fresh.register(worker("w1", 2)).unwrap();
    wait_ids(&a, &["s0", "w0", "w1"]).await;
}

#[tokio::test]
async fn an_unreachable_etcd_or_bad_settings_are_clear_errors() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let err = EtcdDiscovery::connect(std::slice::from_ref(&endpoint), PREFIX, TTL)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::EtcdUnreachable { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.starts_with(&format!("cannot reach etcd at {endpoint}: ")),
        "{message}"
    );
    assert!(
        message.ends_with("start etcd or use static discovery"),
        "{message}"
    );

    let endpoints = vec![endpoint];
    for (endpoints, prefix, ttl) in [
        (&endpoints, PREFIX, Duration::from_millis(500)),
        (&endpoints, "/", TTL),
        (&vec![], PREFIX, TTL),
    ] {
        let err = EtcdDiscovery::connect(endpoints, prefix, ttl)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::EtcdConfig { .. }), "{err}");
    }
}
