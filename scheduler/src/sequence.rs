//! One request inside the engine: its tokens (prompt, then output), its input
//! embeddings, its sampler and its blocks of the paged KV cache.
//!
//! Positions `0..computed` are in the cache. A running sequence computes the
//! positions after that, a prefill chunk at a time or one decoded token, until
//! `computed` reaches every known token; the last position's logits pick the next
//! token. Preemption forgets the cache (`computed = 0`) and keeps everything else,
//! so the sequence recomputes its prompt and output later and goes on with the
//! same sampler.
//!
//! A request resumed after another scheduler failed (`SubmitRequest.resumed_tokens`)
//! ends its prompt with its own earlier output: those tokens run as prompt, but
//! the presence and frequency penalties count them as output and the stop-string
//! matcher is fed their text before the first new token, so the new tokens are
//! picked and stopped as the failed scheduler would have. Its sampler starts
//! afresh: a seeded sampled request continues with new draws.

use std::time::Instant;

use candle_core::Tensor;
use tessera_model::chat::ChatTokenizer;
use tessera_model::generate::{FinishReason, GenerationParams};
use tessera_model::language::LanguageModel;
use tessera_model::sampling::Sampler;
use tessera_model::text::{Detokenizer, StopStrings};
use tokio::sync::mpsc;
use tonic::Status;

use crate::active::ActiveEntry;
use crate::error::{Error, Result};
use crate::kv::{BlockHash, BlockPool, BlockTable, TokenKey, block_hash};
use crate::request::PromptIds;

/// What the engine tells a request's reader.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A sampled token, with the logits that picked it when the request records
    /// them (`GenerationParams::record_logits`).
    Token {
        id: u32,
        logits: Option<Vec<f32>>,
        /// Its log probability and the top alternatives', when the request asks.
        logprob: Option<TokenLogprob>,
    },
    /// The last event of a request that finished.
    Finished {
        reason: FinishReason,
        prompt_tokens: u32,
        completion_tokens: u32,
    },
}

/// A token's log probability and the most likely alternatives' (id, log probability),
/// most likely first ([`tessera_model::sampling::log_probs`]).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// What a request's stream carries: events, or the error that ended it.
pub type EventResult = std::result::Result<Event, Status>;

/// How a sequence ended.
#[derive(Debug)]
pub enum Outcome {
    Finished(FinishReason),
    Failed(Status),
}

/// One request in the engine.
pub struct Sequence {
    /// Its place among the active requests (dropped when it ends).
    pub entry: ActiveEntry,
    pub trace_id: String,
    pub events: mpsc::Sender<EventResult>,
    /// Order of arrival (older first; the newest is preempted first).
    pub serial: u64,
    pub arrived: Instant,
    pub deadline: Option<Instant>,
    pub params: GenerationParams,
    sampler: Sampler,
    /// Prompt ids, then every generated id.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// The last ids of the prompt that are the request's earlier output (resumed).
    resumed: usize,
    /// Whether the resumed output's text has been fed to `stops` yet.
    stops_seeded: bool,
    /// What each token is for prefix hashing (image tokens by image content).
    keys: Vec<TokenKey>,
    /// Input embeddings of the prompt (image rows in place): (prompt, hidden).
    prompt_embeds: Tensor,
    /// Positions in the KV cache.
    pub computed: usize,
    pub blocks: BlockTable,
    /// Hashes of the full blocks registered so far (a prefix of `blocks`).
    hashes: Vec<BlockHash>,
    /// Prompt positions taken from the prefix cache (summed over admissions).
    pub reused_tokens: usize,
    /// Positions computed by the model (summed over admissions).
    pub model_tokens: usize,
    pub first_token_at: Option<Instant>,
    /// Times it was preempted.
    pub preemptions: u32,
    /// Its share of the expert bytes of the steps it ran in.
    pub expert_bytes: u64,
    /// The output as text, a token at a time (kept only with stop strings).
    text: Detokenizer,
    stops: StopStrings,
}

impl std::fmt::Debug for Sequence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sequence")
            .field("id", &self.entry.id())
            .field("serial", &self.serial)
            .field("prompt", &self.prompt_len)
            .field("output", &self.output().len())
            .field("computed", &self.computed)
            .field("blocks", &self.blocks.blocks.len())
            .finish_non_exhaustive()
    }
}

/// Everything a sequence is made from.
pub struct NewSequence {
    pub entry: ActiveEntry,
    pub trace_id: String,
    pub events: mpsc::Sender<EventResult>,
    pub serial: u64,
    pub deadline: Option<Instant>,
    pub params: GenerationParams,
    pub prompt: PromptIds,
    pub keys: Vec<TokenKey>,
    pub prompt_embeds: Tensor,
}

