//! Weights packed for the outer-product kernel, for products that meet anywhere from
//! one row of `x` (a decode step) to hundreds (a batched step of many sequences, a
//! prefill chunk): the language model's layers and its LM head.
//!
//! The rows of `w` are cut into panels of [`LANES`] rows, and a panel is stored column
//! by column: element (r, t) lives at `(r / 16) · 16k + 16t + r % 16`. At each column
//! `t` the kernel widens one 512-bit vector of sixteen weight rows (bf16 by a shift,
//! f16 through F16C, f32 as it is), broadcasts `x[j][t]` of each row of `x` in its group
//! and fused-multiply-adds into an accumulator per (row of `x`, panel): the register
//! micro-kernel of BLIS and the `gemm` crate (Goto & van de Geijn, "Anatomy of
//! high-performance matrix multiplication"), with the weight panel packed once at load
//! instead of on every call. There are no horizontal sums and no transposes of the
//! output, so at 16–64 rows of `x` it runs at about the FMA peak (190 GFLOP/s on two
//! AVX-512 cores against 110–130 for the row-dot tiles of [`super::simd`] and
//! [`super::simd512`]); at one row it streams each panel once, as the decode kernel
//! does.
//!
//! Every output is one f32 fused-multiply-add chain over `t = 0, 1, …, k − 1`, whatever
//! the number of rows of `x` (up to [`MAX_ROWS`]) and however they are grouped: a row's
//! products are the same bits alone and beside others, and a bf16 panel and an f32
//! copy of its values give the same bits. Packing needs AVX-512F ([`available`]); elsewhere layers keep the
//! row-major layout.

use half::{bf16, f16};
use rayon::prelude::*;

use super::panels::SendPtr;
use super::rows::WeightRows;

/// Rows of `w` per panel: one 512-bit vector of f32.
pub const LANES: usize = 16;

/// Panels per parallel task (64 rows of `w`).
const PANELS_PER_TASK: usize = 4;

/// Most rows of `x` in one register tile (12 × 2 panels: 24 of the 32 registers).
const MAX_GROUP: usize = 12;

/// Whether weights can be packed for this CPU's kernel.
pub fn available() -> bool {
    super::simd512::available512()
}

/// The packed values of an (n, k) matrix in one of the dense formats.
#[derive(Debug, Clone)]
pub enum PackedData {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
}

/// An (n, k) weight packed in panels of [`LANES`] rows (the last panel padded with
/// zero rows).
#[derive(Debug, Clone)]
pub struct PackedRows {
    data: PackedData,
    n: usize,
    k: usize,
}

/// Element types of packed panels.
pub trait PanelElem: Copy + Default + Send + Sync + 'static {
    /// The element as f32.
    fn wide(self) -> f32;
    /// The packed buffer holding elements of this type.
    fn wrap(values: Vec<Self>) -> PackedData;
}

impl PanelElem for f32 {
    fn wide(self) -> f32 {
        self
    }
    fn wrap(values: Vec<Self>) -> PackedData {
        PackedData::F32(values)
    }
}

impl PanelElem for bf16 {
    fn wide(self) -> f32 {
        self.to_f32()
    }
    fn wrap(values: Vec<Self>) -> PackedData {
        PackedData::Bf16(values)
    }
}

impl PanelElem for f16 {
    fn wide(self) -> f32 {
        self.to_f32()
    }
    fn wrap(values: Vec<Self>) -> PackedData {
        PackedData::F16(values)
    }
}

