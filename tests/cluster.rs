//! End to end through the public gRPC API: a whole cluster on loopback with 1, 2
//! and 3 expert-workers gives, for every golden case, the reference's greedy
//! tokens (which `tessera generate` reproduces, see `cli_generate.rs`), and
//! `GenerateStream`'s deltas concatenate to `Generate`'s text.

use std::sync::Arc;

use tessera_model::chat::ChatTokenizer;
use tessera_proto::v1::{ClusterStatusRequest, FinishReason, MemberRole, ModelInfoRequest};
use tessera_runtime::{Discovery, MemoryDiscovery};

#[allow(dead_code)]
mod common;

#[allow(dead_code)]
#[path = "common/cluster.rs"]
mod cluster;

use cluster::{Cluster, case_request, generate, stream};
use common::{fixture_dir, json_ids};

const NEW_TOKENS: u32 = 16;

fn cases(fixture: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(fixture_dir(fixture).join("cases.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["cases"].as_array().unwrap().clone()
}

/// Every case of `fixture` through clusters of 1, 2 and 3 expert-workers.
async fn every_case_through_the_cluster(fixture: &str) {
    let dir = fixture_dir(fixture);
    let tokenizer = ChatTokenizer::from_dir(&dir).unwrap();
    for n in 1..=3 {
        let discovery: Arc<dyn Discovery> = Arc::new(MemoryDiscovery::new());
        let mut cluster = Cluster::start(&dir, n, || discovery.clone()).await;

        let status = cluster
            .client
            .cluster_status(ClusterStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        let experts: Vec<usize> = status
            .members
            .iter()
            .filter(|m| m.role() == MemberRole::ExpertWorker)
            .map(|m| m.experts.iter().map(|l| l.experts.len()).sum())
            .collect();
        assert_eq!(experts.len(), n, "{status:?}");
        assert!(status.placement_version >= 1);

        for case in cases(fixture) {
            let name = case["name"].as_str().unwrap();
            let want = json_ids(&case["greedy"]["new_token_ids"]);
            let request = case_request(&dir, &case, NEW_TOKENS);
            let unary = generate(&mut cluster.client, request.clone())
                .await
                .unwrap_or_else(|s| panic!("{fixture}/{name} with {n} workers: {s:?}"));
            assert_eq!(
                unary.token_ids, want,
                "{fixture}/{name}, {n} expert-workers"
            );
            assert_eq!(unary.finish_reason(), FinishReason::Length);
            let usage = unary.usage.unwrap();
            assert_eq!(
                usage.prompt_tokens as usize,
                json_ids(&case["input_ids"]).len()
            );
            assert_eq!(usage.completion_tokens, NEW_TOKENS);
            let image_tokens: u32 = json_ids(&case["num_image_tokens"]).iter().sum();
            assert_eq!(usage.image_tokens, image_tokens, "{fixture}/{name}");
            // The text is the tokens' text, as `tessera generate` prints it.
            assert_eq!(unary.text, tokenizer.decode(&want, false).unwrap());

            let streamed = stream(&mut cluster.client, request).await.unwrap();
            assert_eq!(streamed.token_ids, want, "{fixture}/{name} streamed");
            assert_eq!(
                streamed.text, unary.text,
                "{fixture}/{name}: deltas concatenate to the text"
            );
            assert_eq!(streamed.finished.usage, Some(usage));
            assert_eq!(streamed.finished.images, unary.images);
            println!(
                "{fixture}/{name}: {n} expert-worker(s): {} tokens equal",
                want.len()
            );
        }
        cluster.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_mha_cases_through_1_2_and_3_expert_workers() {
    every_case_through_the_cluster("tiny-mha-softmax").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_mla_cases_through_1_2_and_3_expert_workers() {
    every_case_through_the_cluster("small-mla-softmax").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_info_and_bad_requests_leave_the_cluster_serving() {
    let dir = fixture_dir("tiny-mha-softmax");
    let discovery: Arc<dyn Discovery> = Arc::new(MemoryDiscovery::new());
    let mut cluster = Cluster::start(&dir, 2, || discovery.clone()).await;
    let info = cluster
        .client
        .model_info(ModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.fingerprint, tessera_model::fingerprint(&dir).unwrap());
    assert_eq!(info.num_routed_experts, 16);

    let case = common::case("tiny-mha-softmax", "text_only");
    let mut bad = case_request(&dir, &case, NEW_TOKENS);
    bad.messages.clear();
    let err = generate(&mut cluster.client, bad).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");

    let mut too_long = case_request(&dir, &case, NEW_TOKENS);
    too_long.stopping.as_mut().unwrap().max_tokens = Some(10_000_000);
    let err = generate(&mut cluster.client, too_long).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");

    // A member loading another model refuses to join at start.
    let other = fixture_dir("small-mla-softmax");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let refused = tessera_expert_worker::run(
        tessera_expert_worker::Config::new(&other),
        listener,
        discovery.clone(),
        tessera_runtime::CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(refused.to_string().contains("same snapshot"), "{refused}");

    let ok = generate(&mut cluster.client, case_request(&dir, &case, NEW_TOKENS))
        .await
        .unwrap();
    assert_eq!(ok.token_ids, json_ids(&case["greedy"]["new_token_ids"]));
    cluster.stop().await;
}
