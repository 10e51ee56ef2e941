//! Running totals of the scheduler, and the one log line per request. Once
//! [`Stats::export_as`] names the scheduler, the same figures are its Prometheus
//! metrics (`tessera_scheduler_*`, `tessera_kv_*`, `tessera_prefix_cache_*`),
//! updated where they are published.
//!
//! The figure that matters for expert dispatch is
//! `expert_bytes_per_token_per_layer`: bytes sent to and received from
//! expert-workers, divided by tokens run through the model × MoE layers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};

use crate::metrics::SchedulerMetrics;

use crate::kv::PoolCounters;

/// The engine's counters, published after every step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineCounters {
    /// Model steps run.
    pub steps: u64,
    /// Token positions run through the model, over every step.
    pub batched_tokens: u64,
    /// Largest number of sequences in one step.
    pub max_step_sequences: usize,
    /// Prompt positions computed by the model (a prefix-cache hit skips them).
    pub prefill_tokens: u64,
    /// Prompt positions taken from the prefix cache instead of computed.
    pub prefix_reused_tokens: u64,
    /// Tokens sampled.
    pub generated_tokens: u64,
    /// Times a running sequence gave up its blocks to make room.
    pub preemptions: u64,
    /// Sequences running / waiting after the last step.
    pub running: usize,
    pub waiting: usize,
    /// Sequences that ended by cancellation or deadline.
    pub cancelled: u64,
    /// The KV block pool after the last step.
    pub pool: PoolCounters,
    /// Bytes of KV cache per token (every layer).
    pub kv_bytes_per_token: usize,
    /// Tokens per block.
    pub kv_block_size: usize,
}

/// Totals over every finished request (shared between the engine and readers).
#[derive(Debug, Default)]
pub struct Stats {
    requests: AtomicU64,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    model_tokens: AtomicU64,
    expert_bytes: AtomicU64,
    moe_layers: AtomicU64,
    weight_tensors: AtomicU64,
    routed_expert_tensors: AtomicU64,
    engine: Mutex<EngineCounters>,
    metrics: OnceLock<SchedulerMetrics>,
}

/// A copy of [`Stats`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Requests that ran (finished, failed or cancelled after starting).
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Token positions run through the model (prompt + decode steps).
    pub model_tokens: u64,
    /// Bytes of `Forward` requests and responses, encoded.
    pub expert_bytes: u64,
    /// MoE layers of the model (0 until it is loaded).
    pub moe_layers: u64,
    /// Tensors this scheduler loaded from the checkpoint (0 until loaded).
    pub weight_tensors: u64,
    /// Of those, routed-expert tensors (`….mlp.experts.…`): always 0, the routed
    /// experts live on expert-workers.
    pub routed_expert_tensors: u64,
    /// The engine's counters after its last step.
    pub engine: EngineCounters,
}

impl StatsSnapshot {
    /// Expert bytes per token per MoE layer; 0 when nothing ran.
    pub fn expert_bytes_per_token_per_layer(&self) -> f64 {
        per_token_per_layer(self.expert_bytes, self.model_tokens, self.moe_layers)
    }
}

/// One request's figures, as logged.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestStats {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub model_tokens: u64,
    pub expert_bytes: u64,
    pub decode_tokens_per_s: f64,
}

fn per_token_per_layer(bytes: u64, tokens: u64, layers: u64) -> f64 {
    if tokens == 0 || layers == 0 {
        0.0
    } else {
        bytes as f64 / (tokens * layers) as f64
    }
}

impl Stats {
    /// Also reports these figures as the Prometheus metrics of the scheduler whose
    /// member id is `scheduler` (the first call counts).
    pub fn export_as(&self, scheduler: &str) {
        let metrics = self
            .metrics
            .get_or_init(|| SchedulerMetrics::new(scheduler));
        let engine = self.engine.lock().unwrap_or_else(PoisonError::into_inner);
        export(metrics, &EngineCounters::default(), &engine);
    }

    /// Records the model's number of MoE layers (once loaded).
    pub fn set_moe_layers(&self, n: usize) {
        self.moe_layers.store(n as u64, Ordering::Relaxed);
    }

    /// Records what the scheduler took from the checkpoint: every tensor name loaded.
    pub fn set_loaded(&self, names: &[String]) {
        let routed = names.iter().filter(|n| n.contains(".mlp.experts.")).count();
        self.weight_tensors
            .store(names.len() as u64, Ordering::Relaxed);
        self.routed_expert_tensors
            .store(routed as u64, Ordering::Relaxed);
    }

