//! Weights held as the checkpoint stores them, computed in f32.
//!
//! bf16: each golden fixture is converted to bf16 and written twice, as a bf16 snapshot
//! and as an f32 snapshot of the same rounded values. Loaded with `--weights auto` (the
//! default), the bf16 snapshot holds every linear weight and table at two bytes a value
//! and, on every golden case with its images decoded from the files and run through the
//! vision tower, gives last logits within 1e-5 of the f32 copy's and the same greedy
//! tokens. The f32 snapshot of the fixture itself keeps the golden results (the golden
//! tests load it with the same default).
//!
//! int8: every golden case with the fixture's f32 weights held as int8
//! (`--weights int8`, one scale per 32 values) against the same weights in f32: the
//! test prints the max abs difference of the last logits and how many of 64 greedy
//! tokens agree, and bounds the logit error.
//!
//! Every test reads only `tests/fixtures` and writes only below its own temporary folder
//! (`$TMPDIR/tessera-precision-<pid>-<test>`), removed when the test ends.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use tessera_model::held::Held;
use tessera_model::pipeline::Pipeline;
use tessera_model::weights::WeightFormat;

#[allow(dead_code)] // each test binary uses a different subset of the helpers
mod common;
#[allow(dead_code)]
mod one_sequence;

use common::{assert_close, cases, fixture, images, messages};
use one_sequence::OneSequence;

const FIXTURES: [&str; 2] = ["tiny-mha-softmax", "small-mla-softmax"];

/// Max abs difference of the last logits between a bf16 snapshot and its f32 copy. Both
/// run the same f32 kernels on the same values (the products read bf16 rows widened
/// exactly), so the measured difference is 0; the bound leaves room for nothing but
/// summation order.
const BF16_COPY_TOL: f32 = 1e-5;

/// Greedy tokens compared between a bf16 snapshot and its f32 copy (the fixtures record 16).
const BF16_STEPS: usize = 16;

/// Greedy tokens compared between int8 and f32.
const INT8_STEPS: usize = 64;

/// Max abs difference of the last logits, int8 against f32, relative to the largest
/// |logit| (about 23-25 on the fixtures). Measured 0.016-0.020 (0.36-0.47 absolute);
/// the same weights rounded to bf16 give 0.005-0.006 (0.11-0.14).
const INT8_REL_TOL: f32 = 0.03;

