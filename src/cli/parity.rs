//! `tessera parity`: checks this binary on this device against a golden fixture, the
//! reference implementation's recorded outputs on a small random-weight checkpoint
//! (`tests/fixtures/*/README.md`). Every case runs as `tessera generate` would run its
//! conversation file: the processor and vision tower from the image files, the
//! language model and every routed expert, greedy for the recorded number of tokens
//! (chunked cases prefill in the recorded chunk size). The logits of each step and
//! the tokens are compared with the reference's (logits up to the first step whose
//! token differs: after it the texts differ); one JSON report goes to stdout.
//!
//! With `--dtype f32` the check passes when every logit is within `--tolerance`
//! (max abs, 1e-3 as the golden tests) and every token agrees; it exits 1 otherwise.
//! Other dtypes are reported (differences and token agreement), not judged: their
//! rounding is not the reference's.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use candle_core::{DType, Tensor};
use clap::Args;
use serde::Serialize;
use serde_json::Value;
use tessera_model::chat::Message;
use tessera_model::generate::GenerationParams;
use tessera_model::pipeline::Pipeline;
use tessera_model::processor::{DEFAULT_MAX_PIXELS, ImageLimits, load_image};
use tessera_model::sampling::SamplingParams;
use tessera_runtime::device::{Compute, ComputeArgs};

use super::generate::{engine_prompt, single_engine};

#[derive(Debug, Args)]
pub struct ParityArgs {
    /// A golden fixture folder: the checkpoint with `cases.json`, `tensors/` and
    /// `conversations/` (e.g. tests/fixtures/tiny-mha-softmax). Repeatable.
    #[arg(long, required = true)]
    fixture: Vec<PathBuf>,
    #[command(flatten)]
    compute: ComputeArgs,
    /// Largest difference allowed on any logit with --dtype f32 (max abs).
    #[arg(long, default_value_t = 1e-3)]
    tolerance: f32,
    /// Only the cases with these names (repeatable; default: every case).
    #[arg(long)]
    case: Vec<String>,
}

#[derive(Debug, Serialize)]
struct Report {
    device: String,
    dtype: String,
    weights: String,
    /// The logit tolerance checked; `null` when the dtype is reported, not judged.
    tolerance: Option<f32>,
    fixtures: Vec<FixtureReport>,
    /// Largest logit difference over every case.
    worst_logits_max_abs_diff: f32,
    /// Generated tokens equal to the reference's, over all cases.
    greedy_tokens_agreeing: usize,
    greedy_tokens: usize,
    /// `null` when not judged (dtype other than f32).
    pass: Option<bool>,
}

#[derive(Debug, Serialize)]
struct FixtureReport {
    fixture: String,
    load_s: f64,
    cases: Vec<CaseReport>,
}

#[derive(Debug, Serialize)]
struct CaseReport {
    name: String,
    prompt_tokens: usize,
    /// The prompt ids equal the reference's `input_ids`.
    input_ids_match: bool,
    /// Prefill in chunks of this many tokens (the reference's incremental prefill).
    chunk_size: Option<usize>,
    /// The last prompt position's logits against the reference's.
    last_logits_max_abs_diff: f32,
    /// Every step's logits against the reference's (the largest difference), up to
    /// the first step whose token differs.
    step_logits_max_abs_diff: f32,
    /// Steps whose logits were compared.
    steps_compared: usize,
    greedy_tokens: usize,
    /// Positions whose generated token equals the reference's.
    greedy_tokens_agreeing: usize,
    /// The first step whose token differs; `null` when all agree.
    first_divergence: Option<usize>,
    seconds: f64,
    pass: Option<bool>,
}

