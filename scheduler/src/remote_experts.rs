//! Routed experts on expert-workers: one `Forward` per worker per MoE layer, all
//! workers concurrently, partial sums scattered back into one accumulator.
//!
//! Where experts live comes from a [`RoutingTable`] (a placement whose workers were
//! all seen ready, with a client per worker) that the router swaps while requests
//! run. Every layer goes one way, overlapped or not:
//!
//! 1. **send** ([`RemoteExperts::send`]): plan the layer with the newest table
//!    (one batch per owning worker) and start the calls on the runtime; the
//!    caller goes on (the other micro-batch's attention runs meanwhile);
//! 2. **collect** ([`RemoteExperts::collect`]): wait for the answers and add up
//!    the partial sums. A failure a newer table can fix (a worker gone, a stale
//!    placement, no live owner) waits for a newer table and sends again; expert
//!    outputs are pure, so a retry never changes the answer. After the
//!    configured wait the layer fails with [`Error::ExpertsUnavailable`]; when the
//!    step is cancelled (a request of it was) it ends at once with
//!    [`Error::Cancelled`].
//!
//! The calls carry the request ids of the step in their metadata
//! (`x-request-id`, one entry per request), and failures reach the engine as the
//! scheduler's own [`Error`], boxed in `tessera_model::Error::Experts`.
//!
//! Every layer counts its tokens per routed expert, and every call its bytes and
//! latency per worker, in the process's metrics ([`ExpertDispatch`]).
//!
//! The model calls the backend synchronously from its own thread; the calls run
//! on a tokio runtime through its [`Handle`]. Never call it from inside that
//! runtime (it blocks on the handle).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};
use prost::Message;
use tessera_model::experts::{ExpertBackend, ExpertRoute, PendingExperts, StepContext};
use tessera_proto::internal::v1::expert_client::ExpertClient;
use tessera_proto::internal::v1::{ForwardRequest, ForwardResponse};
use tessera_proto::tensor;
use tessera_runtime::placement::Placement;
use tessera_runtime::telemetry::append_request_ids;
use tokio::runtime::Handle;
use tokio::sync::watch;
use tonic::transport::Channel;

use crate::dispatch::{Failure, WorkerBatch, classify, decode_sums, plan};
use crate::error::Error;
use crate::metrics::ExpertDispatch;

/// Model-side results (what [`ExpertBackend`] returns).
type ModelResult<T> = tessera_model::Result<T>;

/// Where to send each routed expert: a placement whose workers all reported it
/// loaded, and a client per worker of it (limits set to `MAX_MESSAGE_BYTES`).
#[derive(Debug, Clone)]
pub struct RoutingTable {
    pub placement: Placement,
    pub clients: BTreeMap<String, ExpertClient<Channel>>,
    /// Where each worker was reached when the table was made (empty for a fixed
    /// table): a worker registered elsewhere since makes the router build it again.
    pub addresses: BTreeMap<String, String>,
}

/// The newest routing table, swapped by the router; `None` before the first.
pub type Tables = watch::Receiver<Option<Arc<RoutingTable>>>;

/// How long a worker whose call failed is passed over while its experts have
/// another replica: long enough that the layers after a death do not each try it
/// again, short enough that a worker that only hiccuped is soon used again.
const SUSPECT_FOR: Duration = Duration::from_secs(3);

/// Workers whose last call failed, and until when they are passed over.
#[derive(Debug, Default)]
struct Suspects(std::sync::Mutex<BTreeMap<String, Instant>>);

impl Suspects {
    fn mark(&self, worker: &str) {
        let mut map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.insert(worker.to_string(), Instant::now() + SUSPECT_FOR);
    }

    /// The workers passed over now.
    fn now(&self) -> BTreeSet<String> {
        let mut map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        map.retain(|_, until| *until > now);
        map.keys().cloned().collect()
    }
}

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
    /// Layers sent, first tries and retries.
    attempts: AtomicU64,
    /// The dtype hidden states travel in (`None`: as computed).
    wire: Option<DType>,
    /// How long one `Forward` may take before it counts as failed and its rows are
    /// sent to another replica (`None`: no limit).
    call_timeout: Option<Duration>,
    /// Workers whose last call failed, until when they are passed over while
    /// another replica of their experts is there.
    suspects: Suspects,
}

