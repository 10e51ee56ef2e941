//! Reading a Hugging Face snapshot's safetensors (the released layout).
//!
//! A [`Checkpoint`] reads the headers of every `*.safetensors` file of a snapshot (a
//! single `model.safetensors`, or the shards named by `model.safetensors.index.json`).
//! Parts of the model then load exactly the tensors they need by name, each read from
//! its file straight into the buffer the process keeps (no mapping, so a loaded
//! tensor's bytes are counted once in the process's memory and the page cache keeps the
//! files), and a process that does not need the routed experts never reads their bytes.
//!
//! How linear weights are held is the [`WeightFormat`] (`--weights`); everything else
//! (norms, biases, position embeddings, the MoE gate) is held in the compute dtype.
//!
//! Loading reports its progress on stderr: a line per checkpoint that counts the shards
//! and bytes read when stderr is a terminal that logs nothing at `info` (log lines would
//! tear it), else an `info` event per shard reached and one when the checkpoint closes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::{IsTerminal, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::error::{Error, Result, read_json};
use crate::linear::Linear;

/// How a process holds the weights of its linear layers (`--weights`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    /// As the checkpoint stores them (bf16 for the released models) when computing in
    /// f32; in the compute dtype otherwise.
    #[default]
    Auto,
    F32,
    Bf16,
    F16,
    /// 8-bit integers with one f32 scale per block of 32 along each row, quantized at
    /// load (about 1.13 bytes per weight).
    Int8,
}

impl WeightFormat {
    /// Every format, as written on the command line.
    pub const NAMES: [&'static str; 5] = ["auto", "f32", "bf16", "f16", "int8"];

    /// The dtype a dense linear weight stored as `stored` is held in, computing in
    /// `compute`; `None` for [`WeightFormat::Int8`].
    pub fn dense_dtype(self, stored: DType, compute: DType) -> Option<DType> {
        match self {
            Self::Auto if compute == DType::F32 && matches!(stored, DType::BF16 | DType::F16) => {
                Some(stored)
            }
            Self::Auto => Some(compute),
            Self::F32 => Some(DType::F32),
            Self::Bf16 => Some(DType::BF16),
            Self::F16 => Some(DType::F16),
            Self::Int8 => None,
        }
    }
}

impl std::str::FromStr for WeightFormat {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            "f16" => Ok(Self::F16),
            "int8" => Ok(Self::Int8),
            other => Err(format!(
                "unknown weight format {other:?}: expected one of {}",
                Self::NAMES.join(", ")
            )),
        }
    }
}

impl std::fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let i = match self {
            Self::Auto => 0,
            Self::F32 => 1,
            Self::Bf16 => 2,
            Self::F16 => 3,
            Self::Int8 => 4,
        };
        f.write_str(Self::NAMES[i])
    }
}

/// Where one tensor lies in its file.
#[derive(Debug, Clone)]
struct Entry {
    shard: usize,
    /// The safetensors dtype name (`BF16`, `F32`, …).
    dtype: String,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    start: u64,
    end: u64,
}

/// The weights of one snapshot folder: every file's header, read once.
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<PathBuf>,
    handles: Vec<File>,
    entries: HashMap<String, Entry>,
    /// Names of the tensors loaded so far (what this process holds from it).
    loaded: Mutex<BTreeSet<String>>,
    progress: Mutex<LoadProgress>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