/// A per-test temporary folder, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> Self {
        let path =
            std::env::temp_dir().join(format!("tessera-precision-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `dir/name`: the fixture's files with `tensors` as its `model.safetensors`.
fn snapshot(
    dir: &Path,
    name: &str,
    fixture_dir: &Path,
    tensors: &HashMap<String, Tensor>,
) -> PathBuf {
    let out = dir.join(name);
    std::fs::create_dir_all(&out).unwrap();
    for entry in std::fs::read_dir(fixture_dir).unwrap() {
        let entry = entry.unwrap();
        let file = entry.file_name();
        if entry.file_type().unwrap().is_file() && file != "model.safetensors" {
            std::fs::copy(entry.path(), out.join(&file)).unwrap();
        }
    }
    candle_core::safetensors::save(tensors, out.join("model.safetensors")).unwrap();
    out
}

/// The fixture's tensors rounded to bf16, as bf16 and as the f32 values of the rounding.
fn bf16_and_f32_copies(fixture_dir: &Path) -> (HashMap<String, Tensor>, HashMap<String, Tensor>) {
    let stored =
        candle_core::safetensors::load(fixture_dir.join("model.safetensors"), &Device::Cpu)
            .unwrap();
    let mut bf16 = HashMap::new();
    let mut f32 = HashMap::new();
    for (name, t) in stored {
        assert_eq!(t.dtype(), DType::F32, "{name}: the fixtures are f32");
        let rounded = t.to_dtype(DType::BF16).unwrap();
        f32.insert(name.clone(), rounded.to_dtype(DType::F32).unwrap());
        bf16.insert(name, rounded);
    }
    (bf16, f32)
}

fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap()
        .0 as u32
}

/// One golden case from its conversation and image files: the last prefill logits and
/// `steps` greedy tokens.
fn run_case(
    pipeline: &Pipeline,
    dir: &Path,
    case: &serde_json::Value,
    steps: usize,
) -> (Vec<f32>, Vec<u32>) {
    let messages = messages(case);
    let images = images(dir, &messages);
    let prepared = pipeline.prepare(&messages, &images).unwrap();
    let lm = &pipeline.language;
    let mut seq = OneSequence::new(lm, prepared.embeds.dim(0).unwrap() + steps);
    let last = seq
        .forward(lm, &prepared.embeds, &pipeline.experts, None)
        .unwrap();
    let mut tokens = vec![argmax(&last)];
    while tokens.len() < steps {
        let embeds = lm.embed(&tokens[tokens.len() - 1..]).unwrap();
        let logits = seq.forward(lm, &embeds, &pipeline.experts, None).unwrap();
        tokens.push(argmax(&logits));
    }
    (last, tokens)
}

/// Held bytes of the vision tower, the language model and the routed experts.
fn held(p: &Pipeline) -> [usize; 3] {
    [
        p.vision.held_bytes(),
        p.language.held_bytes(),
        p.experts.bytes(),
    ]
}

#[test]
fn a_bf16_checkpoint_is_held_in_bf16_and_computes_like_its_f32_copy() {
    for name in FIXTURES {
        let tmp = TempDir::new(name);
        let dir = fixture(name);
        let (bf16, f32) = bf16_and_f32_copies(&dir);
        let stored_bf16 = snapshot(&tmp.0, "bf16", &dir, &bf16);
        let stored_f32 = snapshot(&tmp.0, "f32", &dir, &f32);
        let half =
            Pipeline::load(&stored_bf16, DType::F32, WeightFormat::Auto, &Device::Cpu).unwrap();
        let full =
            Pipeline::load(&stored_f32, DType::F32, WeightFormat::Auto, &Device::Cpu).unwrap();

        let (h, f) = (held(&half), held(&full));
        println!("{name}: held bytes (vision, language, experts) bf16 {h:?}, f32 copy {f:?}");
        // Routed experts are linear weights only: exactly half.
        assert_eq!(2 * h[2], f[2], "{name}: expert bytes");
        // Norms, biases, the router and SigLIP's position embedding stay in the f32
        // compute dtype; at the fixtures' narrow widths they are up to 13% of the
        // vision tower (0.4% at Tiny's real widths). Everything else halves.
        for (part, (h, f)) in ["vision", "language"].iter().zip(h.iter().zip(&f)) {
            assert!(
                (*h as f64) < 0.6 * *f as f64,
                "{name}: {part} holds {h} bytes from bf16, {f} from f32"
            );
        }

        for case in cases(&dir) {
            let case_name = case["name"].as_str().unwrap();
            let (logits_h, tokens_h) = run_case(&half, &stored_bf16, &case, BF16_STEPS);
            let (logits_f, tokens_f) = run_case(&full, &stored_f32, &case, BF16_STEPS);
            let what = format!("{name}/{case_name}: last logits, bf16 held vs f32 copy");
            let diff = assert_close(&what, &logits_h, &logits_f, BF16_COPY_TOL);
            println!("{what}: max abs diff {diff}");
            assert_eq!(tokens_h, tokens_f, "{name}/{case_name}: greedy tokens");
        }
    }
}

#[test]
fn int8_weights_track_f32_on_every_golden_case() {
    for name in FIXTURES {
        let dir = fixture(name);
        let int8 = Pipeline::load(&dir, DType::F32, WeightFormat::Int8, &Device::Cpu).unwrap();
        let bf16 = Pipeline::load(&dir, DType::F32, WeightFormat::Bf16, &Device::Cpu).unwrap();
        let full = Pipeline::load(&dir, DType::F32, WeightFormat::Auto, &Device::Cpu).unwrap();
        let (q, f) = (held(&int8), held(&full));
        println!("{name}: held bytes (vision, language, experts) int8 {q:?}, f32 {f:?}");
        // int8 with an f32 scale per 32 values: 1.125 bytes a value against 4.
        assert_eq!(32 * q[2], 9 * f[2], "{name}: expert bytes");

        for case in cases(&dir) {
            let case_name = case["name"].as_str().unwrap();
            let (logits_q, tokens_q) = run_case(&int8, &dir, &case, INT8_STEPS);
            let (logits_f, tokens_f) = run_case(&full, &dir, &case, INT8_STEPS);
            let scale = logits_f.iter().fold(0f32, |m, v| m.max(v.abs()));
            let what = format!("{name}/{case_name}: last logits, int8 vs f32");
            let diff = assert_close(&what, &logits_q, &logits_f, INT8_REL_TOL * scale);
            let agree = tokens_q
                .iter()
                .zip(&tokens_f)
                .take_while(|(a, b)| a == b)
                .count();
            let same = tokens_q
                .iter()
                .zip(&tokens_f)
                .filter(|(a, b)| a == b)
                .count();
            println!(
                "{what}: max abs diff {diff:.4} (max |logit| {scale:.2}); greedy: first {agree} of \
                 {INT8_STEPS} tokens identical, {same} equal position by position"
            );
            // For scale: the same weights rounded to bf16 (`--weights bf16`).
            let (logits_b, tokens_b) = run_case(&bf16, &dir, &case, INT8_STEPS);
            let diff = assert_close(&what, &logits_b, &logits_f, INT8_REL_TOL * scale);
            let agree = tokens_b
                .iter()
                .zip(&tokens_f)
                .take_while(|(a, b)| a == b)
                .count();
            println!(
                "{name}/{case_name}: last logits, bf16 weights vs f32: max abs diff {diff:.4}; \
                 greedy: first {agree} of {INT8_STEPS} tokens identical"
            );
        }
    }
}
