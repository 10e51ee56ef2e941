//! Pillow's `Image.resize(size, Image.BICUBIC)` for 8-bit RGB, reproduced bit for bit.
//!
//! Mirrors Pillow 13 `src/libImaging/Resample.c` for a whole-image box (`box = (0, 0, w, h)`):
//!
//! - `precompute_coeffs`: `scale = (in1 − in0) / out` with the box edges as `float`,
//!   `filterscale = max(scale, 1)`, `support = 2 · filterscale`, `ksize = 2·ceil(support) + 1`;
//!   for output `xx`: `center = in0 + (xx + 0.5)·scale`, window `[(int)(center − support + 0.5),
//!   (int)(center + support + 0.5))` clamped to the image, weights
//!   `bicubic((x + xmin − center + 0.5) / filterscale)` with a = −0.5, divided by their f64 sum
//!   (unless it is 0);
//! - `normalize_coeffs_8bpc`: weights to fixed point with `PRECISION_BITS = 32 − 8 − 2`,
//!   `(int)(w·2^22 ± 0.5)` (C truncation, i.e. rounding half away from zero);
//! - `ImagingResampleHorizontal_8bpc` / `ImagingResampleVertical_8bpc`: i32 accumulators that
//!   start at `1 << (PRECISION_BITS − 1)`, `>> PRECISION_BITS`, clipped to 0..=255;
//! - `ImagingResampleInner`: the horizontal pass first, over only the source rows the vertical
//!   pass reads (`bounds_vert` shifted by the first of them), its result stored as u8 — except
//!   that Pillow 13 runs the vertical pass first when the height shrinks by more than twice as
//!   many pixels as the width (see [`vertical_first`]); a pass whose size is unchanged is
//!   skipped, and an unchanged size is a plain copy (as `Image.resize` returns `self.copy()`).
//!
//! The filter is evaluated without fused multiply-add, as the x86-64 Pillow wheels compute it.

use std::borrow::Cow;

use image::RgbImage;

/// Fixed-point fraction bits of the 8-bit resampler (`PRECISION_BITS` in Resample.c).
const PRECISION_BITS: u32 = 32 - 8 - 2;
/// Support of the bicubic filter at scale 1.
const BICUBIC_SUPPORT: f64 = 2.0;
/// Channels per pixel of [`RgbImage`].
const CHANNELS: usize = 3;

/// Keys cubic convolution with a = −0.5 (`bicubic_filter` in Resample.c).
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// The fixed-point weights of one resampling direction.
struct Coeffs {
    /// Weights per output position (`ksize` slots, the first `count` used).
    ksize: usize,
    /// Per output position: first source index and number of source samples.
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
}

impl Coeffs {
    fn of(&self, out: usize) -> (usize, &[i32]) {
        let (first, count) = self.bounds[out];
        let start = out * self.ksize;
        (first, &self.weights[start..start + count])
    }
}

