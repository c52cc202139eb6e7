//! `cairn`: an etcd-compatible member. All the work is in `cairn-server`;
//! `cairn grpc-proxy start ...` and `cairn --proxy on ...` run the proxies
//! of `cairn-proxy`, and `cairn gateway start ...` the L4 gateway, as `etcd`
//! does; `cairn shards` lists a sharded cluster's shards.

use std::ffi::OsString;

mod allocator;

fn main() -> std::process::ExitCode {
    allocator::return_idle_memory();
    let args: Vec<OsString> = std::env::args_os().collect();
    let text: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    match text.get(1).map(String::as_str) {
        Some("gateway") => return cairn_server::cli::gateway_main(&text[2..]),
        Some("health") => return cairn_server::health_check::main(&text[2..]),
        Some("snapshot") => return cairn_server::migrate::snapshot_main(&text[2..]),
        Some("shards") => return cairn_server::shard_listing::main(&text[2..]),
        Some("grpc-proxy") => {
            if text.get(2).is_some_and(|a| a == "start") {
                let rest = args[3..].iter().cloned();
                return cairn_proxy::main(
                    std::iter::once(OsString::from("grpc-proxy start"))
                        .chain(rest)
                        .collect(),
                );
            }
            eprintln!("usage: cairn grpc-proxy start [flags]");
            return std::process::ExitCode::FAILURE;
        }
        _ => {}
    }
    if cairn_proxy::v2::wanted(&text) {
        return cairn_proxy::main_v2(&text);
    }
    cairn_server::cli::main()
}