impl Checkpoint {
    /// Opens the safetensors of a snapshot folder: the shards listed in
    /// `model.safetensors.index.json` when present, else `model.safetensors`, else every
    /// `*.safetensors` file in the folder.
    pub fn open(dir: &Path) -> Result<Self> {
        let files = Self::weight_files(dir)?;
        let mut handles = Vec::with_capacity(files.len());
        let mut entries = HashMap::new();
        for (shard, f) in files.iter().enumerate() {
            if !f.is_file() {
                return Err(Error::io(
                    f,
                    std::io::Error::new(std::io::ErrorKind::NotFound, "weight file not found"),
                ));
            }
            let mut file = File::open(f).map_err(|e| Error::io(f, e))?;
            for (name, entry) in read_header(f, &mut file, shard)? {
                entries.insert(name, entry);
            }
            handles.push(file);
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
            handles,
            entries,
            loaded: Mutex::default(),
            progress: Mutex::default(),
        })
    }

    fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
        let index = dir.join("model.safetensors.index.json");
        if index.is_file() {
            let idx: ShardIndex = read_json(&index)?;
            let shards: BTreeSet<&String> = idx.weight_map.values().collect();
            return Ok(shards.into_iter().map(|s| dir.join(s)).collect());
        }
        let single = dir.join("model.safetensors");
        if single.is_file() {
            return Ok(vec![single]);
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(Error::io(
                dir,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no model.safetensors, model.safetensors.index.json or *.safetensors in this folder",
                ),
            ));
        }
        Ok(files)
    }

    /// The snapshot folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the checkpoint has a tensor of this name.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.entries.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
        })
    }

    /// The stored shape of a tensor, or an error naming it.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.entry(name)?.shape.clone())
    }

    /// The stored dtype of a tensor, or an error naming it (or its unsupported dtype).
    pub fn stored_dtype(&self, name: &str) -> Result<DType> {
        let entry = self.entry(name)?;
        candle_dtype(&entry.dtype).ok_or_else(|| Error::TensorDtype {
            name: name.to_string(),
            dtype: entry.dtype.clone(),
        })
    }

    /// Every tensor name in the checkpoint, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.entries.keys().cloned().collect();
        names.sort();
        names
    }

    /// `(name, stored dtype, shape)` of every tensor, sorted by name.
    pub fn layout(&self) -> Vec<(String, String, Vec<usize>)> {
        let mut layout: Vec<(String, String, Vec<usize>)> = self
            .entries
            .iter()
            .map(|(name, e)| (name.clone(), e.dtype.clone(), e.shape.clone()))
            .collect();
        layout.sort();
        layout
    }

    /// The names of every tensor loaded through this checkpoint so far, sorted: what a
    /// process took from the snapshot (e.g. a scheduler: no routed experts).
    pub fn loaded(&self) -> Vec<String> {
        self.loaded
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }

    /// Loads one tensor, checking its shape, converted to `dtype` on `device`.
    pub fn tensor(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        Ok(self.stored(name, shape, device)?.to_dtype(dtype)?)
    }

    /// Loads one tensor in its stored dtype, checking its shape: read from the file
    /// straight into the tensor's buffer.
    pub fn stored(&self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        let rows = shape.first().copied().unwrap_or(1);
        self.stored_rows(name, shape, 0..rows, device)
    }

    /// Rows `rows` (along the first dimension) of the tensor `name` of shape `shape`, in
    /// its stored dtype: (rows.len(), shape[1..]). Reading a tensor a block of rows at a
    /// time lets a caller lay it out anew without a second whole copy; the tensor counts
    /// as loaded (and its bytes as read) when its first row is read.
    pub fn stored_rows(
        &self,
        name: &str,
        shape: &[usize],
        rows: std::ops::Range<usize>,
        device: &Device,
    ) -> Result<Tensor> {
        let dtype = self.stored_dtype(name)?;
        let mut block = shape.to_vec();
        if let Some(first) = block.first_mut() {
            *first = rows.len();
        }
        let block = block.as_slice();
        Ok(match dtype {
            DType::BF16 => Tensor::from_vec(
                self.stored_values::<bf16>(name, shape, rows)?,
                block,
                device,
            )?,
            DType::F16 => {
                Tensor::from_vec(self.stored_values::<f16>(name, shape, rows)?, block, device)?
            }
            DType::F32 => {
                Tensor::from_vec(self.stored_values::<f32>(name, shape, rows)?, block, device)?
            }
            _ => Tensor::from_raw_buffer(
                &self.stored_values::<u8>(name, shape, rows)?,
                dtype,
                block,
                device,
            )?,
        })
    }

    /// Rows `rows` of the tensor `name` as stored, read straight into a vector of `T`:
    /// the stored element type itself, or `u8` for the raw bytes.
    pub fn stored_values<T: bytemuck::Pod>(
        &self,
        name: &str,
        shape: &[usize],
        rows: std::ops::Range<usize>,
    ) -> Result<Vec<T>> {
        let entry = self.entry(name)?;
        if entry.shape != shape {
            return Err(Error::TensorShape {
                name: name.to_string(),
                expected: shape.to_vec(),
                found: entry.shape.clone(),
            });
        }
        let dtype = self.stored_dtype(name)?;
        let size = size_of::<T>();
        if size != 1 && size != dtype.size_in_bytes() {
            return Err(Error::Request(format!(
                "tensor {name} is stored as {dtype:?}, not as {size}-byte values"
            )));
        }
        let len: usize = shape.iter().product();
        let bytes = entry.end - entry.start;
        if bytes != (len * dtype.size_in_bytes()) as u64 {
            return Err(self.corrupt(
                entry.shard,
                format!("tensor {name} has {bytes} bytes for its shape {shape:?}"),
            ));
        }
        let all_rows = shape.first().copied().unwrap_or(1);
        if rows.start > rows.end || rows.end > all_rows {
            return Err(Error::Request(format!(
                "rows {rows:?} of tensor {name} with {all_rows} rows"
            )));
        }
        let row_bytes = (len / all_rows.max(1)) * dtype.size_in_bytes();
        let offset = entry.start + (rows.start * row_bytes) as u64;
        // safetensors stores little-endian values, as every host Tessera runs on.
        let mut values = vec![T::zeroed(); rows.len() * row_bytes / size];
        self.handles[entry.shard]
            .read_exact_at(bytemuck::cast_slice_mut(&mut values), offset)
            .map_err(|e| Error::io(&self.files[entry.shard], e))?;
        if rows.start > 0 {
            return Ok(values);
        }
        self.loaded
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_string());
        self.progress
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .record(&self.files, entry.shard, bytes as usize);
        Ok(values)
    }

    fn corrupt(&self, shard: usize, what: String) -> Error {
        Error::io(
            &self.files[shard],
            std::io::Error::new(std::io::ErrorKind::InvalidData, what),
        )
    }
}

