//! The gateway between a fake vision-worker and a fake scheduler: what it submits
//! for the fixture cases, what it answers (unary and streamed), stop strings, EOS,
//! groundings, upstream errors and cancellation.

#[allow(dead_code)] // each test binary uses a different subset of the helpers
mod common;
#[allow(dead_code)]
mod fakes;

use common::*;
use fakes::{FakeScheduler, FakeVision, SchedulerScript, VisionScript};
use tessera_model::chat::ChatTokenizer;
use tessera_proto::internal::v1::StopReason;
use tessera_proto::v1::{
    FinishReason, GenerateRequest, GenerateResponse, ImageTiling, StoppingParams,
    generate_stream_response::Event,
};
use tessera_runtime::{MemoryDiscovery, Registration};
use tonic::Code;

const FIXTURE: &str = "tiny-mha-softmax";

/// A gateway with the given fakes registered.
struct Cluster {
    gateway: Gateway,
    vision: FakeVision,
    scheduler: FakeScheduler,
    _members: Vec<Registration>,
}

async fn cluster(vision: VisionScript, scheduler: SchedulerScript) -> Cluster {
    let discovery = MemoryDiscovery::new();
    let vision = FakeVision::new(&fixture(FIXTURE), vision);
    let scheduler = FakeScheduler::new(scheduler);
    let members = fakes::register(&discovery, &vision, &scheduler).await;
    Cluster {
        gateway: Gateway::fixture(FIXTURE, discovery).await,
        vision,
        scheduler,
        _members: members,
    }
}

fn tokenizer() -> ChatTokenizer {
    ChatTokenizer::from_dir(&fixture(FIXTURE)).unwrap()
}

/// Streams `req` and returns the concatenated deltas as one response.
async fn stream(cluster: &Cluster, req: GenerateRequest) -> GenerateResponse {
    let mut client = cluster.gateway.client().await;
    let mut stream = client.generate_stream(req).await.unwrap().into_inner();
    let mut out = GenerateResponse::default();
    while let Some(message) = stream.message().await.unwrap() {
        out.request_id = message.request_id;
        match message.event.unwrap() {
            Event::Delta(d) => {
                assert!(out.finish_reason == 0, "a delta after finished");
                out.text.push_str(&d.text);
                out.token_ids.extend(d.token_ids);
            }
            Event::Finished(f) => {
                out.finish_reason = f.finish_reason;
                out.usage = f.usage;
                out.groundings = f.groundings;
                out.images = f.images;
            }
        }
    }
    assert_ne!(out.finish_reason, 0, "the stream ended without finished");
    out
}

