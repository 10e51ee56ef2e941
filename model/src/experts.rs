//! Routed experts behind one trait, so the scheduler can run them in-process or on
//! remote expert-workers (`docs/ARCHITECTURE.md`, "Expert dispatch"). Every call
//! carries the [`StepContext`] of the engine step it belongs to: who the rows are
//! for, and a cancellation that ends a wait for experts at once.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use candle_core::{DType, Tensor};

use crate::config::LanguageConfig;
use crate::error::{Error, Result};
use crate::language::mlp::Mlp;
use crate::weights::LoadTarget;

/// One token row's use of one expert.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExpertRoute {
    /// Row of the batch sent to the backend.
    pub row: u32,
    /// Routed expert id within the layer.
    pub expert: u32,
    /// Final gate weight of this expert for this row.
    pub weight: f32,
}

/// A cancellation the model passes through without knowing its kind (the
/// scheduler's is "any request of the step was cancelled").
pub trait Cancel: Send + Sync + std::fmt::Debug {
    /// Whether it has fired.
    fn is_cancelled(&self) -> bool;
    /// Resolves once it fires.
    fn cancelled(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

/// The engine step a backend call belongs to.
#[derive(Debug, Clone, Default)]
pub struct StepContext {
    /// The request id of every sequence in the step (remote backends send them
    /// along, and log them).
    pub request_ids: Vec<String>,
    /// Fires when waiting for experts should stop (a sequence of the step was
    /// cancelled); `None` never fires.
    pub cancel: Option<Arc<dyn Cancel>>,
}

impl StepContext {
    /// Whether the step's cancellation has fired.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.as_ref().is_some_and(|c| c.is_cancelled())
    }

    /// Resolves when the step's cancellation fires; never without one.
    pub async fn cancelled(&self) {
        match &self.cancel {
            Some(c) => c.cancelled().await,
            None => std::future::pending().await,
        }
    }
}

/// Computes the weighted sum of routed experts for a batch of rows of one MoE layer.
pub trait ExpertBackend: Send + Sync {
    /// `xs`: (rows, hidden). Returns (rows, hidden) where row `r` is
    /// `Σ weight · Expert_expert(xs[r])` over the routes of `r` (zero for a row without
    /// routes), accumulated in f32 and returned in `xs`'s dtype. A failure is
    /// [`Error::Experts`] with the backend's own error as its source.
    fn forward(
        &self,
        step: &StepContext,
        layer: usize,
        xs: &Tensor,
        routes: &[ExpertRoute],
    ) -> Result<Tensor>;

    /// Starts [`forward`](Self::forward) and returns at once when the backend can work
    /// in the background (remote experts: the calls are in flight), so the caller can
    /// run other work before [`PendingExperts::wait`]. The default computes now.
    fn start(
        &self,
        step: &StepContext,
        layer: usize,
        xs: &Tensor,
        routes: &[ExpertRoute],
    ) -> PendingExperts<'_> {
        PendingExperts::ready(self.forward(step, layer, xs, routes))
    }
}

/// Routed experts started by [`ExpertBackend::start`]; [`wait`](Self::wait) gives the sums.
pub struct PendingExperts<'a>(Pending<'a>);

enum Pending<'a> {
    Ready(Result<Tensor>),
    Waiting(Box<dyn FnOnce() -> Result<Tensor> + Send + 'a>),
}

impl<'a> PendingExperts<'a> {
    /// Already computed.
    pub fn ready(result: Result<Tensor>) -> Self {
        Self(Pending::Ready(result))
    }

    /// Computed by `wait` when asked (e.g. collecting calls in flight).
    pub fn waiting(wait: impl FnOnce() -> Result<Tensor> + Send + 'a) -> Self {
        Self(Pending::Waiting(Box::new(wait)))
    }

    /// The (rows, hidden) sums, blocking until they are there.
    pub fn wait(self) -> Result<Tensor> {
        match self.0 {
            Pending::Ready(result) => result,
            Pending::Waiting(wait) => wait(),
        }
    }
}