/// Packs row-major rows `first..first + rows.len() / k` of an (n, k) matrix into `dst`
/// (the whole packed buffer).
pub fn pack_rows<T: Copy>(rows: &[T], first: usize, k: usize, dst: &mut [T]) {
    if first % LANES == 0 && rows.len() == LANES * k {
        // A whole panel: written in order, its sixteen rows read side by side.
        let panel = &mut dst[first * k..(first + LANES) * k];
        for (t, column) in panel.chunks_exact_mut(LANES).enumerate() {
            for (lane, v) in column.iter_mut().enumerate() {
                *v = rows[lane * k + t];
            }
        }
        return;
    }
    for (i, row) in rows.chunks_exact(k).enumerate() {
        let r = first + i;
        let panel = &mut dst[(r / LANES) * LANES * k..][..LANES * k];
        let lane = r % LANES;
        for (t, &v) in row.iter().enumerate() {
            panel[t * LANES + lane] = v;
        }
    }
}

impl PackedRows {
    /// Packs an (n, k) matrix whose rows `fill(first, count)` returns, row-major, a
    /// block at a time (so a caller reading from a file never holds a second whole copy).
    pub fn pack<T: PanelElem, E>(
        n: usize,
        k: usize,
        mut fill: impl FnMut(usize, usize) -> Result<Vec<T>, E>,
    ) -> Result<Self, E> {
        let panels = n.div_ceil(LANES);
        let mut data = vec![T::default(); panels * LANES * k];
        // About 4 MB of rows per read, whole panels, each panel laid out by one thread.
        let block = ((4 << 20) / (k.max(1) * size_of::<T>())).next_multiple_of(LANES);
        let mut first = 0;
        while first < n {
            let count = block.min(n - first);
            let rows = fill(first, count)?;
            assert_eq!(
                rows.len(),
                count * k,
                "pack: rows {first}.. have the wrong size"
            );
            let dst = &mut data[first * k..(first + count).next_multiple_of(LANES) * k];
            dst.par_chunks_mut(LANES * k.max(1))
                .zip(rows.par_chunks(LANES * k.max(1)))
                .for_each(|(panel, rows)| pack_rows(rows, 0, k, panel));
            first += count;
        }
        Ok(Self {
            data: T::wrap(data),
            n,
            k,
        })
    }

