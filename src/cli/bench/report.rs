//! Turns the outcomes of a run into its summary: throughput and latency
//! percentiles (nearest rank), as one JSON object or a table.

use std::fmt::Write as _;

use serde::Serialize;

use super::load::{Pace, Run};

/// How many distinct error messages the report keeps.
const MAX_ERRORS: usize = 5;

/// Mean and nearest-rank percentiles of one measure, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Stats {
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

/// The `p`-th percentile of ascending `sorted` by nearest rank: the smallest value
/// with at least p% of the values at or below it.
fn nearest_rank(sorted: &[f64], p: f64) -> f64 {
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl Stats {
    /// The statistics of `values`; `None` when there are none.
    pub fn of(mut values: Vec<f64>) -> Option<Stats> {
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        Some(Stats {
            mean: values.iter().sum::<f64>() / values.len() as f64,
            p50: nearest_rank(&values, 50.0),
            p90: nearest_rank(&values, 90.0),
            p99: nearest_rank(&values, 99.0),
        })
    }
}

/// Resident memory of the watched process (`--watch-pid`, or this process with
/// `--model`), in MB, sampled every few seconds through the run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Rss {
    pub pid: u32,
    /// When the measured run started.
    pub start_mb: f64,
    /// The first sample at or after one minute (`None` for shorter runs).
    pub at_1min_mb: Option<f64>,
    /// When the run ended.
    pub end_mb: f64,
    pub peak_mb: f64,
}

impl Rss {
    /// The summary of `samples` (seconds since the start, MB), in time order.
    pub fn of(pid: u32, samples: &[(f64, f64)]) -> Option<Rss> {
        let (first, last) = (samples.first()?, samples.last()?);
        Some(Rss {
            pid,
            start_mb: first.1,
            at_1min_mb: samples.iter().find(|(t, _)| *t >= 60.0).map(|s| s.1),
            end_mb: last.1,
            peak_mb: samples.iter().map(|s| s.1).fold(0.0, f64::max),
        })
    }
}

