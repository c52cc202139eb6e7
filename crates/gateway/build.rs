//! Compiles etcd's protos into a descriptor set: the gateway transcodes JSON
//! by reflection over it, as grpc-gateway does from the same files.

use std::path::PathBuf;
use std::process::Command;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../../proto/etcd");
    println!("cargo:rerun-if-env-changed=PROTOC");
    let protoc = match std::env::var_os("PROTOC") {
        Some(path) => PathBuf::from(path),
        None => protoc_bin_vendored::protoc_bin_path()?,
    };
    let out = PathBuf::from(std::env::var("OUT_DIR")?).join("etcd_descriptors.bin");
    let status = Command::new(protoc)
        .arg("--include_imports")
        .arg(format!("--descriptor_set_out={}", out.display()))
        .arg("-I../../proto/etcd")
        .args([
            "kv.proto",
            "auth.proto",
            "rpc.proto",
            "v3lock.proto",
            "v3election.proto",
        ])
        .status()?;
    if !status.success() {
        return Err(format!("protoc failed: {status}").into());
    }
    Ok(())
}
