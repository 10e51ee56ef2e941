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

/// The workers, sorted by id, and the pairs each holds while a placement is
/// built. Workers are named by their index here.
struct Pool<'a> {
    workers: Vec<&'a PoolWorker>,
    held: Vec<BTreeSet<ExpertKey>>,
}

impl<'a> Pool<'a> {
    /// The pool of `workers`; errors when it is empty or repeats an id.
    fn new(workers: &'a [PoolWorker], n_layers: usize, n_experts: usize) -> Result<Self> {
        let mut sorted: Vec<&PoolWorker> = workers.iter().collect();
        sorted.sort_by(|a, b| a.id.cmp(&b.id));
        if let Some(pair) = sorted.windows(2).find(|pair| pair[0].id == pair[1].id) {
            return Err(Error::DuplicateId {
                what: "expert-worker",
                id: pair[0].id.clone(),
            });
        }
        if sorted.is_empty() {
            return Err(Error::NoWorkers {
                n_layers,
                n_experts,
            });
        }
        let held = vec![BTreeSet::new(); sorted.len()];
        Ok(Pool {
            workers: sorted,
            held,
        })
    }

    fn len(&self) -> usize {
        self.workers.len()
    }

    /// The index of the worker with `id`.
    fn index(&self, id: &str) -> Option<usize> {
        self.workers
            .binary_search_by(|w| w.id.as_str().cmp(id))
            .ok()
    }

    fn limit(&self, w: usize) -> usize {
        self.workers[w].limit()
    }

    fn has_room(&self, w: usize) -> bool {
        self.held[w].len() < self.limit(w)
    }

    /// How many workers may hold anything.
    fn hosts(&self) -> usize {
        (0..self.len()).filter(|&w| self.limit(w) > 0).count()
    }

    /// The most replicas the pool can hold of `n_pairs` distinct pairs.
    fn room_for(&self, n_pairs: usize) -> usize {
        (0..self.len())
            .map(|w| self.limit(w).min(n_pairs))
            .fold(0, usize::saturating_add)
    }
}

/// One MoE layer while a placement is built.
struct LayerPlan {
    layer: usize,
    /// Relative load per expert, on the [`LOAD_SCALE`] grid.
    loads: Vec<f64>,
    /// Wanted replicas per expert.
    counts: Vec<usize>,
    /// Owners per expert (pool indices).
    owners: Vec<Vec<usize>>,
    /// Pairs of this layer per worker.
    held: Vec<usize>,
    /// Expected load per worker: load / replicas summed over its experts.
    expected: Vec<f64>,
    /// `(expert, worker)` ownerships this computation added (moving them on
    /// costs no extra load).
    fresh: BTreeSet<(usize, usize)>,
    /// Per pair of workers, how many experts of this layer both hold.
    together: Vec<Vec<usize>>,
}

impl LayerPlan {
    /// `layer` with `base` wanted replicas of every expert and no owners.
    fn new(layer: usize, loads: Vec<f64>, base: usize, n_workers: usize) -> Self {
        let n_experts = loads.len();
        LayerPlan {
            layer,
            loads,
            counts: vec![base; n_experts],
            owners: vec![Vec::new(); n_experts],
            held: vec![0; n_workers],
            expected: vec![0.0; n_workers],
            fresh: BTreeSet::new(),
            together: vec![vec![0; n_workers]; n_workers],
        }
    }

    /// The wanted replicas of all experts.
    fn slots(&self) -> usize {
        self.counts.iter().sum()
    }

    /// The most pairs of this layer a worker keeps: its fair share, rounded up.
    fn cap(&self, hosts: usize) -> usize {
        self.slots().div_ceil(hosts.max(1))
    }

    /// The load each owner of `expert` is expected to serve.
    fn share(&self, expert: usize) -> f64 {
        match self.counts[expert] {
            0 => 0.0,
            n => self.loads[expert] / n as f64,
        }
    }

