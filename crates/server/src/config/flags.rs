//! etcd 3.4's flags: names, defaults, help, and what Cairn does with each;
//! and the command line they make.

use clap::{Arg, ArgAction, Command};

/// What Cairn does with a flag.
#[derive(Clone, Copy)]
pub(super) enum Support {
    /// Implemented.
    Yes,
    /// Planned: accepted by the parser, refused at start with this reason.
    Later(&'static str),
    /// Accepted, and has no meaning in Cairn's design (said at start).
    NoEffect(&'static str),
}

pub(super) struct Flag {
    pub(super) name: &'static str,
    pub(super) default: &'static str,
    pub(super) boolean: bool,
    pub(super) support: Support,
    pub(super) help: &'static str,
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

pub(super) const FLAGS: &[Flag] = &[
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
        "disk-reserve-bytes",
        "0",
        "Cairn only: free bytes kept on the data dir's filesystem; below them writes are refused \
         and the NOSPACE alarm is raised until space returns (0: 5% of the filesystem, 8 MiB to \
         1 GiB; negative: off).",
    ),
    flag(
        "shards",
        "1",
        "Cairn only: shards the keyspace is split into, each its own raft group; chosen when the \
         cluster is created and recorded in the data dir (1: one raft group holds every key).",
    ),
    flag(
        "shard-replicas",
        "3",
        "Cairn only: replicas of each shard, on as many members (at most the member count); \
         chosen with --shards when the cluster is created, and recorded with the placement.",
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

pub(super) fn command() -> Command {
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
