//! A scheduler dying mid-stream, with real schedulers of the fixture model: the
//! gateway resumes the request on another scheduler and the client's stream goes on
//! with the same greedy tokens as an undisturbed run.
//!
//! Two schedulers run in this process, each with its own expert-worker and
//! discovery; the gateway's discovery lists them by hand. The first one is reached
//! through a loopback proxy that holds back the scheduler's bytes after a few
//! tokens and then drops both connections at once: to the gateway that is a member
//! that died mid-stream (a cancelled server drains its streams gracefully instead).

#[allow(dead_code)] // each test binary uses a different subset of the helpers
mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use common::*;
use tessera_proto::v1::generate_stream_response::Event;
use tessera_proto::v1::{
    FinishReason, GenerateRequest, GenerateResponse, SamplingParams, StoppingParams,
};
use tessera_runtime::shutdown::CancellationToken;
use tessera_runtime::{Discovery, Member, MemoryDiscovery, Registration, Role};
use tessera_scheduler::Stats;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::timeout;

const FIXTURE: &str = "tiny-mha-softmax";
/// Tokens of each answer.
const TOKENS: u32 = 48;
/// Bytes of the scheduler's answer the proxy lets through before it holds the rest:
/// the HTTP/2 preface and the response headers (well under 200 bytes) and a few
/// one-token messages (about 20 bytes each), far from all 48.
const LET_THROUGH: usize = 320;

/// A scheduler and its expert-worker in this process, with their own discovery.
struct Scheduler {
    addr: SocketAddr,
    stats: Arc<Stats>,
    _task: tokio::task::JoinHandle<()>,
    stop: CancellationToken,
}

impl Scheduler {
    async fn start(name: &str) -> Self {
        let dir = fixture(FIXTURE);
        let discovery = Arc::new(MemoryDiscovery::new());
        let stop = CancellationToken::new();
        let mut worker = tessera_expert_worker::Config::new(&dir);
        worker.member.id = Some(format!("{name}-experts"));
        let worker = tessera_expert_worker::run(
            worker,
            TcpListener::bind("127.0.0.1:0").await.unwrap(),
            discovery.clone(),
            stop.clone(),
        );
        let mut cfg = tessera_scheduler::Config::new(&dir);
        cfg.member.id = Some(name.to_owned());
        cfg.member.grace_seconds = 1;
        cfg.engine.kv_cache_bytes = Some(64 << 20);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(Stats::default());
        let scheduler = tessera_scheduler::run_with_stats(
            cfg,
            listener,
            discovery.clone(),
            stop.clone(),
            stats.clone(),
        );
        let task = tokio::spawn(async move {
            let (w, s) = tokio::join!(worker, scheduler);
            w.unwrap();
            s.unwrap();
        });
        let mut members = discovery.subscribe();
        let registered = members.wait_for(|m| m.iter().any(|m| m.role == Role::Scheduler));
        timeout(DEADLINE, registered)
            .await
            .expect("the scheduler registers once loaded")
            .unwrap();
        Self {
            addr,
            stats,
            _task: task,
            stop,
        }
    }

    /// Registers it in the gateway's `discovery` as `id` at `address`.
    fn register(discovery: &MemoryDiscovery, id: &str, address: SocketAddr) -> Registration {
        let member = Member::new(Role::Scheduler, id, address.to_string());
        discovery.register(member).unwrap()
    }

    /// Polls its totals until it has finished `n` requests.
    async fn finished(&self, n: u64) -> tessera_scheduler::StatsSnapshot {
        let poll = async {
            loop {
                let snapshot = self.stats.snapshot();
                if snapshot.requests >= n {
                    return snapshot;
                }
                tokio::task::yield_now().await;
            }
        };
        timeout(DEADLINE, poll)
            .await
            .expect("the requests are counted")
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A loopback TCP proxy to one member that forwards the member's first
/// [`LET_THROUGH`] bytes, then holds the rest (saying so on `holding`) until
/// `kill`, which drops every connection and stops accepting.
struct Proxy {
    addr: SocketAddr,
    holding: watch::Receiver<bool>,
    kill: CancellationToken,
}

impl Proxy {
    async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let kill = CancellationToken::new();
        let (holding_tx, holding) = watch::channel(false);
        let holding_tx = Arc::new(holding_tx);
        let killed = kill.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    () = killed.cancelled() => return,
                };
                let (client, _) = accepted.unwrap();
                let (killed, holding_tx) = (killed.clone(), holding_tx.clone());
                tokio::spawn(async move {
                    let server = TcpStream::connect(target).await.unwrap();
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut server_read, mut server_write) = server.into_split();
                    let requests = tokio::io::copy(&mut client_read, &mut server_write);
                    let answers =
                        forward_then_hold(&mut server_read, &mut client_write, &holding_tx);
                    tokio::select! {
                        _ = async { tokio::join!(requests, answers) } => {}
                        () = killed.cancelled() => {}
                    }
                    // Both connections close here.
                });
            }
        });
        Self {
            addr,
            holding,
            kill,
        }
    }
}

