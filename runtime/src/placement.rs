//! Placement as data: which expert-worker holds which routed experts.
//!
//! A [`Placement`] is a versioned map from worker id to the `(layer, expert)`
//! pairs it holds, computed from the live expert-workers and published through
//! discovery. Workers load exactly their pairs; the scheduler routes by it. For
//! now the map is an even split ([`even_split`]): the experts of every MoE layer
//! are cut into contiguous, near-equal ranges over the workers in sorted-id
//! order, so worker `i` of `N` holds about `1/N` of every layer's experts.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One routed expert of one MoE layer: `(layer, expert)`.
pub type ExpertKey = (usize, usize);

/// The set every unknown worker holds.
static NO_EXPERTS: BTreeSet<ExpertKey> = BTreeSet::new();

/// Which worker holds which routed experts, at one version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    /// Increases whenever the assignment changes; never reused.
    pub version: u64,
    /// The MoE layer ids (sorted, unique) whose routed experts are placed.
    pub layers: Vec<usize>,
    /// Routed experts per MoE layer; experts are `0..n_experts`.
    pub n_experts: usize,
    /// Worker id → the `(layer, expert)` pairs it holds. Every worker the
    /// placement was computed for appears, possibly with an empty set.
    pub assignment: BTreeMap<String, BTreeSet<ExpertKey>>,
}

impl Placement {
    /// The workers holding `(layer, expert)`, in id order.
    pub fn owners(&self, layer: usize, expert: usize) -> Vec<&str> {
        self.assignment
            .iter()
            .filter(|(_, held)| held.contains(&(layer, expert)))
            .map(|(worker, _)| worker.as_str())
            .collect()
    }

    /// The pairs `worker` holds; empty for a worker not in the placement.
    pub fn experts_of(&self, worker: &str) -> &BTreeSet<ExpertKey> {
        self.assignment.get(worker).unwrap_or(&NO_EXPERTS)
    }

    /// The worker ids in the placement, in order.
    pub fn workers(&self) -> impl Iterator<Item = &str> {
        self.assignment.keys().map(String::as_str)
    }

    /// Whether every routed expert of every layer has at least one owner.
    pub fn is_complete(&self) -> bool {
        self.missing() == 0
    }

    /// How many `(layer, expert)` pairs have no owner.
    pub fn missing(&self) -> usize {
        let held: BTreeSet<ExpertKey> = self.assignment.values().flatten().copied().collect();
        self.pairs().filter(|pair| !held.contains(pair)).count()
    }

    /// How many `(layer, expert)` pairs, of either placement, changed owner set
    /// between `previous` and `self`.
    pub fn moved_from(&self, previous: &Placement) -> usize {
        let now = self.owner_sets();
        let before = previous.owner_sets();
        let pairs: BTreeSet<&ExpertKey> = now.keys().chain(before.keys()).collect();
        pairs
            .into_iter()
            .filter(|pair| now.get(pair) != before.get(pair))
            .count()
    }

    /// Every `(layer, expert)` pair this placement must cover.
    fn pairs(&self) -> impl Iterator<Item = ExpertKey> + '_ {
        self.layers
            .iter()
            .flat_map(|&layer| (0..self.n_experts).map(move |expert| (layer, expert)))
    }

    /// `(layer, expert)` → its owners, for every pair that has one.
    fn owner_sets(&self) -> BTreeMap<ExpertKey, BTreeSet<&str>> {
        let mut owners: BTreeMap<ExpertKey, BTreeSet<&str>> = BTreeMap::new();
        for (worker, held) in &self.assignment {
            for &pair in held {
                owners.entry(pair).or_default().insert(worker.as_str());
            }
        }
        owners
    }

    /// Whether `other` places the same experts on the same workers.
    fn same_assignment(&self, other: &Placement) -> bool {
        self.layers == other.layers
            && self.n_experts == other.n_experts
            && self.assignment == other.assignment
    }
}

/// An even split at `version`: each MoE layer's `n_experts` experts are cut into
/// contiguous ranges over `workers` in sorted-id order, the first
/// `n_experts % N` workers taking one more. Every pair lands on exactly one
/// worker. Errors when `workers` is empty or repeats an id.
pub fn even_split(
    version: u64,
    moe_layers: &[usize],
    n_experts: usize,
    workers: &[String],
) -> Result<Placement> {
    let mut layers = moe_layers.to_vec();
    layers.sort_unstable();
    layers.dedup();
    let mut ids: Vec<&String> = workers.iter().collect();
    ids.sort();
    if let Some(pair) = ids.windows(2).find(|pair| pair[0] == pair[1]) {
        return Err(Error::DuplicateId {
            what: "expert-worker",
            id: pair[0].clone(),
        });
    }
    if ids.is_empty() {
        return Err(Error::NoWorkers {
            n_layers: layers.len(),
            n_experts,
        });
    }

    let (base, extra) = (n_experts / ids.len(), n_experts % ids.len());
    let mut start = 0;
    let mut assignment = BTreeMap::new();
    for (i, id) in ids.into_iter().enumerate() {
        let end = start + base + usize::from(i < extra);
        let held = layers
            .iter()
            .flat_map(|&layer| (start..end).map(move |expert| (layer, expert)))
            .collect();
        assignment.insert(id.clone(), held);
        start = end;
    }
    Ok(Placement {
        version,
        layers,
        n_experts,
        assignment,
    })
}

