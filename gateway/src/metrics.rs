//! The gateway's Prometheus families (one gateway per process, so no member
//! label), defined in the process registry of `tessera_runtime::metrics`.

use std::sync::LazyLock;

use tessera_runtime::metrics::{
    Histogram, IntCounter, IntCounterVec, IntGauge, REQUEST_BUCKETS, TPOT_BUCKETS, TTFT_BUCKETS,
    counter, counters, gauge, histogram,
};

/// The gateway's metrics (one gateway per process, so no member label).
#[derive(Debug)]
pub struct Gateway {
    /// `tessera_requests_total{api, outcome}`: finished generations by front-end
    /// (`grpc`, `http`) and [`outcome`](tessera_runtime::metrics::outcome).
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

#[cfg(test)]
mod tests {
    use tessera_runtime::metrics::{Scrape, render};

    use super::*;

    #[test]
    fn finished_requests_count_by_front_end_and_outcome() {
        let gateway = Gateway::get();
        let count = |api| {
            Scrape::parse(&render()).unwrap().sum(
                "tessera_requests_total",
                &[("api", api), ("outcome", "unavailable")],
            )
        };
        let before = count("grpc");
        gateway.finished("grpc", "unavailable");
        assert_eq!(count("grpc"), before + 1.0);
        assert!(render().contains("# TYPE tessera_time_to_first_token_seconds histogram"));
    }
}
