//! Golden parity of the vision tower, projector and image-token assembly, fed the
//! fixture's exact tiles: SigLIP output, projector output and the assembled image
//! embeddings are within 1e-4 (max abs) of the reference.

use std::collections::HashMap;
use std::path::Path;

#[allow(dead_code)] // each test binary uses a different subset of the helpers
mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, fixture, tilings};
use serde_json::Value;
use tessera_model::config::ModelConfig;
use tessera_model::image_tokens::Tiling;
use tessera_model::vision::VisionModel;
use tessera_model::weights::{Checkpoint, LoadTarget, WeightFormat};

/// Max abs difference allowed on vision outputs (fixture README: ~1e-4 for f32).
const TOL: f32 = 1e-4;

fn assert_close_tensors(what: &str, got: &Tensor, want: &Tensor, tol: f32) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let max = assert_close(what, &got, &want, tol);
    eprintln!("{what}: max abs diff {max:.3e}");
}

/// The fixture's tiles of a case as the normalised model input (n, 3, 384, 384).
fn fixture_tiles(dir: &Path, case: &Value) -> Tensor {
    let mut data = Vec::new();
    let mut n = 0;
    for tile in case["tiles"].as_array().unwrap() {
        let path = dir.join(tile["png"].as_str().or(tile["path"].as_str()).unwrap());
        let img = image::open(&path).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (384, 384));
        for c in 0..3 {
            for y in 0..384 {
                for x in 0..384 {
                    let v = img.get_pixel(x, y).0[c] as f32;
                    data.push((v / 255.0 - 0.5) / 0.5);
                }
            }
        }
        n += 1;
    }
    Tensor::from_vec(data, (n, 3, 384, 384), &Device::Cpu).unwrap()
}

fn check_fixture(name: &str) {
    let dir = fixture(name);
    let cfg = ModelConfig::from_dir(&dir).unwrap();
    let ckpt = Checkpoint::open(&dir).unwrap();
    let target = LoadTarget {
        checkpoint: &ckpt,
        dtype: DType::F32,
        weights: WeightFormat::Auto,
        device: &Device::Cpu,
    };
    let vision = VisionModel::load(&cfg, target).unwrap();
    let cases: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let mut checked = 0;
    for case in cases["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        if case["num_images"] == 0 || case.get("incremental_prefill").is_some() {
            continue; // no images, or the same tensors as its one-shot twin
        }
        let t: HashMap<String, Tensor> = candle_core::safetensors::load(
            dir.join(format!("tensors/{name}.safetensors")),
            &Device::Cpu,
        )
        .unwrap();
        let tiles = fixture_tiles(&dir, case);
        let features = vision.tower(&tiles).unwrap();
        assert_close_tensors(
            &format!("{name} vision_out_first2"),
            &features.narrow(0, 0, 2).unwrap(),
            &t["vision_out_first2"],
            TOL,
        );
        let projected = vision.project(&features).unwrap();
        assert_close_tensors(
            &format!("{name} projector_out"),
            &projected,
            &t["projector_out"],
            TOL,
        );
        let tilings = tilings(case);
        let embeds = vision.assemble(&projected, &tilings).unwrap();
        assert_close_tensors(
            &format!("{name} image_embeds"),
            &embeds,
            &t["image_embeds"],
            TOL,
        );
        checked += 1;
    }
    assert!(
        checked >= 2,
        "{name}: only {checked} cases with images checked"
    );
}

#[test]
fn tiny_fixture_vision_matches_the_reference() {
    check_fixture("tiny-mha-softmax");
}

#[test]
fn small_fixture_vision_matches_the_reference() {
    check_fixture("small-mla-softmax");
}

/// The assembly lays out exactly N(tw, th) rows for every candidate grid (1×1 … 1×9,
/// 3×3), so the prompt planner's count and the vision output always agree.
#[test]
fn assembly_length_equals_the_token_count_for_every_candidate_grid() {
    let dir = fixture("tiny-mha-softmax");
    let cfg = ModelConfig::from_dir(&dir).unwrap();
    let ckpt = Checkpoint::open(&dir).unwrap();
    let target = LoadTarget {
        checkpoint: &ckpt,
        dtype: DType::F32,
        weights: WeightFormat::Auto,
        device: &Device::Cpu,
    };
    let vision = VisionModel::load(&cfg, target).unwrap();
    let d = cfg.language.hidden_size;
    assert_eq!(cfg.candidate_resolutions.len(), 23);
    for [w, h] in &cfg.candidate_resolutions {
        let tiling = Tiling::new(w / 384, h / 384);
        let projected =
            Tensor::zeros((tiling.num_tiles(), 196, d), DType::F32, &Device::Cpu).unwrap();
        let rows = vision
            .assemble(&projected, &[tiling])
            .unwrap()
            .dim(0)
            .unwrap();
        assert_eq!(
            rows,
            tiling.num_tokens(),
            "tiling {}x{}",
            tiling.width,
            tiling.height
        );
    }
    assert_eq!(Tiling::new(1, 9).num_tokens(), 2101);
}
