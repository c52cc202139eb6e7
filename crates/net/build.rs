fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The peer protocol's one home: consensus serves and calls the whole
    // service, and discovery (here) calls `Members`.
    println!("cargo:rerun-if-changed=../../proto/cairn/peer.proto");
    let mut config = tonic_prost_build::Config::new();
    // A vendored protoc unless PROTOC names one, so a fresh machine needs no
    // system protobuf compiler.
    if std::env::var_os("PROTOC").is_none() {
        config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    }
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Raft messages and snapshot data stay `Bytes`: no copy between the
        // wire and the raft parser or the snapshot file.
        .bytes(".")
        .compile_with_config(
            config,
            &["../../proto/cairn/peer.proto"],
            &["../../proto/cairn"],
        )?;
    Ok(())
}
