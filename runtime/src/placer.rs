//! The task that keeps the published placement in step with the live
//! expert-workers: whenever the set of registered expert-workers changes, it
//! computes [`next_placement`] and publishes it. Every scheduler and every
//! expert-worker runs one (so a pool without a scheduler yet is placed too); the
//! split is deterministic and publishing only moves forward, so the placers
//! agree (a stale publish is refused and ignored).

use std::sync::Arc;

use crate::discovery::{Discovery, Role, ids_with_role};
use crate::error::Error;
use crate::placement::next_placement;
use crate::shutdown::CancellationToken;

/// What to place: the MoE layers and the routed experts of each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertLayout {
    /// Indices of the MoE layers in the language model.
    pub moe_layers: Vec<usize>,
    /// Routed experts per MoE layer.
    pub n_experts: usize,
}

/// Publishes a new placement for `discovery`'s live expert-workers now and after
/// every membership change, until `shutdown`. With no expert-workers nothing is
/// published (the previous placement stays; its missing owners make requests
/// wait and then fail with UNAVAILABLE).
pub async fn run(discovery: Arc<dyn Discovery>, layout: ExpertLayout, shutdown: CancellationToken) {
    let mut members = discovery.subscribe();
    loop {
        let workers = ids_with_role(&members.borrow_and_update(), Role::ExpertWorker);
        place_once(discovery.as_ref(), &layout, &workers);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = members.changed() => if changed.is_err() { return },
        }
    }
}

/// Publishes the placement for `workers` if it differs from the current one.
fn place_once(discovery: &dyn Discovery, layout: &ExpertLayout, workers: &[String]) {
    let current = discovery.placement();
    if layout.moe_layers.is_empty() || layout.n_experts == 0 {
        return;
    }
    match next_placement(
        current.as_ref(),
        &layout.moe_layers,
        layout.n_experts,
        workers,
    ) {
        Ok(next) if Some(&next) == current.as_ref() => {}
        Ok(next) => match discovery.publish_placement(next) {
            Ok(()) | Err(Error::StalePlacement { .. }) => {}
            Err(e) => tracing::warn!(error = %e, "cannot publish the expert placement"),
        },
        Err(Error::NoWorkers { .. }) => {
            tracing::warn!("no live expert-workers; requests that need routed experts will wait")
        }
        Err(e) => tracing::warn!(error = %e, "cannot compute the expert placement"),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::discovery::{Member, MemoryDiscovery};

    fn layout() -> ExpertLayout {
        ExpertLayout {
            moe_layers: vec![1, 2],
            n_experts: 8,
        }
    }

    async fn wait_for_version(discovery: &MemoryDiscovery, version: u64) -> crate::Placement {
        let mut rx = discovery.subscribe_placement();
        let found = tokio::time::timeout(
            Duration::from_secs(10),
            rx.wait_for(|p| p.as_ref().is_some_and(|p| p.version >= version)),
        )
        .await
        .expect("placement published before the deadline")
        .expect("discovery alive");
        found.clone().unwrap()
    }

    #[tokio::test]
    async fn placements_follow_expert_workers_joining_and_leaving() {
        let discovery = Arc::new(MemoryDiscovery::new());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(discovery.clone(), layout(), shutdown.clone()));
        assert!(discovery.placement().is_none());

        let a = discovery
            .register(Member::new(Role::ExpertWorker, "a", "127.0.0.1:1"))
            .unwrap();
        let _gateway = discovery
            .register(Member::new(Role::Gateway, "g", "127.0.0.1:9"))
            .unwrap();
        let p1 = wait_for_version(&discovery, 1).await;
        assert_eq!(p1.experts_of("a").len(), 16);

        let b = discovery
            .register(Member::new(Role::ExpertWorker, "b", "127.0.0.1:2"))
            .unwrap();
        let p2 = wait_for_version(&discovery, 2).await;
        assert_eq!(p2.experts_of("a").len(), 8);
        assert_eq!(p2.experts_of("b").len(), 8);

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
}
