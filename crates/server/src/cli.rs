//! The `cairn` command line.

use std::process::ExitCode;

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, reload};

use crate::config::{self, ETCD_VERSION, Invocation};

/// raft-rs and the storage engine are chatty; keep them quiet unless
/// RUST_LOG says otherwise.
fn filter(level: &str) -> EnvFilter {
    let level = match level {
        "warn" | "error" | "debug" | "info" => level,
        "panic" | "fatal" => "error",
        _ => "info",
    };
    std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new(format!("{level},raft=info,fjall=warn,lsm_tree=warn")))
}

pub fn main() -> ExitCode {
    let (filter_layer, filter_handle) = reload::Layer::new(filter("info"));
    tracing_subscriber::registry()
        .with(filter_layer)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .init();

    let env: Vec<(String, String)> = std::env::vars().collect();
    let config = match config::parse(std::env::args_os(), &env) {
        Ok(Invocation::Version) => {
            println!("etcd Version: {ETCD_VERSION}");
            println!("Cairn Version: {}", env!("CARGO_PKG_VERSION"));
            println!(
                "OS/Arch: {}/{}",
                std::env::consts::OS,
                std::env::consts::ARCH
            );
            return ExitCode::SUCCESS;
        }
        Ok(Invocation::Run(config)) => config,
        Err(e) => match e.downcast::<clap::Error>() {
            Ok(clap_error) => clap_error.exit(),
            Err(e) => {
                tracing::error!("{e:#}");
                return ExitCode::FAILURE;
            }
        },
    };
    let _ = filter_handle.modify(|f| *f = filter(&config.log_level));

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(crate::server::run(*config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
