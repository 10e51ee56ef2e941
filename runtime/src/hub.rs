//! `--model` as a Hugging Face Hub id: [`resolve`] turns `deepseek-ai/deepseek-vl2-tiny`
//! into a local snapshot folder, downloading what serving needs (the configurations,
//! the tokenizer and the safetensors) into the Hub cache, as `huggingface_hub` lays
//! it out, so a snapshot downloaded once is found again without the network.
//!
//! A local folder is used as it is. Settings come from the usual Hub variables,
//! read once at start-up by [`HubOptions::from_env`]: `HF_ENDPOINT`, `HF_HOME` /
//! `HF_HUB_CACHE`, `HF_TOKEN` and `HF_HUB_OFFLINE`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hf_hub::api::tokio::{ApiBuilder, ApiError, ApiRepo, Progress};
use hf_hub::{Cache, Repo, RepoType};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The public Hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// The revision `--revision` defaults to.
pub const DEFAULT_REVISION: &str = "main";
/// Longest wait for the Hub to describe a repository.
const INFO_TIMEOUT: Duration = Duration::from_secs(30);
/// The weight index a sharded snapshot has.
const INDEX: &str = "model.safetensors.index.json";

/// Where and how Hub snapshots are fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubOptions {
    /// The Hub's address, e.g. [`DEFAULT_ENDPOINT`] (`HF_ENDPOINT`).
    pub endpoint: String,
    /// The Hub cache folder (`HF_HUB_CACHE`, else `HF_HOME/hub`).
    pub cache_dir: PathBuf,
    /// An access token for gated or private repositories (`HF_TOKEN`).
    pub token: Option<String>,
    /// A branch, tag or commit (`--revision`).
    pub revision: String,
    /// Use only what the cache holds (`HF_HUB_OFFLINE=1`).
    pub offline: bool,
    /// Draw download bars on stderr.
    pub progress: bool,
}

impl HubOptions {
    /// The public Hub, caching in `cache_dir`, at `revision`, without a token.
    pub fn new(cache_dir: impl Into<PathBuf>, revision: impl Into<String>) -> Self {
        Self {
            endpoint: DEFAULT_ENDPOINT.to_owned(),
            cache_dir: cache_dir.into(),
            token: None,
            revision: revision.into(),
            offline: false,
            progress: false,
        }
    }

    /// The options the process environment sets, at `revision`; bars when stderr is
    /// a terminal.
    pub fn from_env(revision: impl Into<String>) -> Self {
        let mut opts = Self::from_vars(revision, |name| std::env::var(name).ok());
        opts.progress = std::io::stderr().is_terminal();
        opts
    }

    /// The options the variables `var` looks up set (empty values count as unset).
    pub fn from_vars(revision: impl Into<String>, var: impl Fn(&str) -> Option<String>) -> Self {
        let var = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            let cache = var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| var("HOME").map(|h| Path::new(&h).join(".cache")))
                .unwrap_or_else(|| PathBuf::from(".cache"));
            cache.join("huggingface")
        });
        let token = var("HF_TOKEN")
            .or_else(|| var("HUGGING_FACE_HUB_TOKEN"))
            .or_else(|| std::fs::read_to_string(home.join("token")).ok())
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty());
        let offline = var("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        });
        Self {
            endpoint: var("HF_ENDPOINT")
                .map(|e| e.trim_end_matches('/').to_owned())
                .unwrap_or_else(|| DEFAULT_ENDPOINT.to_owned()),
            cache_dir: var("HF_HUB_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| home.join("hub")),
            token,
            revision: revision.into(),
            offline,
            progress: false,
        }
    }
}

