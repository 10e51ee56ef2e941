//! The DeepSeek-V2 decoder of DeepSeek-VL2 (reference-spec §4).
//!
//! - [`rope`]: rotary tables (default, linear, dynamic, YaRN)
//! - [`attention`]: step context and scaled dot-product attention
//! - [`batch`]: one step of many sequences over the paged cache, in micro-batches
//! - [`mha`], [`mla`]: plain MHA (Tiny) and multi-head latent attention (Small, Base)
//! - [`mlp`]: gated SiLU MLP (dense layers, experts, shared experts)
//! - [`moe`]: the gate and the MoE block
//! - [`kv_cache`]: the per-sequence cache (latent `c` + `k_pe` for MLA)
//! - [`paged`]: the paged cache's storage (rows addressed by slot, for many sequences)
//! - [`model`]: the decoder stack, embeddings, final norm and LM head

pub mod attention;
pub mod batch;
pub mod kv_cache;
pub mod mha;
pub mod mla;
pub mod mlp;
pub mod model;
pub mod moe;
pub mod paged;
pub mod rope;

pub use batch::BatchSegment;
pub use kv_cache::{CacheLayout, KvCache};
pub use model::{ForwardTrace, LanguageModel};
pub use moe::Routing;
pub use paged::PagedKvCache;
