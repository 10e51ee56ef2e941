//! The released DeepSeek-VL2 `config.json` and `processor_config.json` (reference-spec §1).
//!
//! Field names mirror the released files. Absent keys take exactly the defaults of the
//! reference classes (`DeepseekV2Config`, `VisionEncoderConfig`, `MlpProjectorConfig`,
//! `DeepseekVLV2Config`), including their traps (§6.13): a missing `q_lora_rank` means
//! 1536, the default `topk_method` (`"gready"`) and `tile_tag` (`"tile_tag"`) are invalid
//! and rejected with an error naming the field.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result, read_json};

/// How the MoE gate selects experts (spec §4.4).
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

/// `rope_scaling` of the language config (spec §4.3).
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

/// SigLIP vision tower settings (spec §1.2).
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

/// Projector settings (spec §1.3).
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

/// `processor_config.json` (spec §1.4).
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

// ---------------------------------------------------------------------------------------
// Raw serde mirrors of the released files, with the reference defaults.

#[derive(Debug, Deserialize)]
struct RawModelConfig {
    language_config: RawLanguageConfig,
    #[serde(default = "d_empty_object")]
    vision_config: serde_json::Value,
    #[serde(default = "d_empty_object")]
    projector_config: serde_json::Value,
    #[serde(default = "d_one_candidate")]
    candidate_resolutions: Vec<[usize; 2]>,
    #[serde(default = "d_tile_tag")]
    tile_tag: String,
    #[serde(default = "d_global_view_pos")]
    global_view_pos: String,
}

#[derive(Debug, Deserialize)]
struct RawLanguageConfig {
    #[serde(default = "d_vocab")]
    vocab_size: usize,
    #[serde(default = "d_4096")]
    hidden_size: usize,
    #[serde(default = "d_11008")]
    intermediate_size: usize,
    #[serde(default = "d_1407")]
    moe_intermediate_size: usize,
    #[serde(default = "d_30")]
    num_hidden_layers: usize,
    #[serde(default = "d_32")]
    num_attention_heads: usize,
    #[serde(default = "d_32o")]
    num_key_value_heads: Option<usize>,
    #[serde(default)]
    n_shared_experts: Option<usize>,
    #[serde(default)]
    n_routed_experts: Option<usize>,
    #[serde(default = "d_1f")]
    routed_scaling_factor: f64,
    #[serde(default = "d_topk_method")]
    topk_method: String,
    #[serde(default)]
    n_group: Option<usize>,
    #[serde(default)]
    topk_group: Option<usize>,
    #[serde(default)]
    num_experts_per_tok: Option<usize>,
    #[serde(default = "d_1")]
    moe_layer_freq: usize,
    #[serde(default)]
    first_k_dense_replace: usize,
    #[serde(default)]
    norm_topk_prob: bool,
    #[serde(default = "d_scoring_func")]
    scoring_func: String,
    #[serde(default = "d_2048")]
    max_position_embeddings: usize,
    #[serde(default = "d_eps")]
    rms_norm_eps: f64,
    #[serde(default = "d_theta")]
    rope_theta: f64,
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default = "d_bos")]
    bos_token_id: u32,
    #[serde(default = "d_eos")]
    eos_token_id: u32,
    #[serde(default = "d_q_lora")]
    q_lora_rank: Option<usize>,
    #[serde(default = "d_512o")]
    kv_lora_rank: Option<usize>,
    #[serde(default = "d_64o")]
    qk_rope_head_dim: Option<usize>,
    #[serde(default = "d_128o")]
    v_head_dim: Option<usize>,
    #[serde(default = "d_128o")]
    qk_nope_head_dim: Option<usize>,
    #[serde(default = "d_true")]
    use_mla: bool,
    #[serde(default = "d_silu")]
    hidden_act: String,
    #[serde(default)]
    tie_word_embeddings: bool,
}

