//! The worker's lifecycle: serve at once (health NOT_SERVING, requests answered
//! UNAVAILABLE), load the model on its own thread, report SERVING and register in
//! discovery, then on shutdown report NOT_SERVING, deregister and drain in-flight
//! calls for at most the grace period. With `--metrics` it serves `GET /metrics`
//! and `GET /health` on that address meanwhile.

use std::sync::Arc;
use std::time::Duration;

use candle_core::DType;
use tessera_proto::MAX_MESSAGE_BYTES;
use tessera_proto::internal::v1::vision_server::VisionServer;
use tessera_runtime::discovery::check_same_model;
use tessera_runtime::metrics::{Endpoint, VisionMetrics};
use tessera_runtime::serving::{self, HealthHandle};
use tessera_runtime::{CancellationToken, Discovery, Member, Registration, Role};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;

use crate::config::Config;
use crate::encoder::Encoder;
use crate::error::{Error, Result};
use crate::service::VisionService;

type Served = VisionServer<VisionService>;

/// Serves `Vision` on `listener` with the model of `cfg` until `shutdown` is
/// cancelled (see [`serve`]).
pub async fn run(
    cfg: Config,
    listener: TcpListener,
    discovery: Arc<dyn Discovery>,
    shutdown: CancellationToken,
) -> Result<()> {
    let service = VisionService::new(&cfg);
    serve(cfg, service, listener, discovery, shutdown).await
}

/// [`run`] with a service the caller built with [`VisionService::new`] and keeps
/// a clone of, to read its [`stats`](VisionService::stats).
///
/// Returns once drained after `shutdown`, or with the load error if the model
/// cannot be loaded (the member never registers then).
pub async fn serve(
    cfg: Config,
    service: VisionService,
    listener: TcpListener,
    discovery: Arc<dyn Discovery>,
    shutdown: CancellationToken,
) -> Result<()> {
    let local = listener.local_addr().map_err(Error::Listener)?;
    let advertise = cfg.advertise.clone().unwrap_or_else(|| local.to_string());
    let id = cfg
        .id
        .clone()
        .unwrap_or_else(|| format!("{}-{advertise}", Role::VisionWorker));
    let (health, health_service) = serving::health::<Served>().await;
    let _metrics = Endpoint::start_for(cfg.metrics, &health)
        .await
        .map_err(Error::Metrics)?;
    let stop = CancellationToken::new();
    let vision = VisionServer::new(service.clone())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let mut server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(serving::reflection())
            .add_service(vision)
            .serve_with_incoming_shutdown(
                TcpIncoming::from(listener).with_nodelay(Some(true)),
                stop.clone().cancelled_owned(),
            ),
    );
    tracing::info!(%local, %advertise, %id, model = %cfg.model.display(), "vision-worker listening; loading");

    let member = Member::new(Role::VisionWorker, id, advertise);
    let outcome = until_shutdown(
        &cfg,
        &service,
        &health,
        member,
        &*discovery,
        &shutdown,
        &mut server,
    )
    .await;

    health.not_serving::<Served>().await;
    let served = match outcome {
        Ok(registration) => {
            drop(registration);
            Ok(())
        }
        Err(e) => Err(e),
    };
    stop.cancel();
    let drained = drain(server, Duration::from_secs(cfg.grace_seconds)).await;
    tracing::info!("vision-worker stopped");
    served.and(drained)
}

/// Loads, reports SERVING, registers and waits for `shutdown`. Returns the live
/// registration (`None` if shutdown came first) for the caller to drop.
async fn until_shutdown(
    cfg: &Config,
    service: &VisionService,
    health: &HealthHandle,
    member: Member,
    discovery: &dyn Discovery,
    shutdown: &CancellationToken,
    server: &mut JoinHandle<Result<(), tonic::transport::Error>>,
) -> Result<Option<Registration>> {
    let (encoder, loading) = Encoder::start(&cfg.model, DType::from(cfg.dtype), cfg.max_queued)?;
    let loaded = tokio::select! {
        loaded = loading => loaded.map_err(|_| Error::ModelStopped)??,
        () = shutdown.cancelled() => return Ok(None),
        ended = &mut *server => return Err(server_ended(ended)),
    };
    let fingerprint = loaded.fingerprint.clone();
    check_same_model(&discovery.members(), &fingerprint).map_err(Error::Discovery)?;
    service.set_ready(encoder, loaded, VisionMetrics::new(&member.id));
    health.serving::<Served>().await;
    let registration = discovery
        .register(member.with_fingerprint(fingerprint))
        .map_err(Error::Discovery)?;
    tracing::info!(member = %registration.member(), "vision-worker serving");
    tokio::select! {
        () = shutdown.cancelled() => Ok(Some(registration)),
        ended = &mut *server => Err(server_ended(ended)),
    }
}

/// The error of a server task that ended before it was told to stop.
fn server_ended(
    ended: std::result::Result<Result<(), tonic::transport::Error>, tokio::task::JoinError>,
) -> Error {
    match ended {
        // Unreachable in practice: the server only ends on `stop`, cancelled after this.
        Ok(Ok(())) => Error::ModelStopped,
        Ok(Err(e)) => Error::Transport(e),
        Err(e) => Error::Join(e),
    }
}

/// Waits for the server to finish its in-flight calls, at most `grace`.
async fn drain(
    mut server: JoinHandle<Result<(), tonic::transport::Error>>,
    grace: Duration,
) -> Result<()> {
    if server.is_finished() {
        return Ok(()); // already reported by `until_shutdown`
    }
    match tokio::time::timeout(grace, &mut server).await {
        Ok(Ok(result)) => result.map_err(Error::Transport),
        Ok(Err(e)) => Err(Error::Join(e)),
        Err(_) => {
            tracing::warn!(
                ?grace,
                "in-flight calls did not finish within the grace period; cutting them off"
            );
            server.abort();
            Ok(())
        }
    }
}
