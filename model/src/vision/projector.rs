//! The `downsample_mlp_gelu` projector (`MlpProjector` in `modeling_deepseek_vl_v2.py`): the
//! 27×27 ViT feature map is zero-padded to 28×28 (after the final LayerNorm), each 2×2
//! neighbourhood is concatenated channel-major (`F.unfold` order), then Linear → exact-erf
//! GELU → Linear.

use candle_core::{DType, Result, Tensor};

use crate::config::ProjectorConfig;
use crate::error::{self, Error};
use crate::linear::Linear;
use crate::weights::Weights;

#[derive(Debug)]
pub struct Projector {
    w1: Linear,
    b1: Tensor,
    w2: Linear,
    b2: Tensor,
    ratio: usize,
}

impl Projector {
    /// Loads `projector.layers.{0,2}`.
    pub fn new(w: &Weights, cfg: &ProjectorConfig, vision_width: usize) -> error::Result<Self> {
        if cfg.depth != 2 || cfg.mlp_ratio != 1 || cfg.token_pooling {
            return Err(Error::config(
                "projector_config",
                "only depth 2, mlp_ratio 1 and no token pooling are supported (the released setting)",
            ));
        }
        let r = cfg.downsample_ratio;
        let (inp, d) = (vision_width * r * r, cfg.n_embed);
        Ok(Self {
            w1: w.linear("layers.0.weight", &[d, inp])?,
            b1: w.get("layers.0.bias", &[d])?,
            w2: w.linear("layers.2.weight", &[d, d])?,
            b2: w.get("layers.2.bias", &[d])?,
            ratio: r,
        })
    }

    /// Output tokens per tile side for a `grid`×`grid` feature map (14 for 27).
    pub fn side(&self, grid: usize) -> usize {
        grid.div_ceil(self.ratio)
    }

    /// features: (tiles, grid², C) → (tiles, side², n_embed).
    pub fn forward(&self, features: &Tensor, grid: usize) -> Result<Tensor> {
        let (n, _, c) = features.dims3()?;
        let (r, side) = (self.ratio, self.side(grid));
        let padded_side = side * r;
        let f = features.reshape((n, grid, grid, c))?;
        let f = if padded_side > grid {
            let pad = padded_side - grid;
            let dtype = f.dtype();
            let col = Tensor::zeros((n, grid, pad, c), dtype, f.device())?;
            let f = Tensor::cat(&[&f, &col], 2)?; // (n, grid, padded, c)
            let row = Tensor::zeros((n, pad, padded_side, c), dtype, f.device())?;
            Tensor::cat(&[&f, &row], 1)? // (n, padded, padded, c)
        } else {
            f
        };
        // (n, side, r, side, r, c) → (n, side, side, c, r, r): channel-major, window raster.
        let v = f
            .reshape((n, side, r, side, r, c))?
            .permute((0, 1, 3, 5, 2, 4))?
            .reshape((n * side * side, c * r * r))?;
        let h = self.w1.forward_bias(&v, &self.b1)?;
        let h = h.to_dtype(DType::F32)?.gelu_erf()?.to_dtype(h.dtype())?;
        self.w2
            .forward_bias(&h, &self.b2)?
            .reshape((n, side * side, ()))
    }
}

impl crate::held::Held for Projector {
    fn held_bytes(&self) -> usize {
        crate::held::held!(self.w1, self.b1, self.w2, self.b2)
    }
}
