//! Memory-mapped access to a Hugging Face snapshot's safetensors (the released layout).
//!
//! A [`Checkpoint`] maps every `*.safetensors` file of a snapshot (a single
//! `model.safetensors`, or the shards named by `model.safetensors.index.json`) without
//! reading them. Parts of the model then load exactly the tensors they need by name, so
//! a process that does not need the routed experts never touches their bytes.
//!
//! Loading reports its progress on stderr: a line per checkpoint that counts the shards
//! and bytes read when stderr is a terminal that logs nothing at `info` (log lines would
//! tear it), else an `info` event per shard reached and one when the checkpoint closes.

use std::collections::{BTreeSet, HashMap};
use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::Instant;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::error::{Error, Result, read_json};

/// The weights of one snapshot folder, memory-mapped.
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<PathBuf>,
    tensors: MmapedSafetensors,
    /// Names of the tensors loaded so far (what this process holds from it).
    loaded: Mutex<BTreeSet<String>>,
    /// The shard (index into `files`) of each tensor, when there are several.
    shard_of: HashMap<String, usize>,
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
    weight_map: std::collections::BTreeMap<String, String>,
}

impl Checkpoint {
    /// Opens the safetensors of a snapshot folder: the shards listed in
    /// `model.safetensors.index.json` when present, else `model.safetensors`, else every
    /// `*.safetensors` file in the folder.
    pub fn open(dir: &Path) -> Result<Self> {
        let files = Self::weight_files(dir)?;
        for f in &files {
            if !f.is_file() {
                return Err(Error::io(
                    f,
                    std::io::Error::new(std::io::ErrorKind::NotFound, "weight file not found"),
                ));
            }
        }
        // SAFETY: the files are mapped read-only. Like every safetensors loader, we rely on
        // the snapshot not being modified while the process runs; candle validates the
        // headers and bounds of every tensor view against the mapped length.
        #[allow(unsafe_code)]
        let tensors = unsafe { MmapedSafetensors::multi(&files)? };
        let mut shard_of = HashMap::new();
        if files.len() > 1 {
            for (i, f) in files.iter().enumerate() {
                for name in header_names(f)? {
                    shard_of.insert(name, i);
                }
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
            tensors,
            loaded: Mutex::default(),
            shard_of,
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
        self.tensors.get(name).is_ok()
    }

    /// The stored shape of a tensor, or an error naming it.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        let view = self.tensors.get(name).map_err(|_| Error::MissingTensor {
            name: name.to_string(),
        })?;
        Ok(view.shape().to_vec())
    }

    /// Every tensor name in the checkpoint, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .tensors
            .tensors()
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        names.sort();
        names
    }

    /// `(name, stored dtype, shape)` of every tensor, sorted by name.
    pub fn layout(&self) -> Vec<(String, String, Vec<usize>)> {
        let mut layout: Vec<(String, String, Vec<usize>)> = self
            .tensors
            .tensors()
            .into_iter()
            .map(|(name, view)| (name, format!("{:?}", view.dtype()), view.shape().to_vec()))
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
        let found = self.shape(name)?;
        if found != shape {
            return Err(Error::TensorShape {
                name: name.to_string(),
                expected: shape.to_vec(),
                found,
            });
        }
        let bytes = self.tensors.get(name).map_or(0, |v| v.data().len());
        let t = self.tensors.load(name, device)?;
        self.loaded
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_string());
        let shard = self.shard_of.get(name).copied().unwrap_or(0);
        self.progress
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .record(&self.files, shard, bytes);
        Ok(t.to_dtype(dtype)?)
    }
}

impl Drop for Checkpoint {
    fn drop(&mut self) {
        self.progress
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .finish(&self.dir, self.files.len());
    }
}

/// The tensor names in a safetensors file's header (its first 8 + N bytes).
fn header_names(path: &Path) -> Result<Vec<String>> {
    let bad = |what: &str| {
        Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string()),
        )
    };
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|e| Error::io(path, e))?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        return Err(bad("the safetensors header is larger than 100 MB"));
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header)
        .map_err(|e| Error::io(path, e))?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|_| bad("the safetensors header is not a JSON object"))?;
    Ok(header
        .into_iter()
        .map(|(name, _)| name)
        .filter(|name| name != "__metadata__")
        .collect())
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
    pub dtype: DType,
    pub device: &'a Device,
}

impl<'a> LoadTarget<'a> {
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
        let shard = |name: &str| ckpt.shard_of[name];
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
