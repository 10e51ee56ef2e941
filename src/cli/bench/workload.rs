//! What each benchmark request asks: the prompt, its images and how many tokens
//! to generate, built once and stamped with each request's id.

use std::path::PathBuf;

use anyhow::{Context, bail};

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
}

/// The user message every request sends (images read once), and its stopping rule.
#[derive(Debug)]
pub struct Workload {
    parts: Vec<v1::Part>,
    output_tokens: u32,
    distinct_prompts: bool,
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
        Ok(Self {
            parts: to_parts(&text, &mut images.into_iter())?,
            output_tokens: spec.output_tokens,
            distinct_prompts: spec.distinct_prompts,
        })
    }

    /// The request with id `id`; `n` numbers it for `--distinct-prompts`.
    pub fn request(&self, id: String, n: usize) -> GenerateRequest {
        let mut parts = self.parts.clone();
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
}
