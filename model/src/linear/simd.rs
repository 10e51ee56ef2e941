//! Hand-written x86-64 kernels for products with a few rows of `x` (decode steps and
//! small batches, up to [`MAX_ROWS`]), chosen at run time when the CPU has AVX2, FMA
//! and F16C.
//!
//! Each weight row is streamed from memory once, widened to f32 eight lanes at a time
//! in registers (bf16 by a 16-bit shift, f16 by `vcvtph2ps`, int8 by sign extension,
//! conversion and its block's scale) and fused-multiply-added into independent
//! accumulators, as llama.cpp's and candle's quantized `vec_dot` kernels do; software
//! prefetch runs ahead of the stream. With several rows of `x` the accumulators form a
//! register tile of rows of `x` × rows of `w` (tinyBLAS's outer-product tiling in
//! llamafile's `sgemm`), so every widened weight vector meets up to four rows of `x`
//! and every `x` vector up to three weight rows before it leaves the registers. Unlike
//! llama.cpp, `x` stays f32 (no quantized activations): every format computes the f32
//! product of its widened weights.
//!
//! Every weight format goes through the same loop in the same order, so a bf16 weight
//! and an f32 copy of its values give bit-identical results.

use half::{bf16, f16};

use super::rows::INT8_BLOCK;

/// Element types the kernels widen: f32, bf16, f16.
pub trait Lanes: Copy {
    /// The element as f32 (the scalar tail of a row).
    fn wide(self) -> f32;
}

impl Lanes for f32 {
    #[inline(always)]
    fn wide(self) -> f32 {
        self
    }
}

impl Lanes for bf16 {
    #[inline(always)]
    fn wide(self) -> f32 {
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }
}

impl Lanes for f16 {
    #[inline(always)]
    fn wide(self) -> f32 {
        self.to_f32()
    }
}

/// Whether the kernels here run on this CPU.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Most rows of `x` the kernels here take (beyond, the blocked matrix multiply wins).
pub const MAX_ROWS: usize = 32;

/// `out[r * m + j] = xs[j] · w[r]` for every row `r` of the dense (count, k) block `w`
/// and each of the `m` rows of `xs` (m ≤ [`MAX_ROWS`]). False, computing nothing, when
/// the CPU lacks the kernels' instructions.
pub fn dense_dots<T: Lanes + x86::Load>(w: &[T], k: usize, xs: &[f32], out: &mut [f32]) -> bool {
    if !available() || k == 0 || xs.len() / k > MAX_ROWS {
        return false;
    }
    assert_eq!(
        out.len(),
        w.len() / k * (xs.len() / k),
        "dense_dots: output size"
    );
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `available()` checked AVX2, FMA and F16C; `Dense` reads whole rows of `w`.
    #[allow(unsafe_code)]
    unsafe {
        x86::tiles(&x86::Dense { w, k }, xs, out)
    };
    true
}

/// As [`dense_dots`] for int8 rows with one scale per block of 32 columns (`scales`
/// holds `k.div_ceil(32)` per row).
pub fn int8_dots(q: &[i8], scales: &[f32], k: usize, xs: &[f32], out: &mut [f32]) -> bool {
    if !available() || k == 0 || xs.len() / k > MAX_ROWS {
        return false;
    }
    assert_eq!(
        out.len(),
        q.len() / k * (xs.len() / k),
        "int8_dots: output size"
    );
    assert_eq!(
        scales.len(),
        q.len() / k * k.div_ceil(INT8_BLOCK),
        "int8_dots: scales"
    );
    #[cfg(target_arch = "x86_64")]
    // SAFETY: as in `dense_dots`; `scales` has a scale for every block of every row.
    #[allow(unsafe_code)]
    unsafe {
        x86::tiles(
            &x86::Int8 {
                q,
                scales,
                k,
                bpr: k.div_ceil(INT8_BLOCK),
            },
            xs,
            out,
        )
    };
    true
}

/// Panics unless `rows` rows of `len` values at `stride` fit in `base_len` values.
fn check_strided(rows: usize, stride: usize, len: usize, base_len: usize) {
    if let Some(last) = rows.checked_sub(1) {
        assert!(last * stride + len <= base_len, "strided rows past the end");
    }
}