/// `precompute_coeffs` followed by `normalize_coeffs_8bpc`, for the box `[0, in_size)`.
fn precompute_coeffs(in_size: usize, out_size: usize) -> Coeffs {
    // The box edges are C floats in Pillow.
    let in0 = 0.0_f32;
    let in1 = in_size as f32;
    let scale = f64::from(in1 - in0) / out_size as f64;
    let filterscale = if scale < 1.0 { 1.0 } else { scale };
    let support = BICUBIC_SUPPORT * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let ss = 1.0 / filterscale;

    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0_i32; out_size * ksize];
    let mut k = vec![0.0_f64; ksize];
    for xx in 0..out_size {
        let center = f64::from(in0) + (xx as f64 + 0.5) * scale;
        // `as i64` truncates towards zero like C's `(int)`.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
        let count = (xmax - xmin).clamp(0, ksize as i64) as usize;
        let xmin = xmin as usize;

        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(count) {
            let w = bicubic(((x + xmin) as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        let row = &mut weights[xx * ksize..xx * ksize + count];
        for (dst, &kx) in row.iter_mut().zip(&k) {
            let w = if ww != 0.0 { kx / ww } else { kx };
            let fixed = w * f64::from(1_u32 << PRECISION_BITS);
            *dst = if w < 0.0 {
                (-0.5 + fixed) as i32
            } else {
                (0.5 + fixed) as i32
            };
        }
        bounds.push((xmin, count));
    }
    Coeffs {
        ksize,
        bounds,
        weights,
    }
}

/// `clip8`: drop the fraction bits (arithmetic shift) and saturate to a byte.
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// The rounding offset every accumulator starts from.
const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// `ImagingResampleHorizontal_8bpc` over source rows `rows` of a `width`-wide RGB buffer.
/// Accumulation wraps like the C `int` arithmetic would (it cannot overflow for 8-bit input).
fn resample_horizontal(
    src: &[u8],
    width: usize,
    rows: std::ops::Range<usize>,
    coeffs: &Coeffs,
) -> Vec<u8> {
    let out_w = coeffs.bounds.len();
    let mut out = vec![0_u8; out_w * rows.len() * CHANNELS];
    let src_stride = width * CHANNELS;
    for (dst_row, y) in out.chunks_exact_mut(out_w * CHANNELS).zip(rows) {
        let src_row = &src[y * src_stride..(y + 1) * src_stride];
        for (xx, dst) in dst_row.chunks_exact_mut(CHANNELS).enumerate() {
            let (first, k) = coeffs.of(xx);
            let window = &src_row[first * CHANNELS..(first + k.len()) * CHANNELS];
            let mut acc = [HALF; CHANNELS];
            for (px, &w) in window.chunks_exact(CHANNELS).zip(k) {
                for c in 0..CHANNELS {
                    acc[c] = acc[c].wrapping_add(i32::from(px[c]).wrapping_mul(w));
                }
            }
            for c in 0..CHANNELS {
                dst[c] = clip8(acc[c]);
            }
        }
    }
    out
}

/// `ImagingResampleVertical_8bpc` of a `width`-wide RGB buffer into `coeffs.bounds.len()` rows.
/// Every byte of a row uses the same weights, so rows are accumulated as flat byte vectors.
fn resample_vertical(src: &[u8], width: usize, coeffs: &Coeffs) -> Vec<u8> {
    let stride = width * CHANNELS;
    let out_h = coeffs.bounds.len();
    let mut out = vec![0_u8; stride * out_h];
    let mut acc = vec![HALF; stride];
    for (yy, dst_row) in out.chunks_exact_mut(stride).enumerate() {
        let (first, k) = coeffs.of(yy);
        acc.fill(HALF);
        for (y, &w) in k.iter().enumerate() {
            let src_row = &src[(first + y) * stride..(first + y + 1) * stride];
            for (a, &v) in acc.iter_mut().zip(src_row) {
                *a = a.wrapping_add(i32::from(v).wrapping_mul(w));
            }
        }
        for (d, &a) in dst_row.iter_mut().zip(&acc) {
            *d = clip8(a);
        }
    }
    out
}

/// Pillow 13's pass order (python-pillow/Pillow#9549): when the height shrinks by more than
/// twice as many pixels as the width does, the vertical pass runs first. Determined against
/// Pillow 13.0.0 on every size pair in 8..120 and 1,447 random ones (all matched), and by the
/// `system_role` fixture (300×900 → 128×384 runs vertical-first).
fn vertical_first(in_w: usize, in_h: usize, out_w: usize, out_h: usize) -> bool {
    let (in_w, in_h, out_w, out_h) = (in_w as i64, in_h as i64, out_w as i64, out_h as i64);
    out_h < in_h && in_h - out_h > 2 * (in_w - out_w)
}

/// Resizes `img` to `out_w`×`out_h` exactly as Pillow's BICUBIC `Image.resize` does.
///
/// An unchanged size returns a copy without resampling. Pillow refuses empty sizes; here an
/// empty source or target gives a black image of the target size.
pub fn resize_bicubic(img: &RgbImage, out_w: u32, out_h: u32) -> RgbImage {
    let (in_w, in_h) = img.dimensions();
    if (in_w, in_h) == (out_w, out_h) {
        return img.clone();
    }
    if in_w == 0 || in_h == 0 || out_w == 0 || out_h == 0 {
        return RgbImage::new(out_w, out_h);
    }
    let (in_w, in_h, out_w_us, out_h_us) =
        (in_w as usize, in_h as usize, out_w as usize, out_h as usize);
    let need_horizontal = out_w_us != in_w;
    let need_vertical = out_h_us != in_h;

    let mut vert = precompute_coeffs(in_h, out_h_us);
    let buf: Cow<'_, [u8]> = match (need_horizontal, need_vertical) {
        (false, false) => Cow::Borrowed(img.as_raw()),
        (true, false) => {
            let horiz = precompute_coeffs(in_w, out_w_us);
            Cow::Owned(resample_horizontal(img.as_raw(), in_w, 0..in_h, &horiz))
        }
        (false, true) => Cow::Owned(resample_vertical(img.as_raw(), in_w, &vert)),
        (true, true) if vertical_first(in_w, in_h, out_w_us, out_h_us) => {
            let horiz = precompute_coeffs(in_w, out_w_us);
            let tall = resample_vertical(img.as_raw(), in_w, &vert);
            Cow::Owned(resample_horizontal(&tall, in_w, 0..out_h_us, &horiz))
        }
        (true, true) => {
            let horiz = precompute_coeffs(in_w, out_w_us);
            // Only the source rows the vertical pass reads go through the horizontal pass.
            let ybox_first = vert.bounds[0].0;
            let (last_first, last_count) = vert.bounds[out_h_us - 1];
            let ybox_last = last_first + last_count;
            for b in &mut vert.bounds {
                b.0 -= ybox_first;
            }
            let wide = resample_horizontal(img.as_raw(), in_w, ybox_first..ybox_last, &horiz);
            Cow::Owned(resample_vertical(&wide, out_w_us, &vert))
        }
    };
    let data = buf.into_owned();
    // Both passes produce exactly out_w × out_h pixels (without a vertical pass the horizontal
    // one covers every source row), so this cannot fail; keep a black image as the fallback.
    RgbImage::from_raw(out_w, out_h, data).unwrap_or_else(|| RgbImage::new(out_w, out_h))
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (inp, out) in [
            (640, 384),
            (480, 288),
            (400, 512),
            (1200, 1536),
            (7, 3),
            (3, 7),
        ] {
            let c = precompute_coeffs(inp, out);
            for xx in 0..out {
                let (_, k) = c.of(xx);
                let sum: i64 = k.iter().map(|&w| i64::from(w)).sum();
                assert!(
                    (sum - (1 << PRECISION_BITS)).abs() <= k.len() as i64,
                    "{inp}->{out}"
                );
            }
        }
    }

    #[test]
    fn identical_size_is_a_copy_and_flat_images_stay_flat() {
        let img = RgbImage::from_fn(5, 4, |x, y| Rgb([x as u8 * 40, y as u8 * 50, 7]));
        assert_eq!(resize_bicubic(&img, 5, 4), img);
        let flat = RgbImage::from_pixel(13, 9, Rgb([200, 17, 255]));
        for (w, h) in [(4, 9), (13, 30), (31, 2), (1, 1)] {
            let out = resize_bicubic(&flat, w, h);
            assert_eq!(out.dimensions(), (w, h));
            assert!(out.pixels().all(|p| *p == Rgb([200, 17, 255])), "{w}x{h}");
        }
    }

    /// Bytes from Pillow 13.0.0 `Image.resize(.., BICUBIC)` of a 7×9 pattern: 6×3 runs the
    /// vertical pass first, 3×5 the horizontal one (each differs from the other order).
    #[test]
    fn pass_order_matches_pillow_13() {
        let img = RgbImage::from_fn(7, 9, |x, y| {
            Rgb([0, 1, 2].map(|c| ((x * 37 + y * 91 + c * 53 + x * y * x) % 256) as u8))
        });
        let v_first: [u8; 54] = [
            86, 128, 128, 110, 118, 146, 106, 127, 107, 171, 101, 159, 128, 157, 103, 153, 89, 119,
            116, 159, 134, 142, 129, 163, 136, 158, 117, 145, 124, 97, 131, 123, 145, 151, 86, 138,
            131, 120, 135, 116, 122, 108, 131, 131, 160, 123, 147, 149, 159, 101, 150, 160, 73,
            127,
        ];
        let h_first: [u8; 45] = [
            75, 127, 150, 152, 129, 147, 156, 130, 122, 119, 120, 114, 115, 110, 112, 131, 110,
            110, 132, 160, 165, 160, 139, 111, 141, 104, 149, 130, 137, 137, 121, 159, 134, 153,
            102, 136, 121, 106, 110, 132, 119, 164, 160, 84, 139,
        ];
        assert!(vertical_first(7, 9, 6, 3) && !vertical_first(7, 9, 3, 5));
        assert_eq!(resize_bicubic(&img, 6, 3).as_raw()[..], v_first);
        assert_eq!(resize_bicubic(&img, 3, 5).as_raw()[..], h_first);
    }

    #[test]
    fn empty_sizes_do_not_panic() {
        let img = RgbImage::new(0, 3);
        assert_eq!(resize_bicubic(&img, 4, 4).dimensions(), (4, 4));
        let img = RgbImage::from_pixel(3, 3, Rgb([1, 2, 3]));
        assert_eq!(resize_bicubic(&img, 0, 4).dimensions(), (0, 4));
    }
}
