//! Compiles `lab/v1/backend.proto` with a vendored `protoc`, so a fresh machine
//! needs no system protobuf compiler.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Handing prost the compiler's path directly (rather than through the
    // PROTOC environment variable) keeps this script free of `unsafe`.
    let mut prost = tonic_prost_build::Config::new();
    prost.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("lab_v1_descriptor.bin"))
        .compile_with_config(prost, &["lab/v1/backend.proto"], &["."])?;
    println!("cargo:rerun-if-changed=lab/v1/backend.proto");
    Ok(())
}
