use super::*;

fn ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("w{i}")).collect()
}

fn pool(n: usize) -> Vec<PoolWorker> {
    PoolWorker::unbounded_all(&ids(n))
}

/// Layer ids as in DeepSeek-VL2 Tiny: layer 0 dense, the rest MoE.
fn layers() -> Vec<usize> {
    (1..12).collect()
}

const AUTO: PlacementPolicy = PlacementPolicy { replicas: None };
const SINGLE: PlacementPolicy = PlacementPolicy { replicas: Some(1) };

/// `next_placement` over `layers()` without measured loads.
fn place(
    previous: Option<&Placement>,
    n_experts: usize,
    workers: &[PoolWorker],
    policy: PlacementPolicy,
) -> Placement {
    next_placement(previous, &layers(), n_experts, workers, &policy, None).unwrap()
}

/// Zipf-like loads: expert `e` of every layer sees `1 / (e + 1)`.
fn skewed(n_experts: usize) -> BTreeMap<usize, Vec<f64>> {
    let loads: Vec<f64> = (0..n_experts).map(|e| 1.0 / (e as f64 + 1.0)).collect();
    layers().into_iter().map(|l| (l, loads.clone())).collect()
}

/// The pairs of `layer` `worker` holds.
fn in_layer(p: &Placement, worker: &str, layer: usize) -> usize {
    p.experts_of(worker)
        .iter()
        .filter(|(l, _)| *l == layer)
        .count()
}

fn assert_within_capacities(p: &Placement, workers: &[PoolWorker]) {
    for w in workers {
        let held = p.experts_of(&w.id).len();
        assert!(
            held <= w.limit(),
            "{} holds {held} > {:?}",
            w.id,
            w.capacity
        );
    }
}

#[test]
fn every_expert_has_exactly_one_owner_and_shares_are_balanced() {
    for n_experts in [64, 72] {
        for n_workers in [1, 2, 3, 7] {
            let p = even_split(1, &layers(), n_experts, &ids(n_workers)).unwrap();
            assert!(p.is_complete(), "{n_workers} workers, {n_experts} experts");
            for &layer in &layers() {
                for expert in 0..n_experts {
                    assert_eq!(p.owners(layer, expert).len(), 1, "({layer}, {expert})");
                }
            }
            assert!(p.owners(0, 0).is_empty(), "dense layer 0 is not placed");
            assert!(p.owners(1, n_experts).is_empty());
            let total: usize = p.assignment.values().map(BTreeSet::len).sum();
            assert_eq!(total, layers().len() * n_experts);

            for &layer in &layers() {
                let per_worker: Vec<usize> = p
                    .assignment
                    .values()
                    .map(|held| held.iter().filter(|(l, _)| *l == layer).count())
                    .collect();
                let (min, max) = (per_worker.iter().min(), per_worker.iter().max());
                assert!(max.unwrap() - min.unwrap() <= 1, "{per_worker:?}");
            }
        }
    }
}

#[test]
fn ranges_are_contiguous_in_sorted_id_order() {
    // Given out of order; w0 must still get the first range.
    let workers = vec!["w2".to_string(), "w0".to_string(), "w1".to_string()];
    let p = even_split(1, &[3, 1], 64, &workers).unwrap();
    assert_eq!(p.layers, vec![1, 3]);
    let range = |w: &str, layer: usize| -> Vec<usize> {
        p.experts_of(w)
            .iter()
            .filter(|(l, _)| *l == layer)
            .map(|&(_, e)| e)
            .collect()
    };
    for layer in [1, 3] {
        assert_eq!(range("w0", layer), (0..22).collect::<Vec<_>>());
        assert_eq!(range("w1", layer), (22..43).collect::<Vec<_>>());
        assert_eq!(range("w2", layer), (43..64).collect::<Vec<_>>());
    }
    assert_eq!(p.owners(3, 22), vec!["w1"]);
    assert!(p.experts_of("w9").is_empty());
}

#[test]
fn split_is_deterministic_and_round_trips_through_json() {
    let a = even_split(4, &layers(), 72, &ids(7)).unwrap();
    let mut shuffled = ids(7);
    shuffled.reverse();
    let b = even_split(4, &layers(), 72, &shuffled).unwrap();
    assert_eq!(a, b);
    let json = serde_json::to_string(&a).unwrap();
    let back: Placement = serde_json::from_str(&json).unwrap();
    assert_eq!(back, a);
}