impl std::fmt::Debug for RemoteExperts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let version = self.tables.borrow().as_ref().map(|t| t.placement.version);
        f.debug_struct("RemoteExperts")
            .field("placement_version", &version)
            .field("wait", &self.wait)
            .field("bytes_sent", &self.bytes_sent())
            .field("bytes_received", &self.bytes_received())
            .field("attempts", &self.attempts())
            .field("wire", &self.wire)
            .finish_non_exhaustive()
    }
}

/// A `Forward` call running on the runtime.
type Call = tokio::task::JoinHandle<Result<ForwardResponse, tonic::Status>>;

/// One layer's routed experts between [`RemoteExperts::send`] and
/// [`RemoteExperts::collect`].
struct Layer {
    step: StepContext,
    layer: usize,
    xs: Tensor,
    routes: Vec<ExpertRoute>,
    /// Newer tables arrive here (the one used was marked seen).
    tables: Tables,
    /// The table the calls were planned with, if any.
    table: Option<Arc<RoutingTable>>,
    /// The calls in flight, (worker, its batch, the call), or why none could start.
    sent: Result<Vec<(String, WorkerBatch, Call)>, Failure>,
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
        let table = RoutingTable {
            placement,
            clients,
            addresses: BTreeMap::new(),
        };
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
            attempts: AtomicU64::new(0),
            wire: None,
            call_timeout: None,
            suspects: Suspects::default(),
        }
    }

    /// Gives up on a `Forward` after `timeout` and sends its rows to another
    /// replica of the same experts (`--expert-timeout-ms`).
    pub fn with_call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = Some(timeout);
        self
    }

    /// Sends hidden states in `dtype` (workers compute in their own dtype and answer
    /// in this one; the sums are added up in f32 here).
    pub fn with_wire(mut self, dtype: DType) -> Self {
        self.wire = Some(dtype);
        self
    }

    /// Encoded bytes of every `ForwardRequest` sent so far.
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent.load(Ordering::Relaxed)
    }

    /// Encoded bytes of every `ForwardResponse` received so far.
    pub fn bytes_received(&self) -> u64 {
        self.bytes_received.load(Ordering::Relaxed)
    }

    /// Layers sent so far, counting every retry.
    pub fn attempts(&self) -> u64 {
        self.attempts.load(Ordering::Relaxed)
    }

    /// The routed experts of one layer for `xs` (rows, hidden): [`send`](Self::send)
    /// then [`collect`](Self::collect).
    pub fn forward_layer(
        &self,
        step: &StepContext,
        layer: usize,
        xs: &Tensor,
        routes: &[ExpertRoute],
    ) -> Result<Tensor, Error> {
        self.collect(self.send(step, layer, xs, routes))
    }

    /// Plans the layer with the newest table and starts its calls; never blocks.
    fn send(&self, step: &StepContext, layer: usize, xs: &Tensor, routes: &[ExpertRoute]) -> Layer {
        count_routes(layer, routes);
        let mut layer = Layer {
            step: step.clone(),
            layer,
            xs: xs.clone(),
            routes: routes.to_vec(),
            tables: self.tables.clone(),
            table: None,
            sent: Ok(Vec::new()),
        };
        if !layer.routes.is_empty() {
            self.resend(&mut layer);
        }
        layer
    }

    /// (Re)plans `layer` with the newest table and starts its calls.
    fn resend(&self, layer: &mut Layer) {
        let table = layer.tables.borrow_and_update().clone();
        // Counted once the table is taken: a table published after this count
        // is seen as newer.
        self.attempts.fetch_add(1, Ordering::Relaxed);
        layer.table.clone_from(&table);
        layer.sent = match &table {
            None => Err(Failure::Retry(format!(
                "layer {}: no expert placement is ready (are any expert-workers running?)",
                layer.layer
            ))),
            Some(table) => self.dispatch(table, layer, &layer.routes, &BTreeSet::new()),
        };
    }

    /// Starts one `Forward` per worker of `table` that owns experts of `routes`,
    /// choosing among each expert's replicas ([`plan`]) and never one in `excluded`.
    fn dispatch(
        &self,
        table: &RoutingTable,
        layer: &Layer,
        routes: &[ExpertRoute],
        excluded: &BTreeSet<String>,
    ) -> Result<Vec<(String, WorkerBatch, Call)>, Failure> {
        let usable = |w: &str| table.clients.contains_key(w) && !excluded.contains(w);
        let suspects = self.suspects.now();
        let preferred = |w: &str| !suspects.contains(w);
        let batches = plan(&table.placement, usable, preferred, layer.layer, routes)
            .map_err(|e| Failure::Retry(format!("{e} (placement {})", table.placement.version)))?;
        let metrics = ExpertDispatch::get();
        let mut calls = Vec::with_capacity(batches.len());
        for (worker, batch) in batches {
            let req = self
                .request(layer.layer, &layer.xs, &batch)
                .map_err(Failure::Fatal)?;
            let bytes = req.encoded_len();
            self.bytes_sent.fetch_add(bytes as u64, Ordering::Relaxed);
            metrics.sent(worker, bytes);
            let mut req = tonic::Request::new(req);
            let ids = layer.step.request_ids.iter().map(String::as_str);
            append_request_ids(req.metadata_mut(), ids);
            let mut client = table.clients[worker].clone();
            let name = worker.to_string();
            let timeout = self.call_timeout;
            let call = self.handle.spawn(async move {
                let sent = Instant::now();
                let answer = match timeout {
                    Some(limit) => tokio::time::timeout(limit, client.forward(req))
                        .await
                        .unwrap_or_else(|_| {
                            Err(tonic::Status::deadline_exceeded(format!(
                                "no answer within {} ms (--expert-timeout-ms)",
                                limit.as_millis()
                            )))
                        }),
                    None => client.forward(req).await,
                }
                .map(|r| r.into_inner());
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
        Ok(calls)
    }

    /// Waits for the layer's answers and adds them up; on a failure a newer
    /// table can fix, waits for one (until the wait runs out or the step is
    /// cancelled) and sends again.
    fn collect(&self, mut layer: Layer) -> Result<Tensor, Error> {
        let mut deadline = None;
        loop {
            let sent = std::mem::replace(&mut layer.sent, Ok(Vec::new()));
            let reason = match sent.and_then(|calls| self.gather(calls, &layer)) {
                Ok(sums) => return Ok(sums),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Retry(reason)) => reason,
            };
            let deadline = *deadline.get_or_insert_with(|| tokio::time::Instant::now() + self.wait);
            tracing::debug!(
                layer = layer.layer,
                version = ?layer.table.as_ref().map(|t| t.placement.version),
                %reason,
                "expert layer failed; waiting for a newer routing table"
            );
            let (tables, step) = (&mut layer.tables, &layer.step);
            let waited = self.handle.block_on(async {
                tokio::select! {
                    changed = tables.changed() => match changed {
                        Ok(()) => Waited::Newer,
                        Err(_) => Waited::NoNewer,
                    },
                    () = tokio::time::sleep_until(deadline) => Waited::NoNewer,
                    () = step.cancelled() => Waited::Cancelled,
                }
            });
            match waited {
                Waited::Newer => self.resend(&mut layer),
                Waited::NoNewer => return Err(Error::ExpertsUnavailable(reason)),
                Waited::Cancelled => return Err(Error::Cancelled),
            }
        }
    }

    /// Waits for one attempt's calls and adds up the workers' partial sums. The rows
    /// of a worker whose call fails for a reason a newer table could fix (it died,
    /// broke the connection, timed out) are sent at once to other replicas of the
    /// same experts in the same table, and that worker is passed over for a while
    /// ([`Suspects`]); only when no other replica is left does the layer fail with
    /// [`Failure::Retry`] (and wait for a newer table).
    fn gather(
        &self,
        calls: Vec<(String, WorkerBatch, Call)>,
        layer: &Layer,
    ) -> Result<Tensor, Failure> {
        let fatal = |e: candle_core::Error| Failure::Fatal(Error::Model(e.into()));
        let xs = &layer.xs;
        let (n_rows, hidden) = xs.dims2().map_err(fatal)?;
        let mut acc = Tensor::zeros((n_rows, hidden), DType::F32, xs.device()).map_err(fatal)?;
        let mut excluded = BTreeSet::new();
        let mut pending = calls;
        while !pending.is_empty() {
            let (meta, responses) = self.wait_all(pending, layer)?;
            let mut failed: Vec<ExpertRoute> = Vec::new();
            let mut reasons = Vec::new();
            for ((worker, batch), response) in meta.iter().zip(responses) {
                let failure = match response {
                    Ok(Ok(response)) => {
                        self.bytes_received
                            .fetch_add(response.encoded_len() as u64, Ordering::Relaxed);
                        let sums = decode_sums(worker, &response, batch.rows.len(), hidden, xs)
                            .map_err(Failure::Fatal)?;
                        let idx =
                            Tensor::from_vec(batch.rows.clone(), batch.rows.len(), xs.device())
                                .map_err(fatal)?;
                        acc = acc.index_add(&idx, &sums, 0).map_err(fatal)?;
                        continue;
                    }
                    Ok(Err(status)) => classify(layer.layer, worker, status),
                    Err(e) => Failure::Retry(format!(
                        "layer {}: call to expert-worker {worker} failed: {e}",
                        layer.layer
                    )),
                };
                let reason = match failure {
                    Failure::Fatal(e) => return Err(Failure::Fatal(e)),
                    Failure::Retry(reason) => reason,
                };
                self.suspects.mark(worker);
                excluded.insert(worker.clone());
                failed.extend(batch.global_routes());
                reasons.push(reason);
            }
            if failed.is_empty() {
                break;
            }
            let Some(table) = layer.table.as_deref() else {
                return Err(Failure::Retry(reasons.join("; ")));
            };
            // The same table's other replicas: no waiting for a lease to expire.
            pending = self
                .dispatch(table, layer, &failed, &excluded)
                .map_err(|e| match e {
                    Failure::Retry(why) => Failure::Retry(format!("{}; {why}", reasons.join("; "))),
                    fatal => fatal,
                })?;
            ExpertDispatch::get().failed_over(pending.len());
            tracing::debug!(
                layer = layer.layer,
                failed = %reasons.join("; "),
                "expert rows sent to other replicas"
            );
        }
        acc.to_dtype(xs.dtype()).map_err(fatal)
    }

    /// Waits for every call (each has its own deadline), or for the step's
    /// cancellation, which aborts them.
    #[allow(clippy::type_complexity)]
    fn wait_all(
        &self,
        calls: Vec<(String, WorkerBatch, Call)>,
        layer: &Layer,
    ) -> Result<
        (
            Vec<(String, WorkerBatch)>,
            Vec<Result<Result<ForwardResponse, tonic::Status>, tokio::task::JoinError>>,
        ),
        Failure,
    > {
        let (meta, calls): (Vec<_>, Vec<_>) = calls
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
                () = layer.step.cancelled() => None,
            }
        });
        match responses {
            Some(responses) => Ok((meta, responses)),
            None => {
                aborts.iter().for_each(|a| a.abort());
                Err(Failure::Fatal(Error::Cancelled))
            }
        }
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
        let mut rows = xs.index_select(&idx, 0).map_err(model)?; // (n, hidden)
        if let Some(wire) = self.wire.filter(|&d| d != rows.dtype()) {
            rows = rows.to_dtype(wire).map_err(model)?;
        }
        let rows = tensor::encode(&rows)
            .map_err(|e| Error::Model(tessera_model::Error::experts(e.to_string())))?;
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