impl Sequence {
    pub fn new(n: NewSequence) -> Result<Self> {
        let sampler = Sampler::new(n.params.sampling.clone()).map_err(Error::from_model)?;
        let stops = StopStrings::new(&n.params.stop);
        let resumed = n.prompt.resumed();
        Ok(Self {
            entry: n.entry,
            trace_id: n.trace_id,
            events: n.events,
            serial: n.serial,
            arrived: Instant::now(),
            deadline: n.deadline,
            params: n.params,
            sampler,
            prompt_len: n.prompt.len(),
            resumed,
            stops_seeded: resumed == 0,
            tokens: n.prompt.into_ids(),
            keys: n.keys,
            prompt_embeds: n.prompt_embeds,
            computed: 0,
            blocks: BlockTable::default(),
            hashes: Vec::new(),
            reused_tokens: 0,
            model_tokens: 0,
            first_token_at: None,
            preemptions: 0,
            expert_bytes: 0,
            text: Detokenizer::default(),
            stops,
        })
    }

    /// Its active-request entry and event channel, for the last event.
    pub fn into_parts(self) -> (ActiveEntry, mpsc::Sender<EventResult>) {
        (self.entry, self.events)
    }

    pub fn prompt_len(&self) -> usize {
        self.prompt_len
    }

