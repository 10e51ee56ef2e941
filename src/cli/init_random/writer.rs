//! Writes random tensors as safetensors, one tensor in memory at a time: a single
//! `model.safetensors`, or shards with `model.safetensors.index.json` (the Hugging Face
//! layout) when the checkpoint is larger than the shard limit.
//!
//! Values are a pure function of (seed, tensor name, position), so the same seed writes
//! the same bytes whatever the thread count or the sharding.

use std::borrow::Cow;
use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use safetensors::{Dtype, View};

use super::tensors::{Init, TensorSpec};

/// Values per independently seeded block (the unit of parallel work).
const BLOCK: usize = 1 << 20;

/// Precision of the stored values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredDtype {
    Bf16,
    F16,
    F32,
}

impl StoredDtype {
    /// Bytes per value.
    pub fn size(self) -> usize {
        match self {
            Self::Bf16 | Self::F16 => 2,
            Self::F32 => 4,
        }
    }

    /// The `torch_dtype` spelling of `config.json`.
    pub fn torch_name(self) -> &'static str {
        match self {
            Self::Bf16 => "bfloat16",
            Self::F16 => "float16",
            Self::F32 => "float32",
        }
    }

    fn safetensors(self) -> Dtype {
        match self {
            Self::Bf16 => Dtype::BF16,
            Self::F16 => Dtype::F16,
            Self::F32 => Dtype::F32,
        }
    }

    /// Little-endian bytes of `x` in this precision, written into `out`.
    fn put(self, x: f32, out: &mut [u8]) {
        match self {
            Self::Bf16 => out.copy_from_slice(&half::bf16::from_f32(x).to_le_bytes()),
            Self::F16 => out.copy_from_slice(&half::f16::from_f32(x).to_le_bytes()),
            Self::F32 => out.copy_from_slice(&x.to_le_bytes()),
        }
    }
}

/// SplitMix64: tiny, fast and good enough for weights nobody will train.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.0)
    }
}

fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The stream seed of one tensor: FNV-1a of its name, mixed with the run's seed.
fn tensor_seed(seed: u64, name: &str) -> u64 {
    let fnv = name.bytes().fold(0xCBF2_9CE4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3)
    });
    mix64(fnv ^ mix64(seed))
}

/// A bell-shaped value with mean 0 and variance 1 from 64 random bits: the sum of four
/// 16-bit uniforms (Irwin–Hall), centred and scaled. Bounded at ±2√3.
fn unit_normal(bits: u64) -> f32 {
    let sum: f32 = (0..4)
        .map(|i| ((bits >> (16 * i)) & 0xFFFF) as f32 + 0.5)
        .sum();
    (sum / 65536.0 - 2.0) * 3f32.sqrt()
}

/// Fills `out` (whole values of `dtype`) with `std`-scaled noise, block by block.
fn fill_normal(out: &mut [u8], dtype: StoredDtype, std: f32, seed: u64) {
    let size = dtype.size();
    let mut blocks: Vec<(usize, &mut [u8])> = out.chunks_mut(BLOCK * size).enumerate().collect();
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(blocks.len());
    let fill_block = |index: usize, block: &mut [u8]| {
        let mut rng = SplitMix64(mix64(
            seed ^ (index as u64).wrapping_mul(0xA24B_AED4_963E_E407),
        ));
        for value in block.chunks_exact_mut(size) {
            dtype.put(unit_normal(rng.next()) * std, value);
        }
    };
    if threads <= 1 {
        blocks.iter_mut().for_each(|(i, b)| fill_block(*i, b));
        return;
    }
    let per_thread = blocks.len().div_ceil(threads);
    std::thread::scope(|scope| {
        for group in blocks.chunks_mut(per_thread) {
            scope.spawn(|| group.iter_mut().for_each(|(i, b)| fill_block(*i, b)));
        }
    });
}

/// The bytes of one tensor.
fn tensor_bytes(spec: &TensorSpec, dtype: StoredDtype, seed: u64) -> Vec<u8> {
    let size = dtype.size();
    let mut out = vec![0u8; spec.numel() * size];
    match spec.init {
        // +0.0 is all zero bits in every stored dtype.
        Init::Zeros => {}
        Init::Ones => out
            .chunks_exact_mut(size)
            .for_each(|value| dtype.put(1.0, value)),
        Init::Normal { std } => fill_normal(&mut out, dtype, std, tensor_seed(seed, &spec.name)),
    }
    out
}

