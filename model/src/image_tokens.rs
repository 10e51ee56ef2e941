//! How many `<image>` placeholder tokens an image expands to (as `DeepseekVLV2Processor`'s
//! `tokenize_with_images` counts them; `process_one` tiles only conversations of ≤ 2 images).
//!
//! The count depends only on the tiling, so the gateway can plan a prompt without pixels.

/// Side of the 384×384 tile in pixels.
pub const TILE_SIZE: usize = 384;
/// ViT patch size.
pub const PATCH_SIZE: usize = 14;
/// Projector downsample ratio (2×2 merge).
pub const DOWNSAMPLE: usize = 2;
/// Tiling is used only when the whole conversation has at most this many images.
pub const MAX_IMAGES_WITH_TILING: usize = 2;

/// The tiling of one image: local tiles across (`width`) and down (`height`),
/// i.e. `images_spatial_crop` (width first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Tiling {
    pub width: usize,
    pub height: usize,
}

impl Tiling {
    pub const fn new(width: usize, height: usize) -> Self {
        Self { width, height }
    }

    /// Number of image tokens for this tiling:
    /// `s(s+1) + 1 + (th·s)(tw·s + 1)` with `s = ceil((384 / 14) / 2) = 14`.
    pub const fn num_tokens(self) -> usize {
        let s = (TILE_SIZE / PATCH_SIZE).div_ceil(DOWNSAMPLE);
        s * (s + 1) + 1 + (self.height * s) * (self.width * s + 1)
    }

    /// Number of 384×384 tiles the ViT sees for this image: the global view plus the locals.
    pub const fn num_tiles(self) -> usize {
        1 + self.width * self.height
    }
}

/// Whether the processor tiles images for a conversation with `num_images` images
/// (otherwise every image is a global view plus one 384×384 local view).
pub const fn cropping_enabled(num_images: usize) -> bool {
    num_images <= MAX_IMAGES_WITH_TILING
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_counts_match_the_spec_table() {
        let cases = [
            ((1, 1), 421),
            ((2, 1), 617),
            ((1, 2), 631),
            ((2, 2), 1023),
            ((1, 3), 841),
            ((3, 1), 813),
            ((4, 2), 1807),
            ((3, 3), 2017),
            ((1, 9), 2101),
        ];
        for ((w, h), n) in cases {
            assert_eq!(Tiling::new(w, h).num_tokens(), n, "tiling {w}x{h}");
        }
    }

    #[test]
    fn more_than_two_images_disable_cropping() {
        assert!(cropping_enabled(0));
        assert!(cropping_enabled(2));
        assert!(!cropping_enabled(3));
    }
}
