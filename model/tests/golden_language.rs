//! Golden parity of the model with the reference implementation.
//!
//! For every case of both fixtures: the template reproduces `input_ids`; with the
//! fixture's `image_embeds` injected at the image positions, and again from the raw
//! image files through our processor and vision tower, the hidden states at the last
//! position and the last logits are within 1e-3 (max abs) of the reference, every MoE
//! layer routes every token to the same experts, and the reference's chunked prefill
//! (chunk 64) equals its one-shot twin. The greedy tokens of generation (one-shot and
//! chunked) are checked through the engine that generates them, in
//! `scheduler/tests/golden_generate.rs`.

use std::collections::HashMap;
use std::path::PathBuf;

#[allow(dead_code)] // each test binary uses a different subset of the helpers
mod common;
#[allow(dead_code)]
mod one_sequence;

use candle_core::{DType, Tensor};
use common::{Images, as_u32s, assert_close, case, images, messages, tensors, tilings};
use one_sequence::OneSequence;
use serde_json::Value;
use tessera_model::language::ForwardTrace;
use tessera_model::pipeline::Pipeline;

/// Max abs difference allowed on logits and hidden states (fixture README: ~1e-3 for f32).
const TOL: f32 = 1e-3;
/// Max abs difference allowed on final routing weights (probabilities, O(0.1)).
const WEIGHT_TOL: f32 = 1e-5;

fn vec1(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap()
}

struct Golden {
    pipeline: Pipeline,
    dir: PathBuf,
}

impl Golden {
    fn load(name: &str) -> Self {
        let (dir, pipeline) = common::load(name);
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
        let messages = messages(case);
        if source == Images::FromPixels {
            let images = images(&self.dir, &messages);
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
        let mut seq = OneSequence::new(model, ids.len());
        let mut trace = ForwardTrace::default();
        let logits = seq
            .forward(model, &embeds, experts, Some(&mut trace))
            .unwrap();
        let max = assert_close(
            &format!("{name} last_logits"),
            &logits,
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

        // The reference's `incremental_prefilling`: positions [0, T − 1) chunk by
        // chunk, then the last prompt position alone.
        let total = ids.len();
        let mut seq = OneSequence::new(model, total);
        let mut start = 0;
        while start < total - 1 {
            let len = chunk.min(total - 1 - start);
            seq.forward(model, &embeds.narrow(0, start, len).unwrap(), experts, None)
                .unwrap();
            start += len;
        }
        let chunked = seq
            .forward(
                model,
                &embeds.narrow(0, total - 1, 1).unwrap(),
                experts,
                None,
            )
            .unwrap();
        assert_eq!(seq.len(), total);
        let max = assert_close(
            &format!("{name} chunked_last_logits"),
            &chunked,
            &vec1(&t["chunked_last_logits"]),
            TOL,
        );
        eprintln!("{name}: chunked_last_logits max abs diff {max:.2e}");
        assert_close(
            &format!("{name} chunked vs one-shot"),
            &chunked,
            &vec1(&twin_t["last_logits"]),
            TOL,
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