#[test]
fn a_placement_without_replicas_or_loads_still_parses() {
    let json = r#"{"version": 3, "layers": [1], "n_experts": 2,
                   "assignment": {"a": [[1, 0], [1, 1]]}}"#;
    let p: Placement = serde_json::from_str(json).unwrap();
    assert_eq!((p.version, p.replicas), (3, 0));
    assert!(p.loads.is_empty());
    assert!(p.is_complete());
    let unknown = json.replace("\"version\"", "\"bogus\": 1, \"version\"");
    assert!(serde_json::from_str::<Placement>(&unknown).is_err());
}

#[test]
fn no_workers_or_duplicate_workers_is_an_error() {
    let err = even_split(1, &layers(), 64, &[]).unwrap_err();
    assert!(matches!(
        err,
        Error::NoWorkers {
            n_layers: 11,
            n_experts: 64
        }
    ));
    assert!(err.to_string().contains("no live expert-workers"));
    let err = next_placement(None, &layers(), 64, &[], &AUTO, None).unwrap_err();
    assert!(matches!(err, Error::NoWorkers { n_layers: 11, .. }));
    let dup = vec!["a".to_string(), "b".to_string(), "a".to_string()];
    let err = even_split(1, &layers(), 64, &dup).unwrap_err();
    assert!(matches!(err, Error::DuplicateId { ref id, .. } if id == "a"));
    // The same id with another capacity is still a duplicate.
    let dup = [PoolWorker::unbounded("a"), PoolWorker::bounded("a", 9)];
    let err = next_placement(None, &layers(), 64, &dup, &AUTO, None).unwrap_err();
    assert!(matches!(err, Error::DuplicateId { ref id, .. } if id == "a"));
}

#[test]
fn more_workers_than_experts_leaves_some_workers_empty() {
    let p = even_split(1, &[1], 3, &ids(7)).unwrap();
    assert!(p.is_complete());
    assert_eq!(p.assignment.len(), 7);
    assert_eq!(p.experts_of("w0").len(), 1);
    assert!(p.experts_of("w6").is_empty());

    let p = next_placement(None, &[1], 3, &pool(7), &SINGLE, None).unwrap();
    assert!(p.is_complete());
    assert_eq!(p.assignment.len(), 7);
    assert_eq!(p.assignment.values().filter(|h| h.is_empty()).count(), 4);
}

#[test]
fn incompleteness_is_detected() {
    let mut p = even_split(1, &layers(), 64, &ids(2)).unwrap();
    p.assignment.get_mut("w1").unwrap().remove(&(5, 40));
    assert!(!p.is_complete());
    assert_eq!(p.missing(), 1);
    assert!(p.owners(5, 40).is_empty());
}

#[test]
fn every_expert_gets_min_r_n_distinct_owners_in_balanced_shares() {
    let policies = [
        SINGLE,
        PlacementPolicy::fixed(2),
        PlacementPolicy::fixed(3),
        AUTO,
    ];
    for policy in policies {
        for n_workers in [1, 2, 3, 5, 7] {
            for n_experts in [64, 72] {
                let p = place(None, n_experts, &pool(n_workers), policy);
                let r = match policy.replicas {
                    Some(r) => r.min(n_workers),
                    None => n_workers.min(2),
                };
                let case = format!("{policy:?} on {n_workers} workers, {n_experts} experts");
                assert_eq!(p.replicas, r, "{case}");
                for &layer in &layers() {
                    for expert in 0..n_experts {
                        assert_eq!(
                            p.replicas_of(layer, expert),
                            r,
                            "{case}: ({layer}, {expert})"
                        );
                    }
                    let shares: Vec<usize> = ids(n_workers)
                        .iter()
                        .map(|w| in_layer(&p, w, layer))
                        .collect();
                    let spread = shares.iter().max().unwrap() - shares.iter().min().unwrap();
                    assert!(spread <= 1, "{case}: layer {layer} shares {shares:?}");
                }
                let total: usize = p.assignment.values().map(BTreeSet::len).sum();
                assert_eq!(total, layers().len() * n_experts * r, "{case}");
                assert!(p.loads.is_empty());
            }
        }
    }
}