pub fn run(args: ParityArgs) -> anyhow::Result<()> {
    let compute = args.compute.select()?;
    let judged = compute.dtype == DType::F32;
    let mut fixtures = Vec::new();
    for dir in &args.fixture {
        fixtures.push(
            check_fixture(dir, &compute, &args.case)
                .with_context(|| format!("fixture {}", dir.display()))?,
        );
    }
    let cases = || fixtures.iter().flat_map(|f| &f.cases);
    if cases().next().is_none() {
        bail!("no case matched --case {:?}", args.case);
    }
    let worst = cases()
        .map(|c| c.last_logits_max_abs_diff.max(c.step_logits_max_abs_diff))
        .fold(0f32, f32::max);
    let agreeing = cases().map(|c| c.greedy_tokens_agreeing).sum();
    let total = cases().map(|c| c.greedy_tokens).sum();
    let pass = judged.then(|| {
        cases().all(|c| {
            c.input_ids_match
                && c.last_logits_max_abs_diff.max(c.step_logits_max_abs_diff) <= args.tolerance
                && c.first_divergence.is_none()
        })
    });
    let mut fixtures = fixtures;
    for case in fixtures.iter_mut().flat_map(|f| &mut f.cases) {
        case.pass = judged.then(|| {
            case.input_ids_match
                && case
                    .last_logits_max_abs_diff
                    .max(case.step_logits_max_abs_diff)
                    <= args.tolerance
                && case.first_divergence.is_none()
        });
    }
    let report = Report {
        device: args.compute.device.to_string(),
        dtype: format!("{:?}", compute.dtype).to_lowercase(),
        weights: compute.weights.to_string(),
        tolerance: judged.then_some(args.tolerance),
        fixtures,
        worst_logits_max_abs_diff: worst,
        greedy_tokens_agreeing: agreeing,
        greedy_tokens: total,
        pass,
    };
    println!("{}", serde_json::to_string(&report)?);
    if pass == Some(false) {
        bail!(
            "parity failed: a logit differs by {worst:.2e} (tolerance {:.0e}) or a token differs ({agreeing} of {total} agree)",
            args.tolerance
        );
    }
    Ok(())
}

fn check_fixture(dir: &Path, compute: &Compute, only: &[String]) -> anyhow::Result<FixtureReport> {
    let cases_path = dir.join("cases.json");
    let text = std::fs::read_to_string(&cases_path)
        .with_context(|| format!("cannot read {}", cases_path.display()))?;
    let doc: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not JSON", cases_path.display()))?;
    let cases = doc["cases"]
        .as_array()
        .with_context(|| format!("{} has no `cases` array", cases_path.display()))?;
    let loading = Instant::now();
    // Loaded once to time the load and fail early; each case starts from a fresh
    // load so that no cache carries from one case to the next.
    drop(load(dir, compute)?);
    let load_s = loading.elapsed().as_secs_f64();
    let mut reports = Vec::new();
    for case in cases {
        let name = case["name"].as_str().context("a case without a name")?;
        if !only.is_empty() && !only.iter().any(|n| n == name) {
            continue;
        }
        reports.push(check_case(dir, case, compute).with_context(|| format!("case {name}"))?);
    }
    Ok(FixtureReport {
        fixture: dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        load_s,
        cases: reports,
    })
}

fn load(dir: &Path, compute: &Compute) -> anyhow::Result<Pipeline> {
    Pipeline::load(dir, compute.dtype, compute.weights, &compute.device)
        .with_context(|| format!("cannot load the model from {}", dir.display()))
}

