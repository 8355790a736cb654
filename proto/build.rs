//! Compiles `lab/v1/backend.proto` with a vendored `protoc`, so a fresh machine
//! needs no system protobuf compiler.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the
    // environment concurrently.
    unsafe { env::set_var("PROTOC", protoc) };

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("lab_v1_descriptor.bin"))
        .compile_protos(&["lab/v1/backend.proto"], &["."])?;
    println!("cargo:rerun-if-changed=lab/v1/backend.proto");
    Ok(())
}
