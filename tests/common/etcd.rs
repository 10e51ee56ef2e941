//! A real, throw-away etcd for tests: [`EtcdServer::start`] runs the `etcd`
//! binary (Debian: `apt-get install -y etcd-server`) on free loopback ports with
//! a temporary data folder, waits until it reports healthy, and kills it (and
//! removes the folder) on drop.
//!
//! Include it with `#[path = "common/etcd.rs"] mod etcd;` (from `runtime/tests`:
//! `#[path = "../../tests/common/etcd.rs"]`); add `#[allow(dead_code)]` on the
//! `mod` line when a test file uses only part of it.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long etcd may take to become healthy.
const START_DEADLINE: Duration = Duration::from_secs(30);
/// Attempts with fresh ports when etcd exits at once (a port taken meanwhile).
const ATTEMPTS: usize = 5;

/// A running etcd, killed on drop.
pub struct EtcdServer {
    child: Option<Child>,
    data_dir: PathBuf,
    client_port: u16,
    peer_port: u16,
    /// Where `/health` is served, plain HTTP whatever the client port speaks.
    metrics_port: u16,
    /// With TLS: the folder of `ca.crt`, `tls.crt` and `tls.key` (as `tessera
    /// dev-certs` writes them) etcd serves with and checks clients against.
    tls: Option<PathBuf>,
}

impl EtcdServer {
    /// Starts a one-member etcd on free loopback ports and waits until it
    /// answers. Panics if the binary is missing or it never gets healthy.
    pub fn start() -> EtcdServer {
        Self::start_with(None)
    }

    /// [`EtcdServer::start`] serving clients over TLS with the certificates in
    /// `certs`, and requiring client certificates its CA signed.
    pub fn start_tls(certs: &std::path::Path) -> EtcdServer {
        Self::start_with(Some(certs.to_owned()))
    }

    fn start_with(tls: Option<PathBuf>) -> EtcdServer {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let data_dir = std::env::temp_dir().join(format!(
            "tessera-etcd-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let mut last_failure = String::new();
        for _ in 0..ATTEMPTS {
            let _ = std::fs::remove_dir_all(&data_dir);
            let mut server = EtcdServer {
                child: None,
                data_dir: data_dir.clone(),
                client_port: free_port(),
                peer_port: free_port(),
                metrics_port: free_port(),
                tls: tls.clone(),
            };
            match server.launch() {
                Ok(()) => return server,
                Err(failure) => last_failure = failure,
            }
        }
        panic!("etcd did not start: {last_failure}");
    }

    /// The client endpoint, e.g. `http://127.0.0.1:40123` (`https://` with TLS).
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// The endpoint as the one-element list `EtcdDiscovery::connect` takes.
    pub fn endpoints(&self) -> Vec<String> {
        vec![self.endpoint()]
    }

    /// Kills etcd at once (like a crash); its data folder stays.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills etcd and starts it again on the same ports. With `keep_data` it
    /// comes back with its keys and leases; without, it comes back empty (an
    /// etcd that lost its data).
    pub fn restart(&mut self, keep_data: bool) {
        self.kill();
        if !keep_data {
            let _ = std::fs::remove_dir_all(&self.data_dir);
        }
        if let Err(failure) = self.launch() {
            panic!("etcd did not restart: {failure}");
        }
    }

    /// Runs the binary and waits for `/health`; on failure the child is gone.
    fn launch(&mut self) -> Result<(), String> {
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut etcd = Command::new("etcd");
        if let Some(certs) = &self.tls {
            etcd.arg(format!("--cert-file={}", certs.join("tls.crt").display()))
                .arg(format!("--key-file={}", certs.join("tls.key").display()))
                .arg(format!(
                    "--trusted-ca-file={}",
                    certs.join("ca.crt").display()
                ))
                .arg("--client-cert-auth");
        }
        let spawned = etcd
            .arg("--name=test")
            .arg(format!(
                "--listen-metrics-urls=http://127.0.0.1:{}",
                self.metrics_port
            ))
            .arg(format!("--data-dir={}", self.data_dir.display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=test={peer}"))
            .args(["--logger=zap", "--log-outputs=stderr", "--log-level=error"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                panic!("etcd not found: apt-get install -y etcd-server")
            }
            Err(e) => panic!("cannot run etcd: {e}"),
        };
        self.child = Some(child);
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(format!("etcd exited with {status}"));
            }
            if healthy(self.metrics_port) {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(format!("not healthy within {START_DEADLINE:?}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

/// A port nothing listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Whether etcd's `/health` on `port` says `{"health":"true"}`.
fn healthy(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let request = "GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    reply.contains(r#""health":"true""#)
}
