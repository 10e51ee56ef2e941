//! DeepSeek-VL2 in candle: everything that runs the model, nothing that serves it.
//!
//! - [`config`]: the released `config.json` / `processor_config.json` with reference defaults
//! - [`weights`]: safetensors snapshots, each tensor read by name into its stored dtype;
//!   [`weights::WeightFormat`] says how linear weights are held
//! - [`fingerprint`]: a short hash of a snapshot's config and tensor layout
//! - [`chat`]: tokenizer, processor special tokens and the `deepseek` chat template
//! - [`image_tokens`]: how many image tokens a tiling expands to
//! - [`language`]: the decoder (MHA/MLA attention, MoE gate, dense and shared MLPs, paged KV cache)
//! - [`experts`]: routed experts behind [`experts::ExpertBackend`] (called with the
//!   step's [`experts::StepContext`]), with an in-process backend
//! - [`sampling`]: greedy, temperature, top-k, top-p and repetition-penalty sampling
//! - [`generate`]: what a generation asks for and why it ends (the decode loop is
//!   the scheduler's engine)
//! - [`text`]: incremental detokenization and the stop-string matcher
//! - [`grounding`], [`draw`]: parse `<|ref|>`/`<|det|>` answers and draw their boxes
//! - [`pipeline`]: load a whole snapshot in one process; conversation + images →
//!   prompt ids and image embeddings
//! - [`processor`]: image bytes → RGB → 384×384 tiles → normalised tensor, bit-exact with the reference processor
//! - [`vision`]: the SigLIP tower, the projector and the image-token assembly
//! - [`linear`]: linear layers over f32/bf16/f16/int8 weights computing in f32 (decode
//!   and prefill kernels); [`held`]: the bytes of weights each part holds
//! - [`ops`]: small tensor helpers

pub mod chat;
pub mod config;
pub mod draw;
pub mod error;
pub mod experts;
pub mod fingerprint;
pub mod generate;
pub mod grounding;
pub mod held;
pub mod image_tokens;
pub mod language;
pub mod linear;
pub mod ops;
pub mod pipeline;
pub mod processor;
pub mod sampling;
pub mod text;
pub mod vision;
pub mod weights;

pub use error::{Error, Result};
pub use fingerprint::fingerprint;
