//! Golden parity of generation with the reference, through the engine that
//! generates for the cluster and for `tessera generate` (a batch of one, with the
//! routed experts in this process).
//!
//! For every case of both fixtures: greedy generation, ignoring EOS, gives the
//! reference's 16 tokens, and the logits that picked each are within 1e-3 (max
//! abs) of the reference's, with the fixture's image features injected and again
//! with ours from the image files; and a prompt prefilled in chunks of the
//! fixture's chunk size gives the tokens of the reference's incremental prefill,
//! which are its one-shot twin's.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use golden::{Images, as_u32s as ids, assert_close, case, images, messages, tensors, tilings};
use serde_json::Value;
use tessera_model::generate::GenerationParams;
use tessera_model::pipeline::Pipeline;
use tessera_model::weights::WeightFormat;
use tessera_scheduler::EngineConfig;
use tessera_scheduler::local::{LocalEngine, Prompt};

#[path = "../../model/tests/common/mod.rs"]
#[allow(dead_code)] // the model tests' helpers; this binary uses a few
mod golden;

/// Max abs difference allowed on logits (fixture README: ~1e-3 for f32).
const TOL: f32 = 1e-3;
/// Tokens each case generates.
const NEW_TOKENS: usize = 16;

struct Golden {
    dir: PathBuf,
    /// Prepares prompts (its tokenizer, processor and vision tower).
    pipeline: Pipeline,
}

impl Golden {
    fn load(name: &str) -> Self {
        let (dir, pipeline) = golden::load(name);
        Self { dir, pipeline }
    }

    /// An engine over the fixture's model with every routed expert in this
    /// process, prefilling in chunks of `chunk` when given.
    fn engine(&self, chunk: Option<usize>) -> LocalEngine {
        let Pipeline {
            language,
            experts,
            tokenizer,
            ..
        } = Pipeline::load(&self.dir, DType::F32, WeightFormat::Auto, &Device::Cpu).unwrap();
        let positions = language.config().max_position_embeddings;
        let cfg = EngineConfig::single(positions, language.cache_bytes_per_token(), chunk);
        LocalEngine::start(language, tokenizer, Arc::new(experts), cfg).unwrap()
    }

    /// The case's prompt with its image features from `source`.
    fn prompt(&self, case: &Value, t: &HashMap<String, Tensor>, source: Images) -> Prompt {
        let messages = messages(case);
        let prompt = if source == Images::FromPixels {
            let images = images(&self.dir, &messages);
            let prepared = self.pipeline.prepare(&messages, &images).unwrap();
            Prompt {
                input_ids: prepared.encoded.input_ids,
                image_runs: prepared.encoded.image_runs,
                image_embeds: prepared.image_embeds,
            }
        } else {
            let encoded = self
                .pipeline
                .tokenizer
                .encode_conversation(&messages, &tilings(case))
                .unwrap();
            Prompt {
                input_ids: encoded.input_ids,
                image_runs: encoded.image_runs,
                image_embeds: t.get("image_embeds").cloned(),
            }
        };
        assert_eq!(prompt.input_ids, ids(&case["input_ids"]), "input_ids");
        prompt
    }

    fn greedy(&self) -> GenerationParams {
        let eos = self.pipeline.tokenizer.special().eos;
        GenerationParams {
            ignore_eos: true,
            record_logits: true,
            logprobs: None,
            ..GenerationParams::greedy(NEW_TOKENS, eos)
        }
    }

    /// Greedy tokens and the logits of every step equal the reference's.
    fn check_case(&self, engine: &mut LocalEngine, name: &str, source: Images) {
        let case = case(&self.dir, name);
        let t = tensors(&self.dir, name);
        let prompt = self.prompt(&case, &t, source);
        let name = &format!("{name} ({source:?})");
        let generation = engine.generate(&prompt, &self.greedy()).unwrap();
        assert_eq!(
            generation.output_ids,
            ids(&case["greedy"]["new_token_ids"]),
            "{name}: greedy tokens"
        );
        let steps = t["greedy_step_logits"].to_vec2::<f32>().unwrap();
        assert_eq!(generation.step_logits.len(), steps.len(), "{name}: steps");
        let mut max = 0f32;
        for (i, (got, want)) in generation.step_logits.iter().zip(&steps).enumerate() {
            let diff = assert_close(&format!("{name} greedy step {i} logits"), got, want, TOL);
            max = max.max(diff);
        }
        eprintln!("{name}: greedy step logits max abs diff {max:.2e}");
    }

    /// Chunked prefill gives the tokens of the reference's incremental prefill,
    /// which are its one-shot twin's.
    fn check_chunked(&self, name: &str, twin: &str) {
        let case = case(&self.dir, name);
        let mut t = tensors(&self.dir, name);
        if let Some(embeds) = tensors(&self.dir, twin).remove("image_embeds") {
            t.insert("image_embeds".into(), embeds);
        }
        let prompt = self.prompt(&case, &t, Images::FixtureEmbeds);
        let chunk = case["incremental_prefill"]["chunk_size"].as_u64().unwrap() as usize;
        let mut engine = self.engine(Some(chunk));
        let generation = engine.generate(&prompt, &self.greedy()).unwrap();
        assert_eq!(
            generation.output_ids,
            ids(&case["incremental_prefill"]["generate_ids"]),
            "{name}: tokens after chunked prefill"
        );
        assert_eq!(
            generation.output_ids,
            ids(&case["greedy"]["new_token_ids"]),
            "{name}: chunked tokens equal the one-shot twin's"
        );
    }
}

#[test]
fn tiny_mha_softmax_generates_the_reference_tokens() {
    let g = Golden::load("tiny-mha-softmax");
    let mut engine = g.engine(None);
    for name in ["text_only", "single_640x480", "two_images_odd_sizes"] {
        g.check_case(&mut engine, name, Images::FixtureEmbeds);
    }
    for name in ["single_640x480", "two_images_odd_sizes"] {
        g.check_case(&mut engine, name, Images::FromPixels);
    }
    g.check_chunked("single_640x480_chunked", "single_640x480");
}

#[test]
fn small_mla_softmax_generates_the_reference_tokens() {
    let g = Golden::load("small-mla-softmax");
    let mut engine = g.engine(None);
    for name in ["single_1200x400", "multi_turn", "system_role"] {
        g.check_case(&mut engine, name, Images::FixtureEmbeds);
        g.check_case(&mut engine, name, Images::FromPixels);
    }
    g.check_chunked("single_1200x400_chunked", "single_1200x400");
}
