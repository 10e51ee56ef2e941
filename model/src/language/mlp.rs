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
            gate_proj: w.linear_packed("gate_proj.weight", &[intermediate, hidden])?,
            up_proj: w.linear_packed("up_proj.weight", &[intermediate, hidden])?,
            down_proj: w.linear_packed("down_proj.weight", &[hidden, intermediate])?,
        })
    }

    /// `xs`: (rows, hidden) → (rows, hidden).
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (rows, hidden) = xs.dims2()?;
        if xs.dtype() == candle_core::DType::F32 && crate::ops::cpu_kernels(xs.device()) {
            let xs = xs.contiguous()?;
            let out = crate::ops::with_f32_slice(&xs, |x| Self::forward_small(&[(self, x)]))??;
            if let Some(mut out) = out {
                let out = out.pop().expect("one MLP");
                return Tensor::from_vec(out, (rows, hidden), xs.device());
            }
        }
        let gate = candle_nn::ops::silu(&self.gate_proj.forward(xs)?)?;
        let up = self.up_proj.forward(xs)?;
        self.down_proj.forward(&(gate * up)?)
    }

    /// Several MLPs, each on its own few rows (`(mlp, xs)` with `xs` (m, hidden)
    /// row-major f32, m ≤ [`crate::linear::gemv::max_rows`]), in two parallel passes:
    /// every gate and up product, then every down product
    /// ([`crate::linear::small_products`]). The same values as each one's
    /// [`forward`](Self::forward); `None` when some rows are outside that range.
    pub fn forward_small(mlps: &[(&Mlp, &[f32])]) -> Result<Option<Vec<Vec<f32>>>> {
        let jobs: Vec<_> = mlps
            .iter()
            .flat_map(|&(mlp, xs)| [(&mlp.gate_proj, xs), (&mlp.up_proj, xs)])
            .collect();
        let Some(gate_up) = crate::linear::small_products(&jobs)? else {
            return Ok(None);
        };
        // silu(gate) ⊙ up, with candle's f32 silu: v / (1 + e^−v).
        let hidden: Vec<Vec<f32>> = gate_up
            .chunks_exact(2)
            .map(|pair| {
                pair[0]
                    .iter()
                    .zip(&pair[1])
                    .map(|(&g, &u)| g / (1.0 + (-g).exp()) * u)
                    .collect()
            })
            .collect();
        let jobs: Vec<_> = mlps
            .iter()
            .zip(&hidden)
            .map(|(&(mlp, _), h)| (&mlp.down_proj, &h[..]))
            .collect();
        crate::linear::small_products(&jobs)
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
