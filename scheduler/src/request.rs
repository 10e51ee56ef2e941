//! Checking a `SubmitRequest` up front, before it is queued: everything the
//! engine needs is in range, so a bad request fails at once with
//! INVALID_ARGUMENT and a message naming the field, never its contents.

use std::ops::{Deref, Range};
use std::time::Instant;

use tessera_model::generate::GenerationParams;
use tessera_model::sampling::SamplingParams;
use tessera_proto::internal::v1::{Dtype, SubmitRequest, Tensor as WireTensor};

use crate::error::{Error, Result};

/// What of the model a request is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub max_positions: usize,
    pub eos_token_id: u32,
    /// Tokens the KV cache holds: a request needing more is refused.
    pub cache_tokens: usize,
}

/// One image run of a validated request.
#[derive(Debug, Clone)]
pub struct ImageInput {
    /// Prompt positions of its tokens.
    pub range: Range<usize>,
    /// Its `[len, hidden]` float embeddings, still on the wire (the engine decodes them).
    pub embeddings: WireTensor,
    /// The image's content hash, when the caller gave one.
    pub content_hash: Option<[u8; 32]>,
}

/// A request's input ids: its prompt and, when it resumes on this scheduler after
/// another one failed, the output it had generated there (the last
/// [`PromptIds::resumed`] ids). Reads as the slice of every id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptIds {
    ids: Vec<u32>,
    resumed: usize,
}

impl PromptIds {
    /// `ids`, of which the last `resumed` are output generated before; `resumed` is
    /// clamped to `ids.len()`.
    pub fn new(ids: Vec<u32>, resumed: usize) -> Self {
        let resumed = resumed.min(ids.len());
        Self { ids, resumed }
    }

    /// How many of the last ids are the request's own earlier output.
    pub fn resumed(&self) -> usize {
        self.resumed
    }

    /// Every id, prompt then resumed output.
    pub fn into_ids(self) -> Vec<u32> {
        self.ids
    }
}

impl From<Vec<u32>> for PromptIds {
    fn from(ids: Vec<u32>) -> Self {
        Self::new(ids, 0)
    }
}

impl Deref for PromptIds {
    type Target = [u32];

    fn deref(&self) -> &[u32] {
        &self.ids
    }
}

/// A request that passed [`validate`]: ready for the engine.
#[derive(Debug, Clone)]
pub struct Validated {
    /// Every input id; the last `input_ids.resumed()` are resumed output.
    pub input_ids: PromptIds,
    /// Image runs in prompt order.
    pub image_runs: Vec<ImageInput>,
    pub params: GenerationParams,
    /// When the request must be done by (the client's gRPC deadline).
    pub deadline: Option<Instant>,
}

fn invalid(message: impl Into<String>) -> Error {
    Error::InvalidArgument(message.into())
}

