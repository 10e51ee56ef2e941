//! Plans a prompt without pixels: each image's size comes from its header alone,
//! its tiling from the model crate's one tiling function, and the chat template
//! expands every `<image>` tag to that tiling's number of image tokens. The
//! vision-worker's answer is then checked against the plan.

use tessera_model::chat::{ChatTokenizer, EncodedPrompt, Message};
use tessera_model::config::ProcessorConfig;
use tessera_model::image_tokens::{Tiling, cropping_enabled};
use tessera_model::processor::{read_header, tiling_for};
use tessera_proto::v1::ImageTiling;

use crate::error::{Error, Result};

/// What the prompt expects of one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImagePlan {
    /// Width of the original image in pixels.
    pub width: u32,
    /// Height of the original image in pixels.
    pub height: u32,
    /// Its local tiles across and down.
    pub tiling: Tiling,
}

impl ImagePlan {
    /// Prompt tokens that stand for this image.
    pub fn num_tokens(&self) -> usize {
        self.tiling.num_tokens()
    }

    /// The public description of this image.
    pub fn to_public(&self) -> ImageTiling {
        ImageTiling {
            width: self.width,
            height: self.height,
            tiles_x: self.tiling.width as u32,
            tiles_y: self.tiling.height as u32,
            tokens: self.num_tokens() as u32,
        }
    }
}

/// A tokenized prompt and what each of its images must encode to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Input ids with each image expanded, and where the image runs stand.
    pub prompt: EncodedPrompt,
    /// One entry per image, in prompt order.
    pub images: Vec<ImagePlan>,
}

impl Plan {
    /// Image tokens in the prompt, all images together.
    pub fn image_tokens(&self) -> usize {
        self.prompt.num_image_tokens.iter().sum()
    }
}

/// Reads the width and height of image `index` from its header (with the decoder the
/// vision-worker decodes it with), refusing formats the processor does not decode, empty
/// images and more than `max_pixels` pixels.
pub fn image_size(index: usize, data: &[u8], max_pixels: u64) -> Result<(u32, u32)> {
    let bad = |what: String| Error::invalid(format!("image {index}: {what}"));
    let header = read_header(data).map_err(|e| match e {
        tessera_model::Error::Image(message) => bad(message),
        other => bad(other.to_string()),
    })?;
    let (width, height) = (header.width, header.height);
    if width == 0 || height == 0 {
        return Err(bad(format!("the image is empty ({width}x{height} pixels)")));
    }
    let pixels = u64::from(width) * u64::from(height);
    if pixels > max_pixels {
        return Err(bad(format!(
            "the image is {width}x{height} = {pixels} pixels, more than this server's limit \
             of {max_pixels} pixels; downscale it"
        )));
    }
    Ok((width, height))
}

