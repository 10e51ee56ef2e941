//! Prometheus metrics: one process-wide registry of the `tessera_*` families, its
//! text exposition, and the HTTP endpoint that serves `GET /metrics` and
//! `GET /health`.
//!
//! Every family is defined here, once (README.md, "Metrics", lists them). Several
//! services can share one process (`tessera up` runs a gateway, a vision-worker, a
//! scheduler and N expert-workers), so what a service reports about itself carries
//! its member id: `scheduler`, `vision_worker` or `worker`. The gateway's families
//! and the scheduler's view of expert dispatch are per process. Histogram buckets
//! are explicit and in seconds.
//!
//! - [`Gateway`], [`SchedulerMetrics`], [`ExpertDispatch`], [`VisionMetrics`] and
//!   [`ExpertWorkerMetrics`]: the handles each service updates
//! - [`render`], [`router`], [`router_with_health`], [`Endpoint`]: exposition
//! - [`scrape`]: reading an exposition back (tests, tools)

mod endpoint;
pub mod scrape;

use std::collections::HashMap;
use std::sync::{LazyLock, PoisonError, RwLock};

use prometheus::core::Collector;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

pub use endpoint::{Endpoint, router, router_with_health};
pub use scrape::Scrape;

/// The content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whole requests, arrival to last token.
const REQUEST_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];
/// Arrival to first token.
const TTFT_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 60.0,
];
/// Between output tokens.
const TPOT_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5,
];
/// One expert `Forward`, as the scheduler waits for it or a worker computes it.
const FORWARD_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
/// One pass of the vision tower.
const ENCODE_BUCKETS: &[f64] = &[
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

fn counter(name: &str, help: &str) -> IntCounter {
    register(IntCounter::new(name, help).expect("a valid counter"))
}

fn counters(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(IntCounterVec::new(Opts::new(name, help), labels).expect("a valid counter family"))
}

fn gauges(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register(IntGaugeVec::new(Opts::new(name, help), labels).expect("a valid gauge family"))
}

fn gauge(name: &str, help: &str) -> IntGauge {
    register(IntGauge::new(name, help).expect("a valid gauge"))
}

fn histogram_opts(name: &str, help: &str, buckets: &[f64]) -> HistogramOpts {
    HistogramOpts::new(name, help).buckets(buckets.to_vec())
}

fn histogram(name: &str, help: &str, buckets: &[f64]) -> Histogram {
    register(Histogram::with_opts(histogram_opts(name, help, buckets)).expect("a valid histogram"))
}

fn histograms(name: &str, help: &str, buckets: &[f64], labels: &[&str]) -> HistogramVec {
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

/// The gateway's metrics (one gateway per process, so no member label).
#[derive(Debug)]
pub struct Gateway {
    /// `tessera_requests_total{api, outcome}`: finished generations by front-end
    /// (`grpc`, `http`) and [`outcome`].
    pub requests: IntCounterVec,
    /// Generations being served now.
    pub in_flight: IntGauge,
    /// Arrival to the first generated token, per successful request.
    pub time_to_first_token: Histogram,
    /// Mean time between output tokens after the first, per successful request
    /// of at least two tokens.
    pub time_per_output_token: Histogram,
    /// Arrival to the last token, per successful request.
    pub request_duration: Histogram,
    /// Prompt tokens (image tokens included) of successful requests.
    pub prompt_tokens: IntCounter,
    /// Generated tokens of successful requests.
    pub completion_tokens: IntCounter,
}

impl Gateway {
    /// The process's gateway metrics.
    pub fn get() -> &'static Self {
        static GATEWAY: LazyLock<Gateway> = LazyLock::new(|| Gateway {
            requests: counters(
                "tessera_requests_total",
                "Generations finished, by front-end and outcome (a gRPC status code).",
                &["api", "outcome"],
            ),
            in_flight: gauge(
                "tessera_requests_in_flight",
                "Generations being served now.",
            ),
            time_to_first_token: histogram(
                "tessera_time_to_first_token_seconds",
                "Seconds from a request's arrival to its first generated token.",
                TTFT_BUCKETS,
            ),
            time_per_output_token: histogram(
                "tessera_time_per_output_token_seconds",
                "Mean seconds between a request's output tokens after the first.",
                TPOT_BUCKETS,
            ),
            request_duration: histogram(
                "tessera_request_duration_seconds",
                "Seconds from a request's arrival to its last token (successful requests).",
                REQUEST_BUCKETS,
            ),
            prompt_tokens: counter(
                "tessera_prompt_tokens_total",
                "Prompt tokens, image tokens included, of successful requests.",
            ),
            completion_tokens: counter(
                "tessera_completion_tokens_total",
                "Tokens generated for successful requests.",
            ),
        });
        &GATEWAY
    }

    /// Counts one finished generation.
    pub fn finished(&self, api: &str, outcome: &str) {
        self.requests.with_label_values(&[api, outcome]).inc();
    }
}

/// The scheduler's families, labelled `scheduler`.
struct SchedulerFamilies {
    waiting: IntGaugeVec,
    running: IntGaugeVec,
    kv_blocks_used: IntGaugeVec,
    kv_blocks_cached: IntGaugeVec,
    kv_blocks_free: IntGaugeVec,
    steps: IntCounterVec,
    batched_tokens: IntCounterVec,
    prefill_tokens: IntCounterVec,
    prefix_cache_hit_tokens: IntCounterVec,
    generated_tokens: IntCounterVec,
    preemptions: IntCounterVec,
    kv_evictions: IntCounterVec,
    requests: IntCounterVec,
    cancelled: IntCounterVec,
}

static SCHEDULER: LazyLock<SchedulerFamilies> = LazyLock::new(|| {
    let l = &["scheduler"];
    SchedulerFamilies {
        waiting: gauges(
            "tessera_scheduler_waiting_sequences",
            "Requests queued for the engine (the queue depth).",
            l,
        ),
        running: gauges(
            "tessera_scheduler_running_sequences",
            "Requests the engine is running (holding KV blocks).",
            l,
        ),
        kv_blocks_used: gauges(
            "tessera_kv_blocks_used",
            "KV-cache blocks held by running requests.",
            l,
        ),
        kv_blocks_cached: gauges(
            "tessera_kv_blocks_cached",
            "KV-cache blocks held by no request whose content is kept for prefix reuse (evictable).",
            l,
        ),
        kv_blocks_free: gauges("tessera_kv_blocks_free", "Empty KV-cache blocks.", l),
        steps: counters(
            "tessera_scheduler_steps_total",
            "Engine steps (batched model passes) run.",
            l,
        ),
        batched_tokens: counters(
            "tessera_scheduler_batched_tokens_total",
            "Token positions run through the model, over every step.",
            l,
        ),
        prefill_tokens: counters(
            "tessera_scheduler_prefill_tokens_total",
            "Prompt positions computed by the model.",
            l,
        ),
        prefix_cache_hit_tokens: counters(
            "tessera_prefix_cache_hit_tokens_total",
            "Prompt positions taken from the prefix cache instead of computed.",
            l,
        ),
        generated_tokens: counters(
            "tessera_scheduler_generated_tokens_total",
            "Tokens sampled.",
            l,
        ),
        preemptions: counters(
            "tessera_scheduler_preemptions_total",
            "Times a running request gave up its KV blocks to make room.",
            l,
        ),
        kv_evictions: counters(
            "tessera_kv_evictions_total",
            "Cached KV blocks taken for new content.",
            l,
        ),
        requests: counters(
            "tessera_scheduler_requests_total",
            "Requests that ended on the scheduler (finished, failed or cancelled).",
            l,
        ),
        cancelled: counters(
            "tessera_scheduler_cancelled_total",
            "Requests ended by cancellation or their deadline.",
            l,
        ),
    }
});

/// One scheduler's metrics (label `scheduler`, its member id).
#[derive(Debug, Clone)]
pub struct SchedulerMetrics {
    pub waiting: IntGauge,
    pub running: IntGauge,
    pub kv_blocks_used: IntGauge,
    pub kv_blocks_cached: IntGauge,
    pub kv_blocks_free: IntGauge,
    pub steps: IntCounter,
    pub batched_tokens: IntCounter,
    pub prefill_tokens: IntCounter,
    pub prefix_cache_hit_tokens: IntCounter,
    pub generated_tokens: IntCounter,
    pub preemptions: IntCounter,
    pub kv_evictions: IntCounter,
    pub requests: IntCounter,
    pub cancelled: IntCounter,
}

impl SchedulerMetrics {
    /// The metrics of the scheduler whose member id is `scheduler`.
    pub fn new(scheduler: &str) -> Self {
        let f = &*SCHEDULER;
        let l = &[scheduler];
        Self {
            waiting: f.waiting.with_label_values(l),
            running: f.running.with_label_values(l),
            kv_blocks_used: f.kv_blocks_used.with_label_values(l),
            kv_blocks_cached: f.kv_blocks_cached.with_label_values(l),
            kv_blocks_free: f.kv_blocks_free.with_label_values(l),
            steps: f.steps.with_label_values(l),
            batched_tokens: f.batched_tokens.with_label_values(l),
            prefill_tokens: f.prefill_tokens.with_label_values(l),
            prefix_cache_hit_tokens: f.prefix_cache_hit_tokens.with_label_values(l),
            generated_tokens: f.generated_tokens.with_label_values(l),
            preemptions: f.preemptions.with_label_values(l),
            kv_evictions: f.kv_evictions.with_label_values(l),
            requests: f.requests.with_label_values(l),
            cancelled: f.cancelled.with_label_values(l),
        }
    }
}

/// Expert dispatch as the scheduler sees it, by expert-worker (label `worker`,
/// its member id), and the routing decisions by `(layer, expert)`: the load
/// picture for placing experts.
#[derive(Debug)]
pub struct ExpertDispatch {
    forward_seconds: HistogramVec,
    forward_bytes: IntCounterVec,
    forward_failures: IntCounterVec,
    routed_tokens: IntCounterVec,
    /// `routed_tokens` children by (layer, expert), to skip formatting labels.
    routed: RwLock<HashMap<(u32, u32), IntCounter>>,
}

impl ExpertDispatch {
    /// The process's expert-dispatch metrics.
    pub fn get() -> &'static Self {
        static DISPATCH: LazyLock<ExpertDispatch> = LazyLock::new(|| ExpertDispatch {
            forward_seconds: histograms(
                "tessera_expert_forward_seconds",
                "Seconds from sending an expert Forward call to its answer, by expert-worker.",
                FORWARD_BUCKETS,
                &["worker"],
            ),
            forward_bytes: counters(
                "tessera_expert_forward_bytes_total",
                "Encoded bytes of Forward requests sent to and responses received from each expert-worker.",
                &["worker", "direction"],
            ),
            forward_failures: counters(
                "tessera_expert_forward_failures_total",
                "Forward calls that failed (retried on a newer routing table or fatal), by expert-worker.",
                &["worker"],
            ),
            routed_tokens: counters(
                "tessera_expert_routed_tokens_total",
                "Tokens the gates routed to each routed expert, by MoE layer.",
                &["layer", "expert"],
            ),
            routed: RwLock::default(),
        });
        &DISPATCH
    }

    /// Counts a `Forward` request of `bytes` sent to `worker`.
    pub fn sent(&self, worker: &str, bytes: usize) {
        self.forward_bytes
            .with_label_values(&[worker, "sent"])
            .inc_by(bytes as u64);
    }

    /// Counts a `Forward` response of `bytes` received from `worker`, answered
    /// `seconds` after its request was sent.
    pub fn received(&self, worker: &str, bytes: usize, seconds: f64) {
        self.forward_bytes
            .with_label_values(&[worker, "received"])
            .inc_by(bytes as u64);
        self.forward_seconds
            .with_label_values(&[worker])
            .observe(seconds);
    }

    /// Counts a failed `Forward` call to `worker`.
    pub fn failed(&self, worker: &str) {
        self.forward_failures.with_label_values(&[worker]).inc();
    }

    /// Adds `tokens` routed to `expert` of MoE layer `layer`.
    pub fn routed(&self, layer: u32, expert: u32, tokens: u64) {
        let key = (layer, expert);
        let known = self
            .routed
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
            .cloned();
        let counter = known.unwrap_or_else(|| {
            let counter = self
                .routed_tokens
                .with_label_values(&[layer.to_string(), expert.to_string()]);
            self.routed
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(key, counter.clone());
            counter
        });
        counter.inc_by(tokens);
    }
}

