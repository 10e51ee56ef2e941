//! Linear layers: a weight held as the process chose at load ([`crate::weights::WeightFormat`])
//! and a product that computes in f32 from it.
//!
//! | weight | rows of `x` | kernel |
//! |---|---|---|
//! | row-major | 1 – [`simd::MAX_ROWS`] (AVX2), 1 – [`gemv::MAX_ROWS`] (other CPUs) | [`gemv`]: each weight row streamed once, widened in registers, register tiles of up to 4 rows of `x` × 3 weight rows ([`simd`]) |
//! | row-major | more, up to 128, weights up to 16 M elements, AVX-512 | [`gemv::widened_rows`]: each block of 64 weight rows widened to f32 once in L2, 512-bit register tiles of 8 rows of `x` × 3 weight rows ([`simd512`]) |
//! | row-major | more | [`panels`]: weight panels widened to f32 in L2-sized blocks (f32 read in place), f32 `gemm` |
//! | f32, bf16, f16 packed at load (the language model, AVX-512) | 1 – [`packed::MAX_ROWS`] | [`packed`]: panels of 16 rows stored column by column, 512-bit outer-product register tiles of up to 12 rows of `x` × 2 panels |
//! | the same | more | [`panels`], each panel gathered back to f32 rows |
//!
//! `x` in f32 gives f32 out; any other `x` dtype is computed the same way in f32 and the
//! result cast back, except when `x` and a dense weight share the dtype (candle's product).

pub mod gemv;
pub mod packed;
pub mod panels;
pub mod rows;
pub mod simd;
pub mod simd512;

use std::sync::Arc;

use candle_core::{DType, Result, Storage, Tensor};
use half::{bf16, f16};

use self::packed::{PackedRows, PanelElem};
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
    Packed(Arc<PackedRows>),
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

    /// A weight (out, in) of f32, bf16 or f16 packed for the outer-product kernel
    /// ([`packed`]), its rows given a block at a time by `fill(first, count)`: the
    /// layout for a product that meets from one to a few dozen rows of `x` (the LM
    /// head). Where the CPU lacks that kernel ([`packed::available`]) the rows are
    /// gathered into an ordinary dense weight instead.
    pub fn packed<T, E>(
        n: usize,
        k: usize,
        mut fill: impl FnMut(usize, usize) -> std::result::Result<Vec<T>, E>,
    ) -> std::result::Result<Self, E>
    where
        T: PanelElem + candle_core::WithDType,
        E: From<candle_core::Error>,
    {
        if packed::available() {
            return Ok(Self {
                weight: Weight::Packed(Arc::new(PackedRows::pack(n, k, fill)?)),
            });
        }
        let rows = fill(0, n)?;
        Ok(Self::new(Tensor::from_vec(
            rows,
            (n, k),
            &candle_core::Device::Cpu,
        )?)?)
    }

    /// [`Linear::packed`] from a dense (out, in) CPU tensor of f32, bf16 or f16.
    pub fn pack(weight: &Tensor) -> Result<Self> {
        let (n, k) = weight.dims2()?;
        let rows = |r: usize, c: usize| weight.narrow(0, r, c)?.flatten_all();
        match weight.dtype() {
            DType::F32 => Self::packed(n, k, |r, c| rows(r, c)?.to_vec1::<f32>()),
            DType::BF16 => Self::packed(n, k, |r, c| rows(r, c)?.to_vec1::<bf16>()),
            DType::F16 => Self::packed(n, k, |r, c| rows(r, c)?.to_vec1::<f16>()),
            other => candle_core::bail!("linear: packed weights in {other:?} are not supported"),
        }
    }

    /// (out, in).
    pub fn dims(&self) -> (usize, usize) {
        match &self.weight {
            Weight::Dense(t) => t.dims2().unwrap_or_default(),
            Weight::Int8(q) => (q.n, q.k),
            Weight::Packed(p) => p.dims(),
        }
    }

    /// How the weight is held: `f32`, `bf16`, `f16` or `int8`.
    pub fn format(&self) -> &'static str {
        match &self.weight {
            Weight::Dense(t) => t.dtype().as_str(),
            Weight::Int8(_) => "int8",
            Weight::Packed(p) => p.format(),
        }
    }

    /// Whether the weight is packed for the outer-product kernel ([`packed`]).
    pub fn is_packed(&self) -> bool {
        matches!(self.weight, Weight::Packed(_))
    }

    /// Bytes the weight holds.
    pub fn bytes(&self) -> usize {
        match &self.weight {
            Weight::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Weight::Int8(q) => q.bytes(),
            Weight::Packed(p) => p.bytes(),
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
            Weight::Packed(p) => Tensor::from_vec(p.unpack(), p.dims(), &candle_core::Device::Cpu),
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
            if (x.dtype() == w.dtype() && x.dtype() != DType::F32)
                || !crate::ops::cpu_kernels(x.device())
            {
                return crate::ops::matmul(x, &w.to_dtype(x.dtype())?.t()?);
            }
        }
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        let out = with_f32(&x, |xs| match &self.weight {
            Weight::Dense(w) => Ok(with_dense!(w, |rows| product(xs, m, rows))),
            Weight::Int8(q) => Ok(product(xs, m, q.as_ref())),
            Weight::Packed(p) if m > packed::MAX_ROWS => Ok(p.many_rows_product(xs)),
            Weight::Packed(p) => match p.product(xs, m) {
                Some(out) => Ok(out),
                None => candle_core::bail!("linear: packed weights need AVX-512F"),
            },
        })?;
        Tensor::from_vec(out, (m, n), x.device())?.to_dtype(dtype)
    }

    /// `x · wᵀ + b`.
    pub fn forward_bias(&self, x: &Tensor, b: &Tensor) -> Result<Tensor> {
        self.forward(x)?.broadcast_add(b)
    }
}