/// `out[j] = q · base[j * stride..][..q.len()]` for every `j < out.len()`: one query
/// against rows read in place at a stride (one head's keys in a cache row of all heads).
pub fn strided_dots(q: &[f32], base: &[f32], stride: usize, out: &mut [f32]) {
    let len = q.len();
    check_strided(out.len(), stride, len, base.len());
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: the features are checked; every row read lies within `base` (asserted).
        #[allow(unsafe_code)]
        unsafe {
            x86::strided_dots(q, base, stride, out)
        };
        return;
    }
    for (j, o) in out.iter_mut().enumerate() {
        let row = &base[j * stride..j * stride + len];
        *o = q.iter().zip(row).map(|(a, b)| a * b).sum();
    }
}

/// `out += Σ_j p[j] · base[j * stride..][..out.len()]`: a weighted sum of rows read in
/// place at a stride (one head's values).
pub fn strided_axpys(p: &[f32], base: &[f32], stride: usize, out: &mut [f32]) {
    let len = out.len();
    check_strided(p.len(), stride, len, base.len());
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: as in `strided_dots`.
        #[allow(unsafe_code)]
        unsafe {
            x86::strided_axpys(p, base, stride, out)
        };
        return;
    }
    for (j, &pj) in p.iter().enumerate() {
        let row = &base[j * stride..j * stride + len];
        for (o, v) in out.iter_mut().zip(row) {
            *o += pj * v;
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod x86 {
    /// Without x86-64 no element type has a kernel (see [`super::available`]).
    pub trait Load {}
    impl<T> Load for T {}
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
pub mod x86 {
    use std::arch::x86_64::*;

    use half::{bf16, f16};

    use super::Lanes;
    use crate::linear::rows::INT8_BLOCK;

    /// Bytes ahead of the current chunk that the weight stream is prefetched.
    const PREFETCH: usize = 8192;

    /// Eight consecutive elements widened to f32 lanes.
    pub trait Load: Copy {
        /// # Safety
        /// `p` points at 8 readable elements and the CPU has AVX2 and F16C.
        unsafe fn load8(p: *const Self) -> __m256;
    }

    impl Load for f32 {
        #[inline]
        #[target_feature(enable = "avx2,f16c")]
        unsafe fn load8(p: *const Self) -> __m256 {
            // SAFETY: the caller's contract.
            unsafe { _mm256_loadu_ps(p) }
        }
    }

    impl Load for bf16 {
        #[inline]
        #[target_feature(enable = "avx2,f16c")]
        unsafe fn load8(p: *const Self) -> __m256 {
            // SAFETY: the caller's contract; bf16 is the top half of an f32.
            unsafe {
                let h = _mm_loadu_si128(p.cast());
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
            }
        }
    }

    impl Load for f16 {
        #[inline]
        #[target_feature(enable = "avx2,f16c")]
        unsafe fn load8(p: *const Self) -> __m256 {
            // SAFETY: the caller's contract.
            unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
        }
    }

    /// Asks for the cache line [`PREFETCH`] bytes after `p` (the hardware prefetcher
    /// alone leaves the narrow weight streams short of the memory bandwidth).
    #[inline(always)]
    fn prefetch(p: *const i8) {
        // SAFETY: a prefetch is a hint; it never faults, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH)) }
    }

    /// The sum of the eight lanes, in a fixed order.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// Rows of weights the tile kernel reads eight columns at a time.
    pub trait Source {
        /// Rows.
        fn rows(&self) -> usize;
        /// Columns.
        fn cols(&self) -> usize;
        /// Columns `at..at + 8` of row `r`, widened.
        ///
        /// # Safety
        /// AVX2 and F16C; `r < rows()`, `at + 8 <= cols()`.
        unsafe fn load8(&self, r: usize, at: usize) -> __m256;
        /// Asks for the stream of row `r` ahead of column `at`.
        fn prefetch(&self, r: usize, at: usize);
        /// Column `t` of row `r` as f32 (the scalar tail).
        fn at(&self, r: usize, t: usize) -> f32;
    }

    /// A dense (rows, k) block.
    pub struct Dense<'a, T> {
        pub w: &'a [T],
        pub k: usize,
    }

    impl<T: Lanes + Load> Source for Dense<'_, T> {
        fn rows(&self) -> usize {
            self.w.len() / self.k
        }
        fn cols(&self) -> usize {
            self.k
        }
        #[inline(always)]
        unsafe fn load8(&self, r: usize, at: usize) -> __m256 {
            // SAFETY: the caller's bounds.
            unsafe { T::load8(self.w.as_ptr().add(r * self.k + at)) }
        }
        #[inline(always)]
        fn prefetch(&self, r: usize, at: usize) {
            // One request per cache line of the stream.
            if (at * size_of::<T>()) % 64 == 0 {
                prefetch(self.w.as_ptr().wrapping_add(r * self.k + at).cast());
            }
        }
        #[inline(always)]
        fn at(&self, r: usize, t: usize) -> f32 {
            self.w[r * self.k + t].wide()
        }
    }

    /// A (rows, k) block of int8 values with one scale per 32 columns of a row.
    pub struct Int8<'a> {
        pub q: &'a [i8],
        pub scales: &'a [f32],
        pub k: usize,
        /// Scale blocks per row.
        pub bpr: usize,
    }

    impl Source for Int8<'_> {
        fn rows(&self) -> usize {
            self.q.len() / self.k
        }
        fn cols(&self) -> usize {
            self.k
        }
        /// Widened and multiplied by the block's scale: the value
        /// `Int8Rows::widen_row` gives.
        #[inline(always)]
        unsafe fn load8(&self, r: usize, at: usize) -> __m256 {
            let bpr = self.bpr;
            // SAFETY: the caller's bounds; block `at / 32` of row `r` exists.
            unsafe {
                let q = self.q.as_ptr().add(r * self.k + at);
                let scale = *self.scales.get_unchecked(r * bpr + at / INT8_BLOCK);
                let wi = _mm256_cvtepi8_epi32(_mm_loadl_epi64(q.cast()));
                _mm256_mul_ps(_mm256_cvtepi32_ps(wi), _mm256_set1_ps(scale))
            }
        }
        #[inline(always)]
        fn prefetch(&self, r: usize, at: usize) {
            if at % 64 == 0 {
                prefetch(self.q.as_ptr().wrapping_add(r * self.k + at));
            }
        }
        #[inline(always)]
        fn at(&self, r: usize, t: usize) -> f32 {
            let bpr = self.bpr;
            f32::from(self.q[r * self.k + t]) * self.scales[r * bpr + t / INT8_BLOCK]
        }
    }

    /// `out[r * m + j] = xs[j] · w[r]` for every row of `w` and the m rows of `xs`: the
    /// rows of `x` in groups of four (the register tile's height), each group over
    /// every row of `w` (which a task's block keeps in L2 between groups).
    ///
    /// # Safety
    /// AVX2, FMA and F16C; `xs.len() == m * k`, `out.len() == w.rows() * m`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn tiles<S: Source>(w: &S, xs: &[f32], out: &mut [f32]) {
        let k = w.cols();
        let m = xs.len() / k;
        let mut j0 = 0;
        while j0 < m {
            let g = &xs[j0 * k..];
            // SAFETY: the caller's sizes; each call writes columns j0.. of its group.
            unsafe {
                match m - j0 {
                    1 => tile::<S, 1, 1, 4>(w, g, m, j0, out, 0),
                    2 => tile::<S, 2, 2, 2>(w, g, m, j0, out, 0),
                    3 => tile::<S, 3, 2, 2>(w, g, m, j0, out, 0),
                    _ => tile::<S, 4, 3, 1>(w, g, m, j0, out, 0),
                }
            }
            j0 += 4;
        }
    }

    /// Rows `r0..` of `w`, N at a time, against the M rows of `x` starting at `xs`:
    /// M × N × A accumulators, chunk `i` of eight columns in accumulator `i % A`.
    /// Writes `out[r * m + j0 + j]`.
    ///
    /// # Safety
    /// As [`tiles`]; `xs` holds at least M rows of k.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile<S: Source, const M: usize, const N: usize, const A: usize>(
        w: &S,
        xs: &[f32],
        m: usize,
        j0: usize,
        out: &mut [f32],
        r0: usize,
    ) {
        let (rows, k) = (w.rows(), w.cols());
        let chunks = k / 8;
        let x = xs.as_ptr();
        let mut r = r0;
        while r + N <= rows {
            // SAFETY: every column read is < k, every row < rows, every x row < M.
            unsafe {
                let mut acc = [[[_mm256_setzero_ps(); A]; N]; M];
                let mut c = 0;
                while c + A <= chunks {
                    for a in 0..A {
                        let at = (c + a) * 8;
                        let mut wv = [_mm256_setzero_ps(); N];
                        for (n, wv) in wv.iter_mut().enumerate() {
                            w.prefetch(r + n, at);
                            *wv = w.load8(r + n, at);
                        }
                        for (j, acc) in acc.iter_mut().enumerate() {
                            let xv = _mm256_loadu_ps(x.add(j * k + at));
                            for (acc, wv) in acc.iter_mut().zip(&wv) {
                                acc[a] = _mm256_fmadd_ps(xv, *wv, acc[a]);
                            }
                        }
                    }
                    c += A;
                }
                while c < chunks {
                    let at = c * 8;
                    let mut wv = [_mm256_setzero_ps(); N];
                    for (n, wv) in wv.iter_mut().enumerate() {
                        *wv = w.load8(r + n, at);
                    }
                    for (j, acc) in acc.iter_mut().enumerate() {
                        let xv = _mm256_loadu_ps(x.add(j * k + at));
                        for (acc, wv) in acc.iter_mut().zip(&wv) {
                            acc[0] = _mm256_fmadd_ps(xv, *wv, acc[0]);
                        }
                    }
                    c += 1;
                }
                for (j, acc) in acc.iter().enumerate() {
                    for (n, acc) in acc.iter().enumerate() {
                        let mut v = acc[0];
                        for a in &acc[1..] {
                            v = _mm256_add_ps(v, *a);
                        }
                        let mut s = hsum(v);
                        for t in chunks * 8..k {
                            s += xs[j * k + t] * w.at(r + n, t);
                        }
                        out[(r + n) * m + j0 + j] = s;
                    }
                }
            }
            r += N;
        }
        if r < rows {
            // SAFETY: as above, for the last rows one at a time.
            unsafe { tile::<S, M, 1, A>(w, xs, m, j0, out, r) }
        }
    }

    /// See [`super::strided_dots`].
    ///
    /// # Safety
    /// AVX2 and FMA; `(out.len() - 1) * stride + q.len() <= base.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn strided_dots(q: &[f32], base: &[f32], stride: usize, out: &mut [f32]) {
        let len = q.len();
        let chunks = len / 8;
        for (j, o) in out.iter_mut().enumerate() {
            // SAFETY: row j spans `j * stride .. j * stride + len` within `base`.
            unsafe {
                let row = base.as_ptr().add(j * stride);
                let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                let mut c = 0;
                while c + 2 <= chunks {
                    let (at0, at1) = (c * 8, c * 8 + 8);
                    let q0 = _mm256_loadu_ps(q.as_ptr().add(at0));
                    let q1 = _mm256_loadu_ps(q.as_ptr().add(at1));
                    a0 = _mm256_fmadd_ps(q0, _mm256_loadu_ps(row.add(at0)), a0);
                    a1 = _mm256_fmadd_ps(q1, _mm256_loadu_ps(row.add(at1)), a1);
                    c += 2;
                }
                if c < chunks {
                    let at = c * 8;
                    let qv = _mm256_loadu_ps(q.as_ptr().add(at));
                    a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(row.add(at)), a0);
                }
                let mut s = hsum(_mm256_add_ps(a0, a1));
                for t in chunks * 8..len {
                    s += q[t] * *row.add(t);
                }
                *o = s;
            }
        }
    }

    /// See [`super::strided_axpys`].
    ///
    /// # Safety
    /// AVX2 and FMA; `(p.len() - 1) * stride + out.len() <= base.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn strided_axpys(p: &[f32], base: &[f32], stride: usize, out: &mut [f32]) {
        let len = out.len();
        let chunks = len / 8;
        let o = out.as_mut_ptr();
        for (j, &pj) in p.iter().enumerate() {
            // SAFETY: row j lies within `base`; `o` has `len` values.
            unsafe {
                let row = base.as_ptr().add(j * stride);
                let pv = _mm256_set1_ps(pj);
                for c in 0..chunks {
                    let v = _mm256_loadu_ps(row.add(c * 8));
                    let acc = _mm256_loadu_ps(o.add(c * 8));
                    _mm256_storeu_ps(o.add(c * 8), _mm256_fmadd_ps(pv, v, acc));
                }
                for t in chunks * 8..len {
                    *o.add(t) += pj * *row.add(t);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linear::rows::{Dense, Int8Rows, WeightRows};
    use crate::linear::simd512::{available512, f32_dots512};

    fn values(len: usize, seed: u32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state >> 8) as f32 / (1u32 << 23) as f32 - 1.0
            })
            .collect()
    }

    fn close(a: &[f32], b: &[f32], k: usize, what: &str) {
        assert_eq!(a.len(), b.len(), "{what}");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            let tol = 1e-5 * (k as f32).sqrt() * x.abs().max(1.0);
            assert!(
                (x - y).abs() <= tol,
                "{what}: element {i} is {x}, expected {y}"
            );
        }
    }

    /// The portable per-row loop (the path of CPUs without AVX2) and the tiles agree,
    /// for every format and every tile shape (and, with AVX-512, the 512-bit tiles of
    /// the widened rows).
    #[test]
    fn tiles_agree_with_the_portable_rows() {
        if !available() {
            return;
        }
        let (n, k) = (11usize, 301usize);
        let w = values(n * k, 3);
        let bf: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let hf: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
        let q = Int8Rows::quantize(n, k, |r, buf| buf.copy_from_slice(&w[r * k..(r + 1) * k]));
        let f32_rows = Dense { data: &w[..], k };
        let bf_rows = Dense { data: &bf[..], k };
        let hf_rows = Dense { data: &hf[..], k };
        let kinds: [(&str, &dyn WeightRows); 4] = [
            ("f32", &f32_rows),
            ("bf16", &bf_rows),
            ("f16", &hf_rows),
            ("int8", &q),
        ];
        // Up to 9 rows: every 256-bit tile; up to 17 every 512-bit one.
        for m in 1..=17 {
            let xs = values(m * k, m as u32 + 10);
            for (name, rows) in kinds {
                let mut tiled = vec![0f32; n * m];
                assert!(rows.block_dots(0, &xs, &mut tiled));
                let mut portable = vec![0f32; n * m];
                let mut scratch = Vec::new();
                for (r, outs) in portable.chunks_exact_mut(m).enumerate() {
                    rows.row_dots(r, &xs, outs, &mut scratch);
                }
                close(&tiled, &portable, k, &format!("{name}, m {m}"));
                if available512() {
                    let mut wide = vec![0f32; n * k];
                    for (r, row) in wide.chunks_exact_mut(k).enumerate() {
                        rows.widen_row(r, row);
                    }
                    let mut tiled512 = vec![0f32; n * m];
                    assert!(f32_dots512(&wide, k, &xs, &mut tiled512));
                    close(&tiled512, &portable, k, &format!("{name} widened, m {m}"));
                }
            }
        }
    }

    #[test]
    fn strided_dots_and_weighted_sums_read_one_head_of_each_row() {
        let (rows, stride, len, offset) = (13usize, 40usize, 19usize, 7usize);
        let base = values(rows * stride, 5);
        let q = values(len, 6);
        let mut got = vec![0f32; rows];
        strided_dots(&q, &base[offset..], stride, &mut got);
        let want: Vec<f32> = (0..rows)
            .map(|j| (0..len).map(|t| q[t] * base[offset + j * stride + t]).sum())
            .collect();
        close(&got, &want, len, "strided_dots");
        let p = values(rows, 8);
        let mut sums = vec![0.5f32; len];
        strided_axpys(&p, &base[offset..], stride, &mut sums);
        let want: Vec<f32> = (0..len)
            .map(|t| {
                0.5 + (0..rows)
                    .map(|j| p[j] * base[offset + j * stride + t])
                    .sum::<f32>()
            })
            .collect();
        close(&sums, &want, rows, "strided_axpys");
    }
}
