//! Rotary position embedding tables, with the reference's scaling variants
//! (transformers 4.38's `LlamaAttention` for MHA; for MLA `DeepseekV2RotaryEmbedding`,
//! `DeepseekV2LinearScalingRotaryEmbedding`, `DeepseekV2DynamicNTKScalingRotaryEmbedding` and
//! `DeepseekV2YarnRotaryEmbedding` in `modeling_deepseek.py`: default, `linear`, `dynamic` NTK,
//! `yarn`).
//!
//! Tables are computed in f32 exactly as the reference does (`t · inv_freq` in f32, then
//! `cos`/`sin`), so positions far into a long prompt rotate by the same angles.

use candle_core::{DType, Device, Result, Tensor};

use crate::config::RopeScaling;

/// Produces `cos`/`sin` tables of shape (positions, dim/2) for any position range.
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    dim: usize,
    base: f64,
    max_position_embeddings: usize,
    scaling: Option<RopeScaling>,
    /// Frequencies for the non-dynamic variants (dynamic recomputes them per length).
    inv_freq: Vec<f32>,
    /// cos/sin multiplier (YaRN's mscale ratio; 1 otherwise).
    mscale: f32,
}

fn default_inv_freq(dim: usize, base: f64) -> Vec<f32> {
    (0..dim / 2)
        .map(|i| {
            let exponent = (2 * i) as f32 / dim as f32;
            1.0f32 / (base as f32).powf(exponent)
        })
        .collect()
}

fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

fn yarn_correction_dim(rotations: f64, dim: usize, base: f64, max_pos: usize) -> f64 {
    (dim as f64 * (max_pos as f64 / (rotations * 2.0 * std::f64::consts::PI)).ln())
        / (2.0 * base.ln())
}

fn yarn_inv_freq(
    dim: usize,
    base: f64,
    factor: f64,
    original_max: usize,
    beta_fast: f64,
    beta_slow: f64,
) -> Vec<f32> {
    let extra = default_inv_freq(dim, base);
    let low = yarn_correction_dim(beta_fast, dim, base, original_max)
        .floor()
        .max(0.0);
    let mut high = yarn_correction_dim(beta_slow, dim, base, original_max)
        .ceil()
        .min(dim as f64 - 1.0);
    if low == high {
        high += 0.001;
    }
    extra
        .iter()
        .enumerate()
        .map(|(i, &e)| {
            let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0) as f32;
            let extra_mask = 1.0 - ramp;
            let inter = 1.0f32 / (factor as f32 * (1.0 / e));
            inter * (1.0 - extra_mask) + e * extra_mask
        })
        .collect()
}

impl RotaryEmbedding {
    /// Tables for a rotary dimension `dim` (the head for MHA, `qk_rope_head_dim` for MLA).
    pub fn new(
        dim: usize,
        base: f64,
        max_position_embeddings: usize,
        scaling: Option<RopeScaling>,
    ) -> Self {
        let (inv_freq, mscale) = match &scaling {
            Some(RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                mscale,
                mscale_all_dim,
            }) => (
                yarn_inv_freq(
                    dim,
                    base,
                    *factor,
                    *original_max_position_embeddings,
                    *beta_fast,
                    *beta_slow,
                ),
                (yarn_mscale(*factor, *mscale) / yarn_mscale(*factor, *mscale_all_dim)) as f32,
            ),
            _ => (default_inv_freq(dim, base), 1.0),
        };
        Self {
            dim,
            base,
            max_position_embeddings,
            scaling,
            inv_freq,
            mscale,
        }
    }

    /// `(cos, sin)`, each (len, dim/2) in `dtype`, for positions `start..start + len`;
    /// `total_len` is the sequence length after these positions (used by dynamic NTK).
    pub fn tables(
        &self,
        start: usize,
        len: usize,
        total_len: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let dynamic_freq;
        let inv_freq: &[f32] = match &self.scaling {
            Some(RopeScaling::Dynamic { factor }) if total_len > self.max_position_embeddings => {
                let ratio = factor * total_len as f64 / self.max_position_embeddings as f64
                    - (factor - 1.0);
                let base = self.base * ratio.powf(self.dim as f64 / (self.dim as f64 - 2.0));
                dynamic_freq = default_inv_freq(self.dim, base);
                &dynamic_freq
            }
            _ => &self.inv_freq,
        };
        let half = self.dim / 2;
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for p in start..start + len {
            let mut t = p as f32;
            if let Some(RopeScaling::Linear { factor }) = &self.scaling {
                t /= *factor as f32;
            }
            for &f in inv_freq {
                let angle = t * f;
                cos.push(angle.cos() * self.mscale);
                sin.push(angle.sin() * self.mscale);
            }
        }
        let cos = Tensor::from_vec(cos, (len, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (len, half), device)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_frequencies_follow_theta_power() {
        let r = RotaryEmbedding::new(8, 10000.0, 4096, None);
        let (cos, sin) = r.tables(3, 1, 4, DType::F32, &Device::Cpu).unwrap();
        let cos = cos.to_vec2::<f32>().unwrap();
        let sin = sin.to_vec2::<f32>().unwrap();
        for i in 0..4 {
            let f = 1.0 / 10000f64.powf(2.0 * i as f64 / 8.0);
            assert!((cos[0][i] as f64 - (3.0 * f).cos()).abs() < 1e-6);
            assert!((sin[0][i] as f64 - (3.0 * f).sin()).abs() < 1e-6);
        }
    }

    #[test]
    fn linear_scaling_divides_positions() {
        let plain = RotaryEmbedding::new(8, 10000.0, 4096, None);
        let lin = RotaryEmbedding::new(8, 10000.0, 4096, Some(RopeScaling::Linear { factor: 2.0 }));
        let a = plain.tables(5, 1, 6, DType::F32, &Device::Cpu).unwrap().0;
        let b = lin.tables(10, 1, 11, DType::F32, &Device::Cpu).unwrap().0;
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
    }

    #[test]
    fn dynamic_scaling_changes_nothing_within_the_trained_length() {
        let plain = RotaryEmbedding::new(8, 10000.0, 16, None);
        let dynamic =
            RotaryEmbedding::new(8, 10000.0, 16, Some(RopeScaling::Dynamic { factor: 4.0 }));
        let a = plain.tables(0, 16, 16, DType::F32, &Device::Cpu).unwrap().1;
        let b = dynamic
            .tables(0, 16, 16, DType::F32, &Device::Cpu)
            .unwrap()
            .1;
        assert_eq!(a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
        let c = dynamic
            .tables(0, 32, 32, DType::F32, &Device::Cpu)
            .unwrap()
            .1;
        assert_ne!(
            b.to_vec2::<f32>().unwrap()[15],
            c.to_vec2::<f32>().unwrap()[15]
        );
    }

    #[test]
    fn yarn_keeps_high_frequencies_and_scales_low_ones() {
        let yarn = RopeScaling::Yarn {
            factor: 40.0,
            original_max_position_embeddings: 4096,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: 0.707,
            mscale_all_dim: 0.707,
        };
        let r = RotaryEmbedding::new(64, 10000.0, 163840, Some(yarn));
        let plain = default_inv_freq(64, 10000.0);
        // The fastest-rotating dimension is extrapolated (unchanged) ...
        assert_eq!(r.inv_freq[0], plain[0]);
        // ... the slowest is interpolated (divided by the factor).
        assert!((r.inv_freq[31] - plain[31] / 40.0).abs() < 1e-9);
        // mscale == mscale_all_dim → the cos/sin multiplier is 1.
        assert!((r.mscale - 1.0).abs() < 1e-7);
    }
}
