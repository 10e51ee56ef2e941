//! `tessera_model::config` against the three released DeepSeek-VL2 configurations.
//!
//! `tests/fixtures/released-configs/deepseek-vl2/config.json` is the verbatim Base release;
//! the Tiny and Small files are reconstructed from reference-spec §1.1 (see the README
//! there). Every value of the spec's §1.1–§1.4 tables is checked after the reference
//! defaults are applied, the parameter totals of §1.1 (and the state-dict key counts of §5)
//! are recomputed from the parsed config with the tensor shapes of §3.1/§5, and the
//! default-value traps of §6.13 are exercised on edited copies of the files.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use tessera_model::Error;
use tessera_model::config::{
    AttentionConfig, GlobalViewPos, LanguageConfig, ModelConfig, ProcessorConfig, ProjectorConfig,
    RopeScaling, ScoringFunc, TopkMethod, VisionConfig,
};

const TINY: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/fixtures/released-configs/deepseek-vl2-tiny/config.json"
);
const SMALL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/fixtures/released-configs/deepseek-vl2-small/config.json"
);
const BASE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/fixtures/released-configs/deepseek-vl2/config.json"
);

/// The 23 candidate resolutions of spec §1.4, `[width, height]`, in the released order.
const CANDIDATES: [[usize; 2]; 23] = [
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

fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

fn load(path: &str) -> ModelConfig {
    ModelConfig::from_file(Path::new(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn raw(path: &str) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Parses an edited copy of a released file through `ModelConfig::from_json`.
fn parse_edited(path: &str, edit: impl FnOnce(&mut Value)) -> tessera_model::Result<ModelConfig> {
    let mut value = raw(path);
    edit(&mut value);
    ModelConfig::from_json(&value.to_string())
}

fn language_mut(value: &mut Value) -> &mut serde_json::Map<String, Value> {
    value["language_config"]
        .as_object_mut()
        .expect("language_config is an object")
}

/// Asserts that `result` is a config error whose message (and field) names `field`.
fn assert_config_error(result: tessera_model::Result<ModelConfig>, field: &str) -> String {
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

fn assert_close(actual: f64, expected: f64, what: &str) {
    assert!(
        (actual - expected).abs() <= 1e-12 * expected.abs().max(1.0),
        "{what}: {actual} != {expected}"
    );
}

// ---------------------------------------------------------------------------------------
// Spec §1.1 table.

/// One column of the spec §1.1 table (plus the per-variant projector width of §1.3).
struct Variant {
    name: &'static str,
    hidden: usize,
    layers: usize,
    heads: usize,
    /// `None` for plain MHA.
    mla: Option<Mla>,
    vocab: usize,
    bos: u32,
    eos: u32,
    intermediate: usize,
    routed: usize,
    shared: usize,
    moe_intermediate: usize,
    shared_intermediate: usize,
    topk_method: TopkMethod,
    scoring: ScoringFunc,
    norm_topk_prob: bool,
    routed_scaling_factor: f64,
    /// `1 / sqrt(qk head dim)`.
    softmax_dim: f64,
    kv_values: usize,
    /// Spec totals in billions, as printed (3 decimals) and activated (2 decimals).
    total_b: f64,
    activated_b: f64,
    /// State-dict key counts of spec §5.
    keys: usize,
}

struct Mla {
    kv_lora_rank: usize,
    nope: usize,
    rope: usize,
    v: usize,
}

const MLA_DIMS: Mla = Mla {
    kv_lora_rank: 512,
    nope: 128,
    rope: 64,
    v: 128,
};

const TINY_SPEC: Variant = Variant {
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

const SMALL_SPEC: Variant = Variant {
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

const BASE_SPEC: Variant = Variant {
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

fn check_language(lm: &LanguageConfig, spec: &Variant) {
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

/// Spec §1.2 (identical for every variant).
fn check_vision(v: &VisionConfig) {
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

/// Spec §1.3.
fn check_projector(p: &ProjectorConfig, n_embed: usize) {
    assert_eq!(p.projector_type, "downsample_mlp_gelu");
    assert_eq!(p.input_dim, 1152);
    assert_eq!(p.downsample_ratio, 2);
    assert_eq!(p.depth, 2);
    assert_eq!(p.mlp_ratio, 1);
    assert_eq!(p.n_embed, n_embed);
    assert!(!p.token_pooling);
}

fn check_variant(path: &str, spec: &Variant) -> ModelConfig {
    let cfg = load(path);
    check_language(&cfg.language, spec);
    check_vision(&cfg.vision);
    check_projector(&cfg.projector, spec.hidden);
    assert_eq!(cfg.candidate_resolutions.len(), 23, "{}", spec.name);
    assert_eq!(cfg.candidate_resolutions, CANDIDATES, "{}", spec.name);
    assert_eq!(cfg.global_view_pos, GlobalViewPos::Head, "{}", spec.name);
    cfg
}

#[test]
fn tiny_matches_spec_table() {
    check_variant(TINY, &TINY_SPEC);
}

#[test]
fn small_matches_spec_table() {
    check_variant(SMALL, &SMALL_SPEC);
}

#[test]
fn base_matches_spec_table_after_defaults() {
    // The verbatim Base file leaves layers, heads, use_mla, kv_lora_rank and the MLA
    // head dims to the DeepseekV2Config defaults and sets q_lora_rank to null.
    let lang = &raw(BASE)["language_config"];
    for key in [
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "use_mla",
        "kv_lora_rank",
        "qk_nope_head_dim",
        "qk_rope_head_dim",
        "v_head_dim",
        "rope_theta",
        "rms_norm_eps",
    ] {
        assert!(
            lang.get(key).is_none(),
            "the Base file is expected to omit {key}"
        );
    }
    assert!(lang["q_lora_rank"].is_null());
    check_variant(BASE, &BASE_SPEC);
}

#[test]
fn from_dir_reads_config_json() {
    let dir = Path::new(BASE).parent().expect("Base config has a folder");
    assert_eq!(
        ModelConfig::from_dir(dir).expect("Base from_dir"),
        load(BASE)
    );
}

// ---------------------------------------------------------------------------------------
// Parameter counts (spec §1.1 totals) from the tensor shapes of §3.1 and §5.

/// Parameter and tensor counts of one module group.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Count {
    params: u64,
    tensors: u64,
}

impl Count {
    fn add(&mut self, shape: &[usize]) {
        self.params += shape.iter().map(|&d| d as u64).product::<u64>();
        self.tensors += 1;
    }
    /// A linear layer `[out, in]`, with or without bias.
    fn linear(&mut self, out: usize, inp: usize, bias: bool) {
        self.add(&[out, inp]);
        if bias {
            self.add(&[out]);
        }
    }
    /// The SwiGLU MLP of spec §4.1 (gate, up, down; no biases).
    fn mlp(&mut self, hidden: usize, inter: usize) {
        self.linear(inter, hidden, false);
        self.linear(inter, hidden, false);
        self.linear(hidden, inter, false);
    }
}

/// Language model (`language.*`, spec §5), plus the parameters of the routed experts a
/// token does not use (for the activated count).
fn language_count(lm: &LanguageConfig) -> (Count, u64) {
    let h = lm.hidden_size;
    let mut c = Count::default();
    let mut inactive = 0u64;
    c.add(&[lm.vocab_size, h]); // embed_tokens
    c.add(&[h]); // model.norm
    c.add(&[lm.vocab_size, h]); // lm_head (untied)
    let nh = lm.num_attention_heads;
    for layer in 0..lm.num_hidden_layers {
        c.add(&[h]); // input_layernorm
        c.add(&[h]); // post_attention_layernorm
        match &lm.attention {
            AttentionConfig::Mha { head_dim } => {
                let kv = lm.num_key_value_heads * head_dim;
                c.linear(nh * head_dim, h, false);
                c.linear(kv, h, false);
                c.linear(kv, h, false);
                c.linear(h, nh * head_dim, false);
            }
            AttentionConfig::Mla {
                q_lora_rank,
                kv_lora_rank,
                qk_nope_head_dim,
                qk_rope_head_dim,
                v_head_dim,
            } => {
                let dq = qk_nope_head_dim + qk_rope_head_dim;
                match q_lora_rank {
                    None => c.linear(nh * dq, h, false),
                    Some(r) => {
                        c.linear(*r, h, false);
                        c.add(&[*r]);
                        c.linear(nh * dq, *r, false);
                    }
                }
                c.linear(kv_lora_rank + qk_rope_head_dim, h, false);
                c.add(&[*kv_lora_rank]);
                c.linear(nh * (qk_nope_head_dim + v_head_dim), *kv_lora_rank, false);
                c.linear(h, nh * v_head_dim, false);
            }
        }
        match (&lm.moe, lm.is_moe_layer(layer)) {
            (Some(moe), true) => {
                let e = moe.n_routed_experts;
                c.linear(e, h, false); // gate
                if moe.topk_method == TopkMethod::NoauxTc {
                    c.add(&[e]); // e_score_correction_bias
                }
                for _ in 0..e {
                    c.mlp(h, moe.moe_intermediate_size);
                }
                if moe.n_shared_experts > 0 {
                    c.mlp(h, moe.moe_intermediate_size * moe.n_shared_experts);
                }
                let expert = 3 * (h * moe.moe_intermediate_size) as u64;
                inactive += (e - moe.num_experts_per_tok) as u64 * expert;
            }
            _ => c.mlp(h, lm.intermediate_size),
        }
    }
    (c, inactive)
}

/// The SigLIP tower (`vision.*`, spec §3.1): the part that runs, and the unused
/// attention-pool head (`vision.attn_pool.*`, timm `AttentionPoolLatent`).
fn vision_count(v: &VisionConfig) -> (Count, Count) {
    let c = v.width;
    let m = v.mlp_hidden();
    let grid = v.image_size / v.patch_size;
    let mut tower = Count::default();
    tower.add(&[c, 3, v.patch_size, v.patch_size]);
    tower.add(&[c]);
    tower.add(&[1, grid * grid, c]); // pos_embed
    for _ in 0..v.layers {
        tower.add(&[c]); // norm1
        tower.add(&[c]);
        tower.linear(3 * c, c, true); // attn.qkv
        tower.linear(c, c, true); // attn.proj
        tower.add(&[c]); // norm2
        tower.add(&[c]);
        tower.linear(m, c, true); // mlp.fc1
        tower.linear(c, m, true); // mlp.fc2
    }
    tower.add(&[c]); // norm
    tower.add(&[c]);
    let mut pool = Count::default();
    pool.add(&[1, 1, c]); // latent
    pool.linear(c, c, true); // q
    pool.linear(2 * c, c, true); // kv
    pool.linear(c, c, true); // proj
    pool.add(&[c]); // norm
    pool.add(&[c]);
    pool.linear(m, c, true); // mlp.fc1
    pool.linear(c, m, true); // mlp.fc2
    (tower, pool)
}

/// Projector (spec §3.2 / §5) plus `image_newline` and `view_seperator`.
fn projector_count(p: &ProjectorConfig) -> Count {
    let n = p.n_embed;
    let inp = p.input_dim * p.downsample_ratio * p.downsample_ratio;
    let mut c = Count::default();
    c.linear(n * p.mlp_ratio, inp, true); // layers.0
    for _ in 1..p.depth {
        c.linear(n, n * p.mlp_ratio, true); // layers.2
    }
    c.add(&[n]); // image_newline
    c.add(&[n]); // view_seperator
    c
}

/// Rounds `x` to `decimals` decimal places (the precision the spec prints).
fn round_to(x: f64, decimals: i32) -> f64 {
    let f = 10f64.powi(decimals);
    (x * f).round() / f
}

fn check_parameter_count(path: &str, spec: &Variant) {
    let name = spec.name;
    let cfg = load(path);
    let (lm, inactive) = language_count(&cfg.language);
    let (tower, pool) = vision_count(&cfg.vision);
    let proj = projector_count(&cfg.projector);

    // §3.1/§5: vision 428.2 M including the 15.2 M attention-pool head.
    let vision = tower.params + pool.params;
    assert_eq!(
        round_to(vision as f64 / 1e6, 1),
        428.2,
        "{name}: vision {vision}"
    );
    assert_eq!(
        round_to(pool.params as f64 / 1e6, 1),
        15.2,
        "{name}: attn_pool"
    );

    let total = lm.params + vision + proj.params;
    let total_b = total as f64 / 1e9;
    assert!(
        (total_b - spec.total_b).abs() <= 1e-3 * spec.total_b,
        "{name}: total {total} is not within 0.1% of {} B",
        spec.total_b
    );
    assert_eq!(round_to(total_b, 3), spec.total_b, "{name}: total {total}");

    // Activated: everything except the input embedding and the unused routed experts.
    let embed = (cfg.language.vocab_size * cfg.language.hidden_size) as u64;
    let activated = total - embed - inactive;
    assert_eq!(
        round_to(activated as f64 / 1e9, 2),
        spec.activated_b,
        "{name}: activated {activated}"
    );

    // §5 state-dict key counts.
    let keys = lm.tensors + tower.tensors + pool.tensors + proj.tensors;
    assert_eq!(keys, spec.keys as u64, "{name}: state-dict keys");
}

#[test]
fn tiny_parameter_count_matches_spec() {
    check_parameter_count(TINY, &TINY_SPEC);
}

#[test]
fn small_parameter_count_matches_spec() {
    check_parameter_count(SMALL, &SMALL_SPEC);
}

#[test]
fn base_parameter_count_matches_spec() {
    check_parameter_count(BASE, &BASE_SPEC);
}

#[test]
fn small_vocab_129280_would_not_match_published_total() {
    // Spec §1.5: with vocab 129280 the Small total would be 16.26 B, not 16.148 B.
    let cfg = parse_edited(SMALL, |v| {
        language_mut(v).insert("vocab_size".into(), json!(129280));
    })
    .expect("Small with the other vocab parses");
    let (lm, _) = language_count(&cfg.language);
    let (tower, pool) = vision_count(&cfg.vision);
    let total = lm.params + tower.params + pool.params + projector_count(&cfg.projector).params;
    assert_eq!(round_to(total as f64 / 1e9, 2), 16.26);
}

// ---------------------------------------------------------------------------------------
// Default-value traps (§6.13) and validation errors.

#[test]
fn missing_topk_method_defaults_to_gready_and_is_rejected() {
    for path in [TINY, SMALL, BASE] {
        let message = assert_config_error(
            parse_edited(path, |v| {
                language_mut(v).remove("topk_method");
            }),
            "topk_method",
        );
        assert!(message.contains("gready"), "{path}: {message}");
    }
}

#[test]
fn unknown_topk_method_is_rejected() {
    assert_config_error(
        parse_edited(TINY, |v| {
            language_mut(v).insert("topk_method".into(), json!("top_k"));
        }),
        "topk_method",
    );
}

#[test]
fn unknown_scoring_func_is_rejected() {
    for path in [TINY, BASE] {
        let message = assert_config_error(
            parse_edited(path, |v| {
                language_mut(v).insert("scoring_func".into(), json!("sparsemax"));
            }),
            "scoring_func",
        );
        assert!(message.contains("sparsemax"), "{message}");
    }
}

#[test]
fn missing_tile_tag_defaults_to_tile_tag_and_is_rejected() {
    assert_config_error(
        parse_edited(BASE, |v| {
            v.as_object_mut().expect("top level").remove("tile_tag");
        }),
        "tile_tag",
    );
    // The default is the literal string "tile_tag", which is not a layout either.
    assert_config_error(
        parse_edited(BASE, |v| {
            v["tile_tag"] = json!("tile_tag");
        }),
        "tile_tag",
    );
}

#[test]
fn tile_tag_1d_is_rejected() {
    let message = assert_config_error(
        parse_edited(BASE, |v| {
            v["tile_tag"] = json!("1D");
        }),
        "tile_tag",
    );
    assert!(message.contains("1D"), "{message}");
}

#[test]
fn global_view_pos_tail_parses_and_unknown_is_rejected() {
    let cfg = parse_edited(BASE, |v| {
        v["global_view_pos"] = json!("tail");
    })
    .expect("tail is a valid layout");
    assert_eq!(cfg.global_view_pos, GlobalViewPos::Tail);
    let cfg = parse_edited(BASE, |v| {
        v.as_object_mut()
            .expect("top level")
            .remove("global_view_pos");
    })
    .expect("global_view_pos defaults to head");
    assert_eq!(cfg.global_view_pos, GlobalViewPos::Head);
    assert_config_error(
        parse_edited(BASE, |v| {
            v["global_view_pos"] = json!("middle");
        }),
        "global_view_pos",
    );
}

#[test]
fn absent_q_lora_rank_with_mla_means_1536() {
    // §6.13: only an explicit null disables the q LoRA; an absent key takes 1536.
    for path in [SMALL, BASE] {
        let cfg = parse_edited(path, |v| {
            let lang = language_mut(v);
            lang.remove("q_lora_rank");
            lang.insert("use_mla".into(), json!(true));
        })
        .expect("parses");
        match cfg.language.attention {
            AttentionConfig::Mla { q_lora_rank, .. } => {
                assert_eq!(q_lora_rank, Some(1536), "{path}")
            }
            other => panic!("{path}: expected MLA, got {other:?}"),
        }
    }
}

#[test]
fn language_defaults_of_deepseek_v2_config() {
    // A language_config holding only the MoE keys a loader cannot do without: every
    // other value is a DeepseekV2Config default (spec §1.1).
    let cfg = parse_edited(BASE, |v| {
        v["language_config"] = json!({
            "n_routed_experts": 8,
            "num_experts_per_tok": 2,
            "topk_method": "greedy",
        });
        v["projector_config"] = json!({});
    })
    .expect("parses with defaults");
    let lm = &cfg.language;
    assert_eq!(lm.vocab_size, 102400);
    assert_eq!(lm.hidden_size, 4096);
    assert_eq!(lm.intermediate_size, 11008);
    assert_eq!(lm.num_hidden_layers, 30);
    assert_eq!(lm.num_attention_heads, 32);
    assert_eq!(lm.num_key_value_heads, 32);
    assert_eq!(
        lm.attention,
        AttentionConfig::Mla {
            q_lora_rank: Some(1536),
            kv_lora_rank: 512,
            qk_nope_head_dim: 128,
            qk_rope_head_dim: 64,
            v_head_dim: 128,
        }
    );
    assert_eq!(lm.max_position_embeddings, 2048);
    assert_close(lm.rms_norm_eps, 1e-6, "rms_norm_eps");
    assert_close(lm.rope_theta, 10000.0, "rope_theta");
    assert_eq!(lm.rope_scaling, None);
    assert_eq!((lm.bos_token_id, lm.eos_token_id), (100000, 100001));
    let moe = lm.moe.as_ref().expect("MoE");
    assert_eq!(moe.moe_intermediate_size, 1407);
    assert_eq!(moe.n_shared_experts, 0);
    assert_eq!(moe.scoring_func, ScoringFunc::Softmax);
    assert!(!moe.norm_topk_prob);
    assert_close(moe.routed_scaling_factor, 1.0, "routed_scaling_factor");
    assert_eq!(moe.first_k_dense_replace, 0);
    assert_eq!(moe.moe_layer_freq, 1);
    assert_eq!(lm.moe_layers(), (0..30).collect::<Vec<_>>());
}

#[test]
fn dense_model_without_routed_experts_has_no_moe() {
    for routed in [Value::Null, json!(0)] {
        let cfg = parse_edited(TINY, |v| {
            language_mut(v).insert("n_routed_experts".into(), routed.clone());
        })
        .expect("parses");
        assert_eq!(cfg.language.moe, None, "n_routed_experts = {routed}");
        assert!(cfg.language.moe_layers().is_empty());
    }
}

#[test]
fn rope_scaling_yarn_parses_with_its_fields() {
    // DeepSeek-V2-Lite's YaRN block (spec §1.5), applied to Small.
    let cfg = parse_edited(SMALL, |v| {
        language_mut(v).insert(
            "rope_scaling".into(),
            json!({
                "type": "yarn",
                "factor": 40,
                "original_max_position_embeddings": 4096,
                "beta_fast": 32,
                "beta_slow": 1,
                "mscale": 0.707,
                "mscale_all_dim": 0.707,
            }),
        );
    })
    .expect("yarn parses");
    let lm = &cfg.language;
    assert_eq!(
        lm.rope_scaling,
        Some(RopeScaling::Yarn {
            factor: 40.0,
            original_max_position_embeddings: 4096,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: 0.707,
            mscale_all_dim: 0.707,
        })
    );
    // §4.3: softmax scale ·= (0.1·m·ln f + 1)².
    let m = 0.1 * 0.707 * 40f64.ln() + 1.0;
    assert_close(
        lm.softmax_scale(),
        m * m / 192f64.sqrt(),
        "YaRN softmax scale",
    );
    // Everything else is unchanged.
    let mut plain = lm.clone();
    plain.rope_scaling = None;
    check_language(&plain, &SMALL_SPEC);
}

#[test]
fn rope_scaling_yarn_without_mscale_all_dim_keeps_the_scale() {
    let cfg = parse_edited(SMALL, |v| {
        language_mut(v).insert(
            "rope_scaling".into(),
            json!({"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096}),
        );
    })
    .expect("yarn parses");
    match &cfg.language.rope_scaling {
        Some(RopeScaling::Yarn {
            factor,
            beta_fast,
            beta_slow,
            mscale,
            mscale_all_dim,
            ..
        }) => {
            assert_close(*factor, 40.0, "factor");
            assert_close(*beta_fast, 32.0, "beta_fast default");
            assert_close(*beta_slow, 1.0, "beta_slow default");
            assert_close(*mscale, 1.0, "mscale default");
            assert_close(*mscale_all_dim, 0.0, "mscale_all_dim default");
        }
        other => panic!("expected yarn, got {other:?}"),
    }
    assert_close(
        cfg.language.softmax_scale(),
        1.0 / 192f64.sqrt(),
        "softmax scale without mscale_all_dim",
    );
}

#[test]
fn rope_scaling_null_linear_dynamic_and_unknown() {
    let with = |scaling: Value| {
        parse_edited(SMALL, move |v| {
            language_mut(v).insert("rope_scaling".into(), scaling);
        })
    };
    assert_eq!(with(Value::Null).expect("null").language.rope_scaling, None);
    assert_eq!(
        with(json!({"type": "linear", "factor": 2.0}))
            .expect("linear")
            .language
            .rope_scaling,
        Some(RopeScaling::Linear { factor: 2.0 })
    );
    assert_eq!(
        with(json!({"type": "dynamic", "factor": 4.0}))
            .expect("dynamic")
            .language
            .rope_scaling,
        Some(RopeScaling::Dynamic { factor: 4.0 })
    );
    assert_config_error(with(json!({"type": "su", "factor": 2.0})), "rope_scaling");
    assert_config_error(with(json!({"type": "yarn"})), "rope_scaling");
}

#[test]
fn mla_with_zero_dims_is_rejected() {
    // Tiny's qk dims are 0 and only valid because use_mla is false.
    assert_config_error(
        parse_edited(TINY, |v| {
            language_mut(v).insert("use_mla".into(), json!(true));
            language_mut(v).insert("kv_lora_rank".into(), json!(512));
        }),
        "qk_nope_head_dim",
    );
    assert_config_error(
        parse_edited(TINY, |v| {
            language_mut(v).insert("use_mla".into(), json!(true));
        }),
        "kv_lora_rank",
    );
}

#[test]
fn unsupported_language_options_are_rejected() {
    for (key, value) in [
        ("hidden_act", json!("gelu")),
        ("attention_bias", json!(true)),
        ("tie_word_embeddings", json!(true)),
    ] {
        assert_config_error(
            parse_edited(BASE, |v| {
                language_mut(v).insert(key.into(), value);
            }),
            key,
        );
    }
    assert_config_error(
        parse_edited(TINY, |v| {
            language_mut(v).insert("num_key_value_heads".into(), json!(5));
        }),
        "num_key_value_heads",
    );
    assert_config_error(
        parse_edited(TINY, |v| {
            language_mut(v).insert("num_experts_per_tok".into(), json!(65));
        }),
        "num_experts_per_tok",
    );
    assert_config_error(
        parse_edited(BASE, |v| {
            v["projector_config"]["projector_type"] = json!("mlp_gelu");
        }),
        "projector_type",
    );
}

#[test]
fn malformed_json_is_a_json_error() {
    match ModelConfig::from_json("{\"language_config\": ") {
        Err(Error::Json { .. }) => {}
        other => panic!("expected a JSON error, got {other:?}"),
    }
    match ModelConfig::from_file(Path::new("/nonexistent/config.json")) {
        Err(Error::Io { .. }) => {}
        other => panic!("expected an I/O error, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// Golden fixture configs and processor configs.

#[test]
fn fixture_tiny_mha_softmax_parses() {
    let cfg = ModelConfig::from_dir(&fixture_dir("tiny-mha-softmax")).expect("tiny fixture");
    let lm = &cfg.language;
    assert_eq!(lm.attention, AttentionConfig::Mha { head_dim: 64 });
    assert_eq!(lm.num_hidden_layers, 3);
    assert_eq!(lm.vocab_size, 3072);
    assert_eq!((lm.bos_token_id, lm.eos_token_id), (0, 1));
    assert_eq!(lm.kv_values_per_token_per_layer(), 2 * 256);
    assert_close(lm.softmax_scale(), 1.0 / 8.0, "tiny fixture softmax scale");
    let moe = lm.moe.as_ref().expect("MoE");
    assert_eq!(moe.topk_method, TopkMethod::Greedy);
    assert_eq!(moe.scoring_func, ScoringFunc::Softmax);
    assert_eq!((moe.n_routed_experts, moe.num_experts_per_tok), (16, 6));
    assert_eq!(lm.moe_layers(), vec![1, 2]);
    assert_eq!(
        (cfg.vision.width, cfg.vision.heads, cfg.vision.layers),
        (128, 4, 2)
    );
    assert_eq!((cfg.projector.input_dim, cfg.projector.n_embed), (128, 256));
    assert_eq!(cfg.candidate_resolutions, CANDIDATES);
}

#[test]
fn fixture_small_mla_softmax_parses() {
    let cfg = ModelConfig::from_dir(&fixture_dir("small-mla-softmax")).expect("small fixture");
    let lm = &cfg.language;
    assert_eq!(
        lm.attention,
        AttentionConfig::Mla {
            q_lora_rank: None,
            kv_lora_rank: 64,
            qk_nope_head_dim: 32,
            qk_rope_head_dim: 16,
            v_head_dim: 32,
        }
    );
    assert_eq!((lm.bos_token_id, lm.eos_token_id), (3000, 3001));
    assert_eq!(lm.kv_values_per_token_per_layer(), 64 + 16);
    assert_close(
        lm.softmax_scale(),
        1.0 / 48f64.sqrt(),
        "small fixture softmax scale",
    );
    assert_eq!(lm.rope_dim(), 16);
    assert_eq!(lm.moe_layers(), vec![1, 2]);
    assert_eq!(
        (cfg.vision.width, cfg.vision.heads, cfg.vision.layers),
        (96, 6, 3)
    );
    assert_eq!((cfg.projector.input_dim, cfg.projector.n_embed), (96, 256));
    assert_eq!(cfg.candidate_resolutions, CANDIDATES);
}

fn check_processor(cfg: &ProcessorConfig) {
    assert_eq!(cfg.candidate_resolutions.len(), 23);
    assert_eq!(cfg.candidate_resolutions, CANDIDATES);
    assert_eq!(cfg.patch_size, 14);
    assert_eq!(cfg.downsample_ratio, 2);
    assert_eq!(cfg.image_token, "<image>");
    assert_eq!(cfg.pad_token, "<｜▁pad▁｜>");
    assert_eq!(cfg.image_mean, [0.5; 3]);
    assert_eq!(cfg.image_std, [0.5; 3]);
    assert!(cfg.normalize);
    assert!(!cfg.add_special_token);
    assert!(!cfg.mask_prompt);
    assert_eq!(cfg.sft_format, "deepseek");
    assert_eq!(cfg.ignore_id, -100);
}

#[test]
fn fixture_processor_configs() {
    for name in ["tiny-mha-softmax", "small-mla-softmax"] {
        let cfg =
            ProcessorConfig::from_dir(&fixture_dir(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        check_processor(&cfg);
    }
}

#[test]
fn absent_processor_config_takes_released_values() {
    // The released-configs folders hold no processor_config.json.
    let dir = Path::new(BASE).parent().expect("folder");
    assert!(!dir.join("processor_config.json").exists());
    let cfg = ProcessorConfig::from_dir(dir).expect("defaults");
    check_processor(&cfg);
    assert_eq!(cfg, ProcessorConfig::default());
}

#[test]
fn candidates_that_are_not_whole_tiles_are_rejected() {
    for bad in [json!([[384, 500]]), json!([[0, 384]]), json!([])] {
        let result = parse_edited(BASE, |v| v["candidate_resolutions"] = bad.clone());
        assert_config_error(result, "candidate_resolutions");
    }
}
