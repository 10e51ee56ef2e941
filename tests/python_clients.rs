//! Non-Rust clients against a real `tessera up`: the Python gRPC example
//! (`examples/python/ask.py`, on the committed stubs) and the `openai` package on the
//! HTTP API (`tests/python/openai_check.py`, `examples/python/openai_chat.py`) give
//! the answer the Rust gRPC client gets for the same greedy request.
//!
//! Needs a Python with `examples/python/requirements.txt` installed: `$TESSERA_PYTHON`,
//! else `.venv/bin/python` (what `tools/install-test-deps` makes), else `python3`.
//! Without those packages the tests fail and say how to install them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{Value, json};
use tessera_proto::MAX_MESSAGE_BYTES;
use tessera_proto::v1::tessera_client::TesseraClient;
use tessera_proto::v1::{
    self, FinishReason, GenerateRequest, GenerateResponse, SamplingParams, StoppingParams, part,
};

#[allow(dead_code)] // only `start_with` is used here
#[path = "common/up.rs"]
mod up;

const QUESTION: &str = "Describe this image.";
const MAX_TOKENS: u32 = 12;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn fixture() -> PathBuf {
    repo().join("tests/fixtures/tiny-mha-softmax")
}

fn image() -> PathBuf {
    fixture().join("img_640x480.png")
}

/// The interpreter, checked to have the example's packages.
fn python() -> Command {
    let venv = repo().join(".venv/bin/python");
    let interpreter = match std::env::var("TESSERA_PYTHON") {
        Ok(path) => path,
        Err(_) if venv.exists() => venv.to_str().unwrap().to_owned(),
        Err(_) => "python3".to_owned(),
    };
    let install = format!(
        "install the Python clients' packages: `tools/install-test-deps` (a venv at .venv, \
         which the tests use), or `pip install -r {}` into any Python and set \
         TESSERA_PYTHON to it",
        repo().join("examples/python/requirements.txt").display()
    );
    let probe = Command::new(&interpreter)
        .args(["-c", "import grpc, openai, google.protobuf, grpc_tools"])
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run the Python interpreter {interpreter:?} ({e}); {install}")
        });
    assert!(
        probe.status.success(),
        "{interpreter} lacks the Python clients' packages: {}\n{install}",
        String::from_utf8_lossy(&probe.stderr).trim()
    );
    let mut cmd = Command::new(interpreter);
    // No __pycache__ in the source tree; UTF-8 output whatever the locale; loopback
    // never through a proxy.
    cmd.env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONIOENCODING", "utf-8")
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost");
    cmd
}

