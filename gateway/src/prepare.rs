//! From a public request to a scheduler's `SubmitRequest`: check the request, plan
//! the prompt from the image headers, bound `max_tokens` by the model's maximum
//! position, and have one vision-worker encode all the request's images (another
//! one if it fails: `crate::failover`), checked against the plan.

use sha2::{Digest, Sha256};
use std::sync::Arc;
use tessera_model::image_tokens::cropping_enabled;

use tessera_proto::internal::v1::vision_client::VisionClient;
use tessera_proto::internal::v1::{
    EncodeRequest, EncodedImage, ImageInput, ImageRun, SubmitRequest,
};
use tessera_proto::v1::GenerateRequest;
use tessera_runtime::{Role, telemetry};
use tonic::transport::Channel;

use crate::config::Limits;
use crate::error::{Error, Result};
use crate::failover::{Failed, call_with_retries};
use crate::model_files::ModelFiles;
use crate::planning::{ImagePlan, Plan, image_size, plan};
use crate::request::{CheckedRequest, check};
use crate::upstream::Upstream;

/// A request ready for a scheduler, with what the answer needs to report.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The request's id (the client's or a new one).
    pub request_id: String,
    /// What the scheduler runs.
    pub submit: SubmitRequest,
    /// One entry per image, in prompt order.
    pub images: Vec<ImagePlan>,
    /// Image tokens among the prompt's tokens.
    pub image_tokens: usize,
}

impl Prepared {
    /// Tokens in the prompt, image tokens included.
    pub fn prompt_tokens(&self) -> usize {
        self.submit.input_ids.len()
    }

    /// The stop strings the answer is cut at.
    pub fn stop(&self) -> &[String] {
        self.submit.stopping.as_ref().map_or(&[], |s| &s.stop[..])
    }

    /// Whether the end-of-sequence token is ordinary output.
    pub fn ignore_eos(&self) -> bool {
        self.submit.stopping.as_ref().is_some_and(|s| s.ignore_eos)
    }
}

/// Checks, plans and encodes `req` with `files`; images go to a vision-worker of
/// `upstream`. Text-only requests call no vision-worker.
pub async fn prepare(
    files: &Arc<ModelFiles>,
    upstream: &Upstream,
    limits: &Limits,
    req: GenerateRequest,
    request_id: String,
) -> Result<Prepared> {
    let limits = &Limits {
        max_text_bytes: limits.max_text_bytes.min(files.max_text_bytes()),
        ..*limits
    };
    let checked = check(req, limits, files.tokenizer.image_token())?;
    let plan = plan_blocking(files, &checked, limits.max_image_pixels).await?;
    let max_tokens = max_tokens(&plan, &checked, limits, files.max_positions())?;
    let image_runs = if checked.images.is_empty() {
        Vec::new()
    } else {
        encode_images(files, upstream, &plan, &checked.images, &request_id).await?
    };
    let stopping = checked.stopping(max_tokens);
    Ok(Prepared {
        submit: SubmitRequest {
            request_id: scoped(&request_id),
            model_fingerprint: files.fingerprint.clone(),
            input_ids: plan.prompt.input_ids.clone(),
            image_runs,
            sampling: Some(checked.sampling),
            stopping: Some(stopping),
            resumed_tokens: 0,
        },
        image_tokens: plan.image_tokens(),
        images: plan.images,
        request_id,
    })
}

/// The id a request runs under inside the cluster: the client's id with a suffix of
/// this gateway's own, so that ids are never shared between clients (a second client
/// reusing an id runs as well, and cannot name the first one's request), while logs
/// still show the client's id.
fn scoped(request_id: &str) -> String {
    format!("{request_id}~{}", &telemetry::new_request_id()[..12])
}

/// Reads the image headers and tokenizes the conversation on a blocking thread.
async fn plan_blocking(
    files: &Arc<ModelFiles>,
    checked: &CheckedRequest,
    max_pixels: u64,
) -> Result<Plan> {
    let files = Arc::clone(files);
    let messages = checked.messages.clone();
    // `Bytes` clones share the buffers.
    let images: Vec<ImageInput> = checked.images.clone();
    tokio::task::spawn_blocking(move || {
        let sizes = images
            .iter()
            .enumerate()
            .map(|(i, image)| image_size(i, &image.data, max_pixels))
            .collect::<Result<Vec<_>>>()?;
        plan(&files.tokenizer, &files.processor, &messages, &sizes)
    })
    .await
    .map_err(Error::Join)?
}

/// The scheduler's `max_tokens`: the client's, if the prompt leaves room for it, else
/// the server's default lowered to the room left.
fn max_tokens(
    plan: &Plan,
    checked: &CheckedRequest,
    limits: &Limits,
    max_positions: usize,
) -> Result<u32> {
    let prompt = plan.prompt.input_ids.len();
    let room = max_positions.saturating_sub(prompt);
    let room_u32 = u32::try_from(room).unwrap_or(u32::MAX);
    match checked.max_tokens {
        Some(n) if n as usize > room => Err(Error::invalid(format!(
            "the prompt is {prompt} tokens and max_tokens is {n}: together more than the \
             model's {max_positions} positions; set max_tokens to at most {room} or shorten \
             the conversation"
        ))),
        Some(n) => Ok(n),
        None if room == 0 => Err(Error::invalid(format!(
            "the prompt is {prompt} tokens, which leaves no room for an answer within the \
             model's {max_positions} positions; shorten the conversation"
        ))),
        None => Ok(limits.default_max_tokens.min(room_u32)),
    }
}

