//! The `Expert` gRPC service over the routed experts held in this process.
//!
//! `Forward` validates the request on the async runtime (cheap checks only), then
//! decodes, computes and encodes on a blocking thread: no tensor work runs on
//! the runtime's workers. Calls, tokens, compute time and the experts held are the
//! worker's Prometheus metrics (`tessera_expert_worker_*`, label `worker`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, PoisonError, RwLock};
use std::time::Instant;

use tessera_model::config::ModelConfig;
use tessera_model::experts::{
    ExpertBackend, ExpertRoute, ExpertSelection, LocalExperts, StepContext,
};
use tessera_model::weights::Checkpoint;
use tessera_proto::internal::v1::expert_server::Expert;
use tessera_proto::internal::v1::{
    ForwardRequest, ForwardResponse, InfoRequest, InfoResponse, LayerExperts, LoadRequest,
    LoadResponse, UnloadRequest, UnloadResponse,
};
use tessera_proto::tensor;
use tessera_runtime::device::Compute;
use tessera_runtime::telemetry;
use tonic::{Request, Response, Status};

use crate::metrics::ExpertWorkerMetrics;

use crate::error::{Error, Result};

/// The experts this worker holds at one moment. Replaced whole (copy-on-write:
/// cloning shares the weights) when experts are loaded or dropped, so a `Forward`
/// in flight keeps the shard it started with.
#[derive(Debug, Clone, Default)]
struct Shard {
    experts: LocalExperts,
    held: BTreeSet<(usize, usize)>,
    /// Version of the last placement applied; 0 before any.
    placement_version: u64,
    /// Whether a placement (or a `Load`) has been applied.
    applied: bool,
    /// What the last applied placement gives this worker: while any of it is not
    /// held (an `Unload`), the worker is not ready.
    share: BTreeSet<(usize, usize)>,
}

impl Shard {
    /// Whether a placement was applied and all of its share is held.
    fn ready(&self) -> bool {
        self.applied && self.share.is_subset(&self.held)
    }
}

/// How [`ExpertService::apply`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The held set is the placement's share.
    Done,
    /// A newer placement arrived while loading; what was loaded is kept, the rest
    /// is for the newer one to decide.
    Superseded,
}

/// What does not change once the model is opened.
#[derive(Debug)]
struct Model {
    dir: PathBuf,
    config: ModelConfig,
    fingerprint: String,
    /// Where and in what precision experts are loaded and computed.
    compute: Compute,
    metrics: ExpertWorkerMetrics,
    /// Bytes one routed expert takes once loaded (measured on one at open).
    expert_bytes: usize,
    /// The most bytes of experts this worker may hold (`None`: no limit).
    budget: Option<u64>,
}

/// Serves `tessera.internal.v1.Expert` for one shard of routed experts, which
/// changes as placements are applied ([`ExpertService::apply`]). Answers
/// UNAVAILABLE until [`ExpertService::open`] has read the model.
#[derive(Clone)]
pub struct ExpertService {
    model: Arc<OnceLock<Model>>,
    shard: Arc<RwLock<Arc<Shard>>>,
    /// Serialises loads and unloads (forwards never wait on it).
    changing: Arc<tokio::sync::Mutex<()>>,
    /// Woken when experts of the share are dropped outside a placement (`Unload`).
    lost: Arc<tokio::sync::Notify>,
}

impl std::fmt::Debug for ExpertService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shard = self.current();
        f.debug_struct("ExpertService")
            .field("experts", &shard.held.len())
            .field("placement_version", &shard.placement_version)
            .field("fingerprint", &self.model.get().map(|m| &m.fingerprint))
            .finish_non_exhaustive()
    }
}

impl Default for ExpertService {
    fn default() -> Self {
        Self::new()
    }
}

impl ExpertService {
    /// A worker that holds no model yet.
    pub fn new() -> Self {
        Self {
            model: Arc::default(),
            shard: Arc::default(),
            changing: Arc::default(),
            lost: Arc::default(),
        }
    }

