//! Discovery: who is in the cluster, and the published expert placement.
//!
//! Services register `{role, id, address, shard}`; a [`Registration`] is the
//! lease — dropping it (or [`Registration::deregister`]) takes the member out.
//! Three implementations: [`StaticDiscovery`], the embedded default, whose
//! members are fixed by configuration; [`MemoryDiscovery`], a live in-process
//! registry for tests and `tessera up`; and [`EtcdDiscovery`] (in `etcd`), the
//! distributed one, with leases that expire when a process dies. All carry the
//! newest [`Placement`], which only moves forward.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError, Weak};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::placement::Placement;

mod etcd;
pub use etcd::{DEFAULT_LEASE_TTL, EtcdDiscovery, EtcdTls};

/// What a member of the cluster does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    Gateway,
    VisionWorker,
    Scheduler,
    ExpertWorker,
}

impl Role {
    /// The name used on the command line and in discovery files.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Gateway => "gateway",
            Role::VisionWorker => "vision-worker",
            Role::Scheduler => "scheduler",
            Role::ExpertWorker => "expert-worker",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One registered service instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    pub role: Role,
    /// Unique across the cluster.
    pub id: String,
    /// Where its gRPC server is reached, e.g. `127.0.0.1:50051`.
    pub address: String,
    /// Free-form shard label, if the role has shards.
    #[serde(default)]
    pub shard: Option<String>,
    /// Fingerprint of the model the member serves (see `tessera_model::fingerprint`);
    /// unset in static member files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// For an expert-worker: the most `(layer, expert)` pairs it may hold (its
    /// expert memory budget over one expert's bytes); unset is unbounded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<usize>,
}

impl Member {
    pub fn new(role: Role, id: impl Into<String>, address: impl Into<String>) -> Self {
        Member {
            role,
            id: id.into(),
            address: address.into(),
            shard: None,
            fingerprint: None,
            capacity: None,
        }
    }

    /// The same member at another address.
    pub fn with_address(mut self, address: impl Into<String>) -> Self {
        self.address = address.into();
        self
    }

    /// The same member serving the model with `fingerprint`.
    pub fn with_fingerprint(mut self, fingerprint: impl Into<String>) -> Self {
        self.fingerprint = Some(fingerprint.into());
        self
    }

    /// The same member with a shard label.
    pub fn with_shard(mut self, shard: impl Into<String>) -> Self {
        self.shard = Some(shard.into());
        self
    }

    /// The same member able to hold at most `n` `(layer, expert)` pairs.
    pub fn with_capacity(mut self, n: usize) -> Self {
        self.capacity = Some(n);
        self
    }

    fn validate(&self) -> Result<()> {
        let reason = if self.id.trim().is_empty() {
            "the id is empty"
        } else if self.address.trim().is_empty() {
            "the address is empty"
        } else {
            return Ok(());
        };
        Err(Error::InvalidMember {
            role: self.role,
            id: self.id.clone(),
            reason,
        })
    }
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:?} at {}", self.role, self.id, self.address)?;
        if let Some(shard) = &self.shard {
            write!(f, " (shard {shard:?})")?;
        }
        Ok(())
    }
}

/// The sorted ids of the members with `role` — e.g. the live expert-workers to
/// compute a placement for.
pub fn ids_with_role(members: &[Member], role: Role) -> Vec<String> {
    let mut ids: Vec<String> = members
        .iter()
        .filter(|m| m.role == role)
        .map(|m| m.id.clone())
        .collect();
    ids.sort();
    ids
}

/// Refuses to join a cluster whose members serve another model: an error naming
/// the first registered member whose fingerprint differs from `fingerprint`.
pub fn check_same_model(members: &[Member], fingerprint: &str) -> Result<()> {
    match members
        .iter()
        .find(|m| m.fingerprint.as_deref().is_some_and(|f| f != fingerprint))
    {
        Some(m) => Err(Error::ModelMismatch {
            member: m.to_string(),
            theirs: m.fingerprint.clone().unwrap_or_default(),
            ours: fingerprint.to_string(),
        }),
        None => Ok(()),
    }
}

