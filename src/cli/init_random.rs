//! `tessera init-random`: a random-weight DeepSeek-VL2 checkpoint at a released
//! variant's real widths (optionally with fewer layers), in the released layout
//! (`config.json`, safetensors with the released tensor names, tokenizer and processor
//! files), so real shapes can be served and measured offline.

mod tensors;
mod writer;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use serde_json::Value;
use tessera_model::config::{AttentionConfig, ModelConfig};

use tensors::{ParamCount, checkpoint_tensors, count_params};
use tessera_runtime::device::Precision;
use writer::{StoredDtype, WeightOptions, human_bytes, parse_size, write_weights};

/// The released tokenizer files (the DeepSeek-V3 BPE with the VL2 processor's tokens,
/// ids up to 128822) and processor settings.
const TOKENIZER_FILES: [(&str, &[u8]); 4] = [
    (
        "tokenizer.json",
        include_bytes!("../../tests/fixtures/tiny-mha-softmax/real-tokenizer/tokenizer.json"),
    ),
    (
        "tokenizer_config.json",
        include_bytes!(
            "../../tests/fixtures/tiny-mha-softmax/real-tokenizer/tokenizer_config.json"
        ),
    ),
    (
        "special_tokens_map.json",
        include_bytes!(
            "../../tests/fixtures/tiny-mha-softmax/real-tokenizer/special_tokens_map.json"
        ),
    ),
    (
        "processor_config.json",
        include_bytes!(
            "../../tests/fixtures/tiny-mha-softmax/real-tokenizer/processor_config.json"
        ),
    ),
];

/// Token ids the bundled tokenizer produces (0..=128822).
const TOKENIZER_IDS: usize = 128_823;
/// The vocabulary of the checkpoints that use the bundled tokenizer (Tiny, Base).
const V3_VOCAB: usize = 129_280;

/// A released DeepSeek-VL2 model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Variant {
    /// DeepSeek-VL2-Tiny: 3.4B parameters, MHA, 64 experts.
    Tiny,
    /// DeepSeek-VL2-Small: 16B parameters, MLA, 64 experts.
    Small,
    /// DeepSeek-VL2 (Base): 27B parameters, MLA, 72 experts, sigmoid gate.
    Base,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Self::Tiny => "DeepSeek-VL2-Tiny",
            Self::Small => "DeepSeek-VL2-Small",
            Self::Base => "DeepSeek-VL2",
        }
    }

    /// The released `config.json`.
    fn released_config(self) -> &'static str {
        match self {
            Self::Tiny => {
                include_str!("../../tests/fixtures/released-configs/deepseek-vl2-tiny/config.json")
            }
            Self::Small => {
                include_str!("../../tests/fixtures/released-configs/deepseek-vl2-small/config.json")
            }
            Self::Base => {
                include_str!("../../tests/fixtures/released-configs/deepseek-vl2/config.json")
            }
        }
    }
}

#[derive(Debug, Args)]
pub struct InitRandomArgs {
    /// Which released model's widths, expert counts and gate to use.
    #[arg(long, value_enum)]
    variant: Variant,
    /// Output folder (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Keep only the first N language layers (default: all; Tiny 12, Small 27, Base 30).
    /// The first layer of every variant is dense, so N must be at least 2: the
    /// checkpoint always has at least one mixture-of-experts layer.
    #[arg(long, value_name = "N")]
    layers: Option<usize>,
    /// Keep only the first N SigLIP blocks (default: all 27).
    #[arg(long, value_name = "N")]
    vision_layers: Option<usize>,
    /// Precision of the stored weights (bf16 as released).
    #[arg(long, value_enum, default_value = "bf16")]
    dtype: Precision,
    /// Seed of the random weights: the same seed writes the same bytes.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Largest weight file: a bigger checkpoint is split into
    /// model-0000i-of-0000n.safetensors shards with model.safetensors.index.json
    /// (e.g. 4GB, 500MB, 2GiB).
    #[arg(long, value_name = "SIZE", default_value = "4GB", value_parser = parse_size)]
    max_shard_size: u64,
    /// Write into a folder that is not empty: replaces config.json, the tokenizer files
    /// and every *.safetensors and model.safetensors.index.json there.
    #[arg(long)]
    force: bool,
}

/// The config to write, validated, and what was changed from the release.
#[derive(Debug)]
struct Plan {
    json: Value,
    config: ModelConfig,
    released: ModelConfig,
    notes: Vec<String>,
}

fn stored_dtype(d: Precision) -> StoredDtype {
    match d {
        Precision::Bf16 => StoredDtype::Bf16,
        Precision::F16 => StoredDtype::F16,
        Precision::F32 => StoredDtype::F32,
    }
}

