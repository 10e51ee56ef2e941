//! The rows of a weight matrix as the kernels read them: dense f32, bf16 or f16, or
//! int8 with one scale per block of 32 along each row. Each kind says how one of its
//! rows meets rows of an f32 `x` ([`WeightRows::row_dots`], for the decode kernel) and
//! how it widens to f32 ([`WeightRows::widen_row`], for the prefill kernel's panels).

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

/// Columns of one int8 block; each block has its own scale.
pub const INT8_BLOCK: usize = 32;

/// A row-major (n, k) weight matrix.
pub trait WeightRows: Sync {
    /// n.
    fn rows(&self) -> usize;
    /// k.
    fn cols(&self) -> usize;
    /// `outs[j] = xs[j] · row r` for every row `j` of `xs` (each k long); `scratch` is a
    /// buffer the kind may widen the row into.
    fn row_dots(&self, r: usize, xs: &[f32], outs: &mut [f32], scratch: &mut Vec<f32>);
    /// `out[(r - first) * m + j] = xs[j] · row r` for the `out.len() / m` rows from
    /// `first` with one of the hand-written kernels ([`super::simd`]); false, computing
    /// nothing, where none runs on this CPU.
    fn block_dots(&self, _first: usize, _xs: &[f32], _out: &mut [f32]) -> bool {
        false
    }
    /// Row `r` widened to f32 into `out` (k long).
    fn widen_row(&self, r: usize, out: &mut [f32]);
    /// Rows `first..first + out.len() / k` widened to f32 into `out`, row-major.
    fn widen_rows(&self, first: usize, out: &mut [f32]) {
        for (i, row) in out.chunks_exact_mut(self.cols().max(1)).enumerate() {
            self.widen_row(first + i, row);
        }
    }
    /// Rows `first..first + count` as they are, when the weight already holds f32 (the
    /// panel kernel then reads them in place instead of widening a copy).
    fn f32_rows(&self, _first: usize, _count: usize) -> Option<&[f32]> {
        None
    }
}

/// Element types of dense weights.
pub trait Elem: Copy + Send + Sync {
    /// The slice itself when the elements are f32.
    fn as_f32(values: &[Self]) -> Option<&[f32]>;
}

impl Elem for f32 {
    fn as_f32(values: &[Self]) -> Option<&[f32]> {
        Some(values)
    }
}

impl Elem for bf16 {
    fn as_f32(_: &[Self]) -> Option<&[f32]> {
        None
    }
}

impl Elem for f16 {
    fn as_f32(_: &[Self]) -> Option<&[f32]> {
        None
    }
}

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

/// A dense matrix of f32, bf16 or f16 elements.
#[derive(Debug, Clone, Copy)]
pub struct Dense<'a, W> {
    pub data: &'a [W],
    pub k: usize,
}

impl<W> Dense<'_, W> {
    fn row(&self, r: usize) -> &[W] {
        &self.data[r * self.k..(r + 1) * self.k]
    }
}

macro_rules! dense_rows {
    ($t:ty, |$row:ident, $xs:ident, $outs:ident, $scratch:ident| $dots:block, |$wrow:ident, $out:ident| $widen:block) => {
        impl WeightRows for Dense<'_, $t> {
            fn rows(&self) -> usize {
                self.data.len() / self.k
            }
            fn cols(&self) -> usize {
                self.k
            }
            #[inline(always)]
            fn row_dots(&self, r: usize, $xs: &[f32], $outs: &mut [f32], $scratch: &mut Vec<f32>) {
                let $row = self.row(r);
                $dots
            }
            fn block_dots(&self, first: usize, xs: &[f32], out: &mut [f32]) -> bool {
                let count = out.len() / (xs.len() / self.k);
                let w = &self.data[first * self.k..(first + count) * self.k];
                super::simd::dense_dots(w, self.k, xs, out)
            }
            fn widen_row(&self, r: usize, $out: &mut [f32]) {
                let $wrow = self.row(r);
                $widen
            }
            fn f32_rows(&self, first: usize, count: usize) -> Option<&[f32]> {
                <$t as Elem>::as_f32(&self.data[first * self.k..(first + count) * self.k])
            }
        }
    };
}

dense_rows!(
    f32,
    |row, xs, outs, _scratch| {
        for (x, o) in xs.chunks_exact(row.len()).zip(outs) {
            *o = dot(x, row, |v| v);
        }
    },
    |row, out| { out.copy_from_slice(row) }
);

// bf16 → f32 is a 16-bit shift, done inside the product.
dense_rows!(
    bf16,
    |row, xs, outs, _scratch| {
        let bits: &[u16] = row.reinterpret_cast();
        for (x, o) in xs.chunks_exact(row.len()).zip(outs) {
            *o = dot(x, bits, |v| f32::from_bits(u32::from(v) << 16));
        }
    },
    |row, out| { row.convert_to_f32_slice(out) }
);

