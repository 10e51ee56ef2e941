//! The DeepSeek-V2 decoder of DeepSeek-VL2 (reference-spec §4).
//!
//! - [`rope`]: rotary tables (default, linear, dynamic, YaRN)
//! - [`attention`]: step context and scaled dot-product attention
//! - [`mha`], [`mla`]: plain MHA (Tiny) and multi-head latent attention (Small, Base)
//! - [`mlp`]: gated SiLU MLP (dense layers, experts, shared experts)
//! - [`moe`]: the gate and the MoE block
//! - [`kv_cache`]: the per-sequence cache (latent `c` + `k_pe` for MLA)
//! - [`model`]: the decoder stack, embeddings, final norm and LM head

pub mod attention;
pub mod kv_cache;
pub mod mha;
pub mod mla;
pub mod mlp;
pub mod model;
pub mod moe;
pub mod rope;

pub use kv_cache::KvCache;
pub use model::{ForwardTrace, LanguageModel};
pub use moe::Routing;
