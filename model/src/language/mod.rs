//! The DeepSeek-V2 decoder of DeepSeek-VL2 (the reference's `DeepseekV2Model`).
//!
//! - [`rope`]: rotary tables (default, linear, dynamic, YaRN)
//! - [`attention`]: scaled dot-product attention, split into batch-wide
//!   projections and per-sequence attention
//! - [`batch`]: one step of many sequences over the paged cache, in micro-batches
//! - [`mha`], [`mla`]: plain MHA (Tiny) and multi-head latent attention (Small, Base)
//! - [`mlp`]: gated SiLU MLP (dense layers, experts, shared experts)
//! - [`moe`]: the gate and the MoE block
//! - [`paged`]: the paged KV cache's storage (rows addressed by slot, for many
//!   sequences; latent `c` + `k_pe` for MLA)
//! - [`model`]: the decoder stack, embeddings, final norm and LM head

pub mod attention;
pub mod batch;
pub mod mha;
pub mod mla;
pub mod mlp;
pub mod model;
pub mod moe;
pub mod paged;
pub mod rope;

pub use batch::BatchSegment;
pub use model::{ForwardTrace, LanguageModel};
pub use moe::Routing;
pub use paged::{CacheLayout, PagedKvCache};
