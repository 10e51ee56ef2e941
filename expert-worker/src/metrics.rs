//! The expert-worker's Prometheus families (label `worker`, its member id),
//! defined in the process registry of `tessera_runtime::metrics`.

use std::sync::LazyLock;

use tessera_runtime::metrics::{
    FORWARD_BUCKETS, Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    counters, gauges, histograms, outcome,
};

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
    /// Bytes of expert weights loaded, over the worker's life.
    pub loaded_bytes: IntCounter,
    /// The most bytes of expert weights this worker may hold.
    pub budget_bytes: IntGauge,
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
            loaded: IntCounterVec,
            budget: IntGaugeVec,
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
                loaded: counters(
                    "tessera_expert_worker_loaded_bytes_total",
                    "Bytes of routed-expert weights loaded, over the worker's life.",
                    l,
                ),
                budget: gauges(
                    "tessera_expert_worker_budget_bytes",
                    "The most bytes of routed-expert weights the worker may hold \
                     (--expert-memory-bytes; 0: no limit).",
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
            loaded_bytes: WORKER.loaded.with_label_values(l),
            budget_bytes: WORKER.budget.with_label_values(l),
        }
    }

    /// Counts one `Forward` call answered with `code`.
    pub fn answered(&self, code: tonic::Code) {
        self.forward
            .with_label_values(&[self.worker.as_str(), outcome(code)])
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use tessera_runtime::metrics::{Scrape, render};

    use super::*;

    #[test]
    fn calls_count_by_outcome_under_the_member_id() {
        let w = ExpertWorkerMetrics::new("metrics-test-worker");
        w.answered(tonic::Code::Ok);
        w.answered(tonic::Code::Ok);
        w.answered(tonic::Code::FailedPrecondition);
        w.forward_seconds.observe(0.002);
        let s = Scrape::parse(&render()).unwrap();
        let worker = ("worker", "metrics-test-worker");
        assert_eq!(
            s.sum(
                "tessera_expert_worker_forward_total",
                &[worker, ("outcome", "ok")]
            ),
            2.0
        );
        assert_eq!(
            s.sum(
                "tessera_expert_worker_forward_total",
                &[worker, ("outcome", "failed_precondition")]
            ),
            1.0
        );
        assert_eq!(
            s.sum("tessera_expert_worker_forward_seconds_count", &[worker]),
            1.0
        );
        assert_eq!(
            s.sum(
                "tessera_expert_worker_forward_seconds_bucket",
                &[worker, ("le", "0.0025")]
            ),
            1.0
        );
    }
}
