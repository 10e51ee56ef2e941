//! The 512-bit register tiles of [`super::gemv::widened_rows`]: f32 weight blocks (the
//! caller widens any other format first, so every format computes the same sums)
//! against any number of rows of `x`, chosen at run time when the CPU has AVX-512F.
//! The same outer-product tiling as the 256-bit kernels of [`super::simd`] (tinyBLAS's
//! in llamafile's `sgemm`), with sixteen lanes and 32 registers: 8 rows of `x` × 3
//! weight rows accumulate in 24 of them.

/// Whether [`f32_dots512`] runs on this CPU (AVX-512F besides what [`super::simd::available`]
/// checks).
pub fn available512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::simd::available() && std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// As [`super::simd::dense_dots`] for an f32 block, with 512-bit register tiles of up
/// to 8 rows of `x` × 3 weight rows, for any number of rows of `x` (the caller keeps
/// `w` and a group of `x` in cache). False, computing nothing, without AVX-512F.
pub fn f32_dots512(w: &[f32], k: usize, xs: &[f32], out: &mut [f32]) -> bool {
    if !available512() || k == 0 {
        return false;
    }
    assert_eq!(
        out.len(),
        w.len() / k * (xs.len() / k),
        "f32_dots512: output size"
    );
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `available512()` checked AVX-512F, AVX2, FMA and F16C.
    #[allow(unsafe_code)]
    unsafe {
        x86::tiles512(w, k, xs, out)
    };
    true
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    use std::arch::x86_64::*;

    use crate::linear::simd::x86::hsum;

    /// `out[r * m + j] = xs[j] · w[r]` for an f32 block, sixteen lanes at a time: the
    /// rows of `x` in groups of eight, the rest in one smaller group.
    ///
    /// # Safety
    /// AVX-512F, AVX2 and FMA; `xs.len() == m * k`, `out.len() == w.len() / k * m`.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub unsafe fn tiles512(w: &[f32], k: usize, xs: &[f32], out: &mut [f32]) {
        let m = xs.len() / k;
        let mut j0 = 0;
        while j0 < m {
            let g = &xs[j0 * k..];
            // SAFETY: the caller's sizes; each call writes columns j0.. of its group.
            unsafe {
                match m - j0 {
                    1 => tile16::<1, 4, 4>(w, k, g, m, j0, out, 0),
                    2 => tile16::<2, 4, 2>(w, k, g, m, j0, out, 0),
                    3 => tile16::<3, 4, 2>(w, k, g, m, j0, out, 0),
                    4 => tile16::<4, 4, 1>(w, k, g, m, j0, out, 0),
                    5 => tile16::<5, 4, 1>(w, k, g, m, j0, out, 0),
                    6 => tile16::<6, 4, 1>(w, k, g, m, j0, out, 0),
                    7 => tile16::<7, 3, 1>(w, k, g, m, j0, out, 0),
                    _ => tile16::<8, 3, 1>(w, k, g, m, j0, out, 0),
                }
            }
            j0 += 8;
        }
    }

    /// Rows `r0..` of `w`, N at a time, against the M rows of `x` from `xs`: M × N × A
    /// accumulators, chunk `i` of sixteen columns in accumulator `i % A`.
    ///
    /// # Safety
    /// As [`tiles512`]; `xs` holds at least M rows of k.
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn tile16<const M: usize, const N: usize, const A: usize>(
        w: &[f32],
        k: usize,
        xs: &[f32],
        m: usize,
        j0: usize,
        out: &mut [f32],
        r0: usize,
    ) {
        let rows = w.len() / k;
        let chunks = k / 16;
        let (x, wp) = (xs.as_ptr(), w.as_ptr());
        let mut r = r0;
        while r + N <= rows {
            // SAFETY: every column read is < k, every row < rows, every x row < M.
            unsafe {
                let mut acc = [[[_mm512_setzero_ps(); A]; N]; M];
                let mut c = 0;
                while c < chunks {
                    let a = c % A;
                    let at = c * 16;
                    let mut wv = [_mm512_setzero_ps(); N];
                    for (n, wv) in wv.iter_mut().enumerate() {
                        *wv = _mm512_loadu_ps(wp.add((r + n) * k + at));
                    }
                    for (j, acc) in acc.iter_mut().enumerate() {
                        let xv = _mm512_loadu_ps(x.add(j * k + at));
                        for (acc, wv) in acc.iter_mut().zip(&wv) {
                            acc[a] = _mm512_fmadd_ps(xv, *wv, acc[a]);
                        }
                    }
                    c += 1;
                }
                for (j, acc) in acc.iter().enumerate() {
                    for (n, acc) in acc.iter().enumerate() {
                        let mut v = acc[0];
                        for a in &acc[1..] {
                            v = _mm512_add_ps(v, *a);
                        }
                        let mut s = hsum(_mm256_add_ps(
                            _mm512_castps512_ps256(v),
                            _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v))),
                        ));
                        for t in chunks * 16..k {
                            s += xs[j * k + t] * w[(r + n) * k + t];
                        }
                        out[(r + n) * m + j0 + j] = s;
                    }
                }
            }
            r += N;
        }
        if r < rows {
            // SAFETY: as above, for the last rows one at a time.
            unsafe { tile16::<M, 1, A>(w, k, xs, m, j0, out, r) }
        }
    }
}