    /// (n, k).
    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// `f32`, `bf16` or `f16`.
    pub fn format(&self) -> &'static str {
        match &self.data {
            PackedData::F32(_) => "f32",
            PackedData::Bf16(_) => "bf16",
            PackedData::F16(_) => "f16",
        }
    }

    /// Bytes held (the padding rows of the last panel included).
    pub fn bytes(&self) -> usize {
        match &self.data {
            PackedData::F32(v) => v.len() * 4,
            PackedData::Bf16(v) => v.len() * 2,
            PackedData::F16(v) => v.len() * 2,
        }
    }

    /// The matrix row-major in f32, (n · k) values.
    pub fn unpack(&self) -> Vec<f32> {
        fn go<T: PanelElem>(data: &[T], n: usize, k: usize) -> Vec<f32> {
            let mut out = vec![0f32; n * k];
            for (r, row) in out.chunks_exact_mut(k.max(1)).enumerate() {
                let panel = &data[(r / LANES) * LANES * k..];
                for (t, o) in row.iter_mut().enumerate() {
                    *o = panel[t * LANES + r % LANES].wide();
                }
            }
            out
        }
        match &self.data {
            PackedData::F32(v) => go(v, self.n, self.k),
            PackedData::Bf16(v) => go(v, self.n, self.k),
            PackedData::F16(v) => go(v, self.n, self.k),
        }
    }

    /// Parallel tasks of a product: blocks of [`PANELS_PER_TASK`] panels.
    pub fn tasks(&self) -> usize {
        self.n.div_ceil(LANES).div_ceil(PANELS_PER_TASK)
    }

    /// `xs` (m, k) row-major f32 times the weight transposed: (m, n) row-major. `None`
    /// on a CPU without the kernel (weights are only packed where it runs).
    pub fn product(&self, xs: &[f32], m: usize) -> Option<Vec<f32>> {
        if !available() {
            return None;
        }
        let mut out = vec![0f32; m * self.n];
        if m == 0 || self.n == 0 || self.k == 0 {
            return Some(out);
        }
        let x = GroupedX::new(xs, m, self.k);
        let out_ptr = SendPtr(out.as_mut_ptr());
        (0..self.tasks()).into_par_iter().for_each(|task| {
            // SAFETY: `out` is (m, n) and each task writes only its own columns.
            #[allow(unsafe_code)]
            unsafe {
                self.task(&x, task, out_ptr)
            };
        });
        Some(out)
    }

    /// Task `task` of the product of `x`: writes the task's columns of every row of
    /// `out` ((m, n) row-major).
    ///
    /// # Safety
    /// [`available`]; `out` is valid for writes of (x.m, n) values, and no other thread
    /// writes the task's columns meanwhile.
    #[allow(unsafe_code)]
    pub(crate) unsafe fn task(&self, x: &GroupedX, task: usize, out: SendPtr) {
        let (n, k) = (self.n, self.k);
        assert_eq!(
            x.k, k,
            "packed product: x has {} columns, the weight {k}",
            x.k
        );
        let panels = n.div_ceil(LANES);
        let p0 = task * PANELS_PER_TASK;
        let p1 = (p0 + PANELS_PER_TASK).min(panels);
        for &(j0, rows) in &x.groups {
            let xt = &x.values[j0 * k..(j0 + rows) * k];
            // SAFETY: the caller's contract; panels p0..p1 lie in the weight, `xt` holds
            // (k, rows) values and rows j0.. of `out` have n columns.
            unsafe {
                match &self.data {
                    PackedData::F32(w) => {
                        x86::panels(w, k, p0, p1, xt, rows, out.get().add(j0 * n), n)
                    }
                    PackedData::Bf16(w) => {
                        x86::panels(w, k, p0, p1, xt, rows, out.get().add(j0 * n), n)
                    }
                    PackedData::F16(w) => {
                        x86::panels(w, k, p0, p1, xt, rows, out.get().add(j0 * n), n)
                    }
                }
            }
        }
    }
}

impl PackedRows {
    /// The product for many rows of `x` (a long prompt in one chunk): each panel of
    /// rows gathered back to f32 rows and multiplied by `gemm` through
    /// [`super::panels`], for more than [`MAX_ROWS`] rows.
    pub fn many_rows_product(&self, xs: &[f32]) -> Vec<f32> {
        match &self.data {
            PackedData::F32(v) => super::panels::product(xs, &Gather::new(v, self.n, self.k)),
            PackedData::Bf16(v) => super::panels::product(xs, &Gather::new(v, self.n, self.k)),
            PackedData::F16(v) => super::panels::product(xs, &Gather::new(v, self.n, self.k)),
        }
    }
}

/// Most rows of `x` for the packed kernel; beyond, [`PackedRows::many_rows_product`]
/// (up to 512 rows, a prefill chunk, the kernel matches or beats `gemm` on every
/// language-model shape, 1.3–1.5× at 128 rows; from about 1,024 rows `gemm` wins on
/// the widest `k`).
pub const MAX_ROWS: usize = 512;

/// Packed rows read back row by row (for [`super::panels`]).
struct Gather<'a, T> {
    data: &'a [T],
    n: usize,
    k: usize,
}

impl<'a, T: PanelElem> Gather<'a, T> {
    fn new(data: &'a [T], n: usize, k: usize) -> Self {
        Self { data, n, k }
    }
}

