//! The model thread: loads the vision tower and projector (no language model, no
//! experts) and runs one tower pass at a time, fed by a bounded channel of jobs
//! with one-shot replies. A full queue is [`Error::Overloaded`]; a job whose
//! caller has gone away is skipped.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use tessera_model::config::{ModelConfig, ProcessorConfig};
use tessera_model::image_tokens::Tiling;
use tessera_model::vision::VisionModel;
use tessera_model::weights::Checkpoint;
use tessera_proto::internal::v1 as pb;
use tessera_proto::tensor;
use tessera_runtime::device::Compute;
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result};

/// What the model thread reports once loaded.
#[derive(Debug)]
pub struct Loaded {
    /// `tessera_model::fingerprint` of the snapshot.
    pub fingerprint: String,
    /// How images are tiled and normalised.
    pub processor: ProcessorConfig,
    /// Where the tower runs (tiles are made there).
    pub device: Device,
}

/// One tower pass: the tiles of some images and their tilings, in order.
struct Job {
    /// (tiles, 3, 384, 384) f32, every image's tiles in order.
    tiles: Tensor,
    tilings: Vec<Tiling>,
    /// One `(num_tokens, hidden)` wire tensor per tiling, in the model's dtype.
    reply: oneshot::Sender<Result<Vec<pb::Tensor>>>,
}

/// The handle to the model thread. Cloning shares the thread; it stops once
/// every handle is dropped.
#[derive(Debug, Clone)]
pub struct Encoder {
    jobs: mpsc::Sender<Job>,
    capacity: usize,
}

impl Encoder {
    /// Starts the model thread, which loads `model` onto `compute` and then
    /// serves jobs; the receiver resolves when loading is done. Up to `max_queued`
    /// jobs wait.
    pub fn start(
        model: &Path,
        compute: Compute,
        max_queued: usize,
    ) -> Result<(Self, oneshot::Receiver<Result<Loaded>>)> {
        let capacity = max_queued.max(1);
        let (jobs, queue) = mpsc::channel(capacity);
        let (loaded_tx, loaded_rx) = oneshot::channel();
        let model = model.to_path_buf();
        std::thread::Builder::new()
            .name("vision-model".into())
            .spawn(move || model_thread(model, compute, queue, loaded_tx))
            .map_err(Error::Spawn)?;
        Ok((Self { jobs, capacity }, loaded_rx))
    }

    /// Encodes the tiles of some images (f32, processor order) into one wire tensor
    /// of image-token embeddings per tiling. Waits for its turn on the model.
    pub async fn embed(&self, tiles: Tensor, tilings: Vec<Tiling>) -> Result<Vec<pb::Tensor>> {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            tiles,
            tilings,
            reply,
        };
        self.jobs.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => Error::Overloaded {
                queued: self.capacity,
            },
            mpsc::error::TrySendError::Closed(_) => Error::ModelStopped,
        })?;
        answer.await.map_err(|_| Error::ModelStopped)?
    }
}

fn model_thread(
    model: PathBuf,
    compute: Compute,
    mut queue: mpsc::Receiver<Job>,
    loaded: oneshot::Sender<Result<Loaded>>,
) {
    let started = std::time::Instant::now();
    let dtype = compute.dtype;
    let (vision, info) = match load(&model, &compute) {
        Ok(ok) => ok,
        Err(e) => {
            let _ = loaded.send(Err(e));
            return;
        }
    };
    tracing::info!(
        model = %model.display(),
        ?dtype,
        weights = %compute.weights,
        held_bytes = tessera_model::held::Held::held_bytes(&vision),
        fingerprint = %info.fingerprint,
        seconds = started.elapsed().as_secs_f64(),
        "vision model loaded"
    );
    if loaded.send(Ok(info)).is_err() {
        return; // shut down while loading
    }
    while let Some(job) = queue.blocking_recv() {
        if job.reply.is_closed() {
            continue; // the caller went away while queued
        }
        let result = catch_unwind(AssertUnwindSafe(|| {
            embed(&vision, dtype, &job.tiles, &job.tilings)
        }))
        .unwrap_or_else(|_| {
            Err(Error::Compute(tessera_model::Error::Request(
                "the vision tower panicked".into(),
            )))
        });
        let _ = job.reply.send(result);
    }
}

/// Loads only what encoding needs: the configs, the tower, the projector and the
/// fingerprint.
fn load(model: &Path, compute: &Compute) -> Result<(VisionModel, Loaded)> {
    let config = ModelConfig::from_dir(model).map_err(Error::Load)?;
    let processor = ProcessorConfig::from_dir(model).map_err(Error::Load)?;
    let checkpoint = Checkpoint::open(model).map_err(Error::Load)?;
    let target = compute.target(&checkpoint);
    let vision = VisionModel::load(&config, target).map_err(Error::Load)?;
    let fingerprint = tessera_model::fingerprint(model).map_err(Error::Load)?;
    Ok((
        vision,
        Loaded {
            fingerprint,
            processor,
            device: compute.device.clone(),
        },
    ))
}

/// One tower pass, split back into one wire tensor per image.
fn embed(
    vision: &VisionModel,
    dtype: DType,
    tiles: &Tensor,
    tilings: &[Tiling],
) -> Result<Vec<pb::Tensor>> {
    let compute = |e: candle_core::Error| Error::Compute(e.into());
    let tiles = tiles.to_dtype(dtype).map_err(compute)?;
    // (Σ num_tokens, hidden), images in order
    let rows = vision
        .embed_images(&tiles, tilings)
        .map_err(Error::Compute)?;
    let mut start = 0;
    let mut out = Vec::with_capacity(tilings.len());
    for tiling in tilings {
        let n = tiling.num_tokens();
        // (num_tokens, hidden)
        let image = rows.narrow(0, start, n).map_err(compute)?;
        out.push(tensor::encode(&image)?);
        start += n;
    }
    Ok(out)
}
