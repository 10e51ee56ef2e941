//! `tessera generate` end to end: the real binary on the fixture checkpoints.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn greedy_ids(fixture: &str, case: &str) -> Vec<u64> {
    let text = std::fs::read_to_string(fixtures().join(fixture).join("cases.json")).unwrap();
    let cases: Value = serde_json::from_str(&text).unwrap();
    let case = cases["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == case)
        .unwrap();
    case["greedy"]["new_token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect()
}

fn tessera(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .env_remove("TESSERA_MODEL")
        .output()
        .expect("run tessera")
}

#[test]
fn generate_text_only_prints_the_reference_greedy_ids() {
    let model = fixtures().join("tiny-mha-softmax");
    let conversation = model.join("conversations/text_only.json");
    let out = tessera(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--conversation",
        conversation.to_str().unwrap(),
        "--max-tokens",
        "16",
        "--ignore-eos",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
    let ids: Vec<u64> = report["output_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(ids, greedy_ids("tiny-mha-softmax", "text_only"));
    assert_eq!(report["finish_reason"], "length");
    assert_eq!(report["input_ids"].as_array().unwrap().len(), 22);
    assert!(report["timings"]["prefill_tokens_per_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn generate_writes_logits_and_a_prompt_runs_on_the_mla_fixture() {
    let model = fixtures().join("small-mla-softmax");
    let dir = std::env::temp_dir().join(format!("tessera-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let logits = dir.join("logits.safetensors");
    let out = tessera(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "What is the capital of France?",
        "--max-tokens",
        "4",
        "--ignore-eos",
        "--chunk-size",
        "5",
        "--logits-out",
        logits.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let saved = candle_core::safetensors::load(&logits, &candle_core::Device::Cpu).unwrap();
    assert_eq!(saved["last_logits"].dims(), &[3072]);
    assert_eq!(saved["step_logits"].dims(), &[4, 3072]);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn images_and_bad_input_fail_with_a_clear_message() {
    let model = fixtures().join("tiny-mha-softmax");
    let conversation = model.join("conversations/single_640x480.json");
    let out = tessera(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--conversation",
        conversation.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("has images"), "{err}");

    let out = tessera(&[
        "generate",
        "--model",
        "/nonexistent/model",
        "--prompt",
        "hi",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/model") && err.contains("not found"),
        "{err}"
    );

    let out = tessera(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "hi",
        "--temperature=-1",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("temperature"));
}
