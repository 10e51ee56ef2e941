//! Decode-step products at Tiny's widths: candle's blocked matrix multiply against
//! [`tessera_model::gemv::small_rows`] for 1–32 rows (`cargo bench -p tessera-model
//! --bench gemv`). Prints milliseconds per product; `small_rows` is used up to
//! `gemv::MAX_ROWS` rows, with the weights stored as f32, bf16 and f16.

use std::time::Instant;

use candle_core::{Device, Tensor};
use tessera_model::gemv;

fn time(iters: usize, mut f: impl FnMut() -> candle_core::Result<()>) -> candle_core::Result<f64> {
    f()?;
    let start = Instant::now();
    for _ in 0..iters {
        f()?;
    }
    Ok(start.elapsed().as_secs_f64() * 1e3 / iters as f64)
}

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    // lm_head, attention projection, expert up/gate and down at Tiny's widths.
    for (n, k) in [
        (129280usize, 1280usize),
        (1280, 1280),
        (896, 1280),
        (1280, 896),
    ] {
        let w = Tensor::randn(0f32, 0.02, (n, k), &dev)?;
        let w_bf16 = w.to_dtype(candle_core::DType::BF16)?;
        let w_f16 = w.to_dtype(candle_core::DType::F16)?;
        let iters = if n > 10_000 { 5 } else { 200 };
        for m in [1usize, 2, 4, 8, 16, 32] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
            let blocked = time(iters, || x.matmul(&w.t()?).map(drop))?;
            let line = format!("({m:>2} × {k}) · ({n} × {k})ᵀ  matmul {blocked:8.3} ms");
            if m <= gemv::MAX_ROWS {
                let small = time(iters, || gemv::small_rows(&x, &w).map(drop))?;
                let bf16 = time(iters, || gemv::small_rows(&x, &w_bf16).map(drop))?;
                let f16 = time(iters, || gemv::small_rows(&x, &w_f16).map(drop))?;
                println!(
                    "{line}  small_rows f32 {small:8.3} ms  bf16 {bf16:8.3} ms  f16 {f16:8.3} ms"
                );
            } else {
                println!("{line}");
            }
        }
    }
    Ok(())
}
