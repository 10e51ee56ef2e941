//! Client API keys (`--api-key-file`): who may call the public APIs.
//!
//! The file holds one key per line, either the key itself or `sha256:` and the hex
//! SHA-256 of the key (so the file need not hold usable secrets), optionally after
//! `admin:` for an operator's key; blank lines and lines starting with `#` are skipped.
//! Only admin keys see the cluster's internal addresses, the model's path and the
//! metrics ([`Access::Admin`]). A client sends a key as OpenAI clients do,
//! `Authorization: Bearer KEY`, as an HTTP header or as gRPC metadata. Keys are kept
//! only as their hashes and a presented key is hashed before it is looked up.
//!
//! The file is read at start (a missing, unreadable or keyless file stops the gateway)
//! and again whenever it changes (checked every [`RELOAD_EVERY`]) or the process gets
//! SIGHUP; a file that turns unreadable or keyless later keeps the previous keys and
//! logs why. Without `--api-key-file` every call is allowed, as before.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use tessera_runtime::shutdown::CancellationToken;
use tonic::metadata::MetadataMap;

use crate::error::{Error, Result};

/// How often the key file is checked for changes.
pub const RELOAD_EVERY: Duration = Duration::from_secs(2);

type Hash = [u8; 32];

/// A key by its SHA-256: what per-key limits count under.
pub type KeyId = Hash;

/// What a caller may see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Access {
    /// Generations and the public facts about the model.
    Client,
    /// Also the members' addresses, the model's path and the metrics; every caller
    /// has it when no keys are required.
    Admin,
}

/// The keys allowed to call the public APIs, or none required.
#[derive(Debug)]
pub struct ApiKeys {
    file: Option<PathBuf>,
    state: RwLock<Loaded>,
}

#[derive(Debug, Default)]
struct Loaded {
    hashes: HashMap<Hash, Access>,
    /// The file's modification time and length when it was read.
    stamp: Option<(SystemTime, u64)>,
}

impl ApiKeys {
    /// No keys: every call is allowed.
    pub fn open() -> Arc<Self> {
        Arc::new(Self {
            file: None,
            state: RwLock::new(Loaded::default()),
        })
    }

    /// The keys of `file`, or [`ApiKeys::open`] without one.
    pub fn from_file(file: Option<&Path>) -> Result<Arc<Self>> {
        let Some(file) = file else {
            return Ok(Self::open());
        };
        let keys = Self {
            file: Some(file.to_owned()),
            state: RwLock::new(Loaded::default()),
        };
        let loaded = read(file)?;
        tracing::info!(file = %file.display(), keys = loaded.hashes.len(), "API keys loaded");
        *keys.state.write().unwrap_or_else(PoisonError::into_inner) = loaded;
        Ok(Arc::new(keys))
    }

    /// Whether calls need a key.
    pub fn required(&self) -> bool {
        self.file.is_some()
    }

    /// Checks the `authorization` of a call: what its key allows, UNAUTHENTICATED
    /// without a known key when keys are required (and [`Access::Admin`] when not).
    pub fn check(&self, metadata: &MetadataMap) -> Result<Access> {
        self.caller(metadata).map(|(access, _)| access)
    }

    /// [`ApiKeys::check`], and which key the call carried (none when no keys are
    /// required).
    pub fn caller(&self, metadata: &MetadataMap) -> Result<(Access, Option<KeyId>)> {
        if !self.required() {
            return Ok((Access::Admin, None));
        }
        let Some(key) = bearer(metadata) else {
            return Err(Error::Unauthenticated(
                "this server needs an API key: send `Authorization: Bearer KEY`".into(),
            ));
        };
        let hash: Hash = Sha256::digest(key.as_bytes()).into();
        let known = self
            .state
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .hashes
            .get(&hash)
            .copied();
        known
            .map(|access| (access, Some(hash)))
            .ok_or_else(|| Error::Unauthenticated("the API key is not valid".into()))
    }

    /// Reads the file again if it changed since it was read (or `force`); keeps the
    /// keys it has when the file cannot be read or holds none. Whether keys changed.
    pub fn reload(&self, force: bool) -> Result<bool> {
        let Some(file) = &self.file else {
            return Ok(false);
        };
        let now = stamp(file).ok();
        let before = self
            .state
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .stamp;
        if !force && now.is_some() && now == before {
            return Ok(false);
        }
        let loaded = read(file)?;
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        let changed = loaded.hashes != state.hashes;
        *state = loaded;
        Ok(changed)
    }

    /// Reloads the file when it changes or on SIGHUP, until `stop`.
    pub async fn watch(self: Arc<Self>, stop: CancellationToken) {
        let Some(file) = self.file.clone() else {
            return;
        };
        let mut hangups = hangups();
        let mut every = tokio::time::interval(RELOAD_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let force = tokio::select! {
                () = stop.cancelled() => return,
                _ = every.tick() => false,
                () = next_hangup(&mut hangups) => true,
            };
            match self.reload(force) {
                Ok(true) => tracing::info!(file = %file.display(), "API keys reloaded"),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "API keys not reloaded; keeping the previous keys")
                }
            }
        }
    }
}

#[cfg(unix)]
type Hangups = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangups = Option<()>;

#[cfg(unix)]
fn hangups() -> Hangups {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
}