impl<T: PanelElem> WeightRows for Gather<'_, T> {
    fn rows(&self) -> usize {
        self.n
    }
    fn cols(&self) -> usize {
        self.k
    }
    fn row_dots(&self, r: usize, xs: &[f32], outs: &mut [f32], scratch: &mut Vec<f32>) {
        scratch.resize(self.k, 0.0);
        self.widen_row(r, scratch);
        for (x, o) in xs.chunks_exact(self.k).zip(outs) {
            *o = x.iter().zip(scratch.iter()).map(|(a, b)| a * b).sum();
        }
    }
    fn widen_row(&self, r: usize, out: &mut [f32]) {
        let panel = &self.data[(r / LANES) * LANES * self.k..];
        for (t, o) in out.iter_mut().enumerate() {
            *o = panel[t * LANES + r % LANES].wide();
        }
    }
    /// A whole panel at a time where the rows allow: the packed values read in order,
    /// sixteen rows written side by side.
    fn widen_rows(&self, first: usize, out: &mut [f32]) {
        let k = self.k.max(1);
        let count = out.len() / k;
        let mut r = first;
        for rows in out.chunks_mut(LANES * k) {
            let n = rows.len() / k;
            if r % LANES != 0 || n != LANES {
                for (i, row) in rows.chunks_exact_mut(k).enumerate() {
                    self.widen_row(r + i, row);
                }
            } else {
                let panel = &self.data[r * self.k..(r + LANES) * self.k];
                for (t, column) in panel.chunks_exact(LANES).enumerate() {
                    for (lane, &v) in column.iter().enumerate() {
                        rows[lane * k + t] = v.wide();
                    }
                }
            }
            r += n;
        }
        debug_assert_eq!(r, first + count);
    }
}

/// The rows of `x` as the kernel reads them: in groups of at most [`MAX_GROUP`] rows,
/// each group transposed ((k, rows)) so that one column's values lie side by side.
#[derive(Debug)]
pub struct GroupedX {
    values: Vec<f32>,
    groups: Vec<(usize, usize)>,
    k: usize,
}

impl GroupedX {
    /// `xs` (m, k) row-major.
    pub fn new(xs: &[f32], m: usize, k: usize) -> Self {
        assert_eq!(xs.len(), m * k, "packed product: x is not (m, k)");
        let groups = groups(m);
        let mut values = vec![0f32; m * k];
        for &(j0, rows) in &groups {
            let block = &mut values[j0 * k..(j0 + rows) * k];
            for j in 0..rows {
                for (t, &v) in xs[(j0 + j) * k..(j0 + j + 1) * k].iter().enumerate() {
                    block[t * rows + j] = v;
                }
            }
        }
        Self { values, groups, k }
    }
}

/// Groups of rows of `x` (first row, rows): one when there are few, else as many as
/// needed of nearly equal size up to [`MAX_GROUP`].
fn groups(m: usize) -> Vec<(usize, usize)> {
    let count = m.div_ceil(MAX_GROUP);
    let size = m.div_ceil(count);
    (0..m)
        .step_by(size)
        .map(|j0| (j0, size.min(m - j0)))
        .collect()
}

#[cfg(not(target_arch = "x86_64"))]
mod x86 {
    pub trait Load16 {}
    impl<T> Load16 for T {}

