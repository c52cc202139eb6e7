fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Only the client of the peer service's `Members` call is used here
    // (cluster discovery); the consensus crate serves the whole service.
    println!("cargo:rerun-if-changed=../../proto/cairn/peer.proto");
    let mut config = tonic_prost_build::Config::new();
    // A vendored protoc unless PROTOC names one, so a fresh machine needs no
    // system protobuf compiler.
    if std::env::var_os("PROTOC").is_none() {
        config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    }
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .bytes(".")
        .compile_with_config(
            config,
            &["../../proto/cairn/peer.proto"],
            &["../../proto/cairn"],
        )?;
    Ok(())
}
