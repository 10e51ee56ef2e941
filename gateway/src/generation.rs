//! One request on a scheduler: submit it, read its token events, and turn them into
//! the public deltas and the closing usage, finish reason, groundings and image
//! tilings. Dropping a [`Running`] before its `finished` event cancels the request
//! on the scheduler (the stream is reset and `Scheduler.Cancel` is sent).
//!
//! When the scheduler fails mid-stream (it is gone, or its stream ends without
//! `finished`), [`Running`] resubmits the request to another scheduler with the
//! tokens streamed so far appended to the prompt as resumed output
//! ([`crate::failover::resubmission`]) and reads on from there: the client sees
//! one stream. Greedy answers are the same token for token; a sampled one goes on
//! with fresh draws of the new scheduler's sampler.

use std::sync::Arc;
use std::time::Instant;

use tessera_model::grounding::parse_groundings;
use tessera_model::text::StopStrings;
use tessera_proto::internal::v1::scheduler_client::SchedulerClient;
use tessera_proto::internal::v1::{StopReason, SubmitRequest, TokenEvent, token_event};
use tessera_proto::v1::{
    self, FinishReason, GenerateDelta, GenerateFinished, GenerateResponse, GenerateStreamResponse,
    Grounding, Usage, generate_stream_response,
};
use tessera_runtime::{Member, Role, telemetry};
use tokio::sync::mpsc;
use tonic::Streaming;
use tonic::transport::Channel;

use crate::detokenize::{Decode, Ending, IncrementalText};
use crate::error::{Error, Result};
use crate::failover::{
    Failed, MAX_FAILOVERS, call_with_retries, member_gone, resubmission, status_text,
};
use crate::model_files::ModelFiles;
use crate::prepare::Prepared;
use crate::upstream::Upstream;

/// Where a stream's messages go: the response stream of one `GenerateStream` call.
pub type StreamSender = mpsc::Sender<Result<GenerateStreamResponse, tonic::Status>>;

/// Sends `Scheduler.Cancel` when dropped while armed.
struct CancelGuard {
    upstream: Arc<Upstream>,
    scheduler: Member,
    request_id: String,
    armed: bool,
}

impl CancelGuard {
    /// The request ended on the scheduler (finished or failed): nothing to cancel.
    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if self.armed {
            tracing::info!(scheduler = %self.scheduler.id, "request abandoned; cancelling it");
            self.upstream.cancel(&self.scheduler, &self.request_id);
        }
    }
}

/// A scheduler event the gateway acts on.
enum Event {
    /// Token ids, and their log probabilities when the request asked.
    Tokens(Vec<u32>, Vec<v1::TokenLogprob>),
    Finished(Ending, FinishReason),
}

/// A request running on a scheduler, moved to another one when that one fails.
pub struct Running {
    upstream: Arc<Upstream>,
    files: Arc<ModelFiles>,
    /// The request as first submitted.
    original: SubmitRequest,
    /// Every token id the schedulers streamed so far, in order (the answer's text
    /// may stop short of them, at a stop string).
    streamed: Vec<u32>,
    /// The schedulers that failed the request.
    failed: Failed,
    /// Times the request moved to another scheduler mid-stream.
    failovers: usize,
    stream: Streaming<TokenEvent>,
    guard: CancelGuard,
}

impl Running {
    /// Submits `prepared` to the next scheduler, or to another one when that one is
    /// gone (`crate::failover::call_with_retries`); `files` are the served model's.
    pub async fn submit(
        upstream: &Arc<Upstream>,
        files: &Arc<ModelFiles>,
        prepared: &Prepared,
    ) -> Result<Self> {
        let original = prepared.submit.clone();
        let mut failed = Failed::new(Role::Scheduler);
        let (stream, guard) = submit_to_any(upstream, &original, &mut failed).await?;
        Ok(Self {
            upstream: Arc::clone(upstream),
            files: Arc::clone(files),
            original,
            streamed: Vec::new(),
            failed,
            failovers: 0,
            stream,
            guard,
        })
    }

