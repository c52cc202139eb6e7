//! The member's configuration, with etcd 3.4's flag names and defaults.
//!
//! Sources, later ones winning: defaults < `--config-file` (etcd's YAML keys,
//! which are the flag names) < `ETCD_*` environment variables < flags.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

pub(crate) use cairn_api::duration::parse_go_duration;
use clap::{Arg, ArgAction, Command};

/// etcd's version that Cairn answers as (Status.version, `--version`).
pub const ETCD_VERSION: &str = "3.4.23";
/// etcd's cluster version (major.minor).
pub const ETCD_CLUSTER_VERSION: &str = "3.4.0";

/// What Cairn does with a flag.
#[derive(Clone, Copy)]
enum Support {
    /// Implemented.
    Yes,
    /// Planned: accepted by the parser, refused at start with this reason.
    Later(&'static str),
    /// Accepted, and has no meaning in Cairn's design (said at start).
    NoEffect(&'static str),
}

struct Flag {
    name: &'static str,
    default: &'static str,
    boolean: bool,
    support: Support,
    help: &'static str,
}

const fn flag(name: &'static str, default: &'static str, help: &'static str) -> Flag {
    Flag {
        name,
        default,
        boolean: false,
        support: Support::Yes,
        help,
    }
}

/// An implemented boolean flag, off by default.
const fn switch(name: &'static str, help: &'static str) -> Flag {
    Flag {
        name,
        default: "false",
        boolean: true,
        support: Support::Yes,
        help,
    }
}

const fn later(name: &'static str, boolean: bool, what: &'static str) -> Flag {
    Flag {
        name,
        default: if boolean { "false" } else { "" },
        boolean,
        support: Support::Later(what),
        help: what,
    }
}

const CLUSTER: &str = "discovery and forced new clusters are not supported yet";

const FLAGS: &[Flag] = &[
    flag("name", "default", "Human-readable name for this member."),
    flag("data-dir", "${name}.etcd", "Path to the data directory."),
    flag(
        "snapshot-count",
        "100000",
        "Number of committed transactions to trigger a snapshot to disk.",
    ),
    flag(
        "heartbeat-interval",
        "100",
        "Time (in milliseconds) of a heartbeat interval.",
    ),
    flag(
        "election-timeout",
        "1000",
        "Time (in milliseconds) for an election to timeout.",
    ),
    flag(
        "listen-peer-urls",
        "http://localhost:2380",
        "List of URLs to listen on for peer traffic.",
    ),
    flag(
        "listen-client-urls",
        "http://localhost:2379",
        "List of URLs to listen on for client traffic.",
    ),
    flag(
        "initial-advertise-peer-urls",
        "http://localhost:2380",
        "List of this member's peer URLs to advertise to the rest of the cluster.",
    ),
    flag(
        "initial-cluster",
        "default=http://localhost:2380",
        "Initial cluster configuration for bootstrapping.",
    ),
    flag(
        "initial-cluster-state",
        "new",
        "Initial cluster state ('new' or 'existing').",
    ),
    flag(
        "initial-cluster-token",
        "etcd-cluster",
        "Initial cluster token for the etcd cluster during bootstrap.",
    ),
    flag(
        "advertise-client-urls",
        "http://localhost:2379",
        "List of this member's client URLs to advertise to the public.",
    ),
    flag(
        "quota-backend-bytes",
        "0",
        "Raise alarms when backend size exceeds the given quota (0 defaults to low space quota).",
    ),
    flag(
        "max-request-bytes",
        "1572864",
        "Maximum client request size in bytes the server will accept.",
    ),
    flag(
        "max-txn-ops",
        "128",
        "Maximum number of operations permitted in a transaction.",
    ),
    flag(
        "auto-compaction-mode",
        "periodic",
        "Interpret 'auto-compaction-retention' one of: periodic|revision.",
    ),
    flag(
        "auto-compaction-retention",
        "0",
        "Auto compaction retention for mvcc key value store. 0 means disable auto compaction.",
    ),
    flag(
        "log-level",
        "info",
        "Configures log level. Only supports debug, info, warn, error, panic, or fatal.",
    ),
    switch("debug", "Enable debug-level logging."),
    Flag {
        name: "logger",
        default: "capnslog",
        boolean: false,
        support: Support::NoEffect("Cairn always logs through tracing"),
        help: "Specify 'zap' for structured logging or 'capnslog'.",
    },
    Flag {
        name: "log-outputs",
        default: "default",
        boolean: false,
        support: Support::NoEffect("Cairn logs to stderr"),
        help: "Specify 'stdout' or 'stderr' to skip journald logging.",
    },
    Flag {
        name: "max-snapshots",
        default: "5",
        boolean: false,
        support: Support::NoEffect("Cairn keeps no snapshot files"),
        help: "Maximum number of snapshot files to retain (0 is unlimited).",
    },
    Flag {
        name: "max-wals",
        default: "5",
        boolean: false,
        support: Support::NoEffect("Cairn's raft log has no WAL files"),
        help: "Maximum number of wal files to retain (0 is unlimited).",
    },
    Flag {
        name: "enable-pprof",
        default: "false",
        boolean: true,
        support: Support::NoEffect("pprof is Go's profiler"),
        help: "Enable runtime profiling data via HTTP server.",
    },
    later(
        "wal-dir",
        false,
        "a separate --wal-dir is not supported yet",
    ),
    switch(
        "enable-v2",
        "Accept etcd V2 client requests (emulated on the v3 store).",
    ),
    flag(
        "listen-metrics-urls",
        "",
        "List of URLs to listen on for the metrics and health endpoints.",
    ),
    flag(
        "metrics",
        "basic",
        "Set level of detail for exported metrics, specify 'extensive' to include server side grpc histogram metrics.",
    ),
    flag("cert-file", "", "Path to the client server TLS cert file."),
    flag("key-file", "", "Path to the client server TLS key file."),
    flag(
        "trusted-ca-file",
        "",
        "Path to the client server TLS trusted CA cert file.",
    ),
    switch("client-cert-auth", "Enable client cert authentication."),
    flag(
        "client-crl-file",
        "",
        "Path to the client certificate revocation list file.",
    ),
    switch(
        "auto-tls",
        "Client TLS using generated certificates (when --cert-file and --key-file are not given).",
    ),
    flag(
        "cipher-suites",
        "",
        "Comma-separated list of supported TLS cipher suites between client/server and peers (empty will be auto-populated by Go).",
    ),
    flag(
        "peer-cert-file",
        "",
        "Path to the peer server TLS cert file.",
    ),
    flag("peer-key-file", "", "Path to the peer server TLS key file."),
    flag(
        "peer-trusted-ca-file",
        "",
        "Path to the peer server TLS trusted CA file.",
    ),
    switch(
        "peer-client-cert-auth",
        "Enable peer client cert authentication.",
    ),
    flag(
        "peer-cert-allowed-cn",
        "",
        "Allowed CN for inter peer authentication.",
    ),
    flag(
        "peer-cert-allowed-hostname",
        "",
        "Allowed TLS hostname for inter peer authentication.",
    ),
    switch(
        "peer-auto-tls",
        "Peer TLS using self-generated certificates if --peer-key-file and --peer-cert-file are not provided.",
    ),
    flag(
        "max-concurrent-streams",
        "4294967295",
        "Maximum concurrent streams that each client can open at a time.",
    ),
    later("peer-crl-file", false, "peer CRLs are not supported yet"),
    flag(
        "auth-token",
        "simple",
        "Specify auth token specific options: 'simple' or 'jwt,pub-key=...,priv-key=...,sign-method=...,ttl=...'.",
    ),
    flag(
        "auth-token-ttl",
        "300",
        "The lifetime in seconds of the auth token.",
    ),
    flag(
        "bcrypt-cost",
        "10",
        "Specify bcrypt algorithm cost factor for auth password hashing.",
    ),
    later("discovery", false, CLUSTER),
    later("discovery-srv", false, CLUSTER),
    later("force-new-cluster", true, CLUSTER),
    Flag {
        name: "strict-reconfig-check",
        default: "true",
        boolean: true,
        support: Support::NoEffect(
            "Cairn does not yet check reconfigurations against started members",
        ),
        help: "Reject reconfiguration requests that would cause quorum loss.",
    },
    switch(
        "experimental-initial-corrupt-check",
        "Enable to check data corruption before serving any client/peer traffic.",
    ),
    flag(
        "experimental-corrupt-check-time",
        "0s",
        "Duration of time between cluster corruption check passes.",
    ),
    flag(
        "experimental-watch-progress-notify-interval",
        "10m0s",
        "Duration of periodic watch progress notifications.",
    ),
];

/// The member's settings, typed.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub name: String,
    pub data_dir: PathBuf,
    pub snapshot_count: u64,
    pub heartbeat_interval: Duration,
    pub election_timeout: Duration,
    pub listen_client_urls: Vec<String>,
    pub advertise_client_urls: Vec<String>,
    pub listen_peer_urls: Vec<String>,
    pub initial_advertise_peer_urls: Vec<String>,
    /// name → peer URLs, in the order given.
    pub initial_cluster: Vec<(String, Vec<String>)>,
    pub initial_cluster_token: String,
    pub initial_cluster_state_new: bool,
    pub max_request_bytes: usize,
    pub max_txn_ops: usize,
    pub auto_compaction: AutoCompaction,
    pub log_level: String,
    pub peer_tls: TlsFlags,
    pub client_tls: TlsFlags,
    /// etcd's --cipher-suites: Go's names of TLS cipher suites.
    pub cipher_suites: Vec<String>,
    pub max_concurrent_streams: u32,
    /// How often watchers that asked for it get a progress notification.
    pub watch_progress_notify_interval: Duration,
    pub initial_corrupt_check: bool,
    /// etcd's --experimental-corrupt-check-time; None when 0.
    pub corrupt_check_interval: Option<Duration>,
    /// The space quota; None when negative (no quota), as etcd.
    pub quota_backend_bytes: Option<u64>,
    pub auth: cairn_auth::Settings,
    /// etcd's --peer-cert-allowed-cn; empty: any.
    pub peer_cert_allowed_cn: String,
    /// etcd's --peer-cert-allowed-hostname; empty: any.
    pub peer_cert_allowed_hostname: String,
    /// Serve etcd's v2 keys API (--enable-v2).
    pub enable_v2: bool,
    /// Where /metrics and /health are served besides the client URLs.
    pub listen_metrics_urls: Vec<String>,
    /// --metrics: "basic" or "extensive".
    pub metrics: String,
}

/// One side's TLS flags: etcd's --cert-file, --key-file, --trusted-ca-file,
/// --client-cert-auth, --client-crl-file and --auto-tls for clients, the
/// same with --peer- for peers.
#[derive(Debug, Clone, Default)]
pub struct TlsFlags {
    pub cert_file: String,
    pub key_file: String,
    pub trusted_ca_file: String,
    pub client_cert_auth: bool,
    pub crl_file: String,
    pub auto_tls: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AutoCompaction {
    Off,
    /// Keep this much history.
    Periodic(Duration),
    /// Keep this many revisions.
    Revision(i64),
}

/// What the command line asked for.
pub enum Invocation {
    Run(Box<ServerConfig>),
    Version,
}

fn command() -> Command {
    let mut cmd = Command::new("cairn")
        .about("Cairn: an etcd-compatible distributed key-value store")
        .disable_version_flag(true)
        // Go's flag package takes a flag given twice, the last value
        // winning; etcd's tests give --client-cert-auth twice.
        .args_override_self(true)
        .arg(
            Arg::new("version")
                .long("version")
                .action(ArgAction::SetTrue)
                .help("Print the version and exit."),
        )
        .arg(
            Arg::new("config-file")
                .long("config-file")
                .help("Path to the server configuration file (etcd's YAML keys)."),
        );
    for f in FLAGS {
        let mut arg = Arg::new(f.name).long(f.name).help(f.help);
        if f.boolean {
            // Go's flag syntax: `--flag`, `--flag=true`, `--flag=false`.
            arg = arg
                .num_args(0..=1)
                .require_equals(true)
                .default_missing_value("true");
        }
        if !f.default.is_empty() {
            arg = arg.help(format!("{} (default {:?})", f.help, f.default));
        }
        cmd = cmd.arg(arg);
    }
    cmd
}

/// Parses the command line, the config file and the environment.
pub fn parse<I, T>(args: I, env: &[(String, String)]) -> anyhow::Result<Invocation>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let matches = command().try_get_matches_from(args)?;
    if matches.get_flag("version") {
        return Ok(Invocation::Version);
    }
    let mut builder = config::Config::builder();
    for f in FLAGS {
        builder = builder.set_default(f.name, f.default)?;
    }
    let env_file = env
        .iter()
        .find(|(k, _)| k == "ETCD_CONFIG_FILE")
        .map(|(_, v)| v.clone());
    if let Some(file) = matches
        .get_one::<String>("config-file")
        .cloned()
        .or(env_file)
    {
        builder =
            builder.add_source(config::File::new(&file, config::FileFormat::Yaml).required(true));
    }
    for (key, value) in env {
        let Some(rest) = key.strip_prefix("ETCD_") else {
            continue;
        };
        let name = rest.to_ascii_lowercase().replace('_', "-");
        if name == "config-file" {
            continue;
        }
        if FLAGS.iter().any(|f| f.name == name) {
            builder = builder.set_override(name, value.as_str())?;
        } else {
            tracing::warn!(variable = %key, "unrecognized environment variable");
        }
    }
    let mut given = BTreeMap::new();
    for f in FLAGS {
        if matches.value_source(f.name) == Some(clap::parser::ValueSource::CommandLine) {
            let value = matches
                .get_one::<String>(f.name)
                .cloned()
                .unwrap_or_default();
            builder = builder.set_override(f.name, value.as_str())?;
            given.insert(f.name, value);
        }
    }
    let values = builder.build()?;
    let get = |name: &str| -> anyhow::Result<String> { Ok(values.get_string(name)?) };

