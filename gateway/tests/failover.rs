//! The gateway when members fail: a dead vision-worker or scheduler next to a live
//! one, a scheduler stream that breaks or ends without `finished` (the request
//! resumes on another scheduler), and the limits after which the client is told
//! UNAVAILABLE. Fake members on loopback; `scheduler_failover.rs` runs real
//! schedulers.

#[allow(dead_code)] // each test binary uses a different subset of the helpers
mod common;
#[allow(dead_code)]
mod fakes;

use common::*;
use fakes::{FakeScheduler, FakeVision, SchedulerScript, VisionScript};
use tessera_model::chat::ChatTokenizer;
use tessera_proto::internal::v1::StopReason;
use tessera_proto::v1::generate_stream_response::Event;
use tessera_proto::v1::{FinishReason, GenerateRequest, GenerateResponse};
use tessera_runtime::{Discovery, Member, MemoryDiscovery, Registration, Role};
use tonic::{Code, Status};

const FIXTURE: &str = "tiny-mha-softmax";

/// An address on loopback that nobody listens on (a member that died without
/// leaving discovery).
async fn dead_address() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    addr.to_string()
}

fn register(discovery: &MemoryDiscovery, role: Role, id: &str, address: String) -> Registration {
    discovery.register(Member::new(role, id, address)).unwrap()
}

/// Fake schedulers `scheduler-0`, `scheduler-1`, … with these scripts, a live fake
/// vision-worker and a gateway. A fresh gateway submits first to `scheduler-0`.
struct Cluster {
    gateway: Gateway,
    schedulers: Vec<FakeScheduler>,
    _members: Vec<Registration>,
}

async fn cluster(scripts: Vec<SchedulerScript>) -> Cluster {
    let discovery = MemoryDiscovery::new();
    let vision = FakeVision::new(&fixture(FIXTURE), VisionScript::Correct);
    let mut members = vec![register(
        &discovery,
        Role::VisionWorker,
        "vision-0",
        vision.serve().await.to_string(),
    )];
    let mut schedulers = Vec::new();
    for (i, script) in scripts.into_iter().enumerate() {
        let scheduler = FakeScheduler::new(script);
        let addr = scheduler.clone().serve().await;
        let id = format!("scheduler-{i}");
        members.push(register(&discovery, Role::Scheduler, &id, addr.to_string()));
        schedulers.push(scheduler);
    }
    Cluster {
        gateway: Gateway::fixture(FIXTURE, discovery).await,
        schedulers,
        _members: members,
    }
}

impl Cluster {
    fn submissions(&self, i: usize) -> Vec<fakes::Submitted> {
        self.schedulers[i].submitted.lock().unwrap().clone()
    }
}

/// Streams `req`: the concatenated deltas as one response, or the error that ended
/// the stream after them.
async fn stream(gateway: &Gateway, req: GenerateRequest) -> (GenerateResponse, Option<Status>) {
    let mut client = gateway.client().await;
    let mut stream = client.generate_stream(req).await.unwrap().into_inner();
    let mut out = GenerateResponse::default();
    loop {
        let message = match stream.message().await {
            Ok(Some(message)) => message,
            Ok(None) => return (out, None),
            Err(status) => return (out, Some(status)),
        };
        match message.event.unwrap() {
            Event::Delta(d) => {
                assert_eq!(out.finish_reason, 0, "a delta after finished");
                out.text.push_str(&d.text);
                out.token_ids.extend(d.token_ids);
            }
            Event::Finished(f) => {
                out.finish_reason = f.finish_reason;
                out.usage = f.usage;
            }
        }
    }
}

fn hello(max_tokens: u32) -> GenerateRequest {
    with_max_tokens(ask(vec![text("Hello there.")]), max_tokens)
}