/// The candle dtype of a safetensors dtype name, for the ones candle holds.
fn candle_dtype(name: &str) -> Option<DType> {
    Some(match name {
        "BF16" => DType::BF16,
        "F16" => DType::F16,
        "F32" => DType::F32,
        "F64" => DType::F64,
        "I64" => DType::I64,
        "U32" => DType::U32,
        "U8" => DType::U8,
        _ => return None,
    })
}

#[derive(serde::Deserialize)]
struct HeaderEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

/// The tensors a safetensors file's header (its first 8 + N bytes) describes, with
/// their byte ranges checked against the file's length.
fn read_header(path: &Path, file: &mut File, shard: usize) -> Result<Vec<(String, Entry)>> {
    let bad = |what: String| {
        Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidData, what),
        )
    };
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|e| Error::io(path, e))?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 || 8 + len > file_len {
        return Err(bad(format!(
            "the safetensors header claims {len} bytes in a file of {file_len}"
        )));
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header)
        .map_err(|e| Error::io(path, e))?;
    let mut header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|_| bad("the safetensors header is not a JSON object".into()))?;
    header.remove("__metadata__");
    let data = 8 + len;
    header
        .into_iter()
        .map(|(name, value)| {
            let e: HeaderEntry = serde_json::from_value(value)
                .map_err(|err| bad(format!("tensor {name} in the header: {err}")))?;
            let [a, b] = e.data_offsets;
            if a > b || data + b > file_len {
                return Err(bad(format!(
                    "tensor {name} lies at bytes {a}..{b} of a data section of {}",
                    file_len - data
                )));
            }
            let entry = Entry {
                shard,
                dtype: e.dtype,
                shape: e.shape,
                start: data + a,
                end: data + b,
            };
            Ok((name, entry))
        })
        .collect()
}

impl Drop for Checkpoint {
    fn drop(&mut self) {
        self.progress
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .finish(&self.dir, self.files.len());
    }
}

/// Every load bar of the process, one line each (services load side by side).
fn bars() -> &'static MultiProgress {
    static BARS: OnceLock<MultiProgress> = OnceLock::new();
    BARS.get_or_init(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()))
}

/// How much of a checkpoint has been read: shown as it grows, summed up at the end.
#[derive(Default)]
struct LoadProgress {
    started: Option<Instant>,
    tensors: usize,
    bytes: u64,
    shards: BTreeSet<usize>,
    /// The terminal's line; `None` until the first tensor or when stderr is not one.
    bar: Option<ProgressBar>,
}

