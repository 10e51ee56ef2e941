//! Checks a public `GenerateRequest` and turns it into the chat messages of the
//! model crate, the request's images in prompt order, and the scheduler's sampling
//! and stopping with the defaults applied.
//!
//! Each image part becomes the tokenizer's `<image>` tag where it stands among the
//! text parts, so a request is the same prompt as the `tessera generate
//! --conversation` file with that content.

use tessera_model::chat::{Message, Role};
use tessera_model::sampling::SamplingParams;
use tessera_proto::internal::v1::{ImageInput, Sampling, Stopping};
use tessera_proto::v1::{self, GenerateRequest, part};
use tessera_runtime::telemetry;

use crate::config::Limits;
use crate::error::{Error, Result};

/// Longest accepted client request id, in bytes.
pub const MAX_REQUEST_ID_LEN: usize = 128;
/// MIME types of the image formats the model's processor decodes.
const IMAGE_MIME_TYPES: &[&str] = &[
    "image/png",
    "image/jpeg",
    "image/jpg",
    "image/webp",
    "image/gif",
    "image/bmp",
];

/// A request that passed every check that needs no tokenizer.
#[derive(Debug, Clone)]
pub struct CheckedRequest {
    /// The conversation for the chat template.
    pub messages: Vec<Message>,
    /// The images, in prompt order.
    pub images: Vec<ImageInput>,
    /// Sampling with every default applied.
    pub sampling: Sampling,
    /// `max_tokens` the client set, if any.
    pub max_tokens: Option<u32>,
    /// The client's stop strings (none empty).
    pub stop: Vec<String>,
    /// Keep generating after the end-of-sequence token.
    pub ignore_eos: bool,
}

impl CheckedRequest {
    /// The scheduler's stopping for `max_tokens`.
    pub fn stopping(&self, max_tokens: u32) -> Stopping {
        Stopping {
            max_tokens,
            stop: self.stop.clone(),
            ignore_eos: self.ignore_eos,
        }
    }
}

/// The request's id: the `x-request-id` metadata, else the body's field, else a new one.
pub fn request_id(metadata: &tonic::metadata::MetadataMap, body: &str) -> Result<String> {
    let id = telemetry::request_id(metadata).unwrap_or_else(|| body.to_owned());
    if id.is_empty() {
        return Ok(telemetry::new_request_id());
    }
    if id.len() > MAX_REQUEST_ID_LEN || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::invalid(format!(
            "request_id must be at most {MAX_REQUEST_ID_LEN} printable ASCII characters \
             without spaces"
        )));
    }
    Ok(id)
}

