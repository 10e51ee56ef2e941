//! Helpers shared by the golden tests: fixture paths, case fields, and a closeness check
//! that fails loudly with the first mismatch. Each test binary declares it with
//! `#[allow(dead_code)] mod common;`, since each uses a different subset.

pub mod config_spec;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use tessera_model::chat::Message;
use tessera_model::image_tokens::Tiling;
use tessera_model::pipeline::Pipeline;
use tessera_model::weights::WeightFormat;

/// A fixture folder under `tests/fixtures`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

/// The case called `name` of a fixture's `cases.json`.
pub fn case(fixture_dir: &Path, name: &str) -> Value {
    cases(fixture_dir)
        .into_iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no case {name} in {}", fixture_dir.display()))
}

/// Every case of a fixture's `cases.json`.
pub fn cases(fixture_dir: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(fixture_dir.join("cases.json")).unwrap();
    let cases: Value = serde_json::from_str(&text).unwrap();
    cases["cases"].as_array().unwrap().clone()
}

/// The case's `images_spatial_crop` as tilings.
pub fn tilings(case: &Value) -> Vec<Tiling> {
    case["images_spatial_crop"]
        .as_array()
        .unwrap()
        .iter()
        .map(|wh| {
            Tiling::new(
                wh[0].as_u64().unwrap() as usize,
                wh[1].as_u64().unwrap() as usize,
            )
        })
        .collect()
}

/// Fails with the first element outside `tol` and the overall max difference; returns
/// the max difference.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) -> f32 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let max = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    if let Some(i) = got
        .iter()
        .zip(want)
        .position(|(a, b)| (a - b).abs() > tol || a.is_nan())
    {
        panic!(
            "{what}: first mismatch at {i}: got {} want {} (max abs diff {max}, tolerance {tol})",
            got[i], want[i]
        );
    }
    max
}

/// The reference's recorded tensors of the case called `case_name`.
pub fn tensors(fixture_dir: &Path, case_name: &str) -> HashMap<String, Tensor> {
    let path = fixture_dir.join(format!("tensors/{case_name}.safetensors"));
    candle_core::safetensors::load(&path, &Device::Cpu).unwrap()
}

/// A JSON array of token ids.
pub fn as_u32s(v: &Value) -> Vec<u32> {
    let ids = v.as_array().unwrap().iter();
    ids.map(|x| x.as_u64().unwrap() as u32).collect()
}

/// Where the image features of a prompt come from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Images {
    /// The reference's `image_embeds`, injected as they are.
    FixtureEmbeds,
    /// The raw image files through our processor, tower and projector.
    FromPixels,
}

/// The case's conversation.
pub fn messages(case: &Value) -> Vec<Message> {
    serde_json::from_value(case["conversation"].clone()).unwrap()
}

/// The images of `messages`, decoded from the files of the fixture folder `dir`.
pub fn images(dir: &Path, messages: &[Message]) -> Vec<image::RgbImage> {
    let files = messages.iter().flat_map(|m| &m.images);
    files
        .map(|f| image::open(dir.join(f)).unwrap().to_rgb8())
        .collect()
}

/// A fixture checkpoint loaded whole, in f32 on the CPU.
pub fn load(name: &str) -> (PathBuf, Pipeline) {
    let dir = fixture(name);
    let pipeline = Pipeline::load(&dir, DType::F32, WeightFormat::Auto, &Device::Cpu).unwrap();
    (dir, pipeline)
}
