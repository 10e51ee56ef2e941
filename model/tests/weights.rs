//! Weight loading: sharded snapshots, missing and mis-shaped tensors, selective loading of
//! routed experts, and reduced-precision compute dtypes.
//!
//! Every test reads only `tests/fixtures` and writes only below its own temporary folder
//! (`$TMPDIR/tessera-weights-<pid>-<test>`), removed when the test ends (also on failure).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use tessera_model::Error;
use tessera_model::chat::{ChatTokenizer, Message, Role};
use tessera_model::config::ModelConfig;
use tessera_model::experts::{ExpertBackend, ExpertSelection, LocalExperts};
use tessera_model::language::{ForwardTrace, LanguageModel};
use tessera_model::pipeline::Pipeline;
use tessera_model::weights::{Checkpoint, LoadTarget, WeightFormat};

/// Files of a snapshot other than the weights.
const NON_WEIGHT_FILES: [&str; 5] = [
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "processor_config.json",
];

#[allow(dead_code)] // each test binary uses a different subset of the helpers
mod one_sequence;

use one_sequence::OneSequence;

const SMALL: &str = "small-mla-softmax";
const TINY: &str = "tiny-mha-softmax";

/// Max abs difference of the last logits from f32 allowed for f16 compute. Measured on CPU
/// over five prompts of 7-38 tokens on both fixtures (logits up to ~24 in magnitude):
/// 0.029-0.047; "Hello there" on tiny: 0.039, on small: 0.036.
const F16_TOL: f32 = 0.15;
/// Same for bf16 (7 mantissa bits). Measured: 0.24-0.45; "Hello there" on tiny: 0.24,
/// on small: 0.31.
const BF16_TOL: f32 = 1.0;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

/// A per-test temporary folder, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> Self {
        let path =
            std::env::temp_dir().join(format!("tessera-weights-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// All tensors of a fixture's `model.safetensors`, as stored.
fn fixture_tensors(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name).join("model.safetensors"), &Device::Cpu).unwrap()
}

/// A snapshot folder `parent/name` with the fixture's non-weight files and no weights.
fn snapshot_without_weights(parent: &Path, name: &str, fixture_name: &str) -> PathBuf {
    let dir = parent.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for file in NON_WEIGHT_FILES {
        std::fs::copy(fixture(fixture_name).join(file), dir.join(file)).unwrap();
    }
    dir
}

/// A snapshot folder `parent/name` with the fixture's non-weight files and `tensors` as its
/// `model.safetensors`.
fn snapshot(
    parent: &Path,
    name: &str,
    fixture_name: &str,
    tensors: &HashMap<String, Tensor>,
) -> PathBuf {
    let dir = snapshot_without_weights(parent, name, fixture_name);
    candle_core::safetensors::save(tensors, dir.join("model.safetensors")).unwrap();
    dir
}

/// A short single-turn text prompt encoded with the chat template.
fn prompt_ids(tokenizer: &ChatTokenizer, text: &str) -> Vec<u32> {
    tokenizer
        .encode_conversation(&[Message::new(Role::User, text)], &[])
        .unwrap()
        .input_ids
}

const PROMPT: &str = "Hello there! Tell me, in a few short words, what the weather is like today.";

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap()
        .0
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// Runs `chunks` of ids one after the other through a fresh cache; returns the last logits
/// of every chunk.
fn run_chunks(lm: &LanguageModel, experts: &dyn ExpertBackend, chunks: &[&[u32]]) -> Vec<Vec<f32>> {
    let mut seq = OneSequence::new(lm, 64);
    chunks
        .iter()
        .map(|ids| {
            let embeds = lm.embed(ids).unwrap();
            seq.forward(lm, &embeds, experts, None).unwrap()
        })
        .collect()
}

