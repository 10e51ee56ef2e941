//! Every tensor of a DeepSeek-VL2 snapshot in the released layout: name, shape, how a
//! fresh model initialises it, and whether a token's forward pass uses it.

use tessera_model::config::{AttentionConfig, LanguageConfig, ModelConfig, TopkMethod};

/// Standard deviation of weight matrices and embeddings (`initializer_range`).
const WEIGHT_STD: f32 = 0.02;

/// How a tensor's values are drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// Bell-shaped noise with mean 0 and this standard deviation.
    Normal { std: f32 },
    /// Norm scales.
    Ones,
    /// Biases and the gate's score correction.
    Zeros,
}

/// How much of a tensor one token's forward pass touches (for the activated count).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Use {
    /// Every token runs it.
    Always,
    /// A routed expert: a token runs `top_k` of `experts` of them.
    Routed { top_k: usize, experts: usize },
    /// Not multiplied: the embedding table (a row lookup) and the SigLIP
    /// attention-pool head (in the released checkpoints, never run).
    Never,
}

/// One tensor of the checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
    pub usage: Use,
}

impl TensorSpec {
    /// Number of values.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Collects tensors in module order.
struct Specs(Vec<TensorSpec>);

impl Specs {
    fn add(&mut self, name: impl Into<String>, shape: &[usize], init: Init, usage: Use) {
        self.0.push(TensorSpec {
            name: name.into(),
            shape: shape.to_vec(),
            init,
            usage,
        });
    }

    fn weight(&mut self, name: impl Into<String>, shape: &[usize]) {
        self.add(name, shape, Init::Normal { std: WEIGHT_STD }, Use::Always);
    }

    /// `prefix.weight` (out, inp) and `prefix.bias` (out).
    fn linear_bias(&mut self, prefix: &str, out: usize, inp: usize, usage: Use) {
        let init = Init::Normal { std: WEIGHT_STD };
        self.add(format!("{prefix}.weight"), &[out, inp], init, usage);
        self.add(format!("{prefix}.bias"), &[out], Init::Zeros, usage);
    }

    fn layer_norm(&mut self, prefix: &str, width: usize, usage: Use) {
        self.add(format!("{prefix}.weight"), &[width], Init::Ones, usage);
        self.add(format!("{prefix}.bias"), &[width], Init::Zeros, usage);
    }

    /// `gate_proj`, `up_proj`, `down_proj` of a gated SiLU MLP.
    fn mlp(&mut self, prefix: &str, hidden: usize, inter: usize, usage: Use) {
        let init = Init::Normal { std: WEIGHT_STD };
        self.add(
            format!("{prefix}.gate_proj.weight"),
            &[inter, hidden],
            init,
            usage,
        );
        self.add(
            format!("{prefix}.up_proj.weight"),
            &[inter, hidden],
            init,
            usage,
        );
        self.add(
            format!("{prefix}.down_proj.weight"),
            &[hidden, inter],
            init,
            usage,
        );
    }

    fn vision(&mut self, cfg: &ModelConfig) {
        let v = &cfg.vision;
        let (c, p, mlp) = (v.width, v.patch_size, v.mlp_hidden());
        let grid = v.image_size / p;
        let always = Use::Always;
        // The patch convolution: weight (out, channels, kh, kw).
        self.weight("vision.patch_embed.proj.weight", &[c, 3, p, p]);
        self.add("vision.patch_embed.proj.bias", &[c], Init::Zeros, always);
        self.weight("vision.pos_embed", &[1, grid * grid, c]);
        for b in 0..v.layers {
            let pre = format!("vision.blocks.{b}");
            self.layer_norm(&format!("{pre}.norm1"), c, always);
            self.linear_bias(&format!("{pre}.attn.qkv"), 3 * c, c, always);
            self.linear_bias(&format!("{pre}.attn.proj"), c, c, always);
            self.layer_norm(&format!("{pre}.norm2"), c, always);
            self.linear_bias(&format!("{pre}.mlp.fc1"), mlp, c, always);
            self.linear_bias(&format!("{pre}.mlp.fc2"), c, mlp, always);
        }
        self.layer_norm("vision.norm", c, always);
        // The attention-pool head ships with the released checkpoints but is never run.
        let never = Use::Never;
        self.add(
            "vision.attn_pool.latent",
            &[1, 1, c],
            Init::Normal { std: WEIGHT_STD },
            never,
        );
        self.linear_bias("vision.attn_pool.q", c, c, never);
        self.linear_bias("vision.attn_pool.kv", 2 * c, c, never);
        self.linear_bias("vision.attn_pool.proj", c, c, never);
        self.layer_norm("vision.attn_pool.norm", c, never);
        self.linear_bias("vision.attn_pool.mlp.fc1", mlp, c, never);
        self.linear_bias("vision.attn_pool.mlp.fc2", c, mlp, never);
    }