/// The released config with the requested layer counts, checked.
fn plan(args: &InitRandomArgs) -> anyhow::Result<Plan> {
    let text = args.variant.released_config();
    let released = ModelConfig::from_json(text)?;
    let mut json: Value = serde_json::from_str(text)?;
    let mut notes = Vec::new();
    let name = args.variant.name();

    let real_layers = released.language.num_hidden_layers;
    let dense = released
        .language
        .moe
        .as_ref()
        .map_or(0, |m| m.first_k_dense_replace);
    if let Some(n) = args.layers {
        if n == 0 || n > real_layers {
            bail!(
                "--layers {n}: {name} has {real_layers} language layers; pass {}..={real_layers}",
                dense + 1
            );
        }
        json["language_config"]["num_hidden_layers"] = n.into();
    }
    let real_blocks = released.vision.layers;
    if let Some(n) = args.vision_layers {
        if n == 0 || n > real_blocks {
            bail!(
                "--vision-layers {n}: {name} has {real_blocks} SigLIP blocks; pass 1..={real_blocks}"
            );
        }
        json["vision_config"]["layers"] = n.into();
    }
    let torch_dtype = stored_dtype(args.dtype).torch_name();
    json["torch_dtype"] = torch_dtype.into();
    json["language_config"]["torch_dtype"] = torch_dtype.into();
    if released.language.vocab_size < TOKENIZER_IDS {
        json["language_config"]["vocab_size"] = V3_VOCAB.into();
        json["language_config"]["bos_token_id"] = 0.into();
        json["language_config"]["eos_token_id"] = 1.into();
        notes.push(format!(
            "vocab_size is {V3_VOCAB} (bos 0, eos 1), not the released {} (bos {}, eos {}): \
             the bundled tokenizer's ids go up to {}",
            released.language.vocab_size,
            released.language.bos_token_id,
            released.language.eos_token_id,
            TOKENIZER_IDS - 1
        ));
    }

    let config = ModelConfig::from_json(&json.to_string())?;
    if config.language.moe_layers().is_empty() {
        bail!(
            "--layers {}: the first {dense} layer(s) of {name} are dense, so this would leave \
             no mixture-of-experts layer; pass --layers {} or more",
            config.language.num_hidden_layers,
            dense + 1
        );
    }
    Ok(Plan {
        json,
        config,
        released,
        notes,
    })
}