impl LoadProgress {
    fn record(&mut self, files: &[PathBuf], shard: usize, bytes: usize) {
        if self.started.is_none() {
            self.started = Some(Instant::now());
            if std::io::stderr().is_terminal() && !tracing::enabled!(tracing::Level::INFO) {
                let bar = bars().add(ProgressBar::new_spinner());
                bar.set_style(
                    ProgressStyle::with_template("{spinner} loading weights [{msg}] {elapsed}")
                        .expect("a valid template"),
                );
                self.bar = Some(bar);
            }
        }
        self.tensors += 1;
        self.bytes += bytes as u64;
        let first_of_shard = self.shards.insert(shard);
        match &self.bar {
            Some(bar) => bar.set_message(format!(
                "shard {}/{}, {}",
                shard + 1,
                files.len(),
                gigabytes(self.bytes)
            )),
            None if first_of_shard => tracing::info!(
                shard = shard + 1,
                shards = files.len(),
                file = %files[shard].file_name().unwrap_or_default().to_string_lossy(),
                "loading weights"
            ),
            None => {}
        }
    }

    fn finish(&mut self, dir: &Path, n_shards: usize) {
        let Some(started) = self.started else {
            return;
        };
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
            bars().remove(&bar);
        }
        tracing::info!(
            model = %dir.display(),
            tensors = self.tensors,
            size = %gigabytes(self.bytes),
            shards = format!("{}/{n_shards}", self.shards.len()),
            seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
            "weights loaded"
        );
    }
}

fn gigabytes(bytes: u64) -> String {
    format!("{:.2} GB", bytes as f64 / 1e9)
}

/// Where and in which precision a part of the model is loaded.
#[derive(Debug, Clone, Copy)]
pub struct LoadTarget<'a> {
    pub checkpoint: &'a Checkpoint,
    /// The compute dtype (activations, norms, biases).
    pub dtype: DType,
    /// How linear weights are held.
    pub weights: WeightFormat,
    pub device: &'a Device,
}

impl<'a> LoadTarget<'a> {
    /// Computing in `dtype` on `device`, linear weights held as `weights`.
    pub fn new(
        checkpoint: &'a Checkpoint,
        dtype: DType,
        weights: WeightFormat,
        device: &'a Device,
    ) -> Self {
        Self {
            checkpoint,
            dtype,
            weights,
            device,
        }
    }

    /// A loader for the tensors under `prefix` (joined with a dot).
    pub fn pp(&self, prefix: impl AsRef<str>) -> Weights<'a> {
        Weights {
            target: *self,
            prefix: prefix.as_ref().to_string(),
        }
    }
}

/// Loads tensors below a name prefix, like candle's `VarBuilder` but only for names asked for.
#[derive(Debug, Clone)]
pub struct Weights<'a> {
    target: LoadTarget<'a>,
    prefix: String,
}

