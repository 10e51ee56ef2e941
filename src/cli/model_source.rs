//! `--model` as a local snapshot folder or a Hugging Face Hub id, and `--revision`:
//! every command that loads a model resolves it once, at start-up, to a folder
//! (downloading a Hub id into the Hub cache) and hands that folder on.

use std::path::{Path, PathBuf};

use clap::Args;
use tessera_runtime::hub::{self, DEFAULT_REVISION, HubOptions};

/// Where a Hub id `--model` is fetched from.
#[derive(Debug, Clone, Args)]
pub struct HubArgs {
    /// Branch, tag or commit of a Hub id --model (e.g. deepseek-ai/deepseek-vl2-tiny).
    /// The Hub is `HF_ENDPOINT`, the cache `HF_HUB_CACHE` or `HF_HOME/hub`, the token
    /// `HF_TOKEN`.
    #[arg(long, env = "TESSERA_MODEL_REVISION", default_value = DEFAULT_REVISION)]
    pub revision: String,
}

impl HubArgs {
    /// The snapshot folder of `model` (a folder, or a Hub id downloaded as needed).
    pub async fn resolve(&self, model: &Path) -> anyhow::Result<PathBuf> {
        let opts = HubOptions::from_env(self.revision.clone());
        let folder = hub::resolve(model, &opts).await?;
        announce(model, &folder);
        Ok(folder)
    }

    /// [`HubArgs::resolve`] outside a tokio runtime.
    pub fn resolve_blocking(&self, model: &Path) -> anyhow::Result<PathBuf> {
        let opts = HubOptions::from_env(self.revision.clone());
        let folder = hub::resolve_blocking(model, &opts)?;
        announce(model, &folder);
        Ok(folder)
    }
}

fn announce(model: &Path, folder: &Path) {
    if model != folder {
        tracing::info!(model = %model.display(), snapshot = %folder.display(), "model resolved");
    }
}
