//! Compiles `proto/freshd/v1/*.proto` without a `protoc` binary: protox parses
//! the files into a descriptor set, which feeds both the generated code and the
//! reflection service.

use std::{env, fs, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/freshd/v1/coordinator.proto"];
    for proto in &protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out.join("freshd_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .codec_path("crate::codec::Codec")
        // Written from notices encoded once per fan-out; see src/wire.rs.
        .extern_path(".freshd.v1.NoticeBatch", "crate::wire::NoticeBatch")
        .compile_fds(fds)?;
    Ok(())
}
