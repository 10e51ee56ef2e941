//! Placement as data: which expert-workers hold which routed experts.
//!
//! A [`Placement`] is a versioned map from worker id to the `(layer, expert)`
//! pairs it holds, computed from the live expert-workers and published through
//! discovery. Workers load exactly their pairs; the scheduler routes by it.
//! [`next_placement`] computes each new map from the previous one:
//!
//! - **Replication.** Every routed expert lives on `R` distinct workers
//!   ([`PlacementPolicy`]; by default 2 once there are two workers), so a worker
//!   leaving takes no expert out of service and routed tokens can be spread.
//! - **Redundant hot experts.** When a layer's measured routed-token loads are
//!   skewed, the layer gets one extra replica slot per worker, each given in turn
//!   to the expert with the highest load per replica — the "replicate" step of
//!   DeepSeek's expert-parallelism load balancer (EPLB). The loads travel in the
//!   placement, so placers that measure nothing keep using them.
//! - **Capacities.** A worker never holds more than [`PoolWorker::capacity`]
//!   pairs. When the pool cannot hold every wanted replica, replication is
//!   lowered for the coldest experts first; only when one owner each does not
//!   fit are the coldest experts left without owner.
//! - **Minimal movement.** As in consistent hashing with bounded loads (Mirrokni
//!   et al.), live owners keep what they hold up to a per-layer fair share
//!   (`ceil(replicas of the layer / workers)`); only the replicas that lost
//!   their owner, or were shed by a worker above its share (its coldest, and
//!   only where a worker under the share can take them), move — each to the
//!   eligible worker with the lowest expected load in the layer, with
//!   augmenting paths (as in bipartite matching) re-routing replicas placed in
//!   the same computation rather than pushing a worker above its share. A
//!   placement is thus a fixed point: recomputed for the same inputs, it comes
//!   back unchanged.
//!
//! Every scheduler and expert-worker runs a placer, so the computation is
//! deterministic in (previous placement, workers and capacities, policy, loads)
//! and independent of the order the workers are given in. [`even_split`] — one
//! owner per expert, contiguous ranges — remains for fixtures.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

mod build;
use build::{Builder, Pool};

/// One routed expert of one MoE layer: `(layer, expert)`.
pub type ExpertKey = (usize, usize);

/// The set every unknown worker holds.
static NO_EXPERTS: BTreeSet<ExpertKey> = BTreeSet::new();

/// Stored loads are on this scale: a layer's hottest expert is `LOAD_SCALE`, the
/// others in proportion, rounded to whole numbers so that they survive JSON
/// exactly and every placer reads back the very numbers the publisher used.
const LOAD_SCALE: f64 = 1_000_000.0;

/// Which workers hold which routed experts, at one version.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
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
    /// The replication the placement was made for (informational: capacities
    /// may have lowered it for some experts, hot experts may have more).
    #[serde(default)]
    pub replicas: usize,
    /// Per MoE layer, the relative routed-token load of each expert (one entry
    /// per expert) the placement balanced for; a layer not listed is uniform.
    /// Stored as whole numbers relative to the layer's hottest expert
    /// (1 000 000), so that they read back exactly from JSON on every placer.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub loads: BTreeMap<usize, Vec<f64>>,
}

/// The loads of placements built here are finite, so equality is an equivalence.
impl Eq for Placement {}

impl Placement {
    /// The workers holding `(layer, expert)`, in id order.
    pub fn owners(&self, layer: usize, expert: usize) -> Vec<&str> {
        self.assignment
            .iter()
            .filter(|(_, held)| held.contains(&(layer, expert)))
            .map(|(worker, _)| worker.as_str())
            .collect()
    }

