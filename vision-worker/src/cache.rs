//! The embedding cache: encoded images by the SHA-256 of their bytes and whether
//! cropping was on (a request with more than two images tiles every image as one
//! global and one local view, so the same bytes encode differently).
//!
//! A least-recently-used map of bounded size behind a mutex; values are shared
//! (`Arc`) and their tensor bytes are reference-counted, so a hit copies nothing.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use lru::LruCache;
use sha2::{Digest, Sha256};
use tessera_model::image_tokens::Tiling;
use tessera_proto::internal::v1 as pb;

/// What identifies an encoded image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey {
    /// SHA-256 of the image file's bytes.
    pub digest: [u8; 32],
    /// Whether the request's image count enabled cropping (`cropping_enabled`).
    pub cropping: bool,
}

impl CacheKey {
    /// The key of `bytes` encoded with or without cropping.
    pub fn new(bytes: &[u8], cropping: bool) -> Self {
        Self {
            digest: Sha256::digest(bytes).into(),
            cropping,
        }
    }
}

/// One encoded image, as returned to callers.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedEntry {
    /// The original image's size in pixels.
    pub width: u32,
    pub height: u32,
    /// Local tiles across and down.
    pub tiling: Tiling,
    /// Its image-token embeddings, (num_tokens, hidden), on the wire.
    pub embeddings: pb::Tensor,
}

impl EncodedEntry {
    /// The entry as a response message (the tensor bytes are shared, not copied).
    pub fn to_message(&self) -> pb::EncodedImage {
        pb::EncodedImage {
            width: self.width,
            height: self.height,
            tiles_x: self.tiling.width as u32,
            tiles_y: self.tiling.height as u32,
            num_tokens: self.tiling.num_tokens() as u32,
            embeddings: Some(self.embeddings.clone()),
        }
    }
}

/// Hits, misses and size of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CacheStats {
    /// Images served from the cache.
    pub hits: u64,
    /// Images looked up and not found (every image when the cache is disabled).
    pub misses: u64,
    /// Images held now.
    pub entries: usize,
}

/// A bounded LRU of encoded images; `capacity` 0 disables it.
#[derive(Debug)]
pub struct EmbeddingCache {
    entries: Option<Mutex<LruCache<CacheKey, Arc<EncodedEntry>>>>,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl EmbeddingCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: NonZeroUsize::new(capacity).map(|n| Mutex::new(LruCache::new(n))),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    fn lock(
        lru: &Mutex<LruCache<CacheKey, Arc<EncodedEntry>>>,
    ) -> std::sync::MutexGuard<'_, LruCache<CacheKey, Arc<EncodedEntry>>> {
        // A panic elsewhere cannot leave the map inconsistent: every operation is one call.
        lru.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The entry for `key`, counted as a hit or a miss.
    pub fn get(&self, key: &CacheKey) -> Option<Arc<EncodedEntry>> {
        let found = self
            .entries
            .as_ref()
            .and_then(|lru| Self::lock(lru).get(key).cloned());
        let counter = if found.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Stores `entry` under `key`, evicting the least recently used one when full.
    pub fn insert(&self, key: CacheKey, entry: Arc<EncodedEntry>) {
        if let Some(lru) = &self.entries {
            Self::lock(lru).put(key, entry);
        }
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            entries: self.entries.as_ref().map_or(0, |lru| Self::lock(lru).len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(width: u32) -> Arc<EncodedEntry> {
        Arc::new(EncodedEntry {
            width,
            height: 1,
            tiling: Tiling::new(1, 1),
            embeddings: pb::Tensor::default(),
        })
    }

    #[test]
    fn cropping_is_part_of_the_key() {
        let cache = EmbeddingCache::new(4);
        cache.insert(CacheKey::new(b"png", true), entry(1));
        assert_eq!(cache.get(&CacheKey::new(b"png", true)).unwrap().width, 1);
        assert!(cache.get(&CacheKey::new(b"png", false)).is_none());
        assert!(cache.get(&CacheKey::new(b"other", true)).is_none());
        assert_eq!(
            cache.stats(),
            CacheStats {
                hits: 1,
                misses: 2,
                entries: 1
            }
        );
    }

    #[test]
    fn the_least_recently_used_entry_goes_first() {
        let cache = EmbeddingCache::new(2);
        let (a, b, c) = (
            CacheKey::new(b"a", true),
            CacheKey::new(b"b", true),
            CacheKey::new(b"c", true),
        );
        cache.insert(a, entry(1));
        cache.insert(b, entry(2));
        assert!(cache.get(&a).is_some()); // b is now the oldest
        cache.insert(c, entry(3));
        assert!(cache.get(&b).is_none());
        assert!(cache.get(&a).is_some() && cache.get(&c).is_some());
        assert_eq!(cache.stats().entries, 2);
    }

    #[test]
    fn capacity_zero_disables_the_cache() {
        let cache = EmbeddingCache::new(0);
        let key = CacheKey::new(b"a", true);
        cache.insert(key, entry(1));
        assert!(cache.get(&key).is_none());
        assert_eq!(
            cache.stats(),
            CacheStats {
                hits: 0,
                misses: 1,
                entries: 0
            }
        );
    }

    #[test]
    fn entries_become_response_messages() {
        let message = EncodedEntry {
            width: 640,
            height: 480,
            tiling: Tiling::new(2, 2),
            embeddings: pb::Tensor::default(),
        }
        .to_message();
        assert_eq!((message.tiles_x, message.tiles_y), (2, 2));
        assert_eq!(message.num_tokens, 1023);
        assert_eq!((message.width, message.height), (640, 480));
    }
}
