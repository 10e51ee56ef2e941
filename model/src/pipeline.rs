//! One call to load everything a single process needs to run text generation from a
//! snapshot folder: config, tokenizer, language model and (all) routed experts.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use crate::chat::ChatTokenizer;
use crate::config::{ModelConfig, ProcessorConfig};
use crate::error::{Error, Result};
use crate::experts::{ExpertSelection, LocalExperts};
use crate::language::LanguageModel;
use crate::weights::{Checkpoint, LoadTarget};

/// A DeepSeek-VL2 snapshot loaded for in-process generation.
pub struct Pipeline {
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub processor: ProcessorConfig,
    pub tokenizer: ChatTokenizer,
    pub language: LanguageModel,
    pub experts: LocalExperts,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("dir", &self.dir)
            .field("config", &self.config)
            .field("experts", &self.experts.len())
            .finish_non_exhaustive()
    }
}

impl Pipeline {
    /// Loads a snapshot folder with every routed expert in this process.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::io(
                dir,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "model folder not found (expected a local snapshot with config.json, \
                     tokenizer.json and *.safetensors)",
                ),
            ));
        }
        let config = ModelConfig::from_dir(dir)?;
        let processor = ProcessorConfig::from_dir(dir)?;
        let tokenizer = ChatTokenizer::from_dir(dir)?;
        let checkpoint = Checkpoint::open(dir)?;
        let target = LoadTarget {
            checkpoint: &checkpoint,
            dtype,
            device,
        };
        let language = LanguageModel::load(&config.language, target)?;
        let experts = LocalExperts::load(&config.language, target, &ExpertSelection::All)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            processor,
            tokenizer,
            language,
            experts,
        })
    }
}
