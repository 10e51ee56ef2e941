//! One call to load everything a single process needs to run generation from a snapshot
//! folder (config, tokenizer, vision tower and projector, language model, all routed
//! experts), and one to turn a conversation with images into prompt ids and embeddings.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use crate::chat::{ChatTokenizer, EncodedPrompt, Message};
use crate::config::{ModelConfig, ProcessorConfig};
use crate::error::{Error, Result};
use crate::experts::{ExpertSelection, LocalExperts};
use crate::image_tokens::Tiling;
use crate::language::LanguageModel;
use crate::processor::{ProcessedImage, normalization, process_images, tiles_to_tensor};
use crate::vision::VisionModel;
use crate::weights::{Checkpoint, LoadTarget, WeightFormat};

/// A DeepSeek-VL2 snapshot loaded for in-process generation.
pub struct Pipeline {
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub processor: ProcessorConfig,
    pub tokenizer: ChatTokenizer,
    pub vision: VisionModel,
    pub language: LanguageModel,
    pub experts: LocalExperts,
}

/// A conversation turned into model input.
#[derive(Debug)]
pub struct PreparedPrompt {
    /// Token ids and image-token runs.
    pub encoded: EncodedPrompt,
    /// Input embeddings (tokens, hidden) with image features in place.
    pub embeds: Tensor,
    /// The image features alone: (image tokens, hidden), the rows of
    /// `encoded.image_runs` in order; `None` without images.
    pub image_embeds: Option<Tensor>,
    /// Tiling and original size of each image, in prompt order.
    pub images: Vec<ImageInfo>,
}

/// What the processor decided for one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ImageInfo {
    pub tiling: Tiling,
    /// Image tokens in the prompt.
    pub tokens: usize,
    pub width: u32,
    pub height: u32,
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
    /// Loads a snapshot folder with every routed expert in this process, computing in
    /// `dtype` with linear weights held as `weights`.
    pub fn load(dir: &Path, dtype: DType, weights: WeightFormat, device: &Device) -> Result<Self> {
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
        let target = LoadTarget::new(&checkpoint, dtype, weights, device);
        let vision = VisionModel::load(&config, target)?;
        let language = LanguageModel::load(&config.language, target)?;
        let experts = LocalExperts::load(&config.language, target, &ExpertSelection::All)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            processor,
            tokenizer,
            vision,
            language,
            experts,
        })
    }

    /// Tiles and encodes `images` (in `<image>` tag order), applies the chat template and
    /// returns the prompt ids with their input embeddings.
    pub fn prepare(&self, messages: &[Message], images: &[RgbImage]) -> Result<PreparedPrompt> {
        let processed: Vec<ProcessedImage> = process_images(images, &self.processor);
        let tilings: Vec<Tiling> = processed.iter().map(|p| p.tiling).collect();
        let encoded = self.tokenizer.encode_conversation(messages, &tilings)?;
        let image_embeds = if processed.is_empty() {
            None
        } else {
            let (mean, std) = normalization(&self.processor);
            let tiles = tiles_to_tensor(
                processed.iter().flat_map(|p| &p.tiles),
                mean,
                std,
                self.language.device(),
            )?
            .to_dtype(self.language.dtype())?;
            Some(self.vision.embed_images(&tiles, &tilings)?)
        };
        let embeds = self.language.embed_with_images(
            &encoded.input_ids,
            &encoded.image_runs,
            image_embeds.as_ref(),
        )?;
        let images = processed
            .iter()
            .zip(&encoded.num_image_tokens)
            .map(|(p, &tokens)| ImageInfo {
                tiling: p.tiling,
                tokens,
                width: p.original_size.0,
                height: p.original_size.1,
            })
            .collect();
        Ok(PreparedPrompt {
            encoded,
            embeds,
            image_embeds,
            images,
        })
    }
}
