//! A real `tessera up` child process for end-to-end tests of the binary.
//! Include it with `#[path = "common/up.rs"] mod up;`.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// How long `tessera up` may take to print its address.
pub const DEADLINE: Duration = Duration::from_secs(120);

/// A `tessera up` process, killed if the test ends without stopping it.
pub struct Up(pub Child);

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `tessera` (a command for the binary) as `up` on a free port with `workers`
/// expert-workers; returns the process and the address it prints.
#[allow(dead_code)] // each test binary uses its own subset
pub fn start(tessera: Command, model: &str, workers: &str) -> (Up, String) {
    let (up, addrs) = start_with(tessera, model, workers, &[]);
    (up, addrs.grpc)
}

/// The addresses a `tessera up` printed.
#[allow(dead_code)] // each test binary uses its own subset
pub struct Addrs {
    /// The public gRPC API (`tessera serving on ADDR`).
    pub grpc: String,
    /// The HTTP API (`tessera http on ADDR`), when `--http` was given.
    pub http: Option<String>,
}

/// [`start`] with `extra` arguments after the usual ones (e.g. `--http 127.0.0.1:0`).
/// Waits for the gRPC address, and for the HTTP address when `extra` has `--http`.
#[allow(dead_code)] // each test binary uses its own subset
pub fn start_with(tessera: Command, model: &str, workers: &str, extra: &[&str]) -> (Up, Addrs) {
    launch(tessera, model, workers, extra, None)
}

/// [`start_with`], also sending every line the process logs (its stderr) to the
/// receiver returned; the lines still reach the test's stderr.
#[allow(dead_code)] // each test binary uses its own subset
pub fn start_logged(
    tessera: Command,
    model: &str,
    workers: &str,
    extra: &[&str],
) -> (Up, Addrs, mpsc::Receiver<String>) {
    let (tx, rx) = mpsc::channel();
    let (up, addrs) = launch(tessera, model, workers, extra, Some(tx));
    (up, addrs, rx)
}

fn launch(
    mut tessera: Command,
    model: &str,
    workers: &str,
    extra: &[&str],
    logs: Option<mpsc::Sender<String>>,
) -> (Up, Addrs) {
    let wants_http = extra.contains(&"--http");
    let stderr = if logs.is_some() {
        Stdio::piped()
    } else {
        Stdio::inherit()
    };
    // A small KV pool: the default is made resident at start and sized for the
    // model's whole context on every sequence.
    if !tessera
        .get_envs()
        .any(|(name, _)| name == "TESSERA_KV_CACHE_BYTES")
    {
        tessera.env("TESSERA_KV_CACHE_BYTES", "67108864");
    }
    let mut child = tessera
        .args(["up", "--model", model, "--expert-workers", workers])
        .args(["--grpc", "127.0.0.1:0", "--grace-seconds", "5"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("run tessera up");
    let stdout = child.stdout.take().unwrap();
    if let (Some(logs), Some(stderr)) = (logs, child.stderr.take()) {
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("{line}");
                let _ = logs.send(line);
            }
        });
    }
    let up = Up(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut http = None;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(addr) = line.strip_prefix("tessera http on ") {
                http = Some(addr.to_string());
            }
            if let Some(addr) = line.strip_prefix("tessera serving on ") {
                let _ = tx.send((addr.to_string(), http.take()));
            }
        }
    });
    let (grpc, http) = rx
        .recv_timeout(DEADLINE)
        .expect("tessera up prints its address before the deadline");
    if wants_http {
        assert!(
            http.is_some(),
            "tessera up --http printed no `tessera http on ADDR` line"
        );
    }
    (up, Addrs { grpc, http })
}
