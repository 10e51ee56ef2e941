//! `tessera generate` end to end: the real binary on the fixture checkpoints.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

mod common;

use common::{case, fixture_dir, json_ids};

fn tessera(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .env_remove("TESSERA_MODEL")
        .output()
        .expect("run tessera")
}

/// Runs a fixture case's conversation file greedily for 16 tokens with `--json`.
fn generate_case_json(fixture: &str, name: &str) -> Value {
    let model = fixture_dir(fixture);
    let conversation = model.join(format!("conversations/{name}.json"));
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
        "{fixture}/{name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object on stdout")
}

#[test]
fn generate_text_only_prints_the_reference_greedy_ids() {
    let report = generate_case_json("tiny-mha-softmax", "text_only");
    let want = case("tiny-mha-softmax", "text_only");
    assert_eq!(
        json_ids(&report["output_ids"]),
        json_ids(&want["greedy"]["new_token_ids"])
    );
    assert_eq!(report["input_ids"], want["input_ids"]);
    assert_eq!(report["finish_reason"], "length");
    assert!(report["timings"]["prefill_tokens_per_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn generate_from_image_files_prints_the_reference_greedy_ids() {
    for (fixture, name) in [
        ("tiny-mha-softmax", "two_images_odd_sizes"),
        ("small-mla-softmax", "multi_turn"),
    ] {
        let report = generate_case_json(fixture, name);
        let want = case(fixture, name);
        assert_eq!(
            json_ids(&report["output_ids"]),
            json_ids(&want["greedy"]["new_token_ids"]),
            "{fixture}/{name}"
        );
        let tokens: Vec<u32> = report["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["tokens"].as_u64().unwrap() as u32)
            .collect();
        assert_eq!(
            tokens,
            json_ids(&want["num_image_tokens"]),
            "{fixture}/{name}"
        );
    }
}

/// Runs `tessera generate` on `model` for 4 greedy tokens past end-of-sentence with
/// `args`, writing the logits to `logits`; returns stdout and the saved tensors.
fn generate_logits(
    model: &Path,
    args: &[&str],
    logits: &Path,
) -> (Vec<u8>, HashMap<String, candle_core::Tensor>) {
    let common = [
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--max-tokens",
        "4",
        "--ignore-eos",
        "--logits-out",
        logits.to_str().unwrap(),
    ];
    let out = tessera(&[&common[..], args].concat());
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let saved = candle_core::safetensors::load(logits, &candle_core::Device::Cpu).unwrap();
    (out.stdout, saved)
}

#[test]
fn generate_writes_logits_with_a_chunked_prompt_on_the_mla_fixture() {
    let model = fixture_dir("small-mla-softmax");
    let dir = std::env::temp_dir().join(format!("tessera-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let prompt = [
        "--prompt",
        "What is the capital of France?",
        "--chunk-size",
        "5",
    ];
    let (_, saved) = generate_logits(&model, &prompt, &dir.join("logits.safetensors"));
    assert_eq!(saved["last_logits"].dims(), &[3072]);
    assert_eq!(saved["step_logits"].dims(), &[4, 3072]);
    std::fs::remove_dir_all(&dir).ok();
}

/// A JPEG photo and the PNG of the pixels Pillow decodes it to (`tests/fixtures/jpeg`)
/// give the same answer and bit-identical logits: the JPEG is decoded as the reference
/// decodes it.
#[test]
fn a_jpeg_photo_gives_the_logits_of_its_pillow_decoded_pixels() {
    let model = fixture_dir("tiny-mha-softmax");
    let dir = std::env::temp_dir().join(format!("tessera-cli-jpeg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let run = |name: &str| {
        let image = fixture_dir("jpeg").join(name);
        let prompt = [
            "--prompt",
            "<image>\nDescribe this image.",
            "--image",
            image.to_str().unwrap(),
            "--json",
        ];
        let logits = dir.join(format!("{name}.safetensors"));
        let (stdout, saved) = generate_logits(&model, &prompt, &logits);
        let report: Value = serde_json::from_slice(&stdout).unwrap();
        let rows = |name: &str| saved[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        (report, rows("last_logits"), rows("step_logits"))
    };
    let (jpeg, jpeg_last, jpeg_steps) = run("photo_q90_420.jpg");
    let (png, png_last, png_steps) = run("photo_q90_420.pillow.png");
    assert_eq!(
        jpeg["input_ids"], png["input_ids"],
        "same tiling, same prompt"
    );
    assert_eq!(jpeg["output_ids"], png["output_ids"]);
    for (what, got, want) in [
        ("last_logits", &jpeg_last, &png_last),
        ("step_logits", &jpeg_steps, &png_steps),
    ] {
        assert_eq!(got.len(), want.len(), "{what}");
        if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
            panic!(
                "{what}[{i}]: {} from the JPEG, {} from the PNG",
                got[i], want[i]
            );
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn prompt_with_image_draws_boxes_to_a_png() {
    let model = fixture_dir("tiny-mha-softmax");
    let dir = std::env::temp_dir().join(format!("tessera-cli-draw-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let png = dir.join("boxes.png");
    let out = tessera(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--image",
        model.join("img_518x293.png").to_str().unwrap(),
        "--prompt",
        "<|grounding|>Locate the red car.",
        "--max-tokens",
        "4",
        "--json",
        "--draw-boxes",
        png.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["images"][0]["tokens"], 617);
    assert_eq!(report["images"][0]["width"], 518);
    let drawn = image::open(&png).unwrap();
    assert_eq!((drawn.width(), drawn.height()), (518, 293));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_input_fails_with_a_clear_message() {
    let model = fixture_dir("tiny-mha-softmax");
    let not_an_image = fixture_dir("tiny-mha-softmax").join("config.json");
    let out = tessera(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--image",
        not_an_image.to_str().unwrap(),
        "--prompt",
        "What is this?",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("config.json") && err.contains("image"),
        "{err}"
    );

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
        err.contains("/nonexistent/model") && err.contains("no such model folder"),
        "{err}"
    );

    // A Hub id while the Hub cannot be reached (a closed loopback port).
    let hf_home = tempfile::tempdir().unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let out = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["generate", "--model", "deepseek-ai/deepseek-vl2-tiny"])
        .args(["--prompt", "hi"])
        .env_remove("TESSERA_MODEL")
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_HUB_OFFLINE")
        .env("HF_HOME", hf_home.path())
        .env("HF_ENDPOINT", &endpoint)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "could not download deepseek-ai/deepseek-vl2-tiny from {endpoint}"
        )) && err.contains("--model PATH"),
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
