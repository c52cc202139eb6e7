//! `cairn health [--endpoints URL,...] [--timeout DURATION]`: exits 0 when a
//! member (or a proxy in front of members) answers a linearizable read and
//! reports a leader and no alarm; 1 otherwise, with the reason on stderr.
//! Container healthchecks use it: a scratch image has no shell or curl.

use std::process::ExitCode;
use std::time::Duration;

use cairn_api::etcdserverpb::kv_client::KvClient;
use cairn_api::etcdserverpb::maintenance_client::MaintenanceClient;
use cairn_api::etcdserverpb::{RangeRequest, StatusRequest};

use crate::client_command::ClientCommand;

pub fn main(args: &[String]) -> ExitCode {
    let Some(command) = ClientCommand::parse("health", args, Duration::from_secs(3)) else {
        return ExitCode::FAILURE;
    };
    // Healthy if any endpoint is.
    let mut failures = Vec::new();
    for url in &command.endpoints {
        match command.call(check(url)) {
            Ok(()) => {
                println!("{url} is healthy");
                return ExitCode::SUCCESS;
            }
            Err(e) => failures.push(format!("{url} is unhealthy: {e}")),
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
