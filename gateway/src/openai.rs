//! OpenAI's chat-completions shapes: a request body → the public `GenerateRequest`,
//! and a `GenerateResponse` or stream message → a completion, a chunk or an error.
//!
//! The conversion only re-spells the request; every check of its content is the
//! gRPC path's (`request::check`, the image headers), so both front-ends accept and
//! refuse the same requests. Images given by `http(s)` URL are fetched first, when
//! the server allows it ([`RemoteImages`]), and then checked like inline ones.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;
use serde_json::{Value, json};
use tessera_proto::v1::{self, GenerateRequest, SamplingParams, StoppingParams, part};
use tonic::Code;

use crate::remote_image::RemoteImages;

mod response;

pub use response::{
    ChunkHeader, completion, completions, finish_reason, groundings, logprobs, usage,
};

/// The body of `POST /v1/chat/completions`. The fields OpenAI defines that this server
/// does not honour are refused when set to anything but their neutral value
/// ([`UNSUPPORTED`]); fields OpenAI does not define are ignored.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    /// Must be the served model's id.
    pub model: String,
    messages: Vec<ChatMessage>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    /// Not OpenAI's; as in vLLM and SGLang.
    top_k: Option<u32>,
    /// Not OpenAI's; Hugging Face's repetition penalty, as in vLLM and SGLang.
    repetition_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    /// Choices to generate, each its own sequence (1 to [`MAX_CHOICES`]).
    n: Option<u32>,
    /// Return each answer token's log probability.
    logprobs: Option<bool>,
    /// With `logprobs`: this many most likely alternatives at each position (0–20).
    top_logprobs: Option<u32>,
    stop: Option<Stop>,
    seed: Option<u64>,
    /// Answer with server-sent events.
    #[serde(default)]
    pub stream: bool,
    stream_options: Option<StreamOptions>,
    /// Every other field, checked against [`UNSUPPORTED`].
    #[serde(flatten)]
    others: serde_json::Map<String, Value>,
}

/// The most choices (`n`) one request may ask for; each runs as its own sequence.
pub const MAX_CHOICES: u32 = 16;

