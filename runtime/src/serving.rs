//! What every Tessera gRPC server carries besides its own service: the standard
//! health service (`grpc.health.v1.Health`, NOT_SERVING until the service has
//! loaded its weights) and server reflection (`grpcurl`, Postman, `grpc_cli`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tonic_health::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::server::HealthReporter;

/// The health service's handle: flips one gRPC service (and the whole server,
/// the empty service name) between SERVING and NOT_SERVING.
#[derive(Clone)]
pub struct HealthHandle {
    reporter: HealthReporter,
    /// The member's own service (`NamedService::NAME`).
    service: &'static str,
    /// What the whole server reports, for `GET /health` (see `crate::metrics`).
    serving: Arc<AtomicBool>,
}

impl std::fmt::Debug for HealthHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthHandle")
            .field("service", &self.service)
            .field("serving", &self.is_serving())
            .finish_non_exhaustive()
    }
}

impl HealthHandle {
    /// Reports the service and the whole server as serving.
    pub async fn serving(&self) {
        self.set(ServingStatus::Serving).await;
        self.serving.store(true, Ordering::Relaxed);
    }

    /// Reports the service and the whole server as not serving.
    pub async fn not_serving(&self) {
        self.serving.store(false, Ordering::Relaxed);
        self.set(ServingStatus::NotServing).await;
    }

    async fn set(&self, status: ServingStatus) {
        self.reporter.set_service_status(self.service, status).await;
        self.reporter.set_service_status("", status).await;
    }

    /// Whether the server last reported SERVING.
    pub fn is_serving(&self) -> bool {
        self.serving.load(Ordering::Relaxed)
    }
}

/// A health service that reports NOT_SERVING for `service` (a gRPC service's
/// `NamedService::NAME`) and for the whole server until [`HealthHandle::serving`].
pub async fn health(service: &'static str) -> (HealthHandle, HealthServer<impl Health>) {
    let (reporter, server) = tonic_health::server::health_reporter();
    let handle = HealthHandle {
        reporter,
        service,
        serving: Arc::default(),
    };
    handle.not_serving().await;
    (handle, server)
}

/// The reflection service over every Tessera `.proto` file and the health service.
pub fn reflection() -> tonic_reflection::server::v1::ServerReflectionServer<
    impl tonic_reflection::server::v1::ServerReflection,
> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tessera_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the compiled descriptor sets are valid")
}
