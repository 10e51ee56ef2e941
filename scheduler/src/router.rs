//! The router: routes with the newest placement whose workers are all ready.
//!
//! It watches the published placement and the members. For the newest placement
//! `P` it connects to each worker that `P` gives experts (address from discovery;
//! lazy channels, reused while the address stays), asks each for `Expert.Info`
//! with a deadline per call, and repeats every [`RETRY`] while `P` is still the
//! newest, until every one reports `placement_version >= P.version`, `ready`, and
//! holds `P.experts_of(id)`. Then it swaps in the [`RoutingTable`] for `P`, which
//! [`RemoteExperts`](crate::RemoteExperts) uses from the next layer on.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tessera_proto::MAX_MESSAGE_BYTES;
use tessera_proto::internal::v1::expert_client::ExpertClient;
use tessera_proto::internal::v1::{InfoRequest, InfoResponse};
use tessera_runtime::discovery::{Discovery, Member, Role};
use tessera_runtime::placement::{ExpertKey, Placement};
use tessera_runtime::tls::{self, ClusterTls};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::remote_experts::RoutingTable;

/// How often a placement whose workers are not all ready is checked again.
pub const RETRY: Duration = Duration::from_millis(50);
/// How long one `Info` call may take.
const INFO_DEADLINE: Duration = Duration::from_secs(2);

/// Keeps `tables` at the newest placement whose workers are all ready, until
/// `shutdown`. Only the scheduler's own fingerprint is accepted from workers
/// (an empty one on either side skips the check).
pub async fn run(
    discovery: Arc<dyn Discovery>,
    tables: watch::Sender<Option<Arc<RoutingTable>>>,
    fingerprint: String,
    tls: Option<Arc<ClusterTls>>,
    shutdown: CancellationToken,
) {
    let mut placements = discovery.subscribe_placement();
    let mut members = discovery.subscribe();
    let mut channels: BTreeMap<String, ExpertClient<Channel>> = BTreeMap::new();
    loop {
        let newest = placements.borrow_and_update().clone();
        let members_now = members.borrow_and_update().clone();
        let routed = tables.borrow().clone();
        // A newer placement, or a worker of the routed one back at a new address (a
        // restarted process under the same id: the placement does not change).
        let stale = |p: &Placement| {
            routed.as_ref().is_none_or(|t| {
                p.version > t.placement.version
                    || (p.version == t.placement.version && moved(t, &members_now))
            })
        };
        let pending = match newest {
            Some(p) if stale(&p) => {
                let members = members_now;
                match ready_table(&p, &members, &mut channels, &fingerprint, tls.as_deref()).await {
                    Some(table) => {
                        tracing::info!(
                            version = p.version,
                            workers = table.clients.len(),
                            "routing with a new expert placement"
                        );
                        let keep: BTreeSet<&String> = table_addresses(&p, &members);
                        channels.retain(|addr, _| keep.contains(addr));
                        tables.send_replace(Some(Arc::new(table)));
                        false
                    }
                    None => true,
                }
            }
            _ => false,
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = placements.changed() => if changed.is_err() { return },
            changed = members.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(RETRY), if pending => {}
        }
    }
}

/// Whether a worker of `table` is registered at another address than the one it
/// was routed at.
fn moved(table: &RoutingTable, members: &[Member]) -> bool {
    members.iter().any(|m| {
        m.role == Role::ExpertWorker
            && table
                .addresses
                .get(&m.id)
                .is_some_and(|address| address != &m.address)
    })
}

/// The addresses of `p`'s workers that hold experts.
fn table_addresses<'m>(p: &Placement, members: &'m [Member]) -> BTreeSet<&'m String> {
    members
        .iter()
        .filter(|m| m.role == Role::ExpertWorker && !p.experts_of(&m.id).is_empty())
        .map(|m| &m.address)
        .collect()
}

/// The routing table for `p` if every worker holding experts in it is ready.
async fn ready_table(
    p: &Placement,
    members: &[Member],
    channels: &mut BTreeMap<String, ExpertClient<Channel>>,
    fingerprint: &str,
    tls: Option<&ClusterTls>,
) -> Option<RoutingTable> {
    let mut clients = BTreeMap::new();
    let mut addresses = BTreeMap::new();
    for (id, held) in &p.assignment {
        if held.is_empty() {
            continue;
        }
        let Some(member) = members
            .iter()
            .find(|m| m.role == Role::ExpertWorker && &m.id == id)
        else {
            tracing::debug!(worker = %id, version = p.version, "placement names a worker not in discovery");
            return None;
        };
        let client = match channels.get(&member.address) {
            Some(client) => client.clone(),
            None => {
                let client = connect_lazy(&member.address, tls)?;
                channels.insert(member.address.clone(), client.clone());
                client
            }
        };
        clients.insert(id.clone(), client);
        addresses.insert(id.clone(), member.address.clone());
    }

    let checks: Vec<_> = clients
        .iter()
        .map(|(id, client)| {
            let mut client = client.clone();
            let id = id.clone();
            tokio::spawn(async move {
                let info = tokio::time::timeout(INFO_DEADLINE, client.info(InfoRequest {})).await;
                (id, info)
            })
        })
        .collect();
    let mut all_ready = true;
    for check in checks {
        let Ok((id, info)) = check.await else {
            return None;
        };
        let ready = match info {
            Ok(Ok(info)) => is_ready(&info.into_inner(), p, &id, fingerprint),
            Ok(Err(status)) => {
                tracing::debug!(worker = %id, code = ?status.code(), "expert-worker Info failed");
                false
            }
            Err(_) => {
                tracing::debug!(worker = %id, "expert-worker Info timed out");
                false
            }
        };
        all_ready &= ready;
    }
    all_ready.then(|| RoutingTable {
        placement: p.clone(),
        clients,
        addresses,
    })
}