    /// How many workers hold `(layer, expert)`.
    pub fn replicas_of(&self, layer: usize, expert: usize) -> usize {
        self.assignment
            .values()
            .filter(|held| held.contains(&(layer, expert)))
            .count()
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

    /// How many `((layer, expert), worker)` ownerships `self` has that
    /// `previous` had not: the expert loads workers must do to get from
    /// `previous` to `self` (dropping a pair costs nothing).
    pub fn pairs_moved(&self, previous: &Placement) -> usize {
        self.assignment
            .iter()
            .map(|(worker, held)| held.difference(previous.experts_of(worker)).count())
            .sum()
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

/// One expert-worker a placement may put experts on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolWorker {
    /// Its discovery id.
    pub id: String,
    /// The most `(layer, expert)` pairs it may hold in total (its expert memory
    /// budget divided by one expert's bytes); `None` is unbounded.
    pub capacity: Option<usize>,
}

impl PoolWorker {
    /// A worker without a capacity limit.
    pub fn unbounded(id: impl Into<String>) -> Self {
        PoolWorker {
            id: id.into(),
            capacity: None,
        }
    }

    /// A worker that may hold at most `capacity` pairs.
    pub fn bounded(id: impl Into<String>, capacity: usize) -> Self {
        PoolWorker {
            id: id.into(),
            capacity: Some(capacity),
        }
    }

    /// Unbounded workers with `ids`.
    pub fn unbounded_all(ids: &[String]) -> Vec<PoolWorker> {
        ids.iter().map(PoolWorker::unbounded).collect()
    }

    /// The capacity, `usize::MAX` when unbounded.
    fn limit(&self) -> usize {
        self.capacity.unwrap_or(usize::MAX)
    }
}

/// How many workers each routed expert should live on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PlacementPolicy {
    /// `Some(r)`: every routed expert on `min(r, workers)` distinct workers
    /// (`Some(0)` counts as 1). `None` (the default): 2 when there are at least
    /// two workers, else 1. Capacities may lower it for the coldest experts.
    pub replicas: Option<usize>,
}

impl PlacementPolicy {
    /// Exactly `replicas` owners per expert (where there are enough workers).
    pub fn fixed(replicas: usize) -> Self {
        PlacementPolicy {
            replicas: Some(replicas),
        }
    }

    /// The replication wanted on `n_workers` workers, before capacities.
    pub fn replicas_for(&self, n_workers: usize) -> usize {
        match self.replicas {
            Some(r) => r.max(1).min(n_workers),
            None => n_workers.min(2),
        }
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
        replicas: 1,
        loads: BTreeMap::new(),
    })
}

/// The placement of `layers` × `n_experts` routed experts on `workers`,
/// following `previous` (see the module docs for the rules). `loads` replaces
/// the loads to balance for; `None` keeps `previous`'s. Returns `previous`
/// itself when the assignment would not change, otherwise a placement at
/// `previous.version + 1` (version 1 without a previous placement). A result
/// that leaves experts without owner (the capacities are too small) is returned
/// too — [`Placement::is_complete`] is false — and logged. Errors when
/// `workers` is empty or repeats an id.
pub fn next_placement(
    previous: Option<&Placement>,
    layers: &[usize],
    n_experts: usize,
    workers: &[PoolWorker],
    policy: &PlacementPolicy,
    loads: Option<&BTreeMap<usize, Vec<f64>>>,
) -> Result<Placement> {
    let mut layers = layers.to_vec();
    layers.sort_unstable();
    layers.dedup();
    let pool = Pool::new(workers, layers.len(), n_experts)?;
    let loads = resolve_loads(&layers, n_experts, loads.or(previous.map(|p| &p.loads)));
    let replicas = policy.replicas_for(pool.len());
    let mut builder = Builder::new(pool, &layers, n_experts, &loads, replicas);
    if let Some(previous) = previous {
        builder.adopt(previous);
    }
    builder.fill();
    builder.report(replicas);
    let next = Placement {
        version: previous.map_or(1, |p| p.version + 1),
        layers,
        n_experts,
        assignment: builder.into_assignment(),
        replicas,
        loads,
    };
    Ok(settle(previous, next))
}

