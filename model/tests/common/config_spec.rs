//! The expected `config.json` values of the three released variants (`language_config` with
//! the `DeepseekV2Config` defaults applied, `vision_config`, `projector_config` and the
//! top-level layout keys; provenance in `tests/fixtures/released-configs/README.md`) and
//! checks against them, shared by the config tests.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tessera_model::Error;
use tessera_model::config::{
    AttentionConfig, GlobalViewPos, LanguageConfig, ModelConfig, ProjectorConfig, ScoringFunc,
    TopkMethod, VisionConfig,
};

pub const TINY: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/fixtures/released-configs/deepseek-vl2-tiny/config.json"
);
pub const SMALL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/fixtures/released-configs/deepseek-vl2-small/config.json"
);
pub const BASE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/fixtures/released-configs/deepseek-vl2/config.json"
);

/// The 23 released `candidate_resolutions`, `[width, height]`, in the released order.
pub const CANDIDATES: [[usize; 2]; 23] = [
    [384, 384],
    [384, 768],
    [768, 384],
    [384, 1152],
    [1152, 384],
    [384, 1536],
    [1536, 384],
    [768, 768],
    [384, 1920],
    [1920, 384],
    [384, 2304],
    [2304, 384],
    [768, 1152],
    [1152, 768],
    [384, 2688],
    [2688, 384],
    [384, 3072],
    [3072, 384],
    [768, 1536],
    [1536, 768],
    [384, 3456],
    [3456, 384],
    [1152, 1152],
];

pub fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

