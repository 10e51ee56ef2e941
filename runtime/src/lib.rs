//! The runtime every Tessera service shares.
//!
//! - [`placement`]: which expert-worker holds which routed experts, as versioned
//!   data computed from the live expert-workers (an even split for now).
//! - [`discovery`]: who is in the cluster. The [`Discovery`] trait, with
//!   [`StaticDiscovery`] (the embedded default: members from flags or a small JSON
//!   file), [`MemoryDiscovery`] (one process: tests and `tessera up`) and
//!   [`EtcdDiscovery`] (the distributed one: leased registrations in etcd). It
//!   also carries the published [`Placement`].
//! - [`pool`]: the flags that shape the placement (`--expert-replicas`,
//!   `--rebalance-seconds`), the same on every member.
//! - [`placer`]: the task that republishes the placement when expert-workers
//!   join or leave.
//! - [`member`]: the lifecycle every member shares (serve, load, register, drain)
//!   and the flags every member takes ([`MemberArgs`]).
//! - [`memory`]: the process's memory limit and resident set, and size flags.
//! - [`device`]: `--device` and `--dtype`, and the one place a device is chosen.
//! - [`shutdown`]: the root cancellation token, cancelled by SIGTERM/SIGINT.
//! - [`serving`]: gRPC health (NOT_SERVING until ready) and reflection.
//! - [`telemetry`]: `tracing` set-up and request-id propagation in gRPC metadata.
//! - [`metrics`]: the process-wide Prometheus registry of `tessera_*` families and
//!   the HTTP endpoint serving `GET /metrics` and `GET /health`.
//! - [`hub`]: `--model` as a Hugging Face Hub id, downloaded into the Hub cache.
//! - [`error`]: the crate's one error type.

pub mod device;
pub mod discovery;
pub mod error;
pub mod hub;
pub mod member;
pub mod memory;
pub mod metrics;
pub mod placement;
pub mod placer;
pub mod pool;
pub mod serving;
pub mod shutdown;
pub mod telemetry;
pub mod tls;

pub use discovery::{
    Discovery, EtcdDiscovery, Member, MemoryDiscovery, Registration, Role, StaticDiscovery,
};
pub use error::{Error, Result};
pub use member::{MemberArgs, ModelArgs};
pub use placement::{Placement, even_split, next_placement};
pub use shutdown::CancellationToken;
