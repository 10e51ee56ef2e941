//! Serving the metrics over HTTP: `GET /metrics` to merge into a service's own
//! router, or a standalone [`Endpoint`] that adds `GET /health`.

use std::net::SocketAddr;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::{CONTENT_TYPE, render};

async fn metrics_page() -> Response {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], render()).into_response()
}

/// `GET /metrics`, to merge into a service's own HTTP router.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new().route("/metrics", get(metrics_page))
}

/// `GET /metrics`, and `GET /health`: 200 `ok` while `ready()` holds, else 503
/// `not serving`.
pub fn router_with_health<F>(ready: F) -> Router
where
    F: Fn() -> bool + Clone + Send + Sync + 'static,
{
    let health = move || {
        let ready = ready.clone();
        async move {
            if ready() {
                (StatusCode::OK, "ok")
            } else {
                (StatusCode::SERVICE_UNAVAILABLE, "not serving")
            }
        }
    };
    router().route("/health", get(health))
}

/// A running `/metrics` and `/health` endpoint; dropping it stops the server.
#[derive(Debug)]
pub struct Endpoint {
    addr: SocketAddr,
    _stop: DropGuard,
}

impl Endpoint {
    /// A service's endpoint: on `addr` when it is set (its `--metrics`), with
    /// `/health` following the service's gRPC health.
    pub async fn start_for(
        addr: Option<SocketAddr>,
        health: &crate::serving::HealthHandle,
    ) -> std::io::Result<Option<Self>> {
        let Some(addr) = addr else {
            return Ok(None);
        };
        let health = health.clone();
        Self::start(addr, move || health.is_serving())
            .await
            .map(Some)
    }

    /// Binds `addr` and serves [`router_with_health`] there. The error names the
    /// address (a port in use, most often).
    pub async fn start<F>(addr: SocketAddr, ready: F) -> std::io::Result<Self>
    where
        F: Fn() -> bool + Clone + Send + Sync + 'static,
    {
        let listener = TcpListener::bind(addr).await.map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot listen on {addr} for /metrics (is the port in use?): {e}"),
            )
        })?;
        Self::serve(listener, ready)
    }

    /// Serves [`router_with_health`] on `listener`.
    pub fn serve<F>(listener: TcpListener, ready: F) -> std::io::Result<Self>
    where
        F: Fn() -> bool + Clone + Send + Sync + 'static,
    {
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let serving = axum::serve(listener, router_with_health(ready))
            .with_graceful_shutdown(stop.clone().cancelled_owned());
        tokio::spawn(async move {
            if let Err(e) = serving.await {
                tracing::warn!(%addr, error = %e, "the metrics endpoint stopped");
            }
        });
        tracing::info!(%addr, "metrics endpoint listening (GET /metrics, /health)");
        Ok(Self {
            addr,
            _stop: stop.drop_guard(),
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}