pub fn load(path: &str) -> ModelConfig {
    ModelConfig::from_file(Path::new(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

pub fn raw(path: &str) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Parses an edited copy of a released file through `ModelConfig::from_json`.
pub fn parse_edited(
    path: &str,
    edit: impl FnOnce(&mut Value),
) -> tessera_model::Result<ModelConfig> {
    let mut value = raw(path);
    edit(&mut value);
    ModelConfig::from_json(&value.to_string())
}

pub fn language_mut(value: &mut Value) -> &mut serde_json::Map<String, Value> {
    value["language_config"]
        .as_object_mut()
        .expect("language_config is an object")
}

/// Asserts that `result` is a config error whose message (and field) names `field`.
pub fn assert_config_error(result: tessera_model::Result<ModelConfig>, field: &str) -> String {
    let err = match result {
        Ok(cfg) => panic!("expected an error naming `{field}`, parsed {cfg:?}"),
        Err(e) => e,
    };
    let message = err.to_string();
    assert!(
        message.contains(field),
        "error does not name `{field}`: {message}"
    );
    match &err {
        Error::Config { field: f, .. } => {
            assert!(f.ends_with(field), "error field `{f}` is not `{field}`")
        }
        other => panic!("expected Error::Config for `{field}`, got {other:?}"),
    }
    message
}

pub fn assert_close(actual: f64, expected: f64, what: &str) {
    assert!(
        (actual - expected).abs() <= 1e-12 * expected.abs().max(1.0),
        "{what}: {actual} != {expected}"
    );
}

// ---------------------------------------------------------------------------------------
// Language model values (`language_config` after the `DeepseekV2Config` defaults).

/// One variant's language-model values (plus its projector width, `projector_config.n_embed`).
pub struct Variant {
    pub name: &'static str,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    /// `None` for plain MHA.
    pub mla: Option<Mla>,
    pub vocab: usize,
    pub bos: u32,
    pub eos: u32,
    pub intermediate: usize,
    pub routed: usize,
    pub shared: usize,
    pub moe_intermediate: usize,
    pub shared_intermediate: usize,
    pub topk_method: TopkMethod,
    pub scoring: ScoringFunc,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f64,
    /// `1 / sqrt(qk head dim)`.
    pub softmax_dim: f64,
    pub kv_values: usize,
    /// Parameter totals in billions computed from the released shapes, total (3 decimals) and
    /// activated (2 decimals).
    pub total_b: f64,
    pub activated_b: f64,
    /// State-dict key counts of the released safetensors.
    pub keys: usize,
}

pub struct Mla {
    pub kv_lora_rank: usize,
    pub nope: usize,
    pub rope: usize,
    pub v: usize,
}

pub const MLA_DIMS: Mla = Mla {
    kv_lora_rank: 512,
    nope: 128,
    rope: 64,
    v: 128,
};

pub const TINY_SPEC: Variant = Variant {
    name: "tiny",
    hidden: 1280,
    layers: 12,
    heads: 10,
    mla: None,
    vocab: 129280,
    bos: 0,
    eos: 1,
    intermediate: 6848,
    routed: 64,
    shared: 2,
    moe_intermediate: 896,
    shared_intermediate: 1792,
    topk_method: TopkMethod::Greedy,
    scoring: ScoringFunc::Softmax,
    norm_topk_prob: false,
    routed_scaling_factor: 1.0,
    softmax_dim: 128.0,
    kv_values: 2 * 1280,
    total_b: 3.371,
    activated_b: 1.01,
    keys: 2582,
};

pub const SMALL_SPEC: Variant = Variant {
    name: "small",
    hidden: 2048,
    layers: 27,
    heads: 16,
    mla: Some(MLA_DIMS),
    vocab: 102400,
    bos: 100000,
    eos: 100001,
    intermediate: 10944,
    routed: 64,
    shared: 2,
    moe_intermediate: 1408,
    shared_intermediate: 2816,
    topk_method: TopkMethod::Greedy,
    scoring: ScoringFunc::Softmax,
    norm_topk_prob: false,
    routed_scaling_factor: 1.0,
    softmax_dim: 192.0,
    kv_values: 576,
    total_b: 16.148,
    activated_b: 2.89,
    keys: 5639,
};

pub const BASE_SPEC: Variant = Variant {
    name: "base",
    hidden: 2560,
    layers: 30,
    heads: 32,
    mla: Some(MLA_DIMS),
    vocab: 129280,
    bos: 0,
    eos: 1,
    intermediate: 12288,
    routed: 72,
    shared: 2,
    moe_intermediate: 1536,
    shared_intermediate: 3072,
    topk_method: TopkMethod::NoauxTc,
    scoring: ScoringFunc::Sigmoid,
    norm_topk_prob: true,
    routed_scaling_factor: 2.0,
    softmax_dim: 192.0,
    kv_values: 576,
    total_b: 27.480,
    activated_b: 4.57,
    keys: 6973,
};

pub fn check_language(lm: &LanguageConfig, spec: &Variant) {
    let name = spec.name;
    assert_eq!(lm.hidden_size, spec.hidden, "{name}: hidden_size");
    assert_eq!(
        lm.num_hidden_layers, spec.layers,
        "{name}: num_hidden_layers"
    );
    assert_eq!(
        lm.num_attention_heads, spec.heads,
        "{name}: num_attention_heads"
    );
    assert_eq!(
        lm.num_key_value_heads, spec.heads,
        "{name}: num_key_value_heads"
    );
    match (&lm.attention, &spec.mla) {
        (AttentionConfig::Mha { head_dim }, None) => {
            assert_eq!(*head_dim, spec.hidden / spec.heads, "{name}: head_dim");
            assert_eq!(*head_dim, 128, "{name}: head_dim");
            assert_eq!(lm.rope_dim(), 128, "{name}: MHA RoPE covers the whole head");
        }
        (
            AttentionConfig::Mla {
                q_lora_rank,
                kv_lora_rank,
                qk_nope_head_dim,
                qk_rope_head_dim,
                v_head_dim,
            },
            Some(mla),
        ) => {
            assert_eq!(*q_lora_rank, None, "{name}: q_lora_rank (explicit null)");
            assert_eq!(*kv_lora_rank, mla.kv_lora_rank, "{name}: kv_lora_rank");
            assert_eq!(*qk_nope_head_dim, mla.nope, "{name}: qk_nope_head_dim");
            assert_eq!(*qk_rope_head_dim, mla.rope, "{name}: qk_rope_head_dim");
            assert_eq!(*v_head_dim, mla.v, "{name}: v_head_dim");
            assert_eq!(
                lm.rope_dim(),
                64,
                "{name}: MLA RoPE covers qk_rope_head_dim"
            );
        }
        (attention, _) => panic!("{name}: wrong attention kind {attention:?}"),
    }
    assert_eq!(lm.vocab_size, spec.vocab, "{name}: vocab_size");
    assert_eq!(lm.bos_token_id, spec.bos, "{name}: bos_token_id");
    assert_eq!(lm.eos_token_id, spec.eos, "{name}: eos_token_id");
    assert_eq!(
        lm.intermediate_size, spec.intermediate,
        "{name}: intermediate_size"
    );

    let moe = lm.moe.as_ref().unwrap_or_else(|| panic!("{name}: no MoE"));
    assert_eq!(
        moe.n_routed_experts, spec.routed,
        "{name}: n_routed_experts"
    );
    assert_eq!(
        moe.n_shared_experts, spec.shared,
        "{name}: n_shared_experts"
    );
    assert_eq!(moe.num_experts_per_tok, 6, "{name}: num_experts_per_tok");
    assert_eq!(
        moe.moe_intermediate_size, spec.moe_intermediate,
        "{name}: moe_intermediate_size"
    );
    assert_eq!(
        moe.moe_intermediate_size * moe.n_shared_experts,
        spec.shared_intermediate,
        "{name}: shared-expert intermediate"
    );
    assert_eq!(moe.topk_method, spec.topk_method, "{name}: topk_method");
    assert_eq!(moe.scoring_func, spec.scoring, "{name}: scoring_func");
    assert_eq!(
        moe.norm_topk_prob, spec.norm_topk_prob,
        "{name}: norm_topk_prob"
    );
    assert_close(
        moe.routed_scaling_factor,
        spec.routed_scaling_factor,
        &format!("{name}: routed_scaling_factor"),
    );
    assert_eq!(
        (moe.n_group, moe.topk_group),
        (1, 1),
        "{name}: n_group/topk_group"
    );
    assert_eq!(
        moe.first_k_dense_replace, 1,
        "{name}: first_k_dense_replace"
    );
    assert_eq!(moe.moe_layer_freq, 1, "{name}: moe_layer_freq");
    assert_eq!(
        lm.moe_layers(),
        (1..spec.layers).collect::<Vec<_>>(),
        "{name}: MoE layers are 1..L"
    );
    assert!(!lm.is_moe_layer(0), "{name}: layer 0 is dense");

    assert_close(lm.rope_theta, 10000.0, &format!("{name}: rope_theta"));
    assert_eq!(lm.rope_scaling, None, "{name}: rope_scaling");
    assert_close(lm.rms_norm_eps, 1e-6, &format!("{name}: rms_norm_eps"));
    assert_eq!(
        lm.max_position_embeddings, 4096,
        "{name}: max_position_embeddings"
    );
    assert_close(
        lm.softmax_scale(),
        1.0 / spec.softmax_dim.sqrt(),
        &format!("{name}: softmax scale"),
    );
    assert_eq!(
        lm.kv_values_per_token_per_layer(),
        spec.kv_values,
        "{name}: KV values per token per layer"
    );
}

/// The released `vision_config` (identical for every variant).
pub fn check_vision(v: &VisionConfig) {
    assert_eq!(v.model_name, "siglip_so400m_patch14_384");
    assert_eq!(v.image_size, 384);
    assert_eq!(v.patch_size, 14);
    assert_eq!(v.image_size / v.patch_size, 27, "27x27 = 729 patches");
    assert_eq!(v.width, 1152);
    assert_eq!(v.layers, 27);
    assert_eq!(v.heads, 16);
    assert_eq!(v.width / v.heads, 72, "vision head_dim");
    assert_close(v.mlp_ratio, 3.7362, "vision mlp_ratio");
    assert_eq!(v.mlp_hidden(), 4304);
}

/// The released `projector_config`.
pub fn check_projector(p: &ProjectorConfig, n_embed: usize) {
    assert_eq!(p.projector_type, "downsample_mlp_gelu");
    assert_eq!(p.input_dim, 1152);
    assert_eq!(p.downsample_ratio, 2);
    assert_eq!(p.depth, 2);
    assert_eq!(p.mlp_ratio, 1);
    assert_eq!(p.n_embed, n_embed);
    assert!(!p.token_pooling);
}

pub fn check_variant(path: &str, spec: &Variant) -> ModelConfig {
    let cfg = load(path);
    check_language(&cfg.language, spec);
    check_vision(&cfg.vision);
    check_projector(&cfg.projector, spec.hidden);
    assert_eq!(cfg.candidate_resolutions.len(), 23, "{}", spec.name);
    assert_eq!(cfg.candidate_resolutions, CANDIDATES, "{}", spec.name);
    assert_eq!(cfg.global_view_pos, GlobalViewPos::Head, "{}", spec.name);
    cfg
}
