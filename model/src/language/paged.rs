//! The paged KV cache's storage: for every layer, two tensors of `slots` rows
//! (MLA: latent `c` and post-RoPE `k_pe`; MHA: post-RoPE keys and values). A
//! sequence's rows live at the slots its block table gives them (the scheduler owns
//! the table); a step writes its new rows, then gathers the sequence's rows back in
//! position order for attention.

use candle_core::{DType, Device, Result, Tensor, WithDType};

/// Shape of what a layer caches, per token: MHA post-RoPE keys and values, MLA the
/// normalised latent `c` and the post-RoPE shared rope key `k_pe` (only what the
/// reference caches; per-head MLA keys and values are never stored).
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

/// A zero tensor whose memory is resident: on the CPU a large zeroed allocation is
/// only mapped, and the kernel backs each page at its first write, so one value per
/// page is written (a one, seen by [`std::hint::black_box`] so the compiler keeps it,
/// then the zero back). Other devices allocate for real.
fn resident_zeros(shape: (usize, usize), dtype: DType, device: &Device) -> Result<Tensor> {
    fn touched<T: WithDType>(shape: (usize, usize), device: &Device) -> Result<Tensor> {
        const PAGE: usize = 4096;
        let mut values = vec![T::from_f64(0.0); shape.0 * shape.1];
        let step = (PAGE / std::mem::size_of::<T>()).max(1);
        for value in [1.0, 0.0] {
            for i in (0..values.len()).step_by(step) {
                values[i] = T::from_f64(value);
            }
            std::hint::black_box(&mut values);
        }
        Tensor::from_vec(values, shape, device)
    }
    match (device, dtype) {
        (Device::Cpu, DType::F32) => touched::<f32>(shape, device),
        (Device::Cpu, DType::BF16) => touched::<half::bf16>(shape, device),
        (Device::Cpu, DType::F16) => touched::<half::f16>(shape, device),
        _ => Tensor::zeros(shape, dtype, device),
    }
}

/// Rows of every layer, addressed by slot.
#[derive(Debug)]
pub struct PagedKvCache {
    layers: Vec<[Tensor; 2]>,
    slots: usize,
    widths: [usize; 2],
    dtype: DType,
}

impl PagedKvCache {
    /// Storage for `slots` token rows per layer, zero-filled and, on the CPU,
    /// resident from the start (every page touched), so a process's memory does not
    /// grow as the cache fills.
    pub fn new(
        layout: CacheLayout,
        layers: usize,
        slots: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let widths = layout.widths();
        let layers = (0..layers)
            .map(|_| {
                Ok([
                    resident_zeros((slots.max(1), widths[0]), dtype, device)?,
                    resident_zeros((slots.max(1), widths[1]), dtype, device)?,
                ])
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            slots,
            widths,
            dtype,
        })
    }

    /// Token rows each layer holds.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Bytes one token takes across all layers: `layers × (width₀ + width₁) × dtype`
    /// (MLA: `layers × (kv_lora_rank + qk_rope_head_dim) × dtype`).
    pub fn bytes_per_token(&self) -> usize {
        self.layers.len() * (self.widths[0] + self.widths[1]) * self.dtype.size_in_bytes()
    }

    /// Bytes allocated by every layer's storage.
    pub fn allocated_bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }

    /// Writes `rows` (n, width) each of layer `layer` at `slots` (n of them). Runs of
    /// consecutive slots are written in one copy.
    pub fn write(&self, layer: usize, slots: &[u32], rows: [&Tensor; 2]) -> Result<()> {
        let storage = &self.layers[layer];
        let mut i = 0;
        while i < slots.len() {
            let mut j = i + 1;
            while j < slots.len() && slots[j] == slots[j - 1] + 1 {
                j += 1;
            }
            if slots[j - 1] as usize >= self.slots {
                candle_core::bail!(
                    "slot {} is outside the cache of {} slots",
                    slots[j - 1],
                    self.slots
                );
            }
            for (dst, src) in storage.iter().zip(rows) {
                dst.slice_set(
                    &src.narrow(0, i, j - i)?.contiguous()?,
                    0,
                    slots[i] as usize,
                )?;
            }
            i = j;
        }
        Ok(())
    }

    /// The rows of layer `layer` at `slots`, in order: [(n, width₀), (n, width₁)].
    pub fn gather(&self, layer: usize, slots: &[u32]) -> Result<[Tensor; 2]> {
        let storage = &self.layers[layer];
        let device = storage[0].device();
        // One contiguous run is a view; otherwise gather.
        let contiguous = slots.windows(2).all(|w| w[1] == w[0] + 1);
        if contiguous && let Some(&first) = slots.first() {
            return Ok([
                storage[0].narrow(0, first as usize, slots.len())?,
                storage[1].narrow(0, first as usize, slots.len())?,
            ]);
        }
        let idx = Tensor::from_slice(slots, slots.len(), device)?;
        Ok([
            storage[0].index_select(&idx, 0)?,
            storage[1].index_select(&idx, 0)?,
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_written_at_scattered_slots_come_back_in_order() {
        let layout = CacheLayout::Mla {
            kv_lora_rank: 3,
            rope_dim: 2,
        };
        let cache = PagedKvCache::new(layout, 2, 8, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(cache.bytes_per_token(), 2 * (3 + 2) * 4);
        assert_eq!(cache.allocated_bytes(), 8 * cache.bytes_per_token());
        let c = Tensor::arange(0f32, 12., &Device::Cpu)
            .unwrap()
            .reshape((4, 3))
            .unwrap();
        let k = Tensor::arange(100f32, 108., &Device::Cpu)
            .unwrap()
            .reshape((4, 2))
            .unwrap();
        let slots = [6, 7, 2, 3];
        cache.write(1, &slots, [&c, &k]).unwrap();
        let [c2, k2] = cache.gather(1, &slots).unwrap();
        assert_eq!(c2.to_vec2::<f32>().unwrap(), c.to_vec2::<f32>().unwrap());
        assert_eq!(k2.to_vec2::<f32>().unwrap(), k.to_vec2::<f32>().unwrap());
        // Layer 0 is untouched; a contiguous run reads as a view.
        let [c0, _] = cache.gather(0, &[6, 7]).unwrap();
        assert_eq!(c0.sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        let [run, _] = cache.gather(1, &[2, 3]).unwrap();
        assert_eq!(
            run.to_vec2::<f32>().unwrap(),
            c.narrow(0, 2, 2).unwrap().to_vec2::<f32>().unwrap()
        );
        assert!(
            cache
                .write(
                    0,
                    &[8],
                    [&c.narrow(0, 0, 1).unwrap(), &k.narrow(0, 0, 1).unwrap()]
                )
                .is_err()
        );
    }
}
