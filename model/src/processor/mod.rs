//! The DeepSeek-VL2 image processor (the image half of `DeepseekVLV2Processor`'s
//! `tokenize_with_images`): image bytes → RGB → global view + local tiles of 384×384 →
//! normalised f32 tensor, bit-exact with the reference (Pillow 13 + the official
//! `DeepseekVLV2Processor`).
//!
//! - [`decode`]: PNG/JPEG/WebP/GIF/BMP bytes to RGB as `Image.open(..).convert("RGB")`, with
//!   a pixel limit checked before decoding
//! - [`tiling`]: best-resolution choice, `ImageOps.pad` and raster-order crops
//! - [`resize`]: Pillow's antialiased BICUBIC resampler, bit for bit

pub mod decode;
pub mod resize;
pub mod tiling;

use candle_core::{Device, Tensor};
use image::RgbImage;

use crate::config::ProcessorConfig;
use crate::image_tokens::{TILE_SIZE, Tiling, cropping_enabled};

pub use decode::{
    DEFAULT_MAX_PIXELS, ImageHeader, ImageLimits, decode_image, load_image, read_header,
};
pub use resize::resize_bicubic;
pub use tiling::{PAD_FILL, pad_fill, pad_resize, pad_resize_with_fill, select_best_resolution};

/// One image ready for the vision tower.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessedImage {
    /// Local tiles across and down (`images_spatial_crop`).
    pub tiling: Tiling,
    /// 384×384 uint8 tiles: the global view first, then the local tiles row-major.
    pub tiles: Vec<RgbImage>,
    /// (width, height) of the image before processing.
    pub original_size: (u32, u32),
}

/// The tiling of a `width` × `height` image: the one function that decides it, for the
/// processor here and for planning a prompt from image headers alone (the gateway).
///
/// With `cropping` (at most two images in the conversation, see
/// [`cropping_enabled`]) it is the best candidate resolution of `cfg` in tiles; without it,
/// a single 1×1 local view.
pub fn tiling_for(width: u32, height: u32, cropping: bool, cfg: &ProcessorConfig) -> Tiling {
    let best = if cropping {
        select_best_resolution(width as usize, height as usize, &cfg.candidate_resolutions)
    } else {
        [TILE_SIZE, TILE_SIZE]
    };
    tiling::tiling_of(best)
}

/// Tiles one image. With `cropping` the best candidate resolution of `cfg` is used;
/// without it (≥3 images in the conversation) the image is a global view plus one local view.
pub fn process_image(image: &RgbImage, cfg: &ProcessorConfig, cropping: bool) -> ProcessedImage {
    let (width, height) = image.dimensions();
    let tile = TILE_SIZE as u32;
    let tiling = tiling_for(width, height, cropping, cfg);
    let best = [tiling.width * TILE_SIZE, tiling.height * TILE_SIZE];
    let fill = pad_fill(cfg.image_mean);

    let global = pad_resize_with_fill(image, tile, tile, fill);
    let mut tiles = Vec::with_capacity(tiling.num_tiles());
    if best == [TILE_SIZE, TILE_SIZE] {
        // The local view is the same pad-resize as the global one, and a single crop of it.
        tiles.push(global.clone());
        tiles.push(global);
    } else {
        tiles.push(global);
        let local = pad_resize_with_fill(image, best[0] as u32, best[1] as u32, fill);
        tiles.extend(tiling::crop_tiles(&local, tiling));
    }
    ProcessedImage {
        tiling,
        tiles,
        original_size: (width, height),
    }
}

/// Tiles every image of one conversation, applying the ≤2-images cropping rule
/// (`cropping=len(images) <= 2` in `DeepseekVLV2Processor.process_one`).
pub fn process_images(images: &[RgbImage], cfg: &ProcessorConfig) -> Vec<ProcessedImage> {
    let cropping = cropping_enabled(images.len());
    images
        .iter()
        .map(|image| process_image(image, cfg, cropping))
        .collect()
}

/// The (mean, std) to pass to [`tiles_to_tensor`]: the configured ones, or (0, 1) when
/// `normalize` is off (the reference then applies only `ToTensor`, i.e. `v / 255`).
pub fn normalization(cfg: &ProcessorConfig) -> ([f64; 3], [f64; 3]) {
    if cfg.normalize {
        (cfg.image_mean, cfg.image_std)
    } else {
        ([0.0; 3], [1.0; 3])
    }
}

