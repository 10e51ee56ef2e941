//! `x · wᵀ` for a few rows of `x` (decode steps): each row of `w` is read once and
//! multiplied with every row of `x`, split over threads by rows of `w`, compiled for
//! the widest SIMD the CPU has (chosen at run time through `pulp`). For a handful
//! of rows the product is bound by reading `w` from memory, which this does at the
//! machine's bandwidth (Tiny's lm_head, 662 MB in f32: 36–40 ms against 70–78 ms
//! for the blocked matrix multiply on 2 cores). From about 8 rows on the blocked
//! multiply is faster, so larger batches go to candle.

use candle_core::{DType, Result, Storage, Tensor};
use rayon::prelude::*;

/// Most rows of `x` handled here; more go to the general matrix multiply.
pub const MAX_ROWS: usize = 4;

/// Rows of `w` per parallel task.
const ROWS_PER_TASK: usize = 64;

/// Dot product with 16 independent partial sums (vectorises without fast-math).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        sum += x * y;
    }
    sum
}

/// One task: `out` (rows of `w`, m) = `w` · `xs`ᵀ.
struct Rows<'a> {
    xs: &'a [f32],
    w: &'a [f32],
    out: &'a mut [f32],
    k: usize,
}

impl pulp::WithSimd for Rows<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) {
        let k = self.k;
        let m = self.xs.len() / k;
        for (row, outs) in self.w.chunks_exact(k).zip(self.out.chunks_exact_mut(m)) {
            for (x, o) in self.xs.chunks_exact(k).zip(outs) {
                *o = dot(x, row);
            }
        }
    }
}

/// `x · wᵀ` for f32 `x` (m ≤ [`MAX_ROWS`], k) and contiguous f32 `w` (n, k) on the
/// CPU: (m, n). `None` when the shapes, dtypes or device are not that case.
pub fn small_rows(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    if !x.device().is_cpu()
        || x.dtype() != DType::F32
        || w.dtype() != DType::F32
        || x.rank() != 2
        || w.rank() != 2
    {
        return Ok(None);
    }
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
    let weights = &cpu.as_slice::<f32>()?[start..end];
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
}