fn required(field: &str, value: Option<usize>, why: &str) -> Result<usize> {
    match value {
        Some(v) if v > 0 => Ok(v),
        _ => Err(Error::config(
            field,
            format!("must be a positive integer {why}"),
        )),
    }
}

impl RawLanguageConfig {
    fn validate(self) -> Result<LanguageConfig> {
        let field = |f: &str| format!("language_config.{f}");
        if self.hidden_act != "silu" {
            return Err(Error::config(
                field("hidden_act"),
                format!("`{}` is not supported (only `silu`)", self.hidden_act),
            ));
        }
        if self.attention_bias {
            return Err(Error::config(
                field("attention_bias"),
                "attention biases are not supported",
            ));
        }
        if self.tie_word_embeddings {
            return Err(Error::config(
                field("tie_word_embeddings"),
                "tied embeddings are not supported (the released checkpoints have a separate lm_head)",
            ));
        }
        let heads = required(
            &field("num_attention_heads"),
            Some(self.num_attention_heads),
            "",
        )?;
        let kv_heads = self.num_key_value_heads.unwrap_or(heads);
        let attention = if self.use_mla {
            let why = "when use_mla is true";
            AttentionConfig::Mla {
                q_lora_rank: self.q_lora_rank,
                kv_lora_rank: required(&field("kv_lora_rank"), self.kv_lora_rank, why)?,
                qk_nope_head_dim: required(&field("qk_nope_head_dim"), self.qk_nope_head_dim, why)?,
                qk_rope_head_dim: required(&field("qk_rope_head_dim"), self.qk_rope_head_dim, why)?,
                v_head_dim: required(&field("v_head_dim"), self.v_head_dim, why)?,
            }
        } else {
            if !self.hidden_size.is_multiple_of(heads) {
                return Err(Error::config(
                    field("hidden_size"),
                    format!("{} is not divisible by {heads} heads", self.hidden_size),
                ));
            }
            if kv_heads != heads {
                return Err(Error::config(
                    field("num_key_value_heads"),
                    "grouped-query attention is not supported for plain MHA",
                ));
            }
            AttentionConfig::Mha {
                head_dim: self.hidden_size / heads,
            }
        };
        let moe = match self.n_routed_experts {
            None | Some(0) => None,
            Some(n_routed) => Some(self.moe_config(n_routed)?),
        };
        let rope_scaling = self
            .rope_scaling
            .as_ref()
            .filter(|v| !v.is_null())
            .map(parse_rope_scaling)
            .transpose()?;
        if self.rope_theta <= 0.0 {
            return Err(Error::config(field("rope_theta"), "must be positive"));
        }
        Ok(LanguageConfig {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            attention,
            moe,
            max_position_embeddings: self.max_position_embeddings,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta,
            rope_scaling,
            bos_token_id: self.bos_token_id,
            eos_token_id: self.eos_token_id,
        })
    }

