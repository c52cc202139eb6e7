//! `cairn health [--endpoints URL,...] [--timeout DURATION]`: exits 0 when a
//! member (or a proxy in front of members) answers a linearizable read and
//! reports a leader and no alarm; 1 otherwise, with the reason on stderr.
//! Container healthchecks use it: a scratch image has no shell or curl.

use std::process::ExitCode;
use std::time::Duration;

use cairn_api::etcdserverpb::kv_client::KvClient;
use cairn_api::etcdserverpb::maintenance_client::MaintenanceClient;
use cairn_api::etcdserverpb::{RangeRequest, StatusRequest};

use crate::config;

const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:2379";

pub fn main(args: &[String]) -> ExitCode {
    let mut endpoints = DEFAULT_ENDPOINT.to_string();
    let mut timeout = Duration::from_secs(3);
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        let Some(flag) = arg.strip_prefix("--") else {
            eprintln!("health: unexpected argument {arg:?}");
            return ExitCode::FAILURE;
        };
        let (name, value) = match flag.split_once('=') {
            Some((name, value)) => (name, value.to_string()),
            None => (flag, rest.next().cloned().unwrap_or_default()),
        };
        match name {
            "endpoints" => endpoints = value,
            "timeout" => match config::parse_go_duration(&value) {
                Some(t) => timeout = t,
                None => {
                    eprintln!("health: --timeout: {value:?} is not a duration");
                    return ExitCode::FAILURE;
                }
            },
            other => {
                eprintln!("health: unknown flag --{other}");
                return ExitCode::FAILURE;
            }
        }
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("health: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Healthy if any endpoint is.
    let mut failures = Vec::new();
    for endpoint in endpoints
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
    {
        let url = if endpoint.contains("://") {
            endpoint.to_string()
        } else {
            format!("http://{endpoint}")
        };
        // The timer must be made inside the runtime.
        match runtime.block_on(async { tokio::time::timeout(timeout, check(&url)).await }) {
            Ok(Ok(())) => {
                println!("{url} is healthy");
                return ExitCode::SUCCESS;
            }
            Ok(Err(e)) => failures.push(format!("{url} is unhealthy: {e}")),
            Err(_) => failures.push(format!("{url} is unhealthy: timed out after {timeout:?}")),
        }
    }
    for failure in failures {
        eprintln!("{failure}");
    }
    ExitCode::FAILURE
}

async fn check(url: &str) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let status = MaintenanceClient::connect(url.to_string())
        .await?
        .status(StatusRequest {})
        .await?
        .into_inner();
    if let Some(error) = status.errors.first() {
        return Err(error.clone().into());
    }
    // A linearizable read needs a quorum, which Status alone does not show.
    KvClient::connect(url.to_string())
        .await?
        .range(RangeRequest {
            key: "health".into(),
            ..Default::default()
        })
        .await?;
    Ok(())
}
