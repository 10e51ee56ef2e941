//! `tessera bench` end to end through the real binary: against a running
//! `tessera up`, against a cluster it starts itself, and with bad flags.

use std::process::{Command, Output};

use serde_json::Value;

#[allow(dead_code)]
mod common;
#[path = "common/up.rs"]
mod up_process;

use common::fixture_dir;

fn tessera() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tessera"));
    c.env_remove("TESSERA_MODEL")
        .env_remove("TESSERA_GRPC")
        .env_remove("TESSERA_ADDR")
        .env_remove("TESSERA_API_KEY")
        .env_remove("TESSERA_API_KEY_FILE")
        .env("TESSERA_KV_CACHE_BYTES", "67108864");
    c
}

fn model() -> String {
    fixture_dir("tiny-mha-softmax")
        .to_str()
        .unwrap()
        .to_string()
}

/// `tessera up` on a free port; returns the process and the printed address.
fn up(model: &str, workers: &str) -> (up_process::Up, String) {
    up_process::start(tessera(), model, workers)
}

/// The one JSON object a successful `--json` run prints on stdout.
fn json_of(out: Output, what: &str) -> Value {
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object on stdout")
}

fn num(report: &Value, key: &str) -> f64 {
    report[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is a number in {report}"))
}

/// Every measure finite and positive, percentiles ordered, TTFT within latency.
fn check_measures(report: &Value) {
    for key in [
        "duration_s",
        "output_tokens_per_s",
        "requests_per_s",
        "prompt_tokens_mean",
    ] {
        let v = num(report, key);
        assert!(v.is_finite() && v > 0.0, "{key} = {v}");
    }
    for key in ["ttft_ms", "tpot_ms", "latency_ms"] {
        let s = &report[key];
        let [mean, p50, p90, p99] = ["mean", "p50", "p90", "p99"].map(|p| num(s, p));
        for v in [mean, p50, p90, p99] {
            assert!(v.is_finite() && v > 0.0, "{key}: {s}");
        }
        assert!(p50 <= p90 && p90 <= p99, "{key}: {s}");
        assert!(mean <= p99, "{key}: {s}");
    }
    assert!(num(&report["ttft_ms"], "p99") <= num(&report["latency_ms"], "p99"));
    assert!(num(&report["ttft_ms"], "mean") <= num(&report["latency_ms"], "mean"));
    assert_eq!(report["errors"], Value::Array(vec![]));
}

#[test]
fn bench_against_a_running_gateway_reports_every_request() {
    let (_up, addr) = up(&model(), "1");
    let report = json_of(
        tessera()
            .args([
                "bench",
                "--addr",
                &addr,
                "--requests",
                "6",
                "--concurrency",
                "3",
            ])
            .args(["--output-tokens", "8", "--json"])
            .output()
            .unwrap(),
        "tessera bench --addr",
    );
    assert_eq!(report["requests"], 6);
    assert_eq!(report["failed"], 0);
    assert_eq!(report["output_tokens"], 48);
    assert_eq!(report["concurrency"], 3);
    assert_eq!(report["request_rate"], Value::Null);
    assert_eq!(report["image_count"], 0);
    check_measures(&report);

    // The table for people names every measure.
    let out = tessera()
        .args([
            "bench",
            "--addr",
            &addr,
            "--requests",
            "2",
            "--concurrency",
            "2",
        ])
        .args([
            "--output-tokens",
            "3",
            "--warmup",
            "0",
            "--distinct-prompts",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8(out.stdout).unwrap();
    for row in [
        "requests ok / failed",
        "2 / 0",
        "output tokens/s",
        "TTFT",
        "TPOT",
        "end to end",
        "p99",
    ] {
        assert!(table.contains(row), "{row} missing from:\n{table}");
    }
}

#[test]
fn bench_with_model_runs_its_own_cluster_at_a_poisson_rate() {
    let model = model();
    let image = fixture_dir("tiny-mha-softmax").join("img_384x384.png");
    let common = [
        "--model",
        &model,
        "--expert-workers",
        "1",
        "--requests",
        "4",
    ];
    let common = [
        &common[..],
        &["--request-rate", "50", "--output-tokens", "4", "--json"],
    ]
    .concat();
    let with_image = json_of(
        tessera()
            .arg("bench")
            .args(&common)
            .args([
                "--image",
                image.to_str().unwrap(),
                "--no-overlap",
                "--fresh-images",
            ])
            .output()
            .unwrap(),
        "tessera bench --model --image",
    );
    assert_eq!(with_image["requests"], 4);
    assert_eq!(with_image["failed"], 0);
    assert_eq!(with_image["output_tokens"], 16);
    assert_eq!(with_image["image_count"], 1);
    assert_eq!(with_image["fresh_images"], true);
    assert_eq!(with_image["request_rate"], 50.0);
    assert_eq!(with_image["concurrency"], Value::Null);
    assert!(num(&with_image, "load_s") > 0.0);
    check_measures(&with_image);

    let text_only = json_of(
        tessera()
            .arg("bench")
            .args(&common)
            .args(["--warmup", "0"])
            .output()
            .unwrap(),
        "tessera bench --model",
    );
    assert_eq!(text_only["requests"], 4);
    assert_eq!(text_only["image_count"], 0);
    assert!(
        num(&with_image, "prompt_tokens_mean") > num(&text_only, "prompt_tokens_mean"),
        "an image adds prompt tokens: {with_image} vs {text_only}"
    );
}

/// A soak: for a duration, against a `tessera up` with API keys, mixing image and
/// text-only requests and client cancels, with the server's memory watched.
#[test]
fn a_duration_run_mixes_requests_and_watches_the_servers_memory() {
    let keys = tempfile::tempdir().unwrap();
    let key_file = keys.path().join("keys");
    std::fs::write(&key_file, "bench-key-0123456789\n").unwrap();
    let (up, addrs) = up_process::start_with(
        tessera(),
        &model(),
        "1",
        &["--api-key-file", key_file.to_str().unwrap()],
    );
    let image = fixture_dir("tiny-mha-softmax").join("img_384x384.png");
    let pid = up.0.id().to_string();
    let report = json_of(
        tessera()
            .args(["bench", "--addr", &addrs.grpc, "--duration-seconds", "3"])
            .args(["--concurrency", "4", "--output-tokens", "8", "--json"])
            .args(["--image", image.to_str().unwrap()])
            .args(["--text-share", "0.5", "--cancel-share", "0.25"])
            .args(["--api-key", "bench-key-0123456789", "--watch-pid", &pid])
            .output()
            .unwrap(),
        "tessera bench --duration-seconds",
    );
    assert_eq!(report["failed"], 0, "{report}");
    assert!(num(&report, "requests") >= 1.0, "{report}");
    assert!(num(&report, "cancelled") >= 1.0, "{report}");
    assert!(num(&report, "text_only") >= 1.0, "{report}");
    assert!(num(&report, "duration_s") >= 3.0, "{report}");
    assert_eq!(
        report["rss"]["pid"].as_u64(),
        Some(u64::from(up.0.id())),
        "{report}"
    );
    assert!(report["rss"]["peak_mb"].as_f64().unwrap() > 0.0, "{report}");
    check_measures(&report);

    // Without the key every request fails, and the run says why.
    let out = tessera()
        .args([
            "bench",
            "--addr",
            &addrs.grpc,
            "--requests",
            "2",
            "--warmup",
            "0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Unauthenticated"), "{err}");
}

#[test]
fn bad_flags_are_refused_naming_the_flag() {
    let model = model();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let cases: [(&[&str], &str); 8] = [
        (&["--addr", &addr, "--cancel-share", "2"], "--cancel-share"),
        (
            &["--addr", &addr, "--duration-seconds", "0"],
            "--duration-seconds",
        ),
        (
            &["--addr", &addr, "--concurrency", "2", "--request-rate", "5"],
            "--request-rate",
        ),
        (&["--requests", "3"], "--addr"),
        (&["--addr", &addr, "--model", &model], "--model"),
        (
            &["--model", &model, "--image", "no/such/image.png"],
            "--image",
        ),
        (&["--addr", &addr, "--request-rate", "0"], "--request-rate"),
        (&["--addr", &addr, "--expert-workers", "3"], "--model"),
    ];
    for (args, flag) in cases {
        let out = tessera().arg("bench").args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(flag), "{args:?}: {flag} not named in: {err}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
    // Nothing listens at the address: the error says how to start a server.
    let out = tessera().args(["bench", "--addr", &addr]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("tessera up"));
}
