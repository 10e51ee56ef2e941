//! Helpers shared by the root integration tests: fixture paths and case fields.

use std::path::{Path, PathBuf};

use serde_json::Value;

/// A fixture folder under `tests/fixtures`.
pub fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The case called `name` in a fixture's `cases.json`.
pub fn case(fixture_name: &str, name: &str) -> Value {
    let text = std::fs::read_to_string(fixture_dir(fixture_name).join("cases.json")).unwrap();
    let cases: Value = serde_json::from_str(&text).unwrap();
    cases["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no case {name} in {fixture_name}"))
        .clone()
}

/// A JSON array of non-negative integers as token ids (or counts).
pub fn json_ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}
