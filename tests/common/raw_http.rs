//! Raw HTTP/1.1 exchanges with a server under test, one fresh connection each, and
//! the process's peak memory. Include it with `#[path = "common/raw_http.rs"] mod
//! raw_http;`.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use serde_json::Value;

/// How long a read from the server may block.
pub const IO_TIMEOUT: Duration = Duration::from_secs(120);

/// The peak resident memory of process `pid` (`VmHWM`), in bytes.
pub fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("a VmHWM line");
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

/// One HTTP/1.1 exchange on a fresh connection: the status and the JSON body.
pub fn post(addr: &str, path: &str, body: &[u8]) -> (u16, Value) {
    exchange(
        addr,
        "POST",
        path,
        "Content-Type: application/json\r\n",
        body,
    )
}

/// [`post`] with any method and extra header lines (each ending in CRLF).
pub fn exchange(addr: &str, method: &str, path: &str, headers: &str, body: &[u8]) -> (u16, Value) {
    let mut stream = TcpStream::connect(addr).expect("connect to the HTTP API");
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    // The server may answer (and close) before it has read a body it refuses, so
    // the body goes from another thread and its write errors are expected then.
    let mut writer = stream.try_clone().unwrap();
    let body = body.to_vec();
    let sending = std::thread::spawn(move || {
        for chunk in body.chunks(1 << 20) {
            if writer.write_all(chunk).is_err() {
                return;
            }
        }
    });
    let mut raw = Vec::new();
    // A reset after the answer arrived still leaves the answer in `raw`.
    let _ = stream.read_to_end(&mut raw);
    let _ = stream.shutdown(Shutdown::Both);
    sending.join().unwrap();
    parse_response(&raw)
}

pub fn parse_response(raw: &[u8]) -> (u16, Value) {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("an HTTP response, got {text:?}"));
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("a status line, got {head:?}"));
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    let json = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("a JSON body ({e}), got status {status} and {body:?}"));
    (status, json)
}

pub fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").expect("a chunk size line");
        let size = usize::from_str_radix(size.trim(), 16).expect("a hex chunk size");
        if size == 0 {
            return out;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
}

/// Asserts an OpenAI-shaped error with `status` and returns its message.
pub fn expect_error(got: (u16, Value), status: u16) -> String {
    let (code, body) = got;
    assert_eq!(code, status, "{body}");
    let error = &body["error"];
    assert_eq!(error["type"], "invalid_request_error", "{body}");
    assert!(
        error.get("param").is_some() && error.get("code").is_some(),
        "{body}"
    );
    error["message"].as_str().expect("a message").to_owned()
}
