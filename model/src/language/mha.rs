//! Plain multi-head attention of DeepSeek-VL2-Tiny (`use_mla: false`), as transformers
//! 4.38's `LlamaAttention` (reference-spec §4.2): rotate-half RoPE over the whole head.

use candle_core::{Result, Tensor};

use super::attention::{StepContext, attend};
use super::kv_cache::Rows;
use crate::error;
use crate::ops::linear;
use crate::weights::Weights;

#[derive(Debug)]
pub struct MhaAttention {
    q_proj: Tensor,
    k_proj: Tensor,
    v_proj: Tensor,
    o_proj: Tensor,
    heads: usize,
    head_dim: usize,
    scale: f64,
}

impl MhaAttention {
    pub fn new(
        w: &Weights,
        hidden: usize,
        heads: usize,
        head_dim: usize,
        scale: f64,
    ) -> error::Result<Self> {
        let width = heads * head_dim;
        Ok(Self {
            q_proj: w.get("q_proj.weight", &[width, hidden])?,
            k_proj: w.get("k_proj.weight", &[width, hidden])?,
            v_proj: w.get("v_proj.weight", &[width, hidden])?,
            o_proj: w.get("o_proj.weight", &[hidden, width])?,
            heads,
            head_dim,
            scale,
        })
    }

    /// (tokens, heads·head_dim) → (1, heads, tokens, head_dim)
    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let t = x.dim(0)?;
        x.reshape((t, self.heads, self.head_dim))?
            .transpose(0, 1)?
            .unsqueeze(0)?
            .contiguous()
    }

    pub fn forward(
        &self,
        x: &Tensor,
        step: &StepContext,
        k_cache: &mut Rows,
        v_cache: &mut Rows,
    ) -> Result<Tensor> {
        let t = x.dim(0)?;
        let q = candle_nn::rotary_emb::rope(
            &self.split_heads(&linear(x, &self.q_proj)?)?,
            &step.cos,
            &step.sin,
        )?;
        let k = candle_nn::rotary_emb::rope(
            &self.split_heads(&linear(x, &self.k_proj)?)?,
            &step.cos,
            &step.sin,
        )?;
        let v = linear(x, &self.v_proj)?;
        // Cache post-RoPE keys and values as token rows: (tokens, heads·head_dim).
        k_cache.append(
            &k.squeeze(0)?
                .transpose(0, 1)?
                .reshape((t, self.heads * self.head_dim))?,
        )?;
        v_cache.append(&v)?;
        let s = k_cache.view()?.dim(0)?;
        // (s, heads·head_dim) → (heads, s, head_dim)
        let keys = k_cache
            .view()?
            .reshape((s, self.heads, self.head_dim))?
            .transpose(0, 1)?;
        let values = v_cache
            .view()?
            .reshape((s, self.heads, self.head_dim))?
            .transpose(0, 1)?;
        let out = attend(
            &q.squeeze(0)?,
            &keys,
            &values,
            self.scale,
            step.mask.as_ref(),
        )?; // (heads, t, head_dim)
        let out = out
            .transpose(0, 1)?
            .reshape((t, self.heads * self.head_dim))?;
        linear(&out, &self.o_proj)
    }
}
