//! Compiles every .proto with protox (pure Rust: no protoc on the build machine) and
//! exports the descriptor set that the servers hand to gRPC reflection.
use prost::Message;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/ps.proto",
        "proto/raft.proto",
        "proto/admin.proto",
        "proto/command.proto",
        "proto/coord.proto",
        "proto/gateway.proto",
        "proto/worker.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("freshet_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .bytes(".freshet.raft.v1")
        // Malformed requests are INVALID_ARGUMENT, not INTERNAL (see src/codec.rs).
        .codec_path("crate::codec::Codec")
        .compile_fds(fds)?;
    Ok(())
}