    /// The next event; the stream ends with exactly one `finished`. When the
    /// scheduler fails (a status saying it is gone, or the end of its stream without
    /// `finished`), the request goes on on another scheduler and so do its events.
    async fn next(&mut self) -> Result<Event> {
        loop {
            let why = match self.stream.message().await {
                Ok(Some(TokenEvent { event: Some(event) })) => return self.event(event),
                Ok(Some(TokenEvent { event: None })) => {
                    self.guard.disarm();
                    return Err(Error::protocol(
                        Role::Scheduler,
                        "sent an empty token event",
                    ));
                }
                Ok(None) => "the token stream ended without a finished event".to_owned(),
                Err(status) if member_gone(&status) => status_text(Role::Scheduler, &status),
                Err(status) => {
                    self.guard.disarm();
                    return Err(Error::upstream(Role::Scheduler, status));
                }
            };
            self.guard.disarm();
            if let Some(finished) = self.fail_over(why).await? {
                return Ok(finished);
            }
        }
    }

    /// A scheduler's event as the gateway acts on it.
    fn event(&mut self, event: token_event::Event) -> Result<Event> {
        match event {
            token_event::Event::Tokens(t) => {
                let logprobs = t
                    .token_ids
                    .iter()
                    .zip(&t.logprobs)
                    .map(|(&id, l)| v1::TokenLogprob {
                        token_id: id,
                        logprob: l.logprob,
                        top_logprobs: l
                            .top_ids
                            .iter()
                            .zip(&l.top_logprobs)
                            .map(|(&token_id, &logprob)| v1::TopLogprob { token_id, logprob })
                            .collect(),
                    })
                    .collect();
                self.streamed.extend_from_slice(&t.token_ids);
                Ok(Event::Tokens(t.token_ids, logprobs))
            }
            token_event::Event::Finished(f) => {
                self.guard.disarm();
                let (ending, reason) = match StopReason::try_from(f.reason) {
                    Ok(StopReason::Eos) => (Ending::Eos, FinishReason::Eos),
                    Ok(StopReason::Length) => (Ending::Length, FinishReason::Length),
                    Ok(StopReason::Stop) => (Ending::Stop, FinishReason::Stop),
                    Ok(StopReason::Unspecified) | Err(_) => {
                        return Err(Error::protocol(
                            Role::Scheduler,
                            format!("finished with the unknown reason {}", f.reason),
                        ));
                    }
                };
                Ok(Event::Finished(ending, reason))
            }
        }
    }

    /// After the scheduler failed for `why`: the `finished` event when the output
    /// streamed so far is already complete, else the request resubmitted to another
    /// scheduler (`None`: read on). UNAVAILABLE after [`MAX_FAILOVERS`] failovers or
    /// when no other scheduler takes the request.
    async fn fail_over(&mut self, why: String) -> Result<Option<Event>> {
        let from = self.guard.scheduler.id.clone();
        self.failed.record(&self.guard.scheduler, why);
        let resumed = match self.stopped()? {
            Some(ended) => Err(ended),
            None => resubmission(&self.original, &self.streamed)
                .ok_or((Ending::Length, FinishReason::Length)),
        };
        let request = match resumed {
            Ok(request) => request,
            Err((ending, reason)) => {
                tracing::warn!(
                    request_id = %self.original.request_id,
                    scheduler = %from,
                    streamed = self.streamed.len(),
                    "the scheduler failed after the answer's last token; the answer is complete"
                );
                return Ok(Some(Event::Finished(ending, reason)));
            }
        };
        if self.failovers == MAX_FAILOVERS {
            return Err(self.failed.unserved());
        }
        self.failovers += 1;
        let (stream, guard) = submit_to_any(&self.upstream, &request, &mut self.failed).await?;
        tracing::warn!(
            request_id = %request.request_id,
            failed = %from,
            scheduler = %guard.scheduler.id,
            streamed = self.streamed.len(),
            failover = self.failovers,
            "the scheduler failed mid-stream; the request goes on on another scheduler"
        );
        self.stream = stream;
        self.guard = guard;
        Ok(None)
    }

