//! Vision throughput at the released SigLIP-SO400M size (random weights) and the cost of
//! preprocessing real image files: `cargo bench -p tessera-model --bench vision`.
//!
//! Prints seconds per tile of tower + projector for batches of 1, 5 (a 640×480 image) and
//! 9 tiles (1200×400), images per second of decode + tile + normalise (PNG and JPEG), and
//! JPEG decoding alone for a 640×480 photo and a 12-megapixel one (made in memory).

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use tessera_model::config::ModelConfig;
use tessera_model::processor::{
    ImageLimits, decode_image, load_image, normalization, process_images, tiles_to_tensor,
};
use tessera_model::vision::VisionModel;
use tessera_model::weights::{Checkpoint, LoadTarget, WeightFormat};

fn random_vision_checkpoint(cfg: &ModelConfig, path: &Path) -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let (c, mlp, d) = (
        cfg.vision.width,
        cfg.vision.mlp_hidden(),
        cfg.projector.n_embed,
    );
    let p = cfg.vision.patch_size;
    let grid = cfg.vision.image_size / p;
    let r = |shape: &[usize]| Tensor::randn(0f32, 0.02, shape, &dev);
    let mut t = std::collections::HashMap::new();
    t.insert(
        "vision.patch_embed.proj.weight".to_string(),
        r(&[c, 3, p, p])?,
    );
    t.insert("vision.patch_embed.proj.bias".to_string(), r(&[c])?);
    t.insert("vision.pos_embed".to_string(), r(&[1, grid * grid, c])?);
    for b in 0..cfg.vision.layers {
        let k = |n: &str| format!("vision.blocks.{b}.{n}");
        for n in ["norm1", "norm2"] {
            t.insert(
                k(&format!("{n}.weight")),
                Tensor::ones(c, DType::F32, &dev)?,
            );
            t.insert(k(&format!("{n}.bias")), r(&[c])?);
        }
        t.insert(k("attn.qkv.weight"), r(&[3 * c, c])?);
        t.insert(k("attn.qkv.bias"), r(&[3 * c])?);
        t.insert(k("attn.proj.weight"), r(&[c, c])?);
        t.insert(k("attn.proj.bias"), r(&[c])?);
        t.insert(k("mlp.fc1.weight"), r(&[mlp, c])?);
        t.insert(k("mlp.fc1.bias"), r(&[mlp])?);
        t.insert(k("mlp.fc2.weight"), r(&[c, mlp])?);
        t.insert(k("mlp.fc2.bias"), r(&[c])?);
    }
    t.insert(
        "vision.norm.weight".to_string(),
        Tensor::ones(c, DType::F32, &dev)?,
    );
    t.insert("vision.norm.bias".to_string(), r(&[c])?);
    t.insert("projector.layers.0.weight".to_string(), r(&[d, 4 * c])?);
    t.insert("projector.layers.0.bias".to_string(), r(&[d])?);
    t.insert("projector.layers.2.weight".to_string(), r(&[d, d])?);
    t.insert("projector.layers.2.bias".to_string(), r(&[d])?);
    t.insert("image_newline".to_string(), r(&[d])?);
    t.insert("view_seperator".to_string(), r(&[d])?);
    candle_core::safetensors::save(&t, path)
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    let cfg = ModelConfig::from_file(&root.join("released-configs/deepseek-vl2-tiny/config.json"))
        .unwrap();
    let dir = std::env::temp_dir().join(format!("tessera-bench-vision-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("model.safetensors");
    eprintln!(
        "writing random SigLIP-SO400M weights ({} layers, width {})…",
        cfg.vision.layers, cfg.vision.width
    );
    random_vision_checkpoint(&cfg, &file).unwrap();
    let ckpt = Checkpoint::open(&dir).unwrap();
    let target = LoadTarget {
        checkpoint: &ckpt,
        dtype: DType::F32,
        weights: WeightFormat::Auto,
        device: &Device::Cpu,
    };
    let vision = VisionModel::load(&cfg, target).unwrap();

    println!("vision tower + projector, f32, {} threads", rayon_threads());
    for tiles in [1usize, 5, 9] {
        let x = Tensor::randn(0f32, 0.5, (tiles, 3, 384, 384), &Device::Cpu).unwrap();
        vision.encode_tiles(&x.narrow(0, 0, 1).unwrap()).unwrap(); // warm up
        let start = Instant::now();
        vision.encode_tiles(&x).unwrap();
        let s = start.elapsed().as_secs_f64();
        println!(
            "  {tiles} tiles: {s:.2} s total, {:.2} s/tile",
            s / tiles as f64
        );
    }
    drop(vision);
    std::fs::remove_dir_all(&dir).ok();

    let processor =
        tessera_model::config::ProcessorConfig::from_dir(&root.join("tiny-mha-softmax")).unwrap();
    println!("preprocessing (decode + tile + normalise)");
    for (fixture, name) in [
        ("tiny-mha-softmax", "img_640x480.png"),
        ("jpeg", "photo_q90_420.jpg"),
        ("small-mla-softmax", "img_1200x400.png"),
    ] {
        let path = root.join(fixture).join(name);
        let iters = 20;
        let start = Instant::now();
        for _ in 0..iters {
            let img = load_image(&path, &ImageLimits::default()).unwrap();
            let processed = process_images(&[img], &processor);
            let (mean, std) = normalization(&processor);
            tiles_to_tensor(
                processed.iter().flat_map(|p| &p.tiles),
                mean,
                std,
                &Device::Cpu,
            )
            .unwrap();
        }
        let s = start.elapsed().as_secs_f64() / iters as f64;
        println!("  {name}: {:.1} ms/image, {:.1} images/s", s * 1e3, 1.0 / s);
    }

    println!("JPEG decode (libjpeg-turbo)");
    let photo = std::fs::read(root.join("jpeg/photo_q90_420.jpg")).unwrap();
    let big = twelve_megapixel_jpeg(&photo);
    for (name, bytes, iters) in [("640x480 q90", &photo, 50), ("4000x3000 q90", &big, 5)] {
        let start = Instant::now();
        for _ in 0..iters {
            std::hint::black_box(decode_image(bytes, &ImageLimits::default()).unwrap());
        }
        let s = start.elapsed().as_secs_f64() / iters as f64;
        println!("  {name}: {:.1} ms/image", s * 1e3);
    }
}

/// A 4000×3000 JPEG: the fixture photo scaled up, with the fine detail a camera adds (a
/// smooth upscale alone would compress far better than a photo), encoded at quality 90.
fn twelve_megapixel_jpeg(photo: &[u8]) -> Vec<u8> {
    let small = decode_image(photo, &ImageLimits::default()).unwrap();
    let mut big = image::imageops::resize(&small, 4000, 3000, image::imageops::Triangle);
    let mut seed = 0x9e37_79b9_u32;
    for v in big.iter_mut() {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        *v = v.saturating_add_signed((seed % 25) as i8 - 12);
    }
    let mut compress = mozjpeg::Compress::new(mozjpeg::ColorSpace::JCS_RGB);
    compress.set_size(4000, 3000);
    compress.set_quality(90.0);
    let mut started = compress.start_compress(Vec::new()).unwrap();
    started.write_scanlines(big.as_raw()).unwrap();
    started.finish().unwrap()
}

fn rayon_threads() -> String {
    std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".into())
}