    /// The experts hottest first, ties by expert id.
    fn hottest_first(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.loads.len()).collect();
        order.sort_by(|&a, &b| self.loads[b].total_cmp(&self.loads[a]).then(a.cmp(&b)));
        order
    }

    /// Gives `slots` redundant replicas, one at a time, each to the expert with
    /// the highest load per replica (DeepSeek EPLB's "replicate" step), never
    /// past `max` replicas of one expert.
    fn add_redundant(&mut self, slots: usize, max: usize) {
        for _ in 0..slots {
            let per_replica = |e: usize| self.loads[e] / self.counts[e] as f64;
            let hottest = (0..self.loads.len())
                .filter(|&e| self.counts[e] > 0 && self.counts[e] < max)
                .max_by(|&a, &b| per_replica(a).total_cmp(&per_replica(b)).then(b.cmp(&a)));
            match hottest {
                Some(e) => self.counts[e] += 1,
                None => return,
            }
        }
    }

    fn add_owner(&mut self, expert: usize, w: usize) {
        for &o in &self.owners[expert] {
            self.together[w][o] += 1;
            self.together[o][w] += 1;
        }
        self.owners[expert].push(w);
        self.held[w] += 1;
        self.expected[w] += self.share(expert);
    }

    fn remove_owner(&mut self, expert: usize, w: usize) {
        self.owners[expert].retain(|&o| o != w);
        for &o in &self.owners[expert] {
            self.together[w][o] -= 1;
            self.together[o][w] -= 1;
        }
        self.held[w] -= 1;
        self.expected[w] -= self.share(expert);
    }

    /// Drops owners beyond the wanted count, from the workers holding the most
    /// of this layer.
    fn drop_surplus(&mut self) {
        for e in 0..self.owners.len() {
            while self.owners[e].len() > self.counts[e] {
                let Some(&w) = self.owners[e].iter().max_by_key(|&&w| (self.held[w], w)) else {
                    break;
                };
                self.remove_owner(e, w);
            }
        }
    }

    /// How many experts of this layer worker `w` shares with `partners`,
    /// counted once per partner.
    fn shared(&self, w: usize, partners: &[usize]) -> usize {
        partners.iter().map(|&o| self.together[w][o]).sum()
    }

    /// Recomputes the expected loads from the owners, in a fixed order.
    fn recompute_expected(&mut self) {
        let mut expected = vec![0.0; self.expected.len()];
        for (e, owners) in self.owners.iter().enumerate() {
            for &w in owners {
                expected[w] += self.share(e);
            }
        }
        self.expected = expected;
    }
}

/// One wanted replica, ranked for [`fit_capacity`].
struct Slot {
    /// 0: an expert's only replica; 1: up to the policy's replication; 2: redundant.
    tier: u8,
    /// Load per replica the slot relieves: higher is kept first.
    value: f64,
    plan: usize,
    expert: usize,
}

/// Lowers the wanted replica counts until they fit `room` replicas in all: the
/// redundant replicas go first, then replication beyond one owner, then the
/// only owner, each coldest first (lowest load per replica; ties: later layers
/// and experts first).
fn fit_capacity(plans: &mut [LayerPlan], base: usize, room: usize) {
    let wanted: usize = plans.iter().map(LayerPlan::slots).sum();
    if wanted <= room {
        return;
    }
    tracing::warn!(
        wanted,
        room,
        "expert-worker capacities cannot hold every wanted replica; lowering replication \
         of the coldest experts"
    );
    let mut slots = Vec::with_capacity(wanted);
    for (p, plan) in plans.iter().enumerate() {
        for (expert, &count) in plan.counts.iter().enumerate() {
            for k in 1..=count {
                slots.push(Slot {
                    tier: if k == 1 {
                        0
                    } else if k <= base {
                        1
                    } else {
                        2
                    },
                    value: plan.loads[expert] / (k - 1).max(1) as f64,
                    plan: p,
                    expert,
                });
            }
        }
    }
    slots.sort_by(|a, b| {
        (a.tier.cmp(&b.tier))
            .then(b.value.total_cmp(&a.value))
            .then((a.plan, a.expert).cmp(&(b.plan, b.expert)))
    });
    for plan in plans.iter_mut() {
        plan.counts.iter_mut().for_each(|c| *c = 0);
    }
    for slot in slots.iter().take(room) {
        plans[slot.plan].counts[slot.expert] += 1;
    }
}