/// The greedy ids of a case in batches of 3, ended by `reason`.
fn batches(ids: &[u32], reason: StopReason) -> SchedulerScript {
    SchedulerScript::Tokens(ids.chunks(3).map(<[u32]>::to_vec).collect(), reason)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fixture_case_is_submitted_and_answered_like_the_reference() {
    let case = case(FIXTURE, "single_640x480");
    let greedy = ids(&case["greedy"]["new_token_ids"]);
    let cluster = cluster(VisionScript::Correct, batches(&greedy, StopReason::Length)).await;
    let mut req = with_max_tokens(case_request(FIXTURE, &case), 16);
    req.request_id = "case-1".into();

    let whole = cluster
        .gateway
        .client()
        .await
        .generate(req.clone())
        .await
        .unwrap();
    let whole = whole.into_inner();
    assert_eq!(whole.request_id, "case-1");
    assert_eq!(whole.token_ids, greedy);
    assert_eq!(whole.text, case["greedy"]["text"].as_str().unwrap());
    assert_eq!(whole.finish_reason(), FinishReason::Length);
    let usage = whole.usage.unwrap();
    assert_eq!((usage.prompt_tokens, usage.image_tokens), (1038, 1023));
    assert_eq!(usage.completion_tokens, 16);
    let tiling = ImageTiling {
        width: 640,
        height: 480,
        tiles_x: 2,
        tiles_y: 2,
        tokens: 1023,
    };
    assert_eq!(whole.images, [tiling]);
    assert!(whole.groundings.is_empty());

    // What the scheduler was sent: the reference prompt, the image run, the defaults.
    let (meta_id, submitted) = cluster.scheduler.submitted.lock().unwrap()[0].clone();
    // The client's id, scoped to this request inside the cluster.
    let (client_id, suffix) = submitted.request_id.split_once('~').unwrap();
    assert_eq!(client_id, "case-1");
    assert_eq!(suffix.len(), 12);
    assert_eq!(meta_id.as_deref(), Some(submitted.request_id.as_str()));
    assert_eq!(submitted.input_ids, ids(&case["input_ids"]));
    assert_eq!(submitted.image_runs.len(), 1);
    let run = &submitted.image_runs[0];
    assert_eq!((run.start, run.len), (4, 1023));
    assert_eq!(run.embeddings.as_ref().unwrap().shape, [1023, 256]);
    let fingerprint = tessera_model::fingerprint(&fixture(FIXTURE)).unwrap();
    assert_eq!(submitted.model_fingerprint, fingerprint);
    let sampling = submitted.sampling.unwrap();
    assert_eq!(
        (sampling.temperature, sampling.top_p, sampling.top_k),
        (0.0, 1.0, 0)
    );
    assert_eq!(submitted.stopping.unwrap().max_tokens, 16);
    let vision_calls = cluster.vision.calls.lock().unwrap().clone();
    assert_eq!(vision_calls.len(), 1);
    assert_eq!(vision_calls[0].model_fingerprint, fingerprint);

    // Streamed, the deltas concatenate to the same answer.
    let streamed = stream(&cluster, req).await;
    assert_eq!(streamed, whole);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_only_requests_skip_the_vision_worker_and_get_the_default_max_tokens() {
    let case = case(FIXTURE, "text_only");
    let greedy = ids(&case["greedy"]["new_token_ids"]);
    let cluster = cluster(VisionScript::Correct, batches(&greedy, StopReason::Length)).await;
    let whole = cluster
        .gateway
        .client()
        .await
        .generate(case_request(FIXTURE, &case))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(whole.text, case["greedy"]["text"].as_str().unwrap());
    assert_eq!(whole.request_id.len(), 32, "a server-chosen id");
    assert!(whole.images.is_empty());
    assert!(cluster.vision.calls.lock().unwrap().is_empty());
    let (_, submitted) = cluster.scheduler.submitted.lock().unwrap()[0].clone();
    assert_eq!(submitted.input_ids, ids(&case["input_ids"]));
    assert!(submitted.image_runs.is_empty());
    assert_eq!(submitted.stopping.unwrap().max_tokens, 512);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_cut_the_answer_and_a_final_eos_is_not_text() {
    let tok = tokenizer();
    let answer = "Il fait très beau 中文 today. STOP here";
    let all = tok.encode(answer).unwrap();
    // The scheduler stops after the token that completes the stop string.
    let upto = (1..=all.len())
        .find(|&k| tok.decode(&all[..k], false).unwrap().contains(" STOP"))
        .unwrap();
    let cluster = cluster(
        VisionScript::Correct,
        batches(&all[..upto], StopReason::Stop),
    )
    .await;
    let req = GenerateRequest {
        request_id: "stop-1".into(),
        stopping: Some(StoppingParams {
            stop: vec![" STOP".into(), "never".into()],
            ..Default::default()
        }),
        ..ask(vec![text("Say something.")])
    };
    let whole = cluster
        .gateway
        .client()
        .await
        .generate(req.clone())
        .await
        .unwrap();
    let whole = whole.into_inner();
    assert_eq!(whole.text, "Il fait très beau 中文 today.");
    assert_eq!(whole.finish_reason(), FinishReason::Stop);
    assert_eq!(whole.token_ids, &all[..upto]);
    assert_eq!(stream(&cluster, req).await, whole);
    let stopping = cluster.scheduler.submitted.lock().unwrap()[0]
        .1
        .stopping
        .clone();
    assert_eq!(stopping.unwrap().stop, [" STOP", "never"]);

    let eos = tok.special().eos;
    let with_eos: Vec<u32> = all.iter().copied().chain([eos]).collect();
    let cluster2 = cluster_with(batches(&with_eos, StopReason::Eos)).await;
    let whole = cluster2
        .gateway
        .client()
        .await
        .generate(ask(vec![text("Hi")]))
        .await
        .unwrap();
    let whole = whole.into_inner();
    assert_eq!(whole.text, tok.decode(&all, false).unwrap());
    assert_eq!(whole.token_ids, with_eos);
    assert_eq!(whole.finish_reason(), FinishReason::Eos);
    assert_eq!(
        stream(&cluster2, ask(vec![text("Hi")])).await.text,
        whole.text
    );
}

async fn cluster_with(scheduler: SchedulerScript) -> Cluster {
    cluster(VisionScript::Correct, scheduler).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groundings_are_in_pixels_of_the_last_image() {
    let tok = tokenizer();
    let answer = "<|ref|>the cat<|/ref|><|det|>[[0, 0, 999, 999], [500, 250, 999, 500]]<|/det|>";
    let cluster = cluster_with(batches(&tok.encode(answer).unwrap(), StopReason::Length)).await;
    let req = ask(vec![
        image(png(518, 293)),
        text("and"),
        image(png(384, 384)),
        text("Where is the cat?"),
    ]);
    let whole = cluster
        .gateway
        .client()
        .await
        .generate(req.clone())
        .await
        .unwrap();
    let whole = whole.into_inner();
    assert_eq!(whole.text, answer);
    assert_eq!(whole.groundings.len(), 1);
    let g = &whole.groundings[0];
    assert_eq!((g.label.as_str(), g.image_index), ("the cat", 1));
    let boxes: Vec<[u32; 4]> = g.boxes.iter().map(|b| [b.x1, b.y1, b.x2, b.y2]).collect();
    assert_eq!(boxes, [[0, 0, 384, 384], [192, 96, 384, 192]]);
    let tilings: Vec<(u32, u32, u32)> = whole
        .images
        .iter()
        .map(|i| (i.tiles_x, i.tiles_y, i.tokens))
        .collect();
    assert_eq!(tilings, [(2, 1, 617), (1, 1, 421)]);
    assert_eq!(stream(&cluster, req).await.groundings, whole.groundings);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_errors_keep_their_code_and_a_wrong_encoding_is_internal() {
    let busy = tonic::Status::resource_exhausted("queue full");
    let failing = cluster_with(SchedulerScript::Fail(busy)).await;
    let status = failing
        .gateway
        .client()
        .await
        .generate(ask(vec![text("Hi")]))
        .await;
    let status = status.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.message().contains("queue full"), "{status:?}");

    let with_image = || ask(vec![image(png(640, 480)), text("What?")]);
    let bad = tonic::Status::invalid_argument("cannot decode the PNG image");
    let ok = batches(&[5, 6], StopReason::Length);
    let refusing = cluster(VisionScript::Fail(bad), ok.clone()).await;
    let status = refusing
        .gateway
        .client()
        .await
        .generate(with_image())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    let wrong = cluster(VisionScript::WrongTiling, ok).await;
    let status = wrong
        .gateway
        .client()
        .await
        .generate(with_image())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert!(wrong.scheduler.submitted.lock().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_stream_cancels_the_request_on_the_scheduler() {
    let cluster = cluster_with(SchedulerScript::Hang(vec![5, 6, 7])).await;
    let mut client = cluster.gateway.client().await;
    let mut req = ask(vec![text("Tell me a long story.")]);
    req.request_id = "drop-me".into();
    let mut stream = client.generate_stream(req).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    match first.event.unwrap() {
        Event::Delta(d) => assert_eq!(d.token_ids, [5, 6, 7]),
        Event::Finished(_) => panic!("the hanging request finished"),
    }
    drop(stream);

    let mut cancelled = cluster.scheduler.cancelled.subscribe();
    tokio::time::timeout(
        DEADLINE,
        cancelled.wait_for(|ids| ids.iter().any(|i| i.starts_with("drop-me~"))),
    )
    .await
    .expect("Scheduler.Cancel is sent in time")
    .unwrap();
    let mut abandoned = cluster.scheduler.abandoned.subscribe();
    tokio::time::timeout(DEADLINE, abandoned.wait_for(|&n| n == 1))
        .await
        .expect("the scheduler stream is dropped in time")
        .unwrap();
}

/// Two clients that choose the same request id both get their answers: inside the
/// cluster each request runs under its own id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_may_choose_the_same_request_id() {
    let case = case(FIXTURE, "text_only");
    let greedy = ids(&case["greedy"]["new_token_ids"]);
    let cluster = cluster(VisionScript::Correct, batches(&greedy, StopReason::Length)).await;
    let mut first = cluster.gateway.client().await;
    let mut second = cluster.gateway.client().await;
    let mut req = case_request(FIXTURE, &case);
    req.request_id = "same-id".into();
    let (a, b) = tokio::join!(first.generate(req.clone()), second.generate(req));
    let (a, b) = (a.unwrap().into_inner(), b.unwrap().into_inner());
    assert_eq!(
        (a.request_id.as_str(), b.request_id.as_str()),
        ("same-id", "same-id")
    );
    let submitted = cluster.scheduler.submitted.lock().unwrap();
    let ids: Vec<&str> = submitted
        .iter()
        .map(|(_, s)| s.request_id.as_str())
        .collect();
    assert_eq!(ids.len(), 2);
    assert!(ids.iter().all(|id| id.starts_with("same-id~")), "{ids:?}");
    assert_ne!(ids[0], ids[1], "{ids:?}");
}