#[test]
fn capacities_are_never_exceeded_and_replication_drops_only_as_needed() {
    let pairs = layers().len() * 64; // 704
    // Room for 1300 of the 1408 wanted replicas: 108 experts keep one owner.
    let workers = [
        PoolWorker::bounded("w0", 500),
        PoolWorker::bounded("w1", 300),
        PoolWorker::bounded("w2", 300),
        PoolWorker::bounded("w3", 200),
    ];
    let p = place(None, 64, &workers, AUTO);
    assert_within_capacities(&p, &workers);
    assert!(p.is_complete());
    let replicas: Vec<usize> = p.pairs().map(|(l, e)| p.replicas_of(l, e)).collect();
    assert_eq!(replicas.iter().filter(|&&r| r == 1).count(), 1408 - 1300);
    assert_eq!(replicas.iter().filter(|&&r| r == 2).count(), pairs - 108);

    // Plenty of room: full replication, capacities untouched.
    let roomy: Vec<PoolWorker> = ids(4).iter().map(|w| PoolWorker::bounded(w, 400)).collect();
    let p = place(None, 64, &roomy, AUTO);
    assert_within_capacities(&p, &roomy);
    assert!(p.pairs().all(|(l, e)| p.replicas_of(l, e) == 2));

    // Not even one owner each fits: as many as fit, once, and none beyond.
    let tight = [PoolWorker::bounded("a", 300), PoolWorker::bounded("b", 300)];
    let p = place(None, 64, &tight, AUTO);
    assert_within_capacities(&p, &tight);
    assert_eq!(p.experts_of("a").len() + p.experts_of("b").len(), 600);
    assert!(!p.is_complete());
    assert_eq!(p.missing(), pairs - 600);
    assert!(p.pairs().all(|(l, e)| p.replicas_of(l, e) <= 1));

    // A worker with no room holds nothing; replication counts the others.
    let one_full = [PoolWorker::bounded("a", 0), PoolWorker::unbounded("b")];
    let p = place(None, 64, &one_full, AUTO);
    assert!(p.experts_of("a").is_empty());
    assert!(p.pairs().all(|(l, e)| p.owners(l, e) == ["b"]));
}

#[test]
fn a_lowered_capacity_sheds_only_that_workers_coldest_pairs() {
    let before = place(None, 64, &pool(4), AUTO);
    let mut workers = pool(4);
    workers[1].capacity = Some(300); // holds 352
    let after = place(Some(&before), 64, &workers, AUTO);
    assert_within_capacities(&after, &workers);
    assert!(after.pairs().all(|(l, e)| after.replicas_of(l, e) == 2));
    assert!(after.experts_of("w1").is_subset(before.experts_of("w1")));
    assert_eq!(after.pairs_moved(&before), 52);
}

#[test]
fn a_fifth_worker_takes_only_its_share_and_nothing_moves_between_the_others() {
    let four = place(None, 64, &pool(4), AUTO);
    let five = place(Some(&four), 64, &pool(5), AUTO);
    assert_eq!(five.version, four.version + 1);
    assert!(five.pairs().all(|(l, e)| five.replicas_of(l, e) == 2));
    for old in ids(4) {
        assert!(
            five.experts_of(&old).is_subset(four.experts_of(&old)),
            "{old} gained pairs"
        );
    }
    let newcomer = five.experts_of("w4").len();
    assert_eq!(five.pairs_moved(&four), newcomer);
    // Fair share: 128 replicas per layer over 5 workers.
    let fair = layers().len() * 128usize.div_ceil(5);
    assert!(newcomer <= fair, "{newcomer} > {fair}");
    assert!(
        newcomer + 2 * layers().len() >= fair,
        "{newcomer} far below {fair}"
    );
    for &layer in &layers() {
        let shares: Vec<usize> = ids(5).iter().map(|w| in_layer(&five, w, layer)).collect();
        assert!(shares.iter().all(|&s| (24..=26).contains(&s)), "{shares:?}");
    }
}

#[test]
fn a_leavers_pairs_get_new_owners_and_nothing_else_changes() {
    for policy in [SINGLE, AUTO, PlacementPolicy::fixed(3)] {
        let four = place(None, 64, &pool(4), policy);
        let survivors: Vec<PoolWorker> = pool(4).into_iter().filter(|w| w.id != "w2").collect();
        let three = place(Some(&four), 64, &survivors, policy);
        assert_eq!(three.version, four.version + 1);
        assert!(!three.workers().any(|w| w == "w2"));
        let left = four.experts_of("w2");
        assert_eq!(three.pairs_moved(&four), left.len(), "{policy:?}");
        assert_eq!(three.moved_from(&four), left.len(), "{policy:?}");
        for w in ["w0", "w1", "w3"] {
            assert!(four.experts_of(w).is_subset(three.experts_of(w)));
        }
        let r = four.replicas;
        assert!(three.pairs().all(|(l, e)| three.replicas_of(l, e) == r));
    }
}

