//! `x · wᵀ` for a few rows of `x` (decode steps): each row of `w` is read once and
//! multiplied with every row of `x`, split over threads by rows of `w`, compiled for
//! the widest SIMD the CPU has (chosen at run time through `pulp`). For a handful
//! of rows the product is bound by reading `w` from memory, which this does at the
//! machine's bandwidth (Tiny's lm_head, 662 MB in f32: 36–40 ms against 70–78 ms
//! for the blocked matrix multiply on 2 cores). From about 8 rows on the blocked
//! multiply is faster, so larger batches go to candle.
//!
//! Weights stored as bf16 or f16 are read at their own size: each row is widened to f32
//! into a buffer that stays in L1 (bf16 → f32 is a 16-bit shift; f16 goes through F16C
//! where the CPU has it, via `half`'s slice conversion), then multiplied with every row of
//! `x` in f32, as llama.cpp's and candle's quantized vec-dot kernels widen one block at a
//! time. The result is exactly the f32 product of the widened weights.

use candle_core::{DType, Result, Storage, Tensor};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

/// Most rows of `x` handled here; more go to the general matrix multiply.
pub const MAX_ROWS: usize = 4;

/// Rows of `w` per parallel task.
const ROWS_PER_TASK: usize = 64;

/// Dot product of `a` with `b` read through `wide`, with 16 independent partial sums
/// (vectorises without fast-math).
#[inline(always)]
fn dot<T: Copy>(a: &[f32], b: &[T], wide: impl Fn(T) -> f32) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * wide(y[i]);
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (x, &y) in ra.iter().zip(rb) {
        sum += x * wide(y);
    }
    sum
}

/// A weight element this module reads, and how a row of it meets the rows of `x`.
trait Widen: Copy + Send + Sync + candle_core::WithDType {
    /// `outs[j] = xs[j] · row` for every row `j` of `xs` (each `row.len()` long);
    /// `scratch` is a buffer the element may widen the row into.
    fn row_dots(row: &[Self], xs: &[f32], outs: &mut [f32], scratch: &mut Vec<f32>);
}

impl Widen for f32 {
    #[inline(always)]
    fn row_dots(row: &[f32], xs: &[f32], outs: &mut [f32], _: &mut Vec<f32>) {
        for (x, o) in xs.chunks_exact(row.len()).zip(outs) {
            *o = dot(x, row, |v| v);
        }
    }
}

impl Widen for bf16 {
    /// Widened inside the product: bf16 → f32 is a 16-bit shift.
    #[inline(always)]
    fn row_dots(row: &[bf16], xs: &[f32], outs: &mut [f32], _: &mut Vec<f32>) {
        let bits: &[u16] = row.reinterpret_cast();
        for (x, o) in xs.chunks_exact(row.len()).zip(outs) {
            *o = dot(x, bits, |v| f32::from_bits(u32::from(v) << 16));
        }
    }
}

impl Widen for f16 {
    /// Widened once per row into an L1-sized buffer (F16C where the CPU has it).
    #[inline(always)]
    fn row_dots(row: &[f16], xs: &[f32], outs: &mut [f32], scratch: &mut Vec<f32>) {
        scratch.resize(row.len(), 0.0);
        row.convert_to_f32_slice(scratch);
        f32::row_dots(scratch, xs, outs, &mut Vec::new());
    }
}

/// One task: `out` (rows of `w`, m) = `w` · `xs`ᵀ.
struct Rows<'a, W> {
    xs: &'a [f32],
    w: &'a [W],
    out: &'a mut [f32],
    k: usize,
}

impl<W: Widen> pulp::WithSimd for Rows<'_, W> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) {
        let m = self.xs.len() / self.k;
        let mut scratch = Vec::new();
        for (row, outs) in self
            .w
            .chunks_exact(self.k)
            .zip(self.out.chunks_exact_mut(m))
        {
            W::row_dots(row, self.xs, outs, &mut scratch);
        }
    }
}

