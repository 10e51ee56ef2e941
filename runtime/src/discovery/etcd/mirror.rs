//! The local mirror of etcd: the key layout, the first read, and the task that
//! follows the prefix's watch into the members and placement watch channels.

use std::collections::BTreeMap;
use std::sync::Arc;

use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use tokio::sync::watch;

use super::{RETRY, Shared, pause_unless_stopped, within};
use crate::discovery::{Member, sorted};
use crate::error::{Error, Result};
use crate::placement::Placement;

/// Where things live under the prefix.
#[derive(Debug)]
pub(super) struct Keys {
    prefix: String,
}

impl Keys {
    /// `prefix` without a trailing `/`.
    pub(super) fn new(prefix: &str) -> Self {
        Keys {
            prefix: prefix.to_owned(),
        }
    }

    pub(super) fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Everything Tessera keeps: `<prefix>/`.
    fn all(&self) -> String {
        format!("{}/", self.prefix)
    }

    /// `<prefix>/members/<role>/<id>`.
    pub(super) fn member(&self, member: &Member) -> String {
        format!("{}/members/{}/{}", self.prefix, member.role, member.id)
    }

    /// `<prefix>/placement`.
    pub(super) fn placement(&self) -> String {
        format!("{}/placement", self.prefix)
    }

    fn is_member(&self, key: &str) -> bool {
        key.strip_prefix(&self.prefix)
            .is_some_and(|rest| rest.starts_with("/members/"))
    }
}

/// What one key holds.
enum Entry {
    Member(Member),
    Placement(Placement),
    /// Not ours, or unreadable (logged).
    Ignored,
}

fn parse(keys: &Keys, key: &str, value: &[u8]) -> Entry {
    let parsed = if keys.is_member(key) {
        serde_json::from_slice(value).map(Entry::Member)
    } else if key == keys.placement() {
        serde_json::from_slice(value).map(Entry::Placement)
    } else {
        return Entry::Ignored;
    };
    parsed.unwrap_or_else(|e| {
        tracing::warn!(key, error = %e, "ignoring an unreadable value in etcd");
        Entry::Ignored
    })
}

/// Members (by key) and placement at one etcd revision.
pub(super) struct Snapshot {
    revision: i64,
    pub(super) members: BTreeMap<String, Member>,
    placement: Option<Placement>,
}

/// Reads everything under the prefix.
pub(super) async fn load(client: &mut Client, keys: &Keys) -> Result<Snapshot> {
    let options = GetOptions::new().with_prefix();
    let response = within("read", client.get(keys.all(), Some(options))).await?;
    let mut snapshot = Snapshot {
        revision: response.header().map_or(0, |h| h.revision()),
        members: BTreeMap::new(),
        placement: None,
    };
    for kv in response.kvs() {
        let Ok(key) = kv.key_str() else { continue };
        match parse(keys, key, kv.value()) {
            Entry::Member(member) => {
                snapshot.members.insert(key.to_owned(), member);
            }
            Entry::Placement(placement) => snapshot.placement = Some(placement),
            Entry::Ignored => {}
        }
    }
    Ok(snapshot)
}

/// The two watch channels every read is served from.
#[derive(Debug)]
pub(super) struct Mirror {
    members: watch::Sender<Vec<Member>>,
    placement: watch::Sender<Option<Placement>>,
}

impl Mirror {
    pub(super) fn new() -> Self {
        Mirror {
            members: watch::Sender::new(Vec::new()),
            placement: watch::Sender::new(None),
        }
    }

    pub(super) fn members(&self) -> Vec<Member> {
        self.members.borrow().clone()
    }

    pub(super) fn subscribe(&self) -> watch::Receiver<Vec<Member>> {
        self.members.subscribe()
    }

    pub(super) fn placement(&self) -> Option<Placement> {
        self.placement.borrow().clone()
    }

    pub(super) fn subscribe_placement(&self) -> watch::Receiver<Option<Placement>> {
        self.placement.subscribe()
    }

