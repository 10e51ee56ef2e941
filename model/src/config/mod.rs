//! The released DeepSeek-VL2 `config.json` and `processor_config.json`.
//!
//! Field names mirror the released files. Absent keys take exactly the defaults of the
//! reference classes (`DeepseekV2Config`, `VisionEncoderConfig`, `MlpProjectorConfig`,
//! `DeepseekVLV2Config`), including their traps: a missing `q_lora_rank` means
//! 1536, the default `topk_method` (`"gready"`) and `tile_tag` (`"tile_tag"`) are invalid
//! and rejected with an error naming the field.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result, read_json};

mod defaults;
mod raw;

use defaults::*;
use raw::RawModelConfig;

/// How the MoE gate selects experts (`topk_method` of `MoEGate` in `modeling_deepseek.py`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopkMethod {
    Greedy,
    GroupLimitedGreedy,
    NoauxTc,
}

/// How gate logits become scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoringFunc {
    Softmax,
    Sigmoid,
}

/// `rope_scaling` of the language config (as `DeepseekV2Attention` builds its rotary embedding
/// from it, e.g. `DeepseekV2YarnRotaryEmbedding`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    Linear {
        factor: f64,
    },
    Dynamic {
        factor: f64,
    },
    Yarn {
        factor: f64,
        original_max_position_embeddings: usize,
        beta_fast: f64,
        beta_slow: f64,
        mscale: f64,
        mscale_all_dim: f64,
    },
}

/// Attention flavour, derived from `use_mla` and the MLA dimensions.
#[derive(Debug, Clone, PartialEq)]
pub enum AttentionConfig {
    /// Plain multi-head attention (Tiny): head_dim = hidden / heads, rotate-half RoPE.
    Mha { head_dim: usize },
    /// Multi-head latent attention (Small, Base).
    Mla {
        q_lora_rank: Option<usize>,
        kv_lora_rank: usize,
        qk_nope_head_dim: usize,
        qk_rope_head_dim: usize,
        v_head_dim: usize,
    },
}

/// Mixture-of-experts settings; present when the model has routed experts.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    pub n_routed_experts: usize,
    pub n_shared_experts: usize,
    pub num_experts_per_tok: usize,
    pub moe_intermediate_size: usize,
    pub topk_method: TopkMethod,
    pub scoring_func: ScoringFunc,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f64,
    pub n_group: usize,
    pub topk_group: usize,
    pub first_k_dense_replace: usize,
    pub moe_layer_freq: usize,
}

/// The language model configuration, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct LanguageConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub attention: AttentionConfig,
    pub moe: Option<MoeConfig>,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub bos_token_id: u32,
    pub eos_token_id: u32,
}

impl LanguageConfig {
    /// Whether layer `layer` uses the MoE feed-forward (otherwise the dense MLP).
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        match &self.moe {
            Some(m) => layer >= m.first_k_dense_replace && layer.is_multiple_of(m.moe_layer_freq),
            None => false,
        }
    }

    /// Indices of the MoE layers.
    pub fn moe_layers(&self) -> Vec<usize> {
        (0..self.num_hidden_layers)
            .filter(|&l| self.is_moe_layer(l))
            .collect()
    }

    /// Attention softmax scale, including the YaRN mscale correction for MLA.
    pub fn softmax_scale(&self) -> f64 {
        match &self.attention {
            AttentionConfig::Mha { head_dim } => 1.0 / (*head_dim as f64).sqrt(),
            AttentionConfig::Mla {
                qk_nope_head_dim,
                qk_rope_head_dim,
                ..
            } => {
                let mut scale = 1.0 / ((qk_nope_head_dim + qk_rope_head_dim) as f64).sqrt();
                if let Some(RopeScaling::Yarn {
                    factor,
                    mscale_all_dim,
                    ..
                }) = &self.rope_scaling
                    && *factor > 1.0
                    && *mscale_all_dim != 0.0
                {
                    let m = 0.1 * mscale_all_dim * factor.ln() + 1.0;
                    scale *= m * m;
                }
                scale
            }
        }
    }

    /// Dimension RoPE rotates: the whole head for MHA, `qk_rope_head_dim` for MLA.
    pub fn rope_dim(&self) -> usize {
        match &self.attention {
            AttentionConfig::Mha { head_dim } => *head_dim,
            AttentionConfig::Mla {
                qk_rope_head_dim, ..
            } => *qk_rope_head_dim,
        }
    }

    /// Values the KV cache stores per token per layer (MLA: latent + rope key; MHA: K and V).
    pub fn kv_values_per_token_per_layer(&self) -> usize {
        match &self.attention {
            AttentionConfig::Mha { head_dim } => 2 * self.num_key_value_heads * head_dim,
            AttentionConfig::Mla {
                kv_lora_rank,
                qk_rope_head_dim,
                ..
            } => kv_lora_rank + qk_rope_head_dim,
        }
    }
}

