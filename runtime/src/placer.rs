//! The task that keeps the published placement in step with the live
//! expert-workers and, on schedulers, with the measured expert loads.
//!
//! Whenever the registered expert-workers (or their capacities) change, it
//! computes [`next_placement`] for them and publishes it. With a [`LoadSource`]
//! (schedulers have one) it also measures the routed-token load of every expert
//! periodically and publishes a placement balanced for it — hot experts get
//! redundant replicas, as in DeepSeek's expert-parallelism load balancer (EPLB)
//! — when that cuts the [`imbalance`] by at least [`LoadSource::min_gain`]: a
//! hysteresis, so that noise in the counts does not keep moving experts.
//!
//! Every scheduler and every expert-worker runs one (so a pool without a
//! scheduler yet is placed too). The computation is deterministic, the loads a
//! placement was balanced for travel in it, and publishing only moves forward,
//! so the placers agree (a stale publish is refused and ignored).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, Interval, MissedTickBehavior};

use crate::discovery::{Discovery, Member, Role};
use crate::error::Error;
pub use crate::placement::imbalance;
use crate::placement::{Placement, PlacementPolicy, PoolWorker, next_placement};
use crate::shutdown::CancellationToken;

/// What to place: the MoE layers and the routed experts of each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertLayout {
    /// Indices of the MoE layers in the language model.
    pub moe_layers: Vec<usize>,
    /// Routed experts per MoE layer.
    pub n_experts: usize,
}

/// Where a placer gets measured expert loads from, and how often it checks them.
#[derive(Clone)]
pub struct LoadSource {
    /// The relative routed-token load of each expert (one entry per expert) per
    /// MoE layer, as measured now.
    pub measure: Arc<dyn Fn() -> BTreeMap<usize, Vec<f64>> + Send + Sync>,
    /// How often to measure.
    pub every: Duration,
    /// The least relative cut in [`imbalance`] worth moving experts for, e.g.
    /// 0.1 for 10 %.
    pub min_gain: f64,
}

impl fmt::Debug for LoadSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadSource")
            .field("every", &self.every)
            .field("min_gain", &self.min_gain)
            .finish_non_exhaustive()
    }
}

/// The shortest period a [`LoadSource`] is measured at.
const MIN_PERIOD: Duration = Duration::from_millis(1);

/// Publishes a new placement for `discovery`'s live expert-workers under
/// `policy` now and after every membership change, and with `loads` one
/// balanced for the measured loads when that pays, until `shutdown`. With no
/// expert-workers nothing is published (the previous placement stays; its
/// missing owners make requests wait and then fail with UNAVAILABLE).
pub async fn run(
    discovery: Arc<dyn Discovery>,
    layout: ExpertLayout,
    policy: PlacementPolicy,
    loads: Option<LoadSource>,
    shutdown: CancellationToken,
) {
    let mut members = discovery.subscribe();
    let mut ticks = loads.as_ref().map(|source| ticker(source.every));
    let mut workers = pool_of(&members.borrow_and_update());
    place_once(discovery.as_ref(), &layout, &policy, &workers);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = members.changed() => {
                if changed.is_err() {
                    return;
                }
                workers = pool_of(&members.borrow_and_update());
                place_once(discovery.as_ref(), &layout, &policy, &workers);
            }
            () = tick(&mut ticks) => {
                if let Some(source) = &loads {
                    rebalance_once(discovery.as_ref(), &layout, &policy, &workers, source);
                }
            }
        }
    }
}

/// Ticks every `every`, the first after one period.
fn ticker(every: Duration) -> Interval {
    let every = every.max(MIN_PERIOD);
    let mut ticks = tokio::time::interval_at(Instant::now() + every, every);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ticks
}

