//! `x · wᵀ` for many rows of `x` (prefill: the vision tower, the language prompt, the
//! projector, experts with many routed rows) from weights stored as f32, bf16, f16 or
//! int8.
//!
//! The weights are widened to f32 one panel of rows at a time into a buffer sized for
//! the L2 cache, and each panel is multiplied with a block of rows of `x` by the `gemm`
//! crate's f32 kernel (AVX-512 where the CPU has it, through `gemm`'s `x86-v4` feature;
//! else AVX2/FMA; the packed micro-kernel design of BLIS / Goto & van de Geijn,
//! "Anatomy of high-performance matrix multiplication"). This is how llama.cpp's CPU
//! backend runs half-precision weights through an f32 product (it converts `src0` rows to
//! the vec-dot type chunk by chunk), here with whole panels so that the widening cost,
//! one pass over the stored weights per block of rows of `x`, is small against the
//! product's `2·m·n·k` flops. No f32 copy of the whole matrix is ever made.
//!
//! f32 weights go through the same panels, read in place: a bf16 weight and an f32 copy
//! of its values give bit-identical products, so a checkpoint's precision is the only
//! thing that changes when it is held at its own size.

use rayon::prelude::*;

use super::rows::WeightRows;

/// f32 bytes of one widened panel: fits a core's L2 (2 MB on current Xeons) with room
/// for the product's packed block of `x`. Panels keep at least 64 rows even for the
/// widest `k` (the expert and MLP down projections): narrower ones leave the product's
/// micro-kernel starved (127 against 226 GFLOP/s at k = 4304 here).
const PANEL_BYTES: usize = 1 << 20;

/// Rows of `x` per task at most (the product's own blocking takes it from there).
const X_ROWS_PER_TASK: usize = 512;

/// `xs` (m, k) row-major f32 times `w` (n, k) transposed: (m, n) row-major.
pub fn product<R: WeightRows>(xs: &[f32], w: &R) -> Vec<f32> {
    let (n, k) = (w.rows(), w.cols());
    let m = xs.len() / k;
    let mut out = vec![0f32; m * n];
    if m == 0 || n == 0 {
        return out;
    }
    // Panels of `nb` rows of `w`, a multiple of 16 (the micro-kernel's width).
    let nb = (PANEL_BYTES / (4 * k)).clamp(64, 512) / 16 * 16;
    let panels = n.div_ceil(nb);
    // Enough tasks to keep every thread busy: split the rows of `x` as well.
    let threads = rayon::current_num_threads();
    let want_chunks = (4 * threads).div_ceil(panels);
    let mb = m
        .div_ceil(want_chunks)
        .clamp(32.min(m), X_ROWS_PER_TASK)
        .max(1);
    let chunks = m.div_ceil(mb);
    let out_ptr = SendPtr(out.as_mut_ptr());
    // Tasks run panel-major, and a thread takes a contiguous run of them, so it keeps
    // its last widened panel for the next block of rows of `x` (one widening per panel
    // and thread rather than per task).
    (0..panels * chunks).into_par_iter().for_each_init(
        || (Vec::new(), None),
        |(panel, widened): &mut (Vec<f32>, Option<usize>), task| {
            let (p, c) = (task / chunks, task % chunks);
            let (j0, i0) = (p * nb, c * mb);
            let (cols, rows) = (nb.min(n - j0), mb.min(m - i0));
            let panel: &[f32] = match w.f32_rows(j0, cols) {
                Some(rows) => rows,
                None => {
                    if *widened != Some(p) {
                        panel.resize(cols * k, 0.0);
                        w.widen_rows(j0, panel);
                        *widened = Some(p);
                    }
                    panel
                }
            };
            let x = &xs[i0 * k..(i0 + rows) * k];
            // SAFETY: `gemm` reads `rows × k` values of `x` (row stride k, column stride 1)
            // and `k × cols` values of the panel (element (kk, j) at `j·k + kk`), both in
            // bounds of the slices above, and writes the `rows × cols` block of `out` at
            // rows i0.., columns j0.. with row stride n. The tasks' blocks are disjoint
            // (distinct (panel, chunk) pairs) and `out` outlives the parallel loop.
            #[allow(unsafe_code)]
            unsafe {
                gemm::gemm(
                    rows,
                    cols,
                    k,
                    out_ptr.get().add(i0 * n + j0),
                    1,
                    n as isize,
                    false,
                    x.as_ptr(),
                    1,
                    k as isize,
                    panel.as_ptr(),
                    k as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        },
    );
    out
}

/// An output's base pointer, shared by parallel tasks that write disjoint blocks of it.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);

impl SendPtr {
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

// SAFETY: its users give each task its own block of the output (see `product` and
// `vision::attention::blocked`).
#[allow(unsafe_code)]
unsafe impl Send for SendPtr {}
#[allow(unsafe_code)]
unsafe impl Sync for SendPtr {}
