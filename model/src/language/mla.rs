//! Multi-head latent attention of DeepSeek-VL2-Small/Base (`DeepseekV2Attention` in
//! `modeling_deepseek.py`).
//!
//! Only the normalised latent `c` and the post-RoPE shared key `k_pe` are cached. A step
//! with many tokens (prefill) expands the latents into per-head keys and values for that
//! step only; a step with few tokens (decode) runs the absorbed form, scoring queries
//! directly against the cached latents (`q_nope·W_UK` vs `c`, output `(p·c)·W_UVᵀ`), so
//! per-head K/V are never materialised for the cache. RoPE rotates interleaved pairs.
//!
//! A step runs in three parts so a batch of sequences can share the projections:
//! [`MlaAttention::project`] over every token of the batch, [`MlaAttention::attend`]
//! per sequence against its cached latents, [`MlaAttention::output`] over the batch.

use candle_core::{D, Result, Tensor};

use super::attention::attend;
use crate::config::AttentionConfig;
use crate::error::{self, Error};
use crate::linear::Linear;
use crate::ops::{matmul, rms_norm, softmax_f32};
use crate::weights::Weights;

/// `q_a_layernorm` / `kv_a_layernorm` use this epsilon whatever `rms_norm_eps` says
/// (`DeepseekV2Attention` builds them as `DeepseekV2RMSNorm` with its default `eps=1e-6`).
const LATENT_NORM_EPS: f64 = 1e-6;

#[derive(Debug)]
enum QueryProjection {
    Direct(Linear),
    LowRank { a: Linear, norm: Tensor, b: Linear },
}

/// The queries of a step: the no-RoPE part and the rotated part, per head.
#[derive(Debug, Clone)]
pub struct MlaQueries {
    /// (heads, tokens, qk_nope_head_dim)
    pub nope: Tensor,
    /// (heads, tokens, qk_rope_head_dim), post-RoPE
    pub pe: Tensor,
}

impl MlaQueries {
    /// Tokens `start..start + len` of the step.
    pub fn narrow(&self, start: usize, len: usize) -> Result<Self> {
        Ok(Self {
            nope: self.nope.narrow(1, start, len)?,
            pe: self.pe.narrow(1, start, len)?,
        })
    }
}

#[derive(Debug)]
pub struct MlaAttention {
    q: QueryProjection,
    kv_a_proj: Linear,
    kv_a_norm: Tensor,
    /// Held in the compute dtype: attention also reads it per head, as `w_uk` and
    /// `w_uv_t` (heads·(nope+v)·rank values, a few MB per layer).
    kv_b_proj: Linear,
    /// W_UK per head: (heads, nope, rank), a view into `kv_b_proj` (no copy).
    w_uk: Tensor,
    /// W_UVᵀ per head: (heads, rank, v), a view into `kv_b_proj` (no copy).
    w_uv_t: Tensor,
    o_proj: Linear,
    heads: usize,
    nope: usize,
    rope: usize,
    v: usize,
    rank: usize,
    scale: f64,
}

impl MlaAttention {
    pub fn new(
        w: &Weights,
        hidden: usize,
        heads: usize,
        cfg: &AttentionConfig,
        scale: f64,
    ) -> error::Result<Self> {
        let AttentionConfig::Mla {
            q_lora_rank,
            kv_lora_rank: rank,
            qk_nope_head_dim: nope,
            qk_rope_head_dim: rope,
            v_head_dim: v,
        } = *cfg
        else {
            return Err(Error::config(
                "use_mla",
                "MLA attention built from a non-MLA config",
            ));
        };
        let q_width = heads * (nope + rope);
        let q = match q_lora_rank {
            None => QueryProjection::Direct(w.linear_packed("q_proj.weight", &[q_width, hidden])?),
            Some(qr) => QueryProjection::LowRank {
                a: w.linear_packed("q_a_proj.weight", &[qr, hidden])?,
                norm: w.get("q_a_layernorm.weight", &[qr])?,
                b: w.linear_packed("q_b_proj.weight", &[q_width, qr])?,
            },
        };
        let kv_b_proj = w.get("kv_b_proj.weight", &[heads * (nope + v), rank])?;
        // (heads·(nope+v), rank) → (heads, nope+v, rank): rows 0..nope are W_UK, then W_UV.
        let per_head = kv_b_proj.reshape((heads, nope + v, rank))?;
        let w_uk = per_head.narrow(1, 0, nope)?;
        let w_uv_t = per_head.narrow(1, nope, v)?.transpose(1, 2)?;
        Ok(Self {
            q,
            kv_a_proj: w.linear_packed("kv_a_proj_with_mqa.weight", &[rank + rope, hidden])?,
            kv_a_norm: w.get("kv_a_layernorm.weight", &[rank])?,
            kv_b_proj: Linear::new(kv_b_proj)?,
            w_uk,
            w_uv_t,
            o_proj: w.linear_packed("o_proj.weight", &[hidden, heads * v])?,
            heads,
            nope,
            rope,
            v,
            rank,
            scale,
        })
    }

    /// Whether the absorbed form is cheaper for `t` queries over `s` cached tokens.
    fn prefer_absorbed(&self, t: usize, s: usize) -> bool {
        let (h, r) = (self.heads, self.rank);
        let expanded =
            s * r * h * (self.nope + self.v) + h * t * s * (self.nope + self.rope + self.v);
        let absorbed = h * t * self.nope * r + h * t * s * (2 * r + self.rope) + h * t * r * self.v;
        absorbed < expanded
    }