    /// Whether the output streamed so far already ends with the end-of-sequence token
    /// or contains a stop string (the scheduler failed before sending `finished`),
    /// checked in the scheduler's order; a full `max_tokens` is
    /// [`resubmission`]'s to see.
    fn stopped(&self) -> Result<Option<(Ending, FinishReason)>> {
        let stopping = self.original.stopping.clone().unwrap_or_default();
        let eos = self.files.tokenizer.special().eos;
        if !stopping.ignore_eos && self.streamed.last() == Some(&eos) {
            return Ok(Some((Ending::Eos, FinishReason::Eos)));
        }
        let stops = StopStrings::new(&stopping.stop);
        if !stops.is_empty() {
            let text = Decode::decode(&self.files.tokenizer, &self.streamed)?;
            if stops.earliest(&text).is_some() {
                return Ok(Some((Ending::Stop, FinishReason::Stop)));
            }
        }
        Ok(None)
    }
}

/// Submits `request` to a scheduler not in `failed`, to another one while the one
/// tried is gone; returns its stream and the guard that cancels it there.
async fn submit_to_any(
    upstream: &Arc<Upstream>,
    request: &SubmitRequest,
    failed: &mut Failed,
) -> Result<(Streaming<TokenEvent>, CancelGuard)> {
    let pick = |exclude: &[String]| {
        let (scheduler, client) = upstream.scheduler_except(exclude)?;
        Ok((scheduler.clone(), (scheduler, client)))
    };
    let submit = |(scheduler, mut client): (Member, SchedulerClient<Channel>)| {
        tracing::debug!(scheduler = %scheduler.id, "submitting");
        let mut guard = CancelGuard {
            upstream: Arc::clone(upstream),
            scheduler,
            request_id: request.request_id.clone(),
            armed: true,
        };
        let call = telemetry::request_with_id(request.clone(), &request.request_id);
        async move {
            match client.submit(call).await {
                Ok(response) => Ok((response.into_inner(), guard)),
                Err(status) => {
                    guard.disarm();
                    Err(status)
                }
            }
        }
    };
    let (_, answer) = call_with_retries(failed, pick, submit).await?;
    Ok(answer)
}

/// When an answer's tokens arrived from the scheduler (for the gateway's metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenTimes {
    /// The first token's arrival; `None` before any.
    pub first: Option<Instant>,
    /// The last token's arrival so far.
    pub last: Option<Instant>,
}

impl TokenTimes {
    fn arrived(&mut self, now: Instant) {
        self.first.get_or_insert(now);
        self.last = Some(now);
    }
}

/// Builds the public answer of one request from its events.
pub struct Answer {
    files: Arc<ModelFiles>,
    prepared: Prepared,
    text: IncrementalText,
    times: TokenTimes,
    /// Every token's log probability so far, when the request asked.
    logprobs: Vec<v1::TokenLogprob>,
}

impl Answer {
    /// The answer of `prepared`, decoded with `files`' tokenizer.
    pub fn new(files: Arc<ModelFiles>, prepared: Prepared) -> Self {
        let text = IncrementalText::new(
            prepared.stop().to_vec(),
            files.tokenizer.special().eos,
            prepared.ignore_eos(),
        );
        Self {
            files,
            prepared,
            text,
            times: TokenTimes::default(),
            logprobs: Vec::new(),
        }
    }

    /// When its tokens arrived so far.
    pub fn token_times(&self) -> TokenTimes {
        self.times
    }

    /// The request's id.
    pub fn request_id(&self) -> &str {
        &self.prepared.request_id
    }

    /// Reads `running` to its end and returns the whole answer.
    pub async fn collect(&mut self, running: &mut Running) -> Result<GenerateResponse> {
        let finished = self.drive(running, None).await?;
        Ok(self.response(finished))
    }

