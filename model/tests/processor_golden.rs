//! Golden tests of the image processor against the reference fixtures (written by
//! `DeepseekVLV2Processor.tokenize_with_images`, with `process_one`'s ≤2-images cropping rule):
//! chosen tilings, every 384×384 tile byte for byte against the PNGs the reference wrote,
//! per-tile statistics of the normalised tensor (1e-6 relative), and bad inputs.

use std::path::{Path, PathBuf};

use candle_core::Device;
use image::RgbImage;
use serde_json::Value;
use tessera_model::Error;
use tessera_model::config::ProcessorConfig;
use tessera_model::processor::{
    ImageLimits, ProcessedImage, decode_image, load_image, normalization, process_images,
    select_best_resolution, tiles_to_tensor,
};

const FIXTURES: [&str; 2] = ["tiny-mha-softmax", "small-mla-softmax"];
const TILE_PIXELS: f64 = 384.0 * 384.0;

fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

fn cases(dir: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(dir.join("cases.json")).expect("cases.json");
    let json: Value = serde_json::from_str(&text).expect("cases.json parses");
    json["cases"].as_array().expect("cases array").clone()
}

fn pairs(v: &Value) -> Vec<[usize; 2]> {
    v.as_array()
        .expect("array of pairs")
        .iter()
        .map(|p| [0, 1].map(|i| p[i].as_u64().expect("integer") as usize))
        .collect()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("array of numbers")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

/// Where two tiles first differ and by how many bytes, or `None` if identical.
fn tile_diff(ours: &RgbImage, expected: &RgbImage) -> Option<String> {
    if ours.dimensions() != expected.dimensions() {
        return Some(format!(
            "size {:?} != expected {:?}",
            ours.dimensions(),
            expected.dimensions()
        ));
    }
    let (a, b) = (ours.as_raw(), expected.as_raw());
    let first = a.iter().zip(b).position(|(x, y)| x != y)?;
    let count = a.iter().zip(b).filter(|(x, y)| x != y).count();
    let (pixel, channel) = (first / 3, first % 3);
    let width = ours.width() as usize;
    Some(format!(
        "first difference at (x {}, y {}, channel {channel}): ours {} vs {}; {count} bytes differ",
        pixel % width,
        pixel / width,
        a[first],
        b[first]
    ))
}

fn close(ours: f64, expected: f64) -> bool {
    (ours - expected).abs() <= 1e-6 * expected.abs().max(1e-3)
}

/// Checks one case; returns the number of tiles compared and appends failures to `errors`.
fn check_case(dir: &Path, case: &Value, errors: &mut Vec<String>) -> usize {
    let name = case["name"].as_str().expect("case name");
    let files: Vec<&str> = case["image_files"]
        .as_array()
        .expect("image_files")
        .iter()
        .map(|f| f.as_str().expect("file name"))
        .collect();
    let cfg = ProcessorConfig::from_dir(dir).expect("processor_config.json");
    let images: Vec<RgbImage> = files
        .iter()
        .map(|f| load_image(&dir.join(f), &ImageLimits::default()).expect("fixture image"))
        .collect();
    let processed: Vec<ProcessedImage> = process_images(&images, &cfg);

    let sizes = pairs(&case["image_sizes"]);
    let best = pairs(&case["best_resolution"]);
    let crops = pairs(&case["images_spatial_crop"]);
    let tokens: Vec<usize> = floats(&case["num_image_tokens"])
        .iter()
        .map(|&n| n as usize)
        .collect();
    assert_eq!(processed.len(), files.len(), "{name}: image count");
    for (i, p) in processed.iter().enumerate() {
        let (w, h) = p.original_size;
        assert_eq!([w as usize, h as usize], sizes[i], "{name} img{i}: size");
        if case["cropping_enabled"].as_bool() == Some(true) {
            let chosen = select_best_resolution(w as usize, h as usize, &cfg.candidate_resolutions);
            assert_eq!(chosen, best[i], "{name} img{i}: best_resolution");
        }
        let tiling = [p.tiling.width, p.tiling.height];
        assert_eq!(tiling, crops[i], "{name} img{i}: images_spatial_crop");
        assert_eq!(
            [tiling[0] * 384, tiling[1] * 384],
            best[i],
            "{name} img{i}: best"
        );
        assert_eq!(p.tiling.num_tokens(), tokens[i], "{name} img{i}: tokens");
        assert_eq!(p.tiles.len(), p.tiling.num_tiles(), "{name} img{i}: tiles");
    }

    let expected_tiles = case["tiles"].as_array().expect("tiles");
    let ours: Vec<&RgbImage> = processed.iter().flat_map(|p| &p.tiles).collect();
    assert_eq!(ours.len(), expected_tiles.len(), "{name}: tile count");
    let (mean, std) = normalization(&cfg);
    let tensor = tiles_to_tensor(ours.iter().copied(), mean, std, &Device::Cpu).expect("tensor");
    assert_eq!(tensor.dims(), &[ours.len(), 3, 384, 384]);
    let values = tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap();

    for (n, (tile, stats)) in ours.iter().zip(expected_tiles).enumerate() {
        let png = stats["png"].as_str().expect("png path");
        let label = format!("{name}: tile {n} ({png})");
        let expected = image::open(dir.join(png)).expect("tile png").to_rgb8();
        if let Some(diff) = tile_diff(tile, &expected) {
            errors.push(format!("{label}: {diff}"));
        }
        let planes = &values[n * 3 * 384 * 384..(n + 1) * 3 * 384 * 384];
        let (sums, means) = (floats(&stats["sum"]), floats(&stats["mean"]));
        for (c, plane) in planes.chunks_exact(384 * 384).enumerate() {
            let sum: f64 = plane.iter().map(|&v| f64::from(v)).sum();
            let mean = sum / TILE_PIXELS;
            if !close(sum, sums[c]) || !close(mean, means[c]) {
                errors.push(format!(
                    "{label}: channel {c} sum {sum} mean {mean}, expected {} and {}",
                    sums[c], means[c]
                ));
            }
        }
    }
    ours.len()
}

#[test]
fn every_fixture_tile_is_byte_identical_and_normalised_like_the_reference() {
    let mut errors = Vec::new();
    let (mut cases_checked, mut tiles_checked) = (0, 0);
    for fixture in FIXTURES {
        let dir = fixture_dir(fixture);
        for case in cases(&dir) {
            if case["image_files"].as_array().is_none_or(|f| f.is_empty()) {
                continue;
            }
            tiles_checked += check_case(&dir, &case, &mut errors);
            cases_checked += 1;
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    assert!(
        cases_checked >= 7 && tiles_checked >= 39,
        "fixtures went missing"
    );
    eprintln!("{cases_checked} cases: all {tiles_checked} tiles byte-identical, stats within 1e-6");
}

fn image_error(result: tessera_model::Result<RgbImage>) -> String {
    match result {
        Err(Error::Image(message)) => message,
        Err(other) => panic!("expected Error::Image, got {other:?}"),
        Ok(img) => panic!("expected an error, decoded {:?}", img.dimensions()),
    }
}

fn fixture_png() -> Vec<u8> {
    std::fs::read(fixture_dir("tiny-mha-softmax").join("img_640x480.png")).expect("fixture png")
}

/// CRC-32 (IEEE, reflected), as PNG chunks use.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0_u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn truncated_empty_and_non_image_data_are_clear_errors() {
    let limits = ImageLimits::default();
    let png = fixture_png();
    let message = image_error(decode_image(&png[..png.len() / 2], &limits));
    assert!(
        message.contains("PNG") && message.contains("truncated"),
        "{message}"
    );
    let message = image_error(decode_image(&png[..20], &limits));
    assert!(message.contains("PNG"), "{message}");

    let message = image_error(decode_image(&[], &limits));
    assert!(message.contains("empty"), "{message}");

    let text = b"<html><body>definitely not a picture</body></html>";
    let message = image_error(decode_image(text, &limits));
    assert!(message.contains("unrecognised"), "{message}");

    let readme = fixture_dir("tiny-mha-softmax").join("README.md");
    let message = image_error(load_image(&readme, &limits));
    assert!(
        message.contains("README.md") && message.contains("unrecognised"),
        "{message}"
    );
    let missing = fixture_dir("tiny-mha-softmax").join("no-such-image.png");
    match load_image(&missing, &limits) {
        Err(err @ Error::Io { .. }) => assert!(err.to_string().contains("no-such-image.png")),
        other => panic!("expected Error::Io, got {other:?}"),
    }
}

#[test]
fn a_header_claiming_too_many_pixels_is_rejected_before_decoding() {
    let mut png = std::io::Cursor::new(Vec::new());
    RgbImage::new(1, 1)
        .write_to(&mut png, image::ImageFormat::Png)
        .unwrap();
    let mut png = png.into_inner();
    // Signature (8), IHDR length (4), "IHDR" at 12..16, width 16..20, height 20..24, CRC 29..33.
    assert_eq!(&png[12..16], b"IHDR");
    png[16..20].copy_from_slice(&30_000_u32.to_be_bytes());
    png[20..24].copy_from_slice(&30_000_u32.to_be_bytes());
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());

    let message = image_error(decode_image(&png, &ImageLimits::default()));
    assert!(
        message.contains("30000x30000") && message.contains("40000000"),
        "{message}"
    );
    assert!(message.contains("max_pixels"), "{message}");
}