/// `previous` when `next` assigns the same, else `next` (logged).
fn settle(previous: Option<&Placement>, next: Placement) -> Placement {
    match previous {
        Some(previous) if previous.same_assignment(&next) => previous.clone(),
        _ => {
            tracing::info!(
                version = next.version,
                workers = next.assignment.len(),
                replicas = next.replicas,
                moved = previous.map(|p| next.moved_from(p)),
                added = previous.map(|p| next.pairs_moved(p)),
                "new expert placement"
            );
            next
        }
    }
}

/// The load imbalance of `placement` under `loads`: per layer, the expected
/// routed-token load of the busiest worker over the mean worker's, averaged over
/// the layers (1.0 is perfectly even). A worker's expected load sums, over the
/// experts it holds, the expert's load split evenly among its owners. Layers
/// missing from `loads`, or listed with the wrong length, count as uniform.
pub fn imbalance(placement: &Placement, loads: &BTreeMap<usize, Vec<f64>>) -> f64 {
    if placement.layers.is_empty() {
        return 1.0;
    }
    let owners = placement.owner_sets();
    let total: f64 = placement
        .layers
        .iter()
        .map(|&layer| {
            let measured = loads
                .get(&layer)
                .filter(|l| l.len() == placement.n_experts)
                .map(Vec::as_slice);
            layer_imbalance(placement, layer, measured, &owners)
        })
        .sum();
    total / placement.layers.len() as f64
}

/// [`imbalance`] of one layer; `loads` `None` is uniform.
fn layer_imbalance(
    placement: &Placement,
    layer: usize,
    loads: Option<&[f64]>,
    owners: &BTreeMap<ExpertKey, BTreeSet<&str>>,
) -> f64 {
    let share = |&(l, e): &ExpertKey| -> f64 {
        let load = loads.map_or(1.0, |loads| loads.get(e).copied().unwrap_or(0.0));
        let n = owners.get(&(l, e)).map_or(1, BTreeSet::len);
        load / n as f64
    };
    let per_worker: Vec<f64> = placement
        .assignment
        .values()
        .map(|held| held.iter().filter(|(l, _)| *l == layer).map(share).sum())
        .collect();
    let total: f64 = per_worker.iter().sum();
    if per_worker.is_empty() || total <= 0.0 {
        return 1.0;
    }
    let busiest = per_worker.iter().copied().fold(0.0, f64::max);
    busiest / (total / per_worker.len() as f64)
}

/// The loads to place by: for each of `layers` that `given` measures usably and
/// unevenly, its loads on the [`LOAD_SCALE`] grid.
fn resolve_loads(
    layers: &[usize],
    n_experts: usize,
    given: Option<&BTreeMap<usize, Vec<f64>>>,
) -> BTreeMap<usize, Vec<f64>> {
    let Some(given) = given else {
        return BTreeMap::new();
    };
    layers
        .iter()
        .filter_map(|&layer| Some((layer, quantise(given.get(&layer)?, n_experts)?)))
        .collect()
}

/// `raw` on the [`LOAD_SCALE`] grid; `None` when it is uniform, or unusable
/// (wrong length, negative, not finite, all zero).
fn quantise(raw: &[f64], n_experts: usize) -> Option<Vec<f64>> {
    if raw.len() != n_experts || raw.iter().any(|l| !l.is_finite() || *l < 0.0) {
        tracing::debug!(len = raw.len(), n_experts, "ignoring unusable expert loads");
        return None;
    }
    let hottest = raw.iter().copied().fold(0.0, f64::max);
    if hottest <= 0.0 {
        return None;
    }
    let scaled: Vec<f64> = raw
        .iter()
        .map(|l| (l / hottest * LOAD_SCALE).round())
        .collect();
    let uniform = scaled.iter().all(|&l| l >= LOAD_SCALE);
    (!uniform).then_some(scaled)
}

#[cfg(test)]
mod tests;
