//! A real gateway on 127.0.0.1:0 with no other member: every bad request is
//! INVALID_ARGUMENT before any upstream call and the gateway keeps serving; good
//! requests without the member they need are UNAVAILABLE; ModelInfo, ClusterStatus,
//! health and shutdown.

#[allow(dead_code)] // each test binary uses a different subset of the helpers
mod common;

use common::*;
use tessera_gateway::Config;
use tessera_proto::v1::{
    ClusterStatusRequest, GenerateRequest, MemberRole, ModelInfoRequest, Role, SamplingParams,
    StoppingParams,
};
use tessera_runtime::{Discovery, MemoryDiscovery};
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const FIXTURE: &str = "tiny-mha-softmax";

/// A gateway allowing at most 2 images of at most 100 000 pixels each.
async fn strict_gateway() -> Gateway {
    let cfg = Config {
        max_images: 2,
        max_image_pixels: 100_000,
        ..Config::new(fixture(FIXTURE))
    };
    Gateway::start(cfg, MemoryDiscovery::new()).await
}

fn sampling(req: GenerateRequest, sampling: SamplingParams) -> GenerateRequest {
    GenerateRequest {
        sampling: Some(sampling),
        ..req
    }
}

fn hello() -> GenerateRequest {
    ask(vec![text("Hello")])
}

