//! Routed experts on expert-workers: one `Forward` per worker per MoE layer, all
//! workers concurrently, partial sums scattered back into one accumulator.
//!
//! Where experts live comes from a [`RoutingTable`] (a placement whose workers were
//! all seen ready, with a client per worker) that the router swaps while requests
//! run. A layer whose `Forward` fails for a reason a newer table can fix (a worker
//! gone, a stale placement, no live owner) waits for a newer table and runs again;
//! expert outputs are pure, so a retry never changes the answer. After the
//! configured wait it fails with [`Error::ExpertsUnavailable`].
//!
//! Every layer counts its tokens per routed expert, and every call its bytes and
//! latency per worker, in the process's metrics
//! ([`ExpertDispatch`](tessera_runtime::metrics::ExpertDispatch)).
//!
//! The model calls [`ExpertBackend::forward`] synchronously from its own thread;
//! the calls run on a tokio runtime through its [`Handle`]. Never call it from
//! inside that runtime (it blocks on the handle).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};
use prost::Message;
use tessera_model::experts::{ExpertBackend, ExpertRoute, PendingExperts};
use tessera_proto::internal::v1::expert_client::ExpertClient;
use tessera_proto::internal::v1::{ForwardRequest, ForwardResponse};
use tessera_proto::tensor;
use tessera_runtime::metrics::ExpertDispatch;
use tessera_runtime::placement::Placement;
use tessera_runtime::telemetry::request_with_id;
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::dispatch::{Failure, WorkerBatch, classify, decode_sums, plan};
use crate::error::Error;

/// Model-side results (what [`ExpertBackend`] returns).
type ModelResult<T> = tessera_model::Result<T>;

/// Where to send each routed expert: a placement whose workers all reported it
/// loaded, and a client per worker of it (limits set to `MAX_MESSAGE_BYTES`).
#[derive(Debug, Clone)]
pub struct RoutingTable {
    pub placement: Placement,
    pub clients: BTreeMap<String, ExpertClient<Channel>>,
}

/// The newest routing table, swapped by the router; `None` before the first.
pub type Tables = watch::Receiver<Option<Arc<RoutingTable>>>;

/// How waiting for a newer table ended.
enum Waited {
    Newer,
    NoNewer,
    Cancelled,
}

/// Routed experts computed by expert-workers over gRPC, routed by the newest
/// [`RoutingTable`].
pub struct RemoteExperts {
    tables: Tables,
    handle: Handle,
    fingerprint: String,
    wait: Duration,
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
    last_failure: std::sync::Mutex<Option<Error>>,
}

impl std::fmt::Debug for RemoteExperts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let version = self.tables.borrow().as_ref().map(|t| t.placement.version);
        f.debug_struct("RemoteExperts")
            .field("placement_version", &version)
            .field("wait", &self.wait)
            .field("bytes_sent", &self.bytes_sent())
            .field("bytes_received", &self.bytes_received())
            .finish_non_exhaustive()
    }
}

impl RemoteExperts {
    /// A backend with one fixed table: each expert's routes go to its first owner
    /// in `placement` that has a client in `clients`; a failure is final. Requests
    /// carry `fingerprint` and run on `handle`.
    pub fn new(
        placement: Placement,
        clients: BTreeMap<String, ExpertClient<Channel>>,
        handle: Handle,
        fingerprint: impl Into<String>,
    ) -> Self {
        let table = RoutingTable { placement, clients };
        // The sender is dropped: no newer table will ever come.
        let (_, tables) = watch::channel(Some(Arc::new(table)));
        Self::following(tables, handle, fingerprint, Duration::ZERO)
    }

    /// A backend routing by the newest table of `tables`; a failed layer waits up
    /// to `wait` for a newer table before the request fails.
    pub fn following(
        tables: Tables,
        handle: Handle,
        fingerprint: impl Into<String>,
        wait: Duration,
    ) -> Self {
        Self {
            tables,
            handle,
            fingerprint: fingerprint.into(),
            wait,
            bytes_sent: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            last_failure: std::sync::Mutex::new(None),
        }
    }

