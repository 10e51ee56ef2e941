//! How many experts a join or a leave moves, at the released models' layouts:
//! the placement keeps existing owners, so a pool change loads only what the
//! joining worker takes or what the leaving worker held, where the even split
//! it replaced re-cut every range. Prints the counts (`--no-capture`).

use tessera_runtime::placement::{
    Placement, PlacementPolicy, PoolWorker, even_split, next_placement,
};

/// (name, MoE layers, routed experts per layer) of Tiny, Small and Base.
const MODELS: [(&str, usize, usize); 3] = [("Tiny", 11, 64), ("Small", 26, 64), ("Base", 29, 72)];

fn ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("ew-{i}")).collect()
}

fn place(
    previous: Option<&Placement>,
    layers: &[usize],
    experts: usize,
    n: usize,
    r: usize,
) -> Placement {
    next_placement(
        previous,
        layers,
        experts,
        &PoolWorker::unbounded_all(&ids(n)),
        &PlacementPolicy::fixed(r),
        None,
    )
    .unwrap()
}

#[test]
fn a_join_or_a_leave_loads_only_what_must_move() {
    for (name, n_layers, experts) in MODELS {
        let layers: Vec<usize> = (1..=n_layers).collect();
        let pairs = n_layers * experts;
        // The even split: every range re-cut.
        let split = |n| even_split(1, &layers, experts, &ids(n)).unwrap();
        let split_join = split(4).pairs_moved(&split(3));
        let split_leave = split(3).pairs_moved(&split(4));
        for r in [1, 2] {
            let three = place(None, &layers, experts, 3, r);
            let four = place(Some(&three), &layers, experts, 4, r);
            let back = place(Some(&four), &layers, experts, 3, r);
            let (join, leave) = (four.pairs_moved(&three), back.pairs_moved(&four));
            println!(
                "{name} ({pairs} experts), {r} replica(s): 3 → 4 workers loads {join} \
                 (even split: {split_join}), 4 → 3 loads {leave} (even split: {split_leave})"
            );
            // A join loads only the newcomer's share, a leave only the leaver's.
            assert_eq!(join, four.experts_of("ew-3").len(), "{name}, join");
            assert_eq!(leave, four.experts_of("ew-3").len(), "{name}, leave");
            assert!(join <= r * pairs / 4 + n_layers, "{name}: {join}");
            if r == 1 {
                assert!(join < split_join && leave < split_leave, "{name}");
            }
        }
    }
}
