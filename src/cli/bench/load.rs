//! Sends the requests: each one a streamed generation, timed from the moment it
//! is sent; at most C in flight (for a number of requests or for a duration), or at
//! Poisson-distributed arrival times. A request may be abandoned after its first
//! token, as a client that cancels does.

use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tessera_proto::v1::GenerateRequest;
use tessera_proto::v1::generate_stream_response::Event;
use tessera_proto::v1::tessera_client::TesseraClient;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_stream::StreamExt;
use tonic::metadata::{Ascii, MetadataValue};
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
    /// The client dropped the stream after the first token (not measured).
    pub cancelled: bool,
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

/// How each request is sent.
#[derive(Debug, Clone, Default)]
pub struct Call {
    /// `authorization: Bearer KEY` on every request.
    pub key: Option<MetadataValue<Ascii>>,
}

impl Call {
    fn request(&self, req: GenerateRequest) -> tonic::Request<GenerateRequest> {
        let mut request = tonic::Request::new(req);
        if let Some(key) = &self.key {
            request.metadata_mut().insert("authorization", key.clone());
        }
        request
    }
}

/// Sends `req` as a stream and times it; with `cancel`, drops the stream once the
/// first token arrived.
pub async fn one(
    mut client: TesseraClient<Channel>,
    req: GenerateRequest,
    call: &Call,
    cancel: bool,
) -> Outcome {
    let sent = Instant::now();
    let mut stream = client
        .generate_stream(call.request(req))
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
                if cancel && tokens > 0 {
                    return Ok(Sample {
                        cancelled: true,
                        ttft: first.unwrap_or_default(),
                        latency: sent.elapsed(),
                        output_tokens: tokens,
                        prompt_tokens: 0,
                    });
                }
            }
            Some(Event::Finished(f)) => finished = Some(f),
            None => {}
        }
    }
    let latency = sent.elapsed();
    let finished = finished.ok_or("the stream ended without its `finished` message")?;
    Ok(Sample {
        cancelled: false,
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

/// How many requests, or for how long.
#[derive(Debug, Clone, Copy)]
pub enum Length {
    Requests(usize),
    /// New requests until this much time has passed; those in flight then finish.
    Duration(Duration),
}

/// The `n`-th request of a run and whether its client abandons it after the first token.
pub type Make<'a> = &'a (dyn Fn(usize) -> (GenerateRequest, bool) + Sync);

/// Sends the requests `make` gives, paced as asked, and collects the outcomes.
pub async fn run(
    client: &TesseraClient<Channel>,
    make: Make<'_>,
    length: Length,
    pace: Pace,
    call: &Call,
    progress: &ProgressBar,
) -> Run {
    let mut tasks = JoinSet::new();
    let mut outcomes = Vec::new();
    let started = Instant::now();
    let spawn = |tasks: &mut JoinSet<Outcome>, n: usize, slot: Option<OwnedSemaphorePermit>| {
        let (req, cancel) = make(n);
        let client = client.clone();
        let progress = progress.clone();
        let call = call.clone();
        tasks.spawn(async move {
            let outcome = one(client, req, &call, cancel).await;
            drop(slot);
            progress.inc(1);
            outcome
        });
    };
    match (pace, length) {
        (Pace::Concurrency(c), length) => {
            let slots = Arc::new(Semaphore::new(c));
            for n in 0.. {
                match length {
                    Length::Requests(total) if n >= total => break,
                    Length::Duration(d) if started.elapsed() >= d => break,
                    _ => {}
                }
                let slot = match length {
                    Length::Duration(d) => {
                        let left = d.saturating_sub(started.elapsed());
                        match tokio::time::timeout(left, slots.clone().acquire_owned()).await {
                            Ok(slot) => slot.expect("never closed"),
                            Err(_) => break,
                        }
                    }
                    Length::Requests(_) => {
                        slots.clone().acquire_owned().await.expect("never closed")
                    }
                };
                spawn(&mut tasks, n, Some(slot));
                // Collect what has ended, so a long run holds only what is in flight.
                while let Some(joined) = tasks.try_join_next() {
                    outcomes.push(
                        joined.unwrap_or_else(|e| Err(format!("the request task failed: {e}"))),
                    );
                }
            }
        }
        (Pace::Rate { per_s, seed }, length) => {
            let n = match length {
                Length::Requests(n) => n,
                Length::Duration(d) => (d.as_secs_f64() * per_s).ceil() as usize,
            };
            let start = tokio::time::Instant::now();
            for (i, at) in arrivals(n, per_s, seed).into_iter().enumerate() {
                tokio::time::sleep_until(start + at).await;
                spawn(&mut tasks, i, None);
            }
        }
    }
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
