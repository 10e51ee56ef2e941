//! Memory-mapped access to a Hugging Face snapshot's safetensors (reference-spec §5).
//!
//! A [`Checkpoint`] maps every `*.safetensors` file of a snapshot (a single
//! `model.safetensors`, or the shards named by `model.safetensors.index.json`) without
//! reading them. Parts of the model then load exactly the tensors they need by name, so
//! a process that does not need the routed experts never touches their bytes.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result, read_json};

/// The weights of one snapshot folder, memory-mapped.
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<PathBuf>,
    tensors: MmapedSafetensors,
    /// Names of the tensors loaded so far (what this process holds from it).
    loaded: Mutex<BTreeSet<String>>,
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
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
            tensors,
            loaded: Mutex::default(),
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
        let t = self.tensors.load(name, device)?;
        self.loaded
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_string());
        Ok(t.to_dtype(dtype)?)
    }
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