fn broken() -> Status {
    Status::unknown("h2 protocol error: stream no longer needed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_requests_skip_a_dead_vision_worker() {
    let discovery = MemoryDiscovery::new();
    let vision = FakeVision::new(&fixture(FIXTURE), VisionScript::Correct);
    let scheduler = FakeScheduler::new(SchedulerScript::Tokens(
        vec![vec![5, 6]],
        StopReason::Length,
    ));
    let _members = [
        // Sorted first: a fresh gateway tries it first.
        register(
            &discovery,
            Role::VisionWorker,
            "vision-0",
            dead_address().await,
        ),
        register(
            &discovery,
            Role::VisionWorker,
            "vision-1",
            vision.clone().serve().await.to_string(),
        ),
        register(
            &discovery,
            Role::Scheduler,
            "scheduler-0",
            scheduler.clone().serve().await.to_string(),
        ),
    ];
    let gateway = Gateway::fixture(FIXTURE, discovery.clone()).await;
    let mut client = gateway.client().await;
    for i in 0..4 {
        let req = ask(vec![image(png(64 + i, 48)), text("What is this?")]);
        let answer = client.generate(req).await.unwrap().into_inner();
        assert_eq!(answer.token_ids, [5, 6], "request {i}");
    }
    assert_eq!(vision.calls.lock().unwrap().len(), 4);
    assert_eq!(scheduler.submitted.lock().unwrap().len(), 4);

    // Only the dead one left: UNAVAILABLE, naming it.
    drop(_members);
    let _dead = register(
        &discovery,
        Role::VisionWorker,
        "vision-0",
        dead_address().await,
    );
    let _scheduler = register(
        &discovery,
        Role::Scheduler,
        "scheduler-0",
        scheduler.clone().serve().await.to_string(),
    );
    let req = ask(vec![image(png(64, 48)), text("What is this?")]);
    let status = client.generate(req).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status
            .message()
            .contains("no vision-worker could serve the request (vision-0 failed"),
        "{status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vision_worker_refusing_the_image_is_not_retried() {
    let discovery = MemoryDiscovery::new();
    let bad = FakeVision::new(
        &fixture(FIXTURE),
        VisionScript::Fail(Status::invalid_argument("cannot decode")),
    );
    let good = FakeVision::new(&fixture(FIXTURE), VisionScript::Correct);
    let scheduler = FakeScheduler::new(SchedulerScript::Tokens(vec![vec![5]], StopReason::Length));
    let _members = [
        register(
            &discovery,
            Role::VisionWorker,
            "vision-0",
            bad.clone().serve().await.to_string(),
        ),
        register(
            &discovery,
            Role::VisionWorker,
            "vision-1",
            good.clone().serve().await.to_string(),
        ),
        register(
            &discovery,
            Role::Scheduler,
            "scheduler-0",
            scheduler.serve().await.to_string(),
        ),
    ];
    let gateway = Gateway::fixture(FIXTURE, discovery).await;
    let req = ask(vec![image(png(64, 48)), text("What is this?")]);
    let status = gateway.client().await.generate(req).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(bad.calls.lock().unwrap().len(), 1);
    assert!(good.calls.lock().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submit_to_a_dead_or_unavailable_scheduler_goes_to_another() {
    let discovery = MemoryDiscovery::new();
    let loading = FakeScheduler::new(SchedulerScript::Fail(Status::unavailable("still loading")));
    let live = FakeScheduler::new(SchedulerScript::Tokens(
        vec![vec![5, 6]],
        StopReason::Length,
    ));
    let _members = [
        register(
            &discovery,
            Role::Scheduler,
            "scheduler-0",
            dead_address().await,
        ),
        register(
            &discovery,
            Role::Scheduler,
            "scheduler-1",
            loading.clone().serve().await.to_string(),
        ),
        register(
            &discovery,
            Role::Scheduler,
            "scheduler-2",
            live.clone().serve().await.to_string(),
        ),
    ];
    let gateway = Gateway::fixture(FIXTURE, discovery).await;
    let mut client = gateway.client().await;
    for _ in 0..3 {
        let answer = client.generate(hello(2)).await.unwrap().into_inner();
        assert_eq!(answer.token_ids, [5, 6]);
        let (streamed, error) = stream(&gateway, hello(2)).await;
        assert!(error.is_none(), "{error:?}");
        assert_eq!(streamed.token_ids, [5, 6]);
    }
    assert_eq!(live.submitted.lock().unwrap().len(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_stream_resumes_on_another_scheduler_with_the_tokens_so_far() {
    let cluster = cluster(vec![
        SchedulerScript::Break(vec![vec![5, 6], vec![7]], broken()),
        SchedulerScript::Tokens(vec![vec![8, 9], vec![10]], StopReason::Length),
    ])
    .await;
    let mut req = hello(6);
    req.request_id = "resume-me".into();
    let (answer, error) = stream(&cluster.gateway, req).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(answer.token_ids, [5, 6, 7, 8, 9, 10]);
    assert_eq!(answer.finish_reason(), FinishReason::Length);
    let first = cluster.submissions(0);
    let second = cluster.submissions(1);
    assert_eq!((first.len(), second.len()), (1, 1));
    let (original, resumed) = (&first[0].1, &second[0].1);
    let usage = answer.usage.unwrap();
    assert_eq!(usage.prompt_tokens as usize, original.input_ids.len());
    assert_eq!(usage.completion_tokens, 6);

    // The resubmission: the prompt and the three tokens streamed, marked as resumed
    // output, three tokens still to generate, under the same scoped id.
    let mut expected = original.input_ids.clone();
    expected.extend([5, 6, 7]);
    assert_eq!(resumed.input_ids, expected);
    assert_eq!(resumed.resumed_tokens, 3);
    assert_eq!(resumed.stopping.as_ref().unwrap().max_tokens, 3);
    assert_eq!(resumed.request_id, original.request_id);
    assert!(resumed.request_id.starts_with("resume-me~"));
    assert_eq!(resumed.sampling, original.sampling);

    // A unary call resumes the same way.
    let whole = cluster.gateway.client().await.generate(hello(6)).await;
    let whole = whole.unwrap().into_inner();
    assert_eq!(whole.token_ids, [5, 6, 7, 8, 9, 10]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_ending_without_finished_resumes_on_another_scheduler() {
    let cluster = cluster(vec![
        SchedulerScript::Cut(vec![vec![5, 6]]),
        SchedulerScript::Tokens(vec![vec![7]], StopReason::Length),
    ])
    .await;
    let (answer, error) = stream(&cluster.gateway, hello(3)).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(answer.token_ids, [5, 6, 7]);
    assert_eq!(cluster.submissions(1)[0].1.resumed_tokens, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_complete_when_its_scheduler_failed_is_not_resubmitted() {
    let eos = ChatTokenizer::from_dir(&fixture(FIXTURE))
        .unwrap()
        .special()
        .eos;
    let cases = [
        // Every token of max_tokens streamed.
        (vec![5, 6, 7], 3, FinishReason::Length),
        // The end-of-sequence token streamed.
        (vec![5, eos], 8, FinishReason::Eos),
    ];
    for (tokens, max_tokens, reason) in cases {
        let cluster = cluster(vec![
            SchedulerScript::Break(vec![tokens.clone()], broken()),
            SchedulerScript::Tokens(vec![vec![99]], StopReason::Length),
        ])
        .await;
        let (answer, error) = stream(&cluster.gateway, hello(max_tokens)).await;
        assert!(error.is_none(), "{reason:?}: {error:?}");
        assert_eq!(answer.token_ids, tokens, "{reason:?}");
        assert_eq!(answer.finish_reason(), reason);
        assert!(cluster.submissions(1).is_empty(), "{reason:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_three_failovers_the_stream_fails_unavailable_naming_the_schedulers() {
    let breaking = || SchedulerScript::Break(vec![vec![5]], broken());
    let failing = cluster((0..5).map(|_| breaking()).collect()).await;
    let (answer, error) = stream(&failing.gateway, hello(16)).await;
    // Each of the four schedulers streamed one token before it broke.
    assert_eq!(answer.token_ids, [5, 5, 5, 5]);
    let status = error.expect("the stream fails");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status
            .message()
            .starts_with("no scheduler could serve the request ("),
        "{status:?}"
    );
    assert!(
        status.message().ends_with(
            " failed; the last: scheduler: Unknown: h2 protocol error: stream no longer needed)"
        ),
        "{status:?}"
    );
    // Four schedulers tried, each once, each named; the fifth never.
    let mut resumed = Vec::new();
    for i in 0..5 {
        let submitted = failing.submissions(i);
        let named = status.message().contains(&format!("scheduler-{i}"));
        assert_eq!(named, !submitted.is_empty(), "scheduler-{i}: {status:?}");
        resumed.extend(submitted.iter().map(|(_, s)| s.resumed_tokens));
    }
    resumed.sort_unstable();
    assert_eq!(resumed, [0, 1, 2, 3]);

    // The unary call fails the same way; a scheduler's final answer keeps its code.
    let status = failing
        .gateway
        .client()
        .await
        .generate(hello(16))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    // `scheduler-1`, resubmitted to, refuses with a final status.
    let refusing = cluster(vec![
        SchedulerScript::Break(vec![vec![5]], broken()),
        SchedulerScript::Fail(Status::failed_precondition("another model")),
    ])
    .await;
    let status = refusing
        .gateway
        .client()
        .await
        .generate(hello(16))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(refusing.submissions(1).len(), 1);
}