    for f in FLAGS {
        let value = get(f.name)?;
        if value == f.default {
            continue;
        }
        match f.support {
            Support::Yes => {}
            Support::Later(why) => anyhow::bail!("--{} is set, but {why} in Cairn", f.name),
            Support::NoEffect(why) => tracing::warn!(flag = f.name, "flag has no effect: {why}"),
        }
    }

    let name = get("name")?;
    let data_dir = match get("data-dir")?.as_str() {
        "${name}.etcd" => format!("{name}.etcd"),
        dir => dir.to_string(),
    };
    let ms = |flag: &str| -> anyhow::Result<Duration> {
        let v: u64 = parse_num(flag, &get(flag)?)?;
        Ok(Duration::from_millis(v))
    };
    let heartbeat_interval = ms("heartbeat-interval")?;
    let election_timeout = ms("election-timeout")?;
    if heartbeat_interval.is_zero() || election_timeout < heartbeat_interval * 5 {
        anyhow::bail!(
            "--election-timeout[{}ms] should be at least as 5 times as --heartbeat-interval[{}ms]",
            election_timeout.as_millis(),
            heartbeat_interval.as_millis()
        );
    }
    let initial_cluster = parse_initial_cluster(&get("initial-cluster")?)?;
    let state = get("initial-cluster-state")?;
    let initial_cluster_state_new = match state.as_str() {
        "new" => true,
        "existing" => false,
        other => anyhow::bail!(
            "invalid value {other:?} for --initial-cluster-state: expected new or existing"
        ),
    };
    let quota_backend_bytes = parse_quota(&get("quota-backend-bytes")?)?;
    let corrupt_check_interval = parse_go_duration(get("experimental-corrupt-check-time")?.trim())
        .ok_or_else(|| anyhow::anyhow!("invalid value for --experimental-corrupt-check-time"))?;
    // etcd names the peer flags after the client ones, but for the CRL's.
    let tls_flags = |prefix: &str, crl_flag: &str| -> anyhow::Result<TlsFlags> {
        let get = |name: &str| get(&format!("{prefix}{name}"));
        Ok(TlsFlags {
            cert_file: get("cert-file")?,
            key_file: get("key-file")?,
            trusted_ca_file: get("trusted-ca-file")?,
            client_cert_auth: get("client-cert-auth")? == "true",
            crl_file: values.get_string(crl_flag)?,
            auto_tls: get("auto-tls")? == "true",
        })
    };
    let log_level = if get("debug")? == "true" {
        "debug".to_string()
    } else {
        get("log-level")?
    };
    let config = ServerConfig {
        name,
        data_dir: PathBuf::from(data_dir),
        snapshot_count: parse_num("snapshot-count", &get("snapshot-count")?)?,
        heartbeat_interval,
        election_timeout,
        listen_client_urls: split_urls(&get("listen-client-urls")?),
        advertise_client_urls: split_urls(&get("advertise-client-urls")?),
        listen_peer_urls: split_urls(&get("listen-peer-urls")?),
        initial_advertise_peer_urls: split_urls(&get("initial-advertise-peer-urls")?),
        initial_cluster,
        initial_cluster_token: get("initial-cluster-token")?,
        initial_cluster_state_new,
        max_request_bytes: parse_num("max-request-bytes", &get("max-request-bytes")?)?,
        max_txn_ops: parse_num("max-txn-ops", &get("max-txn-ops")?)?,
        auto_compaction: parse_auto_compaction(
            &get("auto-compaction-mode")?,
            &get("auto-compaction-retention")?,
        )?,
        log_level,
        peer_tls: tls_flags("peer-", "peer-crl-file")?,
        client_tls: tls_flags("", "client-crl-file")?,
        cipher_suites: split_urls(&get("cipher-suites")?),
        initial_corrupt_check: get("experimental-initial-corrupt-check")? == "true",
        corrupt_check_interval: (!corrupt_check_interval.is_zero())
            .then_some(corrupt_check_interval),
        quota_backend_bytes,
        max_concurrent_streams: parse_num(
            "max-concurrent-streams",
            &get("max-concurrent-streams")?,
        )?,
        watch_progress_notify_interval: parse_progress_interval(&get(
            "experimental-watch-progress-notify-interval",
        )?)?,
        peer_cert_allowed_cn: get("peer-cert-allowed-cn")?,
        peer_cert_allowed_hostname: get("peer-cert-allowed-hostname")?,
        auth: cairn_auth::Settings {
            token: get("auth-token")?,
            token_ttl: Duration::from_secs(parse_num("auth-token-ttl", &get("auth-token-ttl")?)?),
            bcrypt_cost: parse_bcrypt_cost(&get("bcrypt-cost")?)?,
            client_cert_auth: get("client-cert-auth")? == "true",
        },
        enable_v2: get("enable-v2")? == "true",
        listen_metrics_urls: split_urls(&get("listen-metrics-urls")?),
        metrics: match get("metrics")?.as_str() {
            level @ ("basic" | "extensive") => level.to_string(),
            other => anyhow::bail!("unknown metrics level {other:?} (basic or extensive)"),
        },
    };
    config.check_cluster()?;
    config.check_client_tls()?;
    Ok(Invocation::Run(Box::new(config)))
}

/// bcrypt's costs run from 4 to 31, as Go's bcrypt takes them.
fn parse_bcrypt_cost(value: &str) -> anyhow::Result<u32> {
    match parse_num::<u32>("bcrypt-cost", value)? {
        cost @ 4..=31 => Ok(cost),
        cost => anyhow::bail!("invalid value {cost} for --bcrypt-cost: must be between 4 and 31"),
    }
}

/// A Go duration, not zero: a zero interval would notify without pause.
fn parse_progress_interval(value: &str) -> anyhow::Result<Duration> {
    match parse_go_duration(value.trim()) {
        Some(d) if !d.is_zero() => Ok(d),
        _ => anyhow::bail!(
            "invalid value {value:?} for --experimental-watch-progress-notify-interval"
        ),
    }
}

/// etcd's default quota, for --quota-backend-bytes=0.
const DEFAULT_QUOTA_BYTES: u64 = 2 << 30;

fn parse_quota(value: &str) -> anyhow::Result<Option<u64>> {
    let quota: i64 = parse_num("quota-backend-bytes", value)?;
    Ok(match quota {
        0 => Some(DEFAULT_QUOTA_BYTES),
        q if q < 0 => None,
        q => Some(q as u64),
    })
}

fn parse_num<T: std::str::FromStr>(flag: &str, value: &str) -> anyhow::Result<T> {
    value
        .trim()
        .parse()
        .map_err(|_| anyhow::anyhow!("invalid value {value:?} for --{flag}"))
}

fn split_urls(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

pub(crate) fn parse_initial_cluster(value: &str) -> anyhow::Result<Vec<(String, Vec<String>)>> {
    let mut members: Vec<(String, Vec<String>)> = Vec::new();
    for part in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, url) = part.split_once('=').ok_or_else(|| {
            anyhow::anyhow!("--initial-cluster: {part:?} is not of the form name=url")
        })?;
        match members.iter_mut().find(|(n, _)| n == name) {
            Some((_, urls)) => urls.push(url.to_string()),
            None => members.push((name.to_string(), vec![url.to_string()])),
        }
    }
    Ok(members)
}

