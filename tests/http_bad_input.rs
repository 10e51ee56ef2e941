//! Bad input to the OpenAI-compatible HTTP API of a real `tessera up`: each gets an
//! OpenAI-shaped error with a 4xx status, the server goes on answering, and its peak
//! memory stays within [`RSS_BOUND`] over its own start-up peak. The body limit is the
//! default one (32 MiB), met by a 200 MB upload. A second server requires API keys.

use std::process::Command;

use serde_json::{Value, json};

#[allow(dead_code)]
mod common;
#[allow(dead_code)]
#[path = "common/raw_http.rs"]
mod raw_http;
#[path = "common/up.rs"]
mod up_process;

use common::fixture_dir;
use raw_http::{exchange, expect_error, peak_rss, post};

const MODEL_NAME: &str = "tiny-mha-softmax";
/// Most the server's peak RSS may grow past its peak after a first good request.
const RSS_BOUND: u64 = 300 << 20;

fn chat(question: &str) -> Value {
    json!({
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 4,
        "temperature": 0,
    })
}

/// A small good request still gets its answer.
fn still_serves(addr: &str) {
    let (status, body) = post(
        addr,
        "/v1/chat/completions",
        chat("Hello.").to_string().as_bytes(),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 4, "{body}");
}

#[test]
fn bad_http_input_gets_openai_errors_and_the_server_keeps_serving() {
    let dir = fixture_dir(MODEL_NAME);
    let mut tessera = Command::new(env!("CARGO_BIN_EXE_tessera"));
    tessera
        .env_remove("TESSERA_MODEL")
        .env_remove("TESSERA_HTTP");
    let (_up, addrs) = up_process::start_with(
        tessera,
        dir.to_str().unwrap(),
        "2",
        &["--http", "127.0.0.1:0"],
    );
    let http = addrs.http.expect("an HTTP address");
    let path = "/v1/chat/completions";
    still_serves(&http);
    let pid = _up.0.id();
    let started = peak_rss(pid);

    // Malformed JSON.
    let message = expect_error(post(&http, path, b"{\"model\": \"tiny"), 400);
    assert!(!message.is_empty());
    still_serves(&http);

    // A data: URI that is not an image.
    let not_an_image = json!({
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8gd29ybGQ="}},
        ]}],
    });
    let message = expect_error(post(&http, path, not_an_image.to_string().as_bytes()), 400);
    assert!(message.contains("image"), "{message}");
    still_serves(&http);

    // A 200 MB body against the default 32 MiB limit.
    let mut huge = chat("").to_string().into_bytes();
    let filler = format!(r#","padding":"{}"}}"#, "x".repeat(200 * 1000 * 1000));
    huge.pop();
    huge.extend_from_slice(filler.as_bytes());
    let message = expect_error(post(&http, path, &huge), 413);
    assert!(message.contains("--http-max-body-bytes"), "{message}");
    drop(huge);
    still_serves(&http);

    // A model this server does not serve.
    let mut other = chat("Hello.");
    other["model"] = json!("gpt-4o");
    let message = expect_error(post(&http, path, other.to_string().as_bytes()), 404);
    assert!(message.contains(MODEL_NAME), "{message}");
    still_serves(&http);

    // max_tokens beyond the model's context.
    let mut long = chat("Hello.");
    long["max_tokens"] = json!(10_000_000);
    let message = expect_error(post(&http, path, long.to_string().as_bytes()), 400);
    assert!(message.contains("max_tokens"), "{message}");
    still_serves(&http);

    // A 30 MB question (within the body limit): refused before it is tokenized.
    let wordy = chat(&"many words ".repeat(3_000_000));
    let message = expect_error(post(&http, path, wordy.to_string().as_bytes()), 400);
    assert!(message.contains("bytes"), "{message}");
    still_serves(&http);

    // A form or text/plain post, as any web page can send: not JSON.
    for kind in ["text/plain", "application/x-www-form-urlencoded"] {
        let header = format!("Content-Type: {kind}\r\n");
        let body = chat("Hello.").to_string();
        let got = exchange(&http, "POST", path, &header, body.as_bytes());
        let message = expect_error(got, 415);
        assert!(message.contains("application/json"), "{message}");
    }
    // Paths and methods this server does not serve.
    for (method, unknown, status) in [
        ("POST", "/v1/completions", 404),
        ("POST", "/v1/embeddings", 404),
        ("GET", "/v1/chat/completions", 405),
    ] {
        let message = expect_error(exchange(&http, method, unknown, "", b""), status);
        assert!(message.contains(unknown), "{message}");
    }
    still_serves(&http);

    let grown = peak_rss(pid).saturating_sub(started);
    println!("peak RSS grew by {} MB over the attacks", grown >> 20);
    assert!(
        grown < RSS_BOUND,
        "the server's peak RSS grew by {grown} bytes, more than {RSS_BOUND}"
    );
}

/// A `tessera up --api-key-file` answers only calls with a key from the file.
#[test]
fn a_server_with_api_keys_answers_only_calls_with_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::write(&keys, "# one client\nclient-key-42-abcdefgh\n").unwrap();
    let mut tessera = Command::new(env!("CARGO_BIN_EXE_tessera"));
    tessera
        .env_remove("TESSERA_MODEL")
        .env_remove("TESSERA_HTTP")
        .env_remove("TESSERA_API_KEY_FILE");
    let model = fixture_dir(MODEL_NAME);
    let (_up, addrs) = up_process::start_with(
        tessera,
        model.to_str().unwrap(),
        "1",
        &[
            "--http",
            "127.0.0.1:0",
            "--api-key-file",
            keys.to_str().unwrap(),
        ],
    );
    let http = addrs.http.expect("an HTTP address");
    let path = "/v1/chat/completions";
    let body = chat("Hello.").to_string();
    let json = "Content-Type: application/json\r\n";
    for auth in ["", "Authorization: Bearer nope\r\n"] {
        let got = exchange(
            &http,
            "POST",
            path,
            &format!("{json}{auth}"),
            body.as_bytes(),
        );
        let message = expect_error(got.clone(), 401);
        assert_eq!(got.1["error"]["code"], "invalid_api_key", "{message}");
    }
    let auth = "Authorization: Bearer client-key-42-abcdefgh\r\n";
    let (status, answer) = exchange(
        &http,
        "POST",
        path,
        &format!("{json}{auth}"),
        body.as_bytes(),
    );
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["usage"]["completion_tokens"], 4, "{answer}");
    let (status, models) = exchange(&http, "GET", "/v1/models", auth, b"");
    assert_eq!(status, 200, "{models}");
    assert_eq!(models["data"][0]["id"], MODEL_NAME);
}
