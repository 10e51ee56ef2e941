//! What one generation asks for ([`GenerationParams`]) and why it ends
//! ([`FinishReason`]). Generation itself (prefill, decode, sampling, stop
//! strings) runs in the scheduler's engine, for the cluster and for
//! `tessera generate` alike.

use crate::sampling::SamplingParams;

/// How to generate.
#[derive(Debug, Clone)]
pub struct GenerationParams {
    /// Upper bound on generated tokens.
    pub max_new_tokens: usize,
    /// Keep going after EOS (benchmarks, golden tests).
    pub ignore_eos: bool,
    /// End-of-sequence token.
    pub eos_token_id: u32,
    /// Stop when the output text contains any of these (the stop text is not returned).
    pub stop: Vec<String>,
    pub sampling: SamplingParams,
    /// Keep the logits that produced every token (`tessera generate --logits-out`).
    pub record_logits: bool,
    /// Report each token's log probability and this many most likely alternatives'
    /// (OpenAI's `logprobs` and `top_logprobs`); `None` reports none.
    pub logprobs: Option<usize>,
}

impl GenerationParams {
    /// Greedy decoding of up to `max_new_tokens`, stopping at `eos_token_id`.
    pub fn greedy(max_new_tokens: usize, eos_token_id: u32) -> Self {
        Self {
            max_new_tokens,
            ignore_eos: false,
            eos_token_id,
            stop: Vec::new(),
            sampling: SamplingParams::default(),
            record_logits: false,
            logprobs: None,
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model produced EOS.
    Eos,
    /// `max_new_tokens` were generated.
    Length,
    /// A stop string appeared in the output.
    Stop,
}
