//! The batching engine through a real scheduler and real expert-workers on
//! loopback: batch invariance of greedy tokens, the latent cache's size per
//! token, preemption, prefix reuse, cancellation freeing blocks, and a request
//! cancelled while its step waits for experts.

mod common;

use std::time::Duration;

use common::*;
use tessera_proto::internal::v1::SubmitRequest;
use tessera_scheduler::Config;
use tessera_scheduler::stats::EngineCounters;
use tokio::time::{Instant, sleep, timeout};

/// Text requests of mixed lengths to run beside the golden cases.
fn fillers(base: &[u32], n: usize) -> Vec<SubmitRequest> {
    (0..n)
        .map(|i| {
            // Different lengths and contents: a rotation of the base prompt.
            let len = 5 + 7 * i;
            let ids: Vec<u32> = base.iter().cycle().skip(3 * i).take(len).copied().collect();
            request(&format!("filler-{i}"), ids, Vec::new(), 6 + 5 * i as u32)
        })
        .collect()
}

/// Submits every request at once and reads every stream to its end.
async fn run_together(cluster: &Cluster, requests: Vec<SubmitRequest>) -> Vec<Vec<u32>> {
    let mut streams = Vec::new();
    for r in requests {
        streams.push(cluster.submit(r).await.unwrap());
    }
    let mut out = Vec::new();
    for mut s in streams {
        let (tokens, finished) = collect(&mut s).await;
        finished.unwrap();
        out.push(tokens);
    }
    out
}

