//! `tessera generate`: load a snapshot and generate one reply in this process,
//! through the scheduler's engine (a batch of one, with every routed expert in
//! this process): the same decode loop, sampler and stop strings as the cluster.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use candle_core::Tensor;
use clap::Args;
use serde::Serialize;
use tessera_model::chat::{Message, Role};
use tessera_model::draw::{draw_groundings, save_png};
use tessera_model::generate::{FinishReason, GenerationParams};
use tessera_model::grounding::{GroundedBox, parse_groundings};
use tessera_model::pipeline::{ImageInfo, Pipeline, PreparedPrompt};
use tessera_model::processor::{DEFAULT_MAX_PIXELS, ImageLimits, load_image};
use tessera_model::sampling::SamplingParams;
use tessera_runtime::ModelArgs;
use tessera_runtime::device::{Compute, ComputeArgs};
use tessera_scheduler::EngineConfig;
use tessera_scheduler::local::{LocalEngine, Prompt};

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["prompt", "conversation"])))]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    compute: ComputeArgs,
    /// A single user message.
    #[arg(long)]
    prompt: Option<String>,
    /// A JSON array of messages ({"role", "content", "images"?}); image paths are relative
    /// to the file's folder unless absolute. A trailing empty assistant message is optional.
    #[arg(long)]
    conversation: Option<PathBuf>,
    /// An image for --prompt (repeatable, in order). A prompt without `<image>` tags gets
    /// one `<image>` line per image in front of the text.
    #[arg(long, requires = "prompt")]
    image: Vec<PathBuf>,
    /// Draw the grounding boxes of the answer over the last image and save it as PNG.
    #[arg(long)]
    draw_boxes: Option<PathBuf>,
    /// Refuse images with more pixels than this (checked before decoding).
    #[arg(long, default_value_t = DEFAULT_MAX_PIXELS)]
    max_image_pixels: u64,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 512)]
    max_tokens: usize,
    /// Keep generating after the end-of-sentence token.
    #[arg(long)]
    ignore_eos: bool,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this total probability.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Keep only the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Penalise tokens already in the prompt or output (1.0: off; the demo uses 1.1).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Random seed for sampling; the same seed gives the same output.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when the output contains this text (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Prefill the prompt in chunks of this many tokens (default: all at once).
    #[arg(long)]
    chunk_size: Option<usize>,
    /// Print one JSON object with ids, text, finish reason, images and timings.
    #[arg(long)]
    json: bool,
    /// Write `last_logits` (last prompt position) and `step_logits` (one row per generated
    /// token) as float32 to this safetensors file.
    #[arg(long)]
    logits_out: Option<PathBuf>,
}

#[derive(Serialize)]
struct GroundingReport {
    label: String,
    /// Pixel boxes on the last image.
    boxes: Vec<GroundedBox>,
}

#[derive(Serialize)]
struct TimingReport {
    load_s: f64,
    prompt_tokens: usize,
    prefill_s: f64,
    prefill_tokens_per_s: f64,
    decode_tokens: usize,
    decode_s: f64,
    decode_tokens_per_s: f64,
}

#[derive(Serialize)]
struct Report {
    input_ids: Vec<u32>,
    output_ids: Vec<u32>,
    text: String,
    finish_reason: FinishReason,
    images: Vec<ImageInfo>,
    groundings: Vec<GroundingReport>,
    timings: TimingReport,
}