    /// Adds one request and logs its line.
    pub fn record(&self, request_id: &str, r: RequestStats) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.prompt_tokens
            .fetch_add(r.prompt_tokens, Ordering::Relaxed);
        self.completion_tokens
            .fetch_add(r.completion_tokens, Ordering::Relaxed);
        self.model_tokens
            .fetch_add(r.model_tokens, Ordering::Relaxed);
        self.expert_bytes
            .fetch_add(r.expert_bytes, Ordering::Relaxed);
        if let Some(m) = self.metrics.get() {
            m.requests.inc();
        }
        let layers = self.moe_layers.load(Ordering::Relaxed);
        tracing::info!(
            request_id,
            prompt_tokens = r.prompt_tokens,
            completion_tokens = r.completion_tokens,
            decode_tokens_per_s = format_args!("{:.1}", r.decode_tokens_per_s),
            expert_bytes = r.expert_bytes,
            expert_bytes_per_token_per_layer = format_args!(
                "{:.0}",
                per_token_per_layer(r.expert_bytes, r.model_tokens, layers)
            ),
            "request done"
        );
    }

    /// Publishes the engine's counters.
    pub fn set_engine(&self, counters: EngineCounters) {
        let mut engine = self.engine.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(m) = self.metrics.get() {
            export(m, &engine, &counters);
        }
        *engine = counters;
    }

    /// The totals now.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            requests: self.requests.load(Ordering::Relaxed),
            prompt_tokens: self.prompt_tokens.load(Ordering::Relaxed),
            completion_tokens: self.completion_tokens.load(Ordering::Relaxed),
            model_tokens: self.model_tokens.load(Ordering::Relaxed),
            expert_bytes: self.expert_bytes.load(Ordering::Relaxed),
            moe_layers: self.moe_layers.load(Ordering::Relaxed),
            weight_tensors: self.weight_tensors.load(Ordering::Relaxed),
            routed_expert_tensors: self.routed_expert_tensors.load(Ordering::Relaxed),
            engine: *self.engine.lock().unwrap_or_else(PoisonError::into_inner),
        }
    }
}

/// Sets the gauges to `now` and adds what the counters gained since `before`.
fn export(m: &SchedulerMetrics, before: &EngineCounters, now: &EngineCounters) {
    let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    m.waiting.set(gauge(now.waiting));
    m.running.set(gauge(now.running));
    m.kv_blocks_used.set(gauge(now.pool.used_blocks));
    m.kv_blocks_cached.set(gauge(now.pool.cached_blocks));
    m.kv_blocks_free.set(gauge(now.pool.free_blocks));
    let gained = |now: u64, before: u64| now.saturating_sub(before);
    m.steps.inc_by(gained(now.steps, before.steps));
    m.batched_tokens
        .inc_by(gained(now.batched_tokens, before.batched_tokens));
    m.prefill_tokens
        .inc_by(gained(now.prefill_tokens, before.prefill_tokens));
    m.prefix_cache_hit_tokens.inc_by(gained(
        now.prefix_reused_tokens,
        before.prefix_reused_tokens,
    ));
    m.generated_tokens
        .inc_by(gained(now.generated_tokens, before.generated_tokens));
    m.preemptions
        .inc_by(gained(now.preemptions, before.preemptions));
    m.kv_evictions
        .inc_by(gained(now.pool.evictions, before.pool.evictions));
    m.cancelled.inc_by(gained(now.cancelled, before.cancelled));
}

#[cfg(test)]
mod tests {
    use tessera_runtime::metrics::{Scrape, render};

    use super::*;

    #[test]
    fn bytes_are_divided_by_tokens_and_layers() {
        let stats = Stats::default();
        assert_eq!(stats.snapshot().expert_bytes_per_token_per_layer(), 0.0);
        stats.set_moe_layers(2);
        stats.record(
            "r",
            RequestStats {
                prompt_tokens: 7,
                completion_tokens: 4,
                model_tokens: 10,
                expert_bytes: 4000,
                decode_tokens_per_s: 1.0,
            },
        );
        let s = stats.snapshot();
        assert_eq!(
            (s.requests, s.prompt_tokens, s.completion_tokens),
            (1, 7, 4)
        );
        assert_eq!(s.expert_bytes_per_token_per_layer(), 200.0);
    }

    #[test]
    fn published_counters_become_the_schedulers_metrics() {
        let stats = Stats::default();
        let early = EngineCounters {
            steps: 2,
            ..Default::default()
        };
        stats.set_engine(early);
        stats.export_as("stats-test-scheduler");
        let mut counters = EngineCounters {
            steps: 5,
            prefill_tokens: 30,
            prefix_reused_tokens: 16,
            generated_tokens: 4,
            waiting: 3,
            running: 2,
            ..Default::default()
        };
        counters.pool.used_blocks = 7;
        counters.pool.free_blocks = 9;
        stats.set_engine(counters);
        stats.record("r", RequestStats::default());
        let s = Scrape::parse(&render()).unwrap();
        let get = |name| s.sum(name, &[("scheduler", "stats-test-scheduler")]);
        // Steps run before the export count too: counters are totals.
        assert_eq!(get("tessera_scheduler_steps_total"), 5.0);
        assert_eq!(get("tessera_scheduler_prefill_tokens_total"), 30.0);
        assert_eq!(get("tessera_prefix_cache_hit_tokens_total"), 16.0);
        assert_eq!(get("tessera_scheduler_generated_tokens_total"), 4.0);
        assert_eq!(get("tessera_scheduler_waiting_sequences"), 3.0);
        assert_eq!(get("tessera_scheduler_running_sequences"), 2.0);
        assert_eq!(get("tessera_kv_blocks_used"), 7.0);
        assert_eq!(get("tessera_kv_blocks_free"), 9.0);
        assert_eq!(get("tessera_scheduler_requests_total"), 1.0);
    }
}