/// The summary of a run; `--json` prints it as is.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Requests that succeeded (the ones measured).
    pub requests: usize,
    pub failed: usize,
    /// Requests the client abandoned after their first token (`--cancel-share`);
    /// neither measured nor failed.
    pub cancelled: usize,
    /// Requests sent without their images (`--text-share`).
    pub text_only: usize,
    pub rss: Option<Rss>,
    pub duration_s: f64,
    pub output_tokens: usize,
    pub output_tokens_per_s: f64,
    pub requests_per_s: f64,
    pub ttft_ms: Option<Stats>,
    /// `None` when no request generated more than one token.
    pub tpot_ms: Option<Stats>,
    pub latency_ms: Option<Stats>,
    pub concurrency: Option<usize>,
    pub request_rate: Option<f64>,
    pub prompt_tokens_mean: f64,
    pub image_count: usize,
    /// Every request sent its own copy of the images (`--fresh-images`): no vision cache
    /// hits. Without it, requests after the first reuse the cached image embeddings.
    pub fresh_images: bool,
    /// The in-process cluster's load time (`--model`).
    pub load_s: Option<f64>,
    /// The first few distinct error messages.
    pub errors: Vec<String>,
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl Report {
    pub fn new(run: &Run, pace: Pace, image_count: usize, load_s: Option<f64>) -> Report {
        let ok: Vec<_> = run
            .outcomes
            .iter()
            .filter_map(|o| o.as_ref().ok())
            .filter(|s| !s.cancelled)
            .collect();
        let cancelled = run
            .outcomes
            .iter()
            .filter(|o| o.as_ref().is_ok_and(|s| s.cancelled))
            .count();
        let mut errors: Vec<String> = Vec::new();
        for e in run.outcomes.iter().filter_map(|o| o.as_ref().err()) {
            if errors.len() < MAX_ERRORS && !errors.contains(e) {
                errors.push(e.clone());
            }
        }
        let duration_s = run.duration.as_secs_f64();
        let per_s = |x: f64| {
            if duration_s > 0.0 {
                x / duration_s
            } else {
                0.0
            }
        };
        let output_tokens = ok.iter().map(|s| s.output_tokens).sum();
        let tpot = ok
            .iter()
            .filter(|s| s.output_tokens > 1)
            .map(|s| ms(s.latency - s.ttft) / (s.output_tokens - 1) as f64)
            .collect();
        let prompt_tokens: f64 = ok.iter().map(|s| f64::from(s.prompt_tokens)).sum();
        let (concurrency, request_rate) = match pace {
            Pace::Concurrency(c) => (Some(c), None),
            Pace::Rate { per_s, .. } => (None, Some(per_s)),
        };
        Report {
            requests: ok.len(),
            failed: run.outcomes.len() - ok.len() - cancelled,
            cancelled,
            text_only: 0,
            rss: None,
            duration_s,
            output_tokens,
            output_tokens_per_s: per_s(output_tokens as f64),
            requests_per_s: per_s(ok.len() as f64),
            ttft_ms: Stats::of(ok.iter().map(|s| ms(s.ttft)).collect()),
            tpot_ms: Stats::of(tpot),
            latency_ms: Stats::of(ok.iter().map(|s| ms(s.latency)).collect()),
            concurrency,
            request_rate,
            prompt_tokens_mean: if ok.is_empty() {
                0.0
            } else {
                prompt_tokens / ok.len() as f64
            },
            image_count,
            fresh_images: false,
            load_s,
            errors,
        }
    }

    /// The report as a table for people.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let pace = match (self.concurrency, self.request_rate) {
            (Some(c), _) => format!("concurrency {c}"),
            (_, Some(r)) => format!("{r} requests/s (Poisson)"),
            _ => String::new(),
        };
        let _ = writeln!(
            t,
            "tessera bench: {pace}, {} image(s) per request{}",
            self.image_count,
            match (self.image_count, self.fresh_images) {
                (0, _) => "",
                (_, true) => ", fresh for each request (no vision cache hits)",
                (_, false) => ", the same for every request (vision cache hits after the first)",
            }
        );
        if let Some(load) = self.load_s {
            let _ = writeln!(t, "{:<24}{load:>10.2} s", "cluster load");
        }
        let ok_failed = format!("{} / {}", self.requests, self.failed);
        let _ = writeln!(t, "{:<24}{ok_failed:>10}", "requests ok / failed");
        if self.cancelled > 0 || self.text_only > 0 {
            let _ = writeln!(t, "{:<24}{:>10}", "cancelled by the client", self.cancelled);
            let _ = writeln!(t, "{:<24}{:>10}", "sent without images", self.text_only);
        }
        if let Some(rss) = self.rss {
            let at_1min = rss.at_1min_mb.map_or("-".to_owned(), |m| format!("{m:.0}"));
            let _ = writeln!(
                t,
                "{:<24}{:>10.0}{:>10}{:>10.0}{:>10.0}   (pid {}: start, 1 min, end, peak)",
                "RSS (MB)", rss.start_mb, at_1min, rss.end_mb, rss.peak_mb, rss.pid
            );
        }
        let rows = [
            ("duration (s)", self.duration_s, 2),
            ("output tokens", self.output_tokens as f64, 0),
            ("output tokens/s", self.output_tokens_per_s, 1),
            ("requests/s", self.requests_per_s, 2),
            ("prompt tokens (mean)", self.prompt_tokens_mean, 1),
        ];
        for (name, value, decimals) in rows {
            let _ = writeln!(t, "{name:<24}{value:>10.decimals$}");
        }
        let _ = writeln!(
            t,
            "{:<24}{:>10}{:>10}{:>10}{:>10}",
            "latency (ms)", "mean", "p50", "p90", "p99"
        );
        for (name, stats) in [
            ("TTFT", self.ttft_ms),
            ("TPOT", self.tpot_ms),
            ("end to end", self.latency_ms),
        ] {
            match stats {
                Some(s) => {
                    let _ = writeln!(
                        t,
                        "{name:<24}{:>10.1}{:>10.1}{:>10.1}{:>10.1}",
                        s.mean, s.p50, s.p90, s.p99
                    );
                }
                None => {
                    let _ = writeln!(t, "{name:<24}{:>10}{:>10}{:>10}{:>10}", "-", "-", "-", "-");
                }
            }
        }
        if !self.errors.is_empty() {
            let _ = writeln!(t, "errors (first {} distinct):", self.errors.len());
            for e in &self.errors {
                let _ = writeln!(t, "  {e}");
            }
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::load::Sample;
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let s = Stats::of((1..=10).rev().map(f64::from).collect()).unwrap();
        assert_eq!(
            s,
            Stats {
                mean: 5.5,
                p50: 5.0,
                p90: 9.0,
                p99: 10.0
            }
        );
        let one = Stats::of(vec![3.0]).unwrap();
        assert_eq!((one.p50, one.p99), (3.0, 3.0));
        assert_eq!(Stats::of(Vec::new()), None);
    }

    #[test]
    fn failures_are_counted_not_measured() {
        let sample = |ttft_ms, latency_ms, tokens| {
            Ok(Sample {
                cancelled: false,
                ttft: Duration::from_millis(ttft_ms),
                latency: Duration::from_millis(latency_ms),
                output_tokens: tokens,
                prompt_tokens: 10,
            })
        };
        let run = Run {
            outcomes: vec![
                sample(100, 1100, 11),
                Err("Unavailable: x".into()),
                sample(200, 400, 1),
                Err("Unavailable: x".into()),
            ],
            duration: Duration::from_secs(2),
        };
        let r = Report::new(&run, Pace::Concurrency(2), 0, None);
        assert_eq!((r.requests, r.failed, r.output_tokens), (2, 2, 12));
        assert_eq!(r.output_tokens_per_s, 6.0);
        assert_eq!(r.requests_per_s, 1.0);
        assert_eq!(r.ttft_ms.unwrap().mean, 150.0);
        // Only the request with more than one token has a TPOT: 1000 ms / 10.
        assert_eq!(r.tpot_ms.unwrap().p99, 100.0);
        assert_eq!(r.errors, ["Unavailable: x"]);
        assert_eq!(r.prompt_tokens_mean, 10.0);
        assert!(r.table().contains("2 / 2"));
    }

    #[test]
    fn cancelled_requests_are_neither_measured_nor_failed_and_rss_is_summarised() {
        let run = Run {
            outcomes: vec![
                Ok(Sample {
                    cancelled: true,
                    ttft: Duration::from_millis(10),
                    latency: Duration::from_millis(10),
                    output_tokens: 1,
                    prompt_tokens: 0,
                }),
                Err("Unavailable: x".into()),
            ],
            duration: Duration::from_secs(1),
        };
        let r = Report::new(&run, Pace::Concurrency(2), 0, None);
        assert_eq!((r.requests, r.failed, r.cancelled), (0, 1, 1));
        let rss = Rss::of(
            7,
            &[(0.0, 100.0), (30.0, 180.0), (61.0, 150.0), (90.0, 151.0)],
        )
        .unwrap();
        assert_eq!(rss.at_1min_mb, Some(150.0));
        assert_eq!(
            (rss.start_mb, rss.end_mb, rss.peak_mb),
            (100.0, 151.0, 180.0)
        );
        assert_eq!(Rss::of(7, &[(0.0, 1.0)]).unwrap().at_1min_mb, None);
    }
}