impl std::fmt::Debug for PendingExperts<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match self.0 {
            Pending::Ready(_) => "ready",
            Pending::Waiting(_) => "waiting",
        };
        f.debug_tuple("PendingExperts").field(&state).finish()
    }
}

/// Routes grouped by expert: for each expert, its rows and weights.
pub fn group_by_expert(routes: &[ExpertRoute]) -> BTreeMap<u32, (Vec<u32>, Vec<f32>)> {
    let mut groups: BTreeMap<u32, (Vec<u32>, Vec<f32>)> = BTreeMap::new();
    for r in routes {
        let g = groups.entry(r.expert).or_default();
        g.0.push(r.row);
        g.1.push(r.weight);
    }
    groups
}

/// Which routed experts a process loads.
#[derive(Debug, Clone)]
pub enum ExpertSelection {
    /// Every routed expert of every MoE layer.
    All,
    /// None (e.g. a scheduler whose experts live on expert-workers).
    None,
    /// Only these (layer, expert) pairs.
    Only(std::collections::BTreeSet<(usize, usize)>),
}

impl ExpertSelection {
    fn contains(&self, layer: usize, expert: usize) -> bool {
        match self {
            Self::All => true,
            Self::None => false,
            Self::Only(set) => set.contains(&(layer, expert)),
        }
    }
}

/// Routed experts held in this process; each expert runs one matmul chain over its rows.
#[derive(Debug, Default, Clone)]
pub struct LocalExperts {
    experts: BTreeMap<(usize, usize), Mlp>,
}

impl LocalExperts {
    /// Loads the selected routed experts (`language.model.layers.{l}.mlp.experts.{e}`).
    pub fn load(
        cfg: &LanguageConfig,
        target: LoadTarget,
        selection: &ExpertSelection,
    ) -> Result<Self> {
        if let ExpertSelection::Only(set) = selection {
            let layers = cfg.moe_layers();
            let n = cfg.moe.as_ref().map_or(0, |m| m.n_routed_experts);
            if let Some(&(l, e)) = set.iter().find(|&&(l, e)| !layers.contains(&l) || e >= n) {
                return Err(Error::experts(format!(
                    "layer {l} expert {e} does not exist in this model"
                )));
            }
        }
        let mut experts = BTreeMap::new();
        let Some(moe) = &cfg.moe else {
            return Ok(Self { experts });
        };
        for layer in cfg.moe_layers() {
            let w = target.pp(format!("language.model.layers.{layer}.mlp.experts"));
            for e in 0..moe.n_routed_experts {
                if selection.contains(layer, e) {
                    let mlp = Mlp::new(&w.pp(e), cfg.hidden_size, moe.moe_intermediate_size)?;
                    experts.insert((layer, e), mlp);
                }
            }
        }
        Ok(Self { experts })
    }

    /// Number of (layer, expert) pairs held.
    pub fn len(&self) -> usize {
        self.experts.len()
    }

    /// Whether no expert is held.
    pub fn is_empty(&self) -> bool {
        self.experts.is_empty()
    }

    /// Bytes of expert weights held.
    pub fn bytes(&self) -> usize {
        self.experts.values().map(Mlp::bytes).sum()
    }

    /// The `(layer, expert)` pairs held, ascending.
    pub fn held(&self) -> BTreeSet<(usize, usize)> {
        self.experts.keys().copied().collect()
    }

    /// Adds `other`'s experts (sharing their weights; no copy). An expert held by
    /// both keeps this one's weights.
    pub fn merge(&mut self, other: &LocalExperts) {
        for (key, mlp) in &other.experts {
            self.experts.entry(*key).or_insert_with(|| mlp.clone());
        }
    }

    /// Drops every expert for which `keep` is false, freeing its weights once no
    /// other holder shares them.
    pub fn retain(&mut self, mut keep: impl FnMut(usize, usize) -> bool) {
        self.experts
            .retain(|&(layer, expert), _| keep(layer, expert));
    }
}

