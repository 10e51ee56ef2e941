//! The `tessera.internal.v1.Vision` service: `Encode` checks the request on the
//! runtime (cheap checks only), then hashes, looks up, decodes and tiles the
//! images on a blocking thread, and sends the tiles of the images not in the
//! cache to the model thread as one tower pass. Cache hits and misses and tower
//! passes are counted in [`Stats`] and in the worker's Prometheus metrics.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use candle_core::{Device, Tensor};
use tessera_model::config::ProcessorConfig;
use tessera_model::image_tokens::{Tiling, cropping_enabled};
use tessera_model::processor::{
    ImageLimits, ProcessedImage, decode_image, normalization, process_image, tiles_to_tensor,
};
use tessera_proto::internal::v1::vision_server::Vision;
use tessera_proto::internal::v1::{EncodeRequest, EncodeResponse, ImageInput};
use tessera_runtime::telemetry;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::cache::{CacheKey, CacheStats, EmbeddingCache, EncodedEntry};
use crate::config::Config;
use crate::encoder::{Encoder, Loaded};
use crate::error::{Error, Result};
use crate::metrics::VisionMetrics;

/// What the service counts, for tests and operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// The embedding cache's hits, misses and size.
    pub cache: CacheStats,
    /// Tower passes run (one per request with at least one image not cached).
    pub tower_passes: u64,
    /// Images encoded by those passes.
    pub images_encoded: u64,
}

/// What exists once the model has loaded.
#[derive(Debug)]
struct Ready {
    encoder: Encoder,
    fingerprint: String,
    processor: ProcessorConfig,
    /// Where the tower runs: tiles are made there.
    device: Device,
    metrics: VisionMetrics,
}

#[derive(Debug)]
struct Inner {
    limits: ImageLimits,
    cache: EmbeddingCache,
    ready: OnceLock<Ready>,
    tower_passes: AtomicU64,
    images_encoded: AtomicU64,
}

/// Serves `tessera.internal.v1.Vision`. Clones share the model, cache and counters.
#[derive(Debug, Clone)]
pub struct VisionService {
    inner: Arc<Inner>,
}

/// Where one requested image's embeddings come from.
enum Slot {
    Cached(Arc<EncodedEntry>),
    /// Index into [`Plan::fresh`].
    Fresh(usize),
}

/// An image that goes through the tower.
struct Fresh {
    key: CacheKey,
    width: u32,
    height: u32,
    tiling: Tiling,
}

/// One request's images after the cache and the processor.
struct Plan {
    slots: Vec<Slot>,
    /// Distinct uncached images, in batch order.
    fresh: Vec<Fresh>,
    /// Their tiles, (tiles, 3, 384, 384) f32; `None` when every image was cached.
    tiles: Option<Tensor>,
}

impl VisionService {
    /// A service that answers UNAVAILABLE until its model is ready.
    pub fn new(cfg: &Config) -> Self {
        Self {
            inner: Arc::new(Inner {
                limits: cfg.image_limits(),
                cache: EmbeddingCache::new(cfg.cache_entries),
                ready: OnceLock::new(),
                tower_passes: AtomicU64::new(0),
                images_encoded: AtomicU64::new(0),
            }),
        }
    }

    /// Cache hits and misses and tower passes so far.
    pub fn stats(&self) -> Stats {
        Stats {
            cache: self.inner.cache.stats(),
            tower_passes: self.inner.tower_passes.load(Ordering::Relaxed),
            images_encoded: self.inner.images_encoded.load(Ordering::Relaxed),
        }
    }

    /// The served model's fingerprint, once loaded.
    pub fn fingerprint(&self) -> Option<&str> {
        self.inner.ready.get().map(|r| r.fingerprint.as_str())
    }

    /// Starts answering requests with the loaded model, counting them in
    /// `metrics`. Only the first call counts.
    pub(crate) fn set_ready(&self, encoder: Encoder, loaded: Loaded, metrics: VisionMetrics) {
        let _ = self.inner.ready.set(Ready {
            encoder,
            fingerprint: loaded.fingerprint,
            processor: loaded.processor,
            device: loaded.device,
            metrics,
        });
    }

