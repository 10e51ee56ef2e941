//! Load for failover tests: waves of concurrent greedy streams through the public
//! API, each timed token by token and checked against an undisturbed run, and
//! waiting on the number of tokens streamed rather than on the clock.
//! Include it with `#[path = "common/load.rs"] mod load;` next to `mod common;` and
//! `#[path = "common/cluster.rs"] mod cluster;`.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tessera_proto::v1::generate_stream_response::Event;
use tessera_proto::v1::tessera_client::TesseraClient;
use tessera_proto::v1::{self, GenerateRequest, part};
use tonic::transport::Channel;

use crate::cluster::{self, DEADLINE};
use crate::common::{case, fixture_dir};

/// Polls `check` every 20 ms until it gives a value; panics after [`DEADLINE`].
pub async fn poll<T, F: Future<Output = Option<T>>>(what: &str, mut check: impl FnMut() -> F) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A text-only greedy request of `max_tokens` (end of sequence ignored).
pub fn text_request(i: usize, max_tokens: u32) -> GenerateRequest {
    let text = format!("Story {i}: tell me about lighthouse number {i} and its keeper.");
    GenerateRequest {
        messages: vec![v1::Message {
            role: v1::Role::User as i32,
            parts: vec![v1::Part {
                kind: Some(part::Kind::Text(text)),
            }],
        }],
        stopping: Some(v1::StoppingParams {
            max_tokens: Some(max_tokens),
            stop: Vec::new(),
            ignore_eos: true,
        }),
        ..Default::default()
    }
}

/// 16 distinct greedy requests: four with images (the fixture's cases), the rest text.
pub fn workload(max_tokens: u32, images: bool) -> Vec<GenerateRequest> {
    let fixture = fixture_dir("tiny-mha-softmax");
    (0..16)
        .map(|i| match i {
            0 | 4 if images => cluster::case_request(
                &fixture,
                &case("tiny-mha-softmax", "single_640x480"),
                max_tokens,
            ),
            8 | 12 if images => cluster::case_request(
                &fixture,
                &case("tiny-mha-softmax", "two_images_odd_sizes"),
                max_tokens,
            ),
            _ => text_request(i, max_tokens),
        })
        .collect()
}

/// One streamed answer and the longest wait between two of its tokens.
pub struct Timed {
    pub token_ids: Vec<u32>,
    pub longest_gap: Duration,
}

/// Streams `request`, counting every token into `progress`.
pub async fn timed_stream(
    mut client: TesseraClient<Channel>,
    request: GenerateRequest,
    progress: Arc<AtomicUsize>,
) -> Result<Timed, tonic::Status> {
    let mut stream = client.generate_stream(request).await?.into_inner();
    let (mut token_ids, mut last, mut longest_gap) = (Vec::new(), None::<Instant>, Duration::ZERO);
    let mut finished = false;
    while let Some(message) = stream.message().await? {
        match message.event {
            Some(Event::Delta(d)) if !d.token_ids.is_empty() => {
                let now = Instant::now();
                if let Some(last) = last {
                    longest_gap = longest_gap.max(now - last);
                }
                last = Some(now);
                progress.fetch_add(d.token_ids.len(), Ordering::Relaxed);
                token_ids.extend(d.token_ids);
            }
            Some(Event::Delta(_)) => {}
            Some(Event::Finished(_)) => finished = true,
            None => panic!("a stream message without an event"),
        }
    }
    assert!(finished, "the stream ends with `finished`");
    Ok(Timed {
        token_ids,
        longest_gap,
    })
}

/// Runs every request of `requests` at once; the answers in order.
pub async fn wave(
    client: &TesseraClient<Channel>,
    requests: &[GenerateRequest],
    progress: &Arc<AtomicUsize>,
) -> Vec<Result<Timed, tonic::Status>> {
    let calls: Vec<_> = requests
        .iter()
        .map(|r| tokio::spawn(timed_stream(client.clone(), r.clone(), progress.clone())))
        .collect();
    let mut out = Vec::new();
    for call in calls {
        out.push(call.await.unwrap());
    }
    out
}

/// What the load saw while something happened to the cluster.
#[derive(Default)]
pub struct Outcome {
    pub answered: usize,
    pub failed: Vec<String>,
    pub changed: usize,
    pub longest_gap: Duration,
}

/// Runs waves of `requests` until `done` (and one more after it), checking each
/// answer against `reference`.
pub async fn load_until(
    client: &TesseraClient<Channel>,
    requests: &[GenerateRequest],
    reference: &[Vec<u32>],
    progress: &Arc<AtomicUsize>,
    done: &tessera_runtime::CancellationToken,
) -> Outcome {
    let mut outcome = Outcome::default();
    let mut last_wave = false;
    loop {
        let was_done = done.is_cancelled();
        for (i, answer) in wave(client, requests, progress)
            .await
            .into_iter()
            .enumerate()
        {
            match answer {
                Ok(timed) => {
                    outcome.answered += 1;
                    outcome.longest_gap = outcome.longest_gap.max(timed.longest_gap);
                    if timed.token_ids != reference[i] {
                        outcome.changed += 1;
                        eprintln!("request {i} changed: {:?}", timed.token_ids);
                    }
                }
                Err(status) => outcome.failed.push(format!("request {i}: {status:?}")),
            }
        }
        if last_wave {
            return outcome;
        }
        last_wave = was_done;
    }
}

/// Waits until `progress` has grown by `tokens` since `from`.
pub async fn after_tokens(progress: &AtomicUsize, from: usize, tokens: usize) {
    poll(&format!("{tokens} more tokens are streamed"), || async {
        (progress.load(Ordering::Relaxed) >= from + tokens).then_some(())
    })
    .await;
}

/// The token ids of every request of `requests`, run at once on an undisturbed
/// cluster: the reference the disturbed runs are checked against.
pub async fn undisturbed(
    client: &TesseraClient<Channel>,
    requests: &[GenerateRequest],
    progress: &Arc<AtomicUsize>,
) -> Vec<Vec<u32>> {
    wave(client, requests, progress)
        .await
        .into_iter()
        .map(|r| r.expect("the undisturbed run succeeds").token_ids)
        .collect()
}
