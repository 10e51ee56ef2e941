//! The worker's lifecycle is the member lifecycle (`tessera_runtime::member`):
//! serve at once (health NOT_SERVING, requests answered UNAVAILABLE), load the
//! model on its own thread, report SERVING and register in discovery, then on
//! shutdown report NOT_SERVING, deregister and drain in-flight calls for at most
//! the grace period. This file supplies what is the vision-worker's own: its
//! service and how it loads.

use std::sync::Arc;

use tessera_proto::Limited;
use tessera_proto::internal::v1::vision_server::VisionServer;
use tessera_runtime::member::{self, Context, Grpc, Readiness};
use tessera_runtime::{CancellationToken, Discovery, Role};
use tokio::net::TcpListener;

use crate::config::Config;
use crate::encoder::{Encoder, Loaded};
use crate::error::{Error, Result};
use crate::metrics::VisionMetrics;
use crate::service::VisionService;

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
    let worker = Worker {
        cfg: cfg.clone(),
        service,
    };
    member::run(worker, &cfg.member, listener, discovery, shutdown).await
}

/// The vision-worker as the member lifecycle drives it.
struct Worker {
    cfg: Config,
    service: VisionService,
}

impl member::Service for Worker {
    type Loaded = (Encoder, Loaded);
    type Error = Error;
    const ROLE: Role = Role::VisionWorker;

    fn grpc(&self) -> Grpc {
        Grpc::new(VisionServer::new(self.service.clone()).limited())
    }

    /// Starts the model thread and waits until it has loaded the tower.
    async fn load(&self, ctx: &Context) -> Result<(Encoder, Loaded)> {
        let (encoder, loading) = Encoder::start(
            self.cfg.member.model_dir(),
            ctx.compute.clone(),
            self.cfg.max_queued,
        )?;
        let loaded = loading.await.map_err(|_| Error::ModelStopped)??;
        Ok((encoder, loaded))
    }

    fn fingerprint((_, loaded): &(Encoder, Loaded)) -> String {
        loaded.fingerprint.clone()
    }

    async fn start(
        &self,
        (encoder, loaded): (Encoder, Loaded),
        ctx: &Context,
    ) -> Result<Readiness> {
        self.service
            .set_ready(encoder, loaded, VisionMetrics::new(&ctx.id));
        Ok(Readiness::Serving)
    }
}