    /// Generated ids so far.
    pub fn output(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    /// Known tokens: prompt + output.
    #[allow(clippy::len_without_is_empty)] // never empty: the prompt has a token
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Positions still to compute before the next token can be sampled.
    pub fn pending(&self) -> usize {
        self.tokens.len() - self.computed
    }

    /// Whether it computes one decoded token next (rather than prompt positions).
    pub fn is_decoding(&self) -> bool {
        self.pending() == 1 && !self.output().is_empty()
    }

    /// Positions this sequence can ever need: prompt + max_tokens.
    pub fn max_positions(&self) -> usize {
        self.prompt_len + self.params.max_new_tokens
    }

    /// Input embeddings of positions `start..start + len`.
    pub fn embeds(&self, model: &LanguageModel, start: usize, len: usize) -> Result<Tensor> {
        let end = start + len;
        let mut pieces = Vec::with_capacity(2);
        if start < self.prompt_len {
            let n = end.min(self.prompt_len) - start;
            pieces.push(
                self.prompt_embeds
                    .narrow(0, start, n)
                    .map_err(|e| Error::Model(e.into()))?,
            );
        }
        if end > self.prompt_len {
            let from = start.max(self.prompt_len);
            pieces.push(
                model
                    .embed(&self.tokens[from..end])
                    .map_err(Error::from_model)?
                    .to_dtype(self.prompt_embeds.dtype())
                    .map_err(|e| Error::Model(e.into()))?,
            );
        }
        if pieces.len() == 1 {
            return Ok(pieces.pop().expect("one piece"));
        }
        Tensor::cat(&pieces, 0).map_err(|e| Error::Model(e.into()))
    }

    /// Takes cached blocks for the longest known prefix (never the last position,
    /// which must run to give logits). Returns the positions reused.
    pub fn match_prefix(&mut self, pool: &mut BlockPool) -> usize {
        debug_assert!(self.blocks.blocks.is_empty() && self.computed == 0);
        let bs = pool.block_size();
        let full = (self.tokens.len() - 1) / bs;
        let mut hashes = Vec::with_capacity(full);
        for i in 0..full {
            hashes.push(block_hash(hashes.last(), &self.keys[i * bs..(i + 1) * bs]));
        }
        let matched = pool.match_prefix(&hashes);
        hashes.truncate(matched.len());
        self.computed = matched.len() * bs;
        self.blocks.blocks = matched;
        self.hashes = hashes;
        self.reused_tokens += self.computed;
        self.computed
    }

    /// Records `n` more positions computed and registers every block that filled.
    pub fn advance(&mut self, n: usize, pool: &mut BlockPool) {
        self.computed += n;
        self.model_tokens += n;
        let bs = pool.block_size();
        while (self.hashes.len() + 1) * bs <= self.computed {
            let i = self.hashes.len();
            let hash = block_hash(self.hashes.last(), &self.keys[i * bs..(i + 1) * bs]);
            pool.register(self.blocks.blocks[i], hash);
            self.hashes.push(hash);
        }
    }

    /// Frees every block and forgets the cache; the tokens stay.
    pub fn release(&mut self, pool: &mut BlockPool) {
        pool.release_all(&self.blocks.blocks);
        self.blocks.blocks.clear();
        self.hashes.clear();
        self.computed = 0;
    }

    /// Picks the next token from `logits`, streams it, and says whether that ends
    /// the sequence.
    pub fn sample(&mut self, logits: Vec<f32>, tokenizer: &ChatTokenizer) -> Option<Outcome> {
        // The penalties over output tokens count the resumed output too.
        let output_start = self.prompt_len - self.resumed;
        let next = self.sampler.sample(&logits, &self.tokens, output_start);
        self.tokens.push(next);
        self.keys.push(TokenKey::Text(next));
        self.first_token_at.get_or_insert_with(Instant::now);
        let logprob = self.params.logprobs.map(|top| {
            let (logprob, top) = tessera_model::sampling::log_probs(&logits, next, top);
            TokenLogprob { logprob, top }
        });
        let event = Event::Token {
            id: next,
            logits: self.params.record_logits.then_some(logits),
            logprob,
        };
        if self.events.try_send(Ok(event)).is_err() {
            // The client went away (or stopped reading).
            return Some(Outcome::Failed(Status::from(Error::Cancelled)));
        }
        if next == self.params.eos_token_id && !self.params.ignore_eos {
            return Some(Outcome::Finished(FinishReason::Eos));
        }
        if !self.stops.is_empty() {
            if let Err(e) = self.seed_stops(tokenizer) {
                return Some(Outcome::Failed(Status::from(Error::from_model(e))));
            }
            let piece = match self.text.push(tokenizer, next) {
                Ok(piece) => piece,
                Err(e) => return Some(Outcome::Failed(Status::from(Error::from_model(e)))),
            };
            if self.stops.push(&piece) {
                return Some(Outcome::Finished(FinishReason::Stop));
            }
        }
        if self.output().len() >= self.params.max_new_tokens {
            return Some(Outcome::Finished(FinishReason::Length));
        }
        None
    }

    /// Feeds the resumed output's text to the detokenizer and the stop-string matcher
    /// (once), so that a stop string spanning the resumption is found.
    fn seed_stops(&mut self, tokenizer: &ChatTokenizer) -> tessera_model::Result<()> {
        if self.stops_seeded {
            return Ok(());
        }
        self.stops_seeded = true;
        for &id in &self.tokens[self.prompt_len - self.resumed..self.prompt_len] {
            let piece = self.text.push(tokenizer, id)?;
            self.stops.push(&piece);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use candle_core::{DType, Device};
    use tessera_model::sampling::SamplingParams;

    use super::*;
    use crate::active::ActiveRequests;

    fn tokenizer() -> ChatTokenizer {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-mha-softmax");
        ChatTokenizer::from_dir(&dir).unwrap()
    }

    /// A sequence of `ids`, the last `resumed` of them resumed output, and the
    /// receiver of its events.
    fn sequence(
        ids: Vec<u32>,
        resumed: usize,
        params: GenerationParams,
    ) -> (Sequence, mpsc::Receiver<EventResult>) {
        let (events, rx) = mpsc::channel(64);
        let n = ids.len();
        let seq = Sequence::new(NewSequence {
            entry: ActiveRequests::default().insert("r").unwrap(),
            trace_id: "r".into(),
            events,
            serial: 0,
            deadline: None,
            params,
            keys: ids.iter().map(|&id| TokenKey::Text(id)).collect(),
            prompt: PromptIds::new(ids, resumed),
            prompt_embeds: Tensor::zeros((n, 4), DType::F32, &Device::Cpu).unwrap(),
        })
        .unwrap();
        (seq, rx)
    }

    /// Logits over `vocab` tokens favouring `best`, then `second`.
    fn logits(vocab: usize, best: u32, second: u32) -> Vec<f32> {
        let mut l = vec![0.0; vocab];
        l[best as usize] = 2.0;
        l[second as usize] = 1.9;
        l
    }

    #[test]
    fn resumed_output_counts_for_the_presence_and_frequency_penalties() {
        let tokenizer = tokenizer();
        let vocab = tokenizer.vocab_size();
        let params = GenerationParams {
            sampling: SamplingParams {
                presence_penalty: 0.5,
                ..SamplingParams::default()
            },
            ..GenerationParams::greedy(4, 1)
        };
        // 40 was generated before the request resumed here: penalized, 41 wins.
        let (mut resumed, _rx) = sequence(vec![7, 8, 40], 1, params.clone());
        assert!(resumed.sample(logits(vocab, 40, 41), &tokenizer).is_none());
        assert_eq!(resumed.output(), [41]);
        // The same 40 in a prompt is not penalized.
        let (mut prompted, _rx) = sequence(vec![7, 8, 40], 0, params);
        assert!(prompted.sample(logits(vocab, 40, 41), &tokenizer).is_none());
        assert_eq!(prompted.output(), [40]);
    }

    #[test]
    fn a_stop_string_across_the_resumption_is_found() {
        let tokenizer = tokenizer();
        let vocab = tokenizer.vocab_size();
        let ids = tokenizer.encode("The lighthouse keeper").unwrap();
        assert!(ids.len() >= 2, "{ids:?}");
        let whole = tokenizer.decode(&ids, false).unwrap();
        let last = *ids.last().unwrap();
        let params = GenerationParams {
            stop: vec![whole.trim().to_owned()],
            ..GenerationParams::greedy(4, 1)
        };
        let prompt = [vec![5_u32, 6], ids[..ids.len() - 1].to_vec()].concat();
        let other = if last == 9 { 10 } else { 9 };
        let (mut resumed, _rx) = sequence(prompt.clone(), ids.len() - 1, params.clone());
        let outcome = resumed.sample(logits(vocab, last, other), &tokenizer);
        assert!(
            matches!(outcome, Some(Outcome::Finished(FinishReason::Stop))),
            "{outcome:?}"
        );
        // Without the resumed output's text, the last token alone is no stop.
        let (mut fresh, _rx) = sequence(prompt, 0, params);
        assert!(
            fresh
                .sample(logits(vocab, last, other), &tokenizer)
                .is_none()
        );
    }
}
