//! Best-resolution selection, pad-resize and 384×384 crops (as `DeepseekVLV2Processor`'s
//! `tokenize_with_images` does them: pad colour `int(0.5·255)` = 127, sizes and offsets rounded
//! half-to-even, Pillow's antialiased BICUBIC).
//!
//! Mirrors `select_best_resolution` of the official DeepSeek-VL2 processor and Pillow 13's
//! `ImageOps.pad` / `ImageOps.contain` (BICUBIC, centring 0.5) in double precision.

use image::{Rgb, RgbImage, imageops};

use super::resize::resize_bicubic;
use crate::image_tokens::{TILE_SIZE, Tiling};

/// Pad colour for the reference's mean 0.5: `int(0.5 · 255)` = 127 per channel.
pub const PAD_FILL: [u8; 3] = [127; 3];

/// The pad colour the processor derives from the normalisation mean: `int(m · 255)`.
pub fn pad_fill(mean: [f64; 3]) -> [u8; 3] {
    mean.map(|m| (m * 255.0).clamp(0.0, 255.0) as u8)
}

/// Picks the candidate `[width, height]` that keeps the most of the image's resolution
/// (the reference's `select_best_resolution`): `s = min(cw/w, ch/h)`,
/// `effective = min(int(w·s)·int(h·s), w·h)`, `wasted = cw·ch − effective`; a candidate wins
/// on larger `effective`, or equal `effective` and strictly smaller `wasted`, so the earliest
/// candidate wins exact ties.
///
/// An empty image or an empty candidate list gives a single tile (384×384).
pub fn select_best_resolution(
    width: usize,
    height: usize,
    candidates: &[[usize; 2]],
) -> [usize; 2] {
    if width == 0 || height == 0 {
        return [TILE_SIZE, TILE_SIZE];
    }
    let (w, h) = (width as f64, height as f64);
    let original = width as u128 * height as u128;
    // (candidate, effective, wasted); `None` plays the reference's (0, inf) start.
    let mut best: Option<([usize; 2], u128, i128)> = None;
    for &[cw, ch] in candidates {
        let scale = (cw as f64 / w).min(ch as f64 / h);
        // Python's int() truncates; `as` truncates (and saturates) the same way.
        let downscaled = (w * scale) as u128 * (h * scale) as u128;
        let effective = downscaled.min(original);
        let wasted = (cw as u128 * ch as u128) as i128 - effective as i128;
        let better = match best {
            None => true,
            Some((_, best_eff, best_wasted)) => {
                effective > best_eff || (effective == best_eff && wasted < best_wasted)
            }
        };
        if better {
            best = Some(([cw, ch], effective, wasted));
        }
    }
    best.map_or([TILE_SIZE, TILE_SIZE], |(c, _, _)| c)
}

/// The tiling a best resolution implies: `[best_w / 384, best_h / 384]`.
pub fn tiling_of(best: [usize; 2]) -> Tiling {
    Tiling::new(best[0] / TILE_SIZE, best[1] / TILE_SIZE)
}

/// Python's `round()` of a double: to nearest, ties to even.
fn py_round(x: f64) -> i64 {
    x.round_ties_even() as i64
}

/// `ImageOps.contain`'s target size: the largest size of the image's aspect ratio inside
/// `tw`×`th`, the free side rounded half-to-even from `(h / w) · tw` (or `(w / h) · th`).
/// A side that rounds to 0 stays 0: Pillow 13's `contain` then returns an empty image and
/// `pad` yields a tile of pure fill colour.
fn contain_size(w: u32, h: u32, tw: u32, th: u32) -> (u32, u32) {
    let im_ratio = f64::from(w) / f64::from(h);
    let dest_ratio = f64::from(tw) / f64::from(th);
    if im_ratio == dest_ratio {
        (tw, th)
    } else if im_ratio > dest_ratio {
        let nh = py_round(f64::from(h) / f64::from(w) * f64::from(tw));
        (tw, nh.clamp(0, i64::from(u32::MAX)) as u32)
    } else {
        let nw = py_round(f64::from(w) / f64::from(h) * f64::from(th));
        (nw.clamp(0, i64::from(u32::MAX)) as u32, th)
    }
}

/// `PIL.ImageOps.pad(img, (tw, th), BICUBIC, color=fill, centering=(0.5, 0.5))`: resize to
/// fit inside the target keeping the aspect ratio, then paste centred on a `fill` background
/// at offset `round((t − n) · 0.5)` (half-to-even).
pub fn pad_resize_with_fill(
    img: &RgbImage,
    target_w: u32,
    target_h: u32,
    fill: [u8; 3],
) -> RgbImage {
    let (w, h) = img.dimensions();
    if target_w == 0 || target_h == 0 || w == 0 || h == 0 {
        return RgbImage::from_pixel(target_w, target_h, Rgb(fill));
    }
    let (nw, nh) = contain_size(w, h, target_w, target_h);
    let resized = resize_bicubic(img, nw, nh);
    if (nw, nh) == (target_w, target_h) {
        return resized;
    }
    let mut out = RgbImage::from_pixel(target_w, target_h, Rgb(fill));
    let (x, y) = if nw != target_w {
        (py_round((f64::from(target_w) - f64::from(nw)) * 0.5), 0)
    } else {
        (0, py_round((f64::from(target_h) - f64::from(nh)) * 0.5))
    };
    imageops::replace(&mut out, &resized, x, y);
    out
}