fn read_conversation(path: &Path) -> anyhow::Result<Vec<Message>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read conversation file {}", path.display()))?;
    let messages: Vec<Message> = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a JSON array of messages like \
             [{{\"role\": \"user\", \"content\": \"...\"}}]",
            path.display()
        )
    })?;
    if messages.is_empty() {
        bail!("{} holds no messages", path.display());
    }
    Ok(messages)
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let (messages, image_paths) = match (&args.prompt, &args.conversation) {
        (Some(p), _) => {
            let text = if args.image.is_empty() || p.contains("<image>") {
                p.clone()
            } else {
                format!("{}{p}", "<image>\n".repeat(args.image.len()))
            };
            (vec![Message::new(Role::User, text)], args.image.clone())
        }
        (None, Some(path)) => {
            let messages = read_conversation(path)?;
            let base = path.parent().unwrap_or(Path::new("."));
            let images = messages
                .iter()
                .flat_map(|m| &m.images)
                .map(|f| base.join(f))
                .collect();
            (messages, images)
        }
        (None, None) => unreachable!("clap requires --prompt or --conversation"),
    };
    if args.draw_boxes.is_some() && image_paths.is_empty() {
        bail!("--draw-boxes needs an image to draw on");
    }
    let limits = ImageLimits {
        max_pixels: args.max_image_pixels,
    };
    let images = image_paths
        .iter()
        .map(|p| load_image(p, &limits))
        .collect::<Result<Vec<_>, _>>()?;

    // Check the request before spending time on loading.
    let params = GenerationParams {
        max_new_tokens: args.max_tokens,
        ignore_eos: args.ignore_eos,
        // The engine stops at the model's own end-of-sentence token.
        eos_token_id: 0,
        stop: args.stop.clone(),
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: Some(args.top_k).filter(|&k| k > 0),
            top_p: args.top_p,
            repetition_penalty: args.repetition_penalty,
            seed: args.seed,
            ..Default::default()
        },
        record_logits: args.logits_out.is_some(),
        logprobs: None,
    };
    params.sampling.validate()?;
    if args.chunk_size == Some(0) {
        bail!("--chunk-size must be at least 1");
    }
    let compute = args.compute.select()?;

    let mut model = args.model.clone();
    model.resolve_blocking()?;
    let model = model.path;

    let loading = Instant::now();
    let pipeline = Pipeline::load(&model, compute.dtype, compute.weights, &compute.device)
        .with_context(|| format!("cannot load the model from {}", model.display()))?;
    let load_s = loading.elapsed().as_secs_f64();

    let prepared = pipeline.prepare(&messages, &images)?;
    let prompt = engine_prompt(&prepared);
    let tokens = prompt.input_ids.len() + params.max_new_tokens;
    let mut engine = single_engine(pipeline, tokens, args.chunk_size)?;
    let out = engine.generate(&prompt, &params)?;

    if let Some(path) = &args.logits_out {
        write_logits(path, &out.step_logits)?;
    }
    // Boxes refer to the last image of the prompt, as in the reference demo.
    let groundings = parse_groundings(&out.text);
    let grounded: Vec<GroundingReport> = match images.last() {
        Some(img) => groundings
            .iter()
            .map(|g| GroundingReport {
                label: g.label.clone(),
                boxes: g
                    .boxes
                    .iter()
                    .map(|b| b.to_pixels(img.width(), img.height()))
                    .collect(),
            })
            .collect(),
        None => Vec::new(),
    };
    if let (Some(path), Some(img)) = (&args.draw_boxes, images.last()) {
        save_png(&draw_groundings(img, &groundings), path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        if groundings.is_empty() {
            eprintln!(
                "note: the answer has no grounding boxes; {} is the plain image",
                path.display()
            );
        }
    }
    let t = &out.timings;
    let timings = TimingReport {
        load_s,
        prompt_tokens: t.prompt_tokens,
        prefill_s: t.prefill.as_secs_f64(),
        prefill_tokens_per_s: t.prefill_tokens_per_s(),
        decode_tokens: t.decode_steps,
        decode_s: t.decode.as_secs_f64(),
        decode_tokens_per_s: t.decode_tokens_per_s(),
    };
    if args.json {
        let report = Report {
            input_ids: prompt.input_ids,
            output_ids: out.output_ids,
            text: out.text,
            finish_reason: out.finish_reason,
            images: prepared.images,
            groundings: grounded,
            timings,
        };
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{}", out.text);
        eprintln!(
            "[{} prompt tokens, {} generated, finish: {:?}; prefill {:.1} tok/s, decode {:.1} tok/s; load {:.2}s]",
            timings.prompt_tokens,
            out.output_ids.len(),
            out.finish_reason,
            timings.prefill_tokens_per_s,
            timings.decode_tokens_per_s,
            load_s
        );
    }
    Ok(())
}

/// The prompt the engine takes from a prepared conversation.
pub(super) fn engine_prompt(prepared: &PreparedPrompt) -> Prompt {
    Prompt {
        input_ids: prepared.encoded.input_ids.clone(),
        image_runs: prepared.encoded.image_runs.clone(),
        image_embeds: prepared.image_embeds.clone(),
    }
}

/// A batch-of-one engine on `pipeline`'s language model and experts, room for
/// `tokens` positions, prefilling in chunks of `chunk` tokens (default: at once). The
/// vision tower is dropped: the prompt's images are already encoded.
pub(super) fn single_engine(
    pipeline: Pipeline,
    tokens: usize,
    chunk: Option<usize>,
) -> anyhow::Result<LocalEngine> {
    let Pipeline {
        language,
        experts,
        tokenizer,
        ..
    } = pipeline;
    let cfg = EngineConfig::single(tokens, language.cache_bytes_per_token(), chunk);
    Ok(LocalEngine::start(
        language,
        tokenizer,
        Arc::new(experts),
        cfg,
    )?)
}

/// Saves the recorded logits: `last_logits` (vocab) and `step_logits` (steps, vocab).
fn write_logits(path: &Path, steps: &[Vec<f32>]) -> anyhow::Result<()> {
    let Some(first) = steps.first() else {
        bail!("no token was generated, so there are no logits to write");
    };
    let vocab = first.len();
    let host = Compute::host().device;
    let last = Tensor::from_slice(first, vocab, &host)?;
    let flat: Vec<f32> = steps.iter().flatten().copied().collect();
    let step = Tensor::from_vec(flat, (steps.len(), vocab), &host)?;
    let tensors = std::collections::HashMap::from([
        ("last_logits".to_string(), last),
        ("step_logits".to_string(), step),
    ]);
    candle_core::safetensors::save(&tensors, path)
        .with_context(|| format!("cannot write logits to {}", path.display()))?;
    Ok(())
}
