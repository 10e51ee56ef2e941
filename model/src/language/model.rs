//! The decoder stack: `h += Attn(RMSNorm(h)); h += FFN(RMSNorm(h))`, final norm,
//! LM head (`DeepseekV2DecoderLayer` / `DeepseekV2Model` / `DeepseekV2ForCausalLM` in
//! `modeling_deepseek.py`). Routed experts are computed through an
//! [`ExpertBackend`]; everything else is loaded here.

use crate::held::{Held, held};
use candle_core::{DType, Device, Tensor};

use super::attention::Attention;
use super::mha::MhaAttention;
use super::mla::MlaAttention;
use super::mlp::Mlp;
use super::moe::{MoeBlock, Routing};
use super::paged::{CacheLayout, PagedKvCache};
use super::rope::RotaryEmbedding;
use crate::config::{AttentionConfig, LanguageConfig};
use crate::error::{Error, Result};
use crate::linear::Linear;
use crate::weights::LoadTarget;

#[derive(Debug)]
pub(super) enum FeedForward {
    Dense(Mlp),
    Moe(MoeBlock),
}

#[derive(Debug)]
pub(super) struct DecoderLayer {
    pub(super) input_layernorm: Tensor,
    pub(super) post_attention_layernorm: Tensor,
    pub(super) attention: Attention,
    pub(super) ffn: FeedForward,
}

/// What a forward pass can record for inspection (golden tests, debugging).
#[derive(Debug, Default)]
pub struct ForwardTrace {
    /// Hidden state at the last position: the input embedding, the output of every
    /// decoder layer but the last, then the final-norm output (the fixtures' layout).
    pub hidden_last: Vec<Tensor>,
    /// (layer, routing of every token of the step) for every MoE layer.
    pub routing: Vec<(usize, Routing)>,
}

/// The language model without its routed experts.
#[derive(Debug)]
pub struct LanguageModel {
    pub(super) cfg: LanguageConfig,
    embed_tokens: Tensor,
    pub(super) layers: Vec<DecoderLayer>,
    pub(super) norm: Tensor,
    pub(super) lm_head: Linear,
    pub(super) rope: RotaryEmbedding,
    pub(super) dtype: DType,
    pub(super) device: Device,
}

impl LanguageModel {
    /// Loads everything under `language.` except the routed experts.
    pub fn load(cfg: &LanguageConfig, target: LoadTarget) -> Result<Self> {
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let w = target.pp("language");
        let m = w.pp("model");
        let scale = cfg.softmax_scale();
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let lw = m.pp("layers").pp(l);
            let aw = lw.pp("self_attn");
            let attention = match &cfg.attention {
                AttentionConfig::Mha { head_dim } => Attention::Mha(MhaAttention::new(
                    &aw,
                    h,
                    cfg.num_attention_heads,
                    *head_dim,
                    scale,
                )?),
                mla @ AttentionConfig::Mla { .. } => Attention::Mla(MlaAttention::new(
                    &aw,
                    h,
                    cfg.num_attention_heads,
                    mla,
                    scale,
                )?),
            };
            let ffn = match &cfg.moe {
                Some(moe) if cfg.is_moe_layer(l) => {
                    FeedForward::Moe(MoeBlock::new(&lw.pp("mlp"), l, h, moe)?)
                }
                _ => FeedForward::Dense(Mlp::new(&lw.pp("mlp"), h, cfg.intermediate_size)?),
            };
            layers.push(DecoderLayer {
                input_layernorm: lw.get("input_layernorm.weight", &[h])?,
                post_attention_layernorm: lw.get("post_attention_layernorm.weight", &[h])?,
                attention,
                ffn,
            });
        }
        Ok(Self {
            embed_tokens: m.table("embed_tokens.weight", &[v, h])?,
            norm: m.get("norm.weight", &[h])?,
            lm_head: w.linear_packed("lm_head.weight", &[v, h])?,
            layers,
            rope: RotaryEmbedding::new(
                cfg.rope_dim(),
                cfg.rope_theta,
                cfg.max_position_embeddings,
                cfg.rope_scaling.clone(),
            ),
            cfg: cfg.clone(),
            dtype: target.dtype,
            device: target.device.clone(),
        })
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &LanguageConfig {
        &self.cfg
    }