/// The products `xs · wᵀ` of several layers with a few rows of `x` each (every routed
/// expert of a decode step, an MLP's gate and up), computed in one parallel pass over
/// the blocks of all their weights: the same kernel and the same sums as each one's
/// [`Linear::forward`], without a hand-off between threads per product. Each `xs` is
/// (m, k) row-major f32 with 1 ≤ m ≤ [`gemv::max_rows`]; each result is (m, n).
/// `None` when some product is outside that range (the caller then runs them one by one).
pub fn small_products(jobs: &[(&Linear, &[f32])]) -> Result<Option<Vec<Vec<f32>>>> {
    use rayon::prelude::*;
    if !jobs.is_empty() && jobs.iter().all(|(w, _)| w.is_packed()) {
        return Ok(packed_products(jobs));
    }
    let mut shapes = Vec::with_capacity(jobs.len());
    for (w, xs) in jobs {
        let (n, k) = w.dims();
        let m = xs.len().checked_div(k).unwrap_or(0);
        let cpu = match &w.weight {
            Weight::Dense(t) => crate::ops::cpu_kernels(t.device()),
            Weight::Int8(_) => true,
            Weight::Packed(_) => return Ok(None),
        };
        if !cpu || n == 0 || m == 0 || m * k != xs.len() || m > gemv::max_rows() {
            return Ok(None);
        }
        shapes.push((n, m));
    }
    let mut outs: Vec<Vec<f32>> = shapes.iter().map(|&(n, m)| vec![0f32; n * m]).collect();
    let mut tasks = Vec::new();
    for (j, out) in outs.iter_mut().enumerate() {
        let m = shapes[j].1;
        for (t, chunk) in out.chunks_mut(gemv::ROWS_PER_TASK * m).enumerate() {
            tasks.push((j, t * gemv::ROWS_PER_TASK, chunk));
        }
    }
    tasks
        .into_par_iter()
        .try_for_each(|(j, first, out)| -> Result<()> {
            let (layer, xs) = jobs[j];
            match &layer.weight {
                Weight::Dense(w) => with_dense!(w, |rows| gemv::block(rows, xs, first, out)),
                Weight::Int8(q) => gemv::block(q.as_ref(), xs, first, out),
                Weight::Packed(_) => unreachable!("packed weights are refused above"),
            }
            Ok(())
        })?;
    Ok(Some(
        outs.iter()
            .zip(&shapes)
            .map(|(o, &(n, m))| gemv::transpose(o, n, m))
            .collect(),
    ))
}

/// Most rows of `x` per product that [`small_products`] takes on this CPU (more when
/// the weights are packed).
pub fn small_products_max_rows() -> usize {
    if packed::available() {
        packed::MAX_ROWS.max(gemv::max_rows())
    } else {
        gemv::max_rows()
    }
}