/// `x · wᵀ` for f32 `x` (m ≤ [`MAX_ROWS`], k) and contiguous `w` (n, k) stored as f32,
/// bf16 or f16, on the CPU: (m, n) in f32. `None` when the shapes, dtypes or device are
/// not that case.
pub fn small_rows(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 || x.rank() != 2 || w.rank() != 2 {
        return Ok(None);
    }
    match w.dtype() {
        DType::F32 => small_rows_of::<f32>(x, w),
        DType::BF16 => small_rows_of::<bf16>(x, w),
        DType::F16 => small_rows_of::<f16>(x, w),
        _ => Ok(None),
    }
}

fn small_rows_of<W: Widen>(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    let (m, k) = x.dims2()?;
    let (n, k_w) = w.dims2()?;
    if m == 0 || m > MAX_ROWS || k != k_w || k == 0 {
        return Ok(None);
    }
    let (storage, layout) = w.storage_and_layout();
    let Some((start, end)) = layout.contiguous_offsets() else {
        return Ok(None);
    };
    let Storage::Cpu(cpu) = &*storage else {
        return Ok(None);
    };
    let weights = &cpu.as_slice::<W>()?[start..end];
    let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
    let arch = pulp::Arch::new();
    // Computed as (n, m), each task a run of rows of `w`.
    let mut out = vec![0f32; n * m];
    out.par_chunks_mut(ROWS_PER_TASK * m)
        .enumerate()
        .for_each(|(task, out)| {
            let first = task * ROWS_PER_TASK;
            let rows = out.len() / m;
            arch.dispatch(Rows {
                xs: &xs,
                w: &weights[first * k..(first + rows) * k],
                out,
                k,
            });
        });
    let out = Tensor::from_vec(out, (n, m), x.device())?;
    Ok(Some(if m == 1 {
        out.reshape((1, n))?
    } else {
        out.t()?.contiguous()?
    }))
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn small_products_match_the_matrix_multiply() {
        let dev = Device::Cpu;
        for m in 1..=MAX_ROWS {
            let x = Tensor::randn(0f32, 1.0, (m, 37), &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, (201, 37), &dev).unwrap();
            let got = small_rows(&x, &w).unwrap().expect("handled");
            let want = x.matmul(&w.t().unwrap()).unwrap();
            assert_eq!(got.dims(), want.dims());
            let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap();
            assert!(diff.to_scalar::<f32>().unwrap() < 1e-4);
        }
        let x = Tensor::randn(0f32, 1.0, (MAX_ROWS + 1, 8), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (3, 8), &dev).unwrap();
        assert!(
            small_rows(&x, &w).unwrap().is_none(),
            "larger batches use the matmul"
        );
        let strided = Tensor::randn(0f32, 1.0, (8, 3), &dev).unwrap().t().unwrap();
        assert!(
            small_rows(&x.narrow(0, 0, 1).unwrap(), &strided)
                .unwrap()
                .is_none()
        );
    }

    /// bf16 and f16 weights give exactly the f32 product of the same weights widened.
    #[test]
    fn half_weights_give_the_f32_product_of_their_widened_values() {
        let dev = Device::Cpu;
        for dtype in [DType::BF16, DType::F16] {
            for m in 1..=MAX_ROWS {
                let x = Tensor::randn(0f32, 1.0, (m, 133), &dev).unwrap();
                let w = Tensor::randn(0f32, 1.0, (201, 133), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let got = small_rows(&x, &w).unwrap().expect("handled");
                let widened = w.to_dtype(DType::F32).unwrap();
                let want = small_rows(&x, &widened).unwrap().unwrap();
                let (got, want) = (
                    got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                );
                if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
                    panic!(
                        "{dtype:?}, {m} rows, element {i}: {} != {}",
                        got[i], want[i]
                    );
                }
                let matmul = x.matmul(&widened.t().unwrap()).unwrap();
                let diff = (Tensor::new(got.as_slice(), &dev).unwrap()
                    - matmul.flatten_all().unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
                assert!(diff.to_scalar::<f32>().unwrap() < 1e-4, "{dtype:?} {m}");
            }
        }
    }
}