/// Checks `req` against `limits`.
pub fn validate(req: SubmitRequest, limits: &Limits) -> Result<Validated> {
    let n = req.input_ids.len();
    if n == 0 {
        return Err(invalid("input_ids is empty"));
    }
    if let Some(i) = req
        .input_ids
        .iter()
        .position(|&id| id as usize >= limits.vocab_size)
    {
        return Err(invalid(format!(
            "input_ids[{i}] is outside the vocabulary of {} tokens",
            limits.vocab_size
        )));
    }

    let mut image_runs = Vec::with_capacity(req.image_runs.len());
    let mut end_of_previous = 0;
    for (i, run) in req.image_runs.into_iter().enumerate() {
        let (start, len) = (run.start as usize, run.len as usize);
        if len == 0 {
            return Err(invalid(format!("image_runs[{i}] is empty")));
        }
        if start + len > n {
            return Err(invalid(format!(
                "image_runs[{i}] covers tokens {start}..{} but the prompt has {n}",
                start + len
            )));
        }
        if start < end_of_previous {
            return Err(invalid(format!(
                "image_runs[{i}] starts at token {start}, inside or before the previous run \
                 (runs must be in prompt order and not overlap)"
            )));
        }
        end_of_previous = start + len;
        let embeddings = run
            .embeddings
            .ok_or_else(|| invalid(format!("image_runs[{i}] has no embeddings")))?;
        check_embeddings(i, &embeddings, len, limits.hidden_size)?;
        let content_hash = match run.content_hash.len() {
            0 => None,
            32 => Some(<[u8; 32]>::try_from(&run.content_hash[..]).expect("32 bytes")),
            n => {
                return Err(invalid(format!(
                    "image_runs[{i}].content_hash has {n} bytes; it must be a 32-byte SHA-256 or empty"
                )));
            }
        };
        image_runs.push(ImageInput {
            range: start..start + len,
            embeddings,
            content_hash,
        });
    }

    let resumed = req.resumed_tokens as usize;
    if resumed > n {
        return Err(invalid(format!(
            "resumed_tokens ({resumed}) is more than the {n} input_ids"
        )));
    }
    if resumed > n - end_of_previous {
        return Err(invalid(format!(
            "resumed_tokens ({resumed}) reaches into image_runs (which end at token \
             {end_of_previous} of {n}); resumed output follows every image"
        )));
    }

    let sampling = req.sampling.ok_or_else(|| invalid("sampling is not set"))?;
    let top_logprobs = sampling.top_logprobs as usize;
    if top_logprobs > tessera_model::sampling::MAX_TOP_LOGPROBS {
        return Err(invalid(format!(
            "sampling.top_logprobs must be at most {}, got {top_logprobs}",
            tessera_model::sampling::MAX_TOP_LOGPROBS
        )));
    }
    let logprobs = sampling.logprobs.then_some(top_logprobs);
    let sampling = SamplingParams {
        temperature: sampling.temperature,
        top_k: (sampling.top_k > 0).then_some(sampling.top_k as usize),
        top_p: sampling.top_p,
        repetition_penalty: sampling.repetition_penalty,
        presence_penalty: sampling.presence_penalty,
        frequency_penalty: sampling.frequency_penalty,
        seed: sampling.seed,
    };
    sampling
        .validate()
        .map_err(|e| invalid(format!("sampling: {}", strip_prefix(&e))))?;

    let stopping = req.stopping.ok_or_else(|| invalid("stopping is not set"))?;
    let max_tokens = stopping.max_tokens as usize;
    if max_tokens == 0 {
        return Err(invalid("stopping.max_tokens must be at least 1"));
    }
    if n + max_tokens > limits.max_positions {
        return Err(invalid(format!(
            "the prompt ({n} tokens) plus max_tokens ({max_tokens}) exceeds the model's \
             {} positions",
            limits.max_positions
        )));
    }
    if n + max_tokens > limits.cache_tokens {
        return Err(invalid(format!(
            "the prompt ({n} tokens) plus max_tokens ({max_tokens}) needs more KV cache than \
             this scheduler has ({} tokens); lower max_tokens or raise --kv-cache-bytes",
            limits.cache_tokens
        )));
    }
    Ok(Validated {
        input_ids: PromptIds::new(req.input_ids, resumed),
        image_runs,
        params: GenerationParams {
            max_new_tokens: max_tokens,
            ignore_eos: stopping.ignore_eos,
            eos_token_id: limits.eos_token_id,
            stop: stopping.stop,
            sampling,
            record_logits: false,
            logprobs,
        },
        deadline: None,
    })
}

/// The message of a model `Request` error without its "invalid request: " prefix.
fn strip_prefix(e: &tessera_model::Error) -> String {
    match e {
        tessera_model::Error::Request(message) => message.clone(),
        other => other.to_string(),
    }
}

