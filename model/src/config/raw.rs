//! Serde mirrors of the released files with the reference defaults, and their validation
//! into the public config types.

use serde::Deserialize;

use super::defaults::*;
use super::*;
use crate::error::{Error, Result};

#[derive(Debug, Deserialize)]
pub(super) struct RawModelConfig {
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
    pub(super) fn validate(self) -> Result<ModelConfig> {
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
