fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "../../proto/etcd/kv.proto",
        "../../proto/etcd/auth.proto",
        "../../proto/etcd/rpc.proto",
        "../../proto/etcd/v3lock.proto",
        "../../proto/etcd/v3election.proto",
        "../../proto/cairn/internal.proto",
    ];
    println!("cargo:rerun-if-changed=../../proto");
    let mut config = tonic_prost_build::Config::new();
    // A vendored protoc unless PROTOC names one, so a fresh machine needs no
    // system protobuf compiler.
    if std::env::var_os("PROTOC").is_none() {
        config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    }
    tonic_prost_build::configure()
        .generate_default_stubs(true)
        .bytes(".")
        .compile_with_config(config, &protos, &["../../proto/etcd", "../../proto/cairn"])?;
    Ok(())
}