/// Bad requests, each named, with a word its error message must contain.
fn bad_requests() -> Vec<(&'static str, GenerateRequest, &'static str)> {
    let mut unspecified = hello();
    unspecified.messages[0].role = Role::Unspecified.into();
    let mut unknown_role = hello();
    unknown_role.messages[0].role = 42;
    let stop_empty = GenerateRequest {
        stopping: Some(StoppingParams {
            stop: vec!["ok".into(), String::new()],
            ..Default::default()
        }),
        ..hello()
    };
    let mut bad_mime = ask(vec![image(png(8, 8)), text("What?")]);
    if let Some(tessera_proto::v1::part::Kind::Image(i)) = &mut bad_mime.messages[0].parts[0].kind {
        i.mime_type = "image/tiff".into();
    }
    let late_system = GenerateRequest {
        messages: vec![
            message(Role::User, vec![text("Hi")]),
            message(Role::System, vec![text("Be brief.")]),
        ],
        ..Default::default()
    };
    let assistant_image = GenerateRequest {
        messages: vec![
            message(Role::User, vec![text("Hi")]),
            message(Role::Assistant, vec![image(png(8, 8))]),
        ],
        ..Default::default()
    };
    let mut bad_id = hello();
    bad_id.request_id = "two words".into();
    vec![
        ("no messages", GenerateRequest::default(), "no messages"),
        ("unspecified role", unspecified, "role"),
        ("unknown role", unknown_role, "role"),
        ("no parts", ask(vec![]), "no parts"),
        (
            "empty part",
            ask(vec![tessera_proto::v1::Part { kind: None }]),
            "empty",
        ),
        (
            "empty image",
            ask(vec![image(Vec::new()), text("What?")]),
            "empty",
        ),
        (
            "garbage image",
            ask(vec![image(b"not a picture".to_vec())]),
            "image 0",
        ),
        (
            "truncated png",
            ask(vec![image(png(8, 8)[..20].to_vec())]),
            "image 0",
        ),
        (
            "too many pixels",
            ask(vec![image(png(400, 300))]),
            "100000 pixels",
        ),
        (
            "too many images",
            ask(vec![image(png(8, 8)); 3]),
            "limit of 2",
        ),
        ("unsupported mime type", bad_mime, "MIME"),
        (
            "image tag in text",
            ask(vec![text("<image> hi")]),
            "<image>",
        ),
        ("late system message", late_system, "system"),
        ("image from the assistant", assistant_image, "user messages"),
        (
            "negative temperature",
            sampling(
                hello(),
                SamplingParams {
                    temperature: Some(-1.0),
                    ..Default::default()
                },
            ),
            "temperature",
        ),
        (
            "top_p zero",
            sampling(
                hello(),
                SamplingParams {
                    top_p: Some(0.0),
                    ..Default::default()
                },
            ),
            "top_p",
        ),
        (
            "more than 20 top log probabilities",
            sampling(
                hello(),
                SamplingParams {
                    logprobs: Some(true),
                    top_logprobs: Some(21),
                    ..Default::default()
                },
            ),
            "top_logprobs",
        ),
        (
            "top log probabilities without logprobs",
            sampling(
                hello(),
                SamplingParams {
                    top_logprobs: Some(2),
                    ..Default::default()
                },
            ),
            "logprobs",
        ),
        (
            "frequency penalty beyond 2",
            sampling(
                hello(),
                SamplingParams {
                    frequency_penalty: Some(2.5),
                    ..Default::default()
                },
            ),
            "frequency_penalty",
        ),
        (
            "repetition penalty zero",
            sampling(
                hello(),
                SamplingParams {
                    repetition_penalty: Some(0.0),
                    ..Default::default()
                },
            ),
            "repetition_penalty",
        ),
        ("max_tokens zero", with_max_tokens(hello(), 0), "max_tokens"),
        (
            "beyond the maximum position",
            with_max_tokens(hello(), 4096),
            "4096 positions",
        ),
        ("empty stop string", stop_empty, "stop string 1"),
        ("bad request id", bad_id, "request_id"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_invalid_arguments_and_the_gateway_keeps_serving() {
    let gateway = strict_gateway().await;
    let mut client = gateway.client().await;
    for (name, req, needle) in bad_requests() {
        for streaming in [false, true] {
            let status = if streaming {
                client
                    .generate_stream(req.clone())
                    .await
                    .map(drop)
                    .unwrap_err()
            } else {
                client.generate(req.clone()).await.map(drop).unwrap_err()
            };
            assert_eq!(status.code(), Code::InvalidArgument, "{name}: {status:?}");
            assert!(
                status.message().contains(needle),
                "{name}: {:?} lacks {needle:?}",
                status.message()
            );
        }
    }
    // Still serving: health, model info, and a good request reaches the next step.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", gateway.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let serving = health
        .check(HealthCheckRequest {
            service: "tessera.v1.Tessera".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(serving.status(), ServingStatus::Serving);
    let info = client
        .model_info(ModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.model_id, FIXTURE);
    assert_eq!(info.max_position_embeddings, 4096);
    assert_eq!(
        info.fingerprint,
        tessera_model::fingerprint(&fixture(FIXTURE)).unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_the_members_they_need_are_unavailable() {
    let gateway = Gateway::fixture(FIXTURE, MemoryDiscovery::new()).await;
    let mut client = gateway.client().await;
    let status = client.generate(hello()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("no scheduler is registered"),
        "{status:?}"
    );
    let status = client.generate_stream(hello()).await.map(drop).unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    let with_image = ask(vec![image(png(64, 48)), text("What is this?")]);
    let status = client.generate(with_image).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("no vision-worker is registered"),
        "{status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_status_lists_the_gateway_and_shutdown_deregisters_it() {
    let discovery = MemoryDiscovery::new();
    let gateway = Gateway::fixture(FIXTURE, discovery.clone()).await;
    let mut client = gateway.client().await;
    let status = client
        .cluster_status(ClusterStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.placement_version, 0);
    assert_eq!(status.members.len(), 1);
    let me = &status.members[0];
    assert_eq!(me.role(), MemberRole::Gateway);
    assert_eq!(me.address, gateway.addr.to_string());
    assert_eq!(me.id, format!("gateway-{}", gateway.addr));
    assert!(me.ready);

    gateway.shutdown.cancel();
    tokio::time::timeout(DEADLINE, gateway.task)
        .await
        .expect("the gateway stops in time")
        .unwrap()
        .unwrap();
    assert!(discovery.members().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_that_cannot_load_is_an_error_from_run() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let discovery = std::sync::Arc::new(MemoryDiscovery::new());
    let run = tessera_gateway::run(
        Config::new("/nonexistent/snapshot"),
        listener,
        discovery.clone(),
        tessera_runtime::shutdown::CancellationToken::new(),
    );
    let err = tokio::time::timeout(DEADLINE, run)
        .await
        .unwrap()
        .unwrap_err();
    assert!(err.to_string().contains("/nonexistent/snapshot"), "{err}");
    assert!(discovery.members().is_empty());
}

/// A request over `--max-request-bytes` is refused from its announced length, and a
/// conversation with more text than could fit in the model's positions before it is
/// tokenized; the gateway keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_requests_are_refused_before_any_work() {
    let mut cfg = Config::new(fixture(FIXTURE));
    cfg.public_limits.max_request_bytes = 1 << 20;
    let gateway = Gateway::start(cfg, MemoryDiscovery::new()).await;
    let mut client = gateway.client().await;

    let huge = ask(vec![text(&"x".repeat(2 << 20))]);
    for streaming in [false, true] {
        let status = if streaming {
            client
                .generate_stream(huge.clone())
                .await
                .map(drop)
                .unwrap_err()
        } else {
            client.generate(huge.clone()).await.map(drop).unwrap_err()
        };
        assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
        assert!(status.message().contains("1048576"), "{status:?}");
    }

    let files = tessera_gateway::ModelFiles::load(&fixture(FIXTURE)).unwrap();
    let bound = files.max_text_bytes();
    assert!(
        bound < 1 << 20,
        "the fixture's bound {bound} fits the request limit"
    );
    let too_long = ask(vec![text("Hi. "), text(&"y".repeat(bound))]);
    let status = client.generate(too_long).await.map(drop).unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("bytes"), "{status:?}");

    // A text of exactly the bound passes this check (and then needs a scheduler).
    let at_bound = ask(vec![text(&"y".repeat(bound))]);
    let status = client.generate(at_bound).await.map(drop).unwrap_err();
    assert_ne!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(!status.message().contains("could fit"), "{status:?}");
    let info = client.model_info(ModelInfoRequest {}).await.unwrap();
    assert_eq!(info.into_inner().model_id, FIXTURE);
}

/// `GenerateRequest` with its text parts as raw bytes (the same field numbers), to
/// send text that is not UTF-8.
mod raw {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Part {
        #[prost(bytes = "vec", tag = "1")]
        pub text: Vec<u8>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Message {
        #[prost(int32, tag = "1")]
        pub role: i32,
        #[prost(message, repeated, tag = "2")]
        pub parts: Vec<Part>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct GenerateRequest {
        #[prost(message, repeated, tag = "2")]
        pub messages: Vec<Message>,
    }
}

/// Text that is not UTF-8 is the client's mistake (INVALID_ARGUMENT, not INTERNAL),
/// and the gateway keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_that_is_not_utf8_is_an_invalid_argument() {
    let gateway = Gateway::start(Config::new(fixture(FIXTURE)), MemoryDiscovery::new()).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", gateway.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let request = raw::GenerateRequest {
        messages: vec![raw::Message {
            role: Role::User.into(),
            parts: vec![raw::Part {
                text: b"caf\xe9 \xff\xfe".to_vec(),
            }],
        }],
    };
    let status = grpc
        .unary(
            tonic::Request::new(request),
            tonic::codegen::http::uri::PathAndQuery::from_static("/tessera.v1.Tessera/Generate"),
            tonic_prost::ProstCodec::<raw::GenerateRequest, tessera_proto::v1::GenerateResponse>::default(),
        )
        .await
        .map(drop)
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("decoded"), "{status:?}");
    let mut client = gateway.client().await;
    let info = client.model_info(ModelInfoRequest {}).await.unwrap();
    assert_eq!(info.into_inner().model_id, FIXTURE);
}
