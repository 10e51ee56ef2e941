//! The crate's one error type.

use std::path::PathBuf;

use crate::discovery::Role;

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in discovery and placement.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A placement was asked for with no expert-worker to put the experts on.
    #[error(
        "no live expert-workers to place {n_experts} routed experts of {n_layers} MoE layers on"
    )]
    NoWorkers { n_layers: usize, n_experts: usize },

    /// The same id appears twice where ids must be unique.
    #[error("{what} id {id:?} appears more than once; ids must be unique")]
    DuplicateId { what: &'static str, id: String },

    /// A member with an empty id or address.
    #[error("member {id:?} ({role}) is invalid: {reason}")]
    InvalidMember {
        role: Role,
        id: String,
        reason: &'static str,
    },

    /// Static discovery was asked to register a member that is not configured.
    #[error(
        "member {id:?} ({role}) is not in the static member list; add it to the \
         discovery file or flags, or use a dynamic discovery"
    )]
    UnknownMember { role: Role, id: String },

    /// Static discovery lists the id, but with different details.
    #[error("member {id:?} registers as {registering} but the static member list has {configured}")]
    MemberMismatch {
        id: String,
        registering: String,
        configured: String,
    },

    /// The cluster's members serve another model than this process.
    #[error(
        "{member} serves model {theirs}, this process serves {ours}: every member of a \
         cluster must load the same snapshot (or use another discovery prefix)"
    )]
    ModelMismatch {
        member: String,
        theirs: String,
        ours: String,
    },

    /// A second live registration under an id that is already registered.
    #[error("member {id:?} is already registered; ids must be unique among live members")]
    AlreadyRegistered { id: String },

    /// The static discovery file could not be read.
    #[error("cannot read discovery file {}: {source}", path.display())]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },

    /// The static discovery file is not valid.
    #[error(
        "cannot parse discovery file {} (expected {{\"members\": [{{\"role\", \"id\", \"address\", \"shard\"?}}]}}): {source}",
        path.display()
    )]
    ParseFile {
        path: PathBuf,
        source: serde_json::Error,
    },

    /// A placement that leaves some (layer, expert) without an owner.
    #[error("placement version {version} leaves {missing} (layer, expert) pairs without an owner")]
    IncompletePlacement { version: u64, missing: usize },

    /// A placement that is not newer than the one already published.
    #[error(
        "placement version {version} is not newer than the published version {current} \
         (and differs from it)"
    )]
    StalePlacement { version: u64, current: u64 },

    /// etcd could not be reached when connecting.
    #[error("cannot reach etcd at {endpoints}: {cause}; start etcd or use static discovery")]
    EtcdUnreachable { endpoints: String, cause: String },

    /// An etcd call failed or timed out after connecting.
    #[error("etcd {what} failed: {cause}")]
    Etcd { what: &'static str, cause: String },

    /// Invalid etcd discovery settings.
    #[error("invalid etcd discovery settings: {reason}")]
    EtcdConfig { reason: String },
}
