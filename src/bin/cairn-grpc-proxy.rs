//! `cairn-grpc-proxy [start] [flags]`: the grpc-proxy alone, with etcd's
//! `grpc-proxy start` flags. All the work is in `cairn-proxy`.
//! `cairn-grpc-proxy health [--endpoints URL]` checks a proxy (or member)
//! as `cairn health` does.

use std::ffi::OsString;

#[path = "../allocator.rs"]
mod allocator;

fn main() -> std::process::ExitCode {
    allocator::return_idle_memory();
    let mut args: Vec<OsString> = std::env::args_os().collect();
    // The container healthcheck: the image has no shell or curl.
    if args.get(1).is_some_and(|a| a == "health") {
        let rest: Vec<String> = args[2..]
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        return cairn_server::health_check::main(&rest);
    }
    // `start` is optional here: `cairn-grpc-proxy start --endpoints=...`
    // reads like etcd's command line.
    if args.get(1).is_some_and(|a| a == "start") {
        args.remove(1);
    }
    cairn_proxy::main(args)
}
