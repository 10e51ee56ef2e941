//! One lifecycle for every member of a cluster (gateway, vision-worker,
//! scheduler, expert-worker): a service supplies its gRPC routes, how it loads
//! and what it does once loaded ([`Service`]); [`run`] does the rest, the same
//! way for all four:
//!
//! 1. choose the device ([`ComputeArgs::select`](crate::device::ComputeArgs::select)),
//!    the member id and the advertised address;
//! 2. serve at once: health NOT_SERVING, reflection, the member's routes (which
//!    answer UNAVAILABLE until loaded), `--metrics` if set, and any side servers
//!    (the gateway's HTTP API);
//! 3. load, under shutdown: a shutdown while loading stops at once;
//! 4. check that the cluster serves the same model (the fingerprint), start the
//!    loaded service, report SERVING (or let the service do it, see
//!    [`Readiness`]) and register in discovery;
//! 5. on shutdown: NOT_SERVING, deregister, stop accepting, drain in-flight calls
//!    for at most `--grace-seconds` ([`Service::grace_expired`] then cuts the
//!    rest), and only then stop the member's background tasks
//!    ([`Context::stopped`]).
//!
//! - [`args`]: [`MemberArgs`], the flags every member shares, and [`ModelArgs`]

pub mod args;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::body::Body;
use tonic::codegen::Service as GrpcService;
use tonic::codegen::http::Request;
use tonic::server::NamedService;
use tonic::service::Routes;
use tonic::transport::server::TcpIncoming;

pub use args::{DEFAULT_GRACE_SECONDS, MemberArgs, ModelArgs, check_folder};

use crate::device::{Compute, DeviceError};
use crate::discovery::{Discovery, Member, Role, check_same_model};
use crate::metrics::Endpoint;
use crate::serving::{self, HealthHandle};
use crate::shutdown::CancellationToken;

