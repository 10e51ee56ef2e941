//! The vision half of DeepSeek-VL2 (the reference's `create_siglip_vit`, `MlpProjector` and
//! the image part of `DeepseekVLV2ForCausalLM.prepare_inputs_embeds`).
//!
//! - [`siglip`]: the SigLIP tower (tiles → 27×27 features)
//! - [`projector`]: 2×2 merge + MLP into the language model's width
//! - [`VisionModel`]: both, plus the assembly of global/local grids with the learned
//!   newline and view-separator vectors into one image-token sequence per image

mod attention;
pub mod projector;
pub mod siglip;

use candle_core::{D, Tensor};

use crate::config::{GlobalViewPos, ModelConfig};
use crate::error::{Error, Result};
use crate::image_tokens::Tiling;
use crate::weights::LoadTarget;
use projector::Projector;
use siglip::SigLip;

/// Tiles in, image-token embeddings out.
#[derive(Debug)]
pub struct VisionModel {
    tower: SigLip,
    projector: Projector,
    image_newline: Tensor,
    view_separator: Tensor,
    global_view_pos: GlobalViewPos,
    /// Tiles per tower call, bounding the attention scores' memory.
    batch: usize,
}

impl VisionModel {
    /// Loads `vision.*` (not the attention-pool head), `projector.*`, `image_newline` and
    /// `view_seperator` (sic).
    pub fn load(cfg: &ModelConfig, target: LoadTarget) -> Result<Self> {
        let d = cfg.projector.n_embed;
        if d != cfg.language.hidden_size {
            return Err(Error::config(
                "projector_config.n_embed",
                format!(
                    "{d} differs from the language model's hidden size {}",
                    cfg.language.hidden_size
                ),
            ));
        }
        let root = target.pp("");
        Ok(Self {
            tower: SigLip::new(&target.pp("vision"), &cfg.vision)?,
            projector: Projector::new(&target.pp("projector"), &cfg.projector, cfg.vision.width)?,
            image_newline: root.get("image_newline", &[d])?,
            view_separator: root.get("view_seperator", &[d])?,
            global_view_pos: cfg.global_view_pos,
            batch: 4,
        })
    }

    /// SigLIP features: tiles (n, 3, 384, 384) → (n, 729, C).
    pub fn tower(&self, tiles: &Tensor) -> Result<Tensor> {
        let n = tiles.dim(0)?;
        let mut outs = Vec::with_capacity(n.div_ceil(self.batch));
        for start in (0..n).step_by(self.batch) {
            let len = self.batch.min(n - start);
            outs.push(self.tower.forward(&tiles.narrow(0, start, len)?)?);
        }
        Ok(Tensor::cat(&outs, 0)?)
    }

    /// Projected tiles: tiles (n, 3, 384, 384) → (n, 196, n_embed).
    pub fn encode_tiles(&self, tiles: &Tensor) -> Result<Tensor> {
        let features = self.tower(tiles)?;
        Ok(self.projector.forward(&features, self.tower.grid())?)
    }

    /// Projector output of a tower output (for inspection and tests).
    pub fn project(&self, features: &Tensor) -> Result<Tensor> {
        Ok(self.projector.forward(features, self.tower.grid())?)
    }

    /// Lays out projected tiles (all images, processor order) as image-token rows in
    /// sequence order: per image the global grid rows each followed by the newline vector,
    /// the view separator, then the local grid (tiles interleaved row by row) with a
    /// newline after each row (`tile_tag` 2D). Returns (Σ N(tiling), n_embed).
    pub fn assemble(&self, projected: &Tensor, tilings: &[Tiling]) -> Result<Tensor> {
        let (n_tiles, tokens, d) = projected.dims3()?;
        let side = (tokens as f64).sqrt() as usize;
        let expected: usize = tilings.iter().map(|t| t.num_tiles()).sum();
        if n_tiles != expected || side * side != tokens {
            return Err(Error::Request(format!(
                "{n_tiles} projected tiles of {tokens} tokens do not match tilings needing {expected} tiles"
            )));
        }
        let newline = |rows: usize| -> candle_core::Result<Tensor> {
            self.image_newline
                .reshape((1, 1, d))?
                .broadcast_as((rows, 1, d))?
                .contiguous()
        };
        let mut parts = Vec::new();
        let mut tile = 0;
        for t in tilings {
            let global = projected.get(tile)?.reshape((side, side, d))?;
            let global = Tensor::cat(&[&global, &newline(side)?], 1)?.reshape(((), d))?;
            let locals = projected
                .narrow(0, tile + 1, t.width * t.height)?
                .reshape((t.height, t.width, side, side, d))?
                .permute((0, 2, 1, 3, 4))? // (tile_row, r, tile_col, c, d)
                .reshape((t.height * side, t.width * side, d))?;
            let locals =
                Tensor::cat(&[&locals, &newline(t.height * side)?], 1)?.reshape(((), d))?;
            let sep = self.view_separator.reshape((1, d))?;
            match self.global_view_pos {
                GlobalViewPos::Head => parts.extend([global, sep, locals]),
                GlobalViewPos::Tail => parts.extend([locals, sep, global]),
            }
            tile += t.num_tiles();
        }
        Ok(Tensor::cat(&parts, 0)?.contiguous()?)
    }

    /// Tiles of every image (processor order) → image-token embeddings in sequence order.
    pub fn embed_images(&self, tiles: &Tensor, tilings: &[Tiling]) -> Result<Tensor> {
        let projected = self.encode_tiles(tiles)?;
        let out = self.assemble(&projected, tilings)?;
        debug_assert_eq!(out.dim(D::Minus1)?, self.image_newline.dim(0)?);
        Ok(out)
    }
}

impl crate::held::Held for VisionModel {
    fn held_bytes(&self) -> usize {
        crate::held::held!(
            self.tower,
            self.projector,
            self.image_newline,
            self.view_separator
        )
    }
}
