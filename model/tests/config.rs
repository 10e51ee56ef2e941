//! `tessera_model::config` against the three released DeepSeek-VL2 configurations.
//!
//! `tests/fixtures/released-configs/deepseek-vl2/config.json` is the verbatim Base release;
//! the Tiny and Small files are reconstructed (see the README there). Every expected value
//! of the `language_config`, `vision_config`, `projector_config` and top-level keys is checked
//! after the reference defaults (`DeepseekV2Config` and the other config classes) are
//! applied, the parameter totals (and the state-dict key counts) are recomputed from the
//! parsed config with the released tensor shapes, and the default-value traps of those
//! config classes are exercised on edited copies of the files.

use std::path::Path;

use serde_json::{Value, json};
use tessera_model::Error;
use tessera_model::config::{
    AttentionConfig, GlobalViewPos, ModelConfig, ProcessorConfig, RopeScaling, ScoringFunc,
    TopkMethod,
};

#[allow(dead_code)] // each test binary uses a different subset of the helpers
mod common;

use common::config_spec::*;

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
// Default-value traps of the reference config classes and validation errors.

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
    // `DeepseekV2Config`: only an explicit null disables the q LoRA; an absent key takes 1536.
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
    // other value is a DeepseekV2Config default (`configuration_deepseek.py`).
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
    // DeepSeek-V2-Lite's YaRN block (its released `rope_scaling`), applied to Small.
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
    // `DeepseekV2Attention`: softmax scale ·= yarn_get_mscale(f, m)² = (0.1·m·ln f + 1)².
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
