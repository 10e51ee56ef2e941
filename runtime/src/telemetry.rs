//! Logs and request ids. Every process logs through `tracing` (filter with
//! `RUST_LOG`, default `info`); a request's id travels between services in the
//! `x-request-id` gRPC metadata key so one request can be followed across them.

use tonic::metadata::{MetadataMap, MetadataValue};

/// The gRPC metadata key that carries a request's id between services.
pub const REQUEST_ID_KEY: &str = "x-request-id";

/// Installs the process-wide `tracing` subscriber (once; later calls do nothing).
/// `RUST_LOG` selects what is logged; the default is `info`. `json` logs one JSON
/// object per line (for log collectors) instead of human-readable text.
pub fn init_tracing(json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// The request id carried in `metadata`, if any (and printable ASCII).
pub fn request_id(metadata: &MetadataMap) -> Option<String> {
    metadata
        .get(REQUEST_ID_KEY)
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// Every request id carried in `metadata`: a call made for several requests at
/// once (one expert layer of a batch) carries one entry per request.
pub fn request_ids(metadata: &MetadataMap) -> Vec<String> {
    metadata
        .get_all(REQUEST_ID_KEY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Adds one `x-request-id` entry per id to `metadata` (ids that are not valid
/// metadata are left out).
pub fn append_request_ids<'a>(metadata: &mut MetadataMap, ids: impl IntoIterator<Item = &'a str>) {
    for id in ids {
        if let Ok(v) = MetadataValue::try_from(id) {
            metadata.append(REQUEST_ID_KEY, v);
        }
    }
}

/// Puts `id` into `metadata` (an id that is not valid metadata is left out).
pub fn set_request_id(metadata: &mut MetadataMap, id: &str) {
    if let Ok(v) = MetadataValue::try_from(id) {
        metadata.insert(REQUEST_ID_KEY, v);
    }
}

/// A `tonic::Request` for `message` carrying `id` in its metadata.
pub fn request_with_id<T>(message: T, id: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    set_request_id(request.metadata_mut(), id);
    request
}

/// A new random request id (32 hex digits).
pub fn new_request_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{SystemTime, UNIX_EPOCH};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mixed = splitmix(nanos ^ splitmix(n ^ u64::from(std::process::id())));
    format!("{:016x}{:016x}", mixed, splitmix(mixed ^ n))
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_round_trip_through_metadata() {
        let request = request_with_id((), "abc-123");
        assert_eq!(request_id(request.metadata()).as_deref(), Some("abc-123"));
        let mut md = MetadataMap::new();
        set_request_id(&mut md, "bad\nid");
        assert_eq!(request_id(&md), None);
        append_request_ids(&mut md, ["a", "bad\nid", "b"]);
        assert_eq!(request_ids(&md), ["a", "b"]);
    }

    #[test]
    fn new_ids_are_distinct_hex() {
        let a = new_request_id();
        let b = new_request_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
    }
}
