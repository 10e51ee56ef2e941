//! Generation for one sequence: prefill (one-shot or chunked, reference-spec §4.5),
//! then decode with the KV cache until EOS, the token limit or a stop string.

use std::time::{Duration, Instant};

use candle_core::Tensor;

use crate::chat::ChatTokenizer;
use crate::error::{Error, Result};
use crate::experts::ExpertBackend;
use crate::language::{KvCache, LanguageModel};
use crate::sampling::{Sampler, SamplingParams};

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
    /// Prefill in chunks of this many positions (the reference's `incremental_prefilling`);
    /// `None` prefills the prompt in one step.
    pub prefill_chunk: Option<usize>,
    /// Keep the logits that produced every token.
    pub record_logits: bool,
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
            prefill_chunk: None,
            record_logits: false,
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
    /// The caller's token callback asked to stop ([`generate_streaming`]).
    Cancelled,
}

/// What a [`generate_streaming`] token callback asks for next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Keep generating.
    Continue,
    /// Stop now; generation ends with [`FinishReason::Cancelled`].
    Stop,
}

/// Wall-clock time spent in each phase.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    pub prompt_tokens: usize,
    pub prefill: Duration,
    pub decode_steps: usize,
    pub decode: Duration,
}

impl Timings {
    /// Prompt tokens per second of prefill.
    pub fn prefill_tokens_per_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill.as_secs_f64().max(1e-9)
    }

    /// Generated tokens per second of decode (the first token comes from prefill).
    pub fn decode_tokens_per_s(&self) -> f64 {
        self.decode_steps as f64 / self.decode.as_secs_f64().max(1e-9)
    }
}

/// The result of [`generate`].
#[derive(Debug, Clone)]
pub struct Generation {
    /// Generated ids (including a final EOS when that is why generation stopped).
    pub output_ids: Vec<u32>,
    /// Output text with special tokens kept, without a final EOS or the stop string;
    /// empty when no tokenizer was given.
    pub text: String,
    pub finish_reason: FinishReason,
    /// Logits that produced each generated token (row 0 is the last prefill position),
    /// when `record_logits` was set.
    pub step_logits: Vec<Vec<f32>>,
    pub timings: Timings,
}

/// Runs `embeds` (tokens, hidden) through the model into `cache`, in chunks as the
/// reference's `incremental_prefilling` does when `chunk` is set: positions `[0, T−1)`
/// chunk by chunk, then the last prompt position alone. Returns the last logits.
pub fn prefill(
    model: &LanguageModel,
    experts: &dyn ExpertBackend,
    cache: &mut KvCache,
    embeds: &Tensor,
    chunk: Option<usize>,
) -> Result<Tensor> {
    let t = embeds.dim(0)?;
    match chunk {
        Some(0) => Err(Error::Request(
            "prefill chunk size must be at least 1".into(),
        )),
        Some(c) if t > 1 => {
            let mut start = 0;
            while start < t - 1 {
                let len = c.min(t - 1 - start);
                model.forward(&embeds.narrow(0, start, len)?, cache, experts, None)?;
                start += len;
            }
            model.forward(&embeds.narrow(0, t - 1, 1)?, cache, experts, None)
        }
        _ => model.forward(embeds, cache, experts, None),
    }
}

/// Generates a continuation of a prompt given as token ids and their input embeddings
/// (image features already in place). `tokenizer` is needed for stop strings and text.
pub fn generate(
    model: &LanguageModel,
    experts: &dyn ExpertBackend,
    tokenizer: Option<&ChatTokenizer>,
    prompt_ids: &[u32],
    embeds: &Tensor,
    params: &GenerationParams,
) -> Result<Generation> {
    generate_streaming(
        model,
        experts,
        tokenizer,
        prompt_ids,
        embeds,
        params,
        &mut |_| Flow::Continue,
    )
}