    /// Encoded bytes of every `ForwardRequest` sent so far.
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent.load(Ordering::Relaxed)
    }

    /// Encoded bytes of every `ForwardResponse` received so far.
    pub fn bytes_received(&self) -> u64 {
        self.bytes_received.load(Ordering::Relaxed)
    }

    /// The routed experts of one layer for `xs` (rows, hidden), retried on newer
    /// tables until the wait runs out or `cancel` fires. `request_id` travels in
    /// the calls' metadata.
    pub fn forward_layer(
        &self,
        layer: usize,
        xs: &Tensor,
        routes: &[ExpertRoute],
        request_id: Option<&str>,
        cancel: Option<&CancellationToken>,
    ) -> Result<Tensor, Error> {
        count_routes(layer, routes);
        self.run_layer(layer, xs, routes, request_id, cancel)
    }

    /// [`forward_layer`](Self::forward_layer) without counting the routes.
    fn run_layer(
        &self,
        layer: usize,
        xs: &Tensor,
        routes: &[ExpertRoute],
        request_id: Option<&str>,
        cancel: Option<&CancellationToken>,
    ) -> Result<Tensor, Error> {
        if routes.is_empty() {
            return xs.zeros_like().map_err(|e| Error::Model(e.into()));
        }
        let deadline = tokio::time::Instant::now() + self.wait;
        let mut tables = self.tables.clone();
        loop {
            let table = tables.borrow_and_update().clone();
            let attempt = match &table {
                None => Err(Failure::Retry(format!(
                    "layer {layer}: no expert placement is ready (are any expert-workers running?)"
                ))),
                Some(t) => self.attempt(t, layer, xs, routes, request_id, cancel),
            };
            let reason = match attempt {
                Ok(sums) => return Ok(sums),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Retry(reason)) => reason,
            };
            let version = table.as_ref().map(|t| t.placement.version);
            tracing::debug!(layer, ?version, %reason, "expert layer failed; waiting for a newer routing table");
            let waited = self.handle.block_on(async {
                tokio::select! {
                    changed = tables.changed() => match changed {
                        Ok(()) => Waited::Newer,
                        Err(_) => Waited::NoNewer,
                    },
                    () = tokio::time::sleep_until(deadline) => Waited::NoNewer,
                    () = cancelled(cancel) => Waited::Cancelled,
                }
            });
            match waited {
                Waited::Newer => {}
                Waited::NoNewer => return Err(Error::ExpertsUnavailable(reason)),
                Waited::Cancelled => return Err(Error::Cancelled),
            }
        }
    }

    /// One try at a layer with `table`.
    fn attempt(
        &self,
        table: &RoutingTable,
        layer: usize,
        xs: &Tensor,
        routes: &[ExpertRoute],
        request_id: Option<&str>,
        cancel: Option<&CancellationToken>,
    ) -> Result<Tensor, Failure> {
        let calls = self.dispatch(table, layer, xs, routes, request_id)?;
        self.collect(calls, layer, xs, cancel)
    }

    /// Sends one layer's `Forward` calls (one per worker) with `table`; they run on
    /// the runtime while the caller goes on.
    fn dispatch(
        &self,
        table: &RoutingTable,
        layer: usize,
        xs: &Tensor,
        routes: &[ExpertRoute],
        request_id: Option<&str>,
    ) -> Result<InFlight, Failure> {
        let batches = plan(
            &table.placement,
            |w| table.clients.contains_key(w),
            layer,
            routes,
        )
        .map_err(|e| Failure::Retry(e.to_string()))?;
        let metrics = ExpertDispatch::get();
        let mut calls = Vec::with_capacity(batches.len());
        for (worker, batch) in batches {
            let req = self.request(layer, xs, &batch).map_err(Failure::Fatal)?;
            let bytes = req.encoded_len();
            self.bytes_sent.fetch_add(bytes as u64, Ordering::Relaxed);
            metrics.sent(worker, bytes);
            let req = match request_id {
                Some(id) => request_with_id(req, id),
                None => tonic::Request::new(req),
            };
            let mut client = table.clients[worker].clone();
            let name = worker.to_string();
            let call = self.handle.spawn(async move {
                let sent = Instant::now();
                let answer = client.forward(req).await.map(|r| r.into_inner());
                match &answer {
                    Ok(response) => {
                        let seconds = sent.elapsed().as_secs_f64();
                        metrics.received(&name, response.encoded_len(), seconds);
                    }
                    Err(_) => metrics.failed(&name),
                }
                answer
            });
            calls.push((worker.to_string(), batch, call));
        }
        Ok(InFlight { calls })
    }

    /// Waits for a layer's calls and adds up the workers' partial sums.
    fn collect(
        &self,
        in_flight: InFlight,
        layer: usize,
        xs: &Tensor,
        cancel: Option<&CancellationToken>,
    ) -> Result<Tensor, Failure> {
        let fatal = |e: candle_core::Error| Failure::Fatal(Error::Model(e.into()));
        let (n_rows, hidden) = xs.dims2().map_err(fatal)?;
        let (meta, calls): (Vec<_>, Vec<_>) = in_flight
            .calls
            .into_iter()
            .map(|(worker, batch, call)| ((worker, batch), call))
            .unzip();
        let aborts: Vec<_> = calls.iter().map(|c| c.abort_handle()).collect();
        let responses = self.handle.block_on(async {
            let all = async {
                let mut out = Vec::with_capacity(calls.len());
                for call in calls {
                    out.push(call.await);
                }
                out
            };
            tokio::select! {
                out = all => Some(out),
                () = cancelled(cancel) => None,
            }
        });
        let Some(responses) = responses else {
            aborts.iter().for_each(|a| a.abort());
            return Err(Failure::Fatal(Error::Cancelled));
        };

        let mut acc = Tensor::zeros((n_rows, hidden), DType::F32, xs.device()).map_err(fatal)?;
        for ((worker, batch), response) in meta.iter().zip(responses) {
            let response = match response {
                Ok(Ok(response)) => response,
                Ok(Err(status)) => return Err(classify(layer, worker, status)),
                Err(e) => {
                    return Err(Failure::Retry(format!(
                        "layer {layer}: call to expert-worker {worker} failed: {e}"
                    )));
                }
            };
            self.bytes_received
                .fetch_add(response.encoded_len() as u64, Ordering::Relaxed);
            let sums = decode_sums(worker, &response, batch.rows.len(), hidden, xs)
                .map_err(Failure::Fatal)?;
            let idx = Tensor::from_vec(batch.rows.clone(), batch.rows.len(), xs.device())
                .map_err(fatal)?;
            acc = acc.index_add(&idx, &sums, 0).map_err(fatal)?;
        }
        acc.to_dtype(xs.dtype()).map_err(fatal)
    }

    /// Keeps `e` for [`RemoteExperts::take_failure`]; returns the model's view of it.
    fn failed(&self, e: Error) -> tessera_model::Error {
        let message = tessera_model::Error::Experts(e.to_string());
        *self
            .last_failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(e);
        message
    }

    /// The scheduler error behind the last layer that failed through
    /// [`ExpertBackend`], if any (taken: a second call returns `None`).
    pub fn take_failure(&self) -> Option<Error> {
        self.last_failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    /// The request for one worker's share of `xs`.
    fn request(
        &self,
        layer: usize,
        xs: &Tensor,
        batch: &WorkerBatch,
    ) -> Result<ForwardRequest, Error> {
        let n = batch.rows.len();
        let model = |e: candle_core::Error| Error::Model(e.into());
        let idx = Tensor::from_vec(batch.rows.clone(), n, xs.device()).map_err(model)?;
        let rows = xs.index_select(&idx, 0).map_err(model)?; // (n, hidden)
        let rows = tensor::encode(&rows)
            .map_err(|e| Error::Model(tessera_model::Error::Experts(e.to_string())))?;
        Ok(ForwardRequest {
            model_fingerprint: self.fingerprint.clone(),
            layer: layer as u32,
            rows: Some(rows),
            route_rows: batch.routes.iter().map(|r| r.row).collect(),
            route_experts: batch.routes.iter().map(|r| r.expert).collect(),
            route_weights: batch.routes.iter().map(|r| r.weight).collect(),
        })
    }
}

