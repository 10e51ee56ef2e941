//! `x · wᵀ` for a few rows of `x` (decode steps): each row of `w` is read once and
//! multiplied with every row of `x`, split over threads by rows of `w`, compiled for
//! the widest SIMD the CPU has (chosen at run time through `pulp`). For a handful of
//! rows the product is bound by reading `w` from memory, which this does at close to the
//! machine's bandwidth (Tiny's lm_head, 662 MB in f32: 36–40 ms against 70–78 ms for the
//! blocked matrix multiply on 2 cores; 331 MB in bf16: about 26 ms).
//!
//! Weights stored as bf16, f16 or int8 are read at their own size and widened to f32
//! inside the product ([`WeightRows::row_dots`]), as llama.cpp's and candle's quantized
//! vec-dot kernels widen one block at a time. The result is exactly the f32 product of
//! the widened weights.

use rayon::prelude::*;

use super::rows::WeightRows;

/// Most rows of `x` handled here; more go to the panel kernel or the matrix multiply.
pub const MAX_ROWS: usize = 4;

/// Rows of `w` per parallel task.
const ROWS_PER_TASK: usize = 64;

/// One task: `out` (rows of `w`, m) = `w[first..]` · `xs`ᵀ.
struct Rows<'a, R> {
    xs: &'a [f32],
    w: &'a R,
    first: usize,
    out: &'a mut [f32],
}

impl<R: WeightRows> pulp::WithSimd for Rows<'_, R> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) {
        let m = self.xs.len() / self.w.cols();
        let mut scratch = Vec::new();
        for (i, outs) in self.out.chunks_exact_mut(m).enumerate() {
            self.w.row_dots(self.first + i, self.xs, outs, &mut scratch);
        }
    }
}

/// `xs` (m, k) row-major f32 times `w` (n, k) transposed: (m, n) row-major.
pub fn small_rows<R: WeightRows>(xs: &[f32], w: &R) -> Vec<f32> {
    let (n, k) = (w.rows(), w.cols());
    let m = xs.len() / k;
    let arch = pulp::Arch::new();
    // Computed as (n, m), each task a run of rows of `w`.
    let mut out = vec![0f32; n * m];
    out.par_chunks_mut(ROWS_PER_TASK * m)
        .enumerate()
        .for_each(|(task, out)| {
            arch.dispatch(Rows {
                xs,
                w,
                first: task * ROWS_PER_TASK,
                out,
            });
        });
    if m == 1 {
        return out;
    }
    let mut t = vec![0f32; n * m];
    for (j, col) in out.chunks_exact(m).enumerate() {
        for (i, &v) in col.iter().enumerate() {
            t[i * n + j] = v;
        }
    }
    t
}
