//! The task that keeps a worker's shard in step with the published placement.
//!
//! Only the newest placement is applied: at start-up the worker waits until the
//! placement has been quiet for the settle time (workers starting together
//! register one after another, and each registration publishes a placement), and
//! while it loads, a newer placement stops the load between layers. Its share is
//! loaded (and what it no longer owns dropped, first when the budget demands)
//! before `Info` reports the placement's version, which is what schedulers wait
//! for before routing with it. When experts of its share go missing (an
//! `Unload`), it reports NOT_SERVING and loads them again.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tessera_runtime::placement::{ExpertKey, Placement};
use tessera_runtime::serving::HealthHandle;
use tessera_runtime::{CancellationToken, Discovery};
use tokio::sync::watch;

use crate::service::{Applied, ExpertService};

/// Applies the newest placement whenever it changes, until `shutdown`. Reports
/// SERVING while the share of the last applied placement is held.
pub async fn run(
    service: ExpertService,
    id: String,
    discovery: Arc<dyn Discovery>,
    health: HealthHandle,
    settle: Duration,
    shutdown: CancellationToken,
) {
    let mut placements = discovery.subscribe_placement();
    tokio::select! {
        () = shutdown.cancelled() => return,
        () = settled(&mut placements, settle) => {}
    }
    let mut applied: Option<Placement> = None;
    loop {
        let newest = placements.borrow_and_update().clone();
        if let Some(p) = newest {
            let stale = applied.as_ref().is_none_or(|a| p.version > a.version);
            if stale || !service.is_ready() {
                if !service.is_ready() && applied.is_some() {
                    health.not_serving().await;
                }
                let want = p.experts_of(&id).clone();
                let droppable = kept_elsewhere(applied.as_ref(), &p, &id);
                let probe = placements.clone();
                let newer = move || probe.has_changed().unwrap_or(true);
                match service.apply(p.version, &want, &droppable, newer).await {
                    Ok(Applied::Done) => {
                        applied = Some(p);
                        if service.is_ready() {
                            health.serving().await;
                        }
                    }
                    Ok(Applied::Superseded) => continue,
                    Err(e) => tracing::error!(
                        version = p.version,
                        error = %e,
                        "cannot apply the expert placement; waiting for the next one"
                    ),
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = placements.changed() => if changed.is_err() { return },
            () = service.share_lost() => {}
        }
    }
}

/// Waits until a placement exists and no newer one came for `settle`.
async fn settled(placements: &mut watch::Receiver<Option<Placement>>, settle: Duration) {
    loop {
        let has_one = placements.borrow_and_update().is_some();
        let quiet = tokio::time::timeout(settle, placements.changed()).await;
        match quiet {
            Err(_) if has_one => return,
            Err(_) => {
                // Nothing yet: wait for the first without a deadline.
                if placements.changed().await.is_err() {
                    return;
                }
            }
            Ok(Err(_)) => return,
            Ok(Ok(())) => {}
        }
    }
}

/// The pairs `id` loses in `next` that another worker holds in both `previous`
/// and `next`: dropping them first leaves each with a live owner.
fn kept_elsewhere(previous: Option<&Placement>, next: &Placement, id: &str) -> BTreeSet<ExpertKey> {
    let Some(previous) = previous else {
        return BTreeSet::new();
    };
    previous
        .experts_of(id)
        .difference(next.experts_of(id))
        .filter(|&&(layer, expert)| {
            next.owners(layer, expert)
                .into_iter()
                .any(|w| w != id && previous.experts_of(w).contains(&(layer, expert)))
        })
        .copied()
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn placement(version: u64, assignment: &[(&str, &[usize])]) -> Placement {
        let assignment: BTreeMap<String, Vec<(usize, usize)>> = assignment
            .iter()
            .map(|(w, experts)| (w.to_string(), experts.iter().map(|&e| (1, e)).collect()))
            .collect();
        serde_json::from_value(serde_json::json!({
            "version": version,
            "layers": [1],
            "n_experts": 4,
            "assignment": assignment,
        }))
        .unwrap()
    }

    #[test]
    fn only_losses_another_worker_keeps_holding_may_go_first() {
        let before = placement(1, &[("a", &[0, 1, 2]), ("b", &[0, 3]), ("c", &[])]);
        // a loses 0 (b keeps it), 1 (c gains it: not yet held by c), keeps 2.
        let after = placement(2, &[("a", &[2]), ("b", &[0, 3]), ("c", &[1])]);
        let first = kept_elsewhere(Some(&before), &after, "a");
        assert_eq!(first, [(1, 0)].into());
        assert!(kept_elsewhere(None, &after, "a").is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn settling_waits_for_a_quiet_placement() {
        let (tx, mut rx) = watch::channel(None);
        let waiter = tokio::spawn(async move {
            settled(&mut rx, Duration::from_millis(200)).await;
            rx.borrow().as_ref().map(|p: &Placement| p.version)
        });
        for version in 1..=3 {
            tx.send_replace(Some(placement(version, &[("a", &[0])])));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            waiter.await.unwrap(),
            Some(3),
            "only the last one is applied"
        );
    }
}
