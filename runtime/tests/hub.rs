//! `--model` as a Hub id against a small Hub on loopback that serves the tiny
//! fixture the way huggingface.co does (repository description, ranged file
//! downloads with etag and commit headers): the download, the cache, the offline
//! fallback and every error a user can meet.

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use tessera_runtime::hub::{HubError, HubOptions, hub_id_of, resolve};
use tokio::net::TcpListener;

const SHA: &str = "0123456789abcdef0123456789abcdef01234567";
/// The fixture files a snapshot of it is made of.
const SNAPSHOT_FILES: [&str; 6] = [
    "config.json",
    "model.safetensors",
    "processor_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
];
/// A token the gated repository accepts.
const TOKEN: &str = "hf_test_token";

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-mha-softmax")
}

/// One repository of the fake Hub: its files by name.
type Files = BTreeMap<String, Arc<Vec<u8>>>;

#[derive(Default)]
struct Hub {
    repos: BTreeMap<String, Files>,
    /// Repositories that need `Authorization: Bearer TOKEN`.
    gated: Vec<String>,
    /// File requests served.
    downloads: AtomicUsize,
}

impl Hub {
    fn authorized(&self, repo: &str, headers: &HeaderMap) -> bool {
        let bearer = format!("Bearer {TOKEN}");
        !self.gated.iter().any(|g| g == repo)
            || headers
                .get(header::AUTHORIZATION)
                .is_some_and(|v| v == bearer.as_str())
    }
}

/// The tiny fixture's snapshot, plus files a snapshot download leaves out.
fn tiny_repo() -> Files {
    let mut files: Files = SNAPSHOT_FILES
        .iter()
        .map(|f| {
            (
                f.to_string(),
                Arc::new(std::fs::read(fixture().join(f)).unwrap()),
            )
        })
        .collect();
    files.insert("README.md".into(), Arc::new(b"# tiny".to_vec()));
    files.insert(
        "img_640x480.png".into(),
        Arc::new(std::fs::read(fixture().join("img_640x480.png")).unwrap()),
    );
    files.insert("pytorch_model.bin".into(), Arc::new(vec![0; 16]));
    files
}

async fn info(
    State(hub): State<Arc<Hub>>,
    UrlPath((owner, name, _rev)): UrlPath<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let repo = format!("{owner}/{name}");
    if repo == "tessera/broken" {
        return (StatusCode::INTERNAL_SERVER_ERROR, "oops").into_response();
    }
    let Some(files) = hub.repos.get(&repo) else {
        return (StatusCode::NOT_FOUND, "Repository not found").into_response();
    };
    if !hub.authorized(&repo, &headers) {
        return (
            StatusCode::UNAUTHORIZED,
            "Access to this model is restricted",
        )
            .into_response();
    }
    let siblings: Vec<_> = files.keys().map(|f| json!({"rfilename": f})).collect();
    let body = json!({"id": repo, "sha": SHA, "siblings": siblings}).to_string();
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// `bytes=a-b` of a Range header, clamped to `len`.
fn range(headers: &HeaderMap, len: usize) -> Option<(usize, usize)> {
    let spec = headers
        .get(header::RANGE)?
        .to_str()
        .ok()?
        .strip_prefix("bytes=")?;
    let (start, end) = spec.split_once('-')?;
    let start: usize = start.parse().ok()?;
    let end = end.parse().unwrap_or(len - 1).min(len - 1);
    (start <= end).then_some((start, end))
}

async fn file(
    State(hub): State<Arc<Hub>>,
    UrlPath((owner, name, rev, file)): UrlPath<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let repo = format!("{owner}/{name}");
    let Some(data) = hub.repos.get(&repo).and_then(|files| files.get(&file)) else {
        return (StatusCode::NOT_FOUND, "Entry not found").into_response();
    };
    if !hub.authorized(&repo, &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    if rev != SHA && rev != "main" {
        return (StatusCode::NOT_FOUND, "Revision not found").into_response();
    }
    hub.downloads.fetch_add(1, Ordering::SeqCst);
    let mut hasher = DefaultHasher::new();
    data.hash(&mut hasher);
    let etag = format!("\"{:016x}{:08x}\"", hasher.finish(), data.len());
    let (status, body, content_range) = match range(&headers, data.len()) {
        Some((start, end)) => (
            StatusCode::PARTIAL_CONTENT,
            data[start..=end].to_vec(),
            Some(format!("bytes {start}-{end}/{}", data.len())),
        ),
        None => (StatusCode::OK, data.to_vec(), None),
    };
    let mut response = (status, body).into_response();
    let h = response.headers_mut();
    h.insert(header::ETAG, HeaderValue::from_str(&etag).unwrap());
    h.insert("x-repo-commit", HeaderValue::from_static(SHA));
    if let Some(content_range) = content_range {
        h.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_str(&content_range).unwrap(),
        );
    }
    response
}

/// Serves `hub` on 127.0.0.1:0 until the test ends; its endpoint URL.
async fn serve(hub: Arc<Hub>) -> String {
    let router = Router::new()
        .route("/api/models/{owner}/{name}/revision/{rev}", get(info))
        .route("/{owner}/{name}/resolve/{rev}/{*file}", get(file))
        .with_state(hub);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{addr}")
}

/// An endpoint nothing listens on.
async fn closed_endpoint() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}