#[test]
fn a_joining_worker_takes_a_share() {
    let two = place(None, 64, &pool(2), SINGLE);
    let three = place(Some(&two), 64, &pool(3), SINGLE);
    assert!(three.version > two.version);
    assert!(three.is_complete());
    for &layer in &layers() {
        // Up to ceil(64 / 3) = 22 stay with each old worker; w2 takes the rest.
        assert_eq!(in_layer(&three, "w2", layer), 20, "layer {layer}");
        assert_eq!(in_layer(&three, "w0", layer), 22, "layer {layer}");
    }
    // A sticky split moves only what w2 takes (an even split re-cut 31 per layer).
    assert_eq!(three.moved_from(&two), layers().len() * 20);
    assert_eq!(two.moved_from(&two), 0);
}

#[test]
fn a_leaving_workers_experts_are_reassigned() {
    let three = place(None, 72, &pool(3), SINGLE);
    let w1_held = three.experts_of("w1").clone();
    let survivors = [PoolWorker::unbounded("w0"), PoolWorker::unbounded("w2")];
    let two = place(Some(&three), 72, &survivors, SINGLE);
    assert_eq!(two.version, three.version + 1);
    assert!(two.is_complete());
    assert!(two.experts_of("w1").is_empty());
    assert!(!two.workers().any(|w| w == "w1"));
    for &(layer, expert) in &w1_held {
        assert_eq!(two.owners(layer, expert).len(), 1);
    }
    assert_eq!(two.experts_of("w0").len(), 11 * 36);
    assert_eq!(two.experts_of("w2").len(), 11 * 36);
}

#[test]
fn the_result_does_not_depend_on_worker_order_or_json() {
    let mut workers = pool(6);
    workers[2].capacity = Some(200);
    workers[4].capacity = Some(150);
    let loads = skewed(64);
    let first = next_placement(None, &layers(), 64, &workers[..5], &AUTO, Some(&loads)).unwrap();
    let a = next_placement(Some(&first), &layers(), 64, &workers, &AUTO, None).unwrap();
    // Every placer reads the previous placement back from JSON, gets the
    // workers in its own order, and has no measurements of its own.
    let read: Placement = serde_json::from_str(&serde_json::to_string(&first).unwrap()).unwrap();
    assert_eq!(read, first);
    for rotation in 1..workers.len() {
        let mut shuffled = workers.clone();
        shuffled.rotate_left(rotation);
        shuffled.swap(0, 1);
        let b = next_placement(Some(&read), &layers(), 64, &shuffled, &AUTO, None).unwrap();
        assert_eq!(a, b, "rotation {rotation}");
    }
    assert_eq!(a.loads, first.loads);
    assert_within_capacities(&a, &workers);
}

#[test]
fn a_placement_is_a_fixed_point_of_its_own_inputs() {
    for policy in [SINGLE, AUTO, PlacementPolicy::fixed(3)] {
        for n_workers in [1, 2, 3, 4, 5, 7] {
            for loads in [None, Some(skewed(64))] {
                let p = next_placement(
                    None,
                    &layers(),
                    64,
                    &pool(n_workers),
                    &policy,
                    loads.as_ref(),
                )
                .unwrap();
                let again =
                    next_placement(Some(&p), &layers(), 64, &pool(n_workers), &policy, None)
                        .unwrap();
                assert_eq!(
                    again,
                    p,
                    "{policy:?} on {n_workers}, measured: {}",
                    loads.is_some()
                );
            }
        }
    }
}

#[test]
fn hot_experts_get_redundant_replicas_and_the_imbalance_drops() {
    let loads = skewed(64);
    let uniform = place(None, 64, &pool(4), AUTO);
    let balanced = next_placement(None, &layers(), 64, &pool(4), &AUTO, Some(&loads)).unwrap();
    assert_eq!(balanced.loads.len(), layers().len());
    for &layer in &layers() {
        let replicas: Vec<usize> = (0..64).map(|e| balanced.replicas_of(layer, e)).collect();
        // Four redundant slots per layer, on the hottest experts, never
        // more replicas than workers.
        assert_eq!(replicas.iter().sum::<usize>(), 128 + 4, "layer {layer}");
        assert!(replicas.iter().all(|&r| (2..=4).contains(&r)));
        assert!(replicas[0] > 2 && replicas[1] > 2, "{replicas:?}");
        assert!(replicas[2..].iter().all(|&r| r <= replicas[1]));
    }
    let (before, after) = (imbalance(&uniform, &loads), imbalance(&balanced, &loads));
    assert!(after < before, "imbalance {after} not below {before}");
    assert!((imbalance(&uniform, &BTreeMap::new()) - 1.0).abs() < 1e-9);

    // Later membership changes keep balancing for the stored loads.
    let five = place(Some(&balanced), 64, &pool(5), AUTO);
    assert_eq!(five.loads, balanced.loads);
    assert!(five.replicas_of(1, 0) > 2);

    // Explicitly uniform loads drop them again.
    let flat = next_placement(
        Some(&five),
        &layers(),
        64,
        &pool(5),
        &AUTO,
        Some(&BTreeMap::new()),
    )
    .unwrap();
    assert!(flat.loads.is_empty());
    assert!(flat.pairs().all(|(l, e)| flat.replicas_of(l, e) == 2));
}