    /// Shows `by_key`'s members, sorted, if they changed.
    fn publish_members(&self, by_key: &BTreeMap<String, Member>) {
        let members = sorted(by_key.values().cloned().collect());
        self.members.send_if_modified(|current| {
            let changed = *current != members;
            if changed {
                *current = members;
            }
            changed
        });
    }

    /// Shows `incoming` unless the local placement is newer or the same. etcd
    /// is the truth: an equal version with another assignment (another
    /// process won the compare-and-swap) replaces ours.
    pub(super) fn apply_placement(&self, incoming: Placement) {
        self.placement.send_if_modified(|current| match current {
            Some(current) if current.version > incoming.version || *current == incoming => false,
            _ => {
                tracing::info!(version = incoming.version, "placement published");
                *current = Some(incoming);
                true
            }
        });
    }

    /// Shows `snapshot`; returns its revision and members to follow from.
    pub(super) fn show(&self, snapshot: Snapshot) -> (i64, BTreeMap<String, Member>) {
        self.publish_members(&snapshot.members);
        if let Some(placement) = snapshot.placement {
            self.apply_placement(placement);
        }
        (snapshot.revision, snapshot.members)
    }
}

/// Follows etcd after `revision`, from the shown `members`, until
/// `shared.stop`; when the watch breaks, reads everything again and watches
/// from there.
pub(super) async fn follow(
    shared: Arc<Shared>,
    mut revision: i64,
    mut members: BTreeMap<String, Member>,
) {
    let mut client = shared.client.clone();
    loop {
        let broke = tokio::select! {
            _ = shared.stop.cancelled() => return,
            broke = watch_from(&mut client, &shared, &mut members, &mut revision) => broke,
        };
        tracing::warn!(error = %broke, "the etcd watch broke; reading etcd again");
        loop {
            if !pause_unless_stopped(RETRY, &shared.stop).await {
                return;
            }
            let loaded = tokio::select! {
                _ = shared.stop.cancelled() => return,
                loaded = load(&mut client, &shared.keys) => loaded,
            };
            match loaded {
                Ok(snapshot) => {
                    (revision, members) = shared.mirror.show(snapshot);
                    tracing::info!(revision, "following etcd again");
                    break;
                }
                Err(e) => tracing::warn!(error = %e, "cannot read etcd; retrying"),
            }
        }
    }
}

/// Applies watch events after `revision` until the watch breaks; returns why.
async fn watch_from(
    client: &mut Client,
    shared: &Shared,
    members: &mut BTreeMap<String, Member>,
    revision: &mut i64,
) -> Error {
    let broken = |cause: String| Error::Etcd {
        what: "watch",
        cause,
    };
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(*revision + 1);
    let mut stream = match within("watch", client.watch(shared.keys.all(), Some(options))).await {
        Ok(stream) => stream,
        Err(e) => return e,
    };
    loop {
        let response = match stream.message().await {
            Ok(Some(response)) => response,
            Ok(None) => return broken("the stream ended".into()),
            Err(e) => return broken(e.to_string()),
        };
        if response.canceled() {
            return broken(format!(
                "cancelled by etcd ({}; compacted at revision {})",
                response.cancel_reason(),
                response.compact_revision()
            ));
        }
        let mut placement = None;
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            *revision = (*revision).max(kv.mod_revision());
            let Ok(key) = kv.key_str() else { continue };
            match event.event_type() {
                EventType::Delete => {
                    members.remove(key);
                }
                EventType::Put => match parse(&shared.keys, key, kv.value()) {
                    Entry::Member(member) => {
                        members.insert(key.to_owned(), member);
                    }
                    Entry::Placement(newer) => placement = Some(newer),
                    Entry::Ignored => {}
                },
            }
        }
        shared.mirror.publish_members(members);
        if let Some(placement) = placement {
            shared.mirror.apply_placement(placement);
        }
    }
}