/// Membership and placement for one cluster.
pub trait Discovery: Send + Sync {
    /// Registers `member`; it stays registered until the [`Registration`] is
    /// dropped or deregistered.
    fn register(&self, member: Member) -> Result<Registration>;
    /// The current members, sorted by role then id.
    fn members(&self) -> Vec<Member>;
    /// Sees every change of [`Discovery::members`].
    fn subscribe(&self) -> watch::Receiver<Vec<Member>>;
    /// Publishes a complete placement newer than the current one. Publishing
    /// the current placement again is a no-op.
    fn publish_placement(&self, placement: Placement) -> Result<()>;
    /// The newest published placement.
    fn placement(&self) -> Option<Placement>;
    /// Sees every newly published placement.
    fn subscribe_placement(&self) -> watch::Receiver<Option<Placement>>;
}

/// A live registration: the member stays in discovery while this is held.
/// Dropping it is losing the lease.
pub struct Registration {
    member: Member,
    release: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl Registration {
    /// A registration that runs `release` once, when deregistered or dropped.
    pub fn new(member: Member, release: impl FnOnce() + Send + Sync + 'static) -> Self {
        Registration {
            member,
            release: Some(Box::new(release)),
        }
    }

    /// A registration with nothing to release (static membership).
    pub fn fixed(member: Member) -> Self {
        Registration {
            member,
            release: None,
        }
    }

    pub fn member(&self) -> &Member {
        &self.member
    }

    /// Takes the member out of discovery now.
    pub fn deregister(mut self) {
        self.release_now();
    }

    fn release_now(&mut self) {
        if let Some(release) = self.release.take() {
            tracing::debug!(member = %self.member, "deregistering");
            release();
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.release_now();
    }
}

impl fmt::Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registration")
            .field("member", &self.member)
            .field("live", &self.release.is_some())
            .finish()
    }
}

/// The published placement: complete, and only ever newer.
#[derive(Debug)]
struct PlacementCell {
    tx: watch::Sender<Option<Placement>>,
}

impl PlacementCell {
    fn new() -> Self {
        PlacementCell {
            tx: watch::Sender::new(None),
        }
    }

    fn publish(&self, placement: Placement) -> Result<()> {
        let missing = placement.missing();
        if missing > 0 {
            return Err(Error::IncompletePlacement {
                version: placement.version,
                missing,
            });
        }
        let mut result = Ok(());
        self.tx.send_if_modified(|current| match current {
            Some(current) if *current == placement => false,
            Some(current) if current.version >= placement.version => {
                result = Err(Error::StalePlacement {
                    version: placement.version,
                    current: current.version,
                });
                false
            }
            _ => {
                tracing::info!(version = placement.version, "placement published");
                *current = Some(placement);
                true
            }
        });
        result
    }

    fn get(&self) -> Option<Placement> {
        self.tx.borrow().clone()
    }

    fn subscribe(&self) -> watch::Receiver<Option<Placement>> {
        self.tx.subscribe()
    }
}

/// Sorts members by role then id, the order [`Discovery::members`] returns.
fn sorted(mut members: Vec<Member>) -> Vec<Member> {
    members.sort_by(|a, b| (a.role, &a.id).cmp(&(b.role, &b.id)));
    members
}

/// The static discovery file: `{"members": [{"role", "id", "address", "shard"?}]}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StaticFile {
    members: Vec<Member>,
}

/// Members fixed by configuration (flags or a small JSON file). Registering a
/// listed member succeeds and changes nothing; an unlisted one is an error.
#[derive(Debug)]
pub struct StaticDiscovery {
    members: watch::Sender<Vec<Member>>,
    placement: PlacementCell,
}

impl StaticDiscovery {
    /// Fixes the membership to `members`; ids must be unique.
    pub fn from_members(members: Vec<Member>) -> Result<Self> {
        let members = sorted(members);
        let mut seen = std::collections::BTreeSet::new();
        for member in &members {
            member.validate()?;
            if !seen.insert(member.id.as_str()) {
                return Err(Error::DuplicateId {
                    what: "member",
                    id: member.id.clone(),
                });
            }
        }
        Ok(StaticDiscovery {
            members: watch::Sender::new(members),
            placement: PlacementCell::new(),
        })
    }

    /// Reads `{"members": [...]}` from a JSON file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| Error::ReadFile {
            path: path.to_owned(),
            source,
        })?;
        let file: StaticFile = serde_json::from_str(&text).map_err(|source| Error::ParseFile {
            path: path.to_owned(),
            source,
        })?;
        Self::from_members(file.members)
    }
}

