//! Generates the phm.v1 Rust code with protox (pure Rust), so no system `protoc` is needed.

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "phm/v1/query.proto",
        "phm/v1/link.proto",
        "phm/v1/secagg.proto",
        "phm/v1/node.proto",
        "phm/v1/coordinator.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    // Written out for gRPC server reflection, so grpcurl works against a node.
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("phm_v1_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        // Undecodable messages are the caller's fault: refused as INVALID_QUERY.
        .codec_path("crate::codec::PhmCodec")
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