fn check_case(dir: &Path, case: &Value, compute: &Compute) -> anyhow::Result<CaseReport> {
    let started = Instant::now();
    let name = case["name"].as_str().unwrap_or_default();
    let conversation = dir.join("conversations").join(format!("{name}.json"));
    let messages: Vec<Message> = serde_json::from_str(
        &std::fs::read_to_string(&conversation)
            .with_context(|| format!("cannot read {}", conversation.display()))?,
    )
    .with_context(|| format!("{} is not a conversation", conversation.display()))?;
    let limits = ImageLimits {
        max_pixels: DEFAULT_MAX_PIXELS,
    };
    let images = messages
        .iter()
        .flat_map(|m| &m.images)
        // Image paths are relative to the conversation file, as for `generate`.
        .map(|f| load_image(&dir.join("conversations").join(f), &limits))
        .collect::<Result<Vec<_>, _>>()?;

    let want_ids = ids(&case["greedy"]["new_token_ids"]).context("no greedy.new_token_ids")?;
    let want_input = ids(&case["input_ids"]).context("no input_ids")?;
    let chunk_size = case["incremental_prefill"]["chunk_size"]
        .as_u64()
        .map(|c| c as usize);
    let tensors = reference_tensors(dir, case)?;
    let host = Compute::host().device;
    let row = |key: &str| -> anyhow::Result<Vec<f32>> {
        let t = tensors
            .get(key)
            .with_context(|| format!("the reference tensors have no {key}"))?;
        Ok(t.to_device(&host)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?)
    };
    let want_last = row(if chunk_size.is_some() {
        "chunked_last_logits"
    } else {
        "last_logits"
    })?;
    let want_steps = row("greedy_step_logits")?;

    let pipeline = load(dir, compute)?;
    let prepared = pipeline.prepare(&messages, &images)?;
    let prompt = engine_prompt(&prepared);
    let tokens = prompt.input_ids.len() + want_ids.len();
    let mut engine = single_engine(pipeline, tokens, chunk_size)?;
    let params = GenerationParams {
        max_new_tokens: want_ids.len(),
        ignore_eos: true,
        eos_token_id: 0,
        stop: Vec::new(),
        sampling: SamplingParams::default(),
        record_logits: true,
        logprobs: None,
    };
    let out = engine.generate(&prompt, &params)?;

    let vocab = want_last.len();
    let last = out.step_logits.first().context("no logits were recorded")?;
    let agreeing = out
        .output_ids
        .iter()
        .zip(&want_ids)
        .filter(|(a, b)| a == b)
        .count();
    let first_divergence = (0..want_ids.len()).find(|&i| out.output_ids.get(i) != want_ids.get(i));
    // Past the first differing token the two runs continue different texts: their
    // logits are compared up to the step that picked it.
    let compared = first_divergence.map_or(want_ids.len(), |d| d + 1);
    let got_steps: Vec<f32> = out.step_logits.iter().flatten().copied().collect();
    let steps = got_steps.len().min(want_steps.len()).min(compared * vocab) / vocab.max(1) * vocab;
    Ok(CaseReport {
        name: name.to_string(),
        prompt_tokens: prompt.input_ids.len(),
        input_ids_match: prompt.input_ids == want_input,
        chunk_size,
        last_logits_max_abs_diff: max_abs_diff(last, &want_last),
        step_logits_max_abs_diff: max_abs_diff(&got_steps[..steps], &want_steps[..steps]),
        steps_compared: steps / vocab.max(1),
        greedy_tokens: want_ids.len(),
        greedy_tokens_agreeing: agreeing,
        first_divergence,
        seconds: started.elapsed().as_secs_f64(),
        pass: None,
    })
}

/// The case's reference tensors; a chunked case stores only what differs from its
/// one-shot twin (`<name>` without `_chunked`), whose file fills in the rest.
fn reference_tensors(dir: &Path, case: &Value) -> anyhow::Result<HashMap<String, Tensor>> {
    let host = Compute::host().device;
    let file = case["tensors_file"].as_str().context("no tensors_file")?;
    let mut tensors = candle_core::safetensors::load(dir.join(file), &host)
        .with_context(|| format!("cannot read {}", dir.join(file).display()))?;
    let name = case["name"].as_str().unwrap_or_default();
    if let Some(twin) = name.strip_suffix("_chunked") {
        let path = dir.join("tensors").join(format!("{twin}.safetensors"));
        if path.is_file() {
            for (k, v) in candle_core::safetensors::load(&path, &host)? {
                tensors.entry(k).or_insert(v);
            }
        }
    }
    Ok(tensors)
}

fn ids(v: &Value) -> Option<Vec<u32>> {
    v.as_array()?
        .iter()
        .map(|x| x.as_u64().map(|x| x as u32))
        .collect()
}

/// Largest |a − b|; a length mismatch or NaN counts as infinitely far.
fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return f32::INFINITY;
    }
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let d = (x - y).abs();
            if d.is_nan() { f32::INFINITY } else { d }
        })
        .fold(0f32, f32::max)
}

#[cfg(test)]
mod tests {
    use super::max_abs_diff;

    #[test]
    fn differences_count_nan_and_length_as_infinite() {
        assert_eq!(max_abs_diff(&[1.0, 2.0], &[1.5, 2.0]), 0.5);
        assert_eq!(max_abs_diff(&[1.0], &[1.0, 2.0]), f32::INFINITY);
        assert_eq!(max_abs_diff(&[f32::NAN], &[1.0]), f32::INFINITY);
        assert_eq!(max_abs_diff(&[], &[]), 0.0);
    }
}