/// Prefill then `steps` greedy decode steps; the logits of every step.
fn greedy_logits(pipeline: &Pipeline, ids: &[u32], steps: usize) -> Vec<Vec<f32>> {
    let lm = &pipeline.language;
    let mut seq = OneSequence::new(lm, ids.len() + steps);
    let mut out = Vec::new();
    let mut next: Vec<u32> = ids.to_vec();
    for _ in 0..=steps {
        let embeds = lm.embed(&next).unwrap();
        let logits = seq.forward(lm, &embeds, &pipeline.experts, None).unwrap();
        next = vec![argmax(&logits) as u32];
        out.push(logits);
    }
    assert_eq!(seq.len(), ids.len() + steps);
    out
}

fn shard_name(i: usize, n: usize) -> String {
    format!("model-{:05}-of-{n:05}.safetensors", i + 1)
}

#[test]
fn sharded_snapshot_loads_the_same_model_as_a_single_file() {
    let tmp = TempDir::new("sharded");
    let tensors = fixture_tensors(SMALL);
    let dir = snapshot_without_weights(tmp.path(), "sharded", SMALL);

    // Round-robin over the sorted names, so every layer's tensors span all three shards.
    const SHARDS: usize = 3;
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut shards: Vec<HashMap<String, Tensor>> = vec![HashMap::new(); SHARDS];
    let mut weight_map = BTreeMap::new();
    let mut total_size = 0usize;
    for (i, name) in names.iter().enumerate() {
        let t = &tensors[*name];
        total_size += t.elem_count() * t.dtype().size_in_bytes();
        shards[i % SHARDS].insert((*name).clone(), t.clone());
        weight_map.insert((*name).clone(), shard_name(i % SHARDS, SHARDS));
    }
    for (i, shard) in shards.iter().enumerate() {
        assert!(!shard.is_empty());
        candle_core::safetensors::save(shard, dir.join(shard_name(i, SHARDS))).unwrap();
    }
    let index = serde_json::json!({
        "metadata": { "total_size": total_size },
        "weight_map": weight_map,
    });
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&index).unwrap(),
    )
    .unwrap();
    // A stray safetensors file not named by the index, holding a conflicting tensor of the
    // wrong shape: the index decides which files are weights, so it must be ignored.
    let stray = HashMap::from([(
        "language.model.norm.weight".to_string(),
        Tensor::zeros(7, DType::F32, &Device::Cpu).unwrap(),
    )]);
    candle_core::safetensors::save(&stray, dir.join("zz-not-in-index.safetensors")).unwrap();
    assert!(!dir.join("model.safetensors").exists());

    // The checkpoint sees exactly the original tensors, with the original shapes.
    let original_ckpt = Checkpoint::open(&fixture(SMALL)).unwrap();
    let sharded_ckpt = Checkpoint::open(&dir).unwrap();
    assert_eq!(sharded_ckpt.names(), original_ckpt.names());
    assert_eq!(sharded_ckpt.names().len(), tensors.len());
    for name in original_ckpt.names() {
        assert_eq!(
            sharded_ckpt.shape(&name).unwrap(),
            original_ckpt.shape(&name).unwrap(),
            "{name}"
        );
    }
    assert_eq!(
        sharded_ckpt.shape("language.model.norm.weight").unwrap(),
        vec![256]
    );
    drop((original_ckpt, sharded_ckpt));

    let original = Pipeline::load(
        &fixture(SMALL),
        DType::F32,
        WeightFormat::Auto,
        &Device::Cpu,
    )
    .unwrap();
    let sharded = Pipeline::load(&dir, DType::F32, WeightFormat::Auto, &Device::Cpu).unwrap();
    assert_eq!(sharded.config, original.config);
    assert_eq!(sharded.experts.len(), original.experts.len());
    assert_eq!(sharded.experts.bytes(), original.experts.bytes());

    let ids = prompt_ids(&original.tokenizer, PROMPT);
    assert_eq!(prompt_ids(&sharded.tokenizer, PROMPT), ids);
    assert!(ids.len() >= 15, "prompt has {} tokens", ids.len());
    let want = greedy_logits(&original, &ids, 3);
    let got = greedy_logits(&sharded, &ids, 3);
    for (step, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            bits(g) == bits(w),
            "step {step}: sharded logits differ from single-file logits (max abs diff {})",
            max_abs_diff(g, w)
        );
    }
    drop((original, sharded));

    // A shard named by the index but absent is an error naming that file.
    let missing = shard_name(1, SHARDS);
    std::fs::remove_file(dir.join(&missing)).unwrap();
    let err = Pipeline::load(&dir, DType::F32, WeightFormat::Auto, &Device::Cpu).unwrap_err();
    assert!(
        err.to_string().contains(&missing),
        "error does not name the missing shard {missing}: {err}"
    );
}