fn succeeded(out: Output, what: &str) -> Output {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn json_of(out: Output, what: &str) -> Value {
    let out = succeeded(out, what);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{what} printed no JSON object ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// The greedy request `ask.py` and `tessera ask` send for QUESTION about the image:
/// the image, then `\n` and the question (`<image>\nDescribe this image.`).
fn grpc_request() -> GenerateRequest {
    let text = |t: &str| v1::Part {
        kind: Some(part::Kind::Text(t.into())),
    };
    let image = v1::Part {
        kind: Some(part::Kind::Image(v1::Image {
            data: std::fs::read(image()).unwrap().into(),
            mime_type: "image/png".into(),
        })),
    };
    GenerateRequest {
        messages: vec![v1::Message {
            role: v1::Role::User.into(),
            parts: vec![image, text(&format!("\n{QUESTION}"))],
        }],
        sampling: Some(SamplingParams {
            temperature: Some(0.0),
            top_p: Some(1.0),
            top_k: Some(0),
            repetition_penalty: Some(1.0),
            seed: Some(0),
            ..Default::default()
        }),
        stopping: Some(StoppingParams {
            max_tokens: Some(MAX_TOKENS),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The Rust client's answer: a unary `Generate`.
fn grpc_generate(addr: &str, request: GenerateRequest) -> GenerateResponse {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .expect("connect to tessera up");
        TesseraClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
            .generate(request)
            .await
            .expect("Generate")
            .into_inner()
    })
}

/// `ask.py` as `tessera ask` spells a finish reason; OpenAI's spelling.
fn reason_names(reason: FinishReason) -> (&'static str, &'static str) {
    match reason {
        FinishReason::Eos => ("eos", "stop"),
        FinishReason::Stop => ("stop", "stop"),
        FinishReason::Length => ("length", "length"),
        FinishReason::Unspecified => panic!("the server sent no finish reason"),
    }
}

#[test]
fn committed_stubs_are_what_grpcio_tools_generates_from_proto() {
    let examples = repo().join("examples/python");
    let tmp = tempfile::tempdir().unwrap();
    succeeded(
        python()
            .arg(examples.join("generate_stubs.py"))
            .arg("--out")
            .arg(tmp.path())
            .output()
            .unwrap(),
        "generate_stubs.py",
    );
    let names = ["tessera_pb2.py", "tessera_pb2.pyi", "tessera_pb2_grpc.py"];
    let listed = |dir: &Path| {
        let mut found: Vec<String> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n != "__pycache__")
            .collect();
        found.sort();
        found
    };
    let fresh_dir = tmp.path().join("tessera/v1");
    let committed_dir = examples.join("stubs/tessera/v1");
    assert_eq!(listed(&fresh_dir), names);
    assert_eq!(listed(&committed_dir), names);
    for name in names {
        let fresh = std::fs::read(fresh_dir.join(name)).unwrap();
        let committed = std::fs::read(committed_dir.join(name)).unwrap();
        assert!(
            fresh == committed,
            "examples/python/stubs/tessera/v1/{name} differs from what proto/ generates: run \
             `python examples/python/generate_stubs.py` (with the pinned grpcio-tools) and \
             commit the result"
        );
    }
}

#[test]
fn python_grpc_and_openai_clients_answer_as_the_rust_grpc_client() {
    // Fails here, before a cluster starts, when the packages are missing.
    drop(python());
    let fixture = fixture();
    let (_up, addrs) = up::start_with(
        Command::new(env!("CARGO_BIN_EXE_tessera")),
        fixture.to_str().unwrap(),
        "2",
        &["--http", "127.0.0.1:0"],
    );
    let http = addrs
        .http
        .expect("tessera up --http prints its HTTP address");
    let expected = grpc_generate(&addrs.grpc, grpc_request());
    assert!(
        !expected.text.is_empty() && !expected.token_ids.is_empty(),
        "the greedy answer is empty, so comparing it proves nothing: {expected:?}"
    );
    assert!(expected.logprobs.is_empty(), "none unless asked");
    let mut asked = grpc_request();
    let sampling = asked.sampling.as_mut().unwrap();
    sampling.logprobs = Some(true);
    sampling.top_logprobs = Some(3);
    let with = grpc_generate(&addrs.grpc, asked);
    assert_eq!(with.token_ids, expected.token_ids);
    assert_eq!(with.logprobs.len(), with.token_ids.len());
    for (entry, &id) in with.logprobs.iter().zip(&with.token_ids) {
        assert_eq!(entry.token_id, id);
        assert_eq!(entry.top_logprobs.len(), 3);
        assert_eq!(
            entry.top_logprobs[0].token_id, id,
            "greedy: the most likely"
        );
        assert_eq!(entry.top_logprobs[0].logprob, entry.logprob);
        assert!(entry.logprob <= 0.0);
    }
    grpc_example_matches(&addrs.grpc, &expected);
    openai_package_matches(&http, &expected);
}

/// `ask.py` (Python gRPC on the committed stubs) against the Rust client's answer.
fn grpc_example_matches(addr: &str, expected: &GenerateResponse) {
    let ask = || {
        let mut cmd = python();
        cmd.arg(repo().join("examples/python/ask.py"))
            .args(["--addr", addr, "--image"])
            .arg(image())
            .args([
                "--max-tokens",
                &MAX_TOKENS.to_string(),
                "--temperature",
                "0",
            ]);
        cmd
    };
    let usage = expected.usage.unwrap();
    let (reason, _) = reason_names(expected.finish_reason());
    let report = json_of(
        ask().args(["--json", QUESTION]).output().unwrap(),
        "ask.py --json",
    );
    assert_eq!(report["text"], expected.text);
    assert_eq!(report["output_ids"], json!(expected.token_ids));
    assert_eq!(report["finish_reason"], reason);
    assert_eq!(
        report["usage"],
        json!({
            "prompt_tokens": usage.prompt_tokens,
            "image_tokens": usage.image_tokens,
            "completion_tokens": usage.completion_tokens,
        })
    );
    let images: Vec<Value> = expected
        .images
        .iter()
        .map(|i| {
            json!({
                "tiling": {"width": i.tiles_x, "height": i.tiles_y},
                "tokens": i.tokens, "width": i.width, "height": i.height,
            })
        })
        .collect();
    assert_eq!(report["images"], json!(images));
    assert!(!report["request_id"].as_str().unwrap().is_empty());

    // Without --json the streamed text is stdout; the summary is stderr.
    let plain = succeeded(ask().arg(QUESTION).output().unwrap(), "ask.py");
    assert_eq!(
        String::from_utf8(plain.stdout).unwrap(),
        format!("{}\n", expected.text)
    );
    let summary = String::from_utf8_lossy(&plain.stderr);
    let wanted = format!("{} generated, finish: {reason}", usage.completion_tokens);
    assert!(summary.contains(&wanted), "{summary}");

    // A refused request: the status code and its details, exit status 1.
    let bad = ask().args(["--temperature=-1", QUESTION]).output().unwrap();
    assert_eq!(bad.status.code(), Some(1));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("INVALID_ARGUMENT") && err.contains("temperature"),
        "{err}"
    );

    // No server: a message that says what to check.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut unreachable = python();
    unreachable
        .arg(repo().join("examples/python/ask.py"))
        .args([
            "--addr",
            &format!("127.0.0.1:{port}"),
            "--timeout-seconds",
            "2",
            "hi",
        ]);
    let out = unreachable.output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach Tessera at") && err.contains("tessera up"),
        "{err}"
    );
}

/// The `openai` package on the HTTP API against the Rust client's answer. The HTTP
/// API returns no token ids (no logprobs), so text, finish reason and token counts are
/// what is compared; the ids are compared on the gRPC path above.
fn openai_package_matches(http: &str, expected: &GenerateResponse) {
    let usage = expected.usage.unwrap();
    let (_, reason) = reason_names(expected.finish_reason());
    let mut check = python();
    check
        .arg(repo().join("tests/python/openai_check.py"))
        .args(["--addr", http, "--image"])
        .arg(image())
        .args(["--max-tokens", &MAX_TOKENS.to_string(), QUESTION]);
    let got = json_of(check.output().unwrap(), "openai_check.py");
    assert_eq!(got["models"], json!(["tiny-mha-softmax"]));
    assert_eq!(got["plain_text"], expected.text);
    assert_eq!(got["stream_text"], expected.text);
    assert!(
        got["stream_content_chunks"].as_u64().unwrap() > 1,
        "the answer did not stream: {got}"
    );
    assert_eq!(got["plain_finish_reason"], reason);
    assert_eq!(got["stream_finish_reason"], reason);
    let counts = json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    });
    for key in ["usage", "stream_usage"] {
        for field in ["prompt_tokens", "completion_tokens", "total_tokens"] {
            assert_eq!(got[key][field], counts[field], "{key}.{field}: {got}");
        }
    }

    // Log probabilities: one entry per answer token, the same streamed or whole; the
    // greedy token is always the most likely one; none unless asked.
    assert_eq!(got["logprobs_text"], expected.text);
    assert_eq!(got["plain_logprobs"], Value::Null, "{got}");
    let entries = got["logprobs"].as_array().unwrap();
    assert_eq!(entries.len() as u32, usage.completion_tokens, "{got}");
    assert_eq!(got["streamed_logprobs"], got["logprobs"]);
    let mut text = String::new();
    for e in entries {
        let logprob = e["logprob"].as_f64().unwrap();
        assert!(logprob <= 0.0, "{e}");
        let top = e["top"].as_array().unwrap();
        assert_eq!(top.len(), 2, "{e}");
        assert_eq!(
            top[0][0], e["token"],
            "greedy picks the most likely token: {e}"
        );
        assert_eq!(top[0][1].as_f64().unwrap(), logprob, "{e}");
        assert!(top[1][1].as_f64().unwrap() <= logprob, "{e}");
        let bytes: Vec<u8> = e["bytes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap() as u8)
            .collect();
        assert_eq!(bytes, e["token"].as_str().unwrap().as_bytes());
        text.push_str(e["token"].as_str().unwrap());
    }
    assert!(
        text.starts_with(expected.text.trim_end()),
        "{text:?} vs {:?}",
        expected.text
    );

    // Errors arrive as the openai package's exceptions, with our message.
    let missing = &got["unknown_model"];
    assert_eq!(missing["class"], "NotFoundError", "{got}");
    assert_eq!(missing["status"], 404);
    assert_eq!(missing["code"], "model_not_found");
    assert_eq!(missing["param"], "model");
    let message = missing["message"].as_str().unwrap();
    assert!(
        message.contains("no-such-model") && message.contains("tiny-mha-softmax"),
        "{message}"
    );
    let bad = &got["negative_temperature"];
    assert_eq!(bad["class"], "BadRequestError", "{got}");
    assert_eq!(bad["status"], 400);
    assert_eq!(bad["type"], "invalid_request_error");
    assert!(
        bad["message"].as_str().unwrap().contains("temperature"),
        "{got}"
    );

    // The example script itself, streaming.
    let mut example = python();
    example
        .arg(repo().join("examples/python/openai_chat.py"))
        .args(["--addr", http, "--image"])
        .arg(image())
        .args([
            "--max-tokens",
            &MAX_TOKENS.to_string(),
            "--stream",
            QUESTION,
        ]);
    let out = succeeded(example.output().unwrap(), "openai_chat.py --stream");
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("{}\n", expected.text)
    );
    let summary = String::from_utf8_lossy(&out.stderr);
    assert!(
        summary.contains(&format!(
            "{} generated, finish: {reason}",
            usage.completion_tokens
        )),
        "{summary}"
    );
}
