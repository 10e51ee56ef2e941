//! The tokenizer and the DeepSeek-VL2 `deepseek` chat template, as the reference
//! `DeepseekVLV2Processor` builds prompts (`process_one`, `format_messages`), with the special
//! tokens its constructor adds (appended at the end of the vocabulary only when missing).
//!
//! The token sequence is built message by message (the processor's `format_messages_v2`),
//! not by tokenizing the display string: each text piece between `<image>` tags is
//! tokenized on its own and the image-token runs are spliced in between.

use std::ops::Range;
use std::path::Path;

use tokenizers::{AddedToken, Tokenizer};

use crate::error::{Error, Result, read_json};
use crate::image_tokens::Tiling;

/// Role name of the user in the `deepseek` template (ASCII bars, not DeepSeek-V3's `<｜User｜>`).
const USER_ROLE: &str = "<|User|>";
/// Role name of the assistant in the `deepseek` template.
const ASSISTANT_ROLE: &str = "<|Assistant|>";
/// Role name of a system message (display string only).
const SYSTEM_ROLE: &str = "system";
/// Separator after even-indexed messages (`sep`).
const SEP: &str = "\n\n";
/// Separator after odd-indexed messages in the display string (`sep2`).
const SEP2: &str = "<｜end▁of▁sentence｜>";
/// Processor defaults when `processor_config.json` does not set them.
const DEFAULT_IMAGE_TOKEN: &str = "<image>";
const DEFAULT_PAD_TOKEN: &str = "<｜▁pad▁｜>";

/// Python's `str.strip()`: trims Unicode whitespace, which for Python also includes the
/// ASCII separators U+001C..U+001F that Rust's `char::is_whitespace` leaves alone.
fn py_strip(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}

/// Role of a message. Deserialises from `"<|User|>"`, `"user"`, `"User"`, `"<|Assistant|>"`,
/// `"assistant"`, `"Assistant"` and `"system"`; serialises to the template spelling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub enum Role {
    #[serde(rename = "system")]
    System,
    #[serde(rename = "<|User|>", alias = "user", alias = "User")]
    User,
    #[serde(rename = "<|Assistant|>", alias = "assistant", alias = "Assistant")]
    Assistant,
}

impl Role {
    /// The role as the template writes it (`"system"`, `"<|User|>"`, `"<|Assistant|>"`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::System => SYSTEM_ROLE,
            Self::User => USER_ROLE,
            Self::Assistant => ASSISTANT_ROLE,
        }
    }
}

/// One message of a conversation. `images` names the image files of this message; images
/// are consumed in the order of the `<image>` tags across all user messages.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<String>,
}

impl Message {
    /// A message without images.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
            images: Vec::new(),
        }
    }
}

/// Token ids of the tokens the template and processor use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos: u32,
    pub eos: u32,
    pub pad: u32,
    pub image: u32,
    pub ref_start: u32,
    pub ref_end: u32,
    pub det_start: u32,
    pub det_end: u32,
    pub grounding: u32,
    pub user: u32,
    pub assistant: u32,
}

/// A tokenized prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedPrompt {
    pub input_ids: Vec<u32>,
    /// Half-open runs of image-token positions, one per image in order.
    pub image_runs: Vec<Range<usize>>,
    /// Image tokens per image (the length of each run).
    pub num_image_tokens: Vec<usize>,
}

impl EncodedPrompt {
    /// `images_seq_mask`: true exactly at the image-token positions.
    pub fn images_seq_mask(&self) -> Vec<bool> {
        let mut mask = vec![false; self.input_ids.len()];
        for run in &self.image_runs {
            mask[run.clone()].fill(true);
        }
        mask
    }
}

/// A special-token setting: a plain string or an `AddedToken`-like object with `content`.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum TokenSetting {
    Plain(String),
    Object { content: String },
}

impl TokenSetting {
    fn into_content(self) -> String {
        match self {
            Self::Plain(s) | Self::Object { content: s } => s,
        }
    }
}

/// The special-token entries of `tokenizer_config.json` / `special_tokens_map.json`.
#[derive(Default, serde::Deserialize)]
struct SpecialTokenSettings {
    bos_token: Option<TokenSetting>,
    eos_token: Option<TokenSetting>,
    pad_token: Option<TokenSetting>,
}

