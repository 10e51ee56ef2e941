//! The README's `curl` examples of the OpenAI-compatible API, sent as written to a
//! `tessera up --served-model-name deepseek-vl2-tiny` serving the test model (the
//! image example with a JPEG of the seed corpus in place of `cat.jpg`).

use std::process::Command;

use base64::Engine as _;
use serde_json::Value;

#[allow(dead_code)]
mod common;
#[allow(dead_code)]
#[path = "common/raw_http.rs"]
mod raw_http;
#[path = "common/up.rs"]
mod up_process;

/// The request bodies of the README's `curl ... /v1/chat/completions` examples: the
/// `-d '...'` argument, or the here-document after `-d @- <<EOF`.
fn curl_bodies(readme: &str) -> Vec<String> {
    let mut bodies = Vec::new();
    let mut rest = readme;
    while let Some(at) = rest.find("curl -s http://127.0.0.1:8000/v1/chat/completions") {
        rest = &rest[at..];
        let line_end = rest.find('\n').unwrap();
        let line = &rest[..line_end];
        if let Some(open) = line.find("-d '") {
            let start = open + 4;
            let end = start + rest[start..].find("'\n").expect("the closing quote");
            bodies.push(rest[start..end].to_owned());
        } else if line.ends_with("-d @- <<EOF") {
            let start = line_end + 1;
            let end = start
                + rest[start..]
                    .find("\nEOF")
                    .expect("the end of the here-document");
            bodies.push(rest[start..end].to_owned());
        }
        rest = &rest[line_end..];
    }
    bodies
}

#[test]
fn the_readme_curl_examples_answer() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let bodies = curl_bodies(&readme);
    assert_eq!(
        bodies.len(),
        2,
        "the README's two curl examples: {bodies:?}"
    );
    let jpeg = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fuzz/image/rgb_24x16.jpg"
    ))
    .unwrap();
    let encoded = base64::engine::general_purpose::STANDARD.encode(jpeg);

    let mut tessera = Command::new(env!("CARGO_BIN_EXE_tessera"));
    tessera
        .env_remove("TESSERA_MODEL")
        .env_remove("TESSERA_HTTP")
        .env_remove("TESSERA_API_KEY_FILE")
        .env_remove("TESSERA_SERVED_MODEL_NAME");
    let model = common::fixture_dir("tiny-mha-softmax");
    let (_up, addrs) = up_process::start_with(
        tessera,
        model.to_str().unwrap(),
        "1",
        &[
            "--http",
            "127.0.0.1:0",
            "--served-model-name",
            "deepseek-vl2-tiny",
        ],
    );
    let http = addrs.http.expect("an HTTP address");
    for body in bodies {
        let body = body.replace("$(base64 -w0 cat.jpg)", &encoded);
        let (status, answer) = raw_http::exchange(
            &http,
            "POST",
            "/v1/chat/completions",
            "content-type: application/json\r\n",
            body.as_bytes(),
        );
        assert_eq!(status, 200, "{body}\n{answer}");
        assert_eq!(answer["model"], "deepseek-vl2-tiny");
        let content = &answer["choices"][0]["message"]["content"];
        assert!(matches!(content, Value::String(_)), "{answer}");
    }
}
