//! Orderly shutdown: one root [`CancellationToken`] per process, cancelled by
//! SIGTERM or SIGINT. Each service, when it fires, reports NOT_SERVING, drops its
//! discovery registration, drains in-flight work for at most its grace period and
//! returns.

use std::time::Duration;

pub use tokio_util::sync::CancellationToken;

/// How long a service waits for in-flight requests after shutdown starts. Matches
/// the Kubernetes default `terminationGracePeriodSeconds` (30 s) less a margin.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(25);

/// A root token that is cancelled on the first SIGTERM or SIGINT (Ctrl-C). A
/// second signal exits the process at once. Must be called inside a tokio runtime.
pub fn on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown signal received; draining (send it again to exit now)");
        cancel.cancel();
        wait_for_signal().await;
        tracing::warn!("second shutdown signal; exiting now");
        std::process::exit(130);
    });
    token
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the process");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}

/// Resolves when `token` is cancelled, then waits for `drained` at most `grace`.
/// Returns whether everything drained in time.
pub async fn drain_within<F: std::future::Future>(grace: Duration, drained: F) -> bool {
    tokio::time::timeout(grace, drained).await.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn drain_gives_up_after_the_grace_period() {
        assert!(drain_within(Duration::from_secs(1), async {}).await);
        let never = std::future::pending::<()>();
        assert!(!drain_within(Duration::from_secs(1), never).await);
    }
}