    /// Reads the snapshot's config and fingerprint (once) and measures one routed
    /// expert's loaded size; experts will load onto `compute`, never more than
    /// `budget` bytes of them (`None`: no limit), and the metrics carry the member id
    /// `worker`. Holds no experts yet. Blocking.
    pub fn open(
        &self,
        dir: &Path,
        worker: &str,
        compute: Compute,
        budget: Option<u64>,
    ) -> Result<()> {
        let config = ModelConfig::from_dir(dir).map_err(Error::Load)?;
        let fingerprint = tessera_model::fingerprint(dir).map_err(Error::Load)?;
        let expert_bytes = match config.language.moe_layers().first() {
            Some(&layer) if config.language.moe.is_some() => {
                let checkpoint = Checkpoint::open(dir).map_err(Error::Load)?;
                let one = ExpertSelection::Only([(layer, 0)].into());
                LocalExperts::load(&config.language, compute.target(&checkpoint), &one)
                    .map_err(Error::Load)?
                    .bytes()
            }
            _ => 0,
        };
        let metrics = ExpertWorkerMetrics::new(worker);
        metrics
            .budget_bytes
            .set(budget.map_or(0, |b| i64::try_from(b).unwrap_or(i64::MAX)));
        let model = Model {
            dir: dir.to_path_buf(),
            config,
            fingerprint,
            compute,
            metrics,
            expert_bytes,
            budget,
        };
        if self.model.set(model).is_err() {
            tracing::warn!("the expert-worker's model was already open");
        }
        Ok(())
    }

    fn model(&self) -> Result<&Model> {
        self.model.get().ok_or(Error::Loading)
    }

    /// The model fingerprint this worker serves (empty before [`open`](Self::open)).
    pub fn fingerprint(&self) -> &str {
        self.model.get().map_or("", |m| &m.fingerprint)
    }

    /// The MoE layers of the model and the routed experts per layer (none before
    /// [`open`](Self::open)).
    pub fn layout(&self) -> (Vec<usize>, usize) {
        let Some(model) = self.model.get() else {
            return (Vec::new(), 0);
        };
        let lang = &model.config.language;
        let n = lang.moe.as_ref().map_or(0, |m| m.n_routed_experts);
        (lang.moe_layers(), n)
    }

    /// The most `(layer, expert)` pairs this worker may hold under its budget
    /// (`None`: no limit, or not open yet).
    pub fn capacity(&self) -> Option<usize> {
        let model = self.model.get()?;
        let budget = usize::try_from(model.budget?).unwrap_or(usize::MAX);
        Some(budget / model.expert_bytes.max(1))
    }

    /// Whether the last placement was applied and all of its share is held.
    pub fn is_ready(&self) -> bool {
        self.current().ready()
    }

    /// Resolves when experts of the share were dropped outside a placement.
    pub async fn share_lost(&self) {
        self.lost.notified().await;
    }