/// Adds one layer's routes to the tokens routed per expert.
fn count_routes(layer: usize, routes: &[ExpertRoute]) {
    let mut per_expert: BTreeMap<u32, u64> = BTreeMap::new();
    for r in routes {
        *per_expert.entry(r.expert).or_default() += 1;
    }
    let metrics = ExpertDispatch::get();
    let layer = u32::try_from(layer).unwrap_or(u32::MAX);
    for (expert, tokens) in per_expert {
        metrics.routed(layer, expert, tokens);
    }
}

/// Resolves when `cancel` fires; never without one.
async fn cancelled(cancel: Option<&CancellationToken>) {
    match cancel {
        Some(token) => token.cancelled().await,
        None => std::future::pending().await,
    }
}

/// A `Forward` call running on the runtime.
type Call = tokio::task::JoinHandle<Result<ForwardResponse, tonic::Status>>;

/// One layer's `Forward` calls in flight: (worker, its batch, the call).
struct InFlight {
    calls: Vec<(String, WorkerBatch, Call)>,
}

impl ExpertBackend for RemoteExperts {
    fn forward(&self, layer: usize, xs: &Tensor, routes: &[ExpertRoute]) -> ModelResult<Tensor> {
        self.forward_layer(layer, xs, routes, None, None)
            .map_err(|e| self.failed(e))
    }