/// Per worker, the worker it takes a pair from on an augmenting path, and the
/// pair's expert.
type Parents = Vec<Option<(usize, usize)>>;

/// A placement under construction: the pool and one plan per layer.
struct Builder<'a> {
    pool: Pool<'a>,
    plans: Vec<LayerPlan>,
    hosts: usize,
}

impl<'a> Builder<'a> {
    /// Wanted replica counts for every layer: `replicas` each (never more than
    /// the workers that may hold anything), redundant replicas where `loads`
    /// measures the layer, all fitted to the pool's capacity.
    fn new(
        pool: Pool<'a>,
        layers: &[usize],
        n_experts: usize,
        loads: &BTreeMap<usize, Vec<f64>>,
        replicas: usize,
    ) -> Self {
        let hosts = pool.hosts();
        let base = replicas.min(hosts);
        let mut plans: Vec<LayerPlan> = layers
            .iter()
            .map(|&layer| {
                let measured = loads.get(&layer);
                let layer_loads = measured
                    .cloned()
                    .unwrap_or_else(|| vec![LOAD_SCALE; n_experts]);
                let mut plan = LayerPlan::new(layer, layer_loads, base, pool.len());
                if measured.is_some() {
                    plan.add_redundant(hosts, hosts);
                }
                plan
            })
            .collect();
        fit_capacity(&mut plans, base, pool.room_for(layers.len() * n_experts));
        Builder { pool, plans, hosts }
    }

    /// The plan index of `layer`.
    fn plan_of(&self, layer: usize) -> Option<usize> {
        self.plans.binary_search_by_key(&layer, |p| p.layer).ok()
    }

    /// Keeps the live owners of `previous` within the wanted counts, the
    /// per-layer fair share and the capacities.
    fn adopt(&mut self, previous: &Placement) {
        for (id, held) in &previous.assignment {
            let Some(w) = self.pool.index(id) else {
                continue;
            };
            for &(layer, expert) in held {
                let Some(p) = self.plan_of(layer) else {
                    continue;
                };
                let plan = &mut self.plans[p];
                if expert < plan.counts.len() && plan.counts[expert] > 0 {
                    plan.add_owner(expert, w);
                }
            }
        }
        for plan in &mut self.plans {
            plan.drop_surplus();
            for (expert, owners) in plan.owners.iter().enumerate() {
                for &w in owners {
                    self.pool.held[w].insert((plan.layer, expert));
                }
            }
        }
        self.enforce_limits();
        let mut incoming = vec![0; self.pool.len()];
        for p in 0..self.plans.len() {
            self.shed_above_cap(p, &mut incoming);
        }
    }

    /// Brings every worker above the fair share of plan `p`'s layer down to it,
    /// shedding its coldest experts — preferring ones no other worker shed, so
    /// that a joining worker can take them all — but only experts some worker
    /// under the share, with room (less what `incoming` already promises it),
    /// could take: a shed nobody can take would only come back.
    fn shed_above_cap(&mut self, p: usize, incoming: &mut [usize]) {
        let cap = self.plans[p].cap(self.hosts);
        let n_experts = self.plans[p].loads.len();
        let mut deficit: Vec<usize> = (self.plans[p].held.iter())
            .map(|&held| cap.saturating_sub(held))
            .collect();
        let mut promised: BTreeSet<(usize, usize)> = BTreeSet::new();
        let mut shed = vec![0usize; n_experts];
        for v in 0..self.pool.len() {
            while self.plans[p].held[v] > cap {
                let plan = &self.plans[p];
                let taker = |e: usize| {
                    (0..self.pool.len()).find(|&u| {
                        deficit[u] > 0
                            && self.pool.held[u].len() + incoming[u] < self.pool.limit(u)
                            && !plan.owners[e].contains(&u)
                            && !promised.contains(&(u, e))
                    })
                };
                let Some((e, u)) = (0..n_experts)
                    .filter(|&e| plan.owners[e].contains(&v))
                    .filter_map(|e| taker(e).map(|u| (e, u)))
                    .min_by(|&(a, _), &(b, _)| {
                        (shed[a].cmp(&shed[b]))
                            .then(plan.loads[a].total_cmp(&plan.loads[b]))
                            .then(b.cmp(&a))
                    })
                else {
                    break;
                };
                promised.insert((u, e));
                deficit[u] -= 1;
                incoming[u] += 1;
                shed[e] += 1;
                let layer = plan.layer;
                self.unassign(layer, e, v);
            }
        }
    }