/// The placement for `live_workers`, following `previous`: `previous` itself
/// when the assignment would not change, otherwise a new even split at
/// `previous.version + 1` (version 1 when there is no previous placement).
pub fn next_placement(
    previous: Option<&Placement>,
    moe_layers: &[usize],
    n_experts: usize,
    live_workers: &[String],
) -> Result<Placement> {
    let version = previous.map_or(1, |p| p.version + 1);
    let next = even_split(version, moe_layers, n_experts, live_workers)?;
    match previous {
        Some(previous) if previous.same_assignment(&next) => Ok(previous.clone()),
        _ => {
            tracing::info!(
                version,
                workers = next.assignment.len(),
                moved = previous.map(|p| next.moved_from(p)),
                "new expert placement"
            );
            Ok(next)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("w{i}")).collect()
    }

    /// Layer ids as in DeepSeek-VL2 Tiny: layer 0 dense, the rest MoE.
    fn layers() -> Vec<usize> {
        (1..12).collect()
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
        let err = next_placement(None, &layers(), 64, &[]).unwrap_err();
        assert!(matches!(err, Error::NoWorkers { .. }));
        let dup = vec!["a".to_string(), "b".to_string(), "a".to_string()];
        let err = even_split(1, &layers(), 64, &dup).unwrap_err();
        assert!(matches!(err, Error::DuplicateId { ref id, .. } if id == "a"));
    }

    #[test]
    fn more_workers_than_experts_leaves_some_workers_empty() {
        let p = even_split(1, &[1], 3, &ids(7)).unwrap();
        assert!(p.is_complete());
        assert_eq!(p.assignment.len(), 7);
        assert_eq!(p.experts_of("w0").len(), 1);
        assert!(p.experts_of("w6").is_empty());
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
    fn version_bumps_only_when_the_assignment_changes() {
        let first = next_placement(None, &layers(), 64, &ids(2)).unwrap();
        assert_eq!(first.version, 1);
        let same = next_placement(Some(&first), &layers(), 64, &ids(2)).unwrap();
        assert_eq!(same, first);
        let mut reordered = ids(2);
        reordered.reverse();
        let same = next_placement(Some(&first), &layers(), 64, &reordered).unwrap();
        assert_eq!(same.version, 1);

        let grown = next_placement(Some(&first), &layers(), 64, &ids(3)).unwrap();
        assert_eq!(grown.version, 2);
        let other_model = next_placement(Some(&grown), &layers(), 72, &ids(3)).unwrap();
        assert_eq!(other_model.version, 3);
        assert_eq!(other_model.n_experts, 72);
    }

    #[test]
    fn a_joining_worker_takes_a_share() {
        let two = next_placement(None, &layers(), 64, &ids(2)).unwrap();
        let three = next_placement(Some(&two), &layers(), 64, &ids(3)).unwrap();
        assert!(three.version > two.version);
        assert!(three.is_complete());
        for &layer in &layers() {
            let held = three
                .experts_of("w2")
                .iter()
                .filter(|(l, _)| *l == layer)
                .count();
            assert_eq!(held, 21, "layer {layer}");
        }
        // Per layer: w2 takes 43..64 from w1, and w1 takes 22..32 from w0 (an
        // even split re-cuts every range; a sticky one would move fewer).
        assert_eq!(three.moved_from(&two), layers().len() * (21 + 10));
        assert_eq!(two.moved_from(&two), 0);
    }

    #[test]
    fn a_leaving_workers_experts_are_reassigned() {
        let three = next_placement(None, &layers(), 72, &ids(3)).unwrap();
        let w1_held = three.experts_of("w1").clone();
        let survivors = vec!["w0".to_string(), "w2".to_string()];
        let two = next_placement(Some(&three), &layers(), 72, &survivors).unwrap();
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
    fn moved_from_counts_pairs_whose_owner_set_changed() {
        let a = even_split(1, &[1], 4, &["x".to_string()]).unwrap();
        let b = even_split(2, &[1], 4, &["x".to_string(), "y".to_string()]).unwrap();
        // y takes experts 2 and 3.
        assert_eq!(b.moved_from(&a), 2);
        assert_eq!(a.moved_from(&b), 2);
        let mut c = b.clone();
        c.assignment.get_mut("x").unwrap().insert((1, 2)); // replicated now
        assert_eq!(c.moved_from(&b), 1);
    }
}
