//! Prometheus metrics: the one process-wide registry of the `tessera_*`
//! families, the constructors that define a family in it, its text exposition,
//! and the HTTP endpoint that serves `GET /metrics` and `GET /health`.
//!
//! Each crate defines its own families (in its `metrics` module) through the
//! constructors here, each family once (README.md, "Metrics", lists them all).
//! Several services can share one process (`tessera up` runs a gateway, a
//! vision-worker, a scheduler and N expert-workers), so what a service reports
//! about itself carries its member id: `scheduler`, `vision_worker` or `worker`.
//! Histogram buckets are explicit and in seconds.
//!
//! - [`counter`], [`counters`], [`gauge`], [`gauges`], [`histogram`],
//!   [`histograms`]: define a family in the registry
//! - [`outcome`]: the `outcome` label of a gRPC status code
//! - [`render`], [`router`], [`router_with_health`], [`Endpoint`]: exposition
//! - [`scrape`]: reading an exposition back (tests, tools)

mod endpoint;
pub mod scrape;

use std::sync::LazyLock;

use prometheus::core::Collector;
pub use prometheus::{Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec};
use prometheus::{HistogramOpts, Opts, Registry, TextEncoder};

pub use endpoint::{Endpoint, router, router_with_health};
pub use scrape::Scrape;

/// The content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whole requests, arrival to last token.
pub const REQUEST_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];
/// Arrival to first token.
pub const TTFT_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 60.0,
];
/// Between output tokens.
pub const TPOT_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5,
];
/// One expert `Forward`, as the scheduler waits for it or a worker computes it.
pub const FORWARD_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
/// One pass of the vision tower.
pub const ENCODE_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

fn registry() -> &'static Registry {
    static REGISTRY: LazyLock<Registry> = LazyLock::new(Registry::new);
    &REGISTRY
}

fn register<C: Collector + Clone + 'static>(collector: C) -> C {
    registry()
        .register(Box::new(collector.clone()))
        .expect("every tessera_ family is defined once");
    collector
}

/// A counter `name` in the registry (panics if `name` is defined twice).
pub fn counter(name: &str, help: &str) -> IntCounter {
    register(IntCounter::new(name, help).expect("a valid counter"))
}

/// A counter family `name` with `labels`.
pub fn counters(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(IntCounterVec::new(Opts::new(name, help), labels).expect("a valid counter family"))
}

/// A gauge family `name` with `labels`.
pub fn gauges(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register(IntGaugeVec::new(Opts::new(name, help), labels).expect("a valid gauge family"))
}

/// A gauge `name`.
pub fn gauge(name: &str, help: &str) -> IntGauge {
    register(IntGauge::new(name, help).expect("a valid gauge"))
}

fn histogram_opts(name: &str, help: &str, buckets: &[f64]) -> HistogramOpts {
    HistogramOpts::new(name, help).buckets(buckets.to_vec())
}

/// A histogram `name` with explicit `buckets` (seconds).
pub fn histogram(name: &str, help: &str, buckets: &[f64]) -> Histogram {
    register(Histogram::with_opts(histogram_opts(name, help, buckets)).expect("a valid histogram"))
}

/// A histogram family `name` with explicit `buckets` and `labels`.
pub fn histograms(name: &str, help: &str, buckets: &[f64], labels: &[&str]) -> HistogramVec {
    register(
        HistogramVec::new(histogram_opts(name, help, buckets), labels)
            .expect("a valid histogram family"),
    )
}

/// The label value of a gRPC status code: `ok`, `invalid_argument`, `unavailable`, …
pub fn outcome(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// Every family of this process in the text exposition format.
pub fn render() -> String {
    TextEncoder::new()
        .encode_to_string(&registry().gather())
        .unwrap_or_else(|e| format!("# the metrics could not be encoded: {e}\n"))
}

#[cfg(test)]
mod tests;