/// Why a `--model` could not be turned into a snapshot folder.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// Neither a folder nor a Hub id.
    #[error(
        "no such model folder {}: pass --model PATH (a folder with config.json) or a Hub id \
         such as deepseek-ai/deepseek-vl2-tiny",
        path.display()
    )]
    NoSuchFolder { path: PathBuf },

    /// The Hub could not be reached and the cache has no copy.
    #[error(
        "could not download {repo} from {endpoint}: {cause}. This machine may be offline: \
         download the snapshot elsewhere and pass --model PATH (a folder with config.json)"
    )]
    Offline {
        repo: String,
        endpoint: String,
        cause: String,
    },

    /// `HF_HUB_OFFLINE` is set and the cache has no copy.
    #[error(
        "HF_HUB_OFFLINE is set and {repo} (revision {revision}) is not in the Hub cache at {}: \
         unset HF_HUB_OFFLINE to download it, or pass --model PATH (a folder with config.json)",
        cache_dir.display()
    )]
    NotCached {
        repo: String,
        revision: String,
        cache_dir: PathBuf,
    },

    /// The Hub has no such repository or revision.
    #[error(
        "{repo} (revision {revision}) is unknown to {endpoint} (HTTP 404): check the \
         repository id and --revision, or pass --model PATH to a local snapshot folder"
    )]
    UnknownRepo {
        repo: String,
        revision: String,
        endpoint: String,
    },

    /// The HTTP client could not be set up.
    #[error("cannot set up the Hub client: {cause} (check HF_TOKEN and HF_ENDPOINT)")]
    Setup { cause: String },

    /// The Hub refused access: a gated or private repository.
    #[error(
        "{endpoint} refused access to {repo} (HTTP {status}): it is gated, private or does \
         not exist. {hint}"
    )]
    Refused {
        repo: String,
        endpoint: String,
        status: u16,
        hint: &'static str,
    },

    /// The repository is not a snapshot Tessera can serve.
    #[error("{repo} is not a DeepSeek-VL2 snapshot Tessera can load: {reason}")]
    NotASnapshot { repo: String, reason: String },

    /// A download failed part-way.
    #[error("downloading {file} of {repo} from {endpoint} failed: {cause}")]
    Download {
        repo: String,
        file: String,
        endpoint: String,
        cause: String,
    },

    /// The cache folder could not be written.
    #[error("cannot write the Hub cache at {}: {source}", path.display())]
    Cache {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Whether `model` reads as a Hub id, `owner/name`, rather than a path.
pub fn is_hub_id(model: &str) -> bool {
    let mut parts = model.split('/');
    let (Some(owner), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let valid = |s: &str| {
        !s.is_empty()
            && s.len() <= 96
            && !s.starts_with(['.', '-'])
            && !s.contains("..")
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    valid(owner) && valid(name)
}

/// The snapshot folder `model` names: an existing folder as it is; a Hub id
/// (`owner/name`) downloaded into the cache (or found there when the Hub cannot be
/// reached); anything else is [`HubError::NoSuchFolder`].
pub async fn resolve(model: &Path, opts: &HubOptions) -> Result<PathBuf, HubError> {
    if model.is_dir() {
        return Ok(model.to_path_buf());
    }
    let id = model.to_string_lossy();
    if model.exists() || !is_hub_id(&id) {
        return Err(HubError::NoSuchFolder {
            path: model.to_path_buf(),
        });
    }
    let id = id.into_owned();
    if opts.offline {
        return cached_snapshot(&opts.cache_dir, &id, &opts.revision).ok_or_else(|| {
            HubError::NotCached {
                repo: id.clone(),
                revision: opts.revision.clone(),
                cache_dir: opts.cache_dir.clone(),
            }
        });
    }
    download(&id, opts).await
}

/// [`resolve`] for callers without a tokio runtime (it starts a small one when it
/// has to download). Must not be called from inside a runtime.
pub fn resolve_blocking(model: &Path, opts: &HubOptions) -> Result<PathBuf, HubError> {
    if model.is_dir() {
        return Ok(model.to_path_buf());
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| HubError::Cache {
            path: opts.cache_dir.clone(),
            source,
        })?;
    runtime.block_on(resolve(model, opts))
}

/// The files of a repository that serving reads: top-level JSON (configurations,
/// tokenizer, weight index) and safetensors.
fn wanted(file: &str) -> bool {
    !file.contains('/') && (file.ends_with(".json") || file.ends_with(".safetensors"))
}

async fn download(id: &str, opts: &HubOptions) -> Result<PathBuf, HubError> {
    let api = ApiBuilder::from_cache(Cache::new(opts.cache_dir.clone()))
        .with_endpoint(opts.endpoint.clone())
        .with_token(opts.token.clone())
        .with_progress(false)
        .build()
        .map_err(|e| HubError::Setup { cause: causes(&e) })?;
    let repo = api.repo(Repo::with_revision(
        id.to_owned(),
        RepoType::Model,
        opts.revision.clone(),
    ));
    let info = match tokio::time::timeout(INFO_TIMEOUT, repo.info()).await {
        Ok(Ok(info)) => info,
        Ok(Err(e)) => {
            if let Some(refusal) = refused(id, opts, &e) {
                return Err(refusal);
            }
            let answered = matches!(&e, ApiError::RequestError(r) if r.status().is_some());
            let error = if answered {
                HubError::Download {
                    repo: id.to_owned(),
                    file: "the repository description".to_owned(),
                    endpoint: opts.endpoint.clone(),
                    cause: causes(&e),
                }
            } else {
                offline(id, opts, causes(&e))
            };
            return from_cache(id, opts, error);
        }
        Err(_) => {
            let cause = format!("no answer within {}s", INFO_TIMEOUT.as_secs());
            return from_cache(id, opts, offline(id, opts, cause));
        }
    };
    let files: Vec<String> = info
        .siblings
        .iter()
        .map(|s| s.rfilename.clone())
        .filter(|f| wanted(f))
        .collect();
    let not_snapshot = |reason: &str| HubError::NotASnapshot {
        repo: id.to_owned(),
        reason: reason.to_owned(),
    };
    if !files.iter().any(|f| f == "config.json") {
        return Err(not_snapshot("it has no config.json"));
    }
    if !files.iter().any(|f| f.ends_with(".safetensors")) {
        return Err(not_snapshot(
            "it has no *.safetensors weights (only safetensors checkpoints are supported)",
        ));
    }
    // Every file from the commit the revision names now, even if it moves meanwhile.
    let pinned = Repo::with_revision(id.to_owned(), RepoType::Model, info.sha.clone());
    let cache = Cache::new(opts.cache_dir.clone()).repo(pinned.clone());
    let pinned_api = api.repo(pinned);
    tracing::info!(
        repo = id,
        revision = %opts.revision,
        commit = %info.sha,
        files = files.len(),
        cache = %opts.cache_dir.display(),
        "fetching model snapshot"
    );
    let mut snapshot: Option<PathBuf> = None;
    for file in &files {
        let path = match cache.get(file) {
            Some(path) => path,
            None => fetch(&pinned_api, file, opts)
                .await
                .map_err(|e| HubError::Download {
                    repo: id.to_owned(),
                    file: file.clone(),
                    endpoint: opts.endpoint.clone(),
                    cause: causes(&e),
                })?,
        };
        let folder = path.parent().map(Path::to_path_buf);
        match (&snapshot, folder) {
            (None, folder) => snapshot = folder,
            (Some(s), Some(folder)) if *s == folder => {}
            _ => {
                return Err(HubError::Download {
                    repo: id.to_owned(),
                    file: file.clone(),
                    endpoint: opts.endpoint.clone(),
                    cause: "the Hub served it from another commit than the other files".into(),
                });
            }
        }
    }
    let snapshot = snapshot.expect("config.json was fetched");
    check_shards(&snapshot).map_err(|reason| not_snapshot(&reason))?;
    // Name the commit under the revision asked for, so an offline start finds it.
    Cache::new(opts.cache_dir.clone())
        .repo(Repo::with_revision(
            id.to_owned(),
            RepoType::Model,
            opts.revision.clone(),
        ))
        .create_ref(&info.sha)
        .map_err(|source| HubError::Cache {
            path: opts.cache_dir.clone(),
            source,
        })?;
    Ok(snapshot)
}

/// Downloads one file, with a bar on stderr when `opts.progress` is set.
async fn fetch(repo: &ApiRepo, file: &str, opts: &HubOptions) -> Result<PathBuf, ApiError> {
    let bar = if opts.progress {
        ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    let path = repo
        .download_with_progress(file, DownloadBar(bar.clone()))
        .await?;
    tracing::info!(file, bytes = bar.length().unwrap_or(0), "downloaded");
    Ok(path)
}

/// Checks that every shard the weight index names is in the folder.
fn check_shards(snapshot: &Path) -> Result<(), String> {
    let Ok(text) = std::fs::read_to_string(snapshot.join(INDEX)) else {
        return Ok(());
    };
    let index: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{INDEX} is not valid JSON: {e}"))?;
    let shards = index["weight_map"]
        .as_object()
        .ok_or_else(|| format!("{INDEX} has no weight_map"))?
        .values()
        .filter_map(serde_json::Value::as_str);
    for shard in shards {
        if !snapshot.join(shard).is_file() {
            return Err(format!(
                "{INDEX} names {shard}, which the repository does not have"
            ));
        }
    }
    Ok(())
}

/// The error of a Hub that answered with a refusal (404, 401, 403), if it did.
fn refused(id: &str, opts: &HubOptions, e: &ApiError) -> Option<HubError> {
    let ApiError::RequestError(request) = e else {
        return None;
    };
    let status = request.status()?.as_u16();
    match status {
        404 => Some(HubError::UnknownRepo {
            repo: id.to_owned(),
            revision: opts.revision.clone(),
            endpoint: opts.endpoint.clone(),
        }),
        401 | 403 => Some(HubError::Refused {
            repo: id.to_owned(),
            endpoint: opts.endpoint.clone(),
            status,
            hint: if opts.token.is_some() {
                "The HF_TOKEN given was not accepted: check that it is valid and that its \
                 account accepted the model's terms on the Hub"
            } else {
                "If it is gated, accept its terms on the Hub and set HF_TOKEN to an access \
                 token; otherwise check the repository id"
            },
        }),
        _ => None,
    }
}

/// The cached snapshot when the Hub cannot be used, else `error`.
fn from_cache(id: &str, opts: &HubOptions, error: HubError) -> Result<PathBuf, HubError> {
    let Some(snapshot) = cached_snapshot(&opts.cache_dir, id, &opts.revision) else {
        return Err(error);
    };
    tracing::warn!(repo = id, cause = %error, snapshot = %snapshot.display(),
        "the Hub cannot be used; loading the cached snapshot");
    Ok(snapshot)
}

fn offline(id: &str, opts: &HubOptions, cause: String) -> HubError {
    HubError::Offline {
        repo: id.to_owned(),
        endpoint: opts.endpoint.clone(),
        cause,
    }
}

/// A complete snapshot of `id` at `revision` (a name in `refs/` or a commit) in the
/// cache: one with config.json and its weights.
pub fn cached_snapshot(cache_dir: &Path, id: &str, revision: &str) -> Option<PathBuf> {
    let repo = cache_dir.join(format!("models--{}", id.replace('/', "--")));
    let commit = std::fs::read_to_string(repo.join("refs").join(revision))
        .map(|c| c.trim().to_owned())
        .unwrap_or_else(|_| revision.to_owned());
    if commit.is_empty() || commit.contains(['/', '\\']) || commit.starts_with('.') {
        return None;
    }
    let snapshot = repo.join("snapshots").join(commit);
    let has_weights = std::fs::read_dir(&snapshot)
        .ok()?
        .filter_map(Result::ok)
        .any(|e| e.path().extension().is_some_and(|x| x == "safetensors"));
    (snapshot.join("config.json").is_file() && has_weights && check_shards(&snapshot).is_ok())
        .then_some(snapshot)
}

/// The Hub id of a snapshot folder in the Hub cache
/// (`…/models--owner--name/snapshots/<commit>`), if it is one.
pub fn hub_id_of(snapshot: &Path) -> Option<String> {
    let parent = snapshot.parent()?;
    if parent.file_name()? != "snapshots" {
        return None;
    }
    let repo = parent.parent()?.file_name()?.to_str()?;
    let id = repo.strip_prefix("models--")?.replacen("--", "/", 1);
    is_hub_id(&id).then_some(id)
}

/// An error and its sources, joined with `: `.
fn causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

/// One file's download bar (hf-hub reports its bytes through [`Progress`]).
#[derive(Clone)]
struct DownloadBar(ProgressBar);

impl Progress for DownloadBar {
    async fn init(&mut self, size: usize, filename: &str) {
        self.0.set_length(size as u64);
        self.0.set_style(
            ProgressStyle::with_template(
                "downloading {msg} [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} ({eta})",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        self.0.set_message(filename.to_owned());
    }

    async fn update(&mut self, size: usize) {
        self.0.inc(size as u64);
    }

    async fn finish(&mut self) {
        self.0.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_are_owner_slash_name() {
        for id in ["deepseek-ai/deepseek-vl2-tiny", "a/b", "org_1/model.v2"] {
            assert!(is_hub_id(id), "{id}");
        }
        for path in [
            "/abs/path",
            "./rel",
            "../up/x",
            "one",
            "a/b/c",
            "a//b",
            "a/",
            ".hidden/x",
            "a/..",
            "a b/c",
            "",
        ] {
            assert!(!is_hub_id(path), "{path}");
        }
    }

    #[test]
    fn a_cached_snapshot_is_named_by_its_hub_id() {
        let cached = Path::new("/c/hub/models--deepseek-ai--deepseek-vl2-tiny/snapshots/abc");
        assert_eq!(
            hub_id_of(cached).as_deref(),
            Some("deepseek-ai/deepseek-vl2-tiny")
        );
        for other in [
            "/m/tiny",
            "/c/models--a--b/refs/main",
            "/c/datasets--a--b/snapshots/x",
        ] {
            assert_eq!(hub_id_of(Path::new(other)), None, "{other}");
        }
    }

    #[test]
    fn the_environment_sets_endpoint_cache_token_and_offline() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        let bare = HubOptions::from_vars("main", vars(&[("HOME", "/home/u")]));
        assert_eq!(bare.endpoint, DEFAULT_ENDPOINT);
        assert_eq!(bare.cache_dir, Path::new("/home/u/.cache/huggingface/hub"));
        assert_eq!((bare.token, bare.offline), (None, false));

        let home = HubOptions::from_vars(
            "v1",
            vars(&[
                ("HOME", "/home/u"),
                ("HF_HOME", "/hf"),
                ("HF_ENDPOINT", "http://mirror:8080/"),
                ("HF_TOKEN", " hf_abc \n"),
                ("HF_HUB_OFFLINE", "1"),
            ]),
        );
        assert_eq!(home.cache_dir, Path::new("/hf/hub"));
        assert_eq!(home.endpoint, "http://mirror:8080");
        assert_eq!(home.token.as_deref(), Some("hf_abc"));
        assert_eq!(home.revision, "v1");
        assert!(home.offline);

        let cache = HubOptions::from_vars(
            "main",
            vars(&[("HF_HOME", "/hf"), ("HF_HUB_CACHE", "/c"), ("HF_TOKEN", "")]),
        );
        assert_eq!(cache.cache_dir, Path::new("/c"));
        assert_eq!(cache.token, None, "an empty HF_TOKEN is unset");
    }

    #[test]
    fn the_token_file_under_hf_home_is_read() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "hf_file\n").unwrap();
        let home = dir.path().to_str().unwrap().to_owned();
        let opts = HubOptions::from_vars("main", move |name| {
            (name == "HF_HOME").then(|| home.clone())
        });
        assert_eq!(opts.token.as_deref(), Some("hf_file"));
    }
}