impl ExpertBackend for RemoteExperts {
    fn forward(
        &self,
        step: &StepContext,
        layer: usize,
        xs: &Tensor,
        routes: &[ExpertRoute],
    ) -> ModelResult<Tensor> {
        self.forward_layer(step, layer, xs, routes)
            .map_err(tessera_model::Error::experts_from)
    }

    /// Sends the calls and returns at once; waiting collects them.
    fn start(
        &self,
        step: &StepContext,
        layer: usize,
        xs: &Tensor,
        routes: &[ExpertRoute],
    ) -> PendingExperts<'_> {
        let layer = self.send(step, layer, xs, routes);
        PendingExperts::waiting(move || {
            self.collect(layer)
                .map_err(tessera_model::Error::experts_from)
        })
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;
    use tessera_runtime::placement::even_split;

    use super::*;
    use crate::cancel::AnyCancelled;

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
            addresses: BTreeMap::new(),
        })
    }

    /// Polls `done` until it holds; panics after 10 s.
    fn wait_until(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            std::thread::yield_now();
        }
    }

    #[test]
    fn without_a_ready_placement_a_layer_fails_after_the_wait() {
        let rt = runtime();
        let (_tx, tables) = watch::channel(None);
        let remote =
            RemoteExperts::following(tables, rt.handle().clone(), "", Duration::from_millis(200));
        let step = StepContext::default();
        let started = Instant::now();
        let err = remote
            .forward_layer(&step, 1, &xs(), &routes())
            .unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert!(
            matches!(&err, Error::ExpertsUnavailable(m) if m.contains("layer 1: no expert placement")),
            "{err}"
        );
        // A layer without routes needs no worker.
        let zeros = remote.forward_layer(&step, 1, &xs(), &[]).unwrap();
        assert_eq!(zeros.sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    }

    #[test]
    fn a_failed_layer_retries_on_each_newer_table_until_the_wait_runs_out() {
        let rt = runtime();
        let (tx, tables) = watch::channel(Some(table_without_owner(1)));
        let remote = Arc::new(RemoteExperts::following(
            tables,
            rt.handle().clone(),
            "",
            Duration::from_secs(2),
        ));
        let layer = {
            let remote = remote.clone();
            std::thread::spawn(move || {
                remote.forward_layer(&StepContext::default(), 1, &xs(), &routes())
            })
        };
        // Each newer table (none with an owner) arrives once the layer has tried
        // the one before it.
        for version in 2..=4 {
            wait_until(&format!("attempt {}", version - 1), || {
                remote.attempts() >= version - 1
            });
            tx.send_replace(Some(table_without_owner(version)));
        }
        let err = layer.join().unwrap().unwrap_err();
        assert_eq!(remote.attempts(), 4, "one try per table");
        assert!(
            matches!(&err, Error::ExpertsUnavailable(m)
                if m.contains("no live owner for layer 1 expert 3 (placement 4)")),
            "the last try used the newest table: {err}"
        );
    }

    #[test]
    fn cancelling_the_step_stops_a_waiting_layer_at_once() {
        let rt = runtime();
        let (_tx, tables) = watch::channel(None);
        let remote = Arc::new(RemoteExperts::following(
            tables,
            rt.handle().clone(),
            "",
            Duration::from_secs(60),
        ));
        let cancel = tokio_util::sync::CancellationToken::new();
        let step = StepContext {
            request_ids: vec!["r".into()],
            cancel: Some(Arc::new(AnyCancelled::new(vec![
                tokio_util::sync::CancellationToken::new(),
                cancel.clone(),
            ]))),
        };
        let layer = {
            let remote = remote.clone();
            std::thread::spawn(move || remote.forward_layer(&step, 1, &xs(), &routes()))
        };
        wait_until("the layer tried once", || remote.attempts() >= 1);
        let started = Instant::now();
        cancel.cancel();
        let err = layer.join().unwrap().unwrap_err();
        assert!(matches!(err, Error::Cancelled), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn a_fixed_table_fails_at_once() {
        let rt = runtime();
        let placement = table_without_owner(1).placement.clone();
        let remote = RemoteExperts::new(placement, BTreeMap::new(), rt.handle().clone(), "");
        let err = remote
            .forward(&StepContext::default(), 1, &xs(), &routes())
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("no live owner for layer 1 expert 3"),
            "{err}"
        );
        let typed = err.into_experts::<Error>().unwrap();
        assert!(matches!(typed, Error::ExpertsUnavailable(_)), "{typed}");
    }
}
