//! Command line: etcd's `benchmark` flags and subcommands, and the output
//! (etcd's text report, or one JSON object with `--json`).

use std::io::Write;
use std::time::Duration;

use anyhow::{Result, bail};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::conn::Connections;
use crate::driver;
use crate::keys::{KeyPicker, random_value};
use crate::kv::{PutWorker, RangeWorker, TxnPutWorker};
use crate::lease::KeepAliveWorker;
use crate::stats::Summary;
use crate::watch::{self, WatchLatencyLoad, WatchLoad};

#[derive(Debug, Parser)]
#[command(
    name = "cairn-bench",
    about = "A low-level benchmark tool for etcd v3 endpoints (Cairn or etcd), after etcd's tools/benchmark",
    version
)]
pub struct Cli {
    /// gRPC endpoints, comma separated (host:port or http://host:port).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "127.0.0.1:2379",
        global = true
    )]
    pub endpoints: Vec<String>,
    /// Total number of gRPC connections.
    #[arg(long, default_value_t = 1, global = true)]
    pub conns: usize,
    /// Total number of concurrent clients (sharing the connections round-robin).
    #[arg(long, default_value_t = 1, global = true)]
    pub clients: usize,
    /// Connect only to the leader (found by Maintenance.Status).
    #[arg(long, global = true)]
    pub target_leader: bool,
    /// Dial timeout for each connection (e.g. 5s, 500ms).
    #[arg(long, default_value = "5s", value_parser = parse_duration, global = true)]
    pub dial_timeout: Duration,
    /// Print numbers with full floating point precision.
    #[arg(long, global = true)]
    pub precise: bool,
    /// Print one JSON object instead of the text report.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Benchmark put.
    Put(PutArgs),
    /// Benchmark range: KEY, or KEY to END.
    Range(RangeArgs),
    /// Benchmark put through txn, --txn-ops puts per txn.
    TxnPut(TxnPutArgs),
    /// Benchmark watch: watch creation, then the delivery of events of puts.
    Watch(WatchArgs),
    /// Benchmark the delay from a put to its event at every watcher.
    WatchLatency(WatchLatencyArgs),
    /// Benchmark lease keep-alives.
    LeaseKeepalive(LeaseKeepaliveArgs),
}

#[derive(Debug, Args)]
pub struct PutArgs {
    /// Total number of put requests.
    #[arg(long, default_value_t = 10000)]
    pub total: u64,
    /// Key size of put request.
    #[arg(long, default_value_t = 8)]
    pub key_size: usize,
    /// Value size of put request.
    #[arg(long, default_value_t = 8)]
    pub val_size: usize,
    /// Maximum possible keys.
    #[arg(long, default_value_t = 1)]
    pub key_space_size: u64,
    /// Use sequential keys.
    #[arg(long)]
    pub sequential_keys: bool,
    /// Maximum puts per second (0 is no limit).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Consistency {
    /// Linearizable.
    L,
    /// Serializable.
    S,
}

#[derive(Debug, Args)]
pub struct RangeArgs {
    pub key: String,
    pub end: Option<String>,
    /// Total number of range requests.
    #[arg(long, default_value_t = 10000)]
    pub total: u64,
    /// Linearizable (l) or serializable (s).
    #[arg(long, value_enum, default_value = "l")]
    pub consistency: Consistency,
    /// Maximum requests per second (0 is no limit).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
}

#[derive(Debug, Args)]
pub struct TxnPutArgs {
    /// Total number of txn requests.
    #[arg(long, default_value_t = 10000)]
    pub total: u64,
    #[arg(long, default_value_t = 8)]
    pub key_size: usize,
    #[arg(long, default_value_t = 8)]
    pub val_size: usize,
    /// Maximum possible keys.
    #[arg(long, default_value_t = 1)]
    pub key_space_size: u64,
    /// Number of puts per txn.
    #[arg(long, default_value_t = 1)]
    pub txn_ops: u64,
    /// Maximum txns per second (0 is no limit).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Total watch streams.
    #[arg(long, default_value_t = 10)]
    pub streams: usize,
    /// Total watchers per stream.
    #[arg(long, default_value_t = 100)]
    pub watch_per_stream: usize,
    /// Total number of keys to be watched.
    #[arg(long, default_value_t = 1)]
    pub watched_key_total: usize,
    /// Number of keys to put per second (0 is no limit).
    #[arg(long, default_value_t = 0)]
    pub put_rate: u64,
    /// Number of put requests.
    #[arg(long, default_value_t = 1000)]
    pub put_total: u64,
    /// Key size of watch request.
    #[arg(long, default_value_t = 32)]
    pub key_size: usize,
    /// Maximum possible keys.
    #[arg(long, default_value_t = 1)]
    pub key_space_size: u64,
    /// Use sequential keys.
    #[arg(long)]
    pub sequential_keys: bool,
}