/// One vision-worker's metrics (label `vision_worker`, its member id).
#[derive(Debug, Clone)]
pub struct VisionMetrics {
    /// Images served from the embedding cache.
    pub cache_hits: IntCounter,
    /// Images looked up and not found (every image when the cache is off).
    pub cache_misses: IntCounter,
    /// Images the cache holds now.
    pub cache_entries: IntGauge,
    /// Seconds per tower pass (one per request with an image not cached).
    pub encode_seconds: Histogram,
    /// Images run through the tower.
    pub images_encoded: IntCounter,
}

impl VisionMetrics {
    /// The metrics of the vision-worker whose member id is `vision_worker`.
    pub fn new(vision_worker: &str) -> Self {
        struct Families {
            hits: IntCounterVec,
            misses: IntCounterVec,
            entries: IntGaugeVec,
            encode: HistogramVec,
            images: IntCounterVec,
        }
        static VISION: LazyLock<Families> = LazyLock::new(|| {
            let l = &["vision_worker"];
            Families {
                hits: counters(
                    "tessera_vision_cache_hits_total",
                    "Images served from the vision-worker's embedding cache.",
                    l,
                ),
                misses: counters(
                    "tessera_vision_cache_misses_total",
                    "Images not found in the embedding cache (encoded).",
                    l,
                ),
                entries: gauges(
                    "tessera_vision_cache_entries",
                    "Encoded images the embedding cache holds.",
                    l,
                ),
                encode: histograms(
                    "tessera_vision_encode_seconds",
                    "Seconds per vision-tower pass (the images of one request not cached).",
                    ENCODE_BUCKETS,
                    l,
                ),
                images: counters(
                    "tessera_vision_images_encoded_total",
                    "Images run through the vision tower.",
                    l,
                ),
            }
        });
        let l = &[vision_worker];
        Self {
            cache_hits: VISION.hits.with_label_values(l),
            cache_misses: VISION.misses.with_label_values(l),
            cache_entries: VISION.entries.with_label_values(l),
            encode_seconds: VISION.encode.with_label_values(l),
            images_encoded: VISION.images.with_label_values(l),
        }
    }
}

