//! Golden parity of the model with the reference implementation.
//!
//! For every case of both fixtures: the template reproduces `input_ids`; with the
//! fixture's `image_embeds` injected at the image positions, and again from the raw
//! image files through our processor and vision tower, the hidden states at the last
//! position and the last logits are within 1e-3 (max abs) of the reference, every MoE
//! layer routes every token to the same experts, the 16 greedy tokens are the same, and
//! chunked prefill (chunk 64) equals its one-shot twin.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[allow(dead_code)] // each test binary uses a different subset of the helpers
mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, case, fixture, tilings};
use serde_json::Value;
use tessera_model::chat::Message;
use tessera_model::generate::{GenerationParams, generate, prefill};
use tessera_model::language::ForwardTrace;
use tessera_model::pipeline::Pipeline;

/// Max abs difference allowed on logits and hidden states (fixture README: ~1e-3 for f32).
const TOL: f32 = 1e-3;
/// Max abs difference allowed on final routing weights (probabilities, O(0.1)).
const WEIGHT_TOL: f32 = 1e-5;

fn tensors(fixture_dir: &Path, case_name: &str) -> HashMap<String, Tensor> {
    let path = fixture_dir.join(format!("tensors/{case_name}.safetensors"));
    candle_core::safetensors::load(&path, &Device::Cpu).unwrap()
}

fn as_u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn vec1(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap()
}

/// Where the image features of a prompt come from.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Images {
    /// The reference's `image_embeds`, injected as they are.
    FixtureEmbeds,
    /// The raw image files through our processor, tower and projector.
    FromPixels,
}

struct Golden {
    pipeline: Pipeline,
    dir: PathBuf,
}

impl Golden {
    fn load(name: &str) -> Self {
        let dir = fixture(name);
        let pipeline = Pipeline::load(&dir, DType::F32, &Device::Cpu).unwrap();
        Self { pipeline, dir }
    }

    /// Input ids from the template and the prompt embeddings with the fixture's image
    /// embeddings injected.
    fn prompt(
        &self,
        case: &Value,
        t: &HashMap<String, Tensor>,
        source: Images,
    ) -> (Vec<u32>, Tensor) {
        let messages: Vec<Message> = serde_json::from_value(case["conversation"].clone()).unwrap();
        if source == Images::FromPixels {
            let images: Vec<image::RgbImage> = messages
                .iter()
                .flat_map(|m| &m.images)
                .map(|f| image::open(self.dir.join(f)).unwrap().to_rgb8())
                .collect();
            let prepared = self.pipeline.prepare(&messages, &images).unwrap();
            assert_eq!(
                prepared.encoded.input_ids,
                as_u32s(&case["input_ids"]),
                "input_ids from pixels"
            );
            return (prepared.encoded.input_ids, prepared.embeds);
        }
        let tilings = tilings(case);
        let encoded = self
            .pipeline
            .tokenizer
            .encode_conversation(&messages, &tilings)
            .unwrap();
        let want = as_u32s(&case["input_ids"]);
        if let Some(i) = (0..want.len().max(encoded.input_ids.len()))
            .find(|&i| encoded.input_ids.get(i) != want.get(i))
        {
            panic!(
                "input_ids differ at {i}: got {:?} want {:?}",
                encoded.input_ids.get(i),
                want.get(i)
            );
        }
        let embeds = self
            .pipeline
            .language
            .embed_with_images(
                &encoded.input_ids,
                &encoded.image_runs,
                t.get("image_embeds"),
            )
            .unwrap();
        (encoded.input_ids, embeds)
    }