impl ExpertBackend for LocalExperts {
    fn forward(
        &self,
        _step: &StepContext,
        layer: usize,
        xs: &Tensor,
        routes: &[ExpertRoute],
    ) -> Result<Tensor> {
        let (rows, hidden) = xs.dims2()?;
        let mut groups = Vec::new();
        for (expert, (row_ids, weights)) in group_by_expert(routes) {
            let mlp = self.experts.get(&(layer, expert as usize)).ok_or_else(|| {
                Error::experts(format!(
                    "layer {layer} expert {expert} is not loaded in this process"
                ))
            })?;
            if let Some(&bad) = row_ids.iter().find(|&&r| r as usize >= rows) {
                return Err(Error::experts(format!(
                    "route row {bad} is outside the batch of {rows} rows"
                )));
            }
            groups.push((mlp, row_ids, weights));
        }
        if !crate::ops::cpu_kernels(xs.device()) {
            // On a GPU the sums stay on the device: each expert's weighted rows are
            // added into an f32 accumulator at their row numbers (one expert at a time,
            // in expert order, as on the CPU).
            let device = xs.device();
            let mut acc = Tensor::zeros((rows, hidden), DType::F32, device)?;
            for (mlp, row_ids, weights) in groups {
                let n = row_ids.len();
                let idx = Tensor::from_slice(&row_ids, n, device)?;
                let w = Tensor::from_slice(&weights, (n, 1), device)?;
                let out = mlp
                    .forward(&xs.index_select(&idx, 0)?)? // (n, hidden)
                    .to_dtype(DType::F32)?
                    .broadcast_mul(&w)?;
                acc = acc.index_add(&idx, &out, 0)?;
            }
            return Ok(acc.to_dtype(xs.dtype())?);
        }
        // Each expert's rows in one product; its weighted outputs are added into `acc`
        // in place (no copy of the whole batch per expert).
        let mut acc = vec![0f32; rows * hidden];
        let add = |acc: &mut [f32], row_ids: &[u32], weights: &[f32], out: &[f32]| {
            for ((&r, &w), y) in row_ids.iter().zip(weights).zip(out.chunks_exact(hidden)) {
                let dst = &mut acc[r as usize * hidden..(r as usize + 1) * hidden];
                for (d, y) in dst.iter_mut().zip(y) {
                    *d += w * y;
                }
            }
        };
        // A few rows per expert (decode steps): every expert's products in two parallel
        // passes ([`Mlp::forward_small`]), the same sums as one expert at a time.
        let small = groups
            .iter()
            .all(|g| g.1.len() <= crate::linear::small_products_max_rows());
        if small && xs.dtype() == DType::F32 {
            let xs = xs.contiguous()?;
            let done = crate::ops::with_f32_slice(&xs, |x| -> Result<bool> {
                let gathered: Vec<Vec<f32>> = groups
                    .iter()
                    .map(|(_, row_ids, _)| {
                        row_ids
                            .iter()
                            .flat_map(|&r| &x[r as usize * hidden..(r as usize + 1) * hidden])
                            .copied()
                            .collect()
                    })
                    .collect();
                let jobs: Vec<_> = groups
                    .iter()
                    .zip(&gathered)
                    .map(|((mlp, _, _), g)| (*mlp, &g[..]))
                    .collect();
                let Some(outs) = Mlp::forward_small(&jobs)? else {
                    return Ok(false);
                };
                for ((_, row_ids, weights), out) in groups.iter().zip(&outs) {
                    add(&mut acc, row_ids, weights, out);
                }
                Ok(true)
            })??;
            if done {
                return Ok(Tensor::from_vec(acc, (rows, hidden), xs.device())?);
            }
        }
        for (mlp, row_ids, weights) in groups {
            let n = row_ids.len();
            let idx = Tensor::from_slice(&row_ids, n, xs.device())?;
            let out = mlp
                .forward(&xs.index_select(&idx, 0)?)? // (n, hidden)
                .to_dtype(DType::F32)?
                .contiguous()?;
            crate::ops::with_f32_slice(&out, |out| add(&mut acc, &row_ids, &weights, out))?;
        }
        let acc = Tensor::from_vec(acc, (rows, hidden), xs.device())?;
        Ok(acc.to_dtype(xs.dtype())?)
    }
}