    /// Sheds the coldest pairs of every worker above its capacity.
    fn enforce_limits(&mut self) {
        for w in 0..self.pool.len() {
            while self.pool.held[w].len() > self.pool.limit(w) {
                let Some(&(layer, expert)) = self.pool.held[w].iter().min_by(|a, b| {
                    (self.load_of(**a).total_cmp(&self.load_of(**b))).then(b.cmp(a))
                }) else {
                    break;
                };
                self.unassign(layer, expert, w);
            }
        }
    }

    /// The load of `(layer, expert)`.
    fn load_of(&self, (layer, expert): ExpertKey) -> f64 {
        self.plan_of(layer)
            .and_then(|p| self.plans[p].loads.get(expert).copied())
            .unwrap_or(0.0)
    }

    /// Gives every expert its missing replicas, in rounds (every expert's
    /// first owner before any second one, so that scarce capacity goes to one
    /// owner each first), hottest experts first within a layer.
    fn fill(&mut self) {
        for plan in &mut self.plans {
            plan.recompute_expected();
        }
        let orders: Vec<Vec<usize>> = self.plans.iter().map(LayerPlan::hottest_first).collect();
        let rounds = self.plans.iter().flat_map(|p| p.counts.iter()).max();
        for round in 1..=rounds.copied().unwrap_or(0) {
            for (p, order) in orders.iter().enumerate() {
                for &expert in order {
                    self.fill_one(p, expert, round);
                }
            }
        }
        for p in 0..self.plans.len() {
            self.level(p);
        }
    }

    /// Moves pairs of plan `p`'s layer from workers above its fair share to
    /// workers under it (with room, lacking the pair) while there are such
    /// moves: what the fill was forced to put above the share. A placement is
    /// then level — the next one for the same inputs sheds nothing.
    fn level(&mut self, p: usize) {
        let cap = self.plans[p].cap(self.hosts);
        for v in 0..self.pool.len() {
            while self.plans[p].held[v] > cap {
                let Some((expert, u)) = self.level_move(p, v, cap) else {
                    break;
                };
                let layer = self.plans[p].layer;
                self.unassign(layer, expert, v);
                self.assign(layer, expert, u);
            }
        }
    }

    /// An expert of plan `p` that worker `v` holds and a worker under `cap`
    /// with room lacks — one `v` got in this computation if any (moving it on
    /// costs nothing), else the coldest — and the least loaded such worker.
    fn level_move(&self, p: usize, v: usize, cap: usize) -> Option<(usize, usize)> {
        let plan = &self.plans[p];
        let taker = |e: usize| {
            (0..self.pool.len())
                .filter(|&u| plan.held[u] < cap && self.pool.has_room(u))
                .filter(|&u| !plan.owners[e].contains(&u))
                .min_by(|&a, &b| {
                    (plan.expected[a].total_cmp(&plan.expected[b]))
                        .then(self.pool.held[a].len().cmp(&self.pool.held[b].len()))
                        .then(a.cmp(&b))
                })
        };
        (0..plan.loads.len())
            .filter(|&e| plan.owners[e].contains(&v))
            .filter_map(|e| taker(e).map(|u| (e, u)))
            .min_by(|&(a, _), &(b, _)| {
                let old = |e: usize| !plan.fresh.contains(&(e, v));
                (old(a).cmp(&old(b)))
                    .then(plan.loads[a].total_cmp(&plan.loads[b]))
                    .then(b.cmp(&a))
            })
    }