    /// `x` (tokens, hidden) with `cos`/`sin` (tokens, rope/2) of each token's position →
    /// (queries, [c (tokens, kv_lora_rank), k_pe (tokens, qk_rope_head_dim)] to cache).
    pub fn project(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<(MlaQueries, [Tensor; 2])> {
        let t = x.dim(0)?;
        let (h, dq) = (self.heads, self.nope + self.rope);
        let q = match &self.q {
            QueryProjection::Direct(w) => w.forward(x)?,
            QueryProjection::LowRank { a, norm, b } => {
                b.forward(&rms_norm(&a.forward(x)?, norm, LATENT_NORM_EPS)?)?
            }
        };
        let q = q.reshape((t, h, dq))?.transpose(0, 1)?; // (heads, t, nope+rope)
        let nope = q.narrow(D::Minus1, 0, self.nope)?.contiguous()?;
        let q_pe = q
            .narrow(D::Minus1, self.nope, self.rope)?
            .contiguous()?
            .unsqueeze(0)?;
        let pe = candle_nn::rotary_emb::rope_i(&q_pe, cos, sin)?.squeeze(0)?; // (heads, t, rope)

        let kv_a = self.kv_a_proj.forward(x)?; // (t, rank+rope)
        let c = rms_norm(
            &kv_a.narrow(1, 0, self.rank)?,
            &self.kv_a_norm,
            LATENT_NORM_EPS,
        )?;
        let k_pe = kv_a
            .narrow(1, self.rank, self.rope)?
            .contiguous()?
            .reshape((1, 1, t, self.rope))?;
        let k_pe = candle_nn::rotary_emb::rope_i(&k_pe, cos, sin)?.reshape((t, self.rope))?;
        Ok((MlaQueries { nope, pe }, [c, k_pe]))
    }

    /// One sequence's queries against its cached latents `c` (s, rank) and `k_pe`
    /// (s, rope) → (t, heads·v_head_dim).
    pub fn attend(
        &self,
        q: &MlaQueries,
        c: &Tensor,
        k_pe: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (t, s) = (q.nope.dim(1)?, c.dim(0)?);
        let out = if self.prefer_absorbed(t, s) {
            self.absorbed(&q.nope, &q.pe, c, k_pe, mask)?
        } else {
            self.expanded(&q.nope, &q.pe, c, k_pe, mask)?
        }; // (heads, t, v)
        out.transpose(0, 1)?.reshape((t, self.heads * self.v))
    }

    /// (tokens, heads·v_head_dim) → (tokens, hidden).
    pub fn output(&self, o: &Tensor) -> Result<Tensor> {
        self.o_proj.forward(o)
    }

    /// Per-head K/V for this step only: (heads, t, v).
    fn expanded(
        &self,
        q_nope: &Tensor,
        q_pe: &Tensor,
        c: &Tensor,
        k_pe: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (h, s) = (self.heads, c.dim(0)?);
        let kv = self
            .kv_b_proj
            .forward(c)?
            .reshape((s, h, self.nope + self.v))?
            .transpose(0, 1)?; // (heads, s, nope+v)
        let k_nope = kv.narrow(D::Minus1, 0, self.nope)?;
        let v = kv.narrow(D::Minus1, self.nope, self.v)?;
        let k_pe = k_pe.unsqueeze(0)?.broadcast_as((h, s, self.rope))?;
        let k = Tensor::cat(&[&k_nope, &k_pe], D::Minus1)?; // (heads, s, nope+rope)
        let q = Tensor::cat(&[q_nope, q_pe], D::Minus1)?; // (heads, t, nope+rope)
        attend(&q, &k, &v, self.scale, mask)
    }

    /// Scores against the cached latents directly: (heads, t, v).
    fn absorbed(
        &self,
        q_nope: &Tensor,
        q_pe: &Tensor,
        c: &Tensor,
        k_pe: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (h, t, s) = (self.heads, q_nope.dim(1)?, c.dim(0)?);
        let q_c = matmul(q_nope, &self.w_uk)?; // (heads, t, rank)
        let scores_c = matmul(&q_c.reshape((h * t, self.rank))?, &c.t()?)?; // (heads·t, s)
        let scores_pe = matmul(&q_pe.contiguous()?.reshape((h * t, self.rope))?, &k_pe.t()?)?;
        let scores = ((scores_c + scores_pe)? * self.scale)?.reshape((h, t, s))?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let p = softmax_f32(&scores)?.reshape((h * t, s))?;
        let o_c = matmul(&p, c)?.reshape((h, t, self.rank))?; // (heads, t, rank)
        matmul(&o_c, &self.w_uv_t) // (heads, t, v)
    }
}

impl crate::held::Held for MlaAttention {
    /// `w_uk` and `w_uv_t` are views into `kv_b_proj`'s weight and are not counted.
    fn held_bytes(&self) -> usize {
        let q = match &self.q {
            QueryProjection::Direct(l) => crate::held::held!(l),
            QueryProjection::LowRank { a, norm, b } => crate::held::held!(a, norm, b),
        };
        q + crate::held::held!(self.kv_a_proj, self.kv_a_norm, self.kv_b_proj, self.o_proj)
    }
}