/// Progress on stderr: a line every tenth of the bytes and one per finished file.
struct Progress {
    total_bytes: u64,
    total_tensors: usize,
    bytes: Cell<u64>,
    tensors: Cell<usize>,
    next_tenth: Cell<u64>,
    start: Instant,
}

impl Progress {
    fn new(total_bytes: u64, total_tensors: usize) -> Self {
        Self {
            total_bytes,
            total_tensors,
            bytes: Cell::new(0),
            tensors: Cell::new(0),
            next_tenth: Cell::new(1),
            start: Instant::now(),
        }
    }

    fn tensor_done(&self, bytes: usize) {
        self.bytes.set(self.bytes.get() + bytes as u64);
        self.tensors.set(self.tensors.get() + 1);
        let reached = |tenth: u64| tenth <= 10 && self.bytes.get() * 10 >= self.total_bytes * tenth;
        if reached(self.next_tenth.get()) {
            while reached(self.next_tenth.get()) {
                self.next_tenth.set(self.next_tenth.get() + 1);
            }
            eprintln!(
                "  {:>3}%  {} of {}, {} of {} tensors, {:.0} s",
                self.bytes.get() * 100 / self.total_bytes.max(1),
                human_bytes(self.bytes.get()),
                human_bytes(self.total_bytes),
                self.tensors.get(),
                self.total_tensors,
                self.start.elapsed().as_secs_f64()
            );
        }
    }
}

/// A tensor whose bytes are drawn only when the serializer asks for them.
struct LazyTensor<'a> {
    spec: &'a TensorSpec,
    dtype: StoredDtype,
    seed: u64,
    progress: &'a Progress,
}

impl View for LazyTensor<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype.safetensors()
    }

    fn shape(&self) -> &[usize] {
        &self.spec.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        let bytes = tensor_bytes(self.spec, self.dtype, self.seed);
        self.progress.tensor_done(bytes.len());
        Cow::Owned(bytes)
    }

    fn data_len(&self) -> usize {
        self.spec.numel() * self.dtype.size()
    }
}