    /// Never called: packing needs AVX-512F ([`super::available`] is false here).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn panels<T>(
        _: &[T],
        _: usize,
        _: usize,
        _: usize,
        _: &[f32],
        _: usize,
        _: *mut f32,
        _: usize,
    ) {
        unreachable!("packed weights need AVX-512F")
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    use std::arch::x86_64::*;

    use half::{bf16, f16};

    use super::LANES;

    /// Sixteen consecutive elements widened to f32 lanes.
    pub trait Load16: Copy {
        /// # Safety
        /// `p` points at 16 readable elements; the CPU has AVX-512F.
        unsafe fn load16(p: *const Self) -> __m512;
    }

    impl Load16 for f32 {
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn load16(p: *const Self) -> __m512 {
            // SAFETY: the caller's contract.
            unsafe { _mm512_loadu_ps(p) }
        }
    }

    impl Load16 for bf16 {
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn load16(p: *const Self) -> __m512 {
            // SAFETY: the caller's contract; bf16 is the top half of an f32.
            unsafe {
                let h = _mm256_loadu_si256(p.cast());
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
            }
        }
    }

    impl Load16 for f16 {
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn load16(p: *const Self) -> __m512 {
            // SAFETY: the caller's contract (AVX-512F includes the 512-bit vcvtph2ps).
            unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
        }
    }

    /// Panels `p0..p1` of `w` against the `rows` rows of `x` held transposed in `xt`
    /// ((k, rows)): writes `out[j * n + c]` for the columns `c` of those panels below `n`.
    ///
    /// # Safety
    /// AVX-512F, AVX2, FMA and F16C; `w` holds the panels; `out` is valid for writes of
    /// `rows` rows of stride `n` at those columns.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub unsafe fn panels<T: Load16>(
        w: &[T],
        k: usize,
        p0: usize,
        p1: usize,
        xt: &[f32],
        rows: usize,
        out: *mut f32,
        n: usize,
    ) {
        assert!(p1 * LANES * k <= w.len() && xt.len() == rows * k);
        // Up to four rows of x: four panels per tile keep sixteen chains in flight
        // while the weights stream; more rows: two panels, up to twelve rows.
        let wide = if rows <= 4 { 4 } else { 2 };
        let mut p = p0;
        while p < p1 {
            let v = wide.min(p1 - p);
            // SAFETY: panels p..p + v lie in `w`; the caller's bounds for the rest.
            unsafe {
                let wp = w.as_ptr().add(p * LANES * k);
                let o = out.add(p * LANES);
                let cols = n - p * LANES;
                macro_rules! dispatch {
                    ([$($four:literal)*], [$($two:literal)*], [$($one:literal)*]) => {
                        match (rows, v) {
                            $(($four, 4) => tile::<T, $four, 4>(wp, k, xt, o, n, cols),)*
                            $(($two, 2) => tile::<T, $two, 2>(wp, k, xt, o, n, cols),)*
                            $(($one, _) => {
                                // The panels left over, one at a time.
                                for i in 0..v {
                                    let at = i * LANES;
                                    tile::<T, $one, 1>(wp.add(at * k), k, xt, o.add(at), n, cols - at);
                                }
                            })*
                            _ => unreachable!("groups have 1 to 12 rows"),
                        }
                    };
                }
                dispatch!(
                    [1 2 3 4],
                    [5 6 7 8 9 10 11 12],
                    [1 2 3 4 5 6 7 8 9 10 11 12]
                );
            }
            p += v;
        }
    }

    /// V panels from `w` (each 16k values) against M rows of `x` (transposed, (k, M)):
    /// M × V accumulators, one fused-multiply-add chain per output over the columns in
    /// order. Writes `out[j * n + c]` for `c < min(16·V, cols)`.
    ///
    /// # Safety
    /// As [`panels`].
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn tile<T: Load16, const M: usize, const V: usize>(
        w: *const T,
        k: usize,
        xt: &[f32],
        out: *mut f32,
        n: usize,
        cols: usize,
    ) {
        // SAFETY: every weight read is below V panels of 16k values, every x read below
        // k · M, every write within the caller's block (masked past `cols`).
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); V]; M];
            let x = xt.as_ptr();
            for t in 0..k {
                let mut wv = [_mm512_setzero_ps(); V];
                for (v, wv) in wv.iter_mut().enumerate() {
                    *wv = T::load16(w.add((v * k + t) * LANES));
                }
                for (j, acc) in acc.iter_mut().enumerate() {
                    let xb = _mm512_set1_ps(*x.add(t * M + j));
                    for (acc, wv) in acc.iter_mut().zip(&wv) {
                        *acc = _mm512_fmadd_ps(xb, *wv, *acc);
                    }
                }
            }
            for (j, acc) in acc.iter().enumerate() {
                for (v, acc) in acc.iter().enumerate() {
                    let left = cols.saturating_sub(v * LANES).min(LANES);
                    let mask: __mmask16 = ((1u32 << left) - 1) as u16;
                    _mm512_mask_storeu_ps(out.add(j * n + v * LANES), mask, *acc);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    fn packed<T: PanelElem>(w: &[T], n: usize, k: usize) -> PackedRows {
        PackedRows::pack::<T, ()>(n, k, |first, count| {
            Ok(w[first * k..(first + count) * k].to_vec())
        })
        .unwrap()
    }

    /// Every output is exactly the in-order fused-multiply-add chain of its row and
    /// column (so the same bits for any number of rows of `x`), for every format, group
    /// size and panel count, with a last panel that is partly padding.
    #[test]
    fn each_output_is_the_in_order_fma_chain() {
        if !available() {
            return;
        }
        for (n, k) in [(1usize, 1usize), (37, 29), (70, 133), (200, 64)] {
            let w = values(n * k, (n * 31 + k) as u64);
            let bf: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let hf: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            let layers = [packed(&w, n, k), packed(&bf, n, k), packed(&hf, n, k)];
            for layer in &layers {
                let dense = layer.unpack();
                for m in [1usize, 2, 3, 4, 5, 8, 12, 13, 16, 25, 40] {
                    let xs = values(m * k, m as u64 + 7);
                    let got = layer.product(&xs, m).unwrap();
                    for j in 0..m {
                        for r in 0..n {
                            let mut want = 0f32;
                            for t in 0..k {
                                want = xs[j * k + t].mul_add(dense[r * k + t], want);
                            }
                            assert_eq!(
                                got[j * n + r].to_bits(),
                                want.to_bits(),
                                "{} ({n}, {k}), m {m}: row {j} column {r} is {}, the chain {want}",
                                layer.format(),
                                got[j * n + r]
                            );
                        }
                    }
                }
            }
        }
    }

    /// Beyond [`MAX_ROWS`] rows the panels gathered back from the packed layout give the
    /// product of the weight (whole panels and rows cut across panels alike).
    #[test]
    fn many_rows_go_through_the_gathered_panels() {
        let (n, k, m) = (70usize, 133usize, 150usize);
        let w = values(n * k, 5);
        let bf: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let layer = packed(&bf, n, k);
        let dense = layer.unpack();
        let xs = values(m * k, 6);
        let got = layer.many_rows_product(&xs);
        for j in 0..m {
            for r in 0..n {
                let want: f32 = (0..k).map(|t| xs[j * k + t] * dense[r * k + t]).sum();
                let tol = 1e-5 * (k as f32).sqrt();
                assert!(
                    (got[j * n + r] - want).abs() <= tol,
                    "row {j} column {r}: {} against {want}",
                    got[j * n + r]
                );
            }
        }
        let mut rows = vec![0f32; 40 * k];
        match &layer.data {
            PackedData::Bf16(v) => Gather::new(v, n, k).widen_rows(9, &mut rows),
            _ => unreachable!(),
        }
        assert_eq!(rows, dense[9 * k..49 * k]);
    }

    /// Packing reads blocks of rows, keeps the values, pads the last panel and reports
    /// the padded bytes.
    #[test]
    fn pack_and_unpack_round_trip() {
        let (n, k) = (35usize, 9usize);
        let w = values(n * k, 3);
        let mut calls = 0;
        let p = PackedRows::pack::<f32, ()>(n, k, |first, count| {
            calls += 1;
            Ok(w[first * k..(first + count) * k].to_vec())
        })
        .unwrap();
        assert!(calls >= 1);
        assert_eq!(p.unpack(), w);
        assert_eq!(p.bytes(), 48 * k * 4);
        assert_eq!(p.dims(), (n, k));
        assert_eq!(groups(16), vec![(0, 8), (8, 8)]);
        assert_eq!(groups(12), vec![(0, 12)]);
        assert_eq!(groups(25), vec![(0, 9), (9, 9), (18, 7)]);
    }
}