#[test]
fn unusable_loads_count_as_uniform() {
    let mut loads = skewed(64);
    loads.insert(1, vec![1.0; 63]); // wrong length
    loads.insert(2, vec![f64::NAN; 64]);
    loads.insert(3, vec![0.0; 64]);
    loads.insert(4, vec![5.0; 64]); // even
    let p = next_placement(None, &layers(), 64, &pool(3), &AUTO, Some(&loads)).unwrap();
    assert_eq!(
        p.loads.keys().copied().collect::<Vec<_>>(),
        (5..12).collect::<Vec<_>>()
    );
    assert_eq!(p.loads[&5][0], LOAD_SCALE);
    assert_eq!(p.loads[&5][1], (LOAD_SCALE / 2.0).round());
}

#[test]
fn version_bumps_only_when_the_assignment_changes() {
    let first = place(None, 64, &pool(2), SINGLE);
    assert_eq!(first.version, 1);
    let same = place(Some(&first), 64, &pool(2), SINGLE);
    assert_eq!(same, first);
    let mut reordered = pool(2);
    reordered.reverse();
    let same = place(Some(&first), 64, &reordered, SINGLE);
    assert_eq!(same.version, 1);
    // Other capacities that still hold the same: unchanged.
    let roomy = [
        PoolWorker::bounded("w0", 400),
        PoolWorker::bounded("w1", 400),
    ];
    assert_eq!(place(Some(&first), 64, &roomy, SINGLE), first);

    let grown = place(Some(&first), 64, &pool(3), SINGLE);
    assert_eq!(grown.version, 2);
    let other_model = place(Some(&grown), 72, &pool(3), SINGLE);
    assert_eq!(other_model.version, 3);
    assert_eq!(other_model.n_experts, 72);
    assert!(other_model.is_complete());
    let replicated = place(Some(&other_model), 72, &pool(3), AUTO);
    assert_eq!(replicated.version, 4);
    assert!(
        other_model
            .experts_of("w1")
            .is_subset(replicated.experts_of("w1"))
    );
}

#[test]
fn moved_from_counts_pairs_whose_owner_set_changed() {
    let a = even_split(1, &[1], 4, &["x".to_string()]).unwrap();
    let b = even_split(2, &[1], 4, &["x".to_string(), "y".to_string()]).unwrap();
    // y takes experts 2 and 3.
    assert_eq!(b.moved_from(&a), 2);
    assert_eq!(a.moved_from(&b), 2);
    let mut c = b.clone();
    c.assignment.get_mut("x").unwrap().insert((1, 2)); // replicated now
    assert_eq!(c.moved_from(&b), 1);
    assert_eq!(c.replicas_of(1, 2), 2);
    assert_eq!(c.replicas_of(1, 0), 1);
    assert_eq!(c.replicas_of(9, 0), 0);
}

#[test]
fn pairs_moved_counts_ownerships_added() {
    let a = even_split(1, &[1], 4, &["x".to_string()]).unwrap();
    let b = even_split(2, &[1], 4, &["x".to_string(), "y".to_string()]).unwrap();
    assert_eq!(b.pairs_moved(&a), 2); // y loads 2 and 3; x drops them for free
    assert_eq!(a.pairs_moved(&b), 2); // x loads 2 and 3 again
    let mut c = b.clone();
    c.assignment.get_mut("x").unwrap().insert((1, 2));
    c.assignment.get_mut("y").unwrap().insert((1, 0));
    assert_eq!(c.pairs_moved(&b), 2);
    assert_eq!(b.pairs_moved(&c), 0);
    assert_eq!(a.pairs_moved(&a), 0);
}