/// Splits `specs` (in order) into shards of at most `max_bytes` of tensor data; a tensor
/// larger than the limit gets a shard of its own.
pub fn plan_shards(specs: &[TensorSpec], dtype: StoredDtype, max_bytes: u64) -> Vec<&[TensorSpec]> {
    let mut shards = Vec::new();
    let (mut start, mut bytes) = (0, 0u64);
    for (i, spec) in specs.iter().enumerate() {
        let size = (spec.numel() * dtype.size()) as u64;
        if i > start && bytes + size > max_bytes {
            shards.push(&specs[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += size;
    }
    if start < specs.len() {
        shards.push(&specs[start..]);
    }
    shards
}

/// How the weights are written.
#[derive(Debug, Clone)]
pub struct WeightOptions {
    pub dtype: StoredDtype,
    pub seed: u64,
    pub max_shard_bytes: u64,
    /// Extra `__metadata__` entries of every file (besides `format: pt`).
    pub metadata: HashMap<String, String>,
}

/// What was written.
#[derive(Debug)]
pub struct WrittenWeights {
    /// File names in `dir`, weights first, the index last when sharded.
    pub files: Vec<String>,
    /// Bytes of all files written.
    pub bytes: u64,
}

/// Writes `specs` into `dir` as `model.safetensors`, or as
/// `model-0000i-of-0000n.safetensors` shards plus `model.safetensors.index.json`.
pub fn write_weights(
    dir: &Path,
    specs: &[TensorSpec],
    opts: &WeightOptions,
) -> anyhow::Result<WrittenWeights> {
    let shards = plan_shards(specs, opts.dtype, opts.max_shard_bytes);
    let data_bytes: u64 = specs
        .iter()
        .map(|s| (s.numel() * opts.dtype.size()) as u64)
        .sum();
    let progress = Progress::new(data_bytes, specs.len());
    let mut metadata = opts.metadata.clone();
    metadata.insert("format".into(), "pt".into());
    let n = shards.len();
    let mut files = Vec::with_capacity(n + 1);
    let mut weight_map = BTreeMap::new();
    let mut bytes = 0;
    for (i, shard) in shards.iter().enumerate() {
        let name = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", i + 1)
        };
        let path = dir.join(&name);
        let tensors = shard.iter().map(|spec| {
            let view = LazyTensor {
                spec,
                dtype: opts.dtype,
                seed: opts.seed,
                progress: &progress,
            };
            (spec.name.as_str(), view)
        });
        // The serializer renames a private temporary file into place; give the result
        // the permissions of an ordinary new file instead.
        let permissions = std::fs::File::create(&path)
            .and_then(|f| f.metadata())
            .with_context(|| format!("cannot create {}", path.display()))?
            .permissions();
        safetensors::serialize_to_file(tensors, Some(metadata.clone()), &path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        std::fs::set_permissions(&path, permissions)
            .with_context(|| format!("cannot set the permissions of {}", path.display()))?;
        bytes += file_len(&path)?;
        if n > 1 {
            eprintln!("  wrote {name}");
        }
        for spec in *shard {
            weight_map.insert(spec.name.clone(), name.clone());
        }
        files.push(name);
    }
    if n > 1 {
        let index = serde_json::json!({
            "metadata": { "total_size": data_bytes },
            "weight_map": weight_map,
        });
        let name = "model.safetensors.index.json".to_string();
        let path = dir.join(&name);
        std::fs::write(&path, serde_json::to_string_pretty(&index)? + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
        bytes += file_len(&path)?;
        files.push(name);
    }
    Ok(WrittenWeights { files, bytes })
}

fn file_len(path: &Path) -> anyhow::Result<u64> {
    Ok(std::fs::metadata(path)
        .with_context(|| format!("cannot stat {}", path.display()))?
        .len())
}

/// `1.24 GB`-style sizes (powers of 1000, as disk sizes are quoted).
pub fn human_bytes(bytes: u64) -> String {
    let b = bytes as f64;
    match bytes {
        0..1_000_000 => format!("{:.1} kB", b / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} MB", b / 1e6),
        _ => format!("{:.2} GB", b / 1e9),
    }
}

pub use tessera_runtime::memory::parse_size;

#[cfg(test)]
mod tests {
    use super::super::tensors::Use;
    use super::*;

    fn spec(name: &str, shape: &[usize], init: Init) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            shape: shape.to_vec(),
            init,
            usage: Use::Always,
        }
    }

    #[test]
    fn noise_has_the_requested_spread_and_is_reproducible() {
        let s = spec("w", &[3 * BLOCK + 17], Init::Normal { std: 0.02 });
        let bytes = tensor_bytes(&s, StoredDtype::F32, 7);
        assert_eq!(bytes, tensor_bytes(&s, StoredDtype::F32, 7));
        assert_ne!(bytes, tensor_bytes(&s, StoredDtype::F32, 8));
        let values: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let n = values.len() as f64;
        let mean = values.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let var = values
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / n;
        assert!(mean.abs() < 1e-4, "mean {mean}");
        assert!((var.sqrt() - 0.02).abs() < 2e-4, "std {}", var.sqrt());
        assert!(values.iter().all(|v| v.abs() <= 0.02 * 3.47));
    }

    #[test]
    fn ones_and_zeros_are_exact_in_every_dtype() {
        for dtype in [StoredDtype::Bf16, StoredDtype::F16, StoredDtype::F32] {
            let ones = tensor_bytes(&spec("n", &[5], Init::Ones), dtype, 0);
            let mut one = vec![0u8; dtype.size()];
            dtype.put(1.0, &mut one);
            assert_eq!(ones, one.repeat(5));
            assert!(
                tensor_bytes(&spec("b", &[5], Init::Zeros), dtype, 0)
                    .iter()
                    .all(|&b| b == 0)
            );
        }
    }

    #[test]
    fn shards_respect_the_limit_and_keep_order() {
        let specs: Vec<TensorSpec> = [40, 30, 50, 200, 10]
            .iter()
            .enumerate()
            .map(|(i, &n)| spec(&format!("t{i}"), &[n], Init::Zeros))
            .collect();
        let sizes: Vec<Vec<&str>> = plan_shards(&specs, StoredDtype::F32, 300)
            .iter()
            .map(|s| s.iter().map(|t| t.name.as_str()).collect())
            .collect();
        assert_eq!(
            sizes,
            [vec!["t0", "t1"], vec!["t2"], vec!["t3"], vec!["t4"]]
        );
        assert_eq!(plan_shards(&specs, StoredDtype::F32, u64::MAX).len(), 1);
    }
}