impl Discovery for StaticDiscovery {
    fn register(&self, member: Member) -> Result<Registration> {
        let members = self.members.borrow();
        let Some(configured) = members.iter().find(|m| m.id == member.id) else {
            return Err(Error::UnknownMember {
                role: member.role,
                id: member.id,
            });
        };
        // A static file does not know fingerprints or capacities; one that names
        // one must match.
        let comparable = Member {
            fingerprint: configured
                .fingerprint
                .clone()
                .or(member.fingerprint.clone()),
            capacity: configured.capacity.or(member.capacity),
            ..configured.clone()
        };
        if comparable != member {
            return Err(Error::MemberMismatch {
                id: member.id.clone(),
                registering: member.to_string(),
                configured: configured.to_string(),
            });
        }
        Ok(Registration::fixed(member))
    }

    fn members(&self) -> Vec<Member> {
        self.members.borrow().clone()
    }

    fn subscribe(&self) -> watch::Receiver<Vec<Member>> {
        self.members.subscribe()
    }

    fn publish_placement(&self, placement: Placement) -> Result<()> {
        self.placement.publish(placement)
    }

    fn placement(&self) -> Option<Placement> {
        self.placement.get()
    }

    fn subscribe_placement(&self) -> watch::Receiver<Option<Placement>> {
        self.placement.subscribe()
    }
}

/// Live registrations by id, each with the token of the registration that owns it.
#[derive(Debug, Default)]
struct Registry {
    next_token: u64,
    live: BTreeMap<String, (u64, Member)>,
}

#[derive(Debug)]
struct MemoryShared {
    registry: Mutex<Registry>,
    members: watch::Sender<Vec<Member>>,
    placement: PlacementCell,
}

impl MemoryShared {
    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        // The registry stays consistent even if a holder panicked.
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Publishes the registry; called with its lock held so updates stay ordered.
    fn publish(&self, registry: &Registry) {
        let members = registry.live.values().map(|(_, m)| m.clone()).collect();
        self.members.send_replace(sorted(members));
    }
}

/// An in-process registry: registering adds a member, dropping its
/// [`Registration`] removes it, and subscribers see both. Clones share state.
#[derive(Debug, Clone)]
pub struct MemoryDiscovery {
    shared: Arc<MemoryShared>,
}

impl Default for MemoryDiscovery {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryDiscovery {
    pub fn new() -> Self {
        MemoryDiscovery {
            shared: Arc::new(MemoryShared {
                registry: Mutex::new(Registry::default()),
                members: watch::Sender::new(Vec::new()),
                placement: PlacementCell::new(),
            }),
        }
    }
}

fn release(shared: &Weak<MemoryShared>, id: &str, token: u64) {
    let Some(shared) = shared.upgrade() else {
        return;
    };
    let mut registry = shared.registry();
    // Only the registration that added the entry may remove it.
    if registry.live.get(id).is_some_and(|(t, _)| *t == token) {
        registry.live.remove(id);
        shared.publish(&registry);
    }
}

impl Discovery for MemoryDiscovery {
    fn register(&self, member: Member) -> Result<Registration> {
        member.validate()?;
        let mut registry = self.shared.registry();
        if registry.live.contains_key(&member.id) {
            return Err(Error::AlreadyRegistered { id: member.id });
        }
        let token = registry.next_token;
        registry.next_token += 1;
        registry
            .live
            .insert(member.id.clone(), (token, member.clone()));
        self.shared.publish(&registry);
        drop(registry);
        tracing::debug!(%member, "registered");

        let shared = Arc::downgrade(&self.shared);
        let id = member.id.clone();
        Ok(Registration::new(member, move || {
            release(&shared, &id, token)
        }))
    }

    fn members(&self) -> Vec<Member> {
        self.shared.members.borrow().clone()
    }

    fn subscribe(&self) -> watch::Receiver<Vec<Member>> {
        self.shared.members.subscribe()
    }

    fn publish_placement(&self, placement: Placement) -> Result<()> {
        self.shared.placement.publish(placement)
    }

    fn placement(&self) -> Option<Placement> {
        self.shared.placement.get()
    }

    fn subscribe_placement(&self) -> watch::Receiver<Option<Placement>> {
        self.shared.placement.subscribe()
    }
}

#[cfg(test)]
mod tests;