/// [`pad_resize_with_fill`] with the reference's pad colour 127 (mean 0.5).
pub fn pad_resize(img: &RgbImage, target_w: u32, target_h: u32) -> RgbImage {
    pad_resize_with_fill(img, target_w, target_h, PAD_FILL)
}

/// Cuts `view` into `tiling.width × tiling.height` tiles of 384×384 in raster order.
pub(crate) fn crop_tiles(view: &RgbImage, tiling: Tiling) -> Vec<RgbImage> {
    let side = TILE_SIZE as u32;
    let mut tiles = Vec::with_capacity(tiling.width * tiling.height);
    for row in 0..tiling.height as u32 {
        for col in 0..tiling.width as u32 {
            tiles.push(imageops::crop_imm(view, col * side, row * side, side, side).to_image());
        }
    }
    tiles
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ProcessorConfig;

    fn candidates() -> Vec<[usize; 2]> {
        ProcessorConfig::default().candidate_resolutions
    }

    #[test]
    fn best_resolution_matches_the_spec_examples() {
        let cands = candidates();
        for ((w, h), best) in [
            ((640, 480), [768, 768]),
            ((300, 900), [384, 1152]),
            ((1200, 400), [1536, 768]),
            ((518, 293), [768, 384]),
            ((384, 384), [384, 384]),
        ] {
            assert_eq!(select_best_resolution(w, h, &cands), best, "{w}x{h}");
        }
    }

    #[test]
    fn earliest_candidate_wins_exact_ties_and_degenerate_inputs_get_one_tile() {
        // A 10×10 image fits every candidate with the full effective area; 384×384 wastes least.
        assert_eq!(
            select_best_resolution(10, 10, &[[768, 768], [384, 384], [384, 384]]),
            [384, 384]
        );
        // Equal effective and wasted: the first one stays.
        assert_eq!(
            select_best_resolution(100, 100, &[[384, 768], [768, 384]]),
            [384, 768]
        );
        assert_eq!(select_best_resolution(0, 10, &candidates()), [384, 384]);
        assert_eq!(select_best_resolution(10, 10, &[]), [384, 384]);
        // Extremely thin: every effective area truncates to 0; the least wasteful wins.
        assert_eq!(
            select_best_resolution(1, 100_000, &candidates()),
            [384, 384]
        );
    }

    #[test]
    fn contain_rounds_half_to_even_and_pad_centres_half_to_even() {
        // 518×293 into 768×384: (518/293)·384 = 678.9 → 679, offset round(44.5) = 44.
        assert_eq!(contain_size(518, 293, 768, 384), (679, 384));
        assert_eq!(py_round(44.5), 44);
        assert_eq!(py_round(45.5), 46);
        let img = RgbImage::from_pixel(518, 293, Rgb([250, 0, 3]));
        let out = pad_resize(&img, 768, 384);
        assert_eq!(out.get_pixel(43, 100), &Rgb(PAD_FILL));
        assert_eq!(out.get_pixel(44, 100), &Rgb([250, 0, 3]));
        assert_eq!(out.get_pixel(44 + 678, 100), &Rgb([250, 0, 3]));
        assert_eq!(out.get_pixel(44 + 679, 100), &Rgb(PAD_FILL));
        // Extreme aspect ratios round a side to 0: the tile is pure fill, as in Pillow 13.
        assert_eq!(contain_size(1000, 1, 384, 384), (384, 0));
        let strip = RgbImage::from_pixel(1000, 1, Rgb([200, 10, 10]));
        let out = pad_resize(&strip, 384, 384);
        assert!(out.pixels().all(|p| *p == Rgb(PAD_FILL)));
        assert_eq!(contain_size(3000, 7, 384, 384), (384, 1));
    }

    #[test]
    fn pad_fill_truncates_like_int() {
        assert_eq!(pad_fill([0.5, 0.5, 0.5]), PAD_FILL);
        assert_eq!(
            pad_fill([0.48145466, 0.4578275, 0.40821073]),
            [122, 116, 104]
        );
    }

    #[test]
    fn crops_are_raster_order() {
        let view = RgbImage::from_fn(768, 384 * 2, |x, y| {
            Rgb([(x / 384) as u8, (y / 384) as u8, 0])
        });
        let tiles = crop_tiles(&view, Tiling::new(2, 2));
        let ids: Vec<_> = tiles.iter().map(|t| t.get_pixel(0, 0).0).collect();
        assert_eq!(ids, [[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]]);
    }
}
