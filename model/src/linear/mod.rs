//! Linear layers: a weight held as the process chose at load ([`crate::weights::WeightFormat`])
//! and a product that computes in f32 from it.
//!
//! | weight | rows of `x` | kernel |
//! |---|---|---|
//! | any | 1 – [`gemv::MAX_ROWS`] | [`gemv`]: each weight row streamed once, widened inside the dot product |
//! | bf16, f16, int8 | more | [`panels`]: weight panels widened to f32 in L2-sized blocks, f32 `gemm` |
//! | f32 | more | candle's matrix multiply |
//!
//! `x` in f32 gives f32 out; any other `x` dtype is computed the same way in f32 and the
//! result cast back, except when `x` and a dense weight share the dtype (candle's product).

pub mod gemv;
pub mod panels;
pub mod rows;

use std::sync::Arc;

use candle_core::{DType, Result, Storage, Tensor};
use half::{bf16, f16};

use self::rows::{Dense, Int8Rows, WeightRows};

/// Evaluates `$body` with `$rows` bound to the [`Dense`] rows of a contiguous (n, k)
/// f32, bf16 or f16 CPU tensor `$w` (a closure cannot be generic over the element type).
macro_rules! with_dense {
    ($w:expr, |$rows:ident| $body:expr) => {{
        let w: &Tensor = $w;
        let (_, k) = w.dims2()?;
        let (storage, layout) = w.storage_and_layout();
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("linear: the weight is not contiguous");
        };
        let Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("linear: the weight is not on the CPU");
        };
        match w.dtype() {
            DType::F32 => {
                let $rows = &Dense {
                    data: &cpu.as_slice::<f32>()?[start..end],
                    k,
                };
                $body
            }
            DType::BF16 => {
                let $rows = &Dense {
                    data: &cpu.as_slice::<bf16>()?[start..end],
                    k,
                };
                $body
            }
            DType::F16 => {
                let $rows = &Dense {
                    data: &cpu.as_slice::<f16>()?[start..end],
                    k,
                };
                $body
            }
            other => candle_core::bail!("linear: weights in {other:?} are not supported"),
        }
    }};
}

/// The weight (out, in) of a linear layer without bias.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
}

#[derive(Debug, Clone)]
enum Weight {
    /// A contiguous (out, in) tensor of f32, bf16 or f16 (or, computing in another dtype,
    /// that dtype).
    Dense(Tensor),
    Int8(Arc<Int8Rows>),
}

impl Linear {
    /// A dense weight (out, in), made contiguous.
    pub fn new(weight: Tensor) -> Result<Self> {
        weight.dims2()?;
        Ok(Self {
            weight: Weight::Dense(weight.contiguous()?),
        })
    }

    /// `weight` (out, in) quantized to int8 with one scale per 32 columns of a row, read
    /// one row at a time (no f32 copy of the whole matrix).
    pub fn int8(weight: &Tensor) -> Result<Self> {
        let (n, k) = weight.dims2()?;
        let weight = weight.contiguous()?;
        let q = with_dense!(&weight, |rows| Int8Rows::quantize(n, k, |r, buf| rows
            .widen_row(r, buf)));
        Ok(Self {
            weight: Weight::Int8(Arc::new(q)),
        })
    }

    /// (out, in).
    pub fn dims(&self) -> (usize, usize) {
        match &self.weight {
            Weight::Dense(t) => t.dims2().unwrap_or_default(),
            Weight::Int8(q) => (q.n, q.k),
        }
    }

    /// How the weight is held: `f32`, `bf16`, `f16` or `int8`.
    pub fn format(&self) -> &'static str {
        match &self.weight {
            Weight::Dense(t) => t.dtype().as_str(),
            Weight::Int8(_) => "int8",
        }
    }

    /// Bytes the weight holds.
    pub fn bytes(&self) -> usize {
        match &self.weight {
            Weight::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Weight::Int8(q) => q.bytes(),
        }
    }

    /// The weight as a dense tensor: itself, or the int8 values widened (for inspection).
    pub fn to_dense(&self) -> Result<Tensor> {
        match &self.weight {
            Weight::Dense(t) => Ok(t.clone()),
            Weight::Int8(q) => {
                let mut out = vec![0f32; q.n * q.k];
                for (r, row) in out.chunks_exact_mut(q.k.max(1)).enumerate() {
                    q.widen_row(r, row);
                }
                Tensor::from_vec(out, (q.n, q.k), &candle_core::Device::Cpu)
            }
        }
    }

    /// `x · wᵀ` for `x` (rows, in): (rows, out) in `x`'s dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (m, k) = x.dims2()?;
        let (n, k_w) = self.dims();
        if k != k_w {
            candle_core::bail!("linear: x has {k} columns, the weight ({n}, {k_w})");
        }
        if let Weight::Dense(w) = &self.weight {
            let f32_matmul =
                x.dtype() == DType::F32 && w.dtype() == DType::F32 && m > gemv::MAX_ROWS;
            if f32_matmul
                || (x.dtype() == w.dtype() && x.dtype() != DType::F32)
                || !x.device().is_cpu()
            {
                return x.matmul(&w.to_dtype(x.dtype())?.t()?);
            }
        }
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        let out = with_f32(&x, |xs| match &self.weight {
            Weight::Dense(w) => Ok(with_dense!(w, |rows| product(xs, m, rows))),
            Weight::Int8(q) => Ok(product(xs, m, q.as_ref())),
        })?;
        Tensor::from_vec(out, (m, n), x.device())?.to_dtype(dtype)
    }

    /// `x · wᵀ + b`.
    pub fn forward_bias(&self, x: &Tensor, b: &Tensor) -> Result<Tensor> {
        self.forward(x)?.broadcast_add(b)
    }
}

/// The kernel for `m` rows.
fn product<R: WeightRows>(xs: &[f32], m: usize, w: &R) -> Vec<f32> {
    if m <= gemv::MAX_ROWS {
        gemv::small_rows(xs, w)
    } else {
        panels::product(xs, w)
    }
}

/// Runs `f` on the values of a contiguous f32 CPU tensor.
fn with_f32<T>(x: &Tensor, f: impl FnOnce(&[f32]) -> Result<T>) -> Result<T> {
    let (storage, layout) = x.storage_and_layout();
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("linear: x is not contiguous");
    };
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("linear: x is not on the CPU");
    };
    f(&cpu.as_slice::<f32>()?[start..end])
}
