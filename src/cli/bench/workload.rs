//! What each benchmark request asks: the prompt, its images and how many tokens
//! to generate, built once and stamped with each request's id.

use std::io::Cursor;
use std::path::PathBuf;

use anyhow::{Context, bail};
use image::{ImageFormat, RgbImage};
use tessera_model::processor::{DEFAULT_MAX_PIXELS, ImageLimits, decode_image};

use crate::cli::ask::{mime_of, to_parts};
use tessera_proto::v1::{self, GenerateRequest, part};

/// The prompt sent when `--prompt` is not given.
pub const DEFAULT_PROMPT: &str = "Describe this scene in detail: the people, the objects, \
     their colours, where they stand and what is happening.";

/// How the requests of one run are made.
#[derive(Debug)]
pub struct Spec<'a> {
    pub prompt: &'a str,
    pub prompt_tokens: Option<usize>,
    pub images: &'a [PathBuf],
    pub output_tokens: u32,
    pub distinct_prompts: bool,
    pub fresh_images: bool,
}

/// The user message every request sends (images read once), and its stopping rule.
#[derive(Debug)]
pub struct Workload {
    parts: Vec<v1::Part>,
    output_tokens: u32,
    distinct_prompts: bool,
    /// With `--fresh-images`: the decoded pixels of each image, in the order of the image
    /// parts, from which every request gets its own copy.
    fresh: Option<Vec<RgbImage>>,
}

/// A copy of `image` in which one pixel, chosen by `n`, differs by one grey level in red,
/// encoded as PNG (lossless, so the server decodes exactly these pixels). Requests with
/// different `n` below width × height × 255 never get the same bytes.
fn fresh_png(image: &RgbImage, n: usize) -> Vec<u8> {
    let mut copy = image.clone();
    let (width, height) = copy.dimensions();
    let pixels = width as usize * height as usize;
    let index = n % pixels;
    let delta = 1 + (n / pixels % 255) as u8;
    let pixel = copy.get_pixel_mut(
        (index % width as usize) as u32,
        (index / width as usize) as u32,
    );
    pixel.0[0] = pixel.0[0].wrapping_add(delta);
    let mut png = Cursor::new(Vec::new());
    copy.write_to(&mut png, ImageFormat::Png)
        .expect("PNG encoding into memory does not fail");
    png.into_inner()
}

/// A prompt of `words` words, the words of `prompt` repeated in order. Common
/// English words are one token each, so it is roughly `words` tokens long.
fn synthesize(prompt: &str, words: usize) -> anyhow::Result<String> {
    if prompt.contains("<image>") {
        bail!("--prompt-tokens repeats the words of --prompt, which must not hold <image> tags");
    }
    let pool: Vec<&str> = prompt.split_whitespace().collect();
    if pool.is_empty() {
        bail!("--prompt-tokens needs a --prompt with words to repeat");
    }
    let text = pool.iter().cycle().take(words).copied();
    Ok(text.collect::<Vec<_>>().join(" "))
}

