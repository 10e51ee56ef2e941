//! The engine: the language model on its own thread (the model never runs on the
//! gRPC runtime), fed by a bounded queue of jobs, running many sequences at once
//! (continuous batching, after vLLM and SGLang). It is the one decode loop: the
//! scheduler's gRPC service and `tessera generate` ([`crate::local`]) both submit
//! to it.
//!
//! Every step it
//! 1. takes new jobs from the queue and ends sequences that were cancelled, whose
//!    client went away or whose deadline passed (their blocks are freed);
//! 2. plans the step ([`Engine`] docs below): one decode token for each running
//!    sequence, then prefill chunks, then new sequences, within `--max-batch-tokens`
//!    and `--max-seqs`, taking KV blocks from the pool and preempting the newest
//!    sequence when decode runs out of blocks;
//! 3. runs all of it in one [`LanguageModel::forward_batch`] (two micro-batches whose
//!    expert calls overlap each other's attention unless `--no-overlap`), with a
//!    step context carrying the step's request ids and a cancellation that fires
//!    when any of its requests is cancelled or runs out of time: a step stopped
//!    that way ends nothing itself; step 1 of the next round ends the cancelled
//!    request and the others run the step again;
//! 4. samples a token for every sequence that reached the end of its known tokens,
//!    streams it, and ends sequences that are done.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError, sync_channel};
use std::time::{Duration, Instant};

use candle_core::Tensor;
use sha2::{Digest, Sha256};
use tessera_model::chat::ChatTokenizer;
use tessera_model::experts::{ExpertBackend, LocalExperts, StepContext};
use tessera_model::language::{BatchSegment, LanguageModel, PagedKvCache};
use tessera_proto::tensor;
use tonic::Status;

use crate::active::ActiveEntry;
use crate::cancel::AnyCancelled;
use crate::config::EngineConfig;
use crate::error::{Error, Result};
use crate::kv::{BlockPool, TokenKey};
use crate::remote_experts::RemoteExperts;
use crate::request::Validated;
use crate::sequence::{NewSequence, Outcome, Sequence};
use crate::stats::{EngineCounters, RequestStats, Stats};

pub use crate::sequence::{Event, EventResult};

/// One request for the engine.
#[derive(Debug)]
pub struct Job {
    /// Its place among the active requests (removed when the request ends).
    pub entry: ActiveEntry,
    /// The id logged.
    pub trace_id: String,
    pub request: Validated,
    /// Where its events go. Sends never wait: the channel must hold
    /// `max_tokens + 1` events ([`event_buffer`]).
    pub events: tokio::sync::mpsc::Sender<EventResult>,
}

/// Events a request's channel must hold so the engine never waits on a reader.
pub fn event_buffer(max_tokens: usize) -> usize {
    max_tokens + 2
}

/// Routed experts as the engine uses them.
pub trait Experts: ExpertBackend {
    /// Bytes sent to and received from expert-workers so far.
    fn bytes_moved(&self) -> u64 {
        0
    }
}

impl Experts for LocalExperts {}

impl Experts for RemoteExperts {
    fn bytes_moved(&self) -> u64 {
        self.bytes_sent() + self.bytes_received()
    }
}

use tessera_runtime::memory::memory_limit;

/// Default KV-cache size: what `max_seqs` sequences of the model's whole context
/// need (`needed`), but at most 10% of [`memory_limit`] and at most 8 GiB.
pub fn default_cache_bytes(needed: u64) -> u64 {
    needed.min(memory_limit() / 10).min(8 << 30)
}

/// Blocks of the KV pool for `model` under `cfg`; an error names the flag to change.
pub fn kv_blocks(model: &LanguageModel, cfg: &EngineConfig) -> Result<usize> {
    let per_token = model.cache_bytes_per_token() as u64;
    let needed = (cfg.max_seqs * model.config().max_position_embeddings) as u64 * per_token;
    let bytes = cfg
        .kv_cache_bytes
        .unwrap_or_else(|| default_cache_bytes(needed));
    let per_block = per_token * cfg.kv_block_size as u64;
    let blocks = (bytes / per_block.max(1)) as usize;
    if blocks == 0 {
        return Err(Error::Config(format!(
            "--kv-cache-bytes {bytes} holds no KV block: one block of {} tokens takes {per_block} bytes",
            cfg.kv_block_size
        )));
    }
    Ok(blocks)
}

