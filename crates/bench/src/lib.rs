//! `cairn-bench`: a load generator for any etcd v3 endpoint (Cairn or etcd
//! itself), after etcd's `tools/benchmark`: the same subcommands (put,
//! range, txn-put, watch, watch-latency, lease-keepalive) and flags
//! (--endpoints, --conns, --clients, --total, --key-size, --val-size,
//! --key-space-size, --sequential-keys, ...), the same report (summary,
//! latency histogram, percentiles, errors), or one JSON object.
//!
//! It speaks gRPC through the generated clients of `cairn-api` only, so the
//! same load can be pointed at etcd 3.4 and at Cairn.

pub mod cli;
pub mod conn;
pub mod driver;
pub mod keys;
pub mod kv;
pub mod lease;
pub mod progress;
pub mod stats;
pub mod watch;

pub use cli::{Cli, Outcome, run, write};
