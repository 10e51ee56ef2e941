//! The per-sequence KV cache.
//!
//! MLA layers keep only what the reference caches (reference-spec §4.3): the normalised
//! latent `c` (`kv_lora_rank` values) and the post-RoPE shared rope key `k_pe`
//! (`qk_rope_head_dim` values) per token. Per-head keys and values are never stored for
//! MLA. Plain-MHA layers (Tiny) keep post-RoPE K and V per head.

use candle_core::{DType, Device, Result, Tensor};

/// A preallocated buffer of `capacity` rows of `width` values, filled from the top.
#[derive(Debug)]
pub struct Rows {
    buf: Tensor,
    len: usize,
}

impl Rows {
    fn new(capacity: usize, width: usize, dtype: DType, device: &Device) -> Result<Self> {
        Ok(Self {
            buf: Tensor::zeros((capacity.max(1), width), dtype, device)?,
            len: 0,
        })
    }

    /// Appends `x` (rows, width), doubling the buffer when it is full.
    pub fn append(&mut self, x: &Tensor) -> Result<()> {
        let (n, width) = x.dims2()?;
        let cap = self.buf.dim(0)?;
        if self.len + n > cap {
            let new_cap = (self.len + n).max(2 * cap);
            let grown = Tensor::zeros((new_cap, width), self.buf.dtype(), self.buf.device())?;
            grown.slice_set(&self.buf.narrow(0, 0, self.len)?, 0, 0)?;
            self.buf = grown;
        }
        self.buf.slice_set(&x.contiguous()?, 0, self.len)?;
        self.len += n;
        Ok(())
    }

    /// The filled rows: (len, width).
    pub fn view(&self) -> Result<Tensor> {
        self.buf.narrow(0, 0, self.len)
    }

    /// Values per row.
    pub fn width(&self) -> usize {
        self.buf.dims()[1]
    }

    /// Rows the buffer can hold before it grows.
    pub fn capacity(&self) -> usize {
        self.buf.dims()[0]
    }

    /// Bytes held by the buffer.
    pub fn allocated_bytes(&self) -> usize {
        self.buf.elem_count() * self.buf.dtype().size_in_bytes()
    }

    fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}

/// What one layer caches.
#[derive(Debug)]
pub enum LayerCache {
    /// Plain MHA: post-RoPE keys and values, `heads · head_dim` values each per token.
    Mha { k: Rows, v: Rows },
    /// MLA: normalised latent `c` and post-RoPE `k_pe` per token.
    Mla { c: Rows, k_pe: Rows },
}

impl LayerCache {
    fn buffers(&self) -> [&Rows; 2] {
        match self {
            Self::Mha { k, v } => [k, v],
            Self::Mla { c, k_pe } => [c, k_pe],
        }
    }

    pub(crate) fn buffers_mut(&mut self) -> [&mut Rows; 2] {
        match self {
            Self::Mha { k, v } => [k, v],
            Self::Mla { c, k_pe } => [c, k_pe],
        }
    }
}

/// The cache of one sequence across all layers.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    len: usize,
}

/// Shape of what a layer caches, per token.
#[derive(Debug, Clone, Copy)]
pub enum CacheLayout {
    Mha {
        width: usize,
    },
    Mla {
        kv_lora_rank: usize,
        rope_dim: usize,
    },
}

impl CacheLayout {
    /// Values per token of the two cached rows: MHA [keys, values], MLA [c, k_pe].
    pub fn widths(&self) -> [usize; 2] {
        match *self {
            Self::Mha { width } => [width, width],
            Self::Mla {
                kv_lora_rank,
                rope_dim,
            } => [kv_lora_rank, rope_dim],
        }
    }
}

impl KvCache {
    /// An empty cache for `layers` layers with room for `capacity` tokens before growing.
    pub fn new(
        layout: CacheLayout,
        layers: usize,
        capacity: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let layers = (0..layers)
            .map(|_| {
                Ok(match layout {
                    CacheLayout::Mha { width } => LayerCache::Mha {
                        k: Rows::new(capacity, width, dtype, device)?,
                        v: Rows::new(capacity, width, dtype, device)?,
                    },
                    CacheLayout::Mla {
                        kv_lora_rank,
                        rope_dim,
                    } => LayerCache::Mla {
                        c: Rows::new(capacity, kv_lora_rank, dtype, device)?,
                        k_pe: Rows::new(capacity, rope_dim, dtype, device)?,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers, len: 0 })
    }

    /// Tokens cached (positions `0..len`).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Tokens the cache holds before it has to grow.
    pub fn capacity(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| l.buffers().map(Rows::capacity))
            .min()
            .unwrap_or(0)
    }

    /// Values stored per token per layer (MLA: `kv_lora_rank + qk_rope_head_dim`).
    pub fn values_per_token_per_layer(&self) -> usize {
        self.layers
            .first()
            .map(|l| l.buffers().iter().map(|r| r.width()).sum())
            .unwrap_or(0)
    }

    /// Bytes allocated by every buffer of every layer.
    pub fn allocated_bytes(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| l.buffers().map(Rows::allocated_bytes))
            .sum()
    }

    /// The cache of layer `i`.
    pub fn layer_mut(&mut self, i: usize) -> &mut LayerCache {
        &mut self.layers[i]
    }

    /// The cache of layer `i`, read-only.
    pub fn layer(&self, i: usize) -> &LayerCache {
        &self.layers[i]
    }

    /// Records that `n` more positions were appended to every layer.
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }

    /// Forgets every position from `len` on (e.g. to re-run the last prompt token).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
        for layer in &mut self.layers {
            for rows in layer.buffers_mut() {
                rows.truncate(len);
            }
        }
    }
}