    fn moe_config(&self, n_routed: usize) -> Result<MoeConfig> {
        let field = |f: &str| format!("language_config.{f}");
        let topk_method = match self.topk_method.as_str() {
            "greedy" => TopkMethod::Greedy,
            "group_limited_greedy" => TopkMethod::GroupLimitedGreedy,
            "noaux_tc" => TopkMethod::NoauxTc,
            other => {
                return Err(Error::config(
                    field("topk_method"),
                    format!(
                        "unknown value `{other}` (expected `greedy`, `group_limited_greedy` or `noaux_tc`; \
                         the reference default `gready` is a typo every released config overrides)"
                    ),
                ));
            }
        };
        let scoring_func = match self.scoring_func.as_str() {
            "softmax" => ScoringFunc::Softmax,
            "sigmoid" => ScoringFunc::Sigmoid,
            other => {
                return Err(Error::config(
                    field("scoring_func"),
                    format!("unknown value `{other}` (expected `softmax` or `sigmoid`)"),
                ));
            }
        };
        let k = required(
            &field("num_experts_per_tok"),
            self.num_experts_per_tok,
            "when n_routed_experts is set",
        )?;
        if k > n_routed {
            return Err(Error::config(
                field("num_experts_per_tok"),
                format!("{k} is more than the {n_routed} routed experts"),
            ));
        }
        let grouped = topk_method != TopkMethod::Greedy;
        let (n_group, topk_group) = if grouped {
            let why = "for grouped top-k methods";
            let g = required(&field("n_group"), self.n_group, why)?;
            let tg = required(&field("topk_group"), self.topk_group, why)?;
            if !n_routed.is_multiple_of(g) || tg > g {
                return Err(Error::config(
                    field("n_group"),
                    format!("{n_routed} experts cannot be split into {g} groups keeping {tg}"),
                ));
            }
            (g, tg)
        } else {
            (self.n_group.unwrap_or(1), self.topk_group.unwrap_or(1))
        };
        if self.moe_layer_freq == 0 {
            return Err(Error::config(field("moe_layer_freq"), "must be at least 1"));
        }
        Ok(MoeConfig {
            n_routed_experts: n_routed,
            n_shared_experts: self.n_shared_experts.unwrap_or(0),
            num_experts_per_tok: k,
            moe_intermediate_size: self.moe_intermediate_size,
            topk_method,
            scoring_func,
            norm_topk_prob: self.norm_topk_prob,
            routed_scaling_factor: self.routed_scaling_factor,
            n_group,
            topk_group,
            first_k_dense_replace: self.first_k_dense_replace,
            moe_layer_freq: self.moe_layer_freq,
        })
    }
}

fn parse_rope_scaling(v: &serde_json::Value) -> Result<RopeScaling> {
    const FIELD: &str = "language_config.rope_scaling";
    let kind = v
        .get("type")
        .or_else(|| v.get("rope_type"))
        .and_then(|t| t.as_str())
        .ok_or_else(|| Error::config(FIELD, "missing `type`"))?;
    let num = |key: &str, default: Option<f64>| -> Result<f64> {
        match v.get(key).and_then(|x| x.as_f64()) {
            Some(x) => Ok(x),
            None => default.ok_or_else(|| Error::config(FIELD, format!("missing `{key}`"))),
        }
    };
    let factor = num("factor", None)?;
    Ok(match kind {
        "linear" => RopeScaling::Linear { factor },
        "dynamic" => RopeScaling::Dynamic { factor },
        "yarn" => RopeScaling::Yarn {
            factor,
            original_max_position_embeddings: num("original_max_position_embeddings", Some(4096.0))?
                as usize,
            beta_fast: num("beta_fast", Some(32.0))?,
            beta_slow: num("beta_slow", Some(1.0))?,
            mscale: num("mscale", Some(1.0))?,
            mscale_all_dim: num("mscale_all_dim", Some(0.0))?,
        },
        other => {
            return Err(Error::config(
                FIELD,
                format!("unknown type `{other}` (expected linear, dynamic or yarn)"),
            ));
        }
    })
}