/// One expert-worker's metrics (label `worker`, its member id).
#[derive(Debug, Clone)]
pub struct ExpertWorkerMetrics {
    worker: String,
    forward: IntCounterVec,
    /// Seconds to compute one `Forward` (decode, experts, encode).
    pub forward_seconds: Histogram,
    /// Token rows received in `Forward` calls.
    pub tokens: IntCounter,
    /// `(row, expert)` routes computed.
    pub routes: IntCounter,
    /// Routed experts held now.
    pub held_experts: IntGauge,
    /// Bytes of expert weights held now.
    pub held_bytes: IntGauge,
    /// Version of the last placement applied.
    pub placement_version: IntGauge,
}

impl ExpertWorkerMetrics {
    /// The metrics of the expert-worker whose member id is `worker`.
    pub fn new(worker: &str) -> Self {
        struct Families {
            forward: IntCounterVec,
            seconds: HistogramVec,
            tokens: IntCounterVec,
            routes: IntCounterVec,
            held: IntGaugeVec,
            bytes: IntGaugeVec,
            version: IntGaugeVec,
        }
        static WORKER: LazyLock<Families> = LazyLock::new(|| {
            let l = &["worker"];
            Families {
                forward: counters(
                    "tessera_expert_worker_forward_total",
                    "Forward calls answered, by outcome (a gRPC status code).",
                    &["worker", "outcome"],
                ),
                seconds: histograms(
                    "tessera_expert_worker_forward_seconds",
                    "Seconds an expert-worker spends on one Forward call.",
                    FORWARD_BUCKETS,
                    l,
                ),
                tokens: counters(
                    "tessera_expert_worker_tokens_total",
                    "Token rows received in Forward calls.",
                    l,
                ),
                routes: counters(
                    "tessera_expert_worker_routes_total",
                    "(token, expert) routes computed.",
                    l,
                ),
                held: gauges(
                    "tessera_expert_worker_held_experts",
                    "Routed experts held, over every MoE layer.",
                    l,
                ),
                bytes: gauges(
                    "tessera_expert_worker_held_bytes",
                    "Bytes of routed-expert weights held.",
                    l,
                ),
                version: gauges(
                    "tessera_expert_worker_placement_version",
                    "Version of the last expert placement applied (0 before any).",
                    l,
                ),
            }
        });
        let l = &[worker];
        Self {
            worker: worker.to_owned(),
            forward: WORKER.forward.clone(),
            forward_seconds: WORKER.seconds.with_label_values(l),
            tokens: WORKER.tokens.with_label_values(l),
            routes: WORKER.routes.with_label_values(l),
            held_experts: WORKER.held.with_label_values(l),
            held_bytes: WORKER.bytes.with_label_values(l),
            placement_version: WORKER.version.with_label_values(l),
        }
    }

    /// Counts one `Forward` call answered with `code`.
    pub fn answered(&self, code: tonic::Code) {
        self.forward
            .with_label_values(&[self.worker.as_str(), outcome(code)])
            .inc();
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
