//! What both attention flavours share: the per-step context (positions, RoPE tables,
//! causal mask) and scaled dot-product attention with an f32 softmax.

use candle_core::{DType, Device, Result, Tensor};

use super::kv_cache::LayerCache;
use super::mha::MhaAttention;
use super::mla::MlaAttention;
use super::rope::RotaryEmbedding;
use crate::ops::softmax_f32;

/// Positions and tables for one forward step of `len` tokens after `start` cached ones.
#[derive(Debug)]
pub struct StepContext {
    pub start: usize,
    pub len: usize,
    pub cos: Tensor,
    pub sin: Tensor,
    /// Additive causal mask (len, start + len), `None` for a single token.
    pub mask: Option<Tensor>,
}

impl StepContext {
    pub fn new(
        rope: &RotaryEmbedding,
        start: usize,
        len: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let (cos, sin) = rope.tables(start, len, start + len, dtype, device)?;
        let mask = if len > 1 {
            let total = start + len;
            let mask: Vec<f32> = (0..len)
                .flat_map(|t| {
                    (0..total).map(move |s| {
                        if s > start + t {
                            f32::NEG_INFINITY
                        } else {
                            0.0
                        }
                    })
                })
                .collect();
            Some(Tensor::from_vec(mask, (len, total), device)?.to_dtype(dtype)?)
        } else {
            None
        };
        Ok(Self {
            start,
            len,
            cos,
            sin,
            mask,
        })
    }
}

/// `softmax(q kᵀ · scale + mask) v` with the softmax in f32.
/// q: (heads, t, d), k: (heads, s, d), v: (heads, s, dv) → (heads, t, dv).
pub fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let scores = (q.contiguous()?.matmul(&k.t()?)? * scale)?; // (heads, t, s)
    let scores = match mask {
        Some(m) => scores.broadcast_add(m)?,
        None => scores,
    };
    softmax_f32(&scores)?.matmul(&v.contiguous()?)
}

/// One layer's self-attention.
#[derive(Debug)]
pub enum Attention {
    Mha(MhaAttention),
    Mla(MlaAttention),
}

impl Attention {
    /// `x`: (tokens, hidden), already normalised → (tokens, hidden); appends this step's
    /// keys (or latents) to `cache`.
    pub fn forward(
        &self,
        x: &Tensor,
        step: &StepContext,
        cache: &mut LayerCache,
    ) -> Result<Tensor> {
        match (self, cache) {
            (Self::Mha(a), LayerCache::Mha { k, v }) => a.forward(x, step, k, v),
            (Self::Mla(a), LayerCache::Mla { c, k_pe }) => a.forward(x, step, c, k_pe),
            _ => candle_core::bail!("KV cache layout does not match the attention type"),
        }
    }
}
