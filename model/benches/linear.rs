//! Linear products at Tiny's widths (`cargo bench -p tessera-model --bench linear`):
//! candle's f32 matrix multiply against [`Linear::forward`] with the weight held as
//! f32, bf16, f16 and int8, for 1–64 rows of `x`. Prints milliseconds per product and
//! the weight bytes streamed per second by each.
//!
//! Up to [`gemv::max_rows`] rows (32 with AVX2, else 4) `Linear` runs the decode
//! kernel; above, with AVX-512 and up to 128 rows, the widened rows (each block of
//! weight rows widened to f32 once, 512-bit tiles) for weights up to 16 M elements;
//! beyond, every format goes through the widened panels. On AVX-512 CPUs the language
//! model holds its weights packed in panels of 16 rows for the outer-product kernel
//! (`linear::packed`): the "bf16 packed" column, up to 128 rows, then the panels.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use tessera_model::linear::{Linear, gemv};

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
    println!(
        "rows ≤ {} use the decode kernel on this CPU; GB/s = weight bytes held / time",
        gemv::max_rows()
    );
    // lm_head, attention projection, expert up/gate and down at Tiny's widths.
    for (n, k) in [
        (129280usize, 1280usize),
        (1280, 1280),
        (896, 1280),
        (1280, 896),
    ] {
        let w = Tensor::randn(0f32, 0.02, (n, k), &dev)?;
        let mut layers = vec![
            Linear::new(w.clone())?,
            Linear::new(w.to_dtype(DType::BF16)?)?,
            Linear::new(w.to_dtype(DType::F16)?)?,
            Linear::int8(&w)?,
        ];
        // The language model's layout on AVX-512 CPUs.
        let packed = Linear::pack(&w.to_dtype(DType::BF16)?)?;
        if packed.is_packed() {
            layers.push(packed);
        }
        let iters = if n > 10_000 { 3 } else { 30 };
        for m in [1usize, 2, 4, 8, 16, 32, 64, 128, 256] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
            let wt = w.t()?;
            let blocked = time(iters, || x.matmul(&wt).map(drop))?;
            let mut line = format!("({m:>2} × {k}) · ({n} × {k})ᵀ  candle f32 {blocked:8.3} ms");
            for layer in &layers {
                let ms = time(iters, || layer.forward(&x).map(drop))?;
                let gbs = layer.bytes() as f64 / (ms * 1e-3) / 1e9;
                let packed = if layer.is_packed() { " packed" } else { "" };
                line.push_str(&format!(
                    "  {}{packed} {ms:8.3} ms ({gbs:5.1} GB/s)",
                    layer.format()
                ));
            }
            println!("{line}");
        }
    }
    // Prefill products: the SigLIP tower over one request's five tiles (5 × 729 rows,
    // width 1152, MLP 4304) and the language prefill of a one-image prompt (1036 rows).
    println!("prefill products; GFLOP/s = 2·m·n·k / time");
    for (m, n, k) in [
        (3645usize, 3456usize, 1152usize),
        (3645, 1152, 1152),
        (3645, 4304, 1152),
        (3645, 1152, 4304),
        (1036, 1280, 1280),
        (1036, 6848, 1280),
        (1036, 1280, 6848),
    ] {
        let w = Tensor::randn(0f32, 0.02, (n, k), &dev)?;
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
        let flop = 2.0 * (m * n * k) as f64;
        let wt = w.t()?;
        let blocked = time(2, || x.matmul(&wt).map(drop))?;
        let mut line = format!(
            "({m} × {k}) · ({n} × {k})ᵀ  candle f32 {blocked:8.1} ms ({:5.1} GFLOP/s)",
            flop / (blocked * 1e-3) / 1e9
        );
        for layer in [
            Linear::new(w.clone())?,
            Linear::new(w.to_dtype(DType::BF16)?)?,
            Linear::pack(&w.to_dtype(DType::BF16)?)?,
        ] {
            let ms = time(2, || layer.forward(&x).map(drop))?;
            let packed = if layer.is_packed() { " packed" } else { "" };
            line.push_str(&format!(
                "  {}{packed} {ms:8.1} ms ({:5.1} GFLOP/s)",
                layer.format(),
                flop / (ms * 1e-3) / 1e9
            ));
        }
        println!("{line}");
    }
    Ok(())
}
