//! OpenAI's response shapes: a whole `chat.completion`, its choices (`n`) and
//! `logprobs`, and the chunks of a streamed one.

use serde_json::{Value, json};
use tessera_model::chat::ChatTokenizer;
use tessera_proto::v1::{FinishReason, GenerateResponse, Grounding, TokenLogprob, Usage};

/// OpenAI's `finish_reason` of a public one.
pub fn finish_reason(reason: i32) -> &'static str {
    match FinishReason::try_from(reason) {
        Ok(FinishReason::Length) => "length",
        Ok(FinishReason::Eos | FinishReason::Stop | FinishReason::Unspecified) | Err(_) => "stop",
    }
}

/// OpenAI's `usage` of a public one (image tokens are part of the prompt).
pub fn usage(usage: Option<&Usage>) -> Value {
    let u = usage.cloned().unwrap_or_default();
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    })
}

/// The `groundings` extra field: the same boxes as the gRPC response's.
pub fn groundings(groundings: &[Grounding]) -> Value {
    groundings
        .iter()
        .map(|g| {
            json!({
                "label": g.label,
                "boxes": g.boxes.iter().map(|b| json!({
                    "x1": b.x1, "y1": b.y1, "x2": b.x2, "y2": b.y2,
                })).collect::<Vec<_>>(),
                "image_index": g.image_index,
            })
        })
        .collect()
}

/// One token as OpenAI's `logprobs` show it: its text (decoded alone), the UTF-8 bytes
/// of that text, and its log probability.
fn token_entry(tokenizer: &ChatTokenizer, id: u32, logprob: f32) -> Value {
    let token = tokenizer.decode(&[id], false).unwrap_or_default();
    json!({"token": token, "logprob": logprob, "bytes": token.as_bytes()})
}

/// OpenAI's `logprobs` of a choice (`{"content": [...]}`) for `entries`.
pub fn logprobs(entries: &[TokenLogprob], tokenizer: &ChatTokenizer) -> Value {
    let content: Vec<Value> = entries
        .iter()
        .map(|e| {
            let mut entry = token_entry(tokenizer, e.token_id, e.logprob);
            entry["top_logprobs"] = e
                .top_logprobs
                .iter()
                .map(|t| token_entry(tokenizer, t.token_id, t.logprob))
                .collect();
            entry
        })
        .collect();
    json!({"content": content})
}

/// The `chat.completion` body of several answers to one request (`n`), each with its
/// `logprobs` (null when not asked), as the choices with their indices; the prompt is
/// counted once, the answers' tokens summed.
pub fn completions(answers: &[(GenerateResponse, Value)], model: &str, created: u64) -> Value {
    let (first, _) = &answers[0];
    let mut body = completion(first, model, created, Value::Null);
    body["choices"] = answers
        .iter()
        .enumerate()
        .map(|(i, (response, logprobs))| {
            let mut choice =
                completion(response, model, created, logprobs.clone())["choices"][0].take();
            choice["index"] = json!(i);
            choice
        })
        .collect();
    let prompt = first.usage.as_ref().map_or(0, |u| u.prompt_tokens);
    let answered: u32 = answers
        .iter()
        .map(|(r, _)| r.usage.as_ref().map_or(0, |u| u.completion_tokens))
        .sum();
    body["usage"] = json!({
        "prompt_tokens": prompt,
        "completion_tokens": answered,
        "total_tokens": prompt + answered,
    });
    body
}

/// The `chat.completion` body of `response`, with `logprobs` as its choice's (null
/// when not asked).
pub fn completion(
    response: &GenerateResponse,
    model: &str,
    created: u64,
    logprobs: Value,
) -> Value {
    json!({
        "id": format!("chatcmpl-{}", response.request_id),
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {
                "role": "assistant",
                "content": response.text,
                "groundings": groundings(&response.groundings),
            },
            "logprobs": logprobs,
            "finish_reason": finish_reason(response.finish_reason),
        }],
        "usage": usage(response.usage.as_ref()),
    })
}

/// The fields every `chat.completion.chunk` of one answer shares.
#[derive(Debug, Clone)]
pub struct ChunkHeader {
    /// `chatcmpl-<request id>`.
    pub id: String,
    /// The served model's id.
    pub model: String,
    /// Unix seconds of the request.
    pub created: u64,
}

impl ChunkHeader {
    /// A chunk with one choice of `delta` and `finish_reason`.
    pub fn chunk(&self, delta: Value, finish_reason: Option<&str>) -> Value {
        self.chunk_of(0, delta, finish_reason)
    }

    /// A chunk of choice `index` (of `n`) with `delta` and `finish_reason`.
    pub fn chunk_of(&self, index: usize, delta: Value, finish_reason: Option<&str>) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason}],
        })
    }

    /// [`ChunkHeader::chunk_of`] with the choice's `logprobs`.
    pub fn chunk_with_logprobs(&self, index: usize, delta: Value, logprobs: Value) -> Value {
        let mut chunk = self.chunk_of(index, delta, None);
        chunk["choices"][0]["logprobs"] = logprobs;
        chunk
    }

    /// The closing usage chunk (`stream_options.include_usage`): no choices.
    pub fn usage_chunk(&self, u: Option<&Usage>) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": usage(u),
        })
    }
}
