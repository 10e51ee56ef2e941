//! `tessera up` and `tessera ask` end to end: the real binary runs the whole
//! cluster in one process, `ask` answers through its public API exactly as
//! `generate` does offline, and SIGTERM stops the cluster cleanly.

use std::process::Command;
use std::time::Duration;

use serde_json::Value;

#[allow(dead_code)]
mod common;
#[path = "common/up.rs"]
mod up_process;

use common::fixture_dir;

const DEADLINE: Duration = Duration::from_secs(120);

fn tessera() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tessera"));
    c.env_remove("TESSERA_MODEL")
        .env_remove("TESSERA_GRPC")
        .env("TESSERA_KV_CACHE_BYTES", "67108864");
    c
}

/// `tessera up` on a free port; returns the process and the printed address.
fn up(model: &str, workers: &str) -> (up_process::Up, String) {
    up_process::start(tessera(), model, workers)
}

fn json_of(out: std::process::Output, what: &str) -> Value {
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object on stdout")
}

#[test]
fn ask_through_tessera_up_answers_as_generate_does_and_sigterm_stops_it() {
    let dir = fixture_dir("tiny-mha-softmax");
    let model = dir.to_str().unwrap();
    let image = dir.join("img_640x480.png");
    let image = image.to_str().unwrap();
    let (mut up, addr) = up(model, "2");

    let common = [
        "--image",
        image,
        "--prompt",
        "Describe this image.",
        "--max-tokens",
        "16",
        "--ignore-eos",
        "--json",
    ];
    let asked = json_of(
        tessera()
            .args(["ask", "--addr", &addr])
            .args(common)
            .output()
            .unwrap(),
        "tessera ask",
    );
    let generated = json_of(
        tessera()
            .args(["generate", "--model", model])
            .args(common)
            .output()
            .unwrap(),
        "tessera generate",
    );
    assert_eq!(asked["output_ids"], generated["output_ids"]);
    assert_eq!(asked["text"], generated["text"]);
    assert_eq!(asked["finish_reason"], generated["finish_reason"]);
    assert_eq!(asked["images"], generated["images"]);
    assert_eq!(asked["usage"]["completion_tokens"], 16);
    assert_eq!(
        asked["usage"]["prompt_tokens"].as_u64().unwrap() as usize,
        generated["input_ids"].as_array().unwrap().len()
    );

    // A bad request is refused with a clear message and the cluster keeps serving.
    let bad = tessera()
        .args(["ask", "--addr", &addr, "--prompt", "hi", "--temperature=-1"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("temperature"), "{err}");
    let again = json_of(
        tessera()
            .args(["ask", "--addr", &addr])
            .args(common)
            .output()
            .unwrap(),
        "tessera ask after a bad request",
    );
    assert_eq!(again["output_ids"], generated["output_ids"]);

    // SIGTERM: the cluster drains and exits successfully.
    let child = &mut up.0;
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = std::time::Instant::now() + DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "tessera up did not stop"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
}

#[test]
fn up_with_a_missing_model_fails_with_a_clear_message() {
    let out = tessera()
        .args([
            "up",
            "--model",
            "/no/such/snapshot",
            "--grpc",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no such model folder"), "{err}");
    assert!(err.contains("--model PATH"), "{err}");

    // A Hub id while the Hub cannot be reached (a closed loopback port).
    let hf_home = tempfile::tempdir().unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let out = tessera()
        .args(["up", "--model", "deepseek-ai/deepseek-vl2-tiny"])
        .args(["--grpc", "127.0.0.1:0"])
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_HUB_OFFLINE")
        .env("HF_HOME", hf_home.path())
        .env("HF_ENDPOINT", &endpoint)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("This machine may be offline"), "{err}");
    assert!(err.contains("--model PATH"), "{err}");
}

#[test]
fn ask_without_a_server_says_how_to_start_one() {
    // A port nothing listens on: bind one, then free it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = tessera()
        .args(["ask", "--addr", &format!("127.0.0.1:{port}"), "hello"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tessera up"), "{err}");
}
