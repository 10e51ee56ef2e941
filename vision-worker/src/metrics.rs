//! The vision-worker's Prometheus families (label `vision_worker`, its member
//! id), defined in the process registry of `tessera_runtime::metrics`.

use std::sync::LazyLock;

use tessera_runtime::metrics::{
    ENCODE_BUCKETS, Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    counters, gauges, histograms,
};

/// One vision-worker's metrics (label `vision_worker`, its member id).
#[derive(Debug, Clone)]
pub struct VisionMetrics {
    /// Images served from the embedding cache.
    pub cache_hits: IntCounter,
    /// Images looked up and not found (every image when the cache is off).
    pub cache_misses: IntCounter,
    /// Images the cache holds now.
    pub cache_entries: IntGauge,
    /// Seconds per tower pass (one per request with an image not cached).
    pub encode_seconds: Histogram,
    /// Images run through the tower.
    pub images_encoded: IntCounter,
}

impl VisionMetrics {
    /// The metrics of the vision-worker whose member id is `vision_worker`.
    pub fn new(vision_worker: &str) -> Self {
        struct Families {
            hits: IntCounterVec,
            misses: IntCounterVec,
            entries: IntGaugeVec,
            encode: HistogramVec,
            images: IntCounterVec,
        }
        static VISION: LazyLock<Families> = LazyLock::new(|| {
            let l = &["vision_worker"];
            Families {
                hits: counters(
                    "tessera_vision_cache_hits_total",
                    "Images served from the vision-worker's embedding cache.",
                    l,
                ),
                misses: counters(
                    "tessera_vision_cache_misses_total",
                    "Images not found in the embedding cache (encoded).",
                    l,
                ),
                entries: gauges(
                    "tessera_vision_cache_entries",
                    "Encoded images the embedding cache holds.",
                    l,
                ),
                encode: histograms(
                    "tessera_vision_encode_seconds",
                    "Seconds per vision-tower pass (the images of one request not cached).",
                    ENCODE_BUCKETS,
                    l,
                ),
                images: counters(
                    "tessera_vision_images_encoded_total",
                    "Images run through the vision tower.",
                    l,
                ),
            }
        });
        let l = &[vision_worker];
        Self {
            cache_hits: VISION.hits.with_label_values(l),
            cache_misses: VISION.misses.with_label_values(l),
            cache_entries: VISION.entries.with_label_values(l),
            encode_seconds: VISION.encode.with_label_values(l),
            images_encoded: VISION.images.with_label_values(l),
        }
    }
}

#[cfg(test)]
mod tests {
    use tessera_runtime::metrics::{Scrape, render};

    use super::*;

    #[test]
    fn a_vision_worker_reports_under_its_member_id() {
        let vision = VisionMetrics::new("metrics-test-vision");
        vision.cache_hits.inc();
        vision.encode_seconds.observe(0.02);
        let s = Scrape::parse(&render()).unwrap();
        let me = ("vision_worker", "metrics-test-vision");
        assert_eq!(s.sum("tessera_vision_cache_hits_total", &[me]), 1.0);
        assert_eq!(
            s.sum(
                "tessera_vision_encode_seconds_bucket",
                &[me, ("le", "0.025")]
            ),
            1.0
        );
    }
}
