//! Plain multi-head attention of DeepSeek-VL2-Tiny (`use_mla: false`), as transformers
//! 4.38's `LlamaAttention`: rotate-half RoPE over the whole head.
//!
//! A step runs in three parts so a batch of sequences can share the projections:
//! [`MhaAttention::project`] over every token of the batch, [`MhaAttention::attend`]
//! per sequence against its cached keys and values, [`MhaAttention::output`] over the
//! batch again.

use candle_core::{Result, Tensor};

use super::attention::attend;
use crate::error;
use crate::linear::{Linear, simd};
use crate::weights::Weights;

#[derive(Debug)]
pub struct MhaAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
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
            q_proj: w.linear_packed("q_proj.weight", &[width, hidden])?,
            k_proj: w.linear_packed("k_proj.weight", &[width, hidden])?,
            v_proj: w.linear_packed("v_proj.weight", &[width, hidden])?,
            o_proj: w.linear_packed("o_proj.weight", &[hidden, width])?,
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

    /// `x` (tokens, hidden) with `cos`/`sin` (tokens, head_dim/2) of each token's
    /// position → (queries (heads, tokens, head_dim), [keys, values] to cache, each
    /// (tokens, heads·head_dim), keys post-RoPE).
    pub fn project(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<(Tensor, [Tensor; 2])> {
        let t = x.dim(0)?;
        let q =
            candle_nn::rotary_emb::rope(&self.split_heads(&self.q_proj.forward(x)?)?, cos, sin)?;
        let k =
            candle_nn::rotary_emb::rope(&self.split_heads(&self.k_proj.forward(x)?)?, cos, sin)?;
        let v = self.v_proj.forward(x)?;
        // (1, heads, t, head_dim) → (t, heads·head_dim)
        let k = k
            .squeeze(0)?
            .transpose(0, 1)?
            .reshape((t, self.heads * self.head_dim))?;
        Ok((q.squeeze(0)?, [k, v]))
    }

    /// One sequence's queries (heads, t, head_dim) against its cached keys and values
    /// (s, heads·head_dim) each → (t, heads·head_dim).
    pub fn attend(
        &self,
        q: &Tensor,
        keys: &Tensor,
        values: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (t, s) = (q.dim(1)?, keys.dim(0)?);
        if t == 1 && mask.is_none() {
            if let Some(out) = self.attend_one(q, keys, values)? {
                return Ok(out);
            }
        }
        // (s, heads·head_dim) → (heads, s, head_dim)
        let keys = keys
            .reshape((s, self.heads, self.head_dim))?
            .transpose(0, 1)?;
        let values = values
            .reshape((s, self.heads, self.head_dim))?
            .transpose(0, 1)?;
        let out = attend(q, &keys, &values, self.scale, mask)?; // (heads, t, head_dim)
        out.transpose(0, 1)?
            .reshape((t, self.heads * self.head_dim))
    }

    /// One query token (a decode step) in f32 on the CPU: each head's scores are dot
    /// products with the cached rows read in place, so the keys and values are
    /// streamed once, without the transposed copies a batched matrix multiply of one
    /// row needs. `None` for other dtypes or devices (the general path then runs).
    fn attend_one(&self, q: &Tensor, keys: &Tensor, values: &Tensor) -> Result<Option<Tensor>> {
        use rayon::prelude::*;
        let f32_cpu = |t: &Tensor| {
            t.dtype() == candle_core::DType::F32 && crate::ops::cpu_kernels(t.device())
        };
        if !(f32_cpu(q) && f32_cpu(keys) && f32_cpu(values)) {
            return Ok(None);
        }
        let (hd, width) = (self.head_dim, self.heads * self.head_dim);
        let q = q.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let (keys, values) = (keys.contiguous()?, values.contiguous()?);
        let out = crate::ops::with_f32_slices(&keys, &values, |k, v| {
            let s = k.len() / width;
            let mut out = vec![0f32; width];
            out.par_chunks_mut(hd).enumerate().for_each(|(h, out)| {
                let qh = &q[h * hd..(h + 1) * hd];
                let mut scores = vec![0f32; s];
                simd::strided_dots(qh, &k[h * hd..], width, &mut scores);
                for v in &mut scores {
                    *v *= self.scale as f32;
                }
                crate::ops::softmax_in_place(&mut scores);
                simd::strided_axpys(&scores, &v[h * hd..], width, out);
            });
            out
        })?;
        Ok(Some(Tensor::from_vec(
            out,
            (1, width),
            &candle_core::Device::Cpu,
        )?))
    }

    /// (tokens, heads·head_dim) → (tokens, hidden).
    pub fn output(&self, o: &Tensor) -> Result<Tensor> {
        self.o_proj.forward(o)
    }
}

impl crate::held::Held for MhaAttention {
    fn held_bytes(&self) -> usize {
        crate::held::held!(self.q_proj, self.k_proj, self.v_proj, self.o_proj)
    }
}
