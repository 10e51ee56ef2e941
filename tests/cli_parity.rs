//! `tessera parity` end to end, and `--device cuda:N` refused at start-up: the real
//! binary on the golden fixtures. The portable run takes the tensor-operation path a
//! GPU runs (`TESSERA_PORTABLE_PATHS=1`), so that path meets the golden tolerances
//! on machines without a GPU too.

use std::process::{Command, Output};

use serde_json::Value;

#[allow(dead_code)] // each test binary uses a different subset of the helpers
mod common;
#[path = "common/up.rs"]
mod up_process;

use common::{case, fixture_dir, json_ids};

fn tessera(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .envs(env.iter().copied())
        .env_remove("TESSERA_MODEL")
        .env_remove("TESSERA_DEVICE")
        .env_remove("TESSERA_DTYPE")
        .output()
        .expect("run tessera")
}

/// Runs `tessera parity` on both fixtures with `extra` flags; returns the report.
fn parity(extra: &[&str], env: &[(&str, &str)]) -> Value {
    let tiny = fixture_dir("tiny-mha-softmax");
    let small = fixture_dir("small-mla-softmax");
    let mut args = vec![
        "parity",
        "--fixture",
        tiny.to_str().unwrap(),
        "--fixture",
        small.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = tessera(&args, env);
    assert!(
        out.status.success(),
        "parity {extra:?} {env:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object on stdout")
}

fn cases(report: &Value) -> Vec<&Value> {
    report["fixtures"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|f| f["cases"].as_array().unwrap())
        .collect()
}

fn check_f32(report: &Value, what: &str) {
    assert_eq!(report["dtype"], "f32", "{what}");
    assert_eq!(report["pass"], true, "{what}: {report}");
    let cases = cases(report);
    assert_eq!(cases.len(), 8, "{what}: every case of both fixtures");
    for case in &cases {
        let name = &case["name"];
        assert_eq!(case["pass"], true, "{what} {name}: {case}");
        assert_eq!(case["input_ids_match"], true, "{what} {name}");
        assert_eq!(case["first_divergence"], Value::Null, "{what} {name}");
        assert_eq!(case["greedy_tokens"], 16, "{what} {name}");
        let worst = case["step_logits_max_abs_diff"].as_f64().unwrap();
        assert!(worst <= 1e-3, "{what} {name}: {worst}");
    }
    let chunked: Vec<_> = cases
        .iter()
        .filter(|c| c["chunk_size"] == 64)
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        chunked,
        ["single_640x480_chunked", "single_1200x400_chunked"],
        "{what}"
    );
    assert_eq!(report["greedy_tokens_agreeing"], 128, "{what}");
}

#[test]
fn parity_passes_on_the_cpu_kernels_and_on_the_portable_path() {
    let native = parity(&["--device", "cpu"], &[]);
    check_f32(&native, "cpu kernels");
    let portable = parity(&["--device", "cpu"], &[("TESSERA_PORTABLE_PATHS", "1")]);
    check_f32(&portable, "portable path");
    // The two paths sum in different orders: equal within the tolerance, not bitwise.
    eprintln!(
        "worst logit difference: cpu kernels {}, portable {}",
        native["worst_logits_max_abs_diff"], portable["worst_logits_max_abs_diff"]
    );
}

#[test]
fn parity_reports_bf16_without_judging_it() {
    let report = parity(&["--dtype", "bf16", "--case", "text_only"], &[]);
    assert_eq!(report["dtype"], "bf16");
    assert_eq!(
        report["weights"], "auto",
        "--weights as given (the CPU keeps `auto`)"
    );
    assert_eq!(report["pass"], Value::Null);
    assert_eq!(report["tolerance"], Value::Null);
    let cases = cases(&report);
    assert_eq!(cases.len(), 1, "only the chosen case");
    let worst = cases[0]["last_logits_max_abs_diff"].as_f64().unwrap();
    // bf16 keeps 8 bits of mantissa: the logits (O(10)) move, but not wildly.
    assert!(worst > 0.0 && worst < 1.0, "{worst}");
    assert!(cases[0]["greedy_tokens_agreeing"].as_u64().unwrap() <= 16);
}

#[test]
fn a_failing_parity_check_exits_non_zero_with_the_reason() {
    let tiny = fixture_dir("tiny-mha-softmax");
    let out = tessera(
        &[
            "parity",
            "--fixture",
            tiny.to_str().unwrap(),
            "--case",
            "text_only",
            "--tolerance",
            "0",
        ],
        &[],
    );
    assert!(!out.status.success());
    let report: Value = serde_json::from_slice(&out.stdout).expect("the report is printed");
    assert_eq!(report["pass"], false);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("parity failed"), "{stderr}");
}

/// Every command that loads weights refuses a GPU it cannot use before loading
/// anything, naming what is missing: this build's lack of CUDA support, or on a CUDA
/// build the missing driver, library or GPU.
#[test]
fn cuda_is_refused_at_start_with_the_reason() {
    let model = fixture_dir("tiny-mha-softmax");
    let model = model.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let members = dir.path().join("members.json");
    std::fs::write(&members, r#"{"members": []}"#).unwrap();
    let members = members.to_str().unwrap();
    let role = |role| {
        [
            role,
            "--model",
            model,
            "--device",
            "cuda:0",
            "--grpc",
            "127.0.0.1:0",
        ]
        .into_iter()
        .chain(["--discovery-file", members])
        .collect::<Vec<_>>()
    };
    for args in [
        vec![
            "generate", "--model", model, "--prompt", "hi", "--device", "cuda:0",
        ],
        vec!["up", "--model", model, "--device", "cuda:0"],
        role("scheduler"),
        role("expert-worker"),
        role("vision-worker"),
    ] {
        let out = tessera(&args, &[]);
        assert!(!out.status.success(), "{args:?} started");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("--device cuda:0"), "{args:?}: {stderr}");
        if cfg!(not(feature = "cuda")) {
            assert!(
                stderr.contains("built without CUDA support"),
                "{args:?}: {stderr}"
            );
        }
    }
}

/// The whole cluster on the GPU's code path: `tessera up` (remote expert-workers
/// summing on the device path, hidden states over gRPC) answers the text-only golden
/// case with the reference's greedy tokens.
#[test]
fn a_cluster_on_the_portable_path_gives_the_reference_tokens() {
    let dir = fixture_dir("tiny-mha-softmax");
    let model = dir.to_str().unwrap();
    let conversation = dir.join("conversations/text_only.json");
    let command = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_tessera"));
        c.env_remove("TESSERA_MODEL")
            .env_remove("TESSERA_GRPC")
            .env("TESSERA_KV_CACHE_BYTES", "67108864")
            .env("TESSERA_PORTABLE_PATHS", "1");
        c
    };
    let (_up, addr) = up_process::start(command(), model, "2");
    let messages: Value =
        serde_json::from_str(&std::fs::read_to_string(&conversation).unwrap()).unwrap();
    let prompt = messages[0]["content"].as_str().unwrap();
    let out = command()
        .args(["ask", "--addr", &addr, "--prompt", prompt])
        .args(["--max-tokens", "16", "--ignore-eos", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let asked: Value = serde_json::from_slice(&out.stdout).unwrap();
    let want = case("tiny-mha-softmax", "text_only");
    assert_eq!(
        json_ids(&asked["output_ids"]),
        json_ids(&want["greedy"]["new_token_ids"])
    );
}