    fn check_case(&self, name: &str, source: Images) {
        let case = case(&self.dir, name);
        let t = tensors(&self.dir, name);
        let (ids, embeds) = self.prompt(&case, &t, source);
        let name = &format!("{name} ({source:?})");
        let model = &self.pipeline.language;
        let experts = &self.pipeline.experts;

        // One-shot prefill with a trace.
        let mut cache = model.new_cache(ids.len() + 16).unwrap();
        let mut trace = ForwardTrace::default();
        let logits = model
            .forward(&embeds, &mut cache, experts, Some(&mut trace))
            .unwrap();
        let max = assert_close(
            &format!("{name} last_logits"),
            &vec1(&logits),
            &vec1(&t["last_logits"]),
            TOL,
        );
        eprintln!("{name}: last_logits max abs diff {max:.2e}");

        let hidden = t["hidden_states_last_pos"].to_vec2::<f32>().unwrap();
        assert_eq!(
            trace.hidden_last.len(),
            hidden.len(),
            "{name}: hidden state rows"
        );
        for (i, (got, want)) in trace.hidden_last.iter().zip(&hidden).enumerate() {
            assert_close(
                &format!("{name} hidden_states_last_pos[{i}]"),
                &vec1(got),
                want,
                TOL,
            );
        }

        let moe_layers = model.config().moe_layers();
        assert_eq!(
            trace.routing.iter().map(|(l, _)| *l).collect::<Vec<_>>(),
            moe_layers,
            "{name}: MoE layers traced"
        );
        for (layer, routing) in &trace.routing {
            let idx = t[&format!("moe_layer{layer}_topk_idx")]
                .to_vec2::<i32>()
                .unwrap();
            let weight = t[&format!("moe_layer{layer}_topk_weight")]
                .to_vec2::<f32>()
                .unwrap();
            assert_eq!(
                routing.tokens(),
                idx.len(),
                "{name} layer {layer}: routed tokens"
            );
            for (tok, (want_idx, want_w)) in idx.iter().zip(&weight).enumerate() {
                let got = routing.sorted_token(tok);
                let got_idx: Vec<i32> = got.iter().map(|p| p.0 as i32).collect();
                assert_eq!(
                    &got_idx, want_idx,
                    "{name} layer {layer} token {tok}: routed experts"
                );
                let got_w: Vec<f32> = got.iter().map(|p| p.1).collect();
                assert_close(
                    &format!("{name} layer {layer} token {tok} weights"),
                    &got_w,
                    want_w,
                    WEIGHT_TOL,
                );
            }
        }

        // Greedy decoding with the cache, ignoring EOS, as the fixture's 16 tokens.
        let eos = self.pipeline.tokenizer.special().eos;
        let params = GenerationParams {
            ignore_eos: true,
            record_logits: true,
            ..GenerationParams::greedy(16, eos)
        };
        let generation = generate(model, experts, None, &ids, &embeds, &params).unwrap();
        let want_ids = as_u32s(&case["greedy"]["new_token_ids"]);
        assert_eq!(generation.output_ids, want_ids, "{name}: greedy tokens");
        let steps = t["greedy_step_logits"].to_vec2::<f32>().unwrap();
        for (i, (got, want)) in generation.step_logits.iter().zip(&steps).enumerate() {
            assert_close(&format!("{name} greedy step {i} logits"), got, want, TOL);
        }
    }

    /// Chunked prefill equals the reference's incremental prefill and the one-shot twin.
    fn check_chunked(&self, name: &str, twin: &str) {
        let case = case(&self.dir, name);
        let mut t = tensors(&self.dir, name);
        let twin_t = tensors(&self.dir, twin);
        if let Some(embeds) = twin_t.get("image_embeds") {
            t.insert("image_embeds".into(), embeds.clone());
        }
        let (ids, embeds) = self.prompt(&case, &t, Images::FixtureEmbeds);
        let model = &self.pipeline.language;
        let experts = &self.pipeline.experts;
        let chunk = case["incremental_prefill"]["chunk_size"].as_u64().unwrap() as usize;

        let mut cache = model.new_cache(ids.len()).unwrap();
        let chunked = prefill(model, experts, &mut cache, &embeds, Some(chunk)).unwrap();
        assert_eq!(cache.len(), ids.len());
        let max = assert_close(
            &format!("{name} chunked_last_logits"),
            &vec1(&chunked),
            &vec1(&t["chunked_last_logits"]),
            TOL,
        );
        eprintln!("{name}: chunked_last_logits max abs diff {max:.2e}");
        assert_close(
            &format!("{name} chunked vs one-shot"),
            &vec1(&chunked),
            &vec1(&twin_t["last_logits"]),
            TOL,
        );

        let eos = self.pipeline.tokenizer.special().eos;
        let params = GenerationParams {
            ignore_eos: true,
            prefill_chunk: Some(chunk),
            ..GenerationParams::greedy(16, eos)
        };
        let generation = generate(model, experts, None, &ids, &embeds, &params).unwrap();
        assert_eq!(
            generation.output_ids,
            as_u32s(&case["incremental_prefill"]["generate_ids"]),
            "{name}: tokens after chunked prefill"
        );
        assert_eq!(
            generation.output_ids,
            as_u32s(&case["greedy"]["new_token_ids"]),
            "{name}: chunked tokens equal the one-shot twin's"
        );
    }
}

#[test]
fn tiny_mha_softmax_cases() {
    let g = Golden::load("tiny-mha-softmax");
    for name in ["text_only", "single_640x480", "two_images_odd_sizes"] {
        g.check_case(name, Images::FixtureEmbeds);
    }
    for name in ["single_640x480", "two_images_odd_sizes"] {
        g.check_case(name, Images::FromPixels);
    }
    g.check_chunked("single_640x480_chunked", "single_640x480");
}

#[test]
fn small_mla_softmax_cases() {
    let g = Golden::load("small-mla-softmax");
    for name in ["single_1200x400", "multi_turn", "system_role"] {
        g.check_case(name, Images::FixtureEmbeds);
        g.check_case(name, Images::FromPixels);
    }
    g.check_chunked("single_1200x400_chunked", "single_1200x400");
}
