//! What both attention flavours share: the causal mask, scaled dot-product
//! attention with an f32 softmax, and the split of a step into batch-wide
//! projections and per-sequence attention.

use candle_core::{DType, Device, Result, Tensor};

use super::mha::MhaAttention;
use super::mla::{MlaAttention, MlaQueries};
use crate::ops::softmax_f32;

/// Additive causal mask (len, start + len) for `len` new tokens after `start` cached
/// ones; `None` for a single token (it sees everything).
pub fn causal_mask(
    start: usize,
    len: usize,
    dtype: DType,
    device: &Device,
) -> Result<Option<Tensor>> {
    if len <= 1 {
        return Ok(None);
    }
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
    Ok(Some(
        Tensor::from_vec(mask, (len, total), device)?.to_dtype(dtype)?,
    ))
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
    let scores = (crate::ops::matmul(q, &k.t()?)? * scale)?; // (heads, t, s)
    let scores = match mask {
        Some(m) => scores.broadcast_add(m)?,
        None => scores,
    };
    crate::ops::matmul(&softmax_f32(&scores)?, v)
}

/// The queries of a step's tokens, per head.
#[derive(Debug, Clone)]
pub enum Queries {
    /// (heads, tokens, head_dim), post-RoPE.
    Mha(Tensor),
    Mla(MlaQueries),
}

impl Queries {
    /// Tokens `start..start + len` of the step.
    pub fn narrow(&self, start: usize, len: usize) -> Result<Self> {
        Ok(match self {
            Self::Mha(q) => Self::Mha(q.narrow(1, start, len)?),
            Self::Mla(q) => Self::Mla(q.narrow(start, len)?),
        })
    }
}

/// What [`Attention::project`] produces for a step's tokens.
#[derive(Debug)]
pub struct Projected {
    pub queries: Queries,
    /// The two per-token rows the cache keeps, each (tokens, width): MHA keys and
    /// values, MLA `c` and `k_pe`.
    pub rows: [Tensor; 2],
}

/// One layer's self-attention.
#[derive(Debug)]
pub enum Attention {
    Mha(MhaAttention),
    Mla(MlaAttention),
}

impl Attention {
    /// Projections of `x` (tokens, hidden), normalised, whose positions have the RoPE
    /// tables `cos`/`sin` (tokens, rope/2). The tokens may belong to many sequences.
    pub fn project(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Projected> {
        Ok(match self {
            Self::Mha(a) => {
                let (q, rows) = a.project(x, cos, sin)?;
                Projected {
                    queries: Queries::Mha(q),
                    rows,
                }
            }
            Self::Mla(a) => {
                let (q, rows) = a.project(x, cos, sin)?;
                Projected {
                    queries: Queries::Mla(q),
                    rows,
                }
            }
        })
    }

    /// One sequence's queries against everything it has cached, `cached` (s, width)
    /// each (including this step's rows) → (t, heads·v_head_dim).
    pub fn attend(
        &self,
        q: &Queries,
        cached: [&Tensor; 2],
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        match (self, q) {
            (Self::Mha(a), Queries::Mha(q)) => a.attend(q, cached[0], cached[1], mask),
            (Self::Mla(a), Queries::Mla(q)) => a.attend(q, cached[0], cached[1], mask),
            _ => candle_core::bail!("queries do not match the attention type"),
        }
    }

    /// (tokens, heads·v_head_dim) → (tokens, hidden).
    pub fn output(&self, o: &Tensor) -> Result<Tensor> {
        match self {
            Self::Mha(a) => a.output(o),
            Self::Mla(a) => a.output(o),
        }
    }
}

impl crate::held::Held for Attention {
    fn held_bytes(&self) -> usize {
        match self {
            Attention::Mha(a) => a.held_bytes(),
            Attention::Mla(a) => a.held_bytes(),
        }
    }
}