/// The tokenizer settings of `processor_config.json`.
#[derive(serde::Deserialize)]
#[serde(default)]
struct ProcessorSettings {
    image_token: String,
    pad_token: String,
}

impl Default for ProcessorSettings {
    fn default() -> Self {
        Self {
            image_token: DEFAULT_IMAGE_TOKEN.to_owned(),
            pad_token: DEFAULT_PAD_TOKEN.to_owned(),
        }
    }
}

/// Reads a JSON file if it exists; `T::default()` otherwise.
fn read_optional_json<T: serde::de::DeserializeOwned + Default>(path: &Path) -> Result<T> {
    if path.is_file() {
        read_json(path)
    } else {
        Ok(T::default())
    }
}

/// The BOS/EOS/pad token strings: `tokenizer_config.json` first, `special_tokens_map.json`
/// for whatever it leaves unset.
fn special_token_strings(dir: &Path) -> Result<(Option<String>, Option<String>, Option<String>)> {
    let primary: SpecialTokenSettings = read_optional_json(&dir.join("tokenizer_config.json"))?;
    let fallback: SpecialTokenSettings = read_optional_json(&dir.join("special_tokens_map.json"))?;
    let pick =
        |a: Option<TokenSetting>, b: Option<TokenSetting>| a.or(b).map(TokenSetting::into_content);
    Ok((
        pick(primary.bos_token, fallback.bos_token),
        pick(primary.eos_token, fallback.eos_token),
        pick(primary.pad_token, fallback.pad_token),
    ))
}

/// Collects the token sequence of a prompt with its image runs.
struct PromptBuilder<'a> {
    tokenizer: &'a ChatTokenizer,
    tilings: &'a [Tiling],
    prompt: EncodedPrompt,
}

impl PromptBuilder<'_> {
    fn push_text(&mut self, text: &str) -> Result<()> {
        let ids = self.tokenizer.encode(text)?;
        self.prompt.input_ids.extend(ids);
        Ok(())
    }

    /// Splits `text` at every image tag, tokenizing each piece on its own and inserting
    /// the image tokens of the next image between pieces (the processor's `tokenize_with_images`).
    fn push_text_with_images(&mut self, text: &str) -> Result<()> {
        let mut pieces = text.split(self.tokenizer.image_token.as_str());
        if let Some(first) = pieces.next() {
            self.push_text(first)?;
        }
        for piece in pieces {
            self.push_image()?;
            self.push_text(piece)?;
        }
        Ok(())
    }

    fn push_image(&mut self) -> Result<()> {
        let index = self.prompt.image_runs.len();
        let tiling = self.tilings.get(index).ok_or_else(|| {
            Error::Prompt(format!(
                "the conversation has more image tags than the {} tiling(s) given",
                self.tilings.len()
            ))
        })?;
        let n = tiling.num_tokens();
        let start = self.prompt.input_ids.len();
        let image_id = self.tokenizer.special.image;
        self.prompt
            .input_ids
            .extend(std::iter::repeat_n(image_id, n));
        self.prompt.image_runs.push(start..start + n);
        self.prompt.num_image_tokens.push(n);
        Ok(())
    }
}

/// The tokenizer of a DeepSeek-VL2 snapshot with the processor's token additions, and the
/// `deepseek` chat template.
#[derive(Clone)]
pub struct ChatTokenizer {
    tokenizer: Tokenizer,
    special: SpecialTokens,
    image_token: String,
}

/// Summarised: the full vocabulary is too large to print.
impl std::fmt::Debug for ChatTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("special", &self.special)
            .field("image_token", &self.image_token)
            .finish_non_exhaustive()
    }
}

