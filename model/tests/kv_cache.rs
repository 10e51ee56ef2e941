//! The KV cache holds exactly what the reference caches: for MLA, the normalised latent
//! `c` (kv_lora_rank) and the post-RoPE `k_pe` (qk_rope_head_dim) per token per layer —
//! never per-head keys or values; for plain MHA, post-RoPE K and V.

use std::path::Path;

use candle_core::{DType, Device};
use tessera_model::chat::{Message, Role};
use tessera_model::config::AttentionConfig;
use tessera_model::language::kv_cache::LayerCache;
use tessera_model::pipeline::Pipeline;

fn load(name: &str) -> Pipeline {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name);
    Pipeline::load(&dir, DType::F32, &Device::Cpu).unwrap()
}

/// Prefills a short prompt into a cache with room for `capacity` tokens and returns
/// (prompt length, cache).
fn prefill(p: &Pipeline, capacity: usize) -> (usize, tessera_model::language::KvCache) {
    let prompt = p
        .tokenizer
        .encode_conversation(&[Message::new(Role::User, "How big is the cache?")], &[])
        .unwrap();
    let embeds = p.language.embed(&prompt.input_ids).unwrap();
    let mut cache = p.language.new_cache(capacity).unwrap();
    p.language
        .forward(&embeds, &mut cache, &p.experts, None)
        .unwrap();
    (prompt.input_ids.len(), cache)
}

#[test]
fn mla_cache_stores_only_the_latent_and_the_rope_key() {
    let p = load("small-mla-softmax");
    let cfg = p.language.config();
    let AttentionConfig::Mla {
        kv_lora_rank,
        qk_rope_head_dim,
        ..
    } = cfg.attention
    else {
        panic!("the small fixture uses MLA");
    };
    let layers = cfg.num_hidden_layers;
    let capacity = 100;
    let (t, mut cache) = prefill(&p, capacity);
    assert_eq!(cache.len(), t);

    let per_token = kv_lora_rank + qk_rope_head_dim; // 64 + 16 in the fixture
    assert_eq!(cache.values_per_token_per_layer(), per_token);
    // Everything allocated is `capacity` rows of (c, k_pe) per layer, in f32.
    assert_eq!(cache.allocated_bytes(), layers * capacity * per_token * 4);
    for l in 0..layers {
        match cache.layer(l) {
            LayerCache::Mla { c, k_pe } => {
                assert_eq!(c.width(), kv_lora_rank, "layer {l}: latent width");
                assert_eq!(k_pe.width(), qk_rope_head_dim, "layer {l}: rope key width");
                assert_eq!(c.view().unwrap().dims(), &[t, kv_lora_rank]);
            }
            LayerCache::Mha { .. } => panic!("layer {l} caches per-head K/V"),
        }
    }

    // Decoding a token appends one row per layer and allocates nothing more.
    let next = p.language.embed(&[5]).unwrap();
    p.language
        .forward(&next, &mut cache, &p.experts, None)
        .unwrap();
    assert_eq!(cache.len(), t + 1);
    assert_eq!(cache.allocated_bytes(), layers * capacity * per_token * 4);

    // A full cache grows instead of failing, keeping what it held.
    let (t2, mut small) = prefill(&p, 4);
    assert!(t2 > 4);
    assert_eq!(small.len(), t2);
    assert!(small.capacity() >= t2);
    p.language
        .forward(&next, &mut small, &p.experts, None)
        .unwrap();
    assert_eq!(small.len(), t2 + 1);
}

#[test]
fn mha_cache_stores_post_rope_keys_and_values() {
    let p = load("tiny-mha-softmax");
    let cfg = p.language.config();
    let width = cfg.hidden_size; // heads × head_dim
    let (_, cache) = prefill(&p, 64);
    assert_eq!(cache.values_per_token_per_layer(), 2 * width);
    assert_eq!(
        cache.allocated_bytes(),
        cfg.num_hidden_layers * 64 * 2 * width * 4
    );
    assert!(matches!(cache.layer(0), LayerCache::Mha { .. }));
}