/// OpenAI request fields this server does not honour, each with the values that ask
/// for nothing (accepted) and why another value is refused.
const UNSUPPORTED: &[(&str, &[&str], &str)] = &[
    ("logit_bias", &["{}"], "logit biases are not supported"),
    (
        "response_format",
        &[r#"{"type":"text"}"#],
        "constrained output (JSON mode, JSON schema) is not supported",
    ),
    ("tools", &["[]"], "tool calls are not supported"),
    (
        "tool_choice",
        &[r#""none""#],
        "tool calls are not supported",
    ),
    ("parallel_tool_calls", &[], "tool calls are not supported"),
    ("functions", &["[]"], "function calls are not supported"),
    (
        "function_call",
        &[r#""none""#],
        "function calls are not supported",
    ),
    ("audio", &[], "audio output is not supported"),
    (
        "modalities",
        &[r#"["text"]"#],
        "only text output is supported",
    ),
    ("prediction", &[], "predicted outputs are not supported"),
    ("web_search_options", &[], "web search is not supported"),
];

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct ChatMessage {
    role: String,
    content: Content,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ContentPart {
    Text { text: String },
    ImageUrl { image_url: ImageUrl },
}

#[derive(Debug, Deserialize)]
struct ImageUrl {
    url: String,
}

/// An error in OpenAI's shape, with its HTTP status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status code.
    pub status: u16,
    /// What went wrong; never the prompt or the pixels.
    pub message: String,
    /// OpenAI's error type, e.g. `invalid_request_error`.
    pub kind: &'static str,
    /// The request field at fault, if known.
    pub param: Option<&'static str>,
    /// A machine-readable code, e.g. `model_not_found`.
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 `invalid_request_error`.
    pub fn invalid(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param,
            code: None,
        }
    }

    /// The 404 of a request for another model than the served one.
    pub fn model_not_found(asked: &str, served: &[String]) -> Self {
        let served = served
            .iter()
            .map(|n| format!("{n:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        Self {
            status: 404,
            message: format!("the model {asked:?} does not exist; this server serves {served}"),
            kind: "invalid_request_error",
            param: Some("model"),
            code: Some("model_not_found"),
        }
    }

    /// A 413 for a body over `limit` bytes.
    pub fn too_large(limit: usize) -> Self {
        Self {
            status: 413,
            message: format!(
                "the request body is larger than this server's limit of {limit} bytes \
                 (the gateway's --http-max-body-bytes); send smaller or fewer images"
            ),
            kind: "invalid_request_error",
            param: None,
            code: Some("request_too_large"),
        }
    }

    /// A 415 for a body that is not declared as JSON.
    pub fn not_json(content_type: Option<&str>) -> Self {
        let got = match content_type {
            Some(t) => format!("{t:?}"),
            None => "none".to_owned(),
        };
        Self {
            status: 415,
            message: format!(
                "the request body must be JSON, sent with Content-Type: application/json \
                 (this request's Content-Type: {got})"
            ),
            kind: "invalid_request_error",
            param: None,
            code: Some("unsupported_media_type"),
        }
    }

    /// A 403: the key is known but does not allow this.
    pub fn forbidden(message: &str) -> Self {
        Self {
            status: 403,
            message: message.to_owned(),
            kind: "invalid_request_error",
            param: None,
            code: Some("forbidden"),
        }
    }

    /// The 404 of a path this server does not serve.
    pub fn unknown_url(method: &str, path: &str) -> Self {
        Self {
            status: 404,
            message: format!(
                "Invalid URL ({method} {path}): this server serves POST /v1/chat/completions,                  GET /v1/models and GET /v1/models/{{model}}"
            ),
            kind: "invalid_request_error",
            param: None,
            code: Some("unknown_url"),
        }
    }

    /// The 405 of a served path asked with another method.
    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        Self {
            status: 405,
            message: format!("{path} does not take {method} requests"),
            kind: "invalid_request_error",
            param: None,
            code: Some("method_not_allowed"),
        }
    }

    /// The 408 of a body that did not arrive within `seconds`.
    pub fn body_timeout(seconds: u64) -> Self {
        Self {
            status: 408,
            message: format!(
                "the request body did not arrive within {seconds} s \
                 (the gateway's --http-read-timeout-seconds)"
            ),
            kind: "invalid_request_error",
            param: None,
            code: Some("request_timeout"),
        }
    }

    /// The error of a gRPC status from the shared request path.
    pub fn from_status(status: &tonic::Status) -> Self {
        if status.code() == Code::Unauthenticated {
            return Self {
                status: 401,
                message: status.message().to_owned(),
                kind: "invalid_request_error",
                param: None,
                code: Some("invalid_api_key"),
            };
        }
        let (code, kind) = match status.code() {
            Code::InvalidArgument => (400, "invalid_request_error"),
            Code::ResourceExhausted => (429, "rate_limit_error"),
            Code::Unavailable => (503, "service_unavailable"),
            Code::DeadlineExceeded => (504, "timeout"),
            _ => (500, "server_error"),
        };
        Self {
            status: code,
            message: status.message().to_owned(),
            kind,
            param: None,
            code: None,
        }
    }

    /// `{"error": {message, type, param, code}}`.
    pub fn body(&self) -> Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl ChatRequest {
    /// Parses a request body; a malformed one, or one that sets a field this server
    /// does not honour, is a 400 that says why.
    pub fn parse(body: &[u8]) -> Result<Self, ApiError> {
        let request: Self = serde_json::from_slice(body)
            .map_err(|e| ApiError::invalid(format!("the request body is not valid: {e}"), None))?;
        for &(field, neutral, why) in UNSUPPORTED {
            let Some(value) = request.others.get(field) else {
                continue;
            };
            let neutral = value.is_null()
                || neutral
                    .iter()
                    .any(|n| serde_json::from_str::<Value>(n).ok().as_ref() == Some(value));
            if !neutral {
                return Err(ApiError::invalid(
                    format!("`{field}` is not supported by this server: {why}"),
                    Some(field),
                ));
            }
        }
        if let Some(n) = request.n
            && !(1..=MAX_CHOICES).contains(&n)
        {
            return Err(ApiError::invalid(
                format!("`n` must be between 1 and {MAX_CHOICES}, got {n}"),
                Some("n"),
            ));
        }
        Ok(request)
    }

    /// How many choices to generate.
    pub fn choices(&self) -> usize {
        self.n.unwrap_or(1) as usize
    }

    /// Whether the client asked for log probabilities.
    pub fn wants_logprobs(&self) -> bool {
        self.logprobs == Some(true)
    }

    /// Whether the streamed answer ends with a usage chunk.
    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }

    /// The public request these fields spell, with `remote` fetching (or refusing)
    /// the images given by http(s) URL.
    pub async fn into_generate(self, remote: &RemoteImages) -> Result<GenerateRequest, ApiError> {
        let mut messages = Vec::with_capacity(self.messages.len());
        // (message, part, URL) of each image to fetch; its part is filled in below.
        let mut pending = Vec::new();
        for (i, m) in self.messages.into_iter().enumerate() {
            let role = match m.role.as_str() {
                "system" | "developer" => v1::Role::System,
                "user" => v1::Role::User,
                "assistant" => v1::Role::Assistant,
                other => {
                    return Err(ApiError::invalid(
                        format!(
                            "messages[{i}].role {other:?} is not supported: use system, user \
                             or assistant"
                        ),
                        Some("messages"),
                    ));
                }
            };
            let parts = match m.content {
                Content::Text(text) => vec![text_part(text)],
                Content::Parts(parts) => {
                    let mut out = Vec::with_capacity(parts.len());
                    for (j, p) in parts.into_iter().enumerate() {
                        out.push(match p {
                            ContentPart::Text { text } => text_part(text),
                            ContentPart::ImageUrl { image_url } if is_remote(&image_url.url) => {
                                pending.push((i, j, image_url.url));
                                v1::Part { kind: None }
                            }
                            ContentPart::ImageUrl { image_url } => {
                                image_part(i, j, &image_url.url)?
                            }
                        });
                    }
                    out
                }
            };
            messages.push(v1::Message {
                role: role.into(),
                parts,
            });
        }
        if !pending.is_empty() {
            let urls = pending.iter().map(|(_, _, url)| url.clone()).collect();
            let images = remote.fetch_all(urls).await.map_err(|(k, reason)| {
                let (i, j, _) = pending[k];
                ApiError::invalid(
                    format!("messages[{i}].content[{j}]: {reason}"),
                    Some("messages"),
                )
            })?;
            for ((i, j, _), image) in pending.into_iter().zip(images) {
                messages[i].parts[j].kind = Some(part::Kind::Image(image));
            }
        }
        let stop = match self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        };
        Ok(GenerateRequest {
            messages,
            sampling: Some(SamplingParams {
                temperature: self.temperature,
                top_p: self.top_p,
                top_k: self.top_k,
                repetition_penalty: self.repetition_penalty,
                presence_penalty: self.presence_penalty,
                frequency_penalty: self.frequency_penalty,
                logprobs: self.logprobs,
                top_logprobs: self.top_logprobs,
                seed: self.seed,
            }),
            stopping: Some(StoppingParams {
                max_tokens: self.max_completion_tokens.or(self.max_tokens),
                stop,
                ignore_eos: false,
            }),
            ..Default::default()
        })
    }
}

fn text_part(text: String) -> v1::Part {
    v1::Part {
        kind: Some(part::Kind::Text(text)),
    }
}

/// Whether an image URL is fetched ([`RemoteImages`]) rather than inline.
fn is_remote(url: &str) -> bool {
    let scheme = url.split_once(':').map_or("", |(scheme, _)| scheme);
    scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https")
}

/// The image of a `data:` URI in message `i` part `j`.
fn image_part(i: usize, j: usize, url: &str) -> Result<v1::Part, ApiError> {
    let param = Some("messages");
    let Some(rest) = url.strip_prefix("data:") else {
        return Err(ApiError::invalid(
            format!(
                "messages[{i}].content[{j}]: an image URL must be a data:image/...;base64,... \
                 URI or an http(s) URL"
            ),
            param,
        ));
    };
    let Some((header, data)) = rest.split_once(',') else {
        return Err(ApiError::invalid(
            format!("messages[{i}].content[{j}]: the data: URI has no comma before its data"),
            param,
        ));
    };
    let Some(mime) = header.strip_suffix(";base64") else {
        return Err(ApiError::invalid(
            format!("messages[{i}].content[{j}]: the data: URI must be base64 (…;base64,…)"),
            param,
        ));
    };
    let data = STANDARD.decode(data.trim()).map_err(|e| {
        ApiError::invalid(
            format!("messages[{i}].content[{j}]: the data: URI is not valid base64: {e}"),
            param,
        )
    })?;
    Ok(v1::Part {
        kind: Some(part::Kind::Image(v1::Image {
            data: data.into(),
            mime_type: mime.to_owned(),
        })),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body as a public request, without remote images.
    fn convert(body: &[u8]) -> Result<GenerateRequest, ApiError> {
        let request = ChatRequest::parse(body).unwrap();
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(request.into_generate(&RemoteImages::disabled()))
    }

    #[test]
    fn content_parts_become_public_parts() {
        let body = br#"{"model":"m","messages":[
            {"role":"system","content":"Be brief."},
            {"role":"user","content":[
                {"type":"text","text":"What is this?"},
                {"type":"image_url","image_url":{"url":"data:image/png;base64,AAEC"}}]}],
            "max_tokens":5,"max_completion_tokens":7,"stop":"x","seed":3,"temperature":0.5}"#;
        let req = convert(body).unwrap();
        assert_eq!(req.messages.len(), 2);
        assert_eq!(req.messages[1].parts.len(), 2);
        let Some(part::Kind::Image(image)) = &req.messages[1].parts[1].kind else {
            panic!("not an image");
        };
        assert_eq!(&image.data[..], &[0, 1, 2]);
        assert_eq!(image.mime_type, "image/png");
        let stopping = req.stopping.unwrap();
        assert_eq!(stopping.max_tokens, Some(7));
        assert_eq!(stopping.stop, ["x"]);
        let sampling = req.sampling.unwrap();
        assert_eq!((sampling.seed, sampling.temperature), (Some(3), Some(0.5)));
    }

    #[test]
    fn remote_urls_bad_base64_and_unknown_roles_are_400s() {
        let with = |content: &str| {
            let body = format!(r#"{{"model":"m","messages":[{content}]}}"#);
            convert(body.as_bytes()).unwrap_err()
        };
        let image = |url: &str| {
            with(&format!(
                r#"{{"role":"user","content":[{{"type":"image_url","image_url":{{"url":"{url}"}}}}]}}"#
            ))
        };
        let remote = image("http://example.com/a.png");
        assert_eq!(remote.status, 400);
        assert!(remote.message.contains("remote image URLs are not enabled"));
        assert!(remote.message.contains("--allow-remote-images"));
        assert!(remote.message.starts_with("messages[0].content[0]: "));
        let other = image("ftp://example.com/a.png");
        assert!(other.message.contains("data:image"), "{}", other.message);
        assert_eq!(image("data:image/png;base64,@@@").status, 400);
        assert_eq!(image("data:image/png,abc").status, 400);
        assert_eq!(with(r#"{"role":"tool","content":"x"}"#).status, 400);
        assert_eq!(ChatRequest::parse(b"{").unwrap_err().status, 400);
    }

    #[test]
    fn status_codes_map_to_http_statuses() {
        let of = |code| ApiError::from_status(&tonic::Status::new(code, "m")).status;
        assert_eq!(of(Code::InvalidArgument), 400);
        assert_eq!(of(Code::ResourceExhausted), 429);
        assert_eq!(of(Code::Unavailable), 503);
        assert_eq!(of(Code::DeadlineExceeded), 504);
        assert_eq!(of(Code::Internal), 500);
    }
}
