//! The `tessera.internal.v1.Scheduler` gRPC service: checks a request, queues it
//! for the [`Engine`] and streams its events back; `Cancel` cancels by id.
//! Nothing here touches tensors; the handlers never block.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use tessera_model::generate::FinishReason;
use tessera_proto::internal::v1::scheduler_server::Scheduler;
use tessera_proto::internal::v1::token_event::Event as WireEvent;
use tessera_proto::internal::v1::{
    CancelRequest, CancelResponse, Finished, StopReason, SubmitRequest, TokenEvent, Tokens,
};
use tessera_runtime::telemetry;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::DropGuard;
use tonic::{Request, Response, Status};

use crate::active::ActiveRequests;
use crate::engine::{Engine, Event, EventResult, Job, event_buffer};
use crate::error::Error;
use crate::request::{Limits, validate};
use crate::stats::{Stats, StatsSnapshot};

/// What the service needs once the model is loaded.
#[derive(Debug)]
pub struct Ready {
    pub engine: Engine,
    /// This scheduler's model fingerprint.
    pub fingerprint: String,
    pub limits: Limits,
}

#[derive(Debug)]
struct Shared {
    ready: OnceLock<Ready>,
    active: ActiveRequests,
    stats: Arc<Stats>,
}

/// The Scheduler service; cheap to clone (all clones share one state).
#[derive(Debug, Clone)]
pub struct SchedulerService {
    shared: Arc<Shared>,
}

impl SchedulerService {
    /// A service that answers UNAVAILABLE until [`SchedulerService::set_ready`].
    pub fn new(stats: Arc<Stats>) -> Self {
        Self {
            shared: Arc::new(Shared {
                ready: OnceLock::new(),
                active: ActiveRequests::default(),
                stats,
            }),
        }
    }

    /// Starts serving requests with the loaded model (once; later calls are ignored).
    pub fn set_ready(&self, ready: Ready) {
        if self.shared.ready.set(ready).is_err() {
            tracing::warn!("the scheduler was already ready");
        }
    }

    /// Totals over the requests run so far.
    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }

    /// The queued and running requests.
    pub fn active(&self) -> &ActiveRequests {
        &self.shared.active
    }

    fn submit_job(
        &self,
        metadata_id: Option<String>,
        timeout: Option<std::time::Duration>,
        body: SubmitRequest,
    ) -> Result<EventStream, Error> {
        let ready = self.shared.ready.get().ok_or(Error::Loading)?;
        if !body.model_fingerprint.is_empty() && body.model_fingerprint != ready.fingerprint {
            return Err(Error::FingerprintMismatch {
                requested: body.model_fingerprint,
                served: ready.fingerprint.clone(),
            });
        }
        let key = match (&body.request_id, &metadata_id) {
            (id, _) if !id.is_empty() => id.clone(),
            (_, Some(id)) => id.clone(),
            _ => telemetry::new_request_id(),
        };
        let trace_id = metadata_id.unwrap_or_else(|| key.clone());
        let span = tracing::info_span!("submit", request_id = %trace_id);
        let _enter = span.enter();
        let mut request = validate(body, &ready.limits)?;
        request.deadline = timeout.map(|t| std::time::Instant::now() + t);
        let entry = self.shared.active.insert(&key)?;
        let cancel = entry.cancel_token().clone();
        let (events, rx) = mpsc::channel(event_buffer(request.params.max_new_tokens));
        ready.engine.submit(Job {
            entry,
            trace_id,
            request,
            events,
        })?;
        tracing::debug!("queued");
        Ok(EventStream {
            events: ReceiverStream::new(rx),
            _cancel_on_drop: cancel.drop_guard(),
        })
    }
}

/// A request's events; dropping it (the client went away) cancels the request.
pub struct EventStream {
    events: ReceiverStream<EventResult>,
    _cancel_on_drop: DropGuard,
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStream").finish_non_exhaustive()
    }
}

impl Stream for EventStream {
    type Item = Result<TokenEvent, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.events)
            .poll_next(cx)
            .map(|event| event.map(|e| e.map(to_wire)))
    }
}

/// An engine event as the `Submit` stream carries it.
fn to_wire(event: Event) -> TokenEvent {
    let event = match event {
        Event::Token { id, logprob, .. } => WireEvent::Tokens(Tokens {
            token_ids: vec![id],
            logprobs: logprob
                .map(|l| tessera_proto::internal::v1::TokenLogprob {
                    logprob: l.logprob,
                    top_ids: l.top.iter().map(|t| t.0).collect(),
                    top_logprobs: l.top.iter().map(|t| t.1).collect(),
                })
                .into_iter()
                .collect(),
        }),
        Event::Finished {
            reason,
            prompt_tokens,
            completion_tokens,
        } => {
            let reason = match reason {
                FinishReason::Eos => StopReason::Eos,
                FinishReason::Length => StopReason::Length,
                FinishReason::Stop => StopReason::Stop,
            };
            WireEvent::Finished(Finished {
                reason: reason as i32,
                prompt_tokens,
                completion_tokens,
            })
        }
    };
    TokenEvent { event: Some(event) }
}

#[tonic::async_trait]
impl Scheduler for SchedulerService {
    type SubmitStream = EventStream;

    async fn submit(
        &self,
        request: Request<SubmitRequest>,
    ) -> Result<Response<Self::SubmitStream>, Status> {
        let metadata_id = telemetry::request_id(request.metadata());
        let timeout = grpc_timeout(request.metadata());
        let stream = self.submit_job(metadata_id, timeout, request.into_inner())?;
        Ok(Response::new(stream))
    }

    async fn cancel(
        &self,
        request: Request<CancelRequest>,
    ) -> Result<Response<CancelResponse>, Status> {
        let id = request.into_inner().request_id;
        let found = self.shared.active.cancel(&id);
        tracing::info!(request_id = %id, found, "cancel");
        Ok(Response::new(CancelResponse { found }))
    }
}

/// The client's deadline from the `grpc-timeout` header (e.g. `30S`, `500m`).
fn grpc_timeout(metadata: &tonic::metadata::MetadataMap) -> Option<std::time::Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    use std::time::Duration;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_in_every_unit() {
        let parse = |v: &str| {
            let mut m = tonic::metadata::MetadataMap::new();
            m.insert("grpc-timeout", v.parse().unwrap());
            grpc_timeout(&m)
        };
        use std::time::Duration;
        assert_eq!(parse("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse("30S"), Some(Duration::from_secs(30)));
        assert_eq!(parse("500m"), Some(Duration::from_millis(500)));
        assert_eq!(parse("7n"), Some(Duration::from_nanos(7)));
        assert_eq!(parse("5x"), None);
        assert_eq!(parse("S"), None);
        assert_eq!(grpc_timeout(&tonic::metadata::MetadataMap::new()), None);
    }
}