/// Every golden case among 4 text requests of mixed lengths (8 at once): the
/// greedy tokens are the reference's, with and without overlap, with and without
/// chunked prefill; the fillers' tokens are the same in every configuration.
async fn batch_invariance(fixture: &str, cases: &[&str]) {
    let mut golden = Vec::new();
    for name in cases {
        golden.push(case_request(fixture, name).await);
    }
    let text = json_ids(&case(fixture, cases[0])["input_ids"]);
    let mut filler_tokens: Option<Vec<Vec<u32>>> = None;
    for (overlap, chunk) in [(true, 512), (false, 512), (true, 64), (false, 64)] {
        let cluster = Cluster::start(fixture, 2, |cfg: &mut Config| {
            cfg.engine.no_overlap = !overlap;
            cfg.engine.prefill_chunk = chunk;
        })
        .await;
        let mut requests: Vec<SubmitRequest> = golden.iter().map(|(r, _)| r.clone()).collect();
        let extra = fillers(&text, 8 - requests.len());
        requests.extend(extra);
        let got = run_together(&cluster, requests).await;
        for ((name, (_, want)), tokens) in cases.iter().zip(&golden).zip(&got) {
            assert_eq!(
                tokens, want,
                "{fixture} {name}: overlap {overlap}, chunk {chunk}: batched tokens differ from the reference"
            );
        }
        let fill = got[cases.len()..].to_vec();
        match &filler_tokens {
            None => filler_tokens = Some(fill),
            Some(first) => assert_eq!(
                &fill, first,
                "{fixture}: overlap {overlap}, chunk {chunk}: filler tokens changed with the configuration"
            ),
        }
        // The counters are published after the step that streamed the last token.
        let engine = wait_for_engine(&cluster, "every block released", |e| {
            e.pool.used_blocks == 0 && e.running == 0
        })
        .await;
        assert!(
            engine.max_step_sequences >= 2,
            "requests were batched: {engine:?}"
        );
        cluster.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_golden_cases_are_batch_invariant() {
    batch_invariance(
        "tiny-mha-softmax",
        &[
            "text_only",
            "single_640x480",
            "two_images_odd_sizes",
            "single_640x480_chunked",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_golden_cases_are_batch_invariant() {
    batch_invariance(
        "small-mla-softmax",
        &[
            "multi_turn",
            "single_1200x400",
            "system_role",
            "single_1200x400_chunked",
        ],
    )
    .await;
}

fn language_config(fixture: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixture_dir(fixture).join("config.json")).unwrap();
    let config: serde_json::Value = serde_json::from_str(&text).unwrap();
    config["language_config"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_stores_latents_for_mla_and_keys_and_values_for_mha() {
    let lc = language_config("small-mla-softmax");
    let layers = lc["num_hidden_layers"].as_u64().unwrap() as usize;
    let latent = lc["kv_lora_rank"].as_u64().unwrap() as usize;
    let rope = lc["qk_rope_head_dim"].as_u64().unwrap() as usize;
    let cluster = Cluster::start("small-mla-softmax", 1, |cfg: &mut Config| {
        cfg.engine.kv_cache_bytes = Some(1 << 20);
    })
    .await;
    let engine = cluster.stats.snapshot().engine;
    // f32: 4 bytes per value.
    assert_eq!(engine.kv_bytes_per_token, layers * (latent + rope) * 4);
    let per_block = engine.kv_bytes_per_token * engine.kv_block_size;
    assert_eq!(engine.pool.total_blocks, (1 << 20) / per_block);
    cluster.stop().await;

    let lc = language_config("tiny-mha-softmax");
    let layers = lc["num_hidden_layers"].as_u64().unwrap() as usize;
    let width = lc["hidden_size"].as_u64().unwrap() as usize; // heads × head_dim
    let cluster = Cluster::start("tiny-mha-softmax", 1, |_: &mut Config| {}).await;
    let engine = cluster.stats.snapshot().engine;
    assert_eq!(engine.kv_bytes_per_token, layers * 2 * width * 4);
    cluster.stop().await;
}

/// Polls the engine's counters until `done` holds.
async fn wait_for_engine(
    cluster: &Cluster,
    what: &str,
    done: impl Fn(&EngineCounters) -> bool,
) -> EngineCounters {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let engine = cluster.stats.snapshot().engine;
        if done(&engine) {
            return engine;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {engine:?}"
        );
        sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiny_cache_preempts_and_every_request_keeps_its_tokens() {
    let fixture = "tiny-mha-softmax";
    let text = json_ids(&case(fixture, "text_only")["input_ids"]);
    // 24 blocks of 16 tokens: each request below needs ≤ 9 blocks alone, 8 at once
    // need about 60, so decode runs out and sequences are preempted.
    let cluster = Cluster::start(fixture, 2, |cfg: &mut Config| {
        let per_token = 3 * 2 * 256 * 4;
        cfg.engine.kv_cache_bytes = Some(24 * 16 * per_token);
    })
    .await;
    let requests: Vec<SubmitRequest> = (0..8)
        .map(|i| {
            let ids: Vec<u32> = text.iter().cycle().skip(i).take(20 + i).copied().collect();
            request(&format!("p-{i}"), ids, Vec::new(), 100 + 5 * i as u32)
        })
        .collect();
    let mut alone = Vec::new();
    for r in &requests {
        let mut r = r.clone();
        r.request_id.push_str("-alone");
        alone.push(generate(&cluster, r).await.0);
    }
    assert_eq!(cluster.stats.snapshot().engine.preemptions, 0);
    let together = run_together(&cluster, requests).await;
    for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a, b, "request {i}: tokens changed under preemption");
    }
    let engine = wait_for_engine(&cluster, "every block released", |e| {
        e.pool.used_blocks == 0 && e.running == 0
    })
    .await;
    assert!(
        engine.preemptions > 0,
        "the cache was too small for all at once: {engine:?}"
    );

    // A request that could never fit is refused up front, and the next one runs.
    let too_big = request("too-big", text.clone(), Vec::new(), 24 * 16);
    let err = cluster.submit(too_big).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("--kv-cache-bytes"),
        "{}",
        err.message()
    );
    let (tokens, _) = generate(&cluster, request("after", text.clone(), Vec::new(), 4)).await;
    assert_eq!(tokens.len(), 4);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_question_about_the_same_image_prefills_only_its_new_tokens() {
    let fixture = "tiny-mha-softmax";
    let (first, _) = case_request(fixture, "single_640x480").await;
    // The same image and conversation with another question: the tail differs.
    let mut second = first.clone();
    second.request_id = "second".into();
    let n = second.input_ids.len();
    let changed = n - 6;
    for id in &mut second.input_ids[changed..n - 1] {
        *id = (*id + 17) % 3000;
    }
    let block = 16;
    let expected_reuse = changed / block * block;
    assert!(expected_reuse > 1000, "the image is in the shared prefix");

    let without = Cluster::start(fixture, 1, |cfg: &mut Config| {
        cfg.engine.no_prefix_cache = true;
    })
    .await;
    generate(&without, first.clone()).await;
    let (reference, _) = generate(&without, second.clone()).await;
    assert_eq!(without.stats.snapshot().engine.prefix_reused_tokens, 0);
    without.stop().await;

    let cluster = Cluster::start(fixture, 1, |_: &mut Config| {}).await;
    generate(&cluster, first).await;
    let before = wait_for_engine(&cluster, "the first request's end", |e| e.running == 0).await;
    let (tokens, _) = generate(&cluster, second).await;
    let after = wait_for_engine(&cluster, "the second request's end", |e| e.running == 0).await;
    assert_eq!(
        after.prefix_reused_tokens - before.prefix_reused_tokens,
        expected_reuse as u64
    );
    assert_eq!(
        after.prefill_tokens - before.prefill_tokens,
        (n - expected_reuse) as u64,
        "only the tokens after the shared blocks are prefilled"
    );
    assert!(after.pool.prefix_hit_blocks > before.pool.prefix_hit_blocks);
    assert_eq!(tokens, reference, "reused blocks give the same tokens");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_dropped_and_timed_out_streams_free_their_blocks() {
    let fixture = "tiny-mha-softmax";
    let text = json_ids(&case(fixture, "text_only")["input_ids"]);
    let cluster = Cluster::start(fixture, 1, |_: &mut Config| {}).await;

    // Dropped by the client.
    let mut stream = cluster
        .submit(request("dropped", text.clone(), Vec::new(), LONG))
        .await
        .unwrap();
    first_token(&mut stream).await;
    // The counters are published after the step that streamed the token.
    wait_for_engine(&cluster, "the running request's blocks", |e| {
        e.pool.used_blocks > 0 && e.running == 1
    })
    .await;
    drop(stream);
    wait_for_engine(&cluster, "the dropped stream's blocks", |e| {
        e.pool.used_blocks == 0 && e.running == 0
    })
    .await;

    // Cancelled by id.
    let mut stream = cluster
        .submit(request("cancelled", text.clone(), Vec::new(), LONG))
        .await
        .unwrap();
    first_token(&mut stream).await;
    assert!(cluster.cancel("cancelled").await);
    let (_, end) = collect(&mut stream).await;
    assert_eq!(end.unwrap_err().code(), tonic::Code::Cancelled);
    let engine = wait_for_engine(&cluster, "the cancelled request's blocks", |e| {
        e.pool.used_blocks == 0 && e.running == 0
    })
    .await;
    assert!(engine.cancelled >= 2, "{engine:?}");

    // Past its gRPC deadline.
    let mut timed = tonic::Request::new(request("timed", text.clone(), Vec::new(), LONG));
    timed.set_timeout(Duration::from_millis(300));
    let mut stream = timeout(DEADLINE, cluster.client.clone().submit(timed))
        .await
        .unwrap()
        .unwrap()
        .into_inner();
    let (_, end) = collect(&mut stream).await;
    let code = end.unwrap_err().code();
    assert!(
        matches!(code, tonic::Code::DeadlineExceeded | tonic::Code::Cancelled),
        "{code:?}"
    );
    wait_for_engine(&cluster, "the timed-out request's blocks", |e| {
        e.pool.used_blocks == 0 && e.running == 0 && e.waiting == 0
    })
    .await;
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_cancelled_while_its_step_waits_for_experts_ends_at_once() {
    let fixture = "tiny-mha-softmax";
    let case = case(fixture, "text_only");
    let text = json_ids(&case["input_ids"]);
    let want = json_ids(&case["greedy"]["new_token_ids"]);
    // No expert-worker yet: no placement, so the step's first MoE layer waits
    // (for up to ten minutes) for a live owner of its experts.
    let mut cluster = Cluster::start(fixture, 0, |cfg: &mut Config| {
        cfg.expert_wait_seconds = 600;
    })
    .await;
    let mut stream = cluster
        .submit(request("stuck", text.clone(), Vec::new(), 4))
        .await
        .unwrap();
    wait_for_engine(&cluster, "the request's step to start", |e| {
        e.running == 1 && e.pool.used_blocks > 0
    })
    .await;
    let cancelled_at = Instant::now();
    assert!(cluster.cancel("stuck").await);
    let (tokens, end) = collect(&mut stream).await;
    let took = cancelled_at.elapsed();
    assert!(tokens.is_empty(), "{tokens:?}");
    assert_eq!(end.unwrap_err().code(), tonic::Code::Cancelled);
    assert!(
        took < Duration::from_secs(1),
        "the step stopped waiting for experts {took:?} after the cancel"
    );
    wait_for_engine(&cluster, "the cancelled request's blocks", |e| {
        e.pool.used_blocks == 0 && e.running == 0
    })
    .await;

    // The next request runs once an expert-worker holds the experts.
    cluster.add_worker(fixture, 0).await;
    let (tokens, _) = generate(&cluster, request("next", text, Vec::new(), 16)).await;
    assert_eq!(tokens, want);
    cluster.stop().await;
}