/// A handle to the engine thread: submits jobs to its bounded queue. The thread
/// ends once every handle is dropped and every sequence has ended.
#[derive(Debug, Clone)]
pub struct Engine {
    jobs: SyncSender<Job>,
    capacity: usize,
    blocks: usize,
    block_size: usize,
}

/// What the engine thread owns.
struct Worker {
    model: LanguageModel,
    tokenizer: ChatTokenizer,
    experts: Arc<dyn Experts>,
    stats: Arc<Stats>,
    cfg: EngineConfig,
    cache: PagedKvCache,
    pool: BlockPool,
    waiting: VecDeque<Sequence>,
    /// Oldest first.
    running: Vec<Sequence>,
    next_serial: u64,
    counters: EngineCounters,
}

impl Engine {
    /// Starts the engine thread with a queue of `capacity` waiting jobs and a KV
    /// pool of `blocks` blocks ([`kv_blocks`]).
    pub fn start(
        model: LanguageModel,
        tokenizer: ChatTokenizer,
        experts: Arc<dyn Experts>,
        stats: Arc<Stats>,
        capacity: usize,
        cfg: EngineConfig,
    ) -> Result<Self> {
        cfg.validate()?;
        let blocks = kv_blocks(&model, &cfg)?;
        let block_size = cfg.kv_block_size;
        let cache = model
            .new_paged_cache(blocks * block_size)
            .map_err(|e| Error::Config(format!("cannot allocate the KV cache: {e}")))?;
        let mut pool = BlockPool::new(blocks, block_size);
        pool.set_enabled(!cfg.no_prefix_cache);
        tracing::info!(
            blocks,
            block_size,
            bytes = cache.allocated_bytes(),
            bytes_per_token = cache.bytes_per_token(),
            "KV cache allocated"
        );
        let counters = EngineCounters {
            pool: pool.counters(),
            kv_bytes_per_token: cache.bytes_per_token(),
            kv_block_size: block_size,
            ..Default::default()
        };
        stats.set_engine(counters);
        let (jobs, queue) = sync_channel(capacity);
        let worker = Worker {
            model,
            tokenizer,
            experts,
            stats,
            cfg,
            cache,
            pool,
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_serial: 0,
            counters,
        };
        std::thread::Builder::new()
            .name("tessera-engine".into())
            .spawn(move || worker.run(queue))
            .map_err(Error::Thread)?;
        Ok(Self {
            jobs,
            capacity,
            blocks,
            block_size,
        })
    }

    /// Tokens the KV pool holds: no request may need more.
    pub fn cache_tokens(&self) -> usize {
        self.blocks * self.block_size
    }

    /// Queues `job`; a full queue is [`Error::QueueFull`] (the job is dropped).
    pub fn submit(&self, job: Job) -> Result<()> {
        match self.jobs.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(Error::QueueFull(self.capacity)),
            Err(TrySendError::Disconnected(_)) => Err(Error::EngineStopped),
        }
    }
}

/// One sequence's share of the planned step.
struct Planned {
    serial: u64,
    tokens: usize,
}

impl Worker {
    fn run(mut self, queue: Receiver<Job>) {
        let mut open = true;
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                if !open {
                    break;
                }
                match queue.recv() {
                    Ok(job) => self.accept(job),
                    Err(_) => break,
                }
            }
            // Jobs are taken from the bounded queue only while they could run
            // (`max_seqs`); the rest wait there, so a full queue refuses new requests
            // however fast steps run and nothing here grows without bound.
            while self.running.len() + self.waiting.len() < self.cfg.max_seqs {
                match queue.try_recv() {
                    Ok(job) => self.accept(job),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            self.reap();
            let plan = self.schedule();
            if plan.is_empty() {
                // Nothing can run: only a waiting sequence the pool cannot hold even
                // when empty (refused up front, so this is a safety net).
                if self.running.is_empty()
                    && let Some(seq) = self.waiting.pop_front()
                {
                    let status = Status::from(Error::InvalidArgument(
                        "the request does not fit in the KV cache".into(),
                    ));
                    self.end(seq, Outcome::Failed(status));
                }
                self.publish();
                continue;
            }
            // The running set is visible while the step runs (it may wait for experts).
            self.publish();
            self.step(plan);
            self.publish();
        }
        tracing::debug!("engine stopped");
    }