fn options(endpoint: &str, cache: &Path) -> HubOptions {
    HubOptions {
        endpoint: endpoint.to_owned(),
        ..HubOptions::new(cache, "main")
    }
}

#[tokio::test]
async fn a_local_folder_is_itself_and_a_missing_path_is_no_such_folder() {
    let cache = tempfile::tempdir().unwrap();
    let opts = options(&closed_endpoint().await, cache.path());
    assert_eq!(resolve(&fixture(), &opts).await.unwrap(), fixture());

    for path in ["/no/such/snapshot", "./missing", "just-a-name", "a/b/c"] {
        let err = resolve(Path::new(path), &opts).await.unwrap_err();
        assert!(
            matches!(err, HubError::NoSuchFolder { .. }),
            "{path}: {err:?}"
        );
        let message = err.to_string();
        assert!(message.contains("no such model folder"), "{message}");
        assert!(message.contains("--model PATH"), "{message}");
    }
    // A file is not a snapshot folder, even when its name reads as `owner/name`.
    let file = fixture().join("config.json");
    let err = resolve(&file, &opts).await.unwrap_err();
    assert!(matches!(err, HubError::NoSuchFolder { .. }), "{err:?}");
}

#[tokio::test]
async fn an_unreachable_hub_is_the_offline_error() {
    let cache = tempfile::tempdir().unwrap();
    let endpoint = closed_endpoint().await;
    let err = resolve(
        Path::new("deepseek-ai/deepseek-vl2-tiny"),
        &options(&endpoint, cache.path()),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, HubError::Offline { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.starts_with(&format!(
            "could not download deepseek-ai/deepseek-vl2-tiny from {endpoint}: "
        )),
        "{message}"
    );
    assert!(message.contains("This machine may be offline"), "{message}");
    assert!(message.contains("--model PATH"), "{message}");

    let offline = HubOptions {
        offline: true,
        ..options(&endpoint, cache.path())
    };
    let err = resolve(Path::new("deepseek-ai/deepseek-vl2-tiny"), &offline)
        .await
        .unwrap_err();
    assert!(matches!(err, HubError::NotCached { .. }), "{err:?}");
    assert!(err.to_string().contains("HF_HUB_OFFLINE"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_id_downloads_the_snapshot_into_the_cache() {
    let hub = Arc::new(Hub {
        repos: BTreeMap::from([("tessera/tiny".to_owned(), tiny_repo())]),
        ..Hub::default()
    });
    let endpoint = serve(hub.clone()).await;
    let cache = tempfile::tempdir().unwrap();
    let opts = options(&endpoint, cache.path());

    let snapshot = resolve(Path::new("tessera/tiny"), &opts).await.unwrap();
    assert_eq!(
        snapshot,
        cache
            .path()
            .join("models--tessera--tiny/snapshots")
            .join(SHA)
    );
    for file in SNAPSHOT_FILES {
        let got = std::fs::read(snapshot.join(file)).unwrap();
        let want = std::fs::read(fixture().join(file)).unwrap();
        assert!(got == want, "{file} differs from the served bytes");
    }
    for skipped in ["README.md", "img_640x480.png", "pytorch_model.bin"] {
        assert!(!snapshot.join(skipped).exists(), "{skipped} was downloaded");
    }
    assert_eq!(hub_id_of(&snapshot).as_deref(), Some("tessera/tiny"));
    let ref_main = cache.path().join("models--tessera--tiny/refs/main");
    assert_eq!(std::fs::read_to_string(ref_main).unwrap(), SHA);

    // Again: everything is in the cache, nothing is downloaded.
    let served = hub.downloads.load(Ordering::SeqCst);
    assert_eq!(
        resolve(Path::new("tessera/tiny"), &opts).await.unwrap(),
        snapshot
    );
    assert_eq!(hub.downloads.load(Ordering::SeqCst), served);

    // Offline (the Hub unreachable, or HF_HUB_OFFLINE) the cached snapshot is used.
    let unreachable = options(&closed_endpoint().await, cache.path());
    assert_eq!(
        resolve(Path::new("tessera/tiny"), &unreachable)
            .await
            .unwrap(),
        snapshot
    );
    let offline = HubOptions {
        offline: true,
        ..unreachable
    };
    assert_eq!(
        resolve(Path::new("tessera/tiny"), &offline).await.unwrap(),
        snapshot
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_gated_and_incomplete_repositories_say_what_to_do() {
    let config = Arc::new(std::fs::read(fixture().join("config.json")).unwrap());
    let index = json!({"weight_map": {
        "a": "model-00001-of-00002.safetensors",
        "b": "model-00002-of-00002.safetensors",
    }});
    let sharded: Files = BTreeMap::from([
        ("config.json".to_owned(), config.clone()),
        (
            "model.safetensors.index.json".to_owned(),
            Arc::new(index.to_string().into_bytes()),
        ),
        (
            "model-00001-of-00002.safetensors".to_owned(),
            Arc::new(std::fs::read(fixture().join("model.safetensors")).unwrap()),
        ),
    ]);
    let hub = Arc::new(Hub {
        repos: BTreeMap::from([
            ("tessera/gated".to_owned(), tiny_repo()),
            ("tessera/sharded".to_owned(), sharded),
            (
                "tessera/pickles".to_owned(),
                BTreeMap::from([
                    ("config.json".to_owned(), config),
                    ("pytorch_model.bin".to_owned(), Arc::new(vec![0; 8])),
                ]),
            ),
        ]),
        gated: vec!["tessera/gated".to_owned()],
        ..Hub::default()
    });
    let endpoint = serve(hub).await;
    let cache = tempfile::tempdir().unwrap();
    let opts = options(&endpoint, cache.path());

    let err = resolve(Path::new("tessera/nope"), &opts).await.unwrap_err();
    assert!(matches!(err, HubError::UnknownRepo { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("tessera/nope"), "{message}");
    assert!(message.contains("404"), "{message}");
    assert!(message.contains("--model PATH"), "{message}");

    let err = resolve(Path::new("tessera/broken"), &opts)
        .await
        .unwrap_err();
    assert!(matches!(err, HubError::Download { .. }), "{err:?}");
    assert!(err.to_string().contains("500"), "{err}");

    let err = resolve(Path::new("tessera/gated"), &opts)
        .await
        .unwrap_err();
    assert!(
        matches!(err, HubError::Refused { status: 401, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("set HF_TOKEN"), "{err}");
    let wrong = HubOptions {
        token: Some("hf_wrong".into()),
        ..opts.clone()
    };
    let err = resolve(Path::new("tessera/gated"), &wrong)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("HF_TOKEN given was not accepted"),
        "{err}"
    );
    let with_token = HubOptions {
        token: Some(TOKEN.into()),
        ..opts.clone()
    };
    let snapshot = resolve(Path::new("tessera/gated"), &with_token)
        .await
        .unwrap();
    assert!(snapshot.join("model.safetensors").is_file());

    let err = resolve(Path::new("tessera/sharded"), &opts)
        .await
        .unwrap_err();
    assert!(matches!(err, HubError::NotASnapshot { .. }), "{err:?}");
    assert!(
        err.to_string().contains("model-00002-of-00002.safetensors"),
        "{err}"
    );
    let err = resolve(Path::new("tessera/pickles"), &opts)
        .await
        .unwrap_err();
    assert!(matches!(err, HubError::NotASnapshot { .. }), "{err:?}");
    assert!(err.to_string().contains("safetensors"), "{err}");
}