/// The next tick of `ticks`; never, without one.
async fn tick(ticks: &mut Option<Interval>) {
    match ticks {
        Some(ticks) => {
            ticks.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// The expert-workers among `members`, with their capacities.
fn pool_of(members: &[Member]) -> Vec<PoolWorker> {
    members
        .iter()
        .filter(|m| m.role == Role::ExpertWorker)
        .map(|m| PoolWorker {
            id: m.id.clone(),
            capacity: m.capacity,
        })
        .collect()
}

/// Publishes the placement for `workers` if it differs from the current one.
fn place_once(
    discovery: &dyn Discovery,
    layout: &ExpertLayout,
    policy: &PlacementPolicy,
    workers: &[PoolWorker],
) {
    if layout.moe_layers.is_empty() || layout.n_experts == 0 {
        return;
    }
    let current = discovery.placement();
    match next_placement(
        current.as_ref(),
        &layout.moe_layers,
        layout.n_experts,
        workers,
        policy,
        None,
    ) {
        Ok(next) => publish(discovery, current.as_ref(), next),
        Err(Error::NoWorkers { .. }) => {
            tracing::warn!("no live expert-workers; requests that need routed experts will wait")
        }
        Err(e) => tracing::warn!(error = %e, "cannot compute the expert placement"),
    }
}

/// Measures the loads and publishes a placement balanced for them if it cuts
/// the imbalance by enough.
fn rebalance_once(
    discovery: &dyn Discovery,
    layout: &ExpertLayout,
    policy: &PlacementPolicy,
    workers: &[PoolWorker],
    source: &LoadSource,
) {
    let Some(current) = discovery.placement() else {
        return;
    };
    if workers.is_empty() || layout.moe_layers.is_empty() {
        return;
    }
    let measured = (source.measure)();
    if let Some(next) = rebalanced(
        &current,
        layout,
        policy,
        workers,
        &measured,
        source.min_gain,
    ) {
        publish(discovery, Some(&current), next);
    }
}

/// The placement balanced for `measured`, following `current`, when it cuts
/// `current`'s [`imbalance`] under `measured` by at least `min_gain` (relative).
fn rebalanced(
    current: &Placement,
    layout: &ExpertLayout,
    policy: &PlacementPolicy,
    workers: &[PoolWorker],
    measured: &BTreeMap<usize, Vec<f64>>,
    min_gain: f64,
) -> Option<Placement> {
    let next = next_placement(
        Some(current),
        &layout.moe_layers,
        layout.n_experts,
        workers,
        policy,
        Some(measured),
    )
    .inspect_err(|e| tracing::warn!(error = %e, "cannot compute a balanced expert placement"))
    .ok()?;
    if next == *current {
        return None;
    }
    let (before, after) = (imbalance(current, measured), imbalance(&next, measured));
    let gain = 1.0 - after / before;
    tracing::debug!(before, after, gain, min_gain, "expert load imbalance");
    (gain >= min_gain).then_some(next)
}

/// Publishes `next` unless it is `current`.
fn publish(discovery: &dyn Discovery, current: Option<&Placement>, next: Placement) {
    if Some(&next) == current {
        return;
    }
    match discovery.publish_placement(next) {
        Ok(()) | Err(Error::StalePlacement { .. }) => {}
        Err(Error::IncompletePlacement { missing, .. }) => tracing::warn!(
            missing,
            "the expert-workers' capacities cannot hold every routed expert; \
             keeping the current placement"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot publish the expert placement"),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::discovery::MemoryDiscovery;

    fn layout() -> ExpertLayout {
        ExpertLayout {
            moe_layers: vec![1, 2],
            n_experts: 8,
        }
    }

    fn worker(id: &str, port: u16) -> Member {
        Member::new(Role::ExpertWorker, id, format!("127.0.0.1:{port}"))
    }

    async fn wait_for(discovery: &MemoryDiscovery, ok: impl Fn(&Placement) -> bool) -> Placement {
        let mut rx = discovery.subscribe_placement();
        let found = tokio::time::timeout(
            Duration::from_secs(10),
            rx.wait_for(|p| p.as_ref().is_some_and(&ok)),
        )
        .await
        .expect("placement published before the deadline")
        .expect("discovery alive");
        found.clone().unwrap()
    }

    async fn wait_for_version(discovery: &MemoryDiscovery, version: u64) -> Placement {
        wait_for(discovery, |p| p.version >= version).await
    }

    fn spawn_placer(
        discovery: &Arc<MemoryDiscovery>,
        policy: PlacementPolicy,
        loads: Option<LoadSource>,
        shutdown: &CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(run(
            discovery.clone(),
            layout(),
            policy,
            loads,
            shutdown.clone(),
        ))
    }

    /// Every pair of `layout()` and how many workers hold it.
    fn replicas(p: &Placement) -> Vec<usize> {
        [1, 2]
            .into_iter()
            .flat_map(|l| (0..8).map(move |e| p.replicas_of(l, e)))
            .collect()
    }

    /// Expert 0 of every layer is hot.
    fn hot_first() -> BTreeMap<usize, Vec<f64>> {
        let loads = vec![8.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0];
        [(1, loads.clone()), (2, loads)].into()
    }

    fn measuring(
        loads: BTreeMap<usize, Vec<f64>>,
        min_gain: f64,
    ) -> (LoadSource, Arc<Mutex<usize>>) {
        let calls = Arc::new(Mutex::new(0));
        let counter = calls.clone();
        let source = LoadSource {
            measure: Arc::new(move || {
                *counter.lock().unwrap() += 1;
                loads.clone()
            }),
            every: Duration::from_secs(1),
            min_gain,
        };
        (source, calls)
    }

    #[tokio::test]
    async fn single_owner_placements_follow_expert_workers_joining_and_leaving() {
        let discovery = Arc::new(MemoryDiscovery::new());
        let shutdown = CancellationToken::new();
        let task = spawn_placer(&discovery, PlacementPolicy::fixed(1), None, &shutdown);
        assert!(discovery.placement().is_none());

        let a = discovery.register(worker("a", 1)).unwrap();
        let _gateway = discovery
            .register(Member::new(Role::Gateway, "g", "127.0.0.1:9"))
            .unwrap();
        let p1 = wait_for_version(&discovery, 1).await;
        assert_eq!(p1.experts_of("a").len(), 16);

        let b = discovery.register(worker("b", 2)).unwrap();
        let p2 = wait_for_version(&discovery, 2).await;
        assert_eq!(p2.experts_of("a").len(), 8);
        assert_eq!(p2.experts_of("b").len(), 8);
        assert!(p2.experts_of("a").is_subset(p1.experts_of("a")));

        drop(a);
        let p3 = wait_for_version(&discovery, 3).await;
        assert_eq!(p3.experts_of("b").len(), 16);
        assert!(p3.experts_of("a").is_empty());

        // The last worker leaving keeps the last placement (nothing to move to).
        drop(b);
        shutdown.cancel();
        task.await.unwrap();
        assert_eq!(discovery.placement().unwrap().version, 3);
    }

    #[tokio::test]
    async fn replicated_placements_follow_joins_and_leaves() {
        let discovery = Arc::new(MemoryDiscovery::new());
        let shutdown = CancellationToken::new();
        let task = spawn_placer(&discovery, PlacementPolicy::default(), None, &shutdown);

        let a = discovery.register(worker("a", 1)).unwrap();
        let p1 = wait_for_version(&discovery, 1).await;
        assert_eq!(p1.replicas, 1, "one worker: one replica");
        assert_eq!(p1.experts_of("a").len(), 16);

        let _b = discovery.register(worker("b", 2)).unwrap();
        let _c = discovery.register(worker("c", 3)).unwrap();
        let p = wait_for(&discovery, |p| p.workers().count() == 3).await;
        assert_eq!(p.replicas, 2);
        assert!(replicas(&p).iter().all(|&r| r == 2), "{:?}", replicas(&p));

        // a leaves: every expert it held gets another owner; b and c keep theirs.
        drop(a);
        let after = wait_for(&discovery, |p| p.workers().count() == 2).await;
        assert!(replicas(&after).iter().all(|&r| r == 2));
        for w in ["b", "c"] {
            assert!(p.experts_of(w).is_subset(after.experts_of(w)));
        }
        assert_eq!(after.pairs_moved(&p), p.experts_of("a").len());
        shutdown.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn capacities_registered_in_discovery_bound_the_placement() {
        let discovery = Arc::new(MemoryDiscovery::new());
        let shutdown = CancellationToken::new();
        let task = spawn_placer(&discovery, PlacementPolicy::default(), None, &shutdown);

        // Room for 18 of the 32 wanted replicas: every expert once, two twice.
        let _a = discovery.register(worker("a", 1).with_capacity(6)).unwrap();
        let _b = discovery.register(worker("b", 2).with_capacity(6)).unwrap();
        let _c = discovery.register(worker("c", 3).with_capacity(6)).unwrap();
        let p = wait_for(&discovery, |p| p.workers().count() == 3).await;
        assert!(p.is_complete());
        assert!(p.assignment.values().all(|held| held.len() == 6));
        let r = replicas(&p);
        assert_eq!(r.iter().filter(|&&n| n == 2).count(), 2, "{r:?}");

        // An unbounded worker joining lets every expert have two owners.
        let _d = discovery.register(worker("d", 4)).unwrap();
        let p = wait_for(&discovery, |p| p.workers().count() == 4).await;
        assert!(replicas(&p).iter().all(|&n| n == 2));
        assert!(p.assignment.values().take(3).all(|held| held.len() <= 6));
        shutdown.cancel();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn skewed_loads_are_rebalanced_once_and_kept_on_later_changes() {
        let discovery = Arc::new(MemoryDiscovery::new());
        let _workers: Vec<_> = (0..4)
            .map(|i| discovery.register(worker(&format!("w{i}"), i)).unwrap())
            .collect();
        let shutdown = CancellationToken::new();
        let (source, calls) = measuring(hot_first(), 0.1);
        let scheduler = spawn_placer(
            &discovery,
            PlacementPolicy::default(),
            Some(source),
            &shutdown,
        );
        // An expert-worker's placer measures nothing.
        let expert_worker = spawn_placer(&discovery, PlacementPolicy::default(), None, &shutdown);

        let uniform = wait_for_version(&discovery, 1).await;
        assert!(uniform.loads.is_empty());
        assert!(replicas(&uniform).iter().all(|&r| r == 2));

        let balanced = wait_for(&discovery, |p| !p.loads.is_empty()).await;
        assert_eq!(balanced.version, 2);
        assert_eq!(
            balanced.replicas_of(1, 0),
            4,
            "the hot expert is on every worker"
        );
        assert_eq!(replicas(&balanced).iter().sum::<usize>(), 32 + 2 * 4);
        assert!(imbalance(&balanced, &hot_first()) < 0.9 * imbalance(&uniform, &hot_first()));
        // Nothing the old owners held moved away from them.
        for w in ["w0", "w1", "w2", "w3"] {
            assert!(uniform.experts_of(w).is_subset(balanced.experts_of(w)));
        }

        // The same loads again: nothing left to gain, nothing published.
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(*calls.lock().unwrap() >= 5);
        assert_eq!(discovery.placement().unwrap().version, 2);

        // A worker joining: both placers keep balancing for the stored loads.
        let _w4 = discovery.register(worker("w4", 9)).unwrap();
        let grown = wait_for(&discovery, |p| p.workers().count() == 5).await;
        assert_eq!(grown.version, 3);
        assert_eq!(grown.loads, balanced.loads);
        assert_eq!(grown.replicas_of(1, 0), 5);
        shutdown.cancel();
        scheduler.await.unwrap();
        expert_worker.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn small_gains_and_even_loads_publish_nothing() {
        for (loads, min_gain) in [(hot_first(), 0.99), (BTreeMap::new(), 0.0)] {
            let discovery = Arc::new(MemoryDiscovery::new());
            let _workers: Vec<_> = (0..4)
                .map(|i| discovery.register(worker(&format!("w{i}"), i)).unwrap())
                .collect();
            let shutdown = CancellationToken::new();
            let (source, calls) = measuring(loads, min_gain);
            let task = spawn_placer(
                &discovery,
                PlacementPolicy::default(),
                Some(source),
                &shutdown,
            );
            wait_for_version(&discovery, 1).await;
            tokio::time::sleep(Duration::from_secs(5)).await;
            assert!(*calls.lock().unwrap() >= 4);
            assert_eq!(discovery.placement().unwrap().version, 1);
            shutdown.cancel();
            task.await.unwrap();
        }
    }

    #[test]
    fn a_rebalance_must_gain_enough() {
        let workers = PoolWorker::unbounded_all(&["a".into(), "b".into(), "c".into()]);
        let policy = PlacementPolicy::default();
        let current = next_placement(None, &[1, 2], 8, &workers, &policy, None).unwrap();
        let skewed = hot_first();
        let next = rebalanced(&current, &layout(), &policy, &workers, &skewed, 0.1).unwrap();
        assert_eq!(next.version, current.version + 1);
        assert!(next.replicas_of(2, 0) == 3);
        let gain = 1.0 - imbalance(&next, &skewed) / imbalance(&current, &skewed);
        assert!(gain >= 0.1, "{gain}");
        assert!(rebalanced(&current, &layout(), &policy, &workers, &skewed, gain + 0.01).is_none());
        assert!(rebalanced(&next, &layout(), &policy, &workers, &skewed, 0.0).is_none());
    }
}