    /// Gives `expert` of plan `p` one more owner if it has fewer than
    /// `round` and fewer than wanted.
    fn fill_one(&mut self, p: usize, expert: usize, round: usize) {
        let plan = &self.plans[p];
        if plan.owners[expert].len() >= plan.counts[expert].min(round) {
            return;
        }
        let layer = plan.layer;
        let cap = plan.cap(self.hosts);
        match self.pick(p, expert) {
            Some(w) if self.plans[p].held[w] < cap => self.assign(layer, expert, w),
            Some(w) => {
                if !self.augment(p, expert) {
                    self.assign(layer, expert, w);
                }
            }
            None => {
                if !self.augment(p, expert) {
                    self.swap_in(p, expert);
                }
            }
        }
    }

    /// When no worker under the fair share of plan `p`'s layer can take a
    /// replica of `expert`: finds an augmenting path, as in bipartite
    /// b-matching (Ford–Fulkerson) — a worker lacking the expert takes it and
    /// passes a pair it got in this computation on to another worker, and so
    /// on, until one under the share with room takes the last. Only pairs
    /// placed in this computation move, so kept owners stay put. Breadth-first
    /// in worker order; returns whether it found a path (and applied it).
    fn augment(&mut self, p: usize, expert: usize) -> bool {
        let Some((end, parent)) = self.augmenting_path(p, expert) else {
            return false;
        };
        let layer = self.plans[p].layer;
        let mut at = end;
        while let Some((from, moved)) = parent[at] {
            self.unassign(layer, moved, from);
            self.assign(layer, moved, at);
            at = from;
        }
        self.assign(layer, expert, at);
        true
    }

    /// The breadth-first search of [`Builder::augment`]: the worker that ends
    /// the path, and for every reached worker the one it takes a pair from.
    fn augmenting_path(&self, p: usize, expert: usize) -> Option<(usize, Parents)> {
        let plan = &self.plans[p];
        let cap = plan.cap(self.hosts);
        let n = self.pool.len();
        let ends = |w: usize| plan.held[w] < cap && self.pool.has_room(w);
        let mut parent: Parents = vec![None; n];
        let mut seen = vec![false; n];
        let mut queue = std::collections::VecDeque::new();
        for w in (0..n).filter(|&w| self.pool.limit(w) > 0 && !plan.owners[expert].contains(&w)) {
            seen[w] = true;
            queue.push_back(w);
        }
        while let Some(v) = queue.pop_front() {
            for &(moved, _) in plan.fresh.iter().filter(|&&(_, owner)| owner == v) {
                for w in 0..n {
                    if seen[w] || plan.owners[moved].contains(&w) {
                        continue;
                    }
                    seen[w] = true;
                    parent[w] = Some((v, moved));
                    if ends(w) {
                        return Some((w, parent));
                    }
                    queue.push_back(w);
                }
            }
        }
        None
    }

    /// The worker to take a replica of `expert` of plan `p`: among those with
    /// room that lack it, preferring ones under the layer's fair share, the
    /// lowest expected load in the layer, then the fewest experts of the layer
    /// shared with the expert's owners (spreading each worker's replicas over
    /// many partners, so that a worker's leaving falls on all the others), then
    /// the fewest pairs, then the id.
    fn pick(&self, p: usize, expert: usize) -> Option<usize> {
        let plan = &self.plans[p];
        let cap = plan.cap(self.hosts);
        let candidates: Vec<(usize, usize)> = (0..self.pool.len())
            .filter(|&w| self.pool.has_room(w) && !plan.owners[expert].contains(&w))
            .map(|w| (w, plan.shared(w, &plan.owners[expert])))
            .collect();
        candidates
            .into_iter()
            .min_by(|&(a, shared_a), &(b, shared_b)| {
                (plan.held[a] >= cap)
                    .cmp(&(plan.held[b] >= cap))
                    .then(plan.expected[a].total_cmp(&plan.expected[b]))
                    .then(shared_a.cmp(&shared_b))
                    .then(self.pool.held[a].len().cmp(&self.pool.held[b].len()))
                    .then(a.cmp(&b))
            })
            .map(|(w, _)| w)
    }