    async fn encode_images(&self, req: EncodeRequest) -> Result<EncodeResponse> {
        let ready = self.inner.ready.get().ok_or(Error::Loading)?;
        if !req.model_fingerprint.is_empty() && req.model_fingerprint != ready.fingerprint {
            return Err(Error::FingerprintMismatch {
                request: req.model_fingerprint,
                ours: ready.fingerprint.clone(),
            });
        }
        if req.images.is_empty() {
            return Err(Error::NoImages);
        }
        if let Some(index) = req
            .images
            .iter()
            .position(|im| !im.mime_type.is_empty() && !im.mime_type.starts_with("image/"))
        {
            return Err(Error::MimeType { index });
        }
        let this = self.clone();
        let plan = tokio::task::spawn_blocking(move || this.plan(&req.images))
            .await
            .map_err(Error::Join)??;

        let embeddings = match plan.tiles {
            Some(tiles) => {
                let tilings = plan.fresh.iter().map(|f| f.tiling).collect();
                let started = std::time::Instant::now();
                let out = ready.encoder.embed(tiles, tilings).await?;
                let metrics = &ready.metrics;
                metrics
                    .encode_seconds
                    .observe(started.elapsed().as_secs_f64());
                metrics.images_encoded.inc_by(out.len() as u64);
                self.inner.tower_passes.fetch_add(1, Ordering::Relaxed);
                self.inner
                    .images_encoded
                    .fetch_add(out.len() as u64, Ordering::Relaxed);
                out
            }
            None => Vec::new(),
        };
        let fresh: Vec<Arc<EncodedEntry>> = plan
            .fresh
            .iter()
            .zip(embeddings)
            .map(|(f, embeddings)| {
                let entry = Arc::new(EncodedEntry {
                    width: f.width,
                    height: f.height,
                    tiling: f.tiling,
                    embeddings,
                });
                self.inner.cache.insert(f.key, entry.clone());
                entry
            })
            .collect();
        let entries = self.inner.cache.stats().entries;
        ready
            .metrics
            .cache_entries
            .set(i64::try_from(entries).unwrap_or(i64::MAX));
        let images = plan
            .slots
            .iter()
            .map(|slot| match slot {
                Slot::Cached(entry) => entry.to_message(),
                Slot::Fresh(i) => fresh[*i].to_message(),
            })
            .collect();
        Ok(EncodeResponse { images })
    }

    /// Hashes every image, looks it up, and decodes and tiles the rest. Blocking.
    fn plan(&self, images: &[ImageInput]) -> Result<Plan> {
        let ready = self.inner.ready.get().ok_or(Error::Loading)?;
        // Cropping depends on how many images the request (the conversation) has.
        let cropping = cropping_enabled(images.len());
        let mut slots = Vec::with_capacity(images.len());
        let mut fresh = Vec::new();
        let mut processed: Vec<ProcessedImage> = Vec::new();
        let mut pending: HashMap<CacheKey, usize> = HashMap::new();
        for (index, image) in images.iter().enumerate() {
            let key = CacheKey::new(&image.data, cropping);
            if let Some(&i) = pending.get(&key) {
                slots.push(Slot::Fresh(i)); // the same bytes twice in one request
                continue;
            }
            let cached = self.inner.cache.get(&key);
            let counter = match cached {
                Some(_) => &ready.metrics.cache_hits,
                None => &ready.metrics.cache_misses,
            };
            counter.inc();
            if let Some(entry) = cached {
                slots.push(Slot::Cached(entry));
                continue;
            }
            let rgb = decode_image(&image.data, &self.inner.limits)
                .map_err(|source| Error::BadImage { index, source })?;
            let p = process_image(&rgb, &ready.processor, cropping);
            pending.insert(key, fresh.len());
            slots.push(Slot::Fresh(fresh.len()));
            fresh.push(Fresh {
                key,
                width: p.original_size.0,
                height: p.original_size.1,
                tiling: p.tiling,
            });
            processed.push(p);
        }
        let tiles = if processed.is_empty() {
            None
        } else {
            let (mean, std) = normalization(&ready.processor);
            let tiles = tiles_to_tensor(
                processed.iter().flat_map(|p| &p.tiles),
                mean,
                std,
                &ready.device,
            )
            .map_err(|e| Error::Compute(e.into()))?;
            Some(tiles)
        };
        Ok(Plan {
            slots,
            fresh,
            tiles,
        })
    }
}

#[tonic::async_trait]
impl Vision for VisionService {
    async fn encode(
        &self,
        request: Request<EncodeRequest>,
    ) -> Result<Response<EncodeResponse>, Status> {
        let header_id = telemetry::request_id(request.metadata());
        let req = request.into_inner();
        let request_id = header_id
            .or_else(|| (!req.request_id.is_empty()).then(|| req.request_id.clone()))
            .unwrap_or_else(telemetry::new_request_id);
        let span = tracing::info_span!("encode", %request_id, images = req.images.len());
        async move {
            let started = std::time::Instant::now();
            match self.encode_images(req).await {
                Ok(response) => {
                    tracing::debug!(seconds = started.elapsed().as_secs_f64(), "encoded");
                    Ok(Response::new(response))
                }
                Err(e) => {
                    let status = Status::from(e);
                    if status.code() == tonic::Code::Internal {
                        tracing::error!(message = status.message(), "encode failed");
                    } else {
                        tracing::info!(code = ?status.code(), message = status.message(), "encode refused");
                    }
                    Err(status)
                }
            }
        }
        .instrument(span)
        .await
    }
}