/// SigLIP vision tower settings (`vision_config` of `config.json`, built by `create_siglip_vit`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct VisionConfig {
    #[serde(default = "d_vision_model_name")]
    pub model_name: String,
    #[serde(default = "d_384")]
    pub image_size: usize,
    #[serde(default = "d_16")]
    pub patch_size: usize,
    #[serde(default = "d_1024")]
    pub width: usize,
    #[serde(default = "d_24")]
    pub layers: usize,
    #[serde(default = "d_16")]
    pub heads: usize,
    #[serde(default = "d_4f")]
    pub mlp_ratio: f64,
}

impl VisionConfig {
    /// Hidden width of the ViT MLP: `int(width · mlp_ratio)`.
    pub fn mlp_hidden(&self) -> usize {
        (self.width as f64 * self.mlp_ratio) as usize
    }
}

/// Projector settings (`projector_config` of `config.json`, read by `MlpProjector`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ProjectorConfig {
    #[serde(default = "d_projector_type")]
    pub projector_type: String,
    #[serde(default = "d_1152")]
    pub input_dim: usize,
    #[serde(default = "d_2048")]
    pub n_embed: usize,
    #[serde(default = "d_2")]
    pub depth: usize,
    #[serde(default = "d_1")]
    pub mlp_ratio: usize,
    #[serde(default = "d_2")]
    pub downsample_ratio: usize,
    #[serde(default)]
    pub token_pooling: bool,
}

/// Where the global view goes relative to the local tiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GlobalViewPos {
    Head,
    Tail,
}

/// The whole top-level `config.json` of a DeepSeek-VL2 snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub language: LanguageConfig,
    pub vision: VisionConfig,
    pub projector: ProjectorConfig,
    /// `[width, height]` candidates, in order (order matters for ties).
    pub candidate_resolutions: Vec<[usize; 2]>,
    pub global_view_pos: GlobalViewPos,
}

impl ModelConfig {
    /// Reads `config.json` from a snapshot folder.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_file(&dir.join("config.json"))
    }

    /// Reads and validates a `config.json` file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let raw: RawModelConfig = read_json(path)?;
        raw.validate()
    }

    /// Parses and validates a `config.json` text.
    pub fn from_json(text: &str) -> Result<Self> {
        let raw: RawModelConfig =
            serde_json::from_str(text).map_err(|e| Error::json("config.json", e))?;
        raw.validate()
    }
}

/// `processor_config.json` (the keys `DeepseekVLV2Processor` is configured with).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ProcessorConfig {
    #[serde(default = "d_candidates")]
    pub candidate_resolutions: Vec<[usize; 2]>,
    #[serde(default = "d_14")]
    pub patch_size: usize,
    #[serde(default = "d_2")]
    pub downsample_ratio: usize,
    #[serde(default = "d_half3")]
    pub image_mean: [f64; 3],
    #[serde(default = "d_half3")]
    pub image_std: [f64; 3],
    #[serde(default = "d_true")]
    pub normalize: bool,
    #[serde(default = "d_image_token")]
    pub image_token: String,
    #[serde(default = "d_pad_token")]
    pub pad_token: String,
    #[serde(default)]
    pub add_special_token: bool,
    #[serde(default = "d_sft_format")]
    pub sft_format: String,
    #[serde(default)]
    pub mask_prompt: bool,
    #[serde(default = "d_ignore_id")]
    pub ignore_id: i64,
}

impl Default for ProcessorConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("an empty processor config takes every default")
    }
}

impl ProcessorConfig {
    /// Reads `processor_config.json` from a snapshot folder; an absent file means the defaults.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("processor_config.json");
        if !path.exists() {
            return Ok(Self::default());
        }
        let cfg: Self = read_json(&path)?;
        check_candidates(
            "processor_config.candidate_resolutions",
            &cfg.candidate_resolutions,
        )?;
        if cfg.sft_format != "deepseek" {
            return Err(Error::config(
                "sft_format",
                format!(
                    "`{}` is not supported; only the `deepseek` template is",
                    cfg.sft_format
                ),
            ));
        }
        Ok(cfg)
    }
}

/// Candidates must be non-empty and made of whole 384-pixel tiles.
fn check_candidates(field: &str, candidates: &[[usize; 2]]) -> Result<()> {
    if candidates.is_empty() {
        return Err(Error::config(field, "must not be empty"));
    }
    if let Some([w, h]) = candidates
        .iter()
        .find(|[w, h]| *w == 0 || *h == 0 || w % 384 != 0 || h % 384 != 0)
    {
        return Err(Error::config(
            field,
            format!("[{w}, {h}] is not a positive multiple of the 384-pixel tile"),
        ));
    }
    Ok(())
}