/// Makes `dir` ready: created if missing; refused if not empty unless `force`, in which
/// case old weight files go (the loader would read stray `*.safetensors`).
fn prepare_out_dir(dir: &Path, force: bool) -> anyhow::Result<()> {
    if dir.exists() {
        if !dir.is_dir() {
            bail!("{} exists and is not a folder", dir.display());
        }
        let entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("cannot list {}", dir.display()))?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()?;
        if !entries.is_empty() && !force {
            bail!(
                "{} is not empty; pass --force to write into it anyway (replaces config.json, \
                 the tokenizer files and every *.safetensors and model.safetensors.index.json)",
                dir.display()
            );
        }
        for path in entries {
            let is_weights = path.extension().is_some_and(|x| x == "safetensors")
                || path
                    .file_name()
                    .is_some_and(|n| n == "model.safetensors.index.json");
            if is_weights && path.is_file() {
                std::fs::remove_file(&path)
                    .with_context(|| format!("cannot remove {}", path.display()))?;
            }
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}

fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> anyhow::Result<u64> {
    let path = dir.join(name);
    std::fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(bytes.len() as u64)
}

/// `3.37B` / `620M`-style counts.
fn human_count(n: u64) -> String {
    if n >= 1_000_000_000 {
        format!("{:.2}B", n as f64 / 1e9)
    } else {
        format!("{:.0}M", n as f64 / 1e6)
    }
}

pub fn run(args: InitRandomArgs) -> anyhow::Result<()> {
    let start = Instant::now();
    let plan = plan(&args)?;
    let dtype = stored_dtype(args.dtype);
    let specs = checkpoint_tensors(&plan.config);
    let params = count_params(&specs);
    let data_bytes = params.total * dtype.size() as u64;
    prepare_out_dir(&args.out, args.force)?;
    let dir = &args.out;
    eprintln!(
        "writing {} with random weights ({} parameters, {} in {}) to {}",
        args.variant.name(),
        human_count(params.total),
        human_bytes(data_bytes),
        dtype.torch_name(),
        dir.display()
    );

    let mut bytes = 0;
    let mut files = Vec::new();
    for (name, content) in TOKENIZER_FILES {
        bytes += write_file(dir, name, content)?;
        files.push(name.to_string());
    }
    let opts = WeightOptions {
        dtype,
        seed: args.seed,
        max_shard_bytes: args.max_shard_size,
        metadata: HashMap::from([(
            "tessera.init_random".to_string(),
            format!("{:?} seed={}", args.variant, args.seed).to_lowercase(),
        )]),
    };
    let weights = write_weights(dir, &specs, &opts)?;
    bytes += weights.bytes;
    files.extend(weights.files);
    // Written last: a folder whose write was interrupted has no config and fails to load.
    let config = serde_json::to_string_pretty(&plan.json)? + "\n";
    bytes += write_file(dir, "config.json", config.as_bytes())?;
    files.push("config.json".into());

    print_summary(&args, &plan, params, bytes, &files, start);
    Ok(())
}

fn print_summary(
    args: &InitRandomArgs,
    plan: &Plan,
    params: ParamCount,
    bytes: u64,
    files: &[String],
    start: Instant,
) {
    let lang = &plan.config.language;
    let moe_layers = lang.moe_layers().len();
    let attention = match &lang.attention {
        AttentionConfig::Mha { .. } => format!("MHA, {} heads", lang.num_attention_heads),
        AttentionConfig::Mla { kv_lora_rank, .. } => format!(
            "MLA, {} heads, kv_lora_rank {kv_lora_rank}",
            lang.num_attention_heads
        ),
    };
    let experts = lang.moe.as_ref().map_or(String::new(), |m| {
        format!(
            ": {} routed experts (top-{}) + {} shared",
            m.n_routed_experts, m.num_experts_per_tok, m.n_shared_experts
        )
    });
    let dir = args.out.display();
    println!("{} (random weights) in {dir}", args.variant.name());
    println!(
        "  language    {} of {} layers ({} dense, {moe_layers} MoE{experts}); hidden {}, {attention}, vocab {}",
        lang.num_hidden_layers,
        plan.released.language.num_hidden_layers,
        lang.num_hidden_layers - moe_layers,
        lang.hidden_size,
        lang.vocab_size
    );
    println!(
        "  vision      {} of {} SigLIP blocks, width {}",
        plan.config.vision.layers, plan.released.vision.layers, plan.config.vision.width
    );
    println!(
        "  parameters  {} total, {} activated per token (embedding table and unselected experts not counted)",
        human_count(params.total),
        human_count(params.activated)
    );
    println!(
        "  written     {} in {:.1} s: {}",
        human_bytes(bytes),
        start.elapsed().as_secs_f64(),
        files.join(", ")
    );
    for note in &plan.notes {
        println!("  note        {note}");
    }
    println!("Replies are gibberish; shapes, memory and speed are the real model's. Try:");
    println!(
        "  tessera generate --model {dir} --prompt \"Describe this image.\" --image PHOTO.png --max-tokens 32"
    );
    println!("  tessera up --model {dir}");
    println!("  tessera bench --model {dir} --requests 16 --concurrency 4 --output-tokens 32");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(variant: Variant, layers: Option<usize>) -> InitRandomArgs {
        InitRandomArgs {
            variant,
            out: PathBuf::new(),
            layers,
            vision_layers: None,
            dtype: Precision::Bf16,
            seed: 0,
            max_shard_size: u64::MAX,
            force: false,
        }
    }

    /// The tensor list of each released config adds up to the published sizes
    /// (total; activated per token): Tiny 3.37B; 1.0B, Small 16.1B; 2.8B, Base 27.5B; 4.5B.
    #[test]
    fn released_variants_have_the_published_parameter_counts() {
        for (variant, total, activated) in [
            (Variant::Tiny, 3.37e9, 1.0e9),
            (Variant::Small, 16.1e9, 2.8e9),
            (Variant::Base, 27.5e9, 4.5e9),
        ] {
            let p = plan(&args(variant, None)).unwrap();
            let n = count_params(&checkpoint_tensors(&p.released));
            let off = |got: u64, want: f64| (got as f64 - want).abs() / want;
            assert!(off(n.total, total) < 0.005, "{variant:?}: {n:?}");
            assert!(off(n.activated, activated) < 0.05, "{variant:?}: {n:?}");
        }
    }

    #[test]
    fn layer_counts_are_applied_and_small_gets_the_tokenizer_vocabulary() {
        let p = plan(&args(Variant::Small, Some(3))).unwrap();
        assert_eq!(p.config.language.num_hidden_layers, 3);
        assert_eq!(p.config.language.moe_layers(), [1, 2]);
        assert_eq!(p.config.language.vocab_size, V3_VOCAB);
        assert_eq!(p.config.language.hidden_size, 2048);
        assert_eq!(p.notes.len(), 1);
        let tiny = plan(&args(Variant::Tiny, None)).unwrap();
        assert_eq!(tiny.config, tiny.released);
        assert!(tiny.notes.is_empty());
        assert!(plan(&args(Variant::Base, Some(1))).is_err());
        assert!(plan(&args(Variant::Base, Some(31))).is_err());
    }
}