#[test]
fn missing_tensor_is_reported_by_name() {
    let tmp = TempDir::new("missing");
    let name = "language.model.layers.1.self_attn.kv_b_proj.weight";
    let mut tensors = fixture_tensors(SMALL);
    assert!(tensors.remove(name).is_some(), "fixture has {name}");
    let dir = snapshot(tmp.path(), "missing", SMALL, &tensors);

    let ckpt = Checkpoint::open(&dir).unwrap();
    assert!(!ckpt.contains(name));
    assert!(ckpt.contains("language.model.layers.0.self_attn.kv_b_proj.weight"));
    assert!(matches!(ckpt.shape(name), Err(Error::MissingTensor { name: n }) if n == name));
    drop(ckpt);

    let err = Pipeline::load(&dir, DType::F32, WeightFormat::Auto, &Device::Cpu).unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(&err, Error::MissingTensor { name: n } if n == name),
        "expected MissingTensor {{ {name} }}, got {err:?}"
    );
    assert!(message.contains(name), "{message}");
}

#[test]
fn mis_shaped_tensor_is_reported_with_both_shapes() {
    let tmp = TempDir::new("misshaped");
    let name = "language.model.norm.weight";
    let mut tensors = fixture_tensors(SMALL);
    let hidden = tensors[name].dims1().unwrap();
    assert_eq!(hidden, 256);
    tensors.insert(
        name.to_string(),
        Tensor::ones(hidden - 1, DType::F32, &Device::Cpu).unwrap(),
    );
    let dir = snapshot(tmp.path(), "misshaped", SMALL, &tensors);

    let err = Pipeline::load(&dir, DType::F32, WeightFormat::Auto, &Device::Cpu).unwrap_err();
    let message = err.to_string();
    match &err {
        Error::TensorShape {
            name: n,
            expected,
            found,
        } => {
            assert_eq!(n, name);
            assert_eq!(expected, &vec![hidden]);
            assert_eq!(found, &vec![hidden - 1]);
        }
        other => panic!("expected TensorShape, got {other:?}"),
    }
    for needle in [name, "[256]", "[255]"] {
        assert!(message.contains(needle), "{needle:?} not in {message:?}");
    }
}

#[test]
fn selective_expert_loading_counts_and_bytes() {
    let dir = fixture(SMALL);
    let config = ModelConfig::from_dir(&dir).unwrap();
    let cfg = &config.language;
    let moe = cfg.moe.as_ref().unwrap();
    let ckpt = Checkpoint::open(&dir).unwrap();
    let target = LoadTarget {
        checkpoint: &ckpt,
        dtype: DType::F32,
        weights: WeightFormat::Auto,
        device: &Device::Cpu,
    };
    let per_expert = 3 * cfg.hidden_size * moe.moe_intermediate_size * 4;
    assert_eq!(per_expert, 3 * 256 * 96 * 4);

    let none = LocalExperts::load(cfg, target, &ExpertSelection::None).unwrap();
    assert_eq!(none.len(), 0);
    assert!(none.is_empty());
    assert_eq!(none.bytes(), 0);

    let only = LocalExperts::load(
        cfg,
        target,
        &ExpertSelection::Only(BTreeSet::from([(1, 0), (1, 3), (2, 5)])),
    )
    .unwrap();
    assert_eq!(only.len(), 3);
    assert_eq!(only.bytes(), 3 * per_expert);

    let all = LocalExperts::load(cfg, target, &ExpertSelection::All).unwrap();
    assert_eq!(cfg.moe_layers(), vec![1, 2]);
    assert_eq!(moe.n_routed_experts, 16);
    assert_eq!(all.len(), 2 * 16);
    assert_eq!(all.bytes(), 2 * 16 * per_expert);
}