impl ChatTokenizer {
    /// Loads `tokenizer.json` from a snapshot folder and applies the processor's additions.
    ///
    /// The pad/bos/eos token strings come from `tokenizer_config.json` (or
    /// `special_tokens_map.json`), the image and default pad token from
    /// `processor_config.json` when present (defaults `<image>`, `<｜▁pad▁｜>`). Tokens are then
    /// added only if missing, in the reference's order: pad (when the tokenizer has none
    /// configured), `<image>`, the five grounding tokens, `<|User|>`, `<|Assistant|>`. New
    /// tokens are appended at the end of the vocabulary as special tokens; existing ones
    /// keep their ids.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let mut tokenizer = Tokenizer::from_file(&path)
            .map_err(|e| Error::Tokenizer(format!("cannot load {}: {e}", path.display())))?;
        let (bos, eos, pad) = special_token_strings(dir)?;
        let processor: ProcessorSettings = read_optional_json(&dir.join("processor_config.json"))?;
        let pad = pad.unwrap_or(processor.pad_token);

        let mut add_if_missing = |token: &str| -> Result<u32> {
            if let Some(id) = tokenizer.token_to_id(token) {
                return Ok(id);
            }
            tokenizer
                .add_special_tokens([AddedToken::from(token, true)])
                .map_err(|e| {
                    Error::Tokenizer(format!("cannot add special token `{token}`: {e}"))
                })?;
            tokenizer
                .token_to_id(token)
                .ok_or_else(|| Error::Tokenizer(format!("special token `{token}` was not added")))
        };
        let pad = add_if_missing(&pad)?;
        let image = add_if_missing(&processor.image_token)?;
        let ref_start = add_if_missing("<|ref|>")?;
        let ref_end = add_if_missing("<|/ref|>")?;
        let det_start = add_if_missing("<|det|>")?;
        let det_end = add_if_missing("<|/det|>")?;
        let grounding = add_if_missing("<|grounding|>")?;
        let user = add_if_missing(USER_ROLE)?;
        let assistant = add_if_missing(ASSISTANT_ROLE)?;