/// Stacks tiles into an f32 tensor (N, 3, H, W), channels first, normalised as the
/// reference's `ToTensor` + `Normalize` in float32: `x = (f32(v) / 255 − f32(mean)) / f32(std)`
/// (so `(v/255 − 0.5)/0.5` bit for bit with the released mean/std); see [`normalization`] for
/// `normalize: false`. No tiles give a (0, 3, 384, 384) tensor; tiles must share one size.
pub fn tiles_to_tensor<'a>(
    tiles: impl IntoIterator<Item = &'a RgbImage>,
    mean: [f64; 3],
    std: [f64; 3],
    device: &Device,
) -> candle_core::Result<Tensor> {
    let tiles: Vec<&RgbImage> = tiles.into_iter().collect();
    let (width, height) = tiles
        .first()
        .map_or((TILE_SIZE as u32, TILE_SIZE as u32), |t| t.dimensions());
    if let Some(odd) = tiles.iter().find(|t| t.dimensions() != (width, height)) {
        candle_core::bail!(
            "tiles_to_tensor: tile of {:?} among tiles of {:?}",
            odd.dimensions(),
            (width, height)
        );
    }
    // Every u8 value of every channel maps through one float32 expression: a lookup table.
    let table: [[f32; 256]; 3] = std::array::from_fn(|c| {
        let (m, s) = (mean[c] as f32, std[c] as f32);
        std::array::from_fn(|v| (v as f32 / 255.0 - m) / s)
    });
    let plane = width as usize * height as usize;
    let mut data = vec![0_f32; tiles.len() * 3 * plane];
    for (tile, out) in tiles.iter().zip(data.chunks_exact_mut(3 * plane)) {
        let (r, rest) = out.split_at_mut(plane);
        let (g, b) = rest.split_at_mut(plane);
        for (i, px) in tile.as_raw().chunks_exact(3).enumerate() {
            r[i] = table[0][usize::from(px[0])];
            g[i] = table[1][usize::from(px[1])];
            b[i] = table[2][usize::from(px[2])];
        }
    }
    // (tiles, channels, height, width)
    Tensor::from_vec(
        data,
        (tiles.len(), 3, height as usize, width as usize),
        device,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    #[test]
    fn three_or_more_images_get_a_global_and_one_local_view() {
        let cfg = ProcessorConfig::default();
        let wide = RgbImage::from_fn(1200, 400, |x, y| Rgb([x as u8, y as u8, 9]));
        let two = process_images(&[wide.clone(), wide.clone()], &cfg);
        assert!(
            two.iter()
                .all(|p| p.tiling == Tiling::new(4, 2) && p.tiles.len() == 9)
        );

        let three = process_images(&[wide.clone(), wide.clone(), wide], &cfg);
        for p in &three {
            assert_eq!(p.tiling, Tiling::new(1, 1));
            assert_eq!(p.tiling.num_tokens(), 421);
            assert_eq!(p.tiles.len(), 2);
            assert_eq!(p.tiles[0], p.tiles[1]);
            assert_eq!(p.original_size, (1200, 400));
            assert!(p.tiles.iter().all(|t| t.dimensions() == (384, 384)));
        }
    }

    #[test]
    fn tiling_for_follows_the_candidates_and_the_cropping_rule() {
        let cfg = ProcessorConfig::default();
        for ((w, h), tiling) in [
            ((640, 480), Tiling::new(2, 2)),
            ((300, 900), Tiling::new(1, 3)),
            ((1200, 400), Tiling::new(4, 2)),
            ((518, 293), Tiling::new(2, 1)),
            ((384, 384), Tiling::new(1, 1)),
        ] {
            assert_eq!(tiling_for(w, h, true, &cfg), tiling, "{w}x{h}");
            assert_eq!(tiling_for(w, h, false, &cfg), Tiling::new(1, 1), "{w}x{h}");
        }
        // The processor tiles with the same function.
        let wide = RgbImage::new(1200, 400);
        assert_eq!(
            process_image(&wide, &cfg, true).tiling,
            tiling_for(1200, 400, true, &cfg)
        );
        let only_square = ProcessorConfig {
            candidate_resolutions: vec![[384, 384]],
            ..ProcessorConfig::default()
        };
        assert_eq!(tiling_for(1200, 400, true, &only_square), Tiling::new(1, 1));
    }

    #[test]
    fn normalisation_is_the_float32_reference_expression() {
        let tile = RgbImage::from_fn(384, 384, |x, _| Rgb([(x % 256) as u8, 127, 255]));
        let t = tiles_to_tensor([&tile, &tile], [0.5; 3], [0.5; 3], &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[2, 3, 384, 384]);
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let plane = 384 * 384;
        for (x, &got) in v.iter().enumerate().take(256) {
            assert_eq!(got, (x as f32 / 255.0 - 0.5) / 0.5);
        }
        assert_eq!(v[plane], (127.0_f32 / 255.0 - 0.5) / 0.5);
        assert_eq!(v[2 * plane], 1.0);
        let (m, sd) = normalization(&ProcessorConfig {
            normalize: false,
            ..ProcessorConfig::default()
        });
        let raw = tiles_to_tensor([&tile], m, sd, &Device::Cpu).unwrap();
        let raw = raw.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!((raw[1], raw[2 * plane]), (1.0 / 255.0, 1.0));
        let empty = tiles_to_tensor(std::iter::empty(), [0.5; 3], [0.5; 3], &Device::Cpu);
        assert_eq!(empty.unwrap().dims(), &[0, 3, 384, 384]);
        let odd = RgbImage::new(2, 2);
        assert!(tiles_to_tensor([&tile, &odd], [0.5; 3], [0.5; 3], &Device::Cpu).is_err());
    }
}