    /// Compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Token embeddings: (tokens, hidden).
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.cfg.vocab_size) {
            return Err(Error::Request(format!(
                "token id {bad} is outside the vocabulary of {} tokens",
                self.cfg.vocab_size
            )));
        }
        let idx = Tensor::from_slice(ids, ids.len(), &self.device)?;
        Ok(self
            .embed_tokens
            .index_select(&idx, 0)?
            .to_dtype(self.dtype)?)
    }

    /// Input embeddings of a multimodal prompt: token embeddings, with the rows of
    /// `image_embeds` (one row per image token, in sequence order) written over the
    /// positions of `image_runs` (as `DeepseekVLV2ForCausalLM.prepare_inputs_embeds` writes them
    /// at the `images_seq_mask` positions).
    pub fn embed_with_images(
        &self,
        ids: &[u32],
        image_runs: &[std::ops::Range<usize>],
        image_embeds: Option<&Tensor>,
    ) -> Result<Tensor> {
        let text = self.embed(ids)?;
        let image_tokens: usize = image_runs.iter().map(|r| r.len()).sum();
        let Some(images) = image_embeds.filter(|_| image_tokens > 0) else {
            if image_tokens > 0 {
                return Err(Error::Request(format!(
                    "the prompt has {image_tokens} image tokens but no image embeddings"
                )));
            }
            return Ok(text);
        };
        let (rows, width) = images.dims2()?;
        if rows != image_tokens || width != self.cfg.hidden_size {
            return Err(Error::Request(format!(
                "image embeddings are ({rows}, {width}); the prompt needs ({image_tokens}, {})",
                self.cfg.hidden_size
            )));
        }
        let images = images.to_dtype(self.dtype)?;
        let mut pieces = Vec::with_capacity(2 * image_runs.len() + 1);
        let (mut pos, mut used) = (0, 0);
        for run in image_runs {
            if run.start < pos || run.end > ids.len() {
                return Err(Error::Request(format!(
                    "image run {run:?} is out of order or outside the prompt"
                )));
            }
            if run.start > pos {
                pieces.push(text.narrow(0, pos, run.start - pos)?);
            }
            pieces.push(images.narrow(0, used, run.len())?);
            used += run.len();
            pos = run.end;
        }
        if pos < ids.len() {
            pieces.push(text.narrow(0, pos, ids.len() - pos)?);
        }
        Ok(Tensor::cat(&pieces, 0)?)
    }

    /// What each layer caches per token.
    pub fn cache_layout(&self) -> CacheLayout {
        match &self.cfg.attention {
            AttentionConfig::Mha { head_dim } => CacheLayout::Mha {
                width: self.cfg.num_key_value_heads * head_dim,
            },
            AttentionConfig::Mla {
                kv_lora_rank,
                qk_rope_head_dim,
                ..
            } => CacheLayout::Mla {
                kv_lora_rank: *kv_lora_rank,
                rope_dim: *qk_rope_head_dim,
            },
        }
    }

    /// Bytes of KV cache one token takes across all layers in the compute dtype.
    pub fn cache_bytes_per_token(&self) -> usize {
        let [a, b] = self.cache_layout().widths();
        self.cfg.num_hidden_layers * (a + b) * self.dtype.size_in_bytes()
    }

    /// Paged storage for `slots` cached tokens (shared by many sequences).
    pub fn new_paged_cache(&self, slots: usize) -> Result<PagedKvCache> {
        Ok(PagedKvCache::new(
            self.cache_layout(),
            self.cfg.num_hidden_layers,
            slots,
            self.dtype,
            &self.device,
        )?)
    }
}

impl Held for DecoderLayer {
    fn held_bytes(&self) -> usize {
        let ffn = match &self.ffn {
            FeedForward::Dense(mlp) => mlp.held_bytes(),
            FeedForward::Moe(moe) => moe.held_bytes(),
        };
        ffn + held!(
            self.input_layernorm,
            self.post_attention_layernorm,
            self.attention
        )
    }
}

impl Held for LanguageModel {
    /// Every weight but the routed experts (see [`crate::experts::LocalExperts::bytes`]).
    fn held_bytes(&self) -> usize {
        held!(self.embed_tokens, self.layers, self.norm, self.lm_head)
    }
}
