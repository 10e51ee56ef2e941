//! Generates the gRPC code from `tessera/**/*.proto` with the vendored `protoc`, so
//! no system `protoc` is needed.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "tessera/v1/tessera.proto",
    "tessera/internal/v1/tensor.proto",
    "tessera/internal/v1/vision.proto",
    "tessera/internal/v1/scheduler.proto",
    "tessera/internal/v1/expert.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    // Byte fields (tensor data, image files) as `bytes::Bytes`: decoding slices the
    // received buffer instead of copying it.
    config.bytes(["."]);
    // Decoding errors are the sender's: INVALID_ARGUMENT (src/codec.rs).
    tonic_prost_build::configure()
        .codec_path("crate::codec::Codec")
        .file_descriptor_set_path(out_dir.join("tessera_descriptor.bin"))
        .compile_with_config(config, PROTOS, &["."])?;
    Ok(())
}