    /// Reads `running` to its end, sending each token batch to `sink` as a delta and the
    /// remaining text as a last delta; returns the closing message for the caller to
    /// send. [`Error::ClientGone`] when the client stopped listening.
    pub async fn stream(
        &mut self,
        running: &mut Running,
        sink: &StreamSender,
    ) -> Result<GenerateFinished> {
        self.drive(running, Some(sink)).await
    }

    async fn drive(
        &mut self,
        running: &mut Running,
        sink: Option<&StreamSender>,
    ) -> Result<GenerateFinished> {
        loop {
            match running.next().await? {
                Event::Tokens(ids, logprobs) => {
                    if !ids.is_empty() {
                        self.times.arrived(Instant::now());
                    }
                    let Some(sink) = sink else {
                        self.text.push_ids(&ids);
                        self.logprobs.extend(logprobs);
                        continue;
                    };
                    let text = self.text.push(&self.files.tokenizer, &ids)?;
                    let delta = GenerateDelta {
                        text,
                        token_ids: ids,
                        logprobs,
                    };
                    self.send(sink, delta).await?;
                }
                Event::Finished(ending, reason) => {
                    let rest = self.text.finish(&self.files.tokenizer, ending)?;
                    if let Some(sink) = sink
                        && !rest.is_empty()
                    {
                        let delta = GenerateDelta {
                            text: rest,
                            ..Default::default()
                        };
                        self.send(sink, delta).await?;
                    }
                    return Ok(self.finished(reason));
                }
            }
        }
    }

    /// Sends a delta to the client.
    async fn send(&self, sink: &StreamSender, delta: GenerateDelta) -> Result<()> {
        let message = GenerateStreamResponse {
            request_id: self.prepared.request_id.clone(),
            event: Some(generate_stream_response::Event::Delta(delta)),
        };
        sink.send(Ok(message)).await.map_err(|_| Error::ClientGone)
    }

    /// The closing message of a stream.
    pub fn closing(&self, finished: GenerateFinished) -> GenerateStreamResponse {
        GenerateStreamResponse {
            request_id: self.prepared.request_id.clone(),
            event: Some(generate_stream_response::Event::Finished(finished)),
        }
    }

    /// The whole answer, given its closing message.
    fn response(&self, finished: GenerateFinished) -> GenerateResponse {
        GenerateResponse {
            request_id: self.prepared.request_id.clone(),
            text: self.text.emitted().to_owned(),
            token_ids: self.text.ids().to_vec(),
            finish_reason: finished.finish_reason,
            usage: finished.usage,
            groundings: finished.groundings,
            images: finished.images,
            // The answer's tokens may stop short of what the scheduler sent (a stop
            // string); their log probabilities stop with them.
            logprobs: self
                .logprobs
                .iter()
                .take(self.text.ids().len())
                .cloned()
                .collect(),
        }
    }

    fn finished(&self, reason: FinishReason) -> GenerateFinished {
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        GenerateFinished {
            finish_reason: reason.into(),
            usage: Some(Usage {
                prompt_tokens: count(self.prepared.prompt_tokens()),
                image_tokens: count(self.prepared.image_tokens),
                completion_tokens: count(self.text.ids().len()),
            }),
            groundings: self.groundings(),
            images: self.prepared.images.iter().map(|i| i.to_public()).collect(),
        }
    }

    /// The answer's boxes in pixels of the request's last image; none without images.
    fn groundings(&self) -> Vec<Grounding> {
        let Some(last) = self.prepared.images.last() else {
            return Vec::new();
        };
        let image_index = (self.prepared.images.len() - 1) as u32;
        parse_groundings(self.text.emitted())
            .into_iter()
            .map(|g| Grounding {
                label: g.label,
                boxes: g
                    .boxes
                    .iter()
                    .map(|b| {
                        let p = b.to_pixels(last.width, last.height);
                        v1::Box {
                            x1: p.x1,
                            y1: p.y1,
                            x2: p.x2,
                            y2: p.y2,
                        }
                    })
                    .collect(),
                image_index,
            })
            .collect()
    }
}