#[derive(Debug, Args)]
pub struct WatchLatencyArgs {
    /// Total number of put requests.
    #[arg(long, default_value_t = 10000)]
    pub total: u64,
    /// Number of keys to put per second (0 is no limit).
    #[arg(long, default_value_t = 100)]
    pub put_rate: u64,
    /// Key size of watch response.
    #[arg(long, default_value_t = 32)]
    pub key_size: usize,
    /// Value size of watch response (at least 8: the send time).
    #[arg(long, default_value_t = 32)]
    pub val_size: usize,
}

#[derive(Debug, Args)]
pub struct LeaseKeepaliveArgs {
    /// Total number of lease keepalive requests.
    #[arg(long, default_value_t = 10000)]
    pub total: u64,
}

impl Cli {
    /// Parses a command line (`argv[0]` first), for callers without clap.
    pub fn from_args<I, T>(argv: I) -> Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        Cli::try_parse_from(argv)
    }
}

/// `5s`, `500ms`, `2m` or a number of seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = match text.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let number: f64 = number
        .parse()
        .map_err(|_| format!("not a duration: {text:?}"))?;
    let secs = match unit {
        "ms" => number / 1000.0,
        "s" => number,
        "m" => number * 60.0,
        _ => return Err(format!("unknown unit in {text:?} (ms, s or m)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{text:?}: {e}"))
}

/// What one benchmark measured.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// `put`, `range-l`, `range-s`, `txn-put`, `watch`, `watch-latency`,
    /// `lease-keepalive`.
    pub mode: String,
    /// Requests (or, for watches, events) asked for.
    pub total: u64,
    /// The endpoints the load went to.
    pub endpoints: Vec<String>,
    pub summary: Summary,
    /// Watch creation, for `watch`.
    pub creation: Option<Summary>,
}

/// Runs the benchmark the command line names.
pub async fn run(cli: &Cli) -> Result<Outcome> {
    if cli.clients == 0 {
        bail!("--clients must be at least 1");
    }
    let conns = Connections::open(
        &cli.endpoints,
        cli.conns,
        cli.dial_timeout,
        cli.target_leader,
    )
    .await?;
    let clients = cli.clients;
    let outcome = match &cli.command {
        Command::Put(a) => {
            let keys = KeyPicker::new(a.key_space_size, a.key_size, a.sequential_keys)?;
            let workers = PutWorker::all(&conns, clients, &keys, &random_value(a.val_size));
            let run = driver::run(workers, a.total, a.rate, true).await;
            outcome("put", a.total, run.recorder.summarize(run.elapsed))
        }
        Command::Range(a) => {
            let end = a.end.clone().map(Bytes::from).unwrap_or_default();
            let serializable = a.consistency == Consistency::S;
            let workers = RangeWorker::all(
                &conns,
                clients,
                &Bytes::from(a.key.clone()),
                &end,
                serializable,
            );
            let run = driver::run(workers, a.total, a.rate, true).await;
            let mode = if serializable { "range-s" } else { "range-l" };
            outcome(mode, a.total, run.recorder.summarize(run.elapsed))
        }
        Command::TxnPut(a) => {
            if a.txn_ops == 0 || a.txn_ops > a.key_space_size {
                bail!(
                    "--txn-ops must be between 1 and --key-space-size (a txn puts distinct keys)"
                );
            }
            let keys = KeyPicker::new(a.key_space_size, a.key_size, false)?;
            let value = random_value(a.val_size);
            let workers = TxnPutWorker::all(&conns, clients, &keys, &value, a.txn_ops);
            let run = driver::run(workers, a.total, a.rate, true).await;
            outcome("txn-put", a.total, run.recorder.summarize(run.elapsed))
        }
        Command::Watch(a) => {
            let load = WatchLoad {
                streams: a.streams,
                watch_per_stream: a.watch_per_stream,
                watched_key_total: a.watched_key_total,
                put_total: a.put_total,
                put_rate: a.put_rate,
                keys: KeyPicker::new(a.key_space_size, a.key_size, a.sequential_keys)?,
            };
            let (creation, events) = watch::watch(&conns, clients, &load).await?;
            Outcome {
                mode: "watch".into(),
                total: events.count + events.error_count,
                endpoints: Vec::new(),
                summary: events,
                creation: Some(creation),
            }
        }
        Command::WatchLatency(a) => {
            let load = WatchLatencyLoad {
                total: a.total,
                put_rate: a.put_rate,
                key: random_value(a.key_size),
                value_size: a.val_size,
            };
            let events = watch::watch_latency(&conns, clients, &load).await?;
            outcome("watch-latency", a.total * clients as u64, events)
        }
        Command::LeaseKeepalive(a) => {
            let workers = KeepAliveWorker::all(&conns, clients).await?;
            let run = driver::run(workers, a.total, 0, true).await;
            for worker in run.workers {
                worker.revoke().await;
            }
            outcome(
                "lease-keepalive",
                a.total,
                run.recorder.summarize(run.elapsed),
            )
        }
    };
    Ok(Outcome {
        endpoints: conns.urls().to_vec(),
        ..outcome
    })
}