/// etcd's auto-compaction: `periodic` takes a duration ("1h", "30m") or a
/// number of hours; `revision` a number of revisions to keep.
fn parse_auto_compaction(mode: &str, retention: &str) -> anyhow::Result<AutoCompaction> {
    let retention = retention.trim();
    if retention == "0" || retention.is_empty() {
        return Ok(AutoCompaction::Off);
    }
    match mode {
        "revision" => Ok(AutoCompaction::Revision(parse_num(
            "auto-compaction-retention",
            retention,
        )?)),
        "periodic" => {
            let period = match retention.parse::<u64>() {
                Ok(hours) => Duration::from_secs(hours * 3600),
                Err(_) => parse_go_duration(retention).ok_or_else(|| {
                    anyhow::anyhow!("invalid auto compaction retention {retention:?}")
                })?,
            };
            if period.is_zero() {
                return Ok(AutoCompaction::Off);
            }
            Ok(AutoCompaction::Periodic(period))
        }
        other => anyhow::bail!("unknown auto-compaction-mode {other:?}"),
    }
}

impl ServerConfig {
    /// Raft ticks in an election timeout.
    pub fn election_ticks(&self) -> usize {
        (self.election_timeout.as_millis() / self.heartbeat_interval.as_millis()) as usize
    }