impl RawModelConfig {
    fn validate(self) -> Result<ModelConfig> {
        match self.tile_tag.as_str() {
            "2D" => {}
            "1D" => {
                return Err(Error::config(
                    "tile_tag",
                    "`1D` is an abandoned layout of the reference and is not supported (use `2D`)",
                ));
            }
            other => {
                return Err(Error::config(
                    "tile_tag",
                    format!("unknown value `{other}` (expected `2D`)"),
                ));
            }
        }
        let global_view_pos = match self.global_view_pos.as_str() {
            "head" => GlobalViewPos::Head,
            "tail" => GlobalViewPos::Tail,
            other => {
                return Err(Error::config(
                    "global_view_pos",
                    format!("unknown value `{other}` (expected `head` or `tail`)"),
                ));
            }
        };
        let vision: VisionConfig = serde_json::from_value(self.vision_config)
            .map_err(|e| Error::config("vision_config", e.to_string()))?;
        let projector: ProjectorConfig = serde_json::from_value(self.projector_config)
            .map_err(|e| Error::config("projector_config", e.to_string()))?;
        if projector.projector_type != "downsample_mlp_gelu" {
            return Err(Error::config(
                "projector_config.projector_type",
                format!(
                    "`{}` is not supported (expected `downsample_mlp_gelu`)",
                    projector.projector_type
                ),
            ));
        }
        check_candidates("candidate_resolutions", &self.candidate_resolutions)?;
        let language = self.language_config.validate()?;
        Ok(ModelConfig {
            language,
            vision,
            projector,
            candidate_resolutions: self.candidate_resolutions,
            global_view_pos,
        })
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

// Reference defaults, one function each for serde.
fn d_1() -> usize {
    1
}
fn d_2() -> usize {
    2
}
fn d_14() -> usize {
    14
}
fn d_16() -> usize {
    16
}
fn d_24() -> usize {
    24
}
fn d_30() -> usize {
    30
}
fn d_32() -> usize {
    32
}
fn d_32o() -> Option<usize> {
    Some(32)
}
fn d_384() -> usize {
    384
}
fn d_512o() -> Option<usize> {
    Some(512)
}
fn d_64o() -> Option<usize> {
    Some(64)
}
fn d_128o() -> Option<usize> {
    Some(128)
}
fn d_1024() -> usize {
    1024
}
fn d_1152() -> usize {
    1152
}
fn d_1407() -> usize {
    1407
}
fn d_2048() -> usize {
    2048
}
fn d_4096() -> usize {
    4096
}
fn d_11008() -> usize {
    11008
}
fn d_vocab() -> usize {
    102400
}
fn d_bos() -> u32 {
    100000
}
fn d_eos() -> u32 {
    100001
}
fn d_q_lora() -> Option<usize> {
    Some(1536)
}
fn d_1f() -> f64 {
    1.0
}
fn d_4f() -> f64 {
    4.0
}
fn d_eps() -> f64 {
    1e-6
}
fn d_theta() -> f64 {
    10000.0
}
fn d_true() -> bool {
    true
}
fn d_half3() -> [f64; 3] {
    [0.5; 3]
}
fn d_topk_method() -> String {
    "gready".into()
}
fn d_scoring_func() -> String {
    "softmax".into()
}
fn d_silu() -> String {
    "silu".into()
}
fn d_tile_tag() -> String {
    "tile_tag".into()
}
fn d_global_view_pos() -> String {
    "head".into()
}
fn d_vision_model_name() -> String {
    "siglip_large_patch16_384".into()
}
fn d_projector_type() -> String {
    "downsample_mlp_gelu".into()
}
fn d_image_token() -> String {
    "<image>".into()
}
fn d_pad_token() -> String {
    "<｜▁pad▁｜>".into()
}
fn d_sft_format() -> String {
    "deepseek".into()
}
fn d_ignore_id() -> i64 {
    -100
}
/// `DeepseekVLV2Config`'s default: a single 384×384 candidate.
fn d_one_candidate() -> Vec<[usize; 2]> {
    vec![[384, 384]]
}
fn d_empty_object() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
}
/// The 23 released candidate resolutions: every (m·384, n·384) with m·n ≤ 9, in the
/// released order.
fn d_candidates() -> Vec<[usize; 2]> {
    [
        [1, 1],
        [1, 2],
        [2, 1],
        [1, 3],
        [3, 1],
        [1, 4],
        [4, 1],
        [2, 2],
        [1, 5],
        [5, 1],
        [1, 6],
        [6, 1],
        [2, 3],
        [3, 2],
        [1, 7],
        [7, 1],
        [1, 8],
        [8, 1],
        [2, 4],
        [4, 2],
        [1, 9],
        [9, 1],
        [3, 3],
    ]
    .into_iter()
    .map(|[w, h]| [w * 384, h * 384])
    .collect()
}
