//! A generation's request id reaches the expert-workers: a real `tessera up`
//! logs every `Forward` an expert-worker answers (at debug level) with the ids of
//! the requests whose rows it carries, and the id a client gives its request is
//! among them.

use std::process::Command;
use std::time::{Duration, Instant};

#[allow(dead_code)]
mod common;
#[path = "common/up.rs"]
mod up_process;

use common::fixture_dir;

const DEADLINE: Duration = Duration::from_secs(120);

#[test]
fn the_request_id_of_a_generation_is_in_the_expert_workers_log() {
    let dir = fixture_dir("tiny-mha-softmax");
    let mut tessera = Command::new(env!("CARGO_BIN_EXE_tessera"));
    tessera
        .env_remove("TESSERA_MODEL")
        .env_remove("TESSERA_GRPC")
        .env_remove("TESSERA_LOG_FORMAT")
        .env("TESSERA_LOG", "info,tessera_expert_worker=debug");
    let (up, addrs, logs) = up_process::start_logged(tessera, dir.to_str().unwrap(), "2", &[]);

    let id = "trace-me-4e1f";
    let asked = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["ask", "--addr", &addrs.grpc, "--request-id", id])
        .args(["--max-tokens", "2", "Hello"])
        .output()
        .unwrap();
    assert!(
        asked.status.success(),
        "tessera ask: {}",
        String::from_utf8_lossy(&asked.stderr)
    );

    let deadline = Instant::now() + DEADLINE;
    let line = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = logs
            .recv_timeout(left)
            .expect("an expert-worker logs a Forward of the request before the deadline");
        if line.contains("Forward") && line.contains(id) {
            break line;
        }
    };
    assert!(line.contains("tessera_expert_worker"), "{line}");
    drop(up);
}