    /// When every worker with room already holds `expert` of plan `p`: moves a
    /// pair from a full worker lacking the expert to a worker with room lacking
    /// that pair, and gives the expert to the full worker — an augmenting path
    /// of length two, as in bipartite matching, so that room left on the
    /// expert's own owners is still used. Returns whether it found one.
    fn swap_in(&mut self, p: usize, expert: usize) -> bool {
        let layer = self.plans[p].layer;
        let roomy: Vec<usize> = (0..self.pool.len())
            .filter(|&u| self.pool.has_room(u))
            .collect();
        let found = (0..self.pool.len())
            .filter(|&v| self.pool.limit(v) > 0 && !self.pool.held[v].contains(&(layer, expert)))
            .find_map(|v| self.movable(v, &roomy, layer).map(|(pair, u)| (v, pair, u)));
        let Some((v, (moved_layer, moved_expert), u)) = found else {
            return false;
        };
        self.unassign(moved_layer, moved_expert, v);
        self.assign(moved_layer, moved_expert, u);
        self.assign(layer, expert, v);
        true
    }

    /// A pair of worker `v` (of `layer` first) that one of `roomy` lacks, and
    /// that worker.
    fn movable(&self, v: usize, roomy: &[usize], layer: usize) -> Option<(ExpertKey, usize)> {
        let held = &self.pool.held[v];
        let same = held.iter().filter(|pair| pair.0 == layer);
        let other = held.iter().filter(|pair| pair.0 != layer);
        same.chain(other).find_map(|&pair| {
            roomy
                .iter()
                .find(|&&u| !self.pool.held[u].contains(&pair))
                .map(|&u| (pair, u))
        })
    }

    /// Gives `(layer, expert)` to worker `w`, as an ownership added now.
    fn assign(&mut self, layer: usize, expert: usize, w: usize) {
        if let Some(p) = self.plan_of(layer) {
            self.plans[p].add_owner(expert, w);
            self.plans[p].fresh.insert((expert, w));
            self.pool.held[w].insert((layer, expert));
        }
    }

    /// Takes `(layer, expert)` from worker `w`.
    fn unassign(&mut self, layer: usize, expert: usize, w: usize) {
        if let Some(p) = self.plan_of(layer) {
            self.plans[p].remove_owner(expert, w);
            self.plans[p].fresh.remove(&(expert, w));
            self.pool.held[w].remove(&(layer, expert));
        }
    }

    /// Logs experts left with fewer owners than `replicas`, or none.
    fn report(&self, replicas: usize) {
        let owners = || {
            self.plans
                .iter()
                .flat_map(|p| p.owners.iter().map(Vec::len))
        };
        let unplaced = owners().filter(|&n| n == 0).count();
        let thin = owners().filter(|&n| n > 0 && n < replicas).count();
        if unplaced > 0 {
            tracing::warn!(
                unplaced,
                "expert-worker capacities cannot hold every routed expert once; \
                 the coldest stay without owner"
            );
        }
        if thin > 0 {
            tracing::info!(
                experts = thin,
                replicas,
                "expert-worker capacities lower the replication of some experts"
            );
        }
    }

    /// Worker id → held pairs, every worker listed.
    fn into_assignment(self) -> BTreeMap<String, BTreeSet<ExpertKey>> {
        let Pool { workers, held } = self.pool;
        workers
            .into_iter()
            .map(|w| w.id.clone())
            .zip(held)
            .collect()
    }
}

#[cfg(test)]
mod tests {
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
        let first =
            next_placement(None, &layers(), 64, &workers[..5], &AUTO, Some(&loads)).unwrap();
        let a = next_placement(Some(&first), &layers(), 64, &workers, &AUTO, None).unwrap();
        // Every placer reads the previous placement back from JSON, gets the
        // workers in its own order, and has no measurements of its own.
        let read: Placement =
            serde_json::from_str(&serde_json::to_string(&first).unwrap()).unwrap();
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
}