    /// Sends the calls with the newest table and returns at once; waiting collects
    /// them. A failure a newer table can fix falls back to [`RemoteExperts::forward_layer`]'s
    /// wait-and-retry, so the answer is the same as [`ExpertBackend::forward`]'s.
    fn start(&self, layer: usize, xs: &Tensor, routes: &[ExpertRoute]) -> PendingExperts<'_> {
        let table = self.tables.borrow().clone();
        let in_flight = match &table {
            Some(table) if !routes.is_empty() => self.dispatch(table, layer, xs, routes, None),
            _ => return PendingExperts::ready(self.forward(layer, xs, routes)),
        };
        count_routes(layer, routes);
        let (xs, routes) = (xs.clone(), routes.to_vec());
        PendingExperts::waiting(move || {
            let retry = match in_flight.and_then(|calls| self.collect(calls, layer, &xs, None)) {
                Ok(sums) => return Ok(sums),
                Err(Failure::Fatal(e)) => return Err(self.failed(e)),
                Err(Failure::Retry(reason)) => reason,
            };
            tracing::debug!(layer, %retry, "overlapped expert layer failed; retrying");
            self.run_layer(layer, &xs, &routes, None, None)
                .map_err(|e| self.failed(e))
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use candle_core::Device;
    use tessera_runtime::placement::even_split;

    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    }

    fn xs() -> Tensor {
        Tensor::ones((2, 4), DType::F32, &Device::Cpu).unwrap()
    }

    fn routes() -> Vec<ExpertRoute> {
        vec![ExpertRoute {
            row: 1,
            expert: 3,
            weight: 0.5,
        }]
    }

    /// A table whose placement gives expert 3 of layer 1 to a worker without a client.
    fn table_without_owner(version: u64) -> Arc<RoutingTable> {
        let placement = even_split(version, &[1], 4, &["a".to_string()]).unwrap();
        Arc::new(RoutingTable {
            placement,
            clients: BTreeMap::new(),
        })
    }

    #[test]
    fn without_a_ready_placement_a_layer_fails_after_the_wait() {
        let rt = runtime();
        let (_tx, tables) = watch::channel(None);
        let remote =
            RemoteExperts::following(tables, rt.handle().clone(), "", Duration::from_millis(200));
        let started = Instant::now();
        let err = remote
            .forward_layer(1, &xs(), &routes(), None, None)
            .unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert!(
            matches!(&err, Error::ExpertsUnavailable(m) if m.contains("layer 1: no expert placement")),
            "{err}"
        );
        // A layer without routes needs no worker.
        let zeros = remote.forward_layer(1, &xs(), &[], None, None).unwrap();
        assert_eq!(zeros.sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    }

    #[test]
    fn a_failed_layer_retries_on_each_newer_table_until_the_wait_runs_out() {
        let rt = runtime();
        let (tx, tables) = watch::channel(Some(table_without_owner(1)));
        let remote =
            RemoteExperts::following(tables, rt.handle().clone(), "", Duration::from_secs(1));
        // Newer tables keep arriving (none with an owner) while the layer waits.
        let publisher = std::thread::spawn(move || {
            for version in 2..=4 {
                std::thread::sleep(Duration::from_millis(100));
                tx.send_replace(Some(table_without_owner(version)));
            }
            tx
        });
        let err = remote
            .forward_layer(1, &xs(), &routes(), None, None)
            .unwrap_err();
        let tx = publisher.join().unwrap();
        assert_eq!(tx.borrow().as_ref().unwrap().placement.version, 4);
        assert!(
            matches!(&err, Error::ExpertsUnavailable(m) if m.contains("no live owner for layer 1 expert 3")),
            "{err}"
        );
    }

    #[test]
    fn cancelling_stops_a_waiting_layer_at_once() {
        let rt = runtime();
        let (_tx, tables) = watch::channel(None);
        let remote =
            RemoteExperts::following(tables, rt.handle().clone(), "", Duration::from_secs(60));
        let cancel = CancellationToken::new();
        let canceller = {
            let cancel = cancel.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(100));
                cancel.cancel();
            })
        };
        let started = Instant::now();
        let err = remote
            .forward_layer(1, &xs(), &routes(), Some("r"), Some(&cancel))
            .unwrap_err();
        canceller.join().unwrap();
        assert!(matches!(err, Error::Cancelled), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn a_fixed_table_fails_at_once() {
        let rt = runtime();
        let placement = table_without_owner(1).placement.clone();
        let remote = RemoteExperts::new(placement, BTreeMap::new(), rt.handle().clone(), "");
        let err = remote.forward(1, &xs(), &routes()).unwrap_err();
        assert!(
            err.to_string()
                .contains("no live owner for layer 1 expert 3"),
            "{err}"
        );
    }
}
