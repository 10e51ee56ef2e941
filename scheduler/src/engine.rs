//! The engine: the language model on its own thread, fed by a bounded queue of
//! jobs (STYLE.md: the model never runs on the gRPC runtime). One request runs
//! at a time; each streams a `Tokens` event per generated token into its own
//! bounded channel, then one `Finished` (or an error status).
//!
//! A job stops within one model step when its cancellation token fires (the
//! `Cancel` rpc, the client dropping the stream, shutdown) or when its event
//! channel is closed; a job cancelled while queued is skipped.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};

use candle_core::Tensor;
use tessera_model::chat::ChatTokenizer;
use tessera_model::generate::{FinishReason, Flow, generate_streaming};
use tessera_model::language::LanguageModel;
use tessera_proto::internal::v1::token_event::Event;
use tessera_proto::internal::v1::{Finished, StopReason, TokenEvent, Tokens};
use tessera_proto::tensor;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::active::ActiveEntry;
use crate::error::{Error, Result};
use crate::remote_experts::RemoteExperts;
use crate::request::Validated;
use crate::request_experts::RequestExperts;
use crate::stats::{RequestStats, Stats};

/// What a request's stream carries.
pub type EventResult = std::result::Result<TokenEvent, Status>;

/// One request for the engine.
#[derive(Debug)]
pub struct Job {
    /// Its place among the active requests (removed when the job is dropped).
    pub entry: ActiveEntry,
    /// The id logged and sent to expert-workers.
    pub trace_id: String,
    pub request: Validated,
    /// Where its events go; bounded, so a slow reader slows the engine.
    pub events: mpsc::Sender<EventResult>,
}

/// A handle to the engine thread: submits jobs to its bounded queue. The thread
/// ends once every handle is dropped and the queue is empty.
#[derive(Debug, Clone)]
pub struct Engine {
    jobs: SyncSender<Job>,
    capacity: usize,
}

/// What the engine thread owns.
struct Worker {
    model: LanguageModel,
    tokenizer: ChatTokenizer,
    experts: Arc<RemoteExperts>,
    stats: Arc<Stats>,
}

impl Engine {
    /// Starts the engine thread with a queue of `capacity` waiting jobs.
    pub fn start(
        model: LanguageModel,
        tokenizer: ChatTokenizer,
        experts: Arc<RemoteExperts>,
        stats: Arc<Stats>,
        capacity: usize,
    ) -> Result<Self> {
        let (jobs, queue) = sync_channel(capacity);
        let worker = Worker {
            model,
            tokenizer,
            experts,
            stats,
        };
        std::thread::Builder::new()
            .name("tessera-engine".into())
            .spawn(move || worker.run(queue))
            .map_err(Error::Thread)?;
        Ok(Self { jobs, capacity })
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

impl Worker {
    fn run(self, queue: Receiver<Job>) {
        for job in queue {
            let Job {
                entry,
                trace_id,
                request,
                events,
            } = job;
            let cancel = entry.cancel_token().clone();
            let span = tracing::info_span!("request", request_id = %trace_id);
            let _enter = span.enter();
            if cancel.is_cancelled() || events.is_closed() {
                tracing::debug!("cancelled while queued");
                continue;
            }
            let last = match self.generate(&trace_id, &cancel, &request, &events) {
                Ok(finished) => Ok(TokenEvent {
                    event: Some(Event::Finished(finished)),
                }),
                Err(Error::Cancelled) => {
                    tracing::info!("request cancelled");
                    Err(Status::from(Error::Cancelled))
                }
                Err(e) => {
                    tracing::warn!(error = %e, "request failed");
                    Err(Status::from(e))
                }
            };
            // The id is free again before the client hears the end.
            drop(entry);
            // The reader may be gone; nothing is left to tell it.
            let _ = events.blocking_send(last);
        }
        tracing::debug!("engine stopped");
    }

    /// Runs one request, streaming its tokens; returns its `Finished` event.
    fn generate(
        &self,
        trace_id: &str,
        cancel: &CancellationToken,
        request: &Validated,
        events: &mpsc::Sender<EventResult>,
    ) -> Result<Finished> {
        let embeds = self.embeddings(request)?;
        let experts = RequestExperts::new(&self.experts, trace_id, cancel);
        let bytes_before = self.expert_bytes();
        let mut streamed = 0u64;
        let mut on_token = |token: u32| {
            if cancel.is_cancelled() {
                return Flow::Stop;
            }
            let event = TokenEvent {
                event: Some(Event::Tokens(Tokens {
                    token_ids: vec![token],
                })),
            };
            if events.blocking_send(Ok(event)).is_err() {
                // The client went away.
                cancel.cancel();
                return Flow::Stop;
            }
            streamed += 1;
            Flow::Continue
        };
        let generation = generate_streaming(
            &self.model,
            &experts,
            Some(&self.tokenizer),
            &request.input_ids,
            &embeds,
            &request.params,
            &mut on_token,
        );
        let prompt_tokens = request.input_ids.len() as u64;
        let mut figures = RequestStats {
            prompt_tokens,
            completion_tokens: streamed,
            // Ended early: prefill (if a token came out) and the decode steps before.
            model_tokens: if streamed == 0 {
                0
            } else {
                prompt_tokens + streamed - 1
            },
            expert_bytes: self.expert_bytes() - bytes_before,
            decode_tokens_per_s: 0.0,
        };
        let generation = match generation {
            Ok(generation) => generation,
            Err(e) => {
                self.stats.record(trace_id, figures);
                if cancel.is_cancelled() {
                    return Err(Error::Cancelled);
                }
                return Err(experts
                    .take_failure()
                    .unwrap_or_else(|| Error::from_model(e)));
            }
        };
        let completion_tokens = generation.output_ids.len() as u64;
        figures.completion_tokens = completion_tokens;
        figures.model_tokens = prompt_tokens + generation.timings.decode_steps as u64;
        figures.decode_tokens_per_s = generation.timings.decode_tokens_per_s();
        self.stats.record(trace_id, figures);
        let reason = match generation.finish_reason {
            FinishReason::Eos => StopReason::Eos,
            FinishReason::Length => StopReason::Length,
            FinishReason::Stop => StopReason::Stop,
            FinishReason::Cancelled => return Err(Error::Cancelled),
        };
        Ok(Finished {
            reason: reason as i32,
            prompt_tokens: prompt_tokens as u32,
            completion_tokens: completion_tokens as u32,
        })
    }

    fn expert_bytes(&self) -> u64 {
        self.experts.bytes_sent() + self.experts.bytes_received()
    }

    /// The prompt's input embeddings, image runs written over their tokens.
    fn embeddings(&self, request: &Validated) -> Result<Tensor> {
        let model = &self.model;
        if request.image_runs.is_empty() {
            return model.embed(&request.input_ids).map_err(Error::from_model);
        }
        let mut pieces = Vec::with_capacity(request.image_runs.len());
        for (i, (_, wire)) in request.image_runs.iter().enumerate() {
            let t = tensor::decode(wire, model.device())
                .map_err(|e| Error::InvalidArgument(format!("image_runs[{i}].embeddings: {e}")))?;
            pieces.push(
                t.to_dtype(model.dtype())
                    .map_err(|e| Error::Model(e.into()))?,
            );
        }
        let images = Tensor::cat(&pieces, 0).map_err(|e| Error::Model(e.into()))?; // (image tokens, hidden)
        let runs: Vec<_> = request.image_runs.iter().map(|(r, _)| r.clone()).collect();
        model
            .embed_with_images(&request.input_ids, &runs, Some(&images))
            .map_err(Error::from_model)
    }
}