    fn projector(&mut self, cfg: &ModelConfig) {
        let pr = &cfg.projector;
        let d = pr.n_embed;
        let inp = cfg.vision.width * pr.downsample_ratio * pr.downsample_ratio;
        self.linear_bias("projector.layers.0", d, inp, Use::Always);
        self.linear_bias("projector.layers.2", d, d, Use::Always);
        // The reference initialises both learned vectors as randn · n_embed^-1/2.
        let std = 1.0 / (d as f32).sqrt();
        self.add("image_newline", &[d], Init::Normal { std }, Use::Always);
        self.add("view_seperator", &[d], Init::Normal { std }, Use::Always);
    }

    fn attention(&mut self, pre: &str, cfg: &LanguageConfig) {
        let (h, heads) = (cfg.hidden_size, cfg.num_attention_heads);
        match &cfg.attention {
            AttentionConfig::Mha { head_dim } => {
                let width = heads * head_dim;
                for proj in ["q_proj", "k_proj", "v_proj"] {
                    self.weight(format!("{pre}.{proj}.weight"), &[width, h]);
                }
                self.weight(format!("{pre}.o_proj.weight"), &[h, width]);
            }
            AttentionConfig::Mla {
                q_lora_rank,
                kv_lora_rank: rank,
                qk_nope_head_dim: nope,
                qk_rope_head_dim: rope,
                v_head_dim: v,
            } => {
                let q_width = heads * (nope + rope);
                match q_lora_rank {
                    None => self.weight(format!("{pre}.q_proj.weight"), &[q_width, h]),
                    Some(qr) => {
                        self.weight(format!("{pre}.q_a_proj.weight"), &[*qr, h]);
                        let norm = format!("{pre}.q_a_layernorm.weight");
                        self.add(norm, &[*qr], Init::Ones, Use::Always);
                        self.weight(format!("{pre}.q_b_proj.weight"), &[q_width, *qr]);
                    }
                }
                self.weight(
                    format!("{pre}.kv_a_proj_with_mqa.weight"),
                    &[rank + rope, h],
                );
                let norm = format!("{pre}.kv_a_layernorm.weight");
                self.add(norm, &[*rank], Init::Ones, Use::Always);
                self.weight(
                    format!("{pre}.kv_b_proj.weight"),
                    &[heads * (nope + v), *rank],
                );
                self.weight(format!("{pre}.o_proj.weight"), &[h, heads * v]);
            }
        }
    }

