//! [`EtcdDiscovery`]: the distributed [`Discovery`], kept in etcd.
//!
//! Keys under a prefix such as `/tessera`:
//! - `<prefix>/members/<role>/<id>`: a JSON [`Member`], put under a lease its
//!   [`Registration`] keeps alive. A process that dies without deregistering
//!   leaves when the lease's TTL runs out; a lease lost while the process lives
//!   (etcd restarted without its data, a long partition) is granted and put again.
//! - `<prefix>/placement`: the newest JSON [`Placement`].
//!
//! One background task per client watches the prefix from the revision it read
//! (re-syncing with a fresh read and watch when the watch breaks) and mirrors it
//! into two watch channels, so every read is local and never blocks.
//!
//! The trait's methods are synchronous, so writes go to spawned tasks:
//! - `register` checks the member and that this client holds no live
//!   registration of the id, then returns at once; the member shows up in
//!   `members()` when etcd has it. Across processes an id is claimed with
//!   put-if-absent: a second live holder (e.g. a restarted worker while its
//!   previous incarnation's lease still runs) waits, warning, until the key is
//!   free, then takes over.
//! - `publish_placement` checks completeness and newness against the local view
//!   (returning [`Error::IncompletePlacement`] / [`Error::StalePlacement`] as the
//!   other discoveries do), updates the local view at once, and spawns
//!   [`EtcdDiscovery::store_placement`], a compare-and-swap that writes only if
//!   etcd holds no placement or an older one. If another process won with an
//!   equal or newer version, its placement replaces ours locally. Equal
//!   placements published twice (several schedulers running the same placer)
//!   are harmless.
//!
//! Parts: `mirror` (key layout, first read, the watch task) and `registration`
//! (the task that holds one registration's lease).

mod mirror;
mod registration;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, Txn, TxnOp};
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{Discovery, Member, Registration};
use crate::error::{Error, Result};
use crate::placement::Placement;
use mirror::{Keys, Mirror};

/// The lease TTL when none is configured.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(3);
/// How long one etcd call may take before it counts as failed.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// The pause before retrying after etcd failed.
const RETRY: Duration = Duration::from_millis(500);

/// Runs one etcd call with [`CALL_TIMEOUT`], naming `what` in the error.
async fn within<T>(
    what: &'static str,
    call: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(Error::Etcd {
            what,
            cause: e.to_string(),
        }),
        Err(_) => Err(Error::Etcd {
            what,
            cause: format!("no answer within {CALL_TIMEOUT:?}"),
        }),
    }
}

/// Sleeps for `pause`; `false` if `stop` fired first.
async fn pause_unless_stopped(pause: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(pause) => true,
    }
}

/// What the background tasks share with the handle.
struct Shared {
    client: Client,
    keys: Keys,
    mirror: Mirror,
    /// Stops the watcher and pending placement writes when the handle is dropped.
    stop: CancellationToken,
}

impl Shared {
    /// See [`EtcdDiscovery::store_placement`].
    async fn store_placement(&self, placement: &Placement) -> Result<()> {
        let missing = placement.missing();
        if missing > 0 {
            return Err(Error::IncompletePlacement {
                version: placement.version,
                missing,
            });
        }
        let key = self.keys.placement();
        let json = serde_json::to_vec(placement).expect("a placement always serializes");
        let mut client = self.client.clone();
        loop {
            let stored = within("placement read", client.get(key.clone(), None)).await?;
            let stored = stored.kvs().first().map(|kv| {
                let value = serde_json::from_slice::<Placement>(kv.value()).ok();
                (value, kv.mod_revision())
            });
            let compare = match stored {
                Some((Some(current), _)) if current == *placement => {
                    self.mirror.apply_placement(current);
                    return Ok(());
                }
                Some((Some(current), _)) if current.version >= placement.version => {
                    let version = current.version;
                    self.mirror.apply_placement(current);
                    return Err(Error::StalePlacement {
                        version: placement.version,
                        current: version,
                    });
                }
                // Older, or unreadable (then overwritten): replace it if unchanged.
                Some((_, revision)) => {
                    Compare::mod_revision(key.clone(), CompareOp::Equal, revision)
                }
                None => Compare::create_revision(key.clone(), CompareOp::Equal, 0),
            };
            let txn =
                Txn::new()
                    .when([compare])
                    .and_then([TxnOp::put(key.clone(), json.clone(), None)]);
            if within("placement write", client.txn(txn))
                .await?
                .succeeded()
            {
                tracing::info!(version = placement.version, "placement stored in etcd");
                return Ok(());
            }
            // Another writer changed the key after we read it: read again.
        }
    }

