//! Compiles proto/lockstep.proto with protox (pure Rust), so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_dir = "../proto";
    let proto = "../proto/lockstep.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], [proto_dir])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Tensor payloads as `bytes::Bytes`: decoded without a copy, and one reduced gradient
        // is shared by every worker's outbound message.
        .bytes(".")
        // Encode/decode buffers sized for gradients (see wire::WireCodec).
        .codec_path("crate::wire::WireCodec")
        .compile_fds(descriptors)?;
    Ok(())
}