/// One `Vision.Encode` with all the request's images, on another vision-worker when
/// one is gone ([`call_with_retries`]); each answer is checked against the plan and
/// becomes the image run it fills.
async fn encode_images(
    files: &ModelFiles,
    upstream: &Upstream,
    plan: &Plan,
    images: &[ImageInput],
    request_id: &str,
) -> Result<Vec<ImageRun>> {
    let request = EncodeRequest {
        request_id: request_id.to_owned(),
        model_fingerprint: files.fingerprint.clone(),
        // `Bytes` clones share the buffers.
        images: images.to_vec(),
    };
    let mut failed = Failed::new(Role::VisionWorker);
    let encode = |mut client: VisionClient<Channel>| {
        let request = telemetry::request_with_id(request.clone(), request_id);
        async move { client.encode(request).await }
    };
    let (member, response) =
        call_with_retries(&mut failed, |ex| upstream.vision_except(ex), encode).await?;
    tracing::debug!(vision_worker = %member.id, images = images.len(), "images encoded");
    let encoded = response.into_inner().images;
    if encoded.len() != plan.images.len() {
        return Err(Error::protocol(
            Role::VisionWorker,
            format!(
                "{} images encoded for a request of {}",
                encoded.len(),
                plan.images.len()
            ),
        ));
    }
    let hidden = files.config.language.hidden_size;
    let cropping = cropping_enabled(images.len());
    encoded
        .into_iter()
        .zip(&plan.images)
        .zip(&plan.prompt.image_runs)
        .zip(images)
        .enumerate()
        .map(|(k, (((got, want), run), image))| {
            check_encoded(k, &got, want, hidden)?;
            Ok(ImageRun {
                start: run.start as u32,
                len: run.len() as u32,
                embeddings: got.embeddings,
                content_hash: content_hash(&image.data, cropping).to_vec().into(),
            })
        })
        .collect()
}

/// What names an image's embeddings for the scheduler's prefix cache: the file's
/// bytes and whether it was cropped into tiles (the vision-worker's cache key).
fn content_hash(data: &[u8], cropping: bool) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"tessera.image.v1");
    h.update([u8::from(cropping)]);
    h.update(data);
    h.finalize().into()
}

/// Checks encoded image `k` against its plan: size, tiling, token count and the
/// embeddings' shape `[tokens, hidden]`.
fn check_encoded(k: usize, got: &EncodedImage, want: &ImagePlan, hidden: usize) -> Result<()> {
    let expected = want.to_public();
    let found = (
        got.width,
        got.height,
        got.tiles_x,
        got.tiles_y,
        got.num_tokens,
    );
    let planned = (
        expected.width,
        expected.height,
        expected.tiles_x,
        expected.tiles_y,
        expected.tokens,
    );
    if found != planned {
        return Err(Error::protocol(
            Role::VisionWorker,
            format!(
                "image {k} was encoded as (width, height, tiles_x, tiles_y, tokens) = \
                 {found:?}, the gateway planned {planned:?}"
            ),
        ));
    }
    let shape = got.embeddings.as_ref().map(|t| t.shape.as_slice());
    let expected_shape = [u64::from(expected.tokens), hidden as u64];
    if shape != Some(&expected_shape[..]) {
        return Err(Error::protocol(
            Role::VisionWorker,
            format!("image {k} has embeddings of shape {shape:?}, expected {expected_shape:?}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_model::image_tokens::Tiling;
    use tessera_proto::internal::v1::Tensor;

    fn encoded(tiles: (u32, u32), tokens: u32, shape: Vec<u64>) -> EncodedImage {
        EncodedImage {
            width: 640,
            height: 480,
            tiles_x: tiles.0,
            tiles_y: tiles.1,
            num_tokens: tokens,
            embeddings: Some(Tensor {
                shape,
                ..Default::default()
            }),
        }
    }

    #[test]
    fn encoded_images_must_match_the_plan() {
        let want = ImagePlan {
            width: 640,
            height: 480,
            tiling: Tiling::new(2, 2),
        };
        assert!(check_encoded(0, &encoded((2, 2), 1023, vec![1023, 256]), &want, 256).is_ok());
        for bad in [
            encoded((1, 1), 421, vec![421, 256]),
            encoded((2, 2), 1023, vec![1023, 128]),
            encoded((2, 2), 1023, vec![1023 * 256]),
        ] {
            let status: tonic::Status = check_encoded(0, &bad, &want, 256).unwrap_err().into();
            assert_eq!(status.code(), tonic::Code::Internal);
        }
        let mut missing = encoded((2, 2), 1023, vec![]);
        missing.embeddings = None;
        assert!(check_encoded(0, &missing, &want, 256).is_err());
    }
}
