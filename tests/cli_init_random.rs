//! `tessera init-random` through the real binary: a checkpoint at Tiny's real widths
//! (two language layers, one SigLIP block) loads and generates from text and an image.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output};

use candle_core::{DType, Device};
use serde_json::Value;
use tessera_model::config::{AttentionConfig, ModelConfig};

#[allow(dead_code)]
mod common;

use common::fixture_dir;

fn tessera(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .env_remove("TESSERA_MODEL")
        .output()
        .expect("run tessera")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn file_names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn tiny_at_real_width_loads_and_generates() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny");
    // Leftovers of an earlier run: --force must drop the stale weights and keep the rest.
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("model.safetensors"), b"stale").unwrap();
    std::fs::write(dir.join("notes.txt"), b"mine").unwrap();
    let dir_arg = dir.to_str().unwrap();
    let out = tessera(&[
        "init-random",
        "--variant",
        "tiny",
        "--layers",
        "2",
        "--vision-layers",
        "1",
        // 1.27 GB of bf16: two shards and an index, as the released snapshots.
        "--max-shard-size",
        "1GB",
        "--force",
        "--out",
        dir_arg,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(summary.contains("2 of 12 layers"), "{summary}");

    let shards = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ];
    let mut expected_files: BTreeSet<String> = [
        "config.json",
        "model.safetensors.index.json",
        "notes.txt",
        "processor_config.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    .map(String::from)
    .into();
    expected_files.extend(shards.map(String::from));
    assert_eq!(file_names(&dir), expected_files);
    let index: Value =
        serde_json::from_slice(&std::fs::read(dir.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    let used: BTreeSet<&str> = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(used, shards.into());

    // The released Tiny config with only the two layer counts changed.
    let cfg = ModelConfig::from_dir(&dir).unwrap();
    let released =
        ModelConfig::from_dir(&fixture_dir("released-configs/deepseek-vl2-tiny")).unwrap();
    let mut expected = released.clone();
    expected.language.num_hidden_layers = 2;
    expected.vision.layers = 1;
    assert_eq!(cfg, expected);
    let (lang, moe) = (&cfg.language, cfg.language.moe.as_ref().unwrap());
    assert_eq!(
        (lang.hidden_size, lang.vocab_size, lang.intermediate_size),
        (1280, 129_280, 6848)
    );
    assert_eq!(lang.attention, AttentionConfig::Mha { head_dim: 128 });
    assert_eq!(
        (
            moe.n_routed_experts,
            moe.num_experts_per_tok,
            moe.n_shared_experts
        ),
        (64, 6, 2)
    );
    assert_eq!(lang.moe_layers(), [1]);
    assert_eq!((cfg.vision.width, cfg.vision.layers), (1152, 1));

    // The whole snapshot loads (tokenizer, vision, projector, language, every expert)
    // and runs an image prompt with finite logits.
    let logits = tmp.path().join("logits.safetensors");
    let image = fixture_dir("tiny-mha-softmax").join("img_384x384.png");
    let out = tessera(&[
        "generate",
        "--model",
        dir_arg,
        "--prompt",
        "Describe this image.",
        "--image",
        image.to_str().unwrap(),
        "--max-tokens",
        "2",
        "--ignore-eos",
        "--dtype",
        "bf16",
        "--json",
        "--logits-out",
        logits.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(report["output_ids"].as_array().unwrap().len(), 2);
    assert_eq!(report["finish_reason"], "length");
    assert!(report["images"][0]["tokens"].as_u64().unwrap() > 0);
    let tensors = candle_core::safetensors::load(&logits, &Device::Cpu).unwrap();
    let steps = tensors["step_logits"].to_dtype(DType::F32).unwrap();
    assert_eq!(steps.dims(), [2, 129_280]);
    let values = steps.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(values.iter().all(|v| v.is_finite()));
    let (lo, hi) = values
        .iter()
        .fold((f32::MAX, f32::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    assert!(hi - lo > 0.1, "logits are flat: {lo}..{hi}");
}

#[test]
fn a_folder_that_is_not_empty_is_refused_without_force() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("notes.txt"), b"mine").unwrap();
    let out = tessera(&[
        "init-random",
        "--variant",
        "tiny",
        "--out",
        tmp.path().to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("is not empty; pass --force"),
        "{}",
        stderr(&out)
    );
    assert_eq!(file_names(tmp.path()), ["notes.txt".to_string()].into());
}

#[test]
fn layer_counts_the_variant_cannot_have_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("never");
    let dir_arg = dir.to_str().unwrap();
    for (flags, message) in [
        (
            ["--variant", "small", "--layers", "1"],
            "leave no mixture-of-experts layer; pass --layers 2 or more",
        ),
        (
            ["--variant", "tiny", "--layers", "13"],
            "DeepSeek-VL2-Tiny has 12 language layers",
        ),
        (
            ["--variant", "base", "--vision-layers", "0"],
            "DeepSeek-VL2 has 27 SigLIP blocks",
        ),
    ] {
        let mut args = vec!["init-random", "--out", dir_arg];
        args.extend(flags);
        let out = tessera(&args);
        assert!(!out.status.success(), "{flags:?}");
        assert!(
            stderr(&out).contains(message),
            "{flags:?}: {}",
            stderr(&out)
        );
        assert!(!dir.exists(), "{flags:?} created the folder");
    }
}