impl<'a> Weights<'a> {
    /// A loader one level deeper: `prefix.name`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Weights<'a> {
        Weights {
            target: self.target,
            prefix: self.path(&name.to_string()),
        }
    }

    fn path(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// Loads `prefix.name` with the given shape, in the compute dtype.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.get_as(name, shape, self.target.dtype)
    }

    /// Loads `prefix.name` with the given shape, in an explicit dtype (e.g. f32 for gates).
    pub fn get_as(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        self.target
            .checkpoint
            .tensor(&self.path(name), shape, dtype, self.target.device)
    }

    /// Loads the weight `prefix.name` of a linear layer as [`WeightFormat`] says, from
    /// its stored dtype (a bf16 tensor kept as bf16 is never widened). `shape` is the
    /// stored shape; the layer is (`shape[0]`, the product of the rest), so a
    /// convolution kernel (out, c, kh, kw) becomes the matrix of its patch product.
    pub fn linear(&self, name: &str, shape: &[usize]) -> Result<Linear> {
        let t = &self.target;
        let path = self.path(name);
        let stored = t.checkpoint.stored(&path, shape, t.device)?;
        let out = shape.first().copied().unwrap_or(1);
        let stored = stored.reshape((out, stored.elem_count() / out.max(1)))?;
        Ok(match t.weights.dense_dtype(stored.dtype(), t.dtype) {
            Some(dtype) => Linear::new(stored.to_dtype(dtype)?)?,
            None => Linear::int8(&stored)?,
        })
    }

    /// As [`linear`](Self::linear), packed for the outer-product kernel
    /// ([`crate::linear::packed`]) where it runs: for a layer that meets from one to a
    /// few dozen rows of `x` at a time (the LM head). The tensor is read a block of rows
    /// at a time into the packed layout, so loading holds no second copy of it. Int8,
    /// a compute dtype other than f32, another device or a CPU without AVX-512F load
    /// the ordinary layout.
    pub fn linear_packed(&self, name: &str, shape: &[usize]) -> Result<Linear> {
        let t = &self.target;
        let path = self.path(name);
        let stored = t.checkpoint.stored_dtype(&path)?;
        let dtype = t.weights.dense_dtype(stored, t.dtype);
        let packable = matches!(dtype, Some(DType::F32 | DType::BF16 | DType::F16));
        if !packable
            || t.dtype != DType::F32
            || !crate::ops::cpu_kernels(t.device)
            || !crate::linear::packed::available()
        {
            return self.linear(name, shape);
        }
        let dtype = dtype.expect("checked above");
        let n = shape.first().copied().unwrap_or(1);
        let k = shape.iter().skip(1).product::<usize>();
        // Rows as `T`: read straight into the vector when stored as `T`, else converted.
        fn rows<T: bytemuck::Pod + candle_core::WithDType>(
            t: &LoadTarget<'_>,
            path: &str,
            shape: &[usize],
            stored: DType,
            rows: std::ops::Range<usize>,
        ) -> Result<Vec<T>> {
            if stored == T::DTYPE {
                return t.checkpoint.stored_values(path, shape, rows);
            }
            let block = t.checkpoint.stored_rows(path, shape, rows, &Device::Cpu)?;
            Ok(block.flatten_all()?.to_dtype(T::DTYPE)?.to_vec1::<T>()?)
        }
        let rows_of = |f: usize, c: usize| f..f + c;
        match dtype {
            DType::BF16 => Linear::packed(n, k, |f, c| {
                rows::<bf16>(t, &path, shape, stored, rows_of(f, c))
            }),
            DType::F16 => Linear::packed(n, k, |f, c| {
                rows::<f16>(t, &path, shape, stored, rows_of(f, c))
            }),
            _ => Linear::packed(n, k, |f, c| {
                rows::<f32>(t, &path, shape, stored, rows_of(f, c))
            }),
        }
    }

    /// Loads a lookup table (token embeddings) held like a linear weight but dense: in
    /// the dtype [`WeightFormat`] gives it, int8 keeping a half-precision table as stored.
    pub fn table(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = &self.target;
        let stored = t.checkpoint.stored(&self.path(name), shape, t.device)?;
        let dtype = match t.weights.dense_dtype(stored.dtype(), t.dtype) {
            Some(dtype) => dtype,
            None => WeightFormat::Auto
                .dense_dtype(stored.dtype(), t.dtype)
                .unwrap_or(t.dtype),
        };
        Ok(stored.to_dtype(dtype)?)
    }

    /// Whether `prefix.name` exists.
    pub fn contains(&self, name: &str) -> bool {
        self.target.checkpoint.contains(&self.path(name))
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.target.dtype
    }

    /// The device tensors are loaded on.
    pub fn device(&self) -> &'a Device {
        self.target.device
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn progress_counts_the_tensors_bytes_and_shards_read() {
        let dir = std::env::temp_dir().join(format!("tessera-progress-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let zeros = |n: usize| Tensor::zeros(n, DType::F32, &Device::Cpu).unwrap();
        let first = HashMap::from([("a".to_string(), zeros(4)), ("b".to_string(), zeros(2))]);
        let second = HashMap::from([("c".to_string(), zeros(8))]);
        candle_core::safetensors::save(&first, dir.join("model-1.safetensors")).unwrap();
        candle_core::safetensors::save(&second, dir.join("model-2.safetensors")).unwrap();

        let ckpt = Checkpoint::open(&dir).unwrap();
        let shard = |name: &str| ckpt.entries[name].shard;
        assert_eq!((shard("a"), shard("b"), shard("c")), (0, 0, 1));
        ckpt.tensor("b", &[2], DType::F32, &Device::Cpu).unwrap();
        ckpt.tensor("c", &[8], DType::F16, &Device::Cpu).unwrap();
        let progress = ckpt.progress.lock().unwrap();
        assert_eq!((progress.tensors, progress.bytes), (2, 4 * (2 + 8)));
        assert_eq!(progress.shards, BTreeSet::from([0, 1]));
        drop(progress);
        drop(ckpt);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
