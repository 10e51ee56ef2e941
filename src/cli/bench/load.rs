//! Sends the requests: each one a streamed generation, timed from the moment it
//! is sent; at most C in flight, or at Poisson-distributed arrival times.

use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tessera_proto::v1::GenerateRequest;
use tessera_proto::v1::generate_stream_response::Event;
use tessera_proto::v1::tessera_client::TesseraClient;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

/// How requests are released.
#[derive(Debug, Clone, Copy)]
pub enum Pace {
    /// A new request as soon as one of this many in flight ends.
    Concurrency(usize),
    /// Poisson arrivals at this many requests per second (exponential gaps drawn
    /// from a seeded generator), however many are in flight.
    Rate { per_s: f64, seed: u64 },
}

/// The timings of one successful request.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Sent → first streamed token.
    pub ttft: Duration,
    /// Sent → end of the stream.
    pub latency: Duration,
    /// Token ids streamed.
    pub output_tokens: usize,
    /// Prompt tokens, as the server counted them (images included).
    pub prompt_tokens: u32,
}

/// One request's outcome: its timings, or why it failed.
pub type Outcome = Result<Sample, String>;

/// A whole measured run.
#[derive(Debug)]
pub struct Run {
    pub outcomes: Vec<Outcome>,
    /// First request sent → last one ended.
    pub duration: Duration,
}

fn status(s: tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

/// Sends `req` as a stream and times it.
pub async fn one(mut client: TesseraClient<Channel>, req: GenerateRequest) -> Outcome {
    let sent = Instant::now();
    let mut stream = client
        .generate_stream(req)
        .await
        .map_err(status)?
        .into_inner();
    let (mut first, mut tokens, mut finished) = (None, 0, None);
    while let Some(msg) = stream.next().await {
        match msg.map_err(status)?.event {
            Some(Event::Delta(d)) => {
                if first.is_none() && !d.token_ids.is_empty() {
                    first = Some(sent.elapsed());
                }
                tokens += d.token_ids.len();
            }
            Some(Event::Finished(f)) => finished = Some(f),
            None => {}
        }
    }
    let latency = sent.elapsed();
    let finished = finished.ok_or("the stream ended without its `finished` message")?;
    Ok(Sample {
        ttft: first.unwrap_or(latency),
        latency,
        output_tokens: tokens,
        prompt_tokens: finished.usage.unwrap_or_default().prompt_tokens,
    })
}

/// Offsets from the start at which Poisson arrivals at `per_s` requests/s come;
/// the first at once.
pub fn arrivals(n: usize, per_s: f64, seed: u64) -> Vec<Duration> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut at = 0.0;
    (0..n)
        .map(|i| {
            if i > 0 {
                // Inverse CDF of the exponential distribution; 1 - u is in (0, 1].
                at += -(1.0 - rng.random::<f64>()).ln() / per_s;
            }
            Duration::from_secs_f64(at)
        })
        .collect()
}

/// Sends every request, paced as asked, and collects the outcomes.
pub async fn run(
    client: &TesseraClient<Channel>,
    requests: Vec<GenerateRequest>,
    pace: Pace,
    progress: &ProgressBar,
) -> Run {
    let n = requests.len();
    let mut tasks = JoinSet::new();
    let started = Instant::now();
    match pace {
        Pace::Concurrency(c) => {
            let slots = Arc::new(Semaphore::new(c));
            for req in requests {
                let slot = slots.clone().acquire_owned().await.expect("never closed");
                let client = client.clone();
                let progress = progress.clone();
                tasks.spawn(async move {
                    let outcome = one(client, req).await;
                    drop(slot);
                    progress.inc(1);
                    outcome
                });
            }
        }
        Pace::Rate { per_s, seed } => {
            let start = tokio::time::Instant::now();
            for (req, at) in requests.into_iter().zip(arrivals(n, per_s, seed)) {
                tokio::time::sleep_until(start + at).await;
                let client = client.clone();
                let progress = progress.clone();
                tasks.spawn(async move {
                    let outcome = one(client, req).await;
                    progress.inc(1);
                    outcome
                });
            }
        }
    }
    let mut outcomes = Vec::with_capacity(n);
    while let Some(joined) = tasks.join_next().await {
        outcomes.push(joined.unwrap_or_else(|e| Err(format!("the request task failed: {e}"))));
    }
    Run {
        outcomes,
        duration: started.elapsed(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poisson_arrivals_are_seeded_increasing_and_average_the_rate() {
        let a = arrivals(4000, 50.0, 7);
        assert_eq!(a, arrivals(4000, 50.0, 7));
        assert_ne!(a, arrivals(4000, 50.0, 8));
        assert_eq!(a[0], Duration::ZERO);
        assert!(a.windows(2).all(|w| w[0] <= w[1]));
        // 3999 gaps of mean 1/50 s: the total is within a few percent of 80 s.
        let total = a.last().unwrap().as_secs_f64();
        assert!((total - 3999.0 / 50.0).abs() < 4.0, "{total}");
    }
}
