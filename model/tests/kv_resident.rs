//! The paged KV cache is resident from the start: building it raises the process's
//! resident memory by (nearly) all it allocates, so RSS stays flat as the cache
//! fills. One test in its own binary, so no other test's allocations move the RSS.

use candle_core::{DType, Device};
use tessera_model::language::{CacheLayout, PagedKvCache};

/// The process's resident memory (`VmRSS`), in bytes.
fn rss() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("a VmRSS line");
    let kb: usize = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

#[test]
fn the_pool_is_resident_once_built() {
    for dtype in [DType::F32, DType::BF16] {
        let before = rss();
        let layout = CacheLayout::Mla {
            kv_lora_rank: 512,
            rope_dim: 64,
        };
        // 4 layers × 8192 slots × 576 values: 72 MiB in f32, 36 MiB in bf16.
        let cache = PagedKvCache::new(layout, 4, 8192, dtype, &Device::Cpu).unwrap();
        let allocated = cache.allocated_bytes();
        let grown = rss().saturating_sub(before);
        println!(
            "{dtype:?}: allocated {} MiB, resident grew {} MiB",
            allocated >> 20,
            grown >> 20
        );
        assert!(
            grown * 10 >= allocated * 9,
            "{dtype:?}: RSS grew {grown} bytes for a {allocated}-byte pool: not resident"
        );
        drop(cache);
    }
}