/// A lazy channel to an expert-worker at `address` (`host:port`), over the cluster's
/// TLS when it has one, message limits raised; `None` (logged) when the address is
/// not a valid URI.
fn connect_lazy(address: &str, tls: Option<&ClusterTls>) -> Option<ExpertClient<Channel>> {
    let endpoint = match tls::endpoint(address, tls) {
        Ok(endpoint) => endpoint,
        Err(e) => {
            tracing::warn!(%address, error = %e, "cannot reach this expert-worker");
            return None;
        }
    };
    let channel = endpoint
        .connect_timeout(INFO_DEADLINE)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true)
        .connect_lazy();
    Some(
        ExpertClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    )
}

/// Whether worker `id`'s `info` shows it has applied `p` and holds its experts.
fn is_ready(info: &InfoResponse, p: &Placement, id: &str, fingerprint: &str) -> bool {
    if !fingerprint.is_empty()
        && !info.model_fingerprint.is_empty()
        && info.model_fingerprint != fingerprint
    {
        tracing::warn!(
            worker = %id,
            worker_model = %info.model_fingerprint,
            "expert-worker serves another model; it is not routed to"
        );
        return false;
    }
    let held: BTreeSet<ExpertKey> = info
        .held
        .iter()
        .flat_map(|l| {
            l.experts
                .iter()
                .map(move |&e| (l.layer as usize, e as usize))
        })
        .collect();
    info.ready && info.placement_version >= p.version && p.experts_of(id).is_subset(&held)
}

#[cfg(test)]
mod tests {
    use tessera_proto::internal::v1::LayerExperts;
    use tessera_runtime::placement::even_split;

    use super::*;

    fn info(version: u64, ready: bool, held: &[(u32, Vec<u32>)]) -> InfoResponse {
        InfoResponse {
            model_fingerprint: "fp".into(),
            held: held
                .iter()
                .map(|(layer, experts)| LayerExperts {
                    layer: *layer,
                    experts: experts.clone(),
                })
                .collect(),
            ready,
            placement_version: version,
            ..Default::default()
        }
    }

    #[test]
    fn a_worker_is_ready_once_it_applied_the_placement_and_holds_its_experts() {
        let workers = vec!["a".to_string(), "b".to_string()];
        let p = even_split(3, &[1], 4, &workers).unwrap(); // a: 0, 1; b: 2, 3
        let full = [(1, vec![0, 1])];
        assert!(is_ready(&info(3, true, &full), &p, "a", "fp"));
        assert!(is_ready(
            &info(4, true, &[(1, vec![0, 1, 2])]),
            &p,
            "a",
            "fp"
        ));
        assert!(
            !is_ready(&info(2, true, &full), &p, "a", "fp"),
            "older placement"
        );
        assert!(
            !is_ready(&info(3, false, &full), &p, "a", "fp"),
            "not ready"
        );
        assert!(
            !is_ready(&info(3, true, &[(1, vec![0])]), &p, "a", "fp"),
            "missing expert"
        );
        assert!(
            !is_ready(&info(3, true, &full), &p, "a", "other"),
            "other model"
        );
        assert!(
            is_ready(&info(3, true, &full), &p, "a", ""),
            "no fingerprint to check"
        );
    }

    #[test]
    fn only_workers_with_experts_are_kept_connected() {
        let workers = vec!["a".to_string(), "b".to_string()];
        let p = even_split(1, &[1], 1, &workers).unwrap(); // b holds nothing
        let members = vec![
            Member::new(Role::ExpertWorker, "a", "127.0.0.1:1"),
            Member::new(Role::ExpertWorker, "b", "127.0.0.1:2"),
            Member::new(Role::Gateway, "a", "127.0.0.1:3"),
        ];
        let kept: Vec<&String> = table_addresses(&p, &members).into_iter().collect();
        assert_eq!(kept, ["127.0.0.1:1"]);
    }
}
