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
pub fn start(mut tessera: Command, model: &str, workers: &str) -> (Up, String) {
    let mut child = tessera
        .args(["up", "--model", model, "--expert-workers", workers])
        .args(["--grpc", "127.0.0.1:0", "--grace-seconds", "5"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run tessera up");
    let stdout = child.stdout.take().unwrap();
    let up = Up(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(addr) = line.strip_prefix("tessera serving on ") {
                let _ = tx.send(addr.to_string());
            }
        }
    });
    let addr = rx
        .recv_timeout(DEADLINE)
        .expect("tessera up prints its address before the deadline");
    (up, addr)
}