/// Checks `req` against `limits` and splits it into messages, images and parameters.
/// `image_token` is the tokenizer's image tag (`<image>`).
pub fn check(req: GenerateRequest, limits: &Limits, image_token: &str) -> Result<CheckedRequest> {
    if req.messages.is_empty() {
        return Err(Error::invalid(
            "the request has no messages: send at least one user message",
        ));
    }
    let mut messages = Vec::with_capacity(req.messages.len());
    let mut images = Vec::new();
    let text_bytes: usize = req
        .messages
        .iter()
        .flat_map(|m| &m.parts)
        .map(|p| match &p.kind {
            Some(part::Kind::Text(text)) => text.len(),
            _ => 0,
        })
        .sum();
    if text_bytes > limits.max_text_bytes {
        return Err(Error::invalid(format!(
            "the conversation's text is {text_bytes} bytes, more than the {} bytes that could \
             fit in the model's context; shorten it",
            limits.max_text_bytes
        )));
    }
    for (i, message) in req.messages.into_iter().enumerate() {
        let role = role_of(i, message.role)?;
        if message.parts.is_empty() {
            return Err(Error::invalid(format!(
                "message {i} has no parts: give it at least one text or image part"
            )));
        }
        let mut content = String::new();
        for (j, p) in message.parts.into_iter().enumerate() {
            match p.kind {
                None => {
                    return Err(Error::invalid(format!(
                        "message {i} part {j} is empty: set its `text` or its `image`"
                    )));
                }
                Some(part::Kind::Text(text)) => {
                    if text.contains(image_token) {
                        return Err(Error::invalid(format!(
                            "message {i} part {j}: text may not contain the `{image_token}` \
                             tag; send each image as an image part where it stands"
                        )));
                    }
                    content.push_str(&text);
                }
                Some(part::Kind::Image(image)) => {
                    if role != Role::User {
                        return Err(Error::invalid(format!(
                            "message {i} part {j}: images belong in user messages"
                        )));
                    }
                    images.push(image_input(i, j, image)?);
                    content.push_str(image_token);
                }
            }
        }
        messages.push(Message::new(role, content));
    }
    if images.len() > limits.max_images {
        return Err(Error::invalid(format!(
            "the request has {} images, more than this server's limit of {}",
            images.len(),
            limits.max_images
        )));
    }
    let sampling = sampling(req.sampling.unwrap_or_default())?;
    let stopping = req.stopping.unwrap_or_default();
    if stopping.max_tokens == Some(0) {
        return Err(Error::invalid(
            "max_tokens must be at least 1 (leave it unset for the server's default)",
        ));
    }
    if let Some(k) = stopping.stop.iter().position(String::is_empty) {
        return Err(Error::invalid(format!(
            "stop string {k} is empty: every stop string needs at least one character"
        )));
    }
    Ok(CheckedRequest {
        messages,
        images,
        sampling,
        max_tokens: stopping.max_tokens,
        stop: stopping.stop,
        ignore_eos: stopping.ignore_eos,
    })
}

/// The template role of message `i`.
fn role_of(i: usize, role: i32) -> Result<Role> {
    match v1::Role::try_from(role) {
        Ok(v1::Role::User) => Ok(Role::User),
        Ok(v1::Role::Assistant) => Ok(Role::Assistant),
        Ok(v1::Role::System) => Ok(Role::System),
        Ok(v1::Role::Unspecified) | Err(_) => Err(Error::invalid(format!(
            "message {i} has no valid role: set ROLE_USER, ROLE_ASSISTANT or ROLE_SYSTEM"
        ))),
    }
}

/// The image of message `i` part `j`, with its data and MIME type checked.
fn image_input(i: usize, j: usize, image: v1::Image) -> Result<ImageInput> {
    if image.data.is_empty() {
        return Err(Error::invalid(format!(
            "message {i} part {j}: the image data is empty"
        )));
    }
    let mime = image.mime_type.trim().to_ascii_lowercase();
    if !mime.is_empty() && !IMAGE_MIME_TYPES.contains(&mime.as_str()) {
        return Err(Error::invalid(format!(
            "message {i} part {j}: unsupported image MIME type {:?}; send PNG, JPEG, WebP, \
             GIF or BMP (or leave mime_type empty)",
            image.mime_type
        )));
    }
    Ok(ImageInput {
        data: image.data,
        mime_type: image.mime_type,
    })
}

/// The scheduler's sampling: the client's values or the defaults, validated.
fn sampling(p: v1::SamplingParams) -> Result<Sampling> {
    let params = SamplingParams {
        temperature: p.temperature.unwrap_or(0.0),
        top_k: p.top_k.map(|k| k as usize).filter(|&k| k > 0),
        top_p: p.top_p.unwrap_or(1.0),
        repetition_penalty: p.repetition_penalty.unwrap_or(1.0),
        presence_penalty: p.presence_penalty.unwrap_or(0.0),
        frequency_penalty: p.frequency_penalty.unwrap_or(0.0),
        seed: p.seed.unwrap_or_else(random_seed),
    };
    params.validate().map_err(|e| match e {
        tessera_model::Error::Request(m) => Error::InvalidArgument(m),
        other => Error::InvalidArgument(other.to_string()),
    })?;
    let top_logprobs = p.top_logprobs.unwrap_or(0);
    if top_logprobs as usize > tessera_model::sampling::MAX_TOP_LOGPROBS {
        return Err(Error::InvalidArgument(format!(
            "top_logprobs must be at most {}, got {top_logprobs}",
            tessera_model::sampling::MAX_TOP_LOGPROBS
        )));
    }
    let logprobs = p.logprobs.unwrap_or(false);
    if top_logprobs > 0 && !logprobs {
        return Err(Error::InvalidArgument(
            "top_logprobs needs logprobs set to true".into(),
        ));
    }
    Ok(Sampling {
        logprobs,
        top_logprobs,
        temperature: params.temperature,
        top_p: params.top_p,
        top_k: p.top_k.unwrap_or(0),
        repetition_penalty: params.repetition_penalty,
        presence_penalty: params.presence_penalty,
        frequency_penalty: params.frequency_penalty,
        seed: params.seed,
    })
}