/// [`generate`], calling `on_token` with every generated id as soon as it is picked
/// (including a final EOS or the token that completes a stop string). When it
/// answers [`Flow::Stop`], generation ends before the next model step with
/// [`FinishReason::Cancelled`].
pub fn generate_streaming(
    model: &LanguageModel,
    experts: &dyn ExpertBackend,
    tokenizer: Option<&ChatTokenizer>,
    prompt_ids: &[u32],
    embeds: &Tensor,
    params: &GenerationParams,
    on_token: &mut dyn FnMut(u32) -> Flow,
) -> Result<Generation> {
    if prompt_ids.is_empty() || embeds.dim(0)? != prompt_ids.len() {
        return Err(Error::Request(format!(
            "the prompt has {} ids but {} embedding rows",
            prompt_ids.len(),
            embeds.dim(0)?
        )));
    }
    if !params.stop.is_empty() && tokenizer.is_none() {
        return Err(Error::Request("stop strings need a tokenizer".into()));
    }
    let max_pos = model.config().max_position_embeddings;
    if prompt_ids.len() + params.max_new_tokens > max_pos {
        return Err(Error::Request(format!(
            "the prompt ({} tokens) plus max_new_tokens ({}) exceeds the model's {} positions",
            prompt_ids.len(),
            params.max_new_tokens,
            max_pos
        )));
    }
    let mut sampler = Sampler::new(params.sampling.clone())?;
    let mut cache = model.new_cache(prompt_ids.len() + params.max_new_tokens)?;
    let mut timings = Timings {
        prompt_tokens: prompt_ids.len(),
        ..Default::default()
    };

    let started = Instant::now();
    let mut logits = prefill(model, experts, &mut cache, embeds, params.prefill_chunk)?;
    timings.prefill = started.elapsed();

    let decode_start = Instant::now();
    let mut history: Vec<u32> = prompt_ids.to_vec();
    let mut output = Vec::new();
    let mut step_logits = Vec::new();
    let mut text = String::new();
    let mut finish_reason = FinishReason::Length;
    while output.len() < params.max_new_tokens {
        let row = logits.to_vec1::<f32>()?;
        let next = sampler.sample(&row, &history);
        if params.record_logits {
            step_logits.push(row);
        }
        output.push(next);
        history.push(next);
        if on_token(next) == Flow::Stop {
            finish_reason = FinishReason::Cancelled;
            break;
        }
        if next == params.eos_token_id && !params.ignore_eos {
            finish_reason = FinishReason::Eos;
            break;
        }
        if let Some(tok) = tokenizer.filter(|_| !params.stop.is_empty()) {
            text = tok.decode(&output, false)?;
            if let Some(cut) = earliest_stop(&text, &params.stop) {
                text.truncate(cut);
                finish_reason = FinishReason::Stop;
                break;
            }
        }
        if output.len() == params.max_new_tokens {
            break;
        }
        logits = model.forward(&model.embed(&[next])?, &mut cache, experts, None)?;
        timings.decode_steps += 1;
    }
    timings.decode = decode_start.elapsed();

    if finish_reason != FinishReason::Stop
        && let Some(tok) = tokenizer
    {
        let shown = match finish_reason {
            FinishReason::Eos => &output[..output.len() - 1],
            _ => &output[..],
        };
        text = tok.decode(shown, false)?;
    }
    Ok(Generation {
        output_ids: output,
        text,
        finish_reason,
        step_logits,
        timings,
    })
}

/// Byte offset of the earliest occurrence of any stop string in `text`.
pub fn earliest_stop(text: &str, stop: &[String]) -> Option<usize> {
    stop.iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min()
}

#[cfg(test)]
mod tests {
    use super::earliest_stop;

    #[test]
    fn the_earliest_stop_string_wins() {
        let stops = vec!["world".to_string(), "lo".to_string(), String::new()];
        assert_eq!(earliest_stop("hello world", &stops), Some(3));
        assert_eq!(earliest_stop("nothing here", &stops), None);
    }
}
