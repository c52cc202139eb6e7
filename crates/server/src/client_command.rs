//! What the client subcommands (`cairn health`, `cairn shards`) share:
//! their flags, `--endpoints URL,...` and `--timeout DURATION`, and a
//! runtime to call the members on.

use std::time::Duration;

use crate::config;

const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:2379";

pub struct ClientCommand {
    /// The endpoints as URLs (`host:port` gets `http://`).
    pub endpoints: Vec<String>,
    /// How long each endpoint may take.
    pub timeout: Duration,
    pub runtime: tokio::runtime::Runtime,
}

impl ClientCommand {
    /// The flags of subcommand `name` in `args`; None, with the reason on
    /// stderr, when they are wrong or the runtime cannot start.
    pub fn parse(name: &str, args: &[String], timeout: Duration) -> Option<ClientCommand> {
        let mut endpoints = DEFAULT_ENDPOINT.to_string();
        let mut timeout = timeout;
        let mut rest = args.iter();
        while let Some(arg) = rest.next() {
            let Some(flag) = arg.strip_prefix("--") else {
                eprintln!("{name}: unexpected argument {arg:?}");
                return None;
            };
            let (flag, value) = match flag.split_once('=') {
                Some((flag, value)) => (flag, value.to_string()),
                None => (flag, rest.next().cloned().unwrap_or_default()),
            };
            match flag {
                "endpoints" => endpoints = value,
                "timeout" => match config::parse_go_duration(&value) {
                    Some(t) => timeout = t,
                    None => {
                        eprintln!("{name}: --timeout: {value:?} is not a duration");
                        return None;
                    }
                },
                other => {
                    eprintln!("{name}: unknown flag --{other}");
                    return None;
                }
            }
        }
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("{name}: cannot start the runtime: {e}");
                return None;
            }
        };
        let endpoints = endpoints
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(|endpoint| {
                if endpoint.contains("://") {
                    endpoint.to_string()
                } else {
                    format!("http://{endpoint}")
                }
            })
            .collect();
        Some(ClientCommand {
            endpoints,
            timeout,
            runtime,
        })
    }

    /// Runs `call` within the timeout; the error as text.
    pub fn call<T, F>(&self, call: F) -> Result<T, String>
    where
        F: std::future::Future<Output = Result<T, Box<dyn std::error::Error + Send + Sync>>>,
    {
        // The timer must be made inside the runtime.
        match self
            .runtime
            .block_on(async { tokio::time::timeout(self.timeout, call).await })
        {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("timed out after {:?}", self.timeout)),
        }
    }
}
