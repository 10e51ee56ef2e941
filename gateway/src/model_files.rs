//! What the gateway reads from a snapshot: the configurations, the tokenizer with
//! its chat template, and the fingerprint. No weights.

use std::path::{Path, PathBuf};

use tessera_model::chat::ChatTokenizer;
use tessera_model::config::{ModelConfig, ProcessorConfig};
use tessera_proto::v1::ModelInfoResponse;

use crate::error::{Error, Result};

/// The snapshot files one gateway plans prompts and decodes answers with.
#[derive(Debug)]
pub struct ModelFiles {
    /// The snapshot folder as configured.
    pub dir: PathBuf,
    /// `config.json`.
    pub config: ModelConfig,
    /// `processor_config.json` (defaults when absent).
    pub processor: ProcessorConfig,
    /// `tokenizer.json` with the processor's additions and the chat template.
    pub tokenizer: ChatTokenizer,
    /// `tessera_model::fingerprint` of the snapshot.
    pub fingerprint: String,
    /// The tokenizer's bound on the bytes of text one token stands for
    /// (`ChatTokenizer::max_bytes_per_token`).
    pub bytes_per_token: usize,
}

impl ModelFiles {
    /// Reads the snapshot at `dir`. Blocking (file reads, tokenizer parsing).
    pub fn load(dir: &Path) -> Result<Self> {
        let load = |source| Error::Load {
            path: dir.to_owned(),
            source,
        };
        let tokenizer = ChatTokenizer::from_dir(dir).map_err(load)?;
        Ok(Self {
            dir: dir.to_owned(),
            config: ModelConfig::from_dir(dir).map_err(load)?,
            processor: ProcessorConfig::from_dir(dir).map_err(load)?,
            bytes_per_token: tokenizer.max_bytes_per_token(),
            tokenizer,
            fingerprint: tessera_model::fingerprint(dir).map_err(load)?,
        })
    }

    /// The model's name: the Hub id of a snapshot in the Hub cache, else the snapshot
    /// folder's name.
    pub fn model_id(&self) -> String {
        if let Some(id) = tessera_runtime::hub::hub_id_of(&self.dir) {
            return id;
        }
        let named = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
        named(&self.dir)
            .or_else(|| self.dir.canonicalize().ok().as_deref().and_then(named))
            .unwrap_or_else(|| self.dir.display().to_string())
    }

    /// Longest sequence, prompt plus answer, in tokens.
    pub fn max_positions(&self) -> usize {
        self.config.language.max_position_embeddings
    }

    /// Most bytes of conversation text that could fit in the model's positions: a text
    /// longer than this is refused before it is tokenized (tokenizing a huge text costs
    /// far more memory than its bytes).
    pub fn max_text_bytes(&self) -> usize {
        self.max_positions().saturating_mul(self.bytes_per_token)
    }

    /// The `ModelInfo` answer.
    pub fn info(&self) -> ModelInfoResponse {
        let lang = &self.config.language;
        let moe = lang.moe.as_ref();
        let n = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
        ModelInfoResponse {
            model_id: self.model_id(),
            model_path: self.dir.display().to_string(),
            hidden_size: n(lang.hidden_size),
            num_layers: n(lang.num_hidden_layers),
            num_dense_layers: n(moe.map_or(lang.num_hidden_layers, |m| {
                m.first_k_dense_replace.min(lang.num_hidden_layers)
            })),
            num_routed_experts: n(moe.map_or(0, |m| m.n_routed_experts)),
            num_experts_per_token: n(moe.map_or(0, |m| m.num_experts_per_tok)),
            num_shared_experts: n(moe.map_or(0, |m| m.n_shared_experts)),
            vocab_size: n(lang.vocab_size),
            max_position_embeddings: n(lang.max_position_embeddings),
            fingerprint: self.fingerprint.clone(),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A fixture snapshot of the workspace (`tests/fixtures/<name>`).
    pub(crate) fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures")
            .join(name)
    }

    #[test]
    fn model_info_describes_the_snapshot() {
        let files = ModelFiles::load(&fixture("tiny-mha-softmax")).unwrap();
        let info = files.info();
        assert_eq!(info.model_id, "tiny-mha-softmax");
        assert_eq!(info.hidden_size, 256);
        assert_eq!(info.vocab_size as usize, files.config.language.vocab_size);
        assert_eq!(info.fingerprint.len(), 16);
        assert!(info.num_dense_layers < info.num_layers);
        assert!(info.num_experts_per_token > 0);
        assert!(info.num_routed_experts >= info.num_experts_per_token);
    }

    #[test]
    fn a_missing_snapshot_names_the_folder() {
        let err = ModelFiles::load(Path::new("/nonexistent/snapshot")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/snapshot"), "{err}");
    }
}
