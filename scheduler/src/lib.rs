//! The scheduler (ARCHITECTURE.md). For now it holds only the remote expert
//! backend that sends routed experts to expert-workers.
//!
//! - [`remote_experts`]: [`RemoteExperts`], an [`ExpertBackend`](tessera_model::experts::ExpertBackend)
//!   that dispatches each MoE layer's routes to the workers owning the experts

pub mod remote_experts;

pub use remote_experts::RemoteExperts;