// f16 is widened once per row into an L1-sized buffer (F16C where the CPU has it).
dense_rows!(
    f16,
    |row, xs, outs, scratch| {
        scratch.resize(row.len(), 0.0);
        row.convert_to_f32_slice(scratch);
        for (x, o) in xs.chunks_exact(row.len()).zip(outs) {
            *o = dot(x, scratch, |v| v);
        }
    },
    |row, out| { row.convert_to_f32_slice(out) }
);

/// An (n, k) matrix of int8 values with one f32 scale per block of [`INT8_BLOCK`]
/// columns of each row (the last block of a row may be shorter): `w ≈ q · scale`, the
/// symmetric absmax scheme of llama.cpp's `Q8_0`, with f32 scales.
#[derive(Debug, Clone)]
pub struct Int8Rows {
    pub q: Vec<i8>,
    pub scales: Vec<f32>,
    pub n: usize,
    pub k: usize,
}

impl Int8Rows {
    /// Scale blocks per row.
    pub fn blocks_per_row(k: usize) -> usize {
        k.div_ceil(INT8_BLOCK)
    }

    /// Quantizes rows given one at a time as f32 (`row(r, buf)` fills row `r`).
    pub fn quantize(n: usize, k: usize, row: impl Fn(usize, &mut [f32]) + Sync) -> Self {
        use rayon::prelude::*;
        let bpr = Self::blocks_per_row(k);
        let mut q = vec![0i8; n * k];
        let mut scales = vec![0f32; n * bpr];
        q.par_chunks_mut(k)
            .zip(scales.par_chunks_mut(bpr))
            .enumerate()
            .for_each_init(
                || vec![0f32; k],
                |buf, (r, (q, scales))| {
                    row(r, buf);
                    for ((w, q), s) in buf
                        .chunks(INT8_BLOCK)
                        .zip(q.chunks_mut(INT8_BLOCK))
                        .zip(scales.iter_mut())
                    {
                        let max = w.iter().fold(0f32, |m, v| m.max(v.abs()));
                        *s = max / 127.0;
                        let inv = if max > 0.0 { 127.0 / max } else { 0.0 };
                        for (q, &v) in q.iter_mut().zip(w) {
                            *q = (v * inv).round().clamp(-127.0, 127.0) as i8;
                        }
                    }
                },
            );
        Self { q, scales, n, k }
    }

    /// Bytes held: the values and their scales.
    pub fn bytes(&self) -> usize {
        self.q.len() + 4 * self.scales.len()
    }

    fn row(&self, r: usize) -> (&[i8], &[f32]) {
        let bpr = Self::blocks_per_row(self.k);
        (
            &self.q[r * self.k..(r + 1) * self.k],
            &self.scales[r * bpr..(r + 1) * bpr],
        )
    }
}

/// `x · (q ⊙ scales)` for one int8 row: 16 partial sums across blocks, each element
/// scaled by its block's scale as it is widened (no per-block horizontal sum).
#[inline(always)]
fn dot_int8(x: &[f32], q: &[i8], scales: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (cx, cq) = (x.chunks_exact(INT8_BLOCK), q.chunks_exact(INT8_BLOCK));
    let (rx, rq) = (cx.remainder(), cq.remainder());
    for ((x, q), &s) in cx.zip(cq).zip(scales) {
        for h in 0..INT8_BLOCK / 16 {
            for i in 0..16 {
                acc[i] += x[h * 16 + i] * (f32::from(q[h * 16 + i]) * s);
            }
        }
    }
    let mut sum: f32 = acc.iter().sum();
    if let Some(&s) = scales.get(x.len() / INT8_BLOCK) {
        for (x, &q) in rx.iter().zip(rq) {
            sum += x * (f32::from(q) * s);
        }
    }
    sum
}

impl WeightRows for Int8Rows {
    fn rows(&self) -> usize {
        self.n
    }
    fn cols(&self) -> usize {
        self.k
    }
    #[inline(always)]
    fn row_dots(&self, r: usize, xs: &[f32], outs: &mut [f32], _: &mut Vec<f32>) {
        let (q, scales) = self.row(r);
        for (x, o) in xs.chunks_exact(self.k).zip(outs) {
            *o = dot_int8(x, q, scales);
        }
    }
    fn block_dots(&self, first: usize, xs: &[f32], out: &mut [f32]) -> bool {
        let count = out.len() / (xs.len() / self.k);
        let bpr = Self::blocks_per_row(self.k);
        let q = &self.q[first * self.k..(first + count) * self.k];
        let scales = &self.scales[first * bpr..(first + count) * bpr];
        super::simd::int8_dots(q, scales, self.k, xs, out)
    }
    fn widen_row(&self, r: usize, out: &mut [f32]) {
        let (q, scales) = self.row(r);
        for ((o, q), &s) in out
            .chunks_mut(INT8_BLOCK)
            .zip(q.chunks(INT8_BLOCK))
            .zip(scales)
        {
            for (o, &q) in o.iter_mut().zip(q) {
                *o = f32::from(q) * s;
            }
        }
    }
}