/// Run `i`'s embeddings must be a float `[len, hidden]` tensor with matching bytes.
fn check_embeddings(i: usize, t: &WireTensor, len: usize, hidden: usize) -> Result<()> {
    let size = match Dtype::try_from(t.dtype) {
        Ok(Dtype::F32) => 4,
        Ok(Dtype::F16 | Dtype::Bf16) => 2,
        Ok(Dtype::U32 | Dtype::I64 | Dtype::Unspecified) | Err(_) => {
            return Err(invalid(format!(
                "image_runs[{i}].embeddings must be f32, f16 or bf16"
            )));
        }
    };
    if t.shape != [len as u64, hidden as u64] {
        return Err(invalid(format!(
            "image_runs[{i}].embeddings have shape {:?}, expected [{len}, {hidden}] \
             (run length × hidden size)",
            t.shape
        )));
    }
    if t.data.len() != len * hidden * size {
        return Err(invalid(format!(
            "image_runs[{i}].embeddings carry {} bytes, expected {}",
            t.data.len(),
            len * hidden * size
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use tessera_proto::internal::v1::{ImageRun, Sampling, Stopping};

    use super::*;

    const LIMITS: Limits = Limits {
        vocab_size: 100,
        hidden_size: 4,
        max_positions: 32,
        eos_token_id: 1,
        cache_tokens: 30,
    };

    fn embeddings(len: usize) -> WireTensor {
        WireTensor {
            dtype: Dtype::F32 as i32,
            shape: vec![len as u64, 4],
            data: vec![0; len * 16].into(),
        }
    }

    fn run(start: u32, len: u32) -> ImageRun {
        ImageRun {
            start,
            len,
            embeddings: Some(embeddings(len as usize)),
            content_hash: Default::default(),
        }
    }

    fn request() -> SubmitRequest {
        SubmitRequest {
            request_id: "r".into(),
            model_fingerprint: String::new(),
            input_ids: vec![5; 10],
            image_runs: vec![run(2, 3), run(6, 2)],
            sampling: Some(Sampling {
                temperature: 0.0,
                top_p: 1.0,
                top_k: 0,
                repetition_penalty: 1.0,
                seed: 0,
                ..Default::default()
            }),
            stopping: Some(Stopping {
                max_tokens: 8,
                stop: vec![],
                ignore_eos: true,
            }),
            resumed_tokens: 0,
        }
    }

    fn error_of(f: impl FnOnce(&mut SubmitRequest)) -> String {
        let mut req = request();
        f(&mut req);
        match validate(req, &LIMITS) {
            Err(Error::InvalidArgument(message)) => message,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn a_good_request_becomes_generation_params() {
        let v = validate(request(), &LIMITS).unwrap();
        assert_eq!(v.image_runs.len(), 2);
        assert_eq!(v.image_runs[1].range, 6..8);
        assert_eq!(v.image_runs[1].content_hash, None);
        assert_eq!(v.params.max_new_tokens, 8);
        assert!(v.params.ignore_eos);
        assert_eq!(v.params.eos_token_id, 1);
        assert_eq!(v.params.sampling.top_k, None);
        assert_eq!(v.input_ids.resumed(), 0);
    }

    #[test]
    fn resumed_tokens_are_the_last_input_ids_after_every_image() {
        let mut req = request();
        req.resumed_tokens = 2;
        let v = validate(req, &LIMITS).unwrap();
        assert_eq!(v.input_ids.resumed(), 2);
        assert_eq!(v.input_ids.len(), 10);
        assert!(error_of(|r| r.resumed_tokens = 11).contains("more than the 10 input_ids"));
        // The second image run ends at token 8 of 10.
        assert!(error_of(|r| r.resumed_tokens = 3).contains("reaches into image_runs"));
        let mut text_only = request();
        text_only.image_runs.clear();
        text_only.resumed_tokens = 10;
        assert_eq!(
            validate(text_only, &LIMITS).unwrap().input_ids.resumed(),
            10
        );
    }

    #[test]
    fn each_bad_field_is_named() {
        assert!(error_of(|r| r.input_ids.clear()).contains("input_ids is empty"));
        assert!(error_of(|r| r.input_ids[3] = 100).contains("input_ids[3]"));
        assert!(error_of(|r| r.image_runs[1] = run(9, 2)).contains("prompt has 10"));
        assert!(error_of(|r| r.image_runs[1] = run(4, 2)).contains("overlap"));
        assert!(error_of(|r| r.image_runs[0] = run(0, 0)).contains("empty"));
        let wrong_len = |r: &mut SubmitRequest| r.image_runs[0].embeddings = Some(embeddings(2));
        assert!(error_of(wrong_len).contains("expected [3, 4]"));
        let wrong_dtype = |r: &mut SubmitRequest| {
            r.image_runs[0].embeddings.as_mut().unwrap().dtype = Dtype::U32 as i32
        };
        assert!(error_of(wrong_dtype).contains("f32, f16 or bf16"));
        let short = |r: &mut SubmitRequest| {
            let data = &mut r.image_runs[0].embeddings.as_mut().unwrap().data;
            data.truncate(data.len() - 1);
        };
        assert!(error_of(short).contains("bytes"));
        let hot = |r: &mut SubmitRequest| r.sampling.as_mut().unwrap().temperature = -1.0;
        assert!(error_of(hot).contains("sampling: temperature"));
        let none = |r: &mut SubmitRequest| r.stopping.as_mut().unwrap().max_tokens = 0;
        assert!(error_of(none).contains("max_tokens must be at least 1"));
        let long = |r: &mut SubmitRequest| r.stopping.as_mut().unwrap().max_tokens = 23;
        assert!(error_of(long).contains("exceeds the model's 32 positions"));
        let big = |r: &mut SubmitRequest| r.stopping.as_mut().unwrap().max_tokens = 21;
        assert!(error_of(big).contains("raise --kv-cache-bytes"));
        let hash = |r: &mut SubmitRequest| r.image_runs[0].content_hash = vec![1; 5].into();
        assert!(error_of(hash).contains("32-byte SHA-256"));
        assert!(error_of(|r| r.sampling = None).contains("sampling is not set"));
    }
}