/// A server-chosen seed: different for every request.
fn random_seed() -> u64 {
    let id = telemetry::new_request_id();
    u64::from_str_radix(&id[..16], 16).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_proto::v1::{Part, SamplingParams as PublicSampling};

    fn text(s: &str) -> Part {
        Part {
            kind: Some(part::Kind::Text(s.into())),
        }
    }

    fn image(data: &[u8]) -> Part {
        Part {
            kind: Some(part::Kind::Image(v1::Image {
                data: data.to_vec().into(),
                mime_type: String::new(),
            })),
        }
    }

    fn message(role: v1::Role, parts: Vec<Part>) -> v1::Message {
        v1::Message {
            role: role.into(),
            parts,
        }
    }

    #[test]
    fn images_become_tags_where_they_stand() {
        let req = GenerateRequest {
            messages: vec![
                message(v1::Role::System, vec![text("Be brief.")]),
                message(
                    v1::Role::User,
                    vec![
                        text("This is image_1: "),
                        image(b"a"),
                        text("\nAnd "),
                        image(b"b"),
                    ],
                ),
            ],
            ..Default::default()
        };
        let checked = check(req, &Limits::default(), "<image>").unwrap();
        assert_eq!(
            checked.messages,
            vec![
                Message::new(Role::System, "Be brief."),
                Message::new(Role::User, "This is image_1: <image>\nAnd <image>"),
            ]
        );
        let data: Vec<&[u8]> = checked.images.iter().map(|i| &i.data[..]).collect();
        assert_eq!(data, [b"a", b"b"]);
        assert_eq!(checked.sampling.temperature, 0.0);
        assert_eq!(checked.sampling.top_p, 1.0);
        assert_eq!(checked.sampling.repetition_penalty, 1.0);
        assert_eq!(checked.max_tokens, None);
    }

    #[test]
    fn unset_seeds_differ_and_set_values_are_kept() {
        let seeded = PublicSampling {
            temperature: Some(0.7),
            top_k: Some(5),
            seed: Some(42),
            ..Default::default()
        };
        let s = sampling(seeded).unwrap();
        assert_eq!((s.temperature, s.top_k, s.seed), (0.7, 5, 42));
        let a = sampling(PublicSampling::default()).unwrap().seed;
        let b = sampling(PublicSampling::default()).unwrap().seed;
        assert_ne!(a, b);
    }

    #[test]
    fn request_ids_come_from_metadata_then_body_then_the_server() {
        let mut md = tonic::metadata::MetadataMap::new();
        assert_eq!(request_id(&md, "body-id").unwrap(), "body-id");
        assert_eq!(request_id(&md, "").unwrap().len(), 32);
        telemetry::set_request_id(&mut md, "meta-id");
        assert_eq!(request_id(&md, "body-id").unwrap(), "meta-id");
        let md = tonic::metadata::MetadataMap::new();
        assert!(request_id(&md, "has space").is_err());
        assert!(request_id(&md, &"x".repeat(MAX_REQUEST_ID_LEN + 1)).is_err());
    }
}
