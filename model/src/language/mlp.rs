//! The gated SiLU MLP used for dense layers, routed experts and shared experts
//! (`DeepseekV2MLP` in `modeling_deepseek.py`: `down(silu(gate(x)) ⊙ up(x))`, no biases).

use candle_core::{Result, Tensor};

use crate::error;
use crate::ops::linear;
use crate::weights::Weights;

/// `down(silu(gate(x)) ⊙ up(x))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    gate_proj: Tensor,
    up_proj: Tensor,
    down_proj: Tensor,
}

impl Mlp {
    /// Loads `gate_proj`, `up_proj`, `down_proj` below `w` for the given widths.
    pub fn new(w: &Weights, hidden: usize, intermediate: usize) -> error::Result<Self> {
        Ok(Self {
            gate_proj: w.get("gate_proj.weight", &[intermediate, hidden])?,
            up_proj: w.get("up_proj.weight", &[intermediate, hidden])?,
            down_proj: w.get("down_proj.weight", &[hidden, intermediate])?,
        })
    }

    /// `xs`: (rows, hidden) → (rows, hidden).
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let gate = candle_nn::ops::silu(&linear(xs, &self.gate_proj)?)?;
        let up = linear(xs, &self.up_proj)?;
        linear(&(gate * up)?, &self.down_proj)
    }

    /// Bytes held by the three matrices.
    pub fn bytes(&self) -> usize {
        [&self.gate_proj, &self.up_proj, &self.down_proj]
            .iter()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }
}
