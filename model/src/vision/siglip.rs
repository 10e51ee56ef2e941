//! The SigLIP-SO400M/14 vision tower as DeepSeek-VL2 runs it (`create_siglip_vit` in
//! `siglip_vit.py`, a timm `VisionTransformer` with `ignore_head`): a 14×14 patch convolution
//! over the top-left 378×378 pixels of each 384×384 tile, a learned position embedding,
//! pre-norm blocks with tanh-GELU, and a final LayerNorm. The attention-pool head is not run.

use crate::held::{Held, held};
use candle_core::{DType, Result, Tensor};

use crate::config::VisionConfig;
use crate::error;
use crate::linear;
use crate::ops::{gelu_tanh, layer_norm, softmax_f32};
use crate::weights::Weights;

const LN_EPS: f64 = 1e-6;

#[derive(Debug)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

impl LayerNorm {
    fn new(w: &Weights, width: usize) -> error::Result<Self> {
        Ok(Self {
            weight: w.get("weight", &[width])?,
            bias: w.get("bias", &[width])?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm(x, &self.weight, &self.bias, LN_EPS)
    }
}

#[derive(Debug)]
struct Linear {
    weight: linear::Linear,
    bias: Tensor,
}

impl Linear {
    fn new(w: &Weights, out: usize, inp: usize) -> error::Result<Self> {
        Ok(Self {
            weight: w.linear("weight", &[out, inp])?,
            bias: w.get("bias", &[out])?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.weight.forward_bias(x, &self.bias)
    }
}

#[derive(Debug)]
struct Block {
    norm1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
}

impl Block {
    fn new(w: &Weights, cfg: &VisionConfig) -> error::Result<Self> {
        let c = cfg.width;
        Ok(Self {
            norm1: LayerNorm::new(&w.pp("norm1"), c)?,
            qkv: Linear::new(&w.pp("attn.qkv"), 3 * c, c)?,
            proj: Linear::new(&w.pp("attn.proj"), c, c)?,
            norm2: LayerNorm::new(&w.pp("norm2"), c)?,
            fc1: Linear::new(&w.pp("mlp.fc1"), cfg.mlp_hidden(), c)?,
            fc2: Linear::new(&w.pp("mlp.fc2"), c, cfg.mlp_hidden())?,
            heads: cfg.heads,
        })
    }

    /// x: (tiles, patches, width) → same.
    fn attention(&self, x: &Tensor) -> Result<Tensor> {
        let (n, p, c) = x.dims3()?;
        let qkv = self.qkv.forward(&x.reshape((n * p, c))?)?; // (tiles·patches, 3·width)
        let out = if qkv.dtype() == DType::F32 && crate::ops::cpu_kernels(qkv.device()) {
            super::attention::blocked(&qkv, n, p, self.heads)?
        } else {
            self.attention_tensors(&qkv, n, p)?
        };
        self.proj.forward(&out)?.reshape((n, p, c))
    }

    /// The same attention as whole-batch tensor products (other dtypes and devices).
    fn attention_tensors(&self, qkv: &Tensor, n: usize, p: usize) -> Result<Tensor> {
        let c = qkv.dim(1)? / 3;
        let hd = c / self.heads;
        let qkv = qkv
            .reshape((n, p, 3, self.heads, hd))?
            .permute((2, 0, 3, 1, 4))?; // (3, tiles, heads, patches, head_dim)
        let q = qkv.get(0)?.reshape((n * self.heads, p, hd))?;
        let k = qkv.get(1)?.reshape((n * self.heads, p, hd))?;
        let v = qkv.get(2)?.reshape((n * self.heads, p, hd))?;
        let scores = (crate::ops::matmul(&q, &k.t()?)? * (1.0 / (hd as f64).sqrt()))?; // (tiles·heads, p, p)
        let out = crate::ops::matmul(&softmax_f32(&scores)?, &v)?; // (tiles·heads, p, head_dim)
        out.reshape((n, self.heads, p, hd))?
            .transpose(1, 2)?
            .reshape((n * p, c))
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, p, c) = x.dims3()?;
        let x = (x + self.attention(&self.norm1.forward(x)?)?)?;
        let h = self.norm2.forward(&x)?.reshape((n * p, c))?;
        let h = self.fc2.forward(&gelu_tanh(&self.fc1.forward(&h)?)?)?;
        x + h.reshape((n, p, c))?
    }
}

/// The SigLIP tower.
#[derive(Debug)]
pub struct SigLip {
    patch_weight: linear::Linear,
    patch_bias: Tensor,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    norm: LayerNorm,
    patch: usize,
    grid: usize,
    width: usize,
}

impl SigLip {
    /// Loads `vision.*` (without `vision.attn_pool.*`).
    pub fn new(w: &Weights, cfg: &VisionConfig) -> error::Result<Self> {
        let (c, p) = (cfg.width, cfg.patch_size);
        let grid = cfg.image_size / p;
        let blocks = (0..cfg.layers)
            .map(|b| Block::new(&w.pp("blocks").pp(b), cfg))
            .collect::<error::Result<Vec<_>>>()?;
        Ok(Self {
            // Conv2d(3 → C, k=p, s=p) as a matmul over flattened (channel, row, col) patches.
            patch_weight: w.linear("patch_embed.proj.weight", &[c, 3, p, p])?,
            patch_bias: w.get("patch_embed.proj.bias", &[c])?,
            pos_embed: w.get("pos_embed", &[1, grid * grid, c])?.squeeze(0)?,
            blocks,
            norm: LayerNorm::new(&w.pp("norm"), c)?,
            patch: p,
            grid,
            width: c,
        })
    }

    /// Patches per tile side (27 for 384-pixel tiles and 14-pixel patches).
    pub fn grid(&self) -> usize {
        self.grid
    }

    /// Tower width C.
    pub fn width(&self) -> usize {
        self.width
    }

    /// tiles: (n, 3, S, S) normalised → (n, grid², width) after the final LayerNorm.
    pub fn forward(&self, tiles: &Tensor) -> Result<Tensor> {
        let (n, ch, _, _) = tiles.dims4()?;
        let (g, p) = (self.grid, self.patch);
        let seen = g * p; // 378: the last pixels of each tile are never seen
        let patches = tiles
            .narrow(2, 0, seen)?
            .narrow(3, 0, seen)?
            .reshape((n, ch, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))? // (n, row, col, channel, kh, kw)
            .reshape((n * g * g, ch * p * p))?;
        let x = self
            .patch_weight
            .forward_bias(&patches, &self.patch_bias)?
            .reshape((n, g * g, self.width))?
            .broadcast_add(&self.pos_embed)?;
        let mut x = x;
        for block in &self.blocks {
            x = block.forward(&x)?;
        }
        self.norm.forward(&x)?.contiguous()
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    #[test]
    fn candle_gelu_is_the_tanh_approximation() {
        let x = Tensor::new(&[1.0f32, -2.0, 3.0], &Device::Cpu).unwrap();
        let got = x.gelu().unwrap().to_vec1::<f32>().unwrap();
        for (g, v) in got.iter().zip([1.0f32, -2.0, 3.0]) {
            let t = 0.5
                * v
                * (1.0 + ((2.0 / std::f32::consts::PI).sqrt() * (v + 0.044715 * v * v * v)).tanh());
            assert!((g - t).abs() < 1e-6, "{g} vs {t}");
        }
    }
}

impl Held for LayerNorm {
    fn held_bytes(&self) -> usize {
        held!(self.weight, self.bias)
    }
}

impl Held for Linear {
    fn held_bytes(&self) -> usize {
        held!(self.weight, self.bias)
    }
}

impl Held for Block {
    fn held_bytes(&self) -> usize {
        held!(
            self.norm1, self.qkv, self.proj, self.norm2, self.fc1, self.fc2
        )
    }
}

impl Held for SigLip {
    fn held_bytes(&self) -> usize {
        held!(
            self.patch_weight,
            self.patch_bias,
            self.pos_embed,
            self.blocks,
            self.norm
        )
    }
}
