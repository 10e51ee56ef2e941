//! A short, stable fingerprint of a snapshot: every member of a cluster computes it
//! at start-up and refuses to talk to members that serve a different model.
//!
//! It hashes (SHA-256) the bytes of `config.json` and, for every tensor of the
//! checkpoint in name order, its name, dtype and shape. It does not read weight
//! bytes, so it is instant even for large snapshots; two snapshots that differ only
//! in weight values (a re-trained checkpoint with the same layout) share it.

use std::path::Path;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::weights::Checkpoint;

/// Hex digits kept from the digest (64 bits: ample for telling models apart).
const HEX_DIGITS: usize = 16;

/// The fingerprint of the snapshot folder `dir`, e.g. `"3f9a0c1b2d4e5f60"`.
pub fn fingerprint(dir: &Path) -> Result<String> {
    let config = dir.join("config.json");
    let bytes = std::fs::read(&config).map_err(|e| Error::io(&config, e))?;
    let checkpoint = Checkpoint::open(dir)?;
    Ok(fingerprint_of(&bytes, &checkpoint))
}

fn fingerprint_of(config: &[u8], checkpoint: &Checkpoint) -> String {
    let mut h = Sha256::new();
    h.update((config.len() as u64).to_le_bytes());
    h.update(config);
    for (name, dtype, shape) in checkpoint.layout() {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(dtype.as_bytes());
        h.update((shape.len() as u64).to_le_bytes());
        for d in shape {
            h.update((d as u64).to_le_bytes());
        }
    }
    let digest = h.finalize();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    hex[..HEX_DIGITS].to_string()
}
