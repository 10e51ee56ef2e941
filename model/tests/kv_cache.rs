//! The KV cache holds exactly what the reference caches: for MLA, the normalised latent
//! `c` (kv_lora_rank) and the post-RoPE `k_pe` (qk_rope_head_dim) per token per layer —
//! never per-head keys or values; for plain MHA, post-RoPE K and V.

mod one_sequence;

use std::path::Path;

use candle_core::{DType, Device};
use one_sequence::OneSequence;
use tessera_model::chat::{Message, Role};
use tessera_model::config::AttentionConfig;
use tessera_model::pipeline::Pipeline;
use tessera_model::weights::WeightFormat;

fn load(name: &str) -> Pipeline {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name);
    Pipeline::load(&dir, DType::F32, WeightFormat::Auto, &Device::Cpu).unwrap()
}

/// Prefills a short prompt into a cache with room for `capacity` tokens and returns
/// (prompt length, the sequence).
fn prefill(p: &Pipeline, capacity: usize) -> (usize, OneSequence) {
    let prompt = p
        .tokenizer
        .encode_conversation(&[Message::new(Role::User, "How big is the cache?")], &[])
        .unwrap();
    let embeds = p.language.embed(&prompt.input_ids).unwrap();
    let mut seq = OneSequence::new(&p.language, capacity);
    seq.forward(&p.language, &embeds, &p.experts, None).unwrap();
    (prompt.input_ids.len(), seq)
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
    let (t, mut seq) = prefill(&p, capacity);
    assert_eq!(seq.len(), t);

    let per_token = kv_lora_rank + qk_rope_head_dim; // 64 + 16 in the fixture
    assert_eq!(seq.cache.bytes_per_token(), layers * per_token * 4);
    assert_eq!(p.language.cache_bytes_per_token(), layers * per_token * 4);
    // Everything allocated is `capacity` rows of (c, k_pe) per layer, in f32.
    assert_eq!(
        seq.cache.allocated_bytes(),
        layers * capacity * per_token * 4
    );
    for l in 0..layers {
        let [c, k_pe] = seq.cache.gather(l, seq.slots()).unwrap();
        assert_eq!(c.dims(), &[t, kv_lora_rank], "layer {l}: latent rows");
        assert_eq!(
            k_pe.dims(),
            &[t, qk_rope_head_dim],
            "layer {l}: rope key rows"
        );
        assert!(
            c.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0,
            "layer {l}: the prompt's latents were written"
        );
    }

    // Decoding a token writes one more row per layer and allocates nothing more.
    let next = p.language.embed(&[5]).unwrap();
    seq.forward(&p.language, &next, &p.experts, None).unwrap();
    assert_eq!(seq.len(), t + 1);
    assert_eq!(
        seq.cache.allocated_bytes(),
        layers * capacity * per_token * 4
    );
}

#[test]
fn mha_cache_stores_post_rope_keys_and_values() {
    let p = load("tiny-mha-softmax");
    let cfg = p.language.config();
    let width = cfg.hidden_size; // heads × head_dim
    let (t, seq) = prefill(&p, 64);
    assert_eq!(
        seq.cache.bytes_per_token(),
        cfg.num_hidden_layers * 2 * width * 4
    );
    assert_eq!(
        seq.cache.allocated_bytes(),
        cfg.num_hidden_layers * 64 * 2 * width * 4
    );
    let [k, v] = seq.cache.gather(0, seq.slots()).unwrap();
    assert_eq!((k.dims(), v.dims()), (&[t, width][..], &[t, width][..]));
}