/// Copies `from` to `to` up to [`LET_THROUGH`] bytes, then says it is holding and
/// reads no more.
async fn forward_then_hold(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    holding: &watch::Sender<bool>,
) {
    let mut left = LET_THROUGH;
    let mut buf = vec![0; 4096];
    while left > 0 {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n.min(left),
        };
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
        left -= n;
    }
    holding.send_replace(true);
    std::future::pending::<()>().await;
}

/// The greedy request of the test: 48 tokens, end-of-sequence ignored, with log
/// probabilities; `penalized` adds presence and frequency penalties (output tokens
/// only: a resumed request must count the tokens streamed before).
fn request(penalized: bool) -> GenerateRequest {
    let mut req = ask(vec![text("Tell me a long story about a lighthouse.")]);
    // Negative: the random fixture model repeats no token on its own, so reward
    // repeating output tokens to make the penalties matter.
    let penalty = if penalized { -2.0 } else { 0.0 };
    req.sampling = Some(SamplingParams {
        temperature: Some(0.0),
        presence_penalty: Some(penalty),
        frequency_penalty: Some(penalty),
        logprobs: Some(true),
        ..Default::default()
    });
    req.stopping = Some(StoppingParams {
        max_tokens: Some(TOKENS),
        ignore_eos: true,
        ..Default::default()
    });
    req
}

/// Streams `req` through `gateway` to its end: the deltas as one response.
async fn stream(gateway: SocketAddr, req: GenerateRequest) -> GenerateResponse {
    let mut client =
        tessera_proto::v1::tessera_client::TesseraClient::connect(format!("http://{gateway}"))
            .await
            .unwrap();
    let mut stream = client.generate_stream(req).await.unwrap().into_inner();
    let mut out = GenerateResponse::default();
    while let Some(message) = timeout(DEADLINE, stream.message()).await.unwrap().unwrap() {
        match message.event.unwrap() {
            Event::Delta(d) => {
                assert_eq!(out.finish_reason, 0, "a delta after finished");
                out.text.push_str(&d.text);
                out.token_ids.extend(d.token_ids);
                out.logprobs.extend(d.logprobs);
            }
            Event::Finished(f) => {
                out.finish_reason = f.finish_reason;
                out.usage = f.usage;
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_goes_on_with_the_same_greedy_tokens_when_its_scheduler_dies() {
    let (a, b) = tokio::join!(
        Scheduler::start("scheduler-a"),
        Scheduler::start("scheduler-b")
    );
    let discovery = MemoryDiscovery::new();
    let gateway = Gateway::fixture(FIXTURE, discovery.clone()).await;

    for (round, penalized) in [false, true].into_iter().enumerate() {
        let round = round as u64;
        // Undisturbed, on scheduler-b alone.
        let only_b = Scheduler::register(&discovery, "scheduler-b", b.addr);
        let undisturbed = stream(gateway.addr, request(penalized)).await;
        assert_eq!(undisturbed.token_ids.len(), TOKENS as usize);
        assert_eq!(undisturbed.finish_reason(), FinishReason::Length);
        let before = b.finished(2 * round + 1).await;
        drop(only_b);

        // On scheduler-a alone, behind the proxy, until its first tokens are through;
        // then scheduler-b joins and scheduler-a dies.
        let proxy = Proxy::start(a.addr).await;
        let a_listed = Scheduler::register(&discovery, "scheduler-a", proxy.addr);
        let streaming = tokio::spawn(stream(gateway.addr, request(penalized)));
        let mut holding = proxy.holding.clone();
        timeout(DEADLINE, holding.wait_for(|&h| h))
            .await
            .expect("scheduler-a streams")
            .unwrap();
        let b_listed = Scheduler::register(&discovery, "scheduler-b", b.addr);
        proxy.kill.cancel();
        let resumed = timeout(DEADLINE, streaming).await.unwrap().unwrap();

        assert_eq!(
            resumed.token_ids, undisturbed.token_ids,
            "penalized: {penalized}"
        );
        assert_eq!(resumed.text, undisturbed.text);
        assert_eq!(resumed.finish_reason(), FinishReason::Length);
        assert_eq!(resumed.usage, undisturbed.usage);
        let logprob_ids: Vec<u32> = resumed.logprobs.iter().map(|l| l.token_id).collect();
        assert_eq!(logprob_ids, undisturbed.token_ids);

        // scheduler-b ran the rest: the prompt and the k tokens scheduler-a streamed,
        // then 48 − k new ones, with 0 < k < 48.
        let after = b.finished(2 * round + 2).await;
        let prompt = u64::from(undisturbed.usage.unwrap().prompt_tokens);
        let k = after.prompt_tokens - before.prompt_tokens - prompt;
        assert!(0 < k && k < u64::from(TOKENS), "resumed after {k} tokens");
        assert_eq!(
            after.completion_tokens - before.completion_tokens,
            u64::from(TOKENS) - k
        );
        drop((a_listed, b_listed));
    }
}
