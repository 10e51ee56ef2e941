//! The DeepSeek-V2 MoE layer (`DeepseekV2MoE` / `MoEGate` in `modeling_deepseek.py`): the gate
//! runs here, the routed experts run behind an [`ExpertBackend`], the shared experts run here.

use candle_core::{DType, Result, Tensor};

use super::mlp::Mlp;
use crate::config::{MoeConfig, ScoringFunc, TopkMethod};
use crate::error;
use crate::experts::{ExpertBackend, ExpertRoute, PendingExperts, StepContext};
use crate::linear::Linear;
use crate::ops::{sigmoid_in_place, softmax_in_place, top_k};
use crate::weights::Weights;

/// The routed experts of a batch of tokens for one MoE layer.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    /// Experts per token.
    pub k: usize,
    /// (tokens · k) expert ids, token-major, in selection order.
    pub experts: Vec<u32>,
    /// (tokens · k) final weights (after normalisation and scaling), matching `experts`.
    pub weights: Vec<f32>,
}

impl Routing {
    /// Number of tokens routed.
    pub fn tokens(&self) -> usize {
        self.experts.len().checked_div(self.k).unwrap_or(0)
    }

    /// The (row, expert, weight) triples an expert backend consumes.
    pub fn routes(&self) -> Vec<ExpertRoute> {
        self.experts
            .iter()
            .zip(&self.weights)
            .enumerate()
            .map(|(i, (&expert, &weight))| ExpertRoute {
                row: (i / self.k) as u32,
                expert,
                weight,
            })
            .collect()
    }

    /// Token `t`'s (expert, weight) pairs sorted by expert id.
    pub fn sorted_token(&self, t: usize) -> Vec<(u32, f32)> {
        let mut pairs: Vec<(u32, f32)> = (t * self.k..(t + 1) * self.k)
            .map(|i| (self.experts[i], self.weights[i]))
            .collect();
        pairs.sort_by_key(|p| p.0);
        pairs
    }
}

/// `mlp.gate`: scores every routed expert and picks the top-k.
#[derive(Debug)]
pub struct Gate {
    /// (experts, hidden), always f32 whatever `--weights` says: the reference computes
    /// gate logits in f32.
    weight: Linear,
    /// `e_score_correction_bias` (noaux_tc only).
    bias: Option<Vec<f32>>,
    cfg: MoeConfig,
}

impl Gate {
    pub fn new(w: &Weights, hidden: usize, cfg: &MoeConfig) -> error::Result<Self> {
        let e = cfg.n_routed_experts;
        let weight = Linear::new(w.get_as("weight", &[e, hidden], DType::F32)?)?;
        let bias = match cfg.topk_method {
            TopkMethod::NoauxTc => Some(
                w.get_as("e_score_correction_bias", &[e], DType::F32)?
                    .to_vec1::<f32>()?,
            ),
            _ => None,
        };
        Ok(Self {
            weight,
            bias,
            cfg: cfg.clone(),
        })
    }

    /// Routes `x` (tokens, hidden).
    pub fn route(&self, x: &Tensor) -> Result<Routing> {
        let logits = self
            .weight
            .forward(&x.to_dtype(DType::F32)?)?
            .to_vec2::<f32>()?;
        let k = self.cfg.num_experts_per_tok;
        let mut experts = Vec::with_capacity(logits.len() * k);
        let mut weights = Vec::with_capacity(logits.len() * k);
        for mut scores in logits {
            match self.cfg.scoring_func {
                ScoringFunc::Softmax => softmax_in_place(&mut scores),
                ScoringFunc::Sigmoid => sigmoid_in_place(&mut scores),
            }
            let idx = self.select(&scores);
            let mut w: Vec<f32> = idx.iter().map(|&i| scores[i]).collect();
            let scale = self.cfg.routed_scaling_factor as f32;
            if k > 1 && self.cfg.norm_topk_prob {
                let denom = w.iter().sum::<f32>() + 1e-20;
                w.iter_mut().for_each(|v| *v = *v / denom * scale);
            } else {
                w.iter_mut().for_each(|v| *v *= scale);
            }
            experts.extend(idx.iter().map(|&i| i as u32));
            weights.extend(w);
        }
        Ok(Routing {
            k,
            experts,
            weights,
        })
    }