    /// etcd's minimum lease TTL in seconds: 1.5 election timeouts in whole
    /// heartbeats, rounded up, so a lease outlives a leader election.
    pub fn min_lease_ttl(&self) -> i64 {
        let min = self.heartbeat_interval * (3 * self.election_ticks() as u32 / 2);
        min.as_secs_f64().ceil() as i64
    }

    /// The peer URLs this member is bootstrapped with in --initial-cluster.
    pub fn own_peer_urls(&self) -> anyhow::Result<&[String]> {
        self.initial_cluster
            .iter()
            .find(|(n, _)| *n == self.name)
            .map(|(_, urls)| urls.as_slice())
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "couldn't find local name {:?} in the initial cluster configuration",
                    self.name
                )
            })
    }

    fn check_cluster(&self) -> anyhow::Result<()> {
        let own = self.own_peer_urls()?;
        let mut own_sorted = own.to_vec();
        own_sorted.sort();
        let mut advertised = self.initial_advertise_peer_urls.clone();
        advertised.sort();
        if own_sorted != advertised {
            anyhow::bail!(
                "--initial-cluster has {}={} but --initial-advertise-peer-urls is {}",
                self.name,
                own.join(","),
                self.initial_advertise_peer_urls.join(",")
            );
        }
        let peer_tls = self.peer_tls.auto_tls || !self.peer_tls.cert_file.is_empty();
        for url in self
            .listen_peer_urls
            .iter()
            .chain(&self.initial_advertise_peer_urls)
        {
            if url.starts_with("https://") && !peer_tls {
                anyhow::bail!(
                    "{url}: an https peer URL needs --peer-auto-tls or --peer-cert-file and --peer-key-file"
                );
            }
        }
        if self.peer_tls.cert_file.is_empty() != self.peer_tls.key_file.is_empty() {
            anyhow::bail!("--peer-cert-file and --peer-key-file go together");
        }
        Ok(())
    }

    /// The client TLS flags that cannot work together, and unknown cipher
    /// suites, refused as etcd refuses them: before anything starts.
    fn check_client_tls(&self) -> anyhow::Result<()> {
        cairn_net::check_cipher_suites(&self.cipher_suites)?;
        let flags = &self.client_tls;
        if flags.cert_file.is_empty() != flags.key_file.is_empty() {
            anyhow::bail!("--cert-file and --key-file go together");
        }
        let has_cert = flags.auto_tls || !flags.cert_file.is_empty();
        for url in &self.listen_client_urls {
            if url.starts_with("https://") && !has_cert {
                anyhow::bail!(
                    "TLS key/cert (--cert-file, --key-file) must be provided for client url {url} with HTTPS scheme"
                );
            }
        }
        // etcd's Go verifies client certificates against the system's roots
        // when no CA is given; Cairn has only the CA to verify against.
        // (Under --auto-tls etcd drops --client-cert-auth, and so does Cairn.)
        if flags.client_cert_auth && !flags.cert_file.is_empty() && flags.trusted_ca_file.is_empty()
        {
            anyhow::bail!("--client-cert-auth needs --trusted-ca-file in Cairn");
        }
        let peer_tls = self.peer_tls.auto_tls || !self.peer_tls.cert_file.is_empty();
        if !self.cipher_suites.is_empty() && peer_tls {
            anyhow::bail!(
                "--cipher-suites is set together with peer TLS, but Cairn applies it to client TLS only so far"
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<ServerConfig> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let args = std::iter::once("cairn").chain(args.iter().copied());
        match parse(args, &env)? {
            Invocation::Run(c) => Ok(*c),
            Invocation::Version => anyhow::bail!("version"),
        }
    }

    #[test]
    fn etcd_defaults() -> anyhow::Result<()> {
        let c = run(&[], &[])?;
        assert_eq!(c.name, "default");
        assert_eq!(c.data_dir, PathBuf::from("default.etcd"));
        assert_eq!(c.listen_client_urls, vec!["http://localhost:2379"]);
        assert_eq!(c.max_request_bytes, 1572864);
        assert_eq!(c.max_txn_ops, 128);
        assert_eq!(c.snapshot_count, 100000);
        assert_eq!(c.auto_compaction, AutoCompaction::Off);
        assert_eq!(c.initial_cluster_token, "etcd-cluster");
        Ok(())
    }

    #[test]
    fn flags_beat_environment_beats_file() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("etcd.yaml");
        std::fs::write(
            &file,
            "name: from-file\nmax-txn-ops: 7\nsnapshot-count: 9\n",
        )?;
        let file = file.display().to_string();
        let c = run(
            &[
                "--config-file",
                &file,
                "--name=from-flag",
                "--initial-cluster",
                "from-flag=http://localhost:2380",
            ],
            &[
                ("ETCD_NAME", "from-env"),
                ("ETCD_MAX_TXN_OPS", "8"),
                ("ETCDCTL_API", "3"),
            ],
        )?;
        assert_eq!(c.name, "from-flag");
        assert_eq!(c.data_dir, PathBuf::from("from-flag.etcd"));
        assert_eq!(c.max_txn_ops, 8);
        assert_eq!(c.snapshot_count, 9);
        Ok(())
    }

    #[test]
    fn later_flags_are_refused_clearly() {
        let err = run(&["--peer-crl-file", "x.pem"], &[])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("--peer-crl-file") && err.contains("CRL"),
            "{err}"
        );
        let err = run(&["--wal-dir", "/tmp/wal"], &[])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("wal-dir"), "{err}");
        assert!(run(&["--enable-v2"], &[]).is_ok());
    }

    fn refusal(args: &[&str]) -> String {
        run(args, &[])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn client_tls_flags() -> anyhow::Result<()> {
        let https = "--listen-client-urls=https://127.0.0.1:2379";
        assert_eq!(
            refusal(&[https]),
            "TLS key/cert (--cert-file, --key-file) must be provided for client url https://127.0.0.1:2379 with HTTPS scheme"
        );
        assert!(run(&[https, "--auto-tls"], &[])?.client_tls.auto_tls);
        let c = run(
            &[
                https,
                "--cert-file=s.pem",
                "--key-file=s-key.pem",
                "--trusted-ca-file=ca.pem",
                "--client-cert-auth",
                "--client-crl-file=revoke.crl",
            ],
            &[(
                "ETCD_CIPHER_SUITES",
                "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256, TLS_AES_128_GCM_SHA256",
            )],
        )?;
        assert_eq!(c.client_tls.cert_file, "s.pem");
        assert_eq!(c.client_tls.key_file, "s-key.pem");
        assert_eq!(c.client_tls.trusted_ca_file, "ca.pem");
        assert!(c.client_tls.client_cert_auth);
        assert_eq!(c.client_tls.crl_file, "revoke.crl");
        assert_eq!(
            c.cipher_suites,
            [
                "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
                "TLS_AES_128_GCM_SHA256"
            ]
        );
        assert_eq!(
            refusal(&["--cipher-suites=TLS_NOPE"]),
            "unexpected TLS cipher suite \"TLS_NOPE\""
        );
        let twice = run(
            &[
                "--client-cert-auth=false",
                "--client-cert-auth",
                "--name=a",
                "--name=b",
                "--initial-cluster=b=http://localhost:2380",
            ],
            &[],
        )?;
        assert!(twice.client_tls.client_cert_auth);
        assert_eq!(twice.name, "b");
        // Certificates with an http URL: served plain, as etcd does.
        run(&["--cert-file=s.pem", "--key-file=s-key.pem"], &[])?;
        assert!(refusal(&["--cert-file=s.pem"]).contains("go together"));
        assert!(
            refusal(&[
                "--cert-file=s.pem",
                "--key-file=k.pem",
                "--client-cert-auth"
            ])
            .contains("--trusted-ca-file")
        );
        assert!(
            refusal(&["--peer-auto-tls", "--cipher-suites=TLS_AES_128_GCM_SHA256"])
                .contains("--cipher-suites")
        );
        Ok(())
    }

    #[test]
    fn auto_compaction_retention() -> anyhow::Result<()> {
        assert_eq!(
            parse_auto_compaction("periodic", "1")?,
            AutoCompaction::Periodic(Duration::from_secs(3600))
        );
        assert_eq!(
            parse_auto_compaction("periodic", "1h30m")?,
            AutoCompaction::Periodic(Duration::from_secs(5400))
        );
        assert_eq!(
            parse_auto_compaction("revision", "1000")?,
            AutoCompaction::Revision(1000)
        );
        assert_eq!(parse_auto_compaction("revision", "0")?, AutoCompaction::Off);
        assert!(parse_auto_compaction("weekly", "3").is_err());
        Ok(())
    }
}