    fn language(&mut self, cfg: &LanguageConfig) {
        let (h, vocab) = (cfg.hidden_size, cfg.vocab_size);
        let init = Init::Normal { std: WEIGHT_STD };
        self.add(
            "language.model.embed_tokens.weight",
            &[vocab, h],
            init,
            Use::Never,
        );
        for l in 0..cfg.num_hidden_layers {
            let pre = format!("language.model.layers.{l}");
            self.add(
                format!("{pre}.input_layernorm.weight"),
                &[h],
                Init::Ones,
                Use::Always,
            );
            self.attention(&format!("{pre}.self_attn"), cfg);
            self.add(
                format!("{pre}.post_attention_layernorm.weight"),
                &[h],
                Init::Ones,
                Use::Always,
            );
            let mlp = format!("{pre}.mlp");
            match &cfg.moe {
                Some(moe) if cfg.is_moe_layer(l) => {
                    let e = moe.n_routed_experts;
                    self.weight(format!("{mlp}.gate.weight"), &[e, h]);
                    if moe.topk_method == TopkMethod::NoauxTc {
                        let bias = format!("{mlp}.gate.e_score_correction_bias");
                        self.add(bias, &[e], Init::Zeros, Use::Always);
                    }
                    let routed = Use::Routed {
                        top_k: moe.num_experts_per_tok,
                        experts: e,
                    };
                    for x in 0..e {
                        self.mlp(
                            &format!("{mlp}.experts.{x}"),
                            h,
                            moe.moe_intermediate_size,
                            routed,
                        );
                    }
                    if moe.n_shared_experts > 0 {
                        let inter = moe.moe_intermediate_size * moe.n_shared_experts;
                        self.mlp(&format!("{mlp}.shared_experts"), h, inter, Use::Always);
                    }
                }
                _ => self.mlp(&mlp, h, cfg.intermediate_size, Use::Always),
            }
        }
        self.add("language.model.norm.weight", &[h], Init::Ones, Use::Always);
        self.weight("language.lm_head.weight", &[vocab, h]);
    }
}

/// Every tensor the released checkpoint of `cfg` holds, in module order: the vision
/// tower (with its unused attention-pool head), the projector and the two learned
/// vectors, then the language model layer by layer.
pub fn checkpoint_tensors(cfg: &ModelConfig) -> Vec<TensorSpec> {
    let mut specs = Specs(Vec::new());
    specs.vision(cfg);
    specs.projector(cfg);
    specs.language(&cfg.language);
    specs.0
}

/// Parameter counts of a tensor list.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ParamCount {
    /// Every stored value.
    pub total: u64,
    /// Values one token multiplies: all but the unselected routed experts, the embedding
    /// table and the unused attention-pool head.
    pub activated: u64,
}

/// Counts the parameters of `specs`.
pub fn count_params(specs: &[TensorSpec]) -> ParamCount {
    let mut total = 0u64;
    let mut activated = 0u64;
    for s in specs {
        let n = s.numel() as u64;
        total += n;
        activated += match s.usage {
            Use::Always => n,
            Use::Routed { top_k, experts } => n * top_k as u64 / experts as u64,
            Use::Never => 0,
        };
    }
    ParamCount { total, activated }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use tessera_model::weights::Checkpoint;

    use super::*;

    /// The fixture checkpoints were saved by the reference code under the released names,
    /// attention-pool head included.
    #[test]
    fn tensors_match_the_fixture_checkpoints_name_for_name() {
        for fixture in ["tiny-mha-softmax", "small-mla-softmax"] {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures")
                .join(fixture);
            let cfg = ModelConfig::from_dir(&dir).unwrap();
            let mut ours: Vec<(String, Vec<usize>)> = checkpoint_tensors(&cfg)
                .into_iter()
                .map(|s| (s.name, s.shape))
                .collect();
            ours.sort();
            let theirs: Vec<(String, Vec<usize>)> = Checkpoint::open(&dir)
                .unwrap()
                .layout()
                .into_iter()
                .map(|(name, _, shape)| (name, shape))
                .collect();
            assert_eq!(ours, theirs, "{fixture}");
        }
    }

    #[test]
    fn routed_experts_count_top_k_of_n_and_lookups_count_nothing() {
        let spec = |shape: &[usize], usage| TensorSpec {
            name: String::new(),
            shape: shape.to_vec(),
            init: Init::Zeros,
            usage,
        };
        let specs = [
            spec(&[10, 4], Use::Never),
            spec(
                &[8, 8],
                Use::Routed {
                    top_k: 2,
                    experts: 8,
                },
            ),
            spec(&[3], Use::Always),
        ];
        assert_eq!(
            count_params(&specs),
            ParamCount {
                total: 40 + 64 + 3,
                activated: 16 + 3
            }
        );
    }
}