#[cfg(not(unix))]
fn hangups() -> Hangups {
    None
}

/// The next SIGHUP (never, where there are none).
async fn next_hangup(hangups: &mut Hangups) {
    #[cfg(unix)]
    if let Some(signal) = hangups
        && signal.recv().await.is_some()
    {
        return;
    }
    let _ = hangups;
    std::future::pending::<()>().await;
}

/// The key of `Authorization: Bearer KEY`.
fn bearer(metadata: &MetadataMap) -> Option<&str> {
    let value = metadata.get("authorization")?.to_str().ok()?.trim();
    let (scheme, key) = value.split_once(' ')?;
    let key = key.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !key.is_empty()).then_some(key)
}

fn stamp(file: &Path) -> std::io::Result<(SystemTime, u64)> {
    let meta = std::fs::metadata(file)?;
    Ok((meta.modified()?, meta.len()))
}

fn read(file: &Path) -> Result<Loaded> {
    let bad = |why: String| Error::Config(format!("--api-key-file {}: {why}", file.display()));
    let stamp = stamp(file).ok();
    let text = std::fs::read_to_string(file).map_err(|e| bad(e.to_string()))?;
    let hashes = parse(&text).map_err(bad)?;
    if hashes.is_empty() {
        return Err(bad("holds no keys".into()));
    }
    Ok(Loaded { hashes, stamp })
}

/// The hashes of the keys in a key file's text, with what each allows.
fn parse(text: &str) -> std::result::Result<HashMap<Hash, Access>, String> {
    let mut hashes = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (access, line) = match line.strip_prefix("admin:") {
            Some(rest) => (Access::Admin, rest.trim()),
            None => (Access::Client, line),
        };
        let hash = match line.strip_prefix("sha256:") {
            Some(hex) => from_hex(hex.trim())
                .ok_or_else(|| format!("line {}: `sha256:` needs 64 hexadecimal digits", n + 1))?,
            None if line.contains(char::is_whitespace) => {
                return Err(format!("line {}: a key has no spaces", n + 1));
            }
            None => Sha256::digest(line.as_bytes()).into(),
        };
        let known = hashes.entry(hash).or_insert(access);
        *known = (*known).max(access);
    }
    Ok(hashes)
}

fn from_hex(hex: &str) -> Option<Hash> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (o, pair) in out.iter_mut().zip(hex.as_bytes().chunks_exact(2)) {
        let digit = |c: u8| (c as char).to_digit(16);
        *o = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(authorization: Option<&str>) -> MetadataMap {
        let mut md = MetadataMap::new();
        if let Some(a) = authorization {
            md.insert("authorization", a.parse().unwrap());
        }
        md
    }

    #[test]
    fn keys_and_hashes_are_read_and_checked() {
        let hashed = Sha256::digest(b"second-key-456");
        let hex: String = hashed.iter().map(|b| format!("{b:02x}")).collect();
        let text = format!("# clients\n\nfirst-key-123\n  admin:sha256:{hex}  \n");
        let hashes = parse(&text).unwrap();
        assert_eq!(hashes.len(), 2);
        let keys = ApiKeys {
            file: Some(PathBuf::from("keys")),
            state: RwLock::new(Loaded {
                hashes,
                stamp: None,
            }),
        };
        let access = |a: &str| keys.check(&metadata(Some(a))).unwrap();
        assert_eq!(access("Bearer first-key-123"), Access::Client);
        assert_eq!(access("bearer  second-key-456 "), Access::Admin);
        for bad in [
            None,
            Some("Bearer"),
            Some("Bearer wrong"),
            Some("Basic first-key-123"),
            Some("first-key-123"),
            Some(hex.as_str()),
        ] {
            let err = keys.check(&metadata(bad)).unwrap_err();
            assert!(matches!(err, Error::Unauthenticated(_)), "{bad:?}: {err}");
        }
        let open = ApiKeys::open().check(&metadata(None)).unwrap();
        assert_eq!(open, Access::Admin);
    }

    #[test]
    fn bad_lines_name_themselves() {
        assert!(parse("sha256:abc").unwrap_err().contains("line 1"));
        assert!(parse("ok-key\nhas space").unwrap_err().contains("line 2"));
        assert!(parse("# only a comment\n").unwrap().is_empty());
    }

    #[test]
    fn a_changed_file_is_read_again_and_a_broken_one_keeps_the_keys() {
        let dir = std::env::temp_dir().join(format!("tessera-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("keys");
        std::fs::write(&file, "alpha-key\n").unwrap();
        let keys = ApiKeys::from_file(Some(&file)).unwrap();
        assert!(keys.check(&metadata(Some("Bearer alpha-key"))).is_ok());
        std::fs::write(&file, "beta-key\nbeta-key-2\n").unwrap();
        assert!(keys.reload(true).unwrap());
        assert!(keys.check(&metadata(Some("Bearer alpha-key"))).is_err());
        assert!(keys.check(&metadata(Some("Bearer beta-key-2"))).is_ok());
        std::fs::write(&file, "# nothing\n").unwrap();
        assert!(keys.reload(true).is_err());
        assert!(keys.check(&metadata(Some("Bearer beta-key"))).is_ok());
        std::fs::remove_file(&file).unwrap();
        assert!(ApiKeys::from_file(Some(&file)).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