impl Workload {
    /// Reads the images and lays out the message. A prompt without `<image>` tags
    /// gets one `<image>` line per image in front, as `tessera ask` does.
    pub fn new(spec: &Spec) -> anyhow::Result<Self> {
        if spec.output_tokens == 0 {
            bail!("--output-tokens must be at least 1");
        }
        let prompt = match spec.prompt_tokens {
            Some(0) => bail!("--prompt-tokens must be at least 1"),
            Some(words) => synthesize(spec.prompt, words)?,
            None => spec.prompt.to_string(),
        };
        let tags = prompt.matches("<image>").count();
        let text = if tags == 0 {
            format!("{}{prompt}", "<image>\n".repeat(spec.images.len()))
        } else if tags == spec.images.len() {
            prompt
        } else {
            bail!(
                "--prompt has {tags} <image> tags but {} --image files were given",
                spec.images.len()
            );
        };
        let images = spec
            .images
            .iter()
            .map(|path| {
                let data = std::fs::read(path)
                    .with_context(|| format!("cannot read --image {}", path.display()))?;
                Ok((data, mime_of(path)))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let fresh = if spec.fresh_images {
            if images.is_empty() {
                bail!("--fresh-images changes the --image files; give at least one");
            }
            let limits = ImageLimits {
                max_pixels: DEFAULT_MAX_PIXELS,
            };
            let decoded = spec
                .images
                .iter()
                .zip(&images)
                .map(|(path, (data, _))| {
                    decode_image(data, &limits)
                        .with_context(|| format!("cannot decode --image {}", path.display()))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            Some(decoded)
        } else {
            None
        };
        Ok(Self {
            parts: to_parts(&text, &mut images.into_iter())?,
            output_tokens: spec.output_tokens,
            distinct_prompts: spec.distinct_prompts,
            fresh,
        })
    }

    /// The request with id `id`; `n` numbers it for `--distinct-prompts`.
    pub fn request(&self, id: String, n: usize) -> GenerateRequest {
        self.build(id, n, self.parts.clone())
    }

    /// [`Workload::request`] without its images (and their `<image>` tags).
    pub fn text_request(&self, id: String, n: usize) -> GenerateRequest {
        let parts = self
            .parts
            .iter()
            .filter_map(|p| match &p.kind {
                Some(part::Kind::Text(text)) => Some(v1::Part {
                    kind: Some(part::Kind::Text(
                        text.replace("<image>\n", "").replace("<image>", ""),
                    )),
                }),
                _ => None,
            })
            .collect();
        self.build(id, n, parts)
    }

    fn build(&self, id: String, n: usize, mut parts: Vec<v1::Part>) -> GenerateRequest {
        if let Some(fresh) = &self.fresh {
            let images = parts.iter_mut().filter_map(|p| match &mut p.kind {
                Some(part::Kind::Image(image)) => Some(image),
                _ => None,
            });
            for (image, pixels) in images.zip(fresh) {
                image.data = fresh_png(pixels, n).into();
                image.mime_type = "image/png".into();
            }
        }
        if self.distinct_prompts {
            // In front of everything, images included, so no two prompts share a
            // prefix beyond the chat template's opening tokens.
            let unique = format!("Request {n}.\n");
            match parts.first_mut().and_then(|p| p.kind.as_mut()) {
                Some(part::Kind::Text(text)) => text.insert_str(0, &unique),
                _ => parts.insert(
                    0,
                    v1::Part {
                        kind: Some(part::Kind::Text(unique)),
                    },
                ),
            }
        }
        GenerateRequest {
            request_id: id,
            messages: vec![v1::Message {
                role: v1::Role::User as i32,
                parts,
            }],
            sampling: Some(v1::SamplingParams {
                temperature: Some(0.0),
                ..Default::default()
            }),
            stopping: Some(v1::StoppingParams {
                max_tokens: Some(self.output_tokens),
                stop: Vec::new(),
                ignore_eos: true,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(req: &GenerateRequest) -> Vec<String> {
        req.messages[0]
            .parts
            .iter()
            .map(|p| match &p.kind {
                Some(part::Kind::Text(t)) => t.clone(),
                Some(part::Kind::Image(_)) => "<img>".to_string(),
                None => String::new(),
            })
            .collect()
    }

    fn spec(prompt: &str) -> Spec<'_> {
        Spec {
            prompt,
            prompt_tokens: None,
            images: &[],
            output_tokens: 4,
            distinct_prompts: false,
            fresh_images: false,
        }
    }

    #[test]
    fn synthesized_prompts_repeat_the_words_to_the_count() {
        assert_eq!(synthesize("a b c", 7).unwrap(), "a b c a b c a");
        assert!(synthesize("  ", 3).is_err());
        assert!(synthesize("<image> a", 3).is_err());
    }

    #[test]
    fn distinct_prompts_differ_from_the_first_token_and_greedy_ignores_eos() {
        let mut s = spec("Hello there.");
        s.distinct_prompts = true;
        let w = Workload::new(&s).unwrap();
        let req = w.request("bench-3".into(), 3);
        assert_eq!(texts(&req), ["Request 3.\nHello there."]);
        assert_eq!(req.request_id, "bench-3");
        let stopping = req.stopping.unwrap();
        assert_eq!(stopping.max_tokens, Some(4));
        assert!(stopping.ignore_eos);
        assert_eq!(req.sampling.unwrap().temperature, Some(0.0));
        let same = Workload::new(&spec("Hello there.")).unwrap();
        assert_eq!(
            texts(&same.request("a".into(), 1)),
            texts(&same.request("b".into(), 2))
        );
    }

    #[test]
    fn images_go_where_the_tags_stand_or_in_front() {
        let dir = std::env::temp_dir().join(format!("tessera-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("x.png");
        std::fs::write(&img, b"not really a png").unwrap();
        let images = [img.clone(), img.clone()];
        let mut s = spec("Compare.");
        s.images = &images;
        let w = Workload::new(&s).unwrap();
        assert_eq!(
            texts(&w.request("a".into(), 0)),
            ["<img>", "\n", "<img>", "\nCompare."]
        );
        s.distinct_prompts = true;
        let w = Workload::new(&s).unwrap();
        assert_eq!(
            texts(&w.request("a".into(), 5))[..2],
            ["Request 5.\n", "<img>"]
        );
        let tagged = spec("A <image> and B <image>.");
        let w = Workload::new(&Spec {
            images: &images,
            ..tagged
        })
        .unwrap();
        assert_eq!(
            texts(&w.request("a".into(), 0)),
            ["A ", "<img>", " and B ", "<img>", "."]
        );
        let one_tag = spec("Only <image>.");
        assert!(
            Workload::new(&Spec {
                images: &images,
                ..one_tag
            })
            .is_err()
        );
        let missing = [dir.join("missing.png")];
        let err = Workload::new(&Spec {
            images: &missing,
            ..spec("x")
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("--image"), "{err:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn image_data(req: &GenerateRequest) -> Vec<Vec<u8>> {
        req.messages[0]
            .parts
            .iter()
            .filter_map(|p| match &p.kind {
                Some(part::Kind::Image(image)) => Some(image.data.to_vec()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn fresh_images_differ_in_one_pixel_per_request() {
        let dir = std::env::temp_dir().join(format!("tessera-fresh-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("grey.png");
        let original = RgbImage::from_pixel(3, 2, image::Rgb([100, 150, 200]));
        original.save(&path).unwrap();
        let images = [path.clone()];
        let w = Workload::new(&Spec {
            images: &images,
            fresh_images: true,
            ..spec("Describe.")
        })
        .unwrap();
        let limits = ImageLimits::default();
        let mut seen = std::collections::HashSet::new();
        // 6 pixels: requests 0..6 change each once, 6..12 each again by two levels.
        for n in 0..12 {
            let data = image_data(&w.request(format!("r{n}"), n));
            assert_eq!(data.len(), 1);
            assert!(seen.insert(data[0].clone()), "request {n} repeats an image");
            let got = decode_image(&data[0], &limits).unwrap();
            let changed: Vec<_> = got
                .enumerate_pixels()
                .zip(original.pixels())
                .filter(|((_, _, a), b)| a != b)
                .map(|((x, y, a), _)| (x, y, a.0))
                .collect();
            let delta = 1 + (n / 6) as u8;
            let (x, y) = ((n % 6 % 3) as u32, (n % 6 / 3) as u32);
            assert_eq!(changed, [(x, y, [100 + delta, 150, 200])], "request {n}");
        }
        let err = Workload::new(&Spec {
            fresh_images: true,
            ..spec("No image.")
        })
        .unwrap_err();
        assert!(err.to_string().contains("--fresh-images"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