    /// The top-k experts of one token given its scores.
    fn select(&self, scores: &[f32]) -> Vec<usize> {
        let k = self.cfg.num_experts_per_tok;
        match self.cfg.topk_method {
            TopkMethod::Greedy => top_k(scores, k),
            TopkMethod::GroupLimitedGreedy => {
                let masked = self.mask_groups(scores, |g| {
                    g.iter().copied().fold(f32::NEG_INFINITY, f32::max)
                });
                top_k(&masked, k)
            }
            TopkMethod::NoauxTc => {
                let bias = self.bias.as_deref().unwrap_or(&[]);
                let biased: Vec<f32> = scores.iter().zip(bias).map(|(s, b)| s + b).collect();
                let masked = self.mask_groups(&biased, |g| top_k(g, 2).iter().map(|&i| g[i]).sum());
                top_k(&masked, k)
            }
        }
    }

    /// Keeps the `topk_group` best of `n_group` contiguous groups (by `group_score`),
    /// replacing the values of the other groups with 0.0 as the reference does.
    fn mask_groups(&self, values: &[f32], group_score: impl Fn(&[f32]) -> f32) -> Vec<f32> {
        let size = values.len() / self.cfg.n_group;
        let group_scores: Vec<f32> = values.chunks(size).map(&group_score).collect();
        let keep = top_k(&group_scores, self.cfg.topk_group);
        values
            .iter()
            .enumerate()
            .map(|(i, &v)| if keep.contains(&(i / size)) { v } else { 0.0 })
            .collect()
    }
}

/// A MoE feed-forward layer: gate, routed experts (remote or local), shared experts.
#[derive(Debug)]
pub struct MoeBlock {
    layer: usize,
    gate: Gate,
    shared: Option<Mlp>,
}

impl MoeBlock {
    pub fn new(w: &Weights, layer: usize, hidden: usize, cfg: &MoeConfig) -> error::Result<Self> {
        let shared = if cfg.n_shared_experts > 0 {
            Some(Mlp::new(
                &w.pp("shared_experts"),
                hidden,
                cfg.moe_intermediate_size * cfg.n_shared_experts,
            )?)
        } else {
            None
        };
        Ok(Self {
            layer,
            gate: Gate::new(&w.pp("gate"), hidden, cfg)?,
            shared,
        })
    }

    /// `x`: (tokens, hidden) → (tokens, hidden), with the routing it used.
    pub fn forward(
        &self,
        x: &Tensor,
        experts: &dyn ExpertBackend,
        step: &StepContext,
    ) -> error::Result<(Tensor, Routing)> {
        let routing = self.gate.route(x)?;
        let routed = experts.forward(step, self.layer, x, &routing.routes())?;
        let out = match &self.shared {
            Some(shared) => (routed + shared.forward(x)?)?,
            None => routed,
        };
        Ok((out, routing))
    }

    /// [`forward`](Self::forward) in two halves: routes `x`, starts the routed experts
    /// and computes the shared experts while they run; [`MoePending::finish`] adds them.
    pub fn start<'a>(
        &self,
        x: &Tensor,
        experts: &'a dyn ExpertBackend,
        step: &StepContext,
    ) -> error::Result<(MoePending<'a>, Routing)> {
        let routing = self.gate.route(x)?;
        let routed = experts.start(step, self.layer, x, &routing.routes());
        let shared = self.shared.as_ref().map(|s| s.forward(x)).transpose()?;
        Ok((MoePending { routed, shared }, routing))
    }
}

/// A MoE layer whose routed experts are in flight.
#[derive(Debug)]
pub struct MoePending<'a> {
    routed: PendingExperts<'a>,
    shared: Option<Tensor>,
}

impl MoePending<'_> {
    /// Waits for the routed experts: (tokens, hidden), shared experts added.
    pub fn finish(self) -> error::Result<Tensor> {
        let routed = self.routed.wait()?;
        Ok(match self.shared {
            Some(shared) => (routed + shared)?,
            None => routed,
        })
    }
}

impl crate::held::Held for MoeBlock {
    /// The gate and the shared experts; routed experts are held by an expert backend.
    fn held_bytes(&self) -> usize {
        crate::held::held!(self.gate.weight, self.gate.bias, self.shared)
    }
}