    /// Turns a job into a waiting sequence (or ends it at once with its error).
    fn accept(&mut self, job: Job) {
        let Job {
            entry,
            trace_id,
            request,
            events,
        } = job;
        let serial = self.next_serial;
        self.next_serial += 1;
        let timeout = (self.cfg.request_timeout_seconds > 0)
            .then(|| Instant::now() + Duration::from_secs(self.cfg.request_timeout_seconds));
        let deadline = match (request.deadline, timeout) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let built = self.embeddings(&request).and_then(|embeds| {
            Sequence::new(NewSequence {
                entry,
                trace_id: trace_id.clone(),
                events: events.clone(),
                serial,
                deadline,
                keys: token_keys(&request),
                params: request.params,
                prompt: request.input_ids,
                prompt_embeds: embeds,
            })
        });
        match built {
            Ok(seq) => self.waiting.push_back(seq),
            Err(e) => {
                tracing::warn!(request_id = %trace_id, error = %e, "request refused");
                let _ = events.try_send(Err(Status::from(e)));
            }
        }
    }

    /// Ends every sequence that was cancelled, lost its reader or ran out of time.
    fn reap(&mut self) {
        let now = Instant::now();
        let verdict = |seq: &Sequence| {
            if seq.entry.cancel_token().is_cancelled() || seq.events.is_closed() {
                Some(Error::Cancelled)
            } else if seq.deadline.is_some_and(|d| now >= d) {
                Some(Error::DeadlineExceeded)
            } else {
                None
            }
        };
        let mut ended = Vec::new();
        let mut i = 0;
        while i < self.running.len() {
            match verdict(&self.running[i]) {
                Some(e) => ended.push((self.running.remove(i), e)),
                None => i += 1,
            }
        }
        let mut kept = VecDeque::with_capacity(self.waiting.len());
        for seq in self.waiting.drain(..) {
            match verdict(&seq) {
                Some(e) => ended.push((seq, e)),
                None => kept.push_back(seq),
            }
        }
        self.waiting = kept;
        for (seq, e) in ended {
            self.end(seq, Outcome::Failed(Status::from(e)));
        }
    }

    /// Plans a step: decodes first, then prefill chunks of running sequences, then
    /// new sequences, within the token budget and the KV pool.
    fn schedule(&mut self) -> Vec<Planned> {
        let chunk = self.cfg.prefill_chunk;
        let bs = self.pool.block_size();
        let mut budget = self.cfg.max_batch_tokens;
        let mut plan: Vec<Planned> = Vec::new();
        for decode_pass in [true, false] {
            let mut i = 0;
            while i < self.running.len() && budget > 0 {
                let seq = &self.running[i];
                if seq.is_decoding() != decode_pass || plan.iter().any(|p| p.serial == seq.serial) {
                    i += 1;
                    continue;
                }
                let n = seq.pending().min(chunk).min(budget);
                let need = seq.blocks.blocks_needed(seq.computed + n, bs);
                let serial = seq.serial;
                // Make room by preempting the newest other sequences.
                while self.pool.available() < need {
                    let victim = (0..self.running.len())
                        .filter(|&j| j != i)
                        .max_by_key(|&j| self.running[j].serial);
                    let Some(v) = victim else { break };
                    let victim_serial = self.running[v].serial;
                    if let Some(p) = plan.iter().position(|p| p.serial == victim_serial) {
                        budget += plan.remove(p).tokens;
                    }
                    self.preempt(v);
                    if v < i {
                        i -= 1;
                    }
                }
                if self.pool.available() < need {
                    // Alone and still no room: the pool is smaller than the
                    // sequence (refused up front; safety net).
                    self.preempt(i);
                    continue;
                }
                let seq = &mut self.running[i];
                for _ in 0..need {
                    let block = self.pool.allocate().expect("checked available");
                    seq.blocks.blocks.push(block);
                }
                plan.push(Planned { serial, tokens: n });
                budget -= n;
                i += 1;
            }
        }
        self.admit(&mut plan, budget);
        plan
    }

    /// Moves waiting sequences into the step while the budget, the sequence cap and
    /// the pool allow: a sequence is admitted only when its whole prompt fits next
    /// to what running prefills still need.
    fn admit(&mut self, plan: &mut Vec<Planned>, mut budget: usize) {
        let chunk = self.cfg.prefill_chunk;
        let bs = self.pool.block_size();
        while budget > 0 && self.running.len() < self.cfg.max_seqs {
            let Some(seq) = self.waiting.front() else {
                break;
            };
            let reserved: usize = self
                .running
                .iter()
                .filter(|s| !s.is_decoding())
                .map(|s| s.blocks.blocks_needed(s.len(), bs))
                .sum();
            let whole = self.pool.blocks_for(seq.len()) + 1;
            if self.pool.available() < reserved + whole {
                break;
            }
            let mut seq = self.waiting.pop_front().expect("front exists");
            let reused = seq.match_prefix(&mut self.pool);
            self.counters.prefix_reused_tokens += reused as u64;
            let n = seq.pending().min(chunk).min(budget);
            for _ in 0..seq.blocks.blocks_needed(seq.computed + n, bs) {
                let block = self.pool.allocate().expect("checked available");
                seq.blocks.blocks.push(block);
            }
            plan.push(Planned {
                serial: seq.serial,
                tokens: n,
            });
            budget -= n;
            let at = self.running.partition_point(|s| s.serial < seq.serial);
            self.running.insert(at, seq);
        }
    }

