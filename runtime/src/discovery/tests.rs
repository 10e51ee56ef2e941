use std::time::Duration;

use tokio::time::timeout;

use super::*;
use crate::placement::{PlacementPolicy, PoolWorker, even_split, next_placement};

const WAIT: Duration = Duration::from_secs(5);

fn worker(id: &str, port: u16) -> Member {
    Member::new(Role::ExpertWorker, id, format!("127.0.0.1:{port}"))
}

fn ids(members: &[Member]) -> Vec<&str> {
    members.iter().map(|m| m.id.as_str()).collect()
}

/// Waits for the next change and returns the new value.
async fn next<T: Clone>(rx: &mut watch::Receiver<T>) -> T {
    timeout(WAIT, rx.changed())
        .await
        .expect("no change within the deadline")
        .expect("sender dropped");
    rx.borrow_and_update().clone()
}

#[test]
fn member_json_uses_cli_role_names_and_optional_shard() {
    let m: Member = serde_json::from_str(
        r#"{"role": "expert-worker", "id": "ew-0", "address": "10.0.0.2:7000"}"#,
    )
    .unwrap();
    assert_eq!(m, worker("ew-0", 7000).with_address("10.0.0.2:7000"));
    assert_eq!(m.shard, None);
    let json = serde_json::to_value(Member::new(Role::VisionWorker, "v", "a:1")).unwrap();
    assert_eq!(json["role"], "vision-worker");
    assert!(
        serde_json::from_str::<Member>(r#"{"role": "router", "id": "x", "address": "a"}"#).is_err()
    );
    assert!(
        serde_json::from_str::<Member>(r#"{"role": "gateway", "id": "x", "adress": "a"}"#).is_err()
    );
}

#[test]
fn ids_with_role_filters_and_sorts() {
    let members = vec![
        worker("b", 2),
        Member::new(Role::Scheduler, "s", "127.0.0.1:9"),
        worker("a", 1),
    ];
    assert_eq!(ids_with_role(&members, Role::ExpertWorker), ["a", "b"]);
    assert_eq!(ids_with_role(&members, Role::Gateway), Vec::<String>::new());
}

#[test]
fn static_discovery_lists_its_members_and_registers_only_them() {
    let d = StaticDiscovery::from_members(vec![
        worker("ew-1", 2),
        Member::new(Role::Gateway, "gw", "127.0.0.1:1"),
        worker("ew-0", 1),
    ])
    .unwrap();
    assert_eq!(ids(&d.members()), ["gw", "ew-0", "ew-1"]);

    let reg = d.register(worker("ew-0", 1)).unwrap();
    assert_eq!(reg.member().id, "ew-0");
    drop(reg);
    assert_eq!(
        d.members().len(),
        3,
        "static members stay after deregistering"
    );

    let err = d.register(worker("ew-9", 9)).unwrap_err();
    assert!(matches!(err, Error::UnknownMember { ref id, .. } if id == "ew-9"));
    assert!(
        err.to_string().contains("not in the static member list"),
        "{err}"
    );

    let err = d.register(worker("ew-0", 5)).unwrap_err();
    assert!(matches!(err, Error::MemberMismatch { .. }));
    assert!(err.to_string().contains("127.0.0.1:5"), "{err}");
}

#[test]
fn static_discovery_rejects_duplicate_and_empty_members() {
    let err = StaticDiscovery::from_members(vec![worker("a", 1), worker("a", 2)]).unwrap_err();
    assert!(matches!(err, Error::DuplicateId { ref id, .. } if id == "a"));
    let err = StaticDiscovery::from_members(vec![worker("a", 1).with_address(" ")]).unwrap_err();
    assert!(matches!(err, Error::InvalidMember { .. }), "{err}");
}

#[test]
fn static_discovery_reads_a_json_file() {
    let dir = std::env::temp_dir().join(format!("tessera-runtime-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("cluster.json");
    std::fs::write(
        &path,
        r#"{"members": [
            {"role": "scheduler", "id": "s0", "address": "127.0.0.1:7001"},
            {"role": "expert-worker", "id": "e0", "address": "127.0.0.1:7002", "shard": "0"}
        ]}"#,
    )
    .unwrap();
    let d = StaticDiscovery::from_file(&path).unwrap();
    let members = d.members();
    assert_eq!(ids(&members), ["s0", "e0"]);
    assert_eq!(members[1].shard.as_deref(), Some("0"));

    std::fs::write(&path, r#"{"members": [{"role": "scheduler"}]}"#).unwrap();
    let err = StaticDiscovery::from_file(&path).unwrap_err();
    assert!(matches!(err, Error::ParseFile { .. }));
    assert!(err.to_string().contains("cluster.json"), "{err}");

    let missing = dir.join("missing.json");
    let err = StaticDiscovery::from_file(&missing).unwrap_err();
    assert!(matches!(err, Error::ReadFile { .. }));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn memory_discovery_notifies_on_register_and_lease_loss() {
    let d = MemoryDiscovery::new();
    let mut rx = d.subscribe();
    assert!(rx.borrow_and_update().is_empty());

    let a = d.register(worker("a", 1)).unwrap();
    assert_eq!(ids(&next(&mut rx).await), ["a"]);
    let b = d.register(worker("b", 2)).unwrap();
    assert_eq!(ids(&next(&mut rx).await), ["a", "b"]);

    drop(a); // lease lost
    assert_eq!(ids(&next(&mut rx).await), ["b"]);
    b.deregister();
    assert!(next(&mut rx).await.is_empty());
    assert!(d.members().is_empty());
}

#[test]
fn memory_discovery_rejects_a_second_live_registration_of_an_id() {
    let d = MemoryDiscovery::new();
    let first = d.register(worker("a", 1)).unwrap();
    let err = d.register(worker("a", 2)).unwrap_err();
    assert!(matches!(err, Error::AlreadyRegistered { .. }));
    drop(first);
    // After the lease is gone the id is free again.
    let second = d.register(worker("a", 2)).unwrap();
    assert_eq!(d.members()[0].address, "127.0.0.1:2");
    drop(second);
    assert!(d.members().is_empty());
}

#[test]
fn memory_discovery_clones_share_state_and_registrations_may_outlive_it() {
    let d = MemoryDiscovery::new();
    let clone = d.clone();
    let reg = clone.register(worker("a", 1)).unwrap();
    assert_eq!(ids(&d.members()), ["a"]);
    drop(d);
    drop(clone);
    drop(reg); // nothing left to deregister from; must not panic
}

#[tokio::test]
async fn placement_only_moves_forward_and_must_be_complete() {
    let d = MemoryDiscovery::new();
    let mut rx = d.subscribe_placement();
    assert_eq!(d.placement(), None);
    let layers = [1, 2];
    let workers = vec!["a".to_string(), "b".to_string()];

    let v1 = even_split(1, &layers, 64, &workers).unwrap();
    d.publish_placement(v1.clone()).unwrap();
    assert_eq!(next(&mut rx).await, Some(v1.clone()));

    // Same placement again: accepted, nobody woken.
    d.publish_placement(v1.clone()).unwrap();
    assert!(!rx.has_changed().unwrap());

    // Same version, different assignment: stale.
    let other = even_split(1, &layers, 64, &workers[..1]).unwrap();
    let err = d.publish_placement(other).unwrap_err();
    assert!(matches!(
        err,
        Error::StalePlacement {
            version: 1,
            current: 1
        }
    ));

    let mut broken = even_split(2, &layers, 64, &workers).unwrap();
    broken.assignment.get_mut("a").unwrap().clear();
    let err = d.publish_placement(broken).unwrap_err();
    assert!(matches!(
        err,
        Error::IncompletePlacement {
            version: 2,
            missing: 64
        }
    ));
    assert!(!rx.has_changed().unwrap());
    assert_eq!(d.placement(), Some(v1));
}

#[tokio::test]
async fn static_discovery_carries_placements_too() {
    let d = StaticDiscovery::from_members(vec![worker("a", 1)]).unwrap();
    let mut rx = d.subscribe_placement();
    let live = PoolWorker::unbounded_all(&ids_with_role(&d.members(), Role::ExpertWorker));
    let p = next_placement(None, &[1], 8, &live, &PlacementPolicy::default(), None).unwrap();
    d.publish_placement(p.clone()).unwrap();
    assert_eq!(next(&mut rx).await, Some(p));
}

/// The loop a placement owner runs: members change → recompute → publish.
#[tokio::test]
async fn placement_follows_membership() {
    let d = MemoryDiscovery::new();
    let mut members = d.subscribe();
    let mut placements = d.subscribe_placement();
    let layers: Vec<usize> = (1..12).collect();
    let replan = |members: &[Member]| {
        let live = PoolWorker::unbounded_all(&ids_with_role(members, Role::ExpertWorker));
        let single = PlacementPolicy::fixed(1);
        let p = next_placement(d.placement().as_ref(), &layers, 64, &live, &single, None).unwrap();
        d.publish_placement(p).unwrap();
    };

    let _sched = d
        .register(Member::new(Role::Scheduler, "s", "127.0.0.1:9"))
        .unwrap();
    let w0 = d.register(worker("w0", 1)).unwrap();
    let _w1 = d.register(worker("w1", 2)).unwrap();
    replan(&members.borrow_and_update().clone());
    let two = next(&mut placements).await.unwrap();
    assert_eq!(two.version, 1);
    assert_eq!(two.workers().collect::<Vec<_>>(), ["w0", "w1"]);

    // A scheduler joining changes no placement.
    let _sched2 = d
        .register(Member::new(Role::Scheduler, "s2", "127.0.0.1:8"))
        .unwrap();
    replan(&next(&mut members).await);
    assert!(!placements.has_changed().unwrap());

    let _w2 = d.register(worker("w2", 3)).unwrap();
    replan(&next(&mut members).await);
    let three = next(&mut placements).await.unwrap();
    assert_eq!(three.version, 2);
    // w0 and w1 keep up to ceil(64 / 3) = 22 per layer; w2 takes the rest.
    assert_eq!(three.experts_of("w2").len(), 11 * 20);

    drop(w0);
    replan(&next(&mut members).await);
    let after = next(&mut placements).await.unwrap();
    assert_eq!(after.version, 3);
    assert!(after.is_complete());
    assert!(after.experts_of("w0").is_empty());
    assert_eq!(after.workers().collect::<Vec<_>>(), ["w1", "w2"]);
}

#[test]
fn members_serving_another_model_are_refused() {
    let members = vec![
        Member::new(Role::Scheduler, "s", "127.0.0.1:1").with_fingerprint("aaaa"),
        Member::new(Role::Gateway, "g", "127.0.0.1:2"),
    ];
    assert!(check_same_model(&members, "aaaa").is_ok());
    let err = check_same_model(&members, "bbbb").unwrap_err();
    assert!(matches!(err, Error::ModelMismatch { .. }), "{err}");
    assert!(
        err.to_string().contains("aaaa") && err.to_string().contains("bbbb"),
        "{err}"
    );
}

#[test]
fn static_members_accept_a_fingerprint_the_file_does_not_name() {
    let d = StaticDiscovery::from_members(vec![worker("ew-0", 1)]).unwrap();
    let registration = d.register(worker("ew-0", 1).with_fingerprint("aaaa"));
    assert!(registration.is_ok());
}