    /// Retries [`Shared::store_placement`] while etcd fails, until the
    /// placement is stored, refused, superseded locally, or the handle dropped.
    async fn store_until_settled(self: Arc<Self>, placement: Placement) {
        loop {
            match self.store_placement(&placement).await {
                Ok(()) => return,
                Err(Error::StalePlacement { current, .. }) => {
                    tracing::info!(
                        version = placement.version,
                        current,
                        "another process stored an equal or newer placement first; keeping it"
                    );
                    return;
                }
                Err(e) => tracing::warn!(
                    error = %e,
                    version = placement.version,
                    "cannot store the placement in etcd; retrying"
                ),
            }
            let superseded = self
                .mirror
                .placement()
                .is_some_and(|p| p.version > placement.version);
            if superseded || !pause_unless_stopped(RETRY, &self.stop).await {
                return;
            }
        }
    }
}

/// Membership and placement kept in etcd. See the module docs.
pub struct EtcdDiscovery {
    shared: Arc<Shared>,
    lease_ttl_secs: i64,
    /// Ids with a live registration made through this client.
    local_ids: Arc<Mutex<BTreeSet<String>>>,
    /// Where registration and placement tasks run: the runtime of `connect`.
    runtime: Handle,
}

/// TLS to etcd: PEM bytes of the CA that signed etcd's certificate and of this
/// client's certificate and key.
#[derive(Debug, Clone)]
pub struct EtcdTls {
    pub ca: Vec<u8>,
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
}

impl EtcdTls {
    fn options(&self) -> etcd_client::TlsOptions {
        etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(&self.ca))
            .identity(etcd_client::Identity::from_pem(&self.cert, &self.key))
    }
}

impl EtcdDiscovery {
    /// Connects to etcd at `endpoints` (`http://host:port` or `host:port`), reads
    /// the members and placement under `prefix`, and starts following them.
    /// Registrations hold leases of `lease_ttl` (rounded up to whole seconds, at
    /// least 1 s). Call it inside the tokio runtime that is to run the
    /// background tasks; the trait's methods may then be called from anywhere.
    pub async fn connect(
        endpoints: &[String],
        prefix: &str,
        lease_ttl: Duration,
    ) -> Result<Arc<Self>> {
        Self::connect_with(endpoints, prefix, lease_ttl, None).await
    }

    /// [`EtcdDiscovery::connect`] over TLS to `https://` endpoints: `tls` gives
    /// the CA that signed etcd's certificate and this client's certificate and key
    /// (for etcd's `--client-cert-auth`).
    pub async fn connect_with(
        endpoints: &[String],
        prefix: &str,
        lease_ttl: Duration,
        tls: Option<EtcdTls>,
    ) -> Result<Arc<Self>> {
        let config = |reason: String| Error::EtcdConfig { reason };
        if endpoints.is_empty() || endpoints.iter().any(|e| e.trim().is_empty()) {
            return Err(config("give at least one non-empty etcd endpoint".into()));
        }
        let prefix = prefix.trim_end_matches('/');
        if prefix.is_empty() {
            return Err(config("the key prefix is empty; use e.g. /tessera".into()));
        }
        if lease_ttl < Duration::from_secs(1) || lease_ttl > Duration::from_secs(3600) {
            return Err(config(format!(
                "the lease TTL must be between 1 s and 1 h, not {lease_ttl:?}"
            )));
        }
        let lease_ttl_secs = lease_ttl.as_secs_f64().ceil() as i64;

        let unreachable = |cause: String| Error::EtcdUnreachable {
            endpoints: endpoints.join(","),
            cause,
        };
        let mut options = ConnectOptions::new()
            .with_connect_timeout(CALL_TIMEOUT)
            .with_keep_alive(Duration::from_secs(10), CALL_TIMEOUT);
        if let Some(tls) = tls {
            options = options.with_tls(tls.options());
        }
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let keys = Keys::new(prefix);
        let snapshot = mirror::load(&mut client.clone(), &keys)
            .await
            .map_err(|e| match e {
                Error::Etcd { cause, .. } => unreachable(cause),
                other => other,
            })?;
        tracing::info!(
            endpoints = %endpoints.join(","),
            prefix,
            members = snapshot.members.len(),
            "connected to etcd"
        );

        let view = Mirror::new();
        let (revision, members) = view.show(snapshot);
        let shared = Arc::new(Shared {
            client,
            keys,
            mirror: view,
            stop: CancellationToken::new(),
        });
        let runtime = Handle::current();
        runtime.spawn(mirror::follow(shared.clone(), revision, members));
        Ok(Arc::new(EtcdDiscovery {
            shared,
            lease_ttl_secs,
            local_ids: Arc::default(),
            runtime,
        }))
    }

