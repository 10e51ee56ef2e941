//! The gated SiLU MLP used for dense layers, routed experts and shared experts
//! (`DeepseekV2MLP` in `modeling_deepseek.py`: `down(silu(gate(x)) ⊙ up(x))`, no biases).

use candle_core::{Result, Tensor};

use crate::error;
use crate::linear::Linear;
use crate::weights::Weights;

/// `down(silu(gate(x)) ⊙ up(x))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    /// Loads `gate_proj`, `up_proj`, `down_proj` below `w` for the given widths.
    pub fn new(w: &Weights, hidden: usize, intermediate: usize) -> error::Result<Self> {
        Ok(Self {
            gate_proj: w.linear("gate_proj.weight", &[intermediate, hidden])?,
            up_proj: w.linear("up_proj.weight", &[intermediate, hidden])?,
            down_proj: w.linear("down_proj.weight", &[hidden, intermediate])?,
        })
    }

    /// `xs`: (rows, hidden) → (rows, hidden).
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let gate = candle_nn::ops::silu(&self.gate_proj.forward(xs)?)?;
        let up = self.up_proj.forward(xs)?;
        self.down_proj.forward(&(gate * up)?)
    }

    /// Bytes held by the three matrices.
    pub fn bytes(&self) -> usize {
        [&self.gate_proj, &self.up_proj, &self.down_proj]
            .iter()
            .map(|l| l.bytes())
            .sum()
    }
}

impl crate::held::Held for Mlp {
    fn held_bytes(&self) -> usize {
        self.bytes()
    }
}