    fn current(&self) -> Arc<Shard> {
        self.shard
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn replace(&self, shard: Shard) {
        *self.shard.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(shard);
    }

    /// Number of `(layer, expert)` pairs held.
    pub fn len(&self) -> usize {
        self.current().held.len()
    }

    /// Whether no expert is held.
    pub fn is_empty(&self) -> bool {
        self.current().held.is_empty()
    }

    /// Bytes of expert weights held.
    pub fn bytes(&self) -> usize {
        self.current().experts.bytes()
    }

    /// The pairs held.
    pub fn held(&self) -> BTreeSet<(usize, usize)> {
        self.current().held.clone()
    }

    /// Version of the last placement applied (0 before any).
    pub fn placement_version(&self) -> u64 {
        self.current().placement_version
    }

    /// Makes the held set exactly `want` for placement `version`. Within the budget
    /// it loads the missing experts first and then drops the ones no longer
    /// wanted, so experts kept across placements never stop being served. When
    /// both do not fit, it first drops `droppable` (lost pairs another worker keeps
    /// holding), then, only if still needed, the other lost pairs. Missing experts
    /// load one layer at a time; between layers `superseded` is asked whether a newer
    /// placement arrived, and if so it stops there ([`Applied::Superseded`]).
    pub async fn apply(
        &self,
        version: u64,
        want: &BTreeSet<(usize, usize)>,
        droppable: &BTreeSet<(usize, usize)>,
        superseded: impl Fn() -> bool,
    ) -> Result<Applied> {
        let _guard = self.changing.lock().await;
        let model = self.model()?;
        let held = self.current().held.clone();
        let missing: BTreeSet<(usize, usize)> = want.difference(&held).copied().collect();
        let lost: BTreeSet<(usize, usize)> = held.difference(want).copied().collect();
        if let Some(budget) = model.budget {
            let need = |held: usize| (held + missing.len()) as u64 * model.expert_bytes as u64;
            if need(held.len()) > budget {
                let first: BTreeSet<_> = lost.intersection(droppable).copied().collect();
                self.drop_pairs(&first);
                let left = self.current().held.len();
                if need(left) > budget {
                    tracing::warn!(
                        version,
                        "the budget leaves no room to load before dropping; experts this \
                         worker alone held are dropped before their new owners hold them"
                    );
                    self.drop_pairs(&lost);
                }
            }
        }
        let room = model.budget.map_or(usize::MAX, |budget| {
            let held = self.current().held.len();
            usize::try_from(budget / model.expert_bytes.max(1) as u64)
                .unwrap_or(usize::MAX)
                .saturating_sub(held)
        });
        if missing.len() > room {
            tracing::error!(
                version,
                share = want.len(),
                room,
                "the placement gives this worker more experts than its budget holds \
                 (--expert-memory-bytes); loading only what fits"
            );
        }
        let mut by_layer: BTreeMap<usize, BTreeSet<(usize, usize)>> = BTreeMap::new();
        for &(layer, expert) in missing.iter().take(room) {
            by_layer.entry(layer).or_default().insert((layer, expert));
        }
        for (_, pairs) in by_layer {
            if superseded() {
                tracing::info!(
                    version,
                    "a newer placement arrived; applying that one instead"
                );
                return Ok(Applied::Superseded);
            }
            let loaded = self.load_blocking(pairs).await?;
            model.metrics.loaded_bytes.inc_by(loaded.bytes() as u64);
            let mut shard = (*self.current()).clone();
            shard.experts.merge(&loaded);
            shard.held = shard.experts.held();
            self.replace(shard);
            // Reading and packing leave freed buffers behind in the loading
            // thread's arena.
            release_freed_memory();
        }
        let mut shard = (*self.current()).clone();
        shard.experts.retain(|l, e| want.contains(&(l, e)));
        shard.held = shard.experts.held();
        shard.placement_version = shard.placement_version.max(version);
        shard.applied = true;
        shard.share.clone_from(want);
        tracing::info!(
            version,
            experts = shard.held.len(),
            bytes = shard.experts.bytes(),
            "expert placement applied"
        );
        self.publish(shard);
        Ok(Applied::Done)
    }

    /// Drops `pairs` now (a placement's losses), keeping the share as it is.
    fn drop_pairs(&self, pairs: &BTreeSet<(usize, usize)>) {
        if pairs.is_empty() {
            return;
        }
        let mut shard = (*self.current()).clone();
        shard.experts.retain(|l, e| !pairs.contains(&(l, e)));
        shard.held = shard.experts.held();
        self.publish(shard);
    }

    /// Swaps in `shard` and reports what it holds in the metrics.
    fn publish(&self, shard: Shard) {
        let dropped = shard.experts.bytes() < self.current().experts.bytes();
        if let Ok(model) = self.model() {
            let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
            let m = &model.metrics;
            m.held_experts.set(gauge(shard.held.len()));
            m.held_bytes.set(gauge(shard.experts.bytes()));
            m.placement_version
                .set(i64::try_from(shard.placement_version).unwrap_or(i64::MAX));
        }
        self.replace(shard);
        if dropped {
            release_freed_memory();
        }
    }

    /// Loads `add` next to the experts already held (the share stays as it is).
    async fn add(&self, add: BTreeSet<(usize, usize)>) -> Result<()> {
        let _guard = self.changing.lock().await;
        let missing: BTreeSet<(usize, usize)> =
            add.difference(&self.current().held).copied().collect();
        let loaded = self.load_blocking(missing).await?;
        self.model()?
            .metrics
            .loaded_bytes
            .inc_by(loaded.bytes() as u64);
        let mut shard = (*self.current()).clone();
        shard.experts.merge(&loaded);
        shard.held = shard.experts.held();
        shard.applied = true;
        self.publish(shard);
        Ok(())
    }

    /// Drops `remove` from the experts held. Dropping part of the share makes the
    /// worker not ready until it has loaded them again (its placement task does).
    async fn remove(&self, remove: &BTreeSet<(usize, usize)>) -> Result<()> {
        let _guard = self.changing.lock().await;
        self.drop_pairs(remove);
        if !self.current().ready() {
            self.lost.notify_one();
        }
        Ok(())
    }

    async fn load_blocking(&self, pairs: BTreeSet<(usize, usize)>) -> Result<LocalExperts> {
        if pairs.is_empty() {
            return Ok(LocalExperts::default());
        }
        self.model()?;
        let model = self.model.clone();
        tokio::task::spawn_blocking(move || {
            let model = model.get().ok_or(Error::Loading)?;
            let checkpoint = Checkpoint::open(&model.dir).map_err(Error::Load)?;
            let target = model.compute.target(&checkpoint);
            LocalExperts::load(
                &model.config.language,
                target,
                &ExpertSelection::Only(pairs),
            )
            .map_err(Error::Load)
        })
        .await
        .map_err(Error::Join)?
    }

    fn forward_blocking(
        shard: &Shard,
        model: &Model,
        req: &ForwardRequest,
        routes: &[ExpertRoute],
    ) -> Result<ForwardResponse> {
        let hidden_size = model.config.language.hidden_size;
        let rows = req
            .rows
            .as_ref()
            .ok_or_else(|| Error::Malformed("`rows` is missing".into()))?;
        let xs = tensor::decode(rows, &model.compute.device)?;
        let (n, hidden) = xs.dims2().map_err(|_| {
            Error::Malformed(format!("`rows` has shape {:?}, expected 2-D", xs.dims()))
        })?;
        if hidden != hidden_size {
            return Err(Error::Malformed(format!(
                "`rows` has {hidden} columns, the model's hidden size is {hidden_size}"
            )));
        }
        if let Some(r) = routes.iter().find(|r| r.row as usize >= n) {
            return Err(Error::Malformed(format!(
                "route row {} is outside the batch of {n} rows",
                r.row
            )));
        }
        // Experts run in the worker's dtype; answer in the request's.
        let sums = shard
            .experts
            .forward(
                &StepContext::default(),
                req.layer as usize,
                &xs.to_dtype(model.compute.dtype)
                    .map_err(|e| Error::Compute(e.into()))?,
                routes,
            )
            .and_then(|s| Ok(s.to_dtype(xs.dtype())?))
            .map_err(Error::Compute)?;
        Ok(ForwardResponse {
            sums: Some(tensor::encode(&sums)?),
        })
    }
}

/// Hands memory freed by dropped experts (or by loading) back to the system. glibc keeps freed
/// heap memory in its arenas (one per thread that allocated) for reuse, so the
/// resident set would stay at its high-water mark and a worker that drops experts
/// to load others could pass its budget; `malloc_trim` returns every arena's free
/// pages.
#[allow(unsafe_code)]
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` only releases free memory held by the allocator; it
    // touches no live allocation and is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// `pairs` grouped by layer, as on the wire.
fn by_layer(pairs: &BTreeSet<(usize, usize)>) -> Vec<LayerExperts> {
    let mut layers: BTreeMap<usize, Vec<u32>> = BTreeMap::new();
    for &(layer, expert) in pairs {
        layers.entry(layer).or_default().push(expert as u32);
    }
    layers
        .into_iter()
        .map(|(layer, experts)| LayerExperts {
            layer: layer as u32,
            experts,
        })
        .collect()
}

/// Wire `LayerExperts` as pairs, checked against the model's layout.
fn pairs(
    layers: &[LayerExperts],
    layout: &(Vec<usize>, usize),
) -> Result<BTreeSet<(usize, usize)>> {
    let mut out = BTreeSet::new();
    for l in layers {
        let layer = l.layer as usize;
        if !layout.0.contains(&layer) {
            return Err(Error::Malformed(format!(
                "layer {layer} is not an MoE layer of this model (MoE layers: {:?})",
                layout.0
            )));
        }
        for &e in &l.experts {
            if e as usize >= layout.1 {
                return Err(Error::Malformed(format!(
                    "layer {layer} has {} routed experts; expert {e} does not exist",
                    layout.1
                )));
            }
            out.insert((layer, e as usize));
        }
    }
    Ok(out)
}

/// The routes of a request, checked against what this worker holds.
fn routes(
    req: &ForwardRequest,
    fingerprint: &str,
    held: &BTreeSet<(usize, usize)>,
) -> Result<Vec<ExpertRoute>> {
    if req.model_fingerprint != fingerprint {
        return Err(Error::FingerprintMismatch {
            request: req.model_fingerprint.clone(),
            ours: fingerprint.to_string(),
        });
    }
    let (n_rows, n_experts, n_weights) = (
        req.route_rows.len(),
        req.route_experts.len(),
        req.route_weights.len(),
    );
    if n_rows != n_experts || n_rows != n_weights {
        return Err(Error::Malformed(format!(
            "route lists differ in length: {n_rows} rows, {n_experts} experts, {n_weights} weights"
        )));
    }
    let layer = req.layer as usize;
    let routes: Vec<ExpertRoute> = req
        .route_rows
        .iter()
        .zip(&req.route_experts)
        .zip(&req.route_weights)
        .map(|((&row, &expert), &weight)| ExpertRoute {
            row,
            expert,
            weight,
        })
        .collect();
    if let Some(r) = routes
        .iter()
        .find(|r| !held.contains(&(layer, r.expert as usize)))
    {
        return Err(Error::NotHeld {
            layer,
            expert: r.expert as usize,
        });
    }
    Ok(routes)
}

impl ExpertService {
    /// One `Forward`: checked here, computed on a blocking thread.
    async fn forward_call(&self, req: ForwardRequest) -> Result<ForwardResponse> {
        let fingerprint = &self.model()?.fingerprint;
        let shard = self.current();
        let routes = routes(&req, fingerprint, &shard.held)?;
        let tokens = req
            .rows
            .as_ref()
            .and_then(|rows| rows.shape.first().copied())
            .unwrap_or(0);
        let n_routes = routes.len() as u64;
        let model = self.model.clone();
        let response = tokio::task::spawn_blocking(move || {
            let model = model.get().ok_or(Error::Loading)?;
            ExpertService::forward_blocking(&shard, model, &req, &routes)
        })
        .await
        .map_err(Error::Join)??;
        let metrics = &self.model()?.metrics;
        metrics.tokens.inc_by(tokens);
        metrics.routes.inc_by(n_routes);
        Ok(response)
    }
}

#[tonic::async_trait]
impl Expert for ExpertService {
    async fn forward(
        &self,
        request: Request<ForwardRequest>,
    ) -> Result<Response<ForwardResponse>, Status> {
        let started = Instant::now();
        let ids = telemetry::request_ids(request.metadata());
        let req = request.into_inner();
        tracing::debug!(request_ids = %ids.join(","), layer = req.layer, "Forward");
        let answer = self.forward_call(req).await;
        let metrics = self.model.get().map(|m| &m.metrics);
        match answer {
            Ok(response) => {
                if let Some(m) = metrics {
                    m.forward_seconds.observe(started.elapsed().as_secs_f64());
                    m.answered(tonic::Code::Ok);
                }
                Ok(Response::new(response))
            }
            Err(e) => {
                let status = Status::from(e);
                if let Some(m) = metrics {
                    m.answered(status.code());
                }
                Err(status)
            }
        }
    }

    async fn load(&self, request: Request<LoadRequest>) -> Result<Response<LoadResponse>, Status> {
        let req = request.into_inner();
        self.model()?;
        let add = pairs(&req.experts, &self.layout())?;
        self.add(add).await?;
        Ok(Response::new(LoadResponse {
            held: by_layer(&self.current().held),
        }))
    }

    async fn unload(
        &self,
        request: Request<UnloadRequest>,
    ) -> Result<Response<UnloadResponse>, Status> {
        let req = request.into_inner();
        self.model()?;
        let remove = pairs(&req.experts, &self.layout())?;
        self.remove(&remove).await?;
        Ok(Response::new(UnloadResponse {
            held: by_layer(&self.current().held),
        }))
    }

    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        let fingerprint = self.model()?.fingerprint.clone();
        let shard = self.current();
        Ok(Response::new(InfoResponse {
            model_fingerprint: fingerprint,
            held: by_layer(&shard.held),
            ready: shard.ready(),
            placement_version: shard.placement_version,
            held_bytes: shard.experts.bytes() as u64,
        }))
    }
}

#[cfg(test)]
mod tests;
