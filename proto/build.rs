//! Compiles `proto/lifeboat/v1/*.proto` with protox (pure Rust, no system `protoc`).
use std::{env, fs, path::PathBuf};

const FILES: &[&str] = &[
    "proto/lifeboat/v1/common.proto",
    "proto/lifeboat/v1/bootstrap.proto",
    "proto/lifeboat/v1/component.proto",
    "proto/lifeboat/v1/admin.proto",
    "proto/lifeboat/v1/cluster.proto",
    "proto/lifeboat/v1/protection.proto",
    "proto/lifeboat/v1/data.proto",
    "proto/lifeboat/v1/recovery.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for file in FILES {
        println!("cargo:rerun-if-changed={file}");
    }
    let fds = protox::compile(FILES, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out.join("lifeboat_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        // Batch payloads are reference-counted: decoding takes them out of the receive buffer
        // without a copy, and a sender keeping a batch for resending does not copy it.
        .bytes(".lifeboat.v1.Extent.data")
        // Sizes the encode buffer for the whole message before encoding (see `codec`).
        .codec_path("crate::codec::LifeboatCodec")
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