/// [`small_products`] of packed weights: one parallel pass over every panel block of
/// every weight, each writing its columns of its product's rows.
fn packed_products(jobs: &[(&Linear, &[f32])]) -> Option<Vec<Vec<f32>>> {
    use rayon::prelude::*;
    if !packed::available() {
        return None;
    }
    let mut prepared = Vec::with_capacity(jobs.len());
    for (w, xs) in jobs {
        let Weight::Packed(p) = &w.weight else {
            return None;
        };
        let (_, k) = p.dims();
        let m = xs.len().checked_div(k).unwrap_or(0);
        if m == 0 || m * k != xs.len() || m > packed::MAX_ROWS {
            return None;
        }
        prepared.push((p.as_ref(), packed::GroupedX::new(xs, m, k), m));
    }
    let mut outs: Vec<Vec<f32>> = prepared
        .iter()
        .map(|(p, _, m)| vec![0f32; m * p.dims().0])
        .collect();
    let ptrs: Vec<_> = outs
        .iter_mut()
        .map(|o| panels::SendPtr(o.as_mut_ptr()))
        .collect();
    let tasks: Vec<(usize, usize)> = prepared
        .iter()
        .enumerate()
        .flat_map(|(j, (p, _, _))| (0..p.tasks()).map(move |t| (j, t)))
        .collect();
    tasks.into_par_iter().for_each(|(j, t)| {
        let (p, x, _) = &prepared[j];
        // SAFETY: the kernel runs here (checked above); `outs[j]` is (m, n) for job j,
        // and each (job, task) pair writes its own columns of it.
        #[allow(unsafe_code)]
        unsafe {
            p.task(x, t, ptrs[j])
        };
    });
    Some(outs)
}

/// Most rows of `x` for [`gemv::widened_rows`]: up to here (an expert's share of a
/// prompt) it runs the expert-sized products 1.2–1.7× faster than the panels
/// (`cargo bench -p tessera-model --bench linear`); at 256 rows the panels catch up.
const WIDENED_MAX_ROWS: usize = 128;

/// Largest weight (elements) for [`gemv::widened_rows`]: on the LM head the panels stay
/// ahead.
const WIDENED_MAX_WEIGHTS: usize = 1 << 24;

/// The kernel for `m` rows.
fn product<R: WeightRows>(xs: &[f32], m: usize, w: &R) -> Vec<f32> {
    if m == 0 || w.rows() == 0 || w.cols() == 0 {
        return vec![0f32; m * w.rows()];
    }
    if m <= gemv::max_rows() {
        gemv::small_rows(xs, w)
    } else if m <= WIDENED_MAX_ROWS
        && w.rows() * w.cols() <= WIDENED_MAX_WEIGHTS
        && let Some(out) = gemv::widened_rows(xs, w)
    {
        out
    } else {
        panels::product(xs, w)
    }
}