#[test]
fn forward_with_missing_experts_fails_and_leaves_the_cache_unchanged() {
    let dir = fixture(SMALL);
    let config = ModelConfig::from_dir(&dir).unwrap();
    let cfg = &config.language;
    let tokenizer = ChatTokenizer::from_dir(&dir).unwrap();
    let ckpt = Checkpoint::open(&dir).unwrap();
    let target = LoadTarget {
        checkpoint: &ckpt,
        dtype: DType::F32,
        weights: WeightFormat::Auto,
        device: &Device::Cpu,
    };
    let lm = LanguageModel::load(cfg, target).unwrap();
    let all = LocalExperts::load(cfg, target, &ExpertSelection::All).unwrap();
    let loaded = BTreeSet::from([(1, 0), (1, 3), (2, 5)]);
    let partial = LocalExperts::load(cfg, target, &ExpertSelection::Only(loaded.clone())).unwrap();

    let ids = prompt_ids(&tokenizer, PROMPT);
    let split = ids.len() / 2;
    let (head, tail) = ids.split_at(split);

    // Which expert the partial backend will be asked for first: the routing of the tail
    // in the first MoE layer (layer 1), lowest expert id not loaded (experts run in id order).
    let mut seq = OneSequence::new(&lm, 64);
    seq.forward(&lm, &lm.embed(head).unwrap(), &all, None)
        .unwrap();
    let mut trace = ForwardTrace::default();
    seq.forward(&lm, &lm.embed(tail).unwrap(), &all, Some(&mut trace))
        .unwrap();
    let (layer, routing) = &trace.routing[0];
    assert_eq!(*layer, 1);
    let first_missing = routing
        .experts
        .iter()
        .map(|&e| e as usize)
        .filter(|&e| !loaded.contains(&(1, e)))
        .min()
        .expect("the prompt routes to experts that are not loaded");

    // Prefill the head with every expert, then run the tail with the partial backend.
    let mut seq = OneSequence::new(&lm, ids.len());
    seq.forward(&lm, &lm.embed(head).unwrap(), &all, None)
        .unwrap();
    let len_before = seq.len();
    assert_eq!(len_before, split);

    let err = seq
        .forward(&lm, &lm.embed(tail).unwrap(), &partial, None)
        .unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, Error::Experts(_)), "{err:?}");
    let want = format!("layer 1 expert {first_missing} is not loaded");
    assert!(message.contains(&want), "{want:?} not in {message:?}");
    assert_eq!(seq.len(), len_before);

    // With no routed experts at all the error names layer 1 as well.
    let none = LocalExperts::load(cfg, target, &ExpertSelection::None).unwrap();
    let err = seq
        .forward(&lm, &lm.embed(tail).unwrap(), &none, None)
        .unwrap_err();
    assert!(err.to_string().contains("layer 1 expert"), "{err}");
    assert_eq!(seq.len(), len_before);

    // The cache is usable after the failures: the same tail with every expert gives
    // exactly what an undisturbed run gives.
    let logits = seq
        .forward(&lm, &lm.embed(tail).unwrap(), &all, None)
        .unwrap();
    assert_eq!(seq.len(), ids.len());
    let want = run_chunks(&lm, &all, &[head, tail]);
    assert!(
        bits(&logits) == bits(&want[1]),
        "logits after failed forwards differ (max abs diff {})",
        max_abs_diff(&logits, &want[1])
    );
}