/// Plans the prompt of `messages` whose `<image>` tags stand for images of `sizes`
/// (width, height), in order. Their count decides cropping, as in the processor.
pub fn plan(
    tokenizer: &ChatTokenizer,
    processor: &ProcessorConfig,
    messages: &[Message],
    sizes: &[(u32, u32)],
) -> Result<Plan> {
    let cropping = cropping_enabled(sizes.len());
    let images: Vec<ImagePlan> = sizes
        .iter()
        .map(|&(width, height)| ImagePlan {
            width,
            height,
            tiling: tiling_for(width, height, cropping, processor),
        })
        .collect();
    let tilings: Vec<Tiling> = images.iter().map(|i| i.tiling).collect();
    let prompt = tokenizer
        .encode_conversation(messages, &tilings)
        .map_err(Error::from_planning)?;
    Ok(Plan { prompt, images })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model_files::ModelFiles;
    use crate::model_files::tests::fixture;
    use image::{DynamicImage, ImageFormat, RgbImage};
    use std::io::Cursor;

    fn png(width: u32, height: u32) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        DynamicImage::ImageRgb8(RgbImage::new(width, height))
            .write_to(&mut out, ImageFormat::Png)
            .unwrap();
        out.into_inner()
    }

    /// Every case of both fixtures, with and without images: the plan from image
    /// headers alone gives the reference's input ids, image runs and tilings.
    #[test]
    fn plans_equal_the_reference_prompts_of_the_fixture_cases() {
        let mut planned = 0;
        for name in ["tiny-mha-softmax", "small-mla-softmax"] {
            let dir = fixture(name);
            let files = ModelFiles::load(&dir).unwrap();
            let text = std::fs::read_to_string(dir.join("cases.json")).unwrap();
            let cases: serde_json::Value = serde_json::from_str(&text).unwrap();
            for case in cases["cases"].as_array().unwrap() {
                let messages: Vec<Message> =
                    serde_json::from_value(case["conversation"].clone()).unwrap();
                let sizes: Vec<(u32, u32)> = messages
                    .iter()
                    .flat_map(|m| &m.images)
                    .enumerate()
                    .map(|(i, f)| image_size(i, &std::fs::read(dir.join(f)).unwrap(), u64::MAX))
                    .collect::<Result<_>>()
                    .unwrap();
                let plan = plan(&files.tokenizer, &files.processor, &messages, &sizes).unwrap();

                let ids: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
                assert_eq!(plan.prompt.input_ids, ids, "{name}/{}", case["name"]);
                let crops: Vec<[usize; 2]> =
                    serde_json::from_value(case["images_spatial_crop"].clone()).unwrap();
                let tilings: Vec<[usize; 2]> = plan
                    .images
                    .iter()
                    .map(|i| [i.tiling.width, i.tiling.height])
                    .collect();
                assert_eq!(tilings, crops, "{name}/{}", case["name"]);
                let runs: Vec<[usize; 2]> =
                    serde_json::from_value(case["images_seq_mask_ranges"].clone()).unwrap();
                let planned_runs: Vec<[usize; 2]> = plan
                    .prompt
                    .image_runs
                    .iter()
                    .map(|r| [r.start, r.end])
                    .collect();
                assert_eq!(planned_runs, runs, "{name}/{}", case["name"]);
                assert_eq!(
                    plan.image_tokens() as u64,
                    case["num_image_tokens_total"].as_u64().unwrap()
                );
                planned += 1;
            }
        }
        assert!(planned >= 8, "only {planned} cases planned");
    }

    #[test]
    fn three_images_are_not_cropped() {
        let files = ModelFiles::load(&fixture("tiny-mha-softmax")).unwrap();
        let messages = [Message::new(
            tessera_model::chat::Role::User,
            "<image><image><image>Compare.",
        )];
        let sizes = [(1200, 400), (640, 480), (300, 900)];
        let plan = plan(&files.tokenizer, &files.processor, &messages, &sizes).unwrap();
        assert!(plan.images.iter().all(|i| i.tiling == Tiling::new(1, 1)));
        assert_eq!(plan.image_tokens(), 3 * 421);
        let two = plan_two(&files);
        assert_eq!(two.images[0].tiling, Tiling::new(4, 2));
    }

    fn plan_two(files: &ModelFiles) -> Plan {
        let messages = [Message::new(
            tessera_model::chat::Role::User,
            "<image><image>",
        )];
        plan(
            &files.tokenizer,
            &files.processor,
            &messages,
            &[(1200, 400), (640, 480)],
        )
        .unwrap()
    }

    #[test]
    fn image_headers_are_checked() {
        assert_eq!(image_size(0, &png(640, 480), 1 << 20).unwrap(), (640, 480));
        let too_big = image_size(2, &png(640, 480), 1000).unwrap_err().to_string();
        assert!(
            too_big.starts_with("image 2:") && too_big.contains("307200"),
            "{too_big}"
        );
        let garbage = image_size(1, b"not an image at all", u64::MAX).unwrap_err();
        assert!(garbage.to_string().contains("unrecognised"), "{garbage}");
        let truncated = &png(64, 64)[..12];
        assert!(image_size(0, truncated, u64::MAX).is_err());
    }
}
