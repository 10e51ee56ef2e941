//! `x · wᵀ` for a few rows of `x` (decode steps, small batches): each row of `w` is
//! read once and multiplied with every row of `x`, split over threads by blocks of rows
//! of `w`. Where the CPU has AVX2/FMA/F16C the hand-written kernels of [`super::simd`]
//! run (up to [`super::simd::MAX_ROWS`] rows of `x`); elsewhere a portable loop compiled
//! for the widest SIMD the CPU has (chosen at run time through `pulp`) takes up to
//! [`MAX_ROWS`]. For a handful of rows the product is bound by reading `w` from memory.
//!
//! Weights stored as bf16, f16 or int8 are read at their own size and widened to f32
//! inside the product ([`WeightRows::block_dots`], [`WeightRows::row_dots`]), as
//! llama.cpp's and candle's quantized vec-dot kernels widen one block at a time. The
//! result is exactly the f32 product of the widened weights.

use rayon::prelude::*;

use super::rows::WeightRows;

/// Most rows of `x` the portable loop takes; more go to the panel kernel.
pub const MAX_ROWS: usize = 4;

/// Rows of `w` per parallel task (a block a core keeps in L2 while every group of rows
/// of `x` passes over it).
pub const ROWS_PER_TASK: usize = 64;

/// Most rows of `x` handled here on this CPU.
pub fn max_rows() -> usize {
    if super::simd::available() {
        super::simd::MAX_ROWS
    } else {
        MAX_ROWS
    }
}

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

/// `xs` (m, k) row-major f32 times `w` (n, k) transposed: (m, n) row-major, for
/// m ≤ [`max_rows`].
pub fn small_rows<R: WeightRows>(xs: &[f32], w: &R) -> Vec<f32> {
    let (n, k) = (w.rows(), w.cols());
    let m = xs.len() / k;
    // Computed as (n, m), each task a run of rows of `w`.
    let mut out = vec![0f32; n * m];
    out.par_chunks_mut(ROWS_PER_TASK * m)
        .enumerate()
        .for_each(|(task, out)| block(w, xs, task * ROWS_PER_TASK, out));
    transpose_par(out, n, m)
}

/// `(n, m)` → `(m, n)`, rows of the result in parallel.
fn transpose_par(out: Vec<f32>, n: usize, m: usize) -> Vec<f32> {
    if m == 1 {
        return out;
    }
    let mut t = vec![0f32; n * m];
    t.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
        for (j, v) in row.iter_mut().enumerate() {
            *v = out[j * m + i];
        }
    });
    t
}

/// One task of [`small_rows`]: `out[(r - first) * m + j] = xs[j] · w[r]` for the
/// `out.len() / m` rows of `w` from `first`.
pub fn block<R: WeightRows>(w: &R, xs: &[f32], first: usize, out: &mut [f32]) {
    if !w.block_dots(first, xs, out) {
        pulp::Arch::new().dispatch(Rows { xs, w, first, out });
    }
}

/// `(n, m)` → `(m, n)`.
pub fn transpose(a: &[f32], n: usize, m: usize) -> Vec<f32> {
    if m == 1 {
        return a.to_vec();
    }
    let mut t = vec![0f32; n * m];
    for (i, row) in t.chunks_exact_mut(n).enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            *v = a[j * m + i];
        }
    }
    t
}

/// `xs` (m, k) times `w` (n, k) transposed, (m, n) row-major, for a middling number of
/// rows (an expert's share of a prompt, a batch of decode steps): each task widens its
/// block of [`ROWS_PER_TASK`] weight rows to f32 once (f32 weights are read in place)
/// into a buffer that stays in L2, and every group of eight rows of `x` passes over it
/// with the 512-bit register tiles ([`super::simd512::f32_dots512`]). None without AVX-512.
pub fn widened_rows<R: WeightRows>(xs: &[f32], w: &R) -> Option<Vec<f32>> {
    if !super::simd512::available512() {
        return None;
    }
    let (n, k) = (w.rows(), w.cols());
    let m = xs.len() / k;
    let mut out = vec![0f32; n * m];
    out.par_chunks_mut(ROWS_PER_TASK * m)
        .enumerate()
        .for_each_init(Vec::new, |buf, (task, out)| {
            let first = task * ROWS_PER_TASK;
            let count = out.len() / m;
            let block = match w.f32_rows(first, count) {
                Some(rows) => rows,
                None => {
                    buf.resize(count * k, 0.0);
                    for (i, row) in buf.chunks_exact_mut(k).enumerate() {
                        w.widen_row(first + i, row);
                    }
                    &buf[..]
                }
            };
            let done = super::simd512::f32_dots512(block, k, xs, out);
            debug_assert!(done, "checked above");
        });
    Some(transpose_par(out, n, m))
}