fn outcome(mode: &str, total: u64, summary: Summary) -> Outcome {
    Outcome {
        mode: mode.into(),
        total,
        endpoints: Vec::new(),
        summary,
        creation: None,
    }
}

/// Writes the outcome as etcd's report, or as JSON with `--json`.
pub fn write(cli: &Cli, outcome: &Outcome, out: &mut dyn Write) -> std::io::Result<()> {
    if cli.json {
        let mut j = outcome.summary.to_json();
        j["mode"] = outcome.mode.clone().into();
        j["endpoints"] = outcome.endpoints.clone().into();
        j["clients"] = cli.clients.into();
        j["conns"] = cli.conns.into();
        j["total"] = outcome.total.into();
        if let Some(creation) = &outcome.creation {
            j["creation"] = creation.to_json();
        }
        writeln!(out, "{j}")
    } else {
        if let Some(creation) = &outcome.creation {
            write!(
                out,
                "Watch creation summary:\n{}",
                creation.to_text(cli.precise)
            )?;
            writeln!(out, "Watch events received summary:")?;
        }
        write!(out, "{}", outcome.summary.to_text(cli.precise))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcds_flags_parse() {
        let cli = Cli::try_parse_from([
            "cairn-bench",
            "--endpoints=127.0.0.1:1,127.0.0.1:2",
            "--conns=10",
            "--clients=100",
            "put",
            "--total=500",
            "--key-size=16",
            "--val-size=256",
            "--key-space-size=1000",
            "--sequential-keys",
        ])
        .expect("parses");
        assert_eq!(cli.endpoints, ["127.0.0.1:1", "127.0.0.1:2"]);
        assert_eq!((cli.conns, cli.clients), (10, 100));
        let Command::Put(put) = cli.command else {
            panic!("not put: {:?}", cli.command)
        };
        assert_eq!(put.total, 500);
        assert_eq!((put.key_size, put.val_size), (16, 256));
        assert_eq!(put.key_space_size, 1000);
        assert!(put.sequential_keys);
    }

    #[test]
    fn global_flags_go_after_the_subcommand_too() {
        let cli = Cli::try_parse_from([
            "cairn-bench",
            "range",
            "foo",
            "fop",
            "--consistency=s",
            "--clients=3",
            "--json",
        ])
        .expect("parses");
        assert_eq!(cli.clients, 3);
        assert!(cli.json);
        let Command::Range(range) = cli.command else {
            panic!("not range")
        };
        assert_eq!(range.key, "foo");
        assert_eq!(range.end.as_deref(), Some("fop"));
        assert_eq!(range.consistency, Consistency::S);
    }

    #[test]
    fn every_subcommand_has_etcds_name() {
        for sub in [
            "put",
            "range",
            "txn-put",
            "watch",
            "watch-latency",
            "lease-keepalive",
        ] {
            let mut args = vec!["cairn-bench", sub];
            if sub == "range" {
                args.push("k");
            }
            assert!(Cli::try_parse_from(&args).is_ok(), "{sub}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("3h").is_err());
        assert!(parse_duration("x").is_err());
    }

    #[test]
    fn json_output_names_the_run() {
        let cli =
            Cli::try_parse_from(["cairn-bench", "--clients=2", "--json", "put"]).expect("parses");
        let mut recorder = crate::stats::Recorder::new();
        recorder.record(Duration::from_millis(3));
        let o = outcome("put", 1, recorder.summarize(Duration::from_secs(1)));
        let mut out = Vec::new();
        write(&cli, &o, &mut out).expect("writes");
        let j: serde_json::Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(j["mode"], "put");
        assert_eq!(j["clients"], 2);
        assert_eq!(j["conns"], 1);
        assert_eq!(j["total"], 1);
        assert_eq!(j["errors"], 0);
        assert_eq!(j["p50"], 0.003);
    }
}
