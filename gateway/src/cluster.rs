//! `ClusterStatus`: the members discovery knows and the expert placement in use,
//! in the public API's terms.

use std::collections::{BTreeMap, BTreeSet};

use tessera_proto::v1::{self, ClusterStatusResponse, LayerExperts, MemberRole};
use tessera_runtime::placement::{ExpertKey, Placement};
use tessera_runtime::{Discovery, Member, Role};

/// The public role of a discovery role.
pub fn member_role(role: Role) -> MemberRole {
    match role {
        Role::Gateway => MemberRole::Gateway,
        Role::VisionWorker => MemberRole::VisionWorker,
        Role::Scheduler => MemberRole::Scheduler,
        Role::ExpertWorker => MemberRole::ExpertWorker,
    }
}

/// `(layer, expert)` pairs grouped by layer, layers and experts ascending.
fn by_layer(pairs: &BTreeSet<ExpertKey>) -> Vec<LayerExperts> {
    let mut layers: BTreeMap<usize, Vec<u32>> = BTreeMap::new();
    for &(layer, expert) in pairs {
        layers.entry(layer).or_default().push(expert as u32);
    }
    layers
        .into_iter()
        .map(|(layer, experts)| LayerExperts {
            layer: layer as u32,
            experts,
        })
        .collect()
}

/// One member as the public API shows it; expert-workers list what `placement` gives them.
fn public_member(member: Member, placement: Option<&Placement>) -> v1::Member {
    let experts = match (member.role, placement) {
        (Role::ExpertWorker, Some(p)) => by_layer(p.experts_of(&member.id)),
        _ => Vec::new(),
    };
    v1::Member {
        role: member_role(member.role).into(),
        id: member.id,
        address: member.address,
        // Members register once they serve, and leave when they stop.
        ready: true,
        shard: member.shard.unwrap_or_default(),
        experts,
    }
}

/// The status a caller without an admin key sees: each member's role, readiness and
/// shard, without its id (which names its address by default), address or experts.
pub fn redact(status: &mut ClusterStatusResponse) {
    for member in &mut status.members {
        member.id.clear();
        member.address.clear();
        member.experts.clear();
    }
}

/// Every registered member and the current placement's version (0 when none).
pub fn cluster_status(discovery: &dyn Discovery) -> ClusterStatusResponse {
    let placement = discovery.placement();
    ClusterStatusResponse {
        members: discovery
            .members()
            .into_iter()
            .map(|m| public_member(m, placement.as_ref()))
            .collect(),
        placement_version: placement.map_or(0, |p| p.version),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_runtime::MemoryDiscovery;

    #[test]
    fn members_and_placement_are_reported() {
        let discovery = MemoryDiscovery::new();
        assert_eq!(cluster_status(&discovery), ClusterStatusResponse::default());
        let _g = discovery
            .register(Member::new(Role::Gateway, "gw", "127.0.0.1:1"))
            .unwrap();
        let _e = discovery
            .register(Member::new(Role::ExpertWorker, "ew-0", "127.0.0.1:2").with_shard("0"))
            .unwrap();
        let assignment = BTreeMap::from([(
            "ew-0".to_string(),
            BTreeSet::from([
                (2, 1),
                (1, 3),
                (1, 0),
                (2, 0),
                (1, 1),
                (1, 2),
                (2, 2),
                (2, 3),
            ]),
        )]);
        discovery
            .publish_placement(Placement {
                version: 3,
                layers: vec![1, 2],
                n_experts: 4,
                assignment,
                ..Default::default()
            })
            .unwrap();
        let status = cluster_status(&discovery);
        assert_eq!(status.placement_version, 3);
        let roles: Vec<i32> = status.members.iter().map(|m| m.role).collect();
        assert_eq!(
            roles,
            [
                i32::from(MemberRole::Gateway),
                i32::from(MemberRole::ExpertWorker)
            ]
        );
        let gateway = &status.members[0];
        assert!(gateway.ready && gateway.experts.is_empty() && gateway.shard.is_empty());
        let worker = &status.members[1];
        assert_eq!(worker.shard, "0");
        assert_eq!(worker.address, "127.0.0.1:2");
        assert_eq!(
            worker.experts,
            [
                LayerExperts {
                    layer: 1,
                    experts: vec![0, 1, 2, 3]
                },
                LayerExperts {
                    layer: 2,
                    experts: vec![0, 1, 2, 3]
                }
            ]
        );
    }
}