    /// Frees running sequence `i`'s blocks and puts it back at the head of the queue.
    fn preempt(&mut self, i: usize) {
        let mut seq = self.running.remove(i);
        tracing::debug!(request_id = %seq.trace_id, computed = seq.computed, "preempted: out of KV blocks");
        seq.release(&mut self.pool);
        seq.preemptions += 1;
        self.counters.preemptions += 1;
        let at = self.waiting.partition_point(|s| s.serial < seq.serial);
        self.waiting.insert(at, seq);
    }

    /// Runs the planned step and hands out its tokens.
    fn step(&mut self, plan: Vec<Planned>) {
        let bs = self.pool.block_size();
        let index_of = |running: &[Sequence], serial| {
            running
                .iter()
                .position(|s| s.serial == serial)
                .expect("planned sequences are running")
        };
        let mut slots = Vec::with_capacity(plan.len());
        let mut inputs = Vec::with_capacity(plan.len());
        for p in &plan {
            let seq = &self.running[index_of(&self.running, p.serial)];
            let start = seq.computed;
            slots.push(seq.blocks.slots(start + p.tokens, bs));
            inputs.push((
                seq.embeds(&self.model, start, p.tokens),
                start,
                start + p.tokens == seq.len(),
            ));
        }
        let mut segments = Vec::with_capacity(plan.len());
        let mut failed = None;
        for ((embeds, start, logits), slots) in inputs.into_iter().zip(&slots) {
            match embeds {
                Ok(embeds) => segments.push(BatchSegment {
                    embeds,
                    start,
                    slots,
                    logits,
                }),
                Err(e) => failed = Some(e),
            }
        }
        let micro_batches = if self.cfg.no_overlap { 1 } else { 2 };
        let context = self.step_context(&plan);
        let bytes_before = self.experts.bytes_moved();
        let result = match failed {
            Some(e) => Err(e),
            None => self
                .model
                .forward_batch(
                    &segments,
                    &self.cache,
                    self.experts.as_ref(),
                    &context,
                    micro_batches,
                )
                .map_err(Error::from_model),
        };
        drop(segments);
        let total: usize = plan.iter().map(|p| p.tokens).sum();
        let bytes = self.experts.bytes_moved() - bytes_before;
        self.counters.steps += 1;
        self.counters.batched_tokens += total as u64;
        self.counters.max_step_sequences = self.counters.max_step_sequences.max(plan.len());
        let logits = match result {
            Ok(logits) => logits,
            Err(Error::Cancelled) => {
                // A request of the step was cancelled while the step waited for
                // experts: the next round ends it, the others run the step again
                // (their positions were not counted as computed).
                tracing::debug!(sequences = plan.len(), "step stopped by a cancellation");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, sequences = plan.len(), "step failed");
                let status = Status::from(e);
                for p in &plan {
                    let seq = self.running.remove(index_of(&self.running, p.serial));
                    self.end(seq, Outcome::Failed(status.clone()));
                }
                return;
            }
        };
        for (p, row) in plan.iter().zip(logits) {
            let i = index_of(&self.running, p.serial);
            let seq = &mut self.running[i];
            let prompt_left = seq.prompt_len().saturating_sub(seq.computed);
            self.counters.prefill_tokens += p.tokens.min(prompt_left) as u64;
            seq.expert_bytes += bytes * p.tokens as u64 / total.max(1) as u64;
            seq.advance(p.tokens, &mut self.pool);
            let Some(row) = row else { continue };
            self.counters.generated_tokens += 1;
            if let Some(outcome) = seq.sample(row, &self.tokenizer) {
                let seq = self.running.remove(i);
                self.end(seq, outcome);
            }
        }
    }

    /// Who the planned step is for: its requests' ids and their cancellation.
    fn step_context(&self, plan: &[Planned]) -> StepContext {
        let mut ids = Vec::with_capacity(plan.len());
        let mut tokens = Vec::with_capacity(plan.len());
        let mut deadline: Option<Instant> = None;
        for p in plan {
            if let Some(seq) = self.running.iter().find(|s| s.serial == p.serial) {
                ids.push(seq.trace_id.clone());
                tokens.push(seq.entry.cancel_token().clone());
                if let Some(d) = seq.deadline {
                    deadline = Some(deadline.map_or(d, |e| e.min(d)));
                }
            }
        }
        StepContext {
            request_ids: ids,
            cancel: Some(Arc::new(AnyCancelled::new(tokens).with_deadline(deadline))),
        }
    }

    /// Ends `seq`: frees its blocks, records its figures and sends its last event.
    fn end(&mut self, mut seq: Sequence, outcome: Outcome) {
        seq.release(&mut self.pool);
        tracing::debug!(
            request_id = %seq.trace_id,
            reused_tokens = seq.reused_tokens,
            model_tokens = seq.model_tokens,
            preemptions = seq.preemptions,
            "request cache use"
        );
        let prompt_tokens = seq.prompt_len() as u64;
        let completion_tokens = seq.output().len() as u64;
        let decode_time = seq
            .first_token_at
            .map_or(Duration::ZERO, |t| t.elapsed())
            .as_secs_f64();
        self.stats.record(
            &seq.trace_id,
            RequestStats {
                prompt_tokens,
                completion_tokens,
                model_tokens: seq.model_tokens as u64,
                expert_bytes: seq.expert_bytes,
                decode_tokens_per_s: completion_tokens.saturating_sub(1) as f64
                    / decode_time.max(1e-9),
            },
        );
        let last = match outcome {
            Outcome::Finished(reason) => Ok(Event::Finished {
                reason,
                prompt_tokens: prompt_tokens as u32,
                completion_tokens: completion_tokens as u32,
            }),
            Outcome::Failed(status) => {
                if matches!(
                    status.code(),
                    tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
                ) {
                    self.counters.cancelled += 1;
                }
                if status.code() == tonic::Code::Cancelled {
                    tracing::info!(request_id = %seq.trace_id, "request cancelled");
                } else {
                    tracing::warn!(request_id = %seq.trace_id, error = %status.message(), "request failed");
                }
                Err(status)
            }
        };
        let (entry, events) = seq.into_parts();
        // The id is free again before the client hears the end.
        drop(entry);
        // The reader may be gone; nothing is left to tell it.
        let _ = events.try_send(last);
    }

    fn publish(&mut self) {
        self.counters.running = self.running.len();
        self.counters.waiting = self.waiting.len();
        self.counters.pool = self.pool.counters();
        self.stats.set_engine(self.counters);
    }

    /// The prompt's input embeddings, image runs written over their tokens.
    fn embeddings(&self, request: &Validated) -> Result<Tensor> {
        let model = &self.model;
        if request.image_runs.is_empty() {
            return model.embed(&request.input_ids).map_err(Error::from_model);
        }
        let mut pieces = Vec::with_capacity(request.image_runs.len());
        for (i, run) in request.image_runs.iter().enumerate() {
            let t = tensor::decode(&run.embeddings, model.device())
                .map_err(|e| Error::InvalidArgument(format!("image_runs[{i}].embeddings: {e}")))?;
            pieces.push(
                t.to_dtype(model.dtype())
                    .map_err(|e| Error::Model(e.into()))?,
            );
        }
        let images = Tensor::cat(&pieces, 0).map_err(|e| Error::Model(e.into()))?; // (image tokens, hidden)
        let runs: Vec<_> = request.image_runs.iter().map(|r| r.range.clone()).collect();
        model
            .embed_with_images(&request.input_ids, &runs, Some(&images))
            .map_err(Error::from_model)
    }
}

/// What each prompt position is for prefix hashing: image tokens by their image's
/// content hash (given, or the SHA-256 of the embeddings) and index in the run.
fn token_keys(request: &Validated) -> Vec<TokenKey> {
    let mut keys: Vec<TokenKey> = request
        .input_ids
        .iter()
        .map(|&id| TokenKey::Text(id))
        .collect();
    for run in &request.image_runs {
        let image = run.content_hash.unwrap_or_else(|| {
            let digest = Sha256::digest(&run.embeddings.data);
            digest.into()
        });
        for (index, pos) in run.range.clone().enumerate() {
            keys[pos] = TokenKey::Image {
                image,
                index: index as u32,
            };
        }
    }
    keys
}