/// Runs `f` on the values of a contiguous f32 CPU tensor.
fn with_f32<T>(x: &Tensor, f: impl FnOnce(&[f32]) -> Result<T>) -> Result<T> {
    crate::ops::with_f32_slice(x, f)?
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    /// Deterministic values in [-1, 1) (a 64-bit LCG).
    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 23) as f32) - 1.0
            })
            .collect()
    }

    fn tensor(rows: usize, cols: usize, seed: u64) -> Tensor {
        Tensor::from_vec(values(rows * cols, seed), (rows, cols), &Device::Cpu).unwrap()
    }

    /// The layers under test for one f32 weight: as f32, bf16, f16 and int8.
    fn layers(w: &Tensor) -> Vec<Linear> {
        vec![
            Linear::new(w.clone()).unwrap(),
            Linear::new(w.to_dtype(DType::BF16).unwrap()).unwrap(),
            Linear::new(w.to_dtype(DType::F16).unwrap()).unwrap(),
            Linear::int8(w).unwrap(),
        ]
    }

    /// `forward` equals candle's f32 product of the widened weight, for the decode
    /// kernel (every register tile shape: groups of 1–4 rows of `x`, weight rows in
    /// threes with one or two left over), the widened rows (33 ≤ m ≤ 128 with AVX-512)
    /// and the panels, at widths that are not multiples of the SIMD width, the int8
    /// block or the panel.
    #[test]
    fn every_format_equals_the_product_of_its_widened_weight() {
        for (n, k) in [
            (1usize, 1usize),
            (7, 31),
            (70, 133),
            (37, 588),
            (530, 97),
            (20, 4304),
        ] {
            let w = tensor(n, k, (n * 1000 + k) as u64);
            for layer in layers(&w) {
                let dense = layer.to_dense().unwrap().to_dtype(DType::F32).unwrap();
                for m in [1usize, 2, 3, 4, 5, 6, 7, 17, 32, 33, 64, 127, 128, 129, 600] {
                    let x = tensor(m, k, m as u64);
                    let got = layer.forward(&x).unwrap();
                    assert_eq!(got.dims2().unwrap(), (m, n));
                    let want = x.matmul(&dense.t().unwrap()).unwrap();
                    let bound = x
                        .abs()
                        .unwrap()
                        .matmul(&dense.abs().unwrap().t().unwrap())
                        .unwrap();
                    let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    let bound = bound.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    for (i, ((g, w), b)) in got.iter().zip(&want).zip(&bound).enumerate() {
                        // Both sum the same f32 products in different orders.
                        let tol = 1e-6 * (k as f32).sqrt() * b.max(1.0);
                        assert!(
                            (g - w).abs() <= tol,
                            "{} weight ({n}, {k}), m {m}: element {i} is {g}, the product {w} (tolerance {tol})",
                            layer.format()
                        );
                    }
                }
            }
        }
    }

    /// Products computed together give each product's own [`Linear::forward`] bit for
    /// bit, for every format and a different number of rows each; more rows than the
    /// decode kernel takes are refused.
    #[test]
    fn small_products_equal_each_forward() {
        let k = 133;
        let layers: Vec<Linear> = layers(&tensor(70, k, 1))
            .into_iter()
            .chain(layers(&tensor(530, k, 2)))
            .collect();
        let xs: Vec<Vec<f32>> = (0..layers.len())
            .map(|i| values((i % 5 + 1) * k, i as u64 + 40))
            .collect();
        let jobs: Vec<_> = layers.iter().zip(&xs).map(|(l, x)| (l, &x[..])).collect();
        let got = small_products(&jobs).unwrap().unwrap();
        for ((layer, x), got) in jobs.iter().zip(&got) {
            let m = x.len() / k;
            let x = Tensor::from_vec(x.to_vec(), (m, k), &Device::Cpu).unwrap();
            let want = layer.forward(&x).unwrap().flatten_all().unwrap();
            assert_eq!(
                got,
                &want.to_vec1::<f32>().unwrap(),
                "{} weight, m {m}",
                layer.format()
            );
        }
        let many = values((gemv::max_rows() + 1) * k, 9);
        assert!(
            small_products(&[(&layers[0], &many[..])])
                .unwrap()
                .is_none()
        );
    }

    /// Every int8 value is within half a step of its block's scale of the weight, the
    /// scale is the block's absmax / 127, and an all-zero block stays zero.
    #[test]
    fn int8_round_trip_is_within_half_a_step_of_each_block() {
        let (n, k) = (9usize, 100usize);
        let mut w = values(n * k, 7);
        w[k..2 * k].fill(0.0);
        w[5 * k + 3] = 40.0; // one large value only coarsens its own block
        let t = Tensor::from_vec(w.clone(), (n, k), &Device::Cpu).unwrap();
        let layer = Linear::int8(&t).unwrap();
        assert_eq!(layer.format(), "int8");
        assert_eq!(layer.bytes(), n * k + 4 * n * k.div_ceil(rows::INT8_BLOCK));
        let back = layer
            .to_dense()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for r in 0..n {
            for (b, block) in w[r * k..(r + 1) * k].chunks(rows::INT8_BLOCK).enumerate() {
                let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                let step = max / 127.0;
                for (c, &v) in block.iter().enumerate() {
                    let i = r * k + b * rows::INT8_BLOCK + c;
                    assert!(
                        (back[i] - v).abs() <= step / 2.0 + 1e-7,
                        "row {r} column {}: {v} came back as {}",
                        b * rows::INT8_BLOCK + c,
                        back[i]
                    );
                }
            }
        }
        assert!(back[k..2 * k].iter().all(|&v| v == 0.0));
        assert_eq!(back[5 * k + 3], 40.0);
    }

    /// Held bytes follow the format; bf16 and f16 hold the tensor itself, not a copy.
    #[test]
    fn held_bytes_follow_the_format() {
        let w = tensor(64, 96, 3);
        let sizes: Vec<_> = layers(&w).iter().map(|l| (l.format(), l.bytes())).collect();
        assert_eq!(
            sizes,
            [
                ("f32", 64 * 96 * 4),
                ("bf16", 64 * 96 * 2),
                ("f16", 64 * 96 * 2),
                ("int8", 64 * 96 + 64 * 3 * 4)
            ]
        );
    }

    /// An `x` in another dtype is computed in f32 and returned in its own dtype; a
    /// width mismatch is an error naming both widths.
    #[test]
    fn other_input_dtypes_and_wrong_widths() {
        let w = tensor(12, 40, 11);
        let x = tensor(6, 40, 12);
        for layer in layers(&w) {
            let want = layer.forward(&x).unwrap();
            for dtype in [DType::BF16, DType::F16] {
                let got = layer.forward(&x.to_dtype(dtype).unwrap()).unwrap();
                assert_eq!(got.dtype(), dtype);
                let diff = (got.to_dtype(DType::F32).unwrap() - &want)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(
                    diff < 0.1,
                    "{} weight, {dtype:?} x: off by {diff}",
                    layer.format()
                );
            }
            let err = layer.forward(&tensor(2, 41, 1)).unwrap_err().to_string();
            assert!(err.contains("41") && err.contains("40"), "{err}");
        }
    }
}