        let existing = |name: &str, token: Option<String>| -> Result<u32> {
            let token = token.ok_or_else(|| {
                Error::Tokenizer(format!(
                    "{name} token is not set in tokenizer_config.json or special_tokens_map.json of {}",
                    dir.display()
                ))
            })?;
            tokenizer.token_to_id(&token).ok_or_else(|| {
                Error::Tokenizer(format!("{name} token `{token}` is not in the vocabulary"))
            })
        };
        let special = SpecialTokens {
            bos: existing("bos", bos)?,
            eos: existing("eos", eos)?,
            pad,
            image,
            ref_start,
            ref_end,
            det_start,
            det_end,
            grounding,
            user,
            assistant,
        };
        Ok(Self {
            tokenizer,
            special,
            image_token: processor.image_token,
        })
    }

    /// Ids of the template's and processor's special tokens.
    pub fn special(&self) -> &SpecialTokens {
        &self.special
    }

    /// The image placeholder tag in message text (`<image>`).
    pub fn image_token(&self) -> &str {
        &self.image_token
    }

    /// Number of tokens, added tokens included (`len(tokenizer)` in Python).
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// The underlying `tokenizers` tokenizer (e.g. for streaming decode).
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// An upper bound on the bytes of text one token stands for: the longest entry of
    /// the vocabulary, added tokens included, in bytes (a byte-level entry's characters
    /// each stand for one byte, so its UTF-8 length only over-counts). A text of more
    /// than `n` times this many bytes is more than `n` tokens. When the tokenizer
    /// normalizes text first (which can shorten it) the bound is widened fourfold; the
    /// released tokenizers have no normalizer.
    pub fn max_bytes_per_token(&self) -> usize {
        let longest = self
            .tokenizer
            .get_vocab(true)
            .keys()
            .map(String::len)
            .max()
            .unwrap_or(1)
            .max(1);
        let normalizes = self.tokenizer.get_normalizer().is_some_and(|n| {
            serde_json::to_value(n).ok()
                != Some(serde_json::json!({"type": "Sequence", "normalizers": []}))
        });
        if normalizes { 4 * longest } else { longest }
    }

    /// Encodes `text` with `add_special_tokens = false` (special tokens written in the text
    /// are still recognised).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(format!("cannot encode text: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Decodes ids to text, keeping or skipping special tokens.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Tokenizer(format!("cannot decode {} ids: {e}", ids.len())))
    }

    /// The id of `token`, if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// The token sequence `DeepseekVLV2Processor.process_one` feeds the model for a
    /// conversation (inference mode).
    ///
    /// BOS; then per message: system (first message only): `tokens(content.strip())`;
    /// user: `"<|User|>: " + content.strip() + "\n\n<|Assistant|>:"` (`"<|User|>:<|Assistant|>:"`
    /// for empty content, as the template does) split at every `<image>`, each piece tokenized
    /// separately with the `tiling.num_tokens()` image tokens of the next image between pieces;
    /// assistant: `tokens(content.strip())` + EOS. The final EOS is dropped, so a trailing
    /// empty assistant message leaves the prompt ending in `<|Assistant|>:` and a trailing
    /// non-empty one is a prefix for the model to continue. A conversation that does not end
    /// with an assistant message is treated as if an empty one were appended.
    ///
    /// `tilings` has one entry per `<image>` tag in order across all user messages.
    pub fn encode_conversation(
        &self,
        messages: &[Message],
        tilings: &[Tiling],
    ) -> Result<EncodedPrompt> {
        self.validate(messages, tilings)?;
        let mut builder = PromptBuilder {
            tokenizer: self,
            tilings,
            prompt: EncodedPrompt {
                input_ids: vec![self.special.bos],
                image_runs: Vec::new(),
                num_image_tokens: Vec::new(),
            },
        };
        for message in messages {
            let content = py_strip(&message.content);
            match message.role {
                Role::System => builder.push_text(content)?,
                Role::User => builder.push_text_with_images(&user_turn(content))?,
                Role::Assistant => {
                    builder.push_text(content)?;
                    builder.prompt.input_ids.push(self.special.eos);
                }
            }
        }
        if messages.last().map(|m| m.role) != Some(Role::Assistant) {
            // The implied empty assistant message: no text, only its EOS.
            builder.prompt.input_ids.push(self.special.eos);
        }
        // Inference mode: the reference drops the final EOS.
        builder.prompt.input_ids.pop();
        Ok(builder.prompt)
    }

    /// Checks roles, image-tag placement and the tiling count before encoding.
    fn validate(&self, messages: &[Message], tilings: &[Tiling]) -> Result<()> {
        if messages.is_empty() {
            return Err(Error::Prompt("the conversation has no messages".into()));
        }
        let mut tags = 0;
        for (i, message) in messages.iter().enumerate() {
            let count = message.content.matches(self.image_token.as_str()).count();
            match message.role {
                Role::System if i != 0 => {
                    return Err(Error::Prompt(format!(
                        "a system message is only allowed as the first message, found one at index {i}"
                    )));
                }
                Role::System | Role::Assistant if count > 0 => {
                    return Err(Error::Prompt(format!(
                        "message {i} ({}) contains {count} `{}` tag(s); images belong in user messages",
                        message.role.as_str(),
                        self.image_token
                    )));
                }
                Role::User => tags += count,
                Role::System | Role::Assistant => {}
            }
        }
        if tags != tilings.len() {
            return Err(Error::Prompt(format!(
                "the conversation has {tags} `{}` tag(s) but {} image tiling(s) were given",
                self.image_token,
                tilings.len()
            )));
        }
        Ok(())
    }

    /// The display string (`sft_format`) of `DeepseekVLV2Processor.format_messages`: per message
    /// `role + ": " + content` followed by `"\n\n"` (even index) or
    /// `"<｜end▁of▁sentence｜>"` (odd index) when the stripped content is non-empty, else
    /// `role + ":"`; the whole string stripped. Roles are written in the template spelling; a
    /// conversation not ending with an assistant message gets the implied empty one, as in
    /// [`Self::encode_conversation`]. This is not what is tokenized for multi-turn or system
    /// conversations.
    pub fn sft_format(&self, messages: &[Message]) -> String {
        let implied = Message::new(Role::Assistant, "");
        let needs_implied = messages.last().map(|m| m.role) != Some(Role::Assistant);
        let all = messages.iter().chain(needs_implied.then_some(&implied));
        let mut out = String::new();
        for (i, message) in all.enumerate() {
            let content = py_strip(&message.content);
            out.push_str(message.role.as_str());
            if content.is_empty() {
                out.push(':');
            } else {
                out.push_str(": ");
                out.push_str(content);
                out.push_str(if i % 2 == 0 { SEP } else { SEP2 });
            }
        }
        py_strip(&out).to_owned()
    }
}

