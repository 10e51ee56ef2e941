//! Building a placement: the pool of workers and their capacities, each layer's
//! replica counts (with the extra replicas of hot experts), and the assignment
//! that keeps existing owners where the balance allows and gives each missing
//! replica to the least loaded eligible worker (`super::next_placement`).

use super::*;

/// The workers, sorted by id, and the pairs each holds while a placement is
/// built. Workers are named by their index here.
pub(super) struct Pool<'a> {
    workers: Vec<&'a PoolWorker>,
    held: Vec<BTreeSet<ExpertKey>>,
}

impl<'a> Pool<'a> {
    /// The pool of `workers`; errors when it is empty or repeats an id.
    pub(super) fn new(
        workers: &'a [PoolWorker],
        n_layers: usize,
        n_experts: usize,
    ) -> Result<Self> {
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

    pub(super) fn len(&self) -> usize {
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
    pub(super) fn new(layer: usize, loads: Vec<f64>, base: usize, n_workers: usize) -> Self {
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
pub(super) struct Builder<'a> {
    pool: Pool<'a>,
    plans: Vec<LayerPlan>,
    hosts: usize,
}

impl<'a> Builder<'a> {
    /// Wanted replica counts for every layer: `replicas` each (never more than
    /// the workers that may hold anything), redundant replicas where `loads`
    /// measures the layer, all fitted to the pool's capacity.
    pub(super) fn new(
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
    pub(super) fn adopt(&mut self, previous: &Placement) {
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
    pub(super) fn fill(&mut self) {
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
    pub(super) fn report(&self, replicas: usize) {
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
    pub(super) fn into_assignment(self) -> BTreeMap<String, BTreeSet<ExpertKey>> {
        let Pool { workers, held } = self.pool;
        workers
            .into_iter()
            .map(|w| w.id.clone())
            .zip(held)
            .collect()
    }
}
