//! The `cairn` command line.

use std::process::ExitCode;

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, reload};

use crate::config::{self, ConfigError, ETCD_VERSION, Invocation};
use crate::server::report;

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
        Err(ConfigError::CommandLine(clap_error)) => clap_error.exit(),
        Err(e) => {
            tracing::error!("{}", report(&e));
            return ExitCode::FAILURE;
        }
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
            tracing::error!("{}", report(&e));
            ExitCode::FAILURE
        }
    }
}

/// `cairn gateway [start] [flags]`: etcd's L4 gateway, a TCP proxy to the
/// cluster's client URLs (`cairn_gateway::tcp_proxy`), with etcd's flags
/// --endpoints, --listen-addr and --retry-delay.
pub fn gateway_main(args: &[String]) -> ExitCode {
    tracing_subscriber::registry()
        .with(filter("info"))
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .init();
    let mut endpoints = "127.0.0.1:2379".to_string();
    let mut listen_addr = "127.0.0.1:23790".to_string();
    let mut retry_delay = std::time::Duration::from_secs(60);
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        if arg == "start" {
            continue;
        }
        let Some(flag) = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-')) else {
            tracing::error!("gateway: unexpected argument {arg:?}");
            return ExitCode::FAILURE;
        };
        let (name, value) = match flag.split_once('=') {
            Some((name, value)) => (name, value.to_string()),
            None => (flag, rest.next().cloned().unwrap_or_default()),
        };
        match name {
            "endpoints" => endpoints = value,
            "listen-addr" => listen_addr = value,
            "retry-delay" => match config::parse_go_duration(&value) {
                Some(delay) => retry_delay = delay,
                None => {
                    tracing::error!("gateway: --retry-delay: {value:?} is not a duration");
                    return ExitCode::FAILURE;
                }
            },
            // Discovery and TLS for the gateway are not supported.
            other => {
                tracing::error!("gateway: flag --{other} is not supported by Cairn");
                return ExitCode::FAILURE;
            }
        }
    }
    let endpoints: Vec<String> = endpoints
        .split(',')
        .filter(|e| !e.is_empty())
        .map(cairn_gateway::tcp_proxy::endpoint_addr)
        .collect();
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
    let result = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(&listen_addr).await?;
        tracing::info!("gateway: ready to proxy client requests to {endpoints:?}");
        cairn_gateway::tcp_proxy::TcpProxy::new(endpoints, retry_delay)
            .run(listener)
            .await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("gateway: {e}");
            ExitCode::FAILURE
        }
    }
}
