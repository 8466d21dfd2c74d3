//! Compiles the subset of etcd's v3 API the load tool speaks (`proto/etcd.proto`)
//! without a `protoc` binary: protox parses it into a descriptor set for
//! tonic's code generator. Only the client side is generated.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/etcd.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(fds)?;
    Ok(())
}