    /// Writes `placement` to etcd unless etcd already holds an equal or newer
    /// version: a compare-and-swap on the key's revision, read again and retried
    /// when another writer got in between. Storing the placement etcd already
    /// holds is Ok; a different placement at an equal or lower version is
    /// [`Error::StalePlacement`] (etcd's then replaces the local one); an
    /// incomplete one is [`Error::IncompletePlacement`]. Unlike
    /// [`Discovery::publish_placement`] this asks etcd, not the local view, and
    /// waits for the answer.
    pub async fn store_placement(&self, placement: &Placement) -> Result<()> {
        self.shared.store_placement(placement).await
    }

    /// The key prefix, without a trailing `/`.
    pub fn prefix(&self) -> &str {
        self.shared.keys.prefix()
    }
}

impl Drop for EtcdDiscovery {
    fn drop(&mut self) {
        self.shared.stop.cancel();
    }
}

impl std::fmt::Debug for EtcdDiscovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdDiscovery")
            .field("prefix", &self.prefix())
            .field("lease_ttl_secs", &self.lease_ttl_secs)
            .finish_non_exhaustive()
    }
}

impl Discovery for EtcdDiscovery {
    /// Returns at once; the member shows up in [`Discovery::members`] once etcd
    /// holds it (see the module docs for ids held by another process).
    fn register(&self, member: Member) -> Result<Registration> {
        member.validate()?;
        let newly_held = self
            .local_ids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(member.id.clone());
        if !newly_held {
            return Err(Error::AlreadyRegistered { id: member.id });
        }
        let stop = CancellationToken::new();
        self.runtime.spawn(registration::keep_registered(
            self.shared.client.clone(),
            self.shared.keys.member(&member),
            member.clone(),
            self.lease_ttl_secs,
            stop.clone(),
        ));
        let local_ids = Arc::downgrade(&self.local_ids);
        let id = member.id.clone();
        Ok(Registration::new(member, move || {
            stop.cancel();
            if let Some(ids) = local_ids.upgrade() {
                ids.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&id);
            }
        }))
    }

    fn members(&self) -> Vec<Member> {
        self.shared.mirror.members()
    }

    fn subscribe(&self) -> watch::Receiver<Vec<Member>> {
        self.shared.mirror.subscribe()
    }

    /// Checks `placement` against the local view, shows it locally at once and
    /// stores it in etcd on a spawned task (see the module docs).
    fn publish_placement(&self, placement: Placement) -> Result<()> {
        let missing = placement.missing();
        if missing > 0 {
            return Err(Error::IncompletePlacement {
                version: placement.version,
                missing,
            });
        }
        match self.shared.mirror.placement() {
            Some(current) if current == placement => return Ok(()),
            Some(current) if current.version >= placement.version => {
                return Err(Error::StalePlacement {
                    version: placement.version,
                    current: current.version,
                });
            }
            _ => {}
        }
        self.shared.mirror.apply_placement(placement.clone());
        self.runtime
            .spawn(self.shared.clone().store_until_settled(placement));
        Ok(())
    }

    fn placement(&self) -> Option<Placement> {
        self.shared.mirror.placement()
    }

    fn subscribe_placement(&self) -> watch::Receiver<Option<Placement>> {
        self.shared.mirror.subscribe_placement()
    }
}
