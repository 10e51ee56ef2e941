//! The task that keeps a worker's shard in step with the published placement:
//! each new placement's share for this worker is loaded (and what it no longer
//! owns dropped) before `Info` reports the placement's version, which is what
//! schedulers wait for before routing with it.

use std::sync::Arc;

use tessera_runtime::serving::HealthHandle;
use tessera_runtime::{CancellationToken, Discovery};

use crate::service::ExpertService;

/// Applies every placement newer than the one applied, until `shutdown`.
/// Reports SERVING once the first placement is applied.
pub async fn run(
    service: ExpertService,
    id: String,
    discovery: Arc<dyn Discovery>,
    health: HealthHandle,
    shutdown: CancellationToken,
) {
    let mut placements = discovery.subscribe_placement();
    let mut applied: Option<u64> = None;
    loop {
        let newest = placements.borrow_and_update().clone();
        if let Some(p) = newest.filter(|p| applied.is_none_or(|v| p.version > v)) {
            let want = p.experts_of(&id).clone();
            match service.apply(p.version, &want).await {
                Ok(()) => {
                    if applied.is_none() {
                        health.serving().await;
                    }
                    applied = Some(p.version);
                }
                Err(e) => tracing::error!(
                    version = p.version,
                    error = %e,
                    "cannot apply the expert placement; waiting for the next one"
                ),
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = placements.changed() => if changed.is_err() { return },
        }
    }
}