/// What can go wrong in the lifecycle itself (a member's own failures are its
/// own error type, which converts from this one).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `--device` names a device this binary cannot use.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The listener's address could not be read.
    #[error("cannot use the listener: {0}")]
    Listener(#[source] std::io::Error),
    /// The metrics endpoint could not listen (the message names the address).
    #[error("metrics endpoint: {0}")]
    Metrics(#[source] std::io::Error),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[source] tonic::transport::Error),
    /// A side server (the gateway's HTTP API) failed.
    #[error("{name} server: {source}")]
    SideServer {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A server stopped before it was told to.
    #[error("the {0} server stopped unexpectedly")]
    Stopped(&'static str),
    /// The TLS files cannot be read or used.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// A task of the lifecycle panicked.
    #[error("a server task failed: {0}")]
    Join(#[source] tokio::task::JoinError),
    /// Another model is being served in the cluster, or registering failed.
    #[error("discovery: {0}")]
    Discovery(#[from] crate::Error),
}

/// Whether a loaded member serves at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// Report SERVING as soon as [`Service::start`] returns.
    Serving,
    /// The member reports SERVING itself through [`Context::health`] (the
    /// expert-worker, once it holds the experts the placement gives it).
    Later,
}

/// What a member is told about itself while loading and starting.
#[derive(Clone)]
pub struct Context {
    /// Its id in discovery.
    pub id: String,
    /// The address other members reach it at.
    pub advertise: String,
    /// The device and dtype to load onto.
    pub compute: Compute,
    pub discovery: Arc<dyn Discovery>,
    pub health: HealthHandle,
    /// Cancelled when shutdown begins (before the drain).
    pub shutdown: CancellationToken,
    /// Cancelled once the member has drained (or failed): tasks in-flight
    /// requests still need while draining (a scheduler's routing) run until then.
    pub stopped: CancellationToken,
    /// The cluster's mutual TLS, for calls to other members (`None`: plaintext).
    pub tls: Option<Arc<crate::tls::ClusterTls>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("id", &self.id)
            .field("advertise", &self.advertise)
            .field("compute", &self.compute)
            .finish_non_exhaustive()
    }
}

/// A member's own gRPC service: its routes, and its name as health reports it.
#[derive(Debug)]
pub struct Grpc {
    routes: Routes,
    name: &'static str,
}

impl Grpc {
    /// A generated server (with its message limits set).
    pub fn new<S>(server: S) -> Self
    where
        S: GrpcService<Request<Body>, Error = std::convert::Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Response: axum::response::IntoResponse,
        S::Future: Send + 'static,
    {
        Self {
            routes: Routes::new(server),
            name: S::NAME,
        }
    }
}

/// A server that runs beside the member's gRPC server and drains with it.
#[derive(Debug)]
pub struct SideServer {
    /// Named in logs and errors (`HTTP`).
    pub name: &'static str,
    pub task: JoinHandle<std::io::Result<()>>,
}

/// One member of the cluster, as the lifecycle drives it.
pub trait Service: Send + Sync + 'static {
    /// What loading produces, handed to [`Service::start`].
    type Loaded: Send + 'static;
    /// The member's error type.
    type Error: From<Error> + std::error::Error + Send + Sync + 'static;

    /// Its role in discovery.
    const ROLE: Role;

    /// Whether its gRPC API is public (the gateway): with TLS, its clients need no
    /// certificate from the cluster CA. Internal services refuse clients without one.
    const PUBLIC: bool = false;

    /// Its gRPC service (served next to health and reflection).
    fn grpc(&self) -> Grpc;

    /// Servers to run beside gRPC from the start (stopped with `stop`).
    fn side_servers(&self, stop: &CancellationToken) -> Result<Vec<SideServer>, Self::Error> {
        let _ = stop;
        Ok(Vec::new())
    }

    /// Loads the model (while gRPC answers UNAVAILABLE); dropped at shutdown.
    fn load(&self, ctx: &Context)
    -> impl Future<Output = Result<Self::Loaded, Self::Error>> + Send;

    /// The fingerprint of what was loaded (checked against the cluster's).
    fn fingerprint(loaded: &Self::Loaded) -> String;

    /// Starts serving with what was loaded.
    fn start(
        &self,
        loaded: Self::Loaded,
        ctx: &Context,
    ) -> impl Future<Output = Result<Readiness, Self::Error>> + Send;

    /// The grace period ran out with calls still in flight: end them.
    fn grace_expired(&self) {}

    /// How many routed experts the member may hold, registered for the placer
    /// (expert-workers with a memory budget; `None`: no limit or not applicable).
    fn capacity(&self) -> Option<usize> {
        None
    }
}

/// Runs `service` on `listener` as configured by `args` until `shutdown` (see
/// the module docs). Returns once drained, or with the first error; a member
/// that fails to load never registers.
pub async fn run<S: Service>(
    service: S,
    args: &MemberArgs,
    listener: TcpListener,
    discovery: Arc<dyn Discovery>,
    shutdown: CancellationToken,
) -> Result<(), S::Error> {
    let compute = args.compute.select().map_err(Error::from)?;
    let tls = args.tls.load().map_err(Error::from)?;
    let local = listener.local_addr().map_err(Error::Listener)?;
    let advertise = args.advertise.clone().unwrap_or_else(|| local.to_string());
    let id = args
        .id
        .clone()
        .unwrap_or_else(|| format!("{}-{advertise}", S::ROLE));
    let Grpc { routes, name } = service.grpc();
    let (health, health_server) = serving::health(name).await;
    let _metrics = Endpoint::start_for(args.metrics, &health)
        .await
        .map_err(Error::Metrics)?;
    let stopped = CancellationToken::new();
    let _stop_tasks = stopped.clone().drop_guard();
    let ctx = Context {
        id,
        advertise,
        compute,
        discovery,
        health,
        shutdown,
        stopped,
        tls: tls.clone(),
    };

    let stop_serving = CancellationToken::new();
    let routes = routes
        .add_service(health_server)
        .add_service(serving::reflection());
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = &tls {
        server = server
            .tls_config(tls.server(S::PUBLIC))
            .map_err(|e| Error::Transport(e).into())?;
    }
    let grpc = tokio::spawn(server.add_routes(routes).serve_with_incoming_shutdown(
        TcpIncoming::from(listener).with_nodelay(Some(true)),
        stop_serving.clone().cancelled_owned(),
    ));
    let mut servers = Servers {
        grpc,
        side: Vec::new(),
    };
    match service.side_servers(&stop_serving) {
        Ok(side) => servers.side = side,
        Err(e) => {
            stop_serving.cancel();
            servers.abort();
            return Err(e);
        }
    }
    tracing::info!(
        role = %S::ROLE,
        id = %ctx.id,
        address = %local,
        model = %args.model_dir().display(),
        device = %args.compute.device,
        dtype = ?ctx.compute.dtype,
        tls = ctx.tls.is_some(),
        "loading"
    );

    let outcome = until_shutdown(&service, &ctx, &mut servers).await;
    ctx.health.not_serving().await;
    let registration = match outcome {
        Ok(Some(registration)) => registration,
        Ok(None) => {
            // Shut down while loading: nothing is in flight.
            stop_serving.cancel();
            return servers.drain(&service, std::time::Duration::ZERO).await;
        }
        Err(e) => {
            stop_serving.cancel();
            servers.abort();
            return Err(e);
        }
    };
    tracing::info!(role = %S::ROLE, grace_seconds = args.grace_seconds, "draining");
    drop(registration);
    stop_serving.cancel();
    let drained = servers.drain(&service, args.grace()).await;
    tracing::info!(role = %S::ROLE, "stopped");
    drained
}

/// Loads, starts, reports SERVING and registers, then waits for shutdown.
/// Returns the live registration, or `None` if shutdown came while loading.
async fn until_shutdown<S: Service>(
    service: &S,
    ctx: &Context,
    servers: &mut Servers,
) -> Result<Option<crate::Registration>, S::Error> {
    let loaded = tokio::select! {
        loaded = service.load(ctx) => loaded?,
        () = ctx.shutdown.cancelled() => return Ok(None),
        ended = servers.ended() => return Err(ended.into()),
    };
    let fingerprint = S::fingerprint(&loaded);
    check_same_model(&ctx.discovery.members(), &fingerprint).map_err(Error::from)?;
    let readiness = service.start(loaded, ctx).await?;
    if readiness == Readiness::Serving {
        ctx.health.serving().await;
    }
    let mut member = Member::new(S::ROLE, &ctx.id, &ctx.advertise).with_fingerprint(&fingerprint);
    if let Some(capacity) = service.capacity() {
        member = member.with_capacity(capacity);
    }
    let registration = ctx.discovery.register(member).map_err(Error::from)?;
    tracing::info!(role = %S::ROLE, id = %ctx.id, %fingerprint, "serving");
    tokio::select! {
        () = ctx.shutdown.cancelled() => Ok(Some(registration)),
        ended = servers.ended() => Err(ended.into()),
    }
}

/// The member's running servers.
struct Servers {
    grpc: JoinHandle<Result<(), tonic::transport::Error>>,
    side: Vec<SideServer>,
}

impl Servers {
    /// Resolves with the error of the first server that ends (they end only when
    /// told to, so any end here is a failure).
    async fn ended(&mut self) -> Error {
        let (grpc, side_servers) = (&mut self.grpc, &mut self.side);
        let side = async {
            if side_servers.is_empty() {
                return std::future::pending().await;
            }
            let waits = side_servers.iter_mut().map(|s| {
                let name = s.name;
                Box::pin(async move { (name, (&mut s.task).await) })
            });
            let (name, ended) = first(waits.collect()).await;
            match ended {
                Ok(Ok(())) => Error::Stopped(name),
                Ok(Err(source)) => Error::SideServer { name, source },
                Err(e) => Error::Join(e),
            }
        };
        tokio::select! {
            ended = grpc => match ended {
                Ok(Ok(())) => Error::Stopped("gRPC"),
                Ok(Err(e)) => Error::Transport(e),
                Err(e) => Error::Join(e),
            },
            e = side => e,
        }
    }

    fn abort(&self) {
        self.grpc.abort();
        for s in &self.side {
            s.task.abort();
        }
    }

    /// Waits at most `grace` (one deadline for all) for the stopped servers to
    /// finish their in-flight calls; past it, tells the service and cuts them off.
    async fn drain<S: Service>(
        mut self,
        service: &S,
        grace: std::time::Duration,
    ) -> Result<(), S::Error> {
        let deadline = tokio::time::Instant::now() + grace;
        let mut expired = false;
        let mut result = Ok(());
        let grpc = match tokio::time::timeout_at(deadline, &mut self.grpc).await {
            Ok(Ok(ended)) => ended.map_err(Error::Transport),
            Ok(Err(e)) => Err(Error::Join(e)),
            Err(_) => {
                expired = true;
                Ok(())
            }
        };
        if let Err(e) = grpc {
            result = Err(e);
        }
        for mut side in std::mem::take(&mut self.side) {
            match tokio::time::timeout_at(deadline, &mut side.task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(source))) => {
                    let e = Error::SideServer {
                        name: side.name,
                        source,
                    };
                    result = result.and(Err(e));
                }
                Ok(Err(e)) => result = result.and(Err(Error::Join(e))),
                Err(_) => {
                    expired = true;
                    side.task.abort();
                }
            }
        }
        if expired {
            tracing::warn!(
                role = %S::ROLE,
                ?grace,
                "in-flight calls did not finish within the grace period; cutting them off"
            );
            service.grace_expired();
            self.grpc.abort();
        }
        result.map_err(S::Error::from)
    }
}

/// The output of whichever of `futures` finishes first.
async fn first<F: Future + Unpin>(mut futures: Vec<F>) -> F::Output {
    std::future::poll_fn(|cx| {
        for f in &mut futures {
            if let std::task::Poll::Ready(out) = std::pin::Pin::new(f).poll(cx) {
                return std::task::Poll::Ready(out);
            }
        }
        std::task::Poll::Pending
    })
    .await
}
