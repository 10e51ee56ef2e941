//! The scheduler's Prometheus families, defined in the process registry of
//! `tessera_runtime::metrics`: one scheduler's engine and request counters
//! ([`SchedulerMetrics`], label `scheduler`) and expert dispatch as the process
//! sees it ([`ExpertDispatch`], by expert-worker and by routed expert).

use std::collections::HashMap;
use std::sync::{LazyLock, PoisonError, RwLock};

use tessera_runtime::metrics::{
    FORWARD_BUCKETS, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, counters,
    gauges, histograms,
};

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
    failovers: IntCounter,
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
            failovers: counters(
                "tessera_expert_failovers_total",
                "Forward calls sent to another replica of their experts because the first \
                 owner's call failed or timed out (--expert-timeout-ms).",
                &[],
            )
            .with_label_values::<&str>(&[]),
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

    /// Counts `calls` sent to other replicas after a failed call.
    pub fn failed_over(&self, calls: usize) {
        self.failovers.inc_by(calls as u64);
    }

    /// Tokens routed so far to each expert of each MoE layer (`layer` → per-expert
    /// counts, `n_experts` long): the load picture placement balances.
    pub fn loads(&self, n_experts: usize) -> std::collections::BTreeMap<usize, Vec<f64>> {
        let routed = self.routed.read().unwrap_or_else(PoisonError::into_inner);
        let mut loads: std::collections::BTreeMap<usize, Vec<f64>> = Default::default();
        for (&(layer, expert), counter) in routed.iter() {
            let per_expert = loads
                .entry(layer as usize)
                .or_insert_with(|| vec![0.0; n_experts]);
            if let Some(slot) = per_expert.get_mut(expert as usize) {
                *slot = counter.get() as f64;
            }
        }
        loads
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

#[cfg(test)]
mod tests {
    use tessera_runtime::metrics::{Scrape, render};

    use super::*;

    fn scrape() -> Scrape {
        Scrape::parse(&render()).unwrap()
    }

    #[test]
    fn schedulers_of_one_process_report_under_their_own_member_ids() {
        let a = SchedulerMetrics::new("metrics-test-scheduler-a");
        let b = SchedulerMetrics::new("metrics-test-scheduler-b");
        a.waiting.set(3);
        b.waiting.set(5);
        a.steps.inc_by(2);
        let again = SchedulerMetrics::new("metrics-test-scheduler-a");
        again.steps.inc();
        let s = scrape();
        let waiting = |id| s.sum("tessera_scheduler_waiting_sequences", &[("scheduler", id)]);
        assert_eq!(waiting("metrics-test-scheduler-a"), 3.0);
        assert_eq!(waiting("metrics-test-scheduler-b"), 5.0);
        assert_eq!(
            s.sum(
                "tessera_scheduler_steps_total",
                &[("scheduler", "metrics-test-scheduler-a")]
            ),
            3.0,
            "a second handle for the same id adds to the same series"
        );
    }

    #[test]
    fn routed_tokens_and_forward_bytes_accumulate_by_label() {
        let d = ExpertDispatch::get();
        d.routed(901, 3, 4);
        d.routed(901, 3, 2);
        d.routed(901, 4, 1);
        d.sent("metrics-test-dispatch", 100);
        d.received("metrics-test-dispatch", 40, 0.01);
        d.failed("metrics-test-dispatch");
        let s = scrape();
        let routed = |e| {
            s.sum(
                "tessera_expert_routed_tokens_total",
                &[("layer", "901"), ("expert", e)],
            )
        };
        assert_eq!((routed("3"), routed("4")), (6.0, 1.0));
        let worker = ("worker", "metrics-test-dispatch");
        let bytes = |dir| {
            s.sum(
                "tessera_expert_forward_bytes_total",
                &[worker, ("direction", dir)],
            )
        };
        assert_eq!((bytes("sent"), bytes("received")), (100.0, 40.0));
        assert_eq!(
            s.sum("tessera_expert_forward_seconds_count", &[worker]),
            1.0
        );
        assert_eq!(
            s.sum("tessera_expert_forward_failures_total", &[worker]),
            1.0
        );
    }
}
