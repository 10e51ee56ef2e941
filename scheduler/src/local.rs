//! One generation at a time in this process, through the [`Engine`] — the same
//! decode loop, sampler and stop strings as the cluster — with the routed experts
//! in this process: `tessera generate`, and the golden tests of generation.
//!
//! A prompt is checked exactly as a `Submit` is ([`request::validate`]); its
//! image embeddings travel as the vision-worker would send them.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Tensor;
use tessera_model::chat::ChatTokenizer;
use tessera_model::generate::{FinishReason, GenerationParams};
use tessera_model::language::LanguageModel;
use tessera_model::text::StopStrings;
use tessera_proto::internal::v1::{ImageRun, Sampling, Stopping, SubmitRequest};
use tokio::sync::mpsc;

use crate::active::ActiveRequests;
use crate::config::EngineConfig;
use crate::engine::{Engine, Event, Experts, Job, event_buffer};
use crate::error::{Error, Result};
use crate::request::{self, Limits};
use crate::stats::Stats;

/// A prompt as the model takes it.
#[derive(Debug, Clone)]
pub struct Prompt {
    pub input_ids: Vec<u32>,
    /// The positions of each image's tokens, in order.
    pub image_runs: Vec<Range<usize>>,
    /// The image tokens' embeddings, (Σ run lengths, hidden), runs in order;
    /// `None` without images.
    pub image_embeds: Option<Tensor>,
}

/// Wall-clock time spent in each phase of a generation.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    pub prompt_tokens: usize,
    /// Submission to the first token (the prompt's prefill).
    pub prefill: Duration,
    /// Tokens generated after the first.
    pub decode_steps: usize,
    /// First token to the last.
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

/// One finished generation.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Generated ids (including a final EOS when that is why generation stopped).
    pub output_ids: Vec<u32>,
    /// Output text with special tokens kept, without a final EOS or the stop string.
    pub text: String,
    pub finish_reason: FinishReason,
    /// The logits that picked each generated token (row 0: the last prompt
    /// position), when `record_logits` was set.
    pub step_logits: Vec<Vec<f32>>,
    pub timings: Timings,
}

/// An engine of its own, running one request at a time.
#[derive(Debug)]
pub struct LocalEngine {
    engine: Engine,
    active: ActiveRequests,
    tokenizer: ChatTokenizer,
    limits: Limits,
    served: u64,
}

impl LocalEngine {
    /// Starts an engine over `model` and `experts` configured by `cfg`
    /// (see [`EngineConfig::single`]).
    pub fn start(
        model: LanguageModel,
        tokenizer: ChatTokenizer,
        experts: Arc<dyn Experts>,
        cfg: EngineConfig,
    ) -> Result<Self> {
        let language = model.config();
        let mut limits = Limits {
            vocab_size: language.vocab_size,
            hidden_size: language.hidden_size,
            max_positions: language.max_position_embeddings,
            eos_token_id: language.eos_token_id,
            cache_tokens: 0,
        };
        let engine = Engine::start(
            model,
            tokenizer.clone(),
            experts,
            Arc::new(Stats::default()),
            1,
            cfg,
        )?;
        limits.cache_tokens = engine.cache_tokens();
        Ok(Self {
            engine,
            active: ActiveRequests::default(),
            tokenizer,
            limits,
            served: 0,
        })
    }