#[test]
fn routed_expert_tensors_are_only_read_when_selected() {
    let tmp = TempDir::new("no-experts");
    let full = fixture_tensors(SMALL);
    let is_routed = |name: &str| name.contains(".mlp.experts.");
    // 2 MoE layers × 16 experts × (gate, up, down).
    assert_eq!(full.keys().filter(|n| is_routed(n)).count(), 2 * 16 * 3);
    assert!(full.keys().any(|n| n.contains(".mlp.shared_experts.")));

    let stripped: HashMap<String, Tensor> = full
        .iter()
        .filter(|(n, _)| !is_routed(n))
        .map(|(n, t)| (n.clone(), t.clone()))
        .collect();
    let dir = snapshot(tmp.path(), "stripped", SMALL, &stripped);
    let config = ModelConfig::from_dir(&dir).unwrap();
    let cfg = &config.language;
    let ckpt = Checkpoint::open(&dir).unwrap();
    assert!(ckpt.names().iter().all(|n| !is_routed(n)));
    let target = LoadTarget {
        checkpoint: &ckpt,
        dtype: DType::F32,
        weights: WeightFormat::Auto,
        device: &Device::Cpu,
    };

    // The language model never asks for routed experts.
    let lm = LanguageModel::load(cfg, target).unwrap();
    let none = LocalExperts::load(cfg, target, &ExpertSelection::None).unwrap();
    assert!(none.is_empty());
    let err = LocalExperts::load(cfg, target, &ExpertSelection::All).unwrap_err();
    let first = "language.model.layers.1.mlp.experts.0.gate_proj.weight";
    assert!(
        matches!(&err, Error::MissingTensor { name } if name == first),
        "expected MissingTensor {{ {first} }}, got {err:?}"
    );
    assert!(err.to_string().contains(first), "{err}");
    let err = Pipeline::load(&dir, DType::F32, WeightFormat::Auto, &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains(".mlp.experts."), "{err}");

    // The model loaded without routed experts is the full model's: with the experts of the
    // original snapshot it gives bitwise the same logits.
    let original = Pipeline::load(
        &fixture(SMALL),
        DType::F32,
        WeightFormat::Auto,
        &Device::Cpu,
    )
    .unwrap();
    let ids = prompt_ids(&original.tokenizer, PROMPT);
    let want = run_chunks(&original.language, &original.experts, &[&ids]);
    let got = run_chunks(&lm, &original.experts, &[&ids]);
    assert!(bits(&got[0]) == bits(&want[0]));

    // A snapshot holding only some experts serves exactly that selection.
    let selected = BTreeSet::from([(1, 0), (1, 3), (2, 5)]);
    let keep = |name: &str| {
        !is_routed(name)
            || selected.iter().any(|(l, e)| {
                name.starts_with(&format!("language.model.layers.{l}.mlp.experts.{e}."))
            })
    };
    let partial: HashMap<String, Tensor> = full
        .iter()
        .filter(|(n, _)| keep(n))
        .map(|(n, t)| (n.clone(), t.clone()))
        .collect();
    assert_eq!(partial.len(), stripped.len() + 3 * 3);
    let dir = snapshot(tmp.path(), "partial", SMALL, &partial);
    let ckpt = Checkpoint::open(&dir).unwrap();
    let target = LoadTarget {
        checkpoint: &ckpt,
        dtype: DType::F32,
        weights: WeightFormat::Auto,
        device: &Device::Cpu,
    };
    LanguageModel::load(cfg, target).unwrap();
    let experts = LocalExperts::load(cfg, target, &ExpertSelection::Only(selected)).unwrap();
    assert_eq!(experts.len(), 3);
    let err = LocalExperts::load(cfg, target, &ExpertSelection::All).unwrap_err();
    assert!(
        err.to_string()
            .contains("language.model.layers.1.mlp.experts.1.gate_proj.weight"),
        "{err}"
    );
}

#[test]
fn reduced_precision_dtypes_track_f32() {
    for name in [TINY, SMALL] {
        check_dtypes(name);
    }
}