/// The text of a user turn: the template with the user message and an empty assistant reply.
fn user_turn(content: &str) -> String {
    if content.is_empty() {
        format!("{USER_ROLE}:{ASSISTANT_ROLE}:")
    } else {
        format!("{USER_ROLE}: {content}{SEP}{ASSISTANT_ROLE}:")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A word-level tokenizer with BOS/EOS but none of the VL2 tokens.
    const WORD_LEVEL: &str = r#"{
      "version": "1.0", "truncation": null, "padding": null,
      "added_tokens": [
        {"id": 4, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
        {"id": 5, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
      ],
      "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
      "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "hello": 1, "world": 2, ":": 3, "<s>": 4, "</s>": 5}, "unk_token": "[UNK]"}
    }"#;

    /// A snapshot folder under the system temp dir, removed on drop.
    struct TempSnapshot(std::path::PathBuf);

    impl TempSnapshot {
        fn new(name: &str, tokenizer_config: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("tessera-chat-{}-{name}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("tokenizer.json"), WORD_LEVEL).unwrap();
            std::fs::write(dir.join("tokenizer_config.json"), tokenizer_config).unwrap();
            Self(dir)
        }

        fn load(&self) -> ChatTokenizer {
            ChatTokenizer::from_dir(&self.0).unwrap()
        }
    }

    impl Drop for TempSnapshot {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn word_level(name: &str) -> (TempSnapshot, ChatTokenizer) {
        let snapshot = TempSnapshot::new(
            name,
            r#"{"bos_token": "<s>", "eos_token": {"content": "</s>"}}"#,
        );
        let tokenizer = snapshot.load();
        (snapshot, tokenizer)
    }

    #[test]
    fn missing_vl2_tokens_are_appended_in_reference_order() {
        let (_snapshot, tok) = word_level("append");
        let s = tok.special();
        assert_eq!((s.bos, s.eos), (4, 5));
        let appended = [
            s.pad,
            s.image,
            s.ref_start,
            s.ref_end,
            s.det_start,
            s.det_end,
            s.grounding,
            s.user,
            s.assistant,
        ];
        assert_eq!(appended, [6, 7, 8, 9, 10, 11, 12, 13, 14]);
        assert_eq!(tok.token_to_id(DEFAULT_PAD_TOKEN), Some(6));
        assert_eq!(tok.token_to_id("<|Assistant|>"), Some(14));
        assert_eq!(tok.vocab_size(), 15);
        assert_eq!(tok.encode("hello<image>world").unwrap(), [1, 7, 2]);
        assert_eq!(tok.decode(&[7, 13], false).unwrap(), "<image> <|User|>");
        assert_eq!(tok.decode(&[7, 1, 13], true).unwrap(), "hello");
    }

    #[test]
    fn a_configured_pad_token_is_kept() {
        let snapshot = TempSnapshot::new(
            "pad",
            r#"{"bos_token": "<s>", "eos_token": "</s>", "pad_token": "[UNK]"}"#,
        );
        let tok = snapshot.load();
        assert_eq!(
            (
                tok.special().pad,
                tok.special().image,
                tok.special().assistant
            ),
            (0, 6, 13)
        );
        assert_eq!(tok.vocab_size(), 14);
    }

    #[test]
    fn a_missing_eos_setting_is_an_error() {
        let snapshot = TempSnapshot::new("no-eos", r#"{"bos_token": "<s>"}"#);
        let err = ChatTokenizer::from_dir(&snapshot.0).expect_err("loading must fail");
        assert!(err.to_string().contains("eos token is not set"), "{err}");
    }

    #[test]
    fn role_aliases_deserialize() {
        let cases = [
            ("<|User|>", Role::User),
            ("user", Role::User),
            ("User", Role::User),
            ("<|Assistant|>", Role::Assistant),
            ("assistant", Role::Assistant),
            ("Assistant", Role::Assistant),
            ("system", Role::System),
        ];
        for (name, role) in cases {
            let parsed: Role = serde_json::from_value(serde_json::json!(name)).unwrap();
            assert_eq!(parsed, role, "{name}");
        }
        assert!(serde_json::from_value::<Role>(serde_json::json!("bot")).is_err());
        assert_eq!(serde_json::to_value(Role::User).unwrap(), "<|User|>");
        let m: Message = serde_json::from_str(r#"{"role": "user", "content": "hi"}"#).unwrap();
        assert_eq!(m, Message::new(Role::User, "hi"));
    }

    #[test]
    fn multi_turn_layout_follows_the_template() {
        let (_snapshot, tok) = word_level("layout");
        let (bos, eos, img, user, asst) = (4, 5, 7, 13, 14);
        let messages = [
            Message::new(Role::User, " <image> hello "),
            Message::new(Role::Assistant, "world"),
            Message::new(Role::User, "hello"),
        ];
        let tiling = Tiling::new(1, 1);
        let prompt = tok.encode_conversation(&messages, &[tiling]).unwrap();
        let mut want = vec![bos, user, 3];
        want.extend(std::iter::repeat_n(img, 421));
        want.extend([1, asst, 3, 2, eos, user, 3, 1, asst, 3]);
        assert_eq!(prompt.input_ids, want);
        assert_eq!(prompt.image_runs, vec![3..424]);
        assert_eq!(prompt.num_image_tokens, [421]);
        assert_eq!(prompt.images_seq_mask().iter().filter(|&&m| m).count(), 421);
        assert!(prompt.images_seq_mask()[3] && !prompt.images_seq_mask()[424]);

        let mut explicit = messages.to_vec();
        explicit.push(Message::new(Role::Assistant, ""));
        assert_eq!(
            tok.encode_conversation(&explicit, &[tiling]).unwrap(),
            prompt
        );
        assert_eq!(tok.sft_format(&messages), tok.sft_format(&explicit));
        assert_eq!(
            tok.sft_format(&explicit),
            "<|User|>: <image> hello\n\n<|Assistant|>: world<｜end▁of▁sentence｜><|User|>: hello\n\n<|Assistant|>:"
        );
    }

    #[test]
    fn empty_user_content_uses_the_bare_template() {
        let (_snapshot, tok) = word_level("empty");
        let messages = [Message::new(Role::User, " \n")];
        assert_eq!(
            tok.encode_conversation(&messages, &[]).unwrap().input_ids,
            [4, 13, 3, 14, 3]
        );
        assert_eq!(tok.sft_format(&messages), "<|User|>:<|Assistant|>:");
    }

    #[test]
    fn invalid_conversations_are_prompt_errors() {
        let (_snapshot, tok) = word_level("errors");
        let one_image = [Message::new(Role::User, "<image> hello")];
        let system_late = [
            Message::new(Role::User, "hello"),
            Message::new(Role::System, "world"),
        ];
        let image_in_answer = [
            Message::new(Role::User, "hello"),
            Message::new(Role::Assistant, "<image>"),
        ];
        let cases: [(&[Message], &[Tiling], &str); 5] = [
            (&one_image, &[], "1 `<image>` tag(s) but 0 image tiling(s)"),
            (
                &one_image,
                &[Tiling::new(1, 1), Tiling::new(1, 1)],
                "1 `<image>` tag(s) but 2",
            ),
            (
                &system_late,
                &[],
                "only allowed as the first message, found one at index 1",
            ),
            (
                &image_in_answer,
                &[],
                "message 1 (<|Assistant|>) contains 1 `<image>` tag(s)",
            ),
            (&[], &[], "no messages"),
        ];
        for (messages, tilings, want) in cases {
            match tok.encode_conversation(messages, tilings) {
                Err(Error::Prompt(msg)) => assert!(msg.contains(want), "`{msg}` lacks `{want}`"),
                other => panic!("expected a prompt error containing `{want}`, got {other:?}"),
            }
        }
    }

    #[test]
    fn strip_matches_python() {
        assert_eq!(py_strip("\u{1c}\t hi there\u{3000}\u{a0}\n"), "hi there");
        assert_eq!(py_strip("\u{200b}x"), "\u{200b}x");
    }
}