    /// Generates a continuation of `prompt` and waits for it. Blocking: call it
    /// outside an async runtime.
    pub fn generate(&mut self, prompt: &Prompt, params: &GenerationParams) -> Result<Generation> {
        let submit = submit_request(prompt, params)?;
        let mut validated = request::validate(submit, &self.limits)?;
        validated.params.record_logits = params.record_logits;
        let prompt_tokens = validated.input_ids.len();
        let stop = StopStrings::new(&validated.params.stop);
        let eos = validated.params.eos_token_id;
        self.served += 1;
        let id = format!("generate-{}", self.served);
        let (events, mut rx) = mpsc::channel(event_buffer(validated.params.max_new_tokens));
        let started = Instant::now();
        self.engine.submit(Job {
            entry: self.active.insert(&id)?,
            trace_id: id,
            request: validated,
            events,
        })?;

        let (mut output, mut step_logits) = (Vec::new(), Vec::new());
        let mut first_token = None;
        let finish_reason = loop {
            match rx.blocking_recv() {
                Some(Ok(Event::Token { id, logits, .. })) => {
                    first_token.get_or_insert_with(Instant::now);
                    output.push(id);
                    step_logits.extend(logits);
                }
                Some(Ok(Event::Finished { reason, .. })) => break reason,
                Some(Err(status)) => return Err(Error::Ended(status)),
                None => return Err(Error::EngineStopped),
            }
        };
        let first_token = first_token.unwrap_or_else(Instant::now);
        let timings = Timings {
            prompt_tokens,
            prefill: first_token - started,
            decode_steps: output.len().saturating_sub(1),
            decode: first_token.elapsed(),
        };
        let shown = match (finish_reason, output.split_last()) {
            (FinishReason::Eos, Some((&last, rest))) if last == eos => rest,
            _ => &output[..],
        };
        let mut text = self
            .tokenizer
            .decode(shown, false)
            .map_err(Error::from_model)?;
        if finish_reason == FinishReason::Stop
            && let Some(cut) = stop.earliest(&text)
        {
            text.truncate(cut);
        }
        Ok(Generation {
            output_ids: output,
            text,
            finish_reason,
            step_logits,
            timings,
        })
    }
}

impl EngineConfig {
    /// An engine for one request at a time of at most `tokens` positions
    /// (prompt + output): one sequence, a KV cache of exactly that size, no
    /// prefix cache, the prompt prefilled in one step unless `prefill_chunk`.
    pub fn single(tokens: usize, bytes_per_token: usize, prefill_chunk: Option<usize>) -> Self {
        let defaults = Self::default();
        let block = defaults.kv_block_size;
        let blocks = tokens.div_ceil(block) + 1;
        Self {
            max_batch_tokens: tokens.max(1),
            max_seqs: 1,
            kv_cache_bytes: Some((blocks * block * bytes_per_token.max(1)) as u64),
            prefill_chunk: prefill_chunk.unwrap_or(tokens).max(1),
            no_overlap: true,
            no_prefix_cache: true,
            ..defaults
        }
    }
}

/// `prompt` and `params` as the scheduler's `Submit` would receive them.
fn submit_request(prompt: &Prompt, params: &GenerationParams) -> Result<SubmitRequest> {
    let mut image_runs = Vec::with_capacity(prompt.image_runs.len());
    let mut row = 0;
    for run in &prompt.image_runs {
        let Some(embeds) = &prompt.image_embeds else {
            return Err(Error::InvalidArgument(
                "the prompt has image runs but no image embeddings".into(),
            ));
        };
        let rows = embeds
            .narrow(0, row, run.len())
            .map_err(|e| Error::InvalidArgument(format!("image embeddings: {e}")))?;
        row += run.len();
        let embeddings = tessera_proto::tensor::encode(&rows)
            .map_err(|e| Error::InvalidArgument(format!("image embeddings: {e}")))?;
        image_runs.push(ImageRun {
            start: run.start as u32,
            len: run.len() as u32,
            embeddings: Some(embeddings),
            // The engine hashes the embeddings itself.
            content_hash: Default::default(),
        });
    }
    let s = &params.sampling;
    let max_tokens = u32::try_from(params.max_new_tokens)
        .map_err(|_| Error::InvalidArgument("max_tokens is too large".into()))?;
    Ok(SubmitRequest {
        request_id: String::new(),
        model_fingerprint: String::new(),
        input_ids: prompt.input_ids.clone(),
        image_runs,
        sampling: Some(Sampling {
            temperature: s.temperature,
            top_p: s.top_p,
            top_k: s.top_k.map_or(0, |k| k.min(u32::MAX as usize) as u32),
            repetition_penalty: s.repetition_penalty,
            presence_penalty: s.presence_penalty,
            frequency_penalty: s.frequency_penalty,
            seed: s.seed,
            ..Default::default()
        }),
        stopping: Some(Stopping {
            max_tokens,
            stop: params.stop.clone(),
            ignore_eos: params.ignore_eos,
        }),
        resumed_tokens: 0,
    })
}