fn check_dtypes(name: &str) {
    let dir = fixture(name);
    let reference = Pipeline::load(&dir, DType::F32, WeightFormat::Auto, &Device::Cpu).unwrap();
    assert_eq!(reference.language.dtype(), DType::F32);
    let ids = prompt_ids(&reference.tokenizer, "Hello there");
    let want = run_chunks(&reference.language, &reference.experts, &[&ids]).remove(0);
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    let f32_cache = reference
        .language
        .new_paged_cache(16)
        .unwrap()
        .allocated_bytes();

    for (dtype, tol) in [(DType::F16, F16_TOL), (DType::BF16, BF16_TOL)] {
        let p = Pipeline::load(&dir, dtype, WeightFormat::Auto, &Device::Cpu).unwrap();
        assert_eq!(p.language.dtype(), dtype);
        assert_eq!(p.experts.len(), reference.experts.len());
        assert_eq!(p.experts.bytes() * 2, reference.experts.bytes());
        assert_eq!(
            p.language.new_paged_cache(16).unwrap().allocated_bytes() * 2,
            f32_cache
        );
        let got = run_chunks(&p.language, &p.experts, &[&ids]).remove(0);
        assert!(
            got.iter().all(|x| x.is_finite()),
            "{dtype:?}: non-finite logits"
        );
        let diff = max_abs_diff(&got, &want);
        println!(
            "{name} {dtype:?}: max abs diff of last logits vs f32 = {diff} (max |logit| {scale}, \
             argmax {} vs {}, {} prompt tokens)",
            argmax(&got),
            argmax(&want),
            ids.len()
        );
        assert!(
            diff < tol,
            "{name} {dtype:?}: max abs diff {diff} >= {tol} (max |logit| {scale})"
        );
        if dtype == DType::F16 {
            assert_eq!(argmax(&got), argmax(&want), "{name}: f16 argmax");
        }
    }
}

#[test]
fn fingerprints_tell_snapshots_apart_and_are_stable() {
    let tiny = fixture("tiny-mha-softmax");
    let small = fixture("small-mla-softmax");
    let a = tessera_model::fingerprint(&tiny).unwrap();
    assert_eq!(a.len(), 16);
    assert!(a.chars().all(|c| c.is_ascii_hexdigit()), "{a}");
    assert_eq!(a, tessera_model::fingerprint(&tiny).unwrap());
    assert_ne!(a, tessera_model::fingerprint(&small).unwrap());
    let err = tessera_model::fingerprint(&tiny.join("no-such-dir")).unwrap_err();
    assert!(err.to_string().contains("config.json"), "{err}");
}

#[test]
fn the_language_model_loads_no_routed_expert_and_the_checkpoint_says_so() {
    let dir = fixture("small-mla-softmax");
    let cfg = ModelConfig::from_dir(&dir).unwrap();
    let checkpoint = Checkpoint::open(&dir).unwrap();
    let device = Device::Cpu;
    let target = LoadTarget {
        checkpoint: &checkpoint,
        dtype: DType::F32,
        weights: WeightFormat::Auto,
        device: &device,
    };
    let is_routed = |n: &String| n.contains(".mlp.experts.");
    LanguageModel::load(&cfg.language, target).unwrap();
    let loaded = checkpoint.loaded();
    assert!(loaded.iter().any(|n| n.contains("self_attn")), "{loaded:?}");
    assert_eq!(loaded.iter().filter(|n| is_routed(n)).count(), 0);
    // The record would show routed experts had they been loaded.
    let only = ExpertSelection::Only([(cfg.language.moe_layers()[0], 3)].into_iter().collect());
    LocalExperts::load(&cfg.language, target, &only).unwrap();
    let routed: Vec<String> = checkpoint.loaded().into_iter().filter(is_routed).collect();
    assert_eq!(routed.len(), 3, "{routed:?}"); // gate, up and down of one expert
}
