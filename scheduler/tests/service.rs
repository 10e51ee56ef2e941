//! The scheduler service on loopback: a real scheduler, 0–2 real expert-workers
//! and a `MemoryDiscovery`; greedy tokens equal the reference fixtures, cancel
//! and dropped streams end requests early, bad requests are refused without
//! harm, a worker leaving mid-stream never hangs or changes tokens, and no
//! workers at all is UNAVAILABLE after the configured wait.

mod common;

use std::time::{Duration, Instant};

use common::{
    Cluster, DEADLINE, LONG, case, case_request, collect, first_token, generate, json_ids, request,
};
use tessera_proto::internal::v1::{CancelRequest, StopReason};
use tessera_runtime::Discovery;
use tokio::time::timeout;
use tonic::Code;

async fn greedy_cases_match_the_reference(fixture: &str, cases: &[&str]) {
    for n_workers in [1, 2] {
        let cluster = Cluster::start(fixture, n_workers, |_| {}).await;
        for name in cases {
            let (request, want) = case_request(fixture, name).await;
            let prompt_tokens = request.input_ids.len() as u32;
            let (tokens, finished) = generate(&cluster, request).await;
            assert_eq!(tokens, want, "{fixture}/{name} with {n_workers} worker(s)");
            assert_eq!(finished.reason, StopReason::Length as i32);
            assert_eq!(finished.prompt_tokens, prompt_tokens);
            assert_eq!(finished.completion_tokens, 16);
        }
        let stats = cluster.stats.snapshot();
        assert_eq!(stats.requests, cases.len() as u64);
        // The scheduler holds attention, gates, shared experts and lm_head, but no
        // routed expert: those tensors were never loaded into this process.
        assert!(stats.weight_tensors > 0);
        assert_eq!(
            stats.routed_expert_tensors, 0,
            "the scheduler loaded routed experts"
        );
        assert!(stats.expert_bytes > 0);
        let per = stats.expert_bytes_per_token_per_layer();
        // At least one hidden row (256 f32) each way per token per layer.
        assert!(per > 2.0 * 256.0 * 4.0, "{per} bytes per token per layer");
        println!("{fixture}, {n_workers} worker(s): {per:.0} expert bytes per token per layer");
        cluster.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_greedy_tokens_match_the_reference_with_one_and_two_workers() {
    greedy_cases_match_the_reference("tiny-mha-softmax", &["text_only", "two_images_odd_sizes"])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_greedy_tokens_match_the_reference_with_one_and_two_workers() {
    greedy_cases_match_the_reference("small-mla-softmax", &["system_role", "multi_turn"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_a_dropped_stream_end_a_long_request_early() {
    let cluster = Cluster::start("tiny-mha-softmax", 1, |_| {}).await;
    let ids = json_ids(&case("tiny-mha-softmax", "text_only")["input_ids"]);

    let mut stream = cluster
        .submit(request("long-1", ids.clone(), vec![], LONG))
        .await
        .unwrap();
    first_token(&mut stream).await;
    let mut client = cluster.client.clone();
    let found = client
        .cancel(CancelRequest {
            request_id: "long-1".into(),
        })
        .await
        .unwrap();
    assert!(found.into_inner().found);
    let (tokens, end) = collect(&mut stream).await;
    assert_eq!(end.unwrap_err().code(), Code::Cancelled);
    assert!(tokens.len() < LONG as usize - 1, "{} tokens", tokens.len());
    let again = client
        .cancel(CancelRequest {
            request_id: "long-1".into(),
        })
        .await
        .unwrap();
    assert!(!again.into_inner().found, "a finished request is not found");

    let before = cluster.stats.snapshot();
    let mut stream = cluster
        .submit(request("long-2", ids, vec![], LONG))
        .await
        .unwrap();
    first_token(&mut stream).await;
    drop(stream);
    let stopped = async {
        while cluster.stats.snapshot().requests == before.requests {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    timeout(DEADLINE, stopped)
        .await
        .expect("the dropped request stops");
    let done = cluster.stats.snapshot().completion_tokens - before.completion_tokens;
    assert!(done < u64::from(LONG) - 1, "{done} tokens");

    let (request, want) = case_request("tiny-mha-softmax", "text_only").await;
    assert_eq!(generate(&cluster, request).await.0, want);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_and_the_next_request_works() {
    let cluster = Cluster::start("tiny-mha-softmax", 1, |_| {}).await;
    let (good, want) = case_request("tiny-mha-softmax", "text_only").await;

    let mut bad = good.clone();
    bad.input_ids[2] = 3072;
    let status = cluster.submit(bad).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("input_ids[2]"), "{status:?}");

    let mut bad = good.clone();
    bad.stopping.as_mut().unwrap().max_tokens = 0;
    let status = cluster.submit(bad).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    let mut bad = good.clone();
    bad.model_fingerprint = "0123456789abcdef".into();
    let status = cluster.submit(bad).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");

    let mut running = cluster
        .submit(request("dup", good.input_ids.clone(), vec![], LONG))
        .await
        .unwrap();
    first_token(&mut running).await;
    let status = cluster
        .submit(request("dup", good.input_ids.clone(), vec![], 4))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("already running"), "{status:?}");
    drop(running);

    assert_eq!(generate(&cluster, good).await.0, want);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_is_resource_exhausted() {
    // One sequence runs at a time, so the second request waits and the third finds
    // the queue full, however fast the first one's steps are.
    let cluster = Cluster::start("tiny-mha-softmax", 1, |c| {
        c.max_waiting = 1;
        c.engine.max_seqs = 1;
    })
    .await;
    let ids = json_ids(&case("tiny-mha-softmax", "text_only")["input_ids"]);
    let mut accepted = Vec::new();
    let mut refused = Vec::new();
    for i in 0..3 {
        match cluster
            .submit(request(&format!("q{i}"), ids.clone(), vec![], LONG))
            .await
        {
            Ok(stream) => accepted.push(stream),
            Err(status) => refused.push(status),
        }
    }
    // One runs, one waits in the queue of one.
    assert!(!refused.is_empty(), "3 requests with a queue of 1");
    for status in &refused {
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(
            status.message(),
            "scheduler queue is full (1 requests); retry later"
        );
    }
    drop(accepted);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_shut_down_mid_stream_never_hangs_or_changes_tokens() {
    const TOKENS: u32 = 100;
    let mut cluster = Cluster::start("tiny-mha-softmax", 2, |_| {}).await;
    let (good, want) = case_request("tiny-mha-softmax", "text_only").await;
    let long = request("long", good.input_ids.clone(), vec![], TOKENS);
    // The reference: the same request while both workers serve.
    let (reference, _) = generate(&cluster, long.clone()).await;
    assert_eq!(reference[..want.len()], want);

    let mut stream = cluster.submit(long.clone()).await.unwrap();
    first_token(&mut stream).await;
    let leaving = cluster.workers.remove(0);
    leaving.shutdown.cancel();
    let started = std::time::Instant::now();
    let ((tokens, end), stopped) = tokio::join!(collect(&mut stream), async {
        let stopped = timeout(DEADLINE, leaving.task).await;
        (stopped.expect("worker stops").unwrap(), started.elapsed())
    });
    stopped.0.unwrap();
    println!(
        "worker stopped after {:?}, the stream ended after {:?} with {} tokens",
        stopped.1,
        started.elapsed(),
        tokens.len() + 1
    );
    match end {
        Ok(finished) => {
            assert_eq!(finished.reason, StopReason::Length as i32);
            assert_eq!(
                tokens,
                reference[1..],
                "the same tokens after a worker left"
            );
        }
        Err(status) => {
            println!("the request failed after the worker left: {status:?}");
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            assert_eq!(tokens, reference[1..tokens.len() + 1]);
        }
    }

    // The remaining worker takes every expert; requests keep their tokens.
    let mut placements = cluster.discovery.subscribe_placement();
    let moved = placements.wait_for(|p| p.as_ref().is_some_and(|p| p.workers().eq(["worker-1"])));
    timeout(DEADLINE, moved)
        .await
        .expect("the experts move")
        .unwrap();
    assert_eq!(generate(&cluster, long).await.0, reference);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_expert_workers_a_request_fails_unavailable_after_the_wait() {
    let cluster = Cluster::start("tiny-mha-softmax", 0, |c| c.expert_wait_seconds = 1).await;
    let (good, _) = case_request("tiny-mha-softmax", "text_only").await;
    let started = Instant::now();
    let mut stream = cluster.submit(good).await.unwrap();
    let (tokens, end) = collect(&mut stream).await;
    let status = end.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("layer 1"), "{status:?}");
    assert!(tokens.is_empty());
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert!(started.elapsed() < Duration::from_secs(30));
    cluster.stop().await;
}
