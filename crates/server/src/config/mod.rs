//! The member's configuration, with etcd 3.4's flag names and defaults.
//!
//! Sources, later ones winning: defaults < `--config-file` (etcd's YAML keys,
//! which are the flag names) < `ETCD_*` environment variables < flags.

use std::path::PathBuf;
use std::time::Duration;

use cairn_net::EtcdUrl;

mod flags;
mod parse;
#[cfg(test)]
mod tests;

pub(crate) use cairn_api::duration::parse_go_duration;
pub use parse::parse;
pub(crate) use parse::parse_initial_cluster;

pub use cairn_api::{ETCD_CLUSTER_VERSION, ETCD_VERSION};

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
    /// Free space kept on the data dir's filesystem (Cairn's own flag).
    pub disk_reserve: DiskReserve,
    /// Shards of the keyspace (Cairn's own flag); 1: group 0 holds the data.
    pub shards: u32,
    /// Replicas of each shard (Cairn's own flag), at most the member count.
    pub shard_replicas: usize,
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

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The command line does not parse; clap reports it itself.
    #[error(transparent)]
    CommandLine(#[from] clap::Error),
    /// The config file or the environment could not be read.
    #[error(transparent)]
    Source(#[from] ::config::ConfigError),
    /// A value etcd refuses (or Cairn does), in etcd's words.
    #[error("{0}")]
    Invalid(String),
}

/// An https:// or unixs:// URL (one that parses: check_urls runs first).
fn is_tls(url: &str) -> bool {
    EtcdUrl::parse(url).is_ok_and(|url| url.tls)
}

pub(crate) fn invalid(why: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(why.into())
}

/// How much of the data dir's filesystem is kept free: below it, writes
/// are refused with NOSPACE (`--disk-reserve-bytes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskReserve {
    /// 5% of the filesystem, at least 8 MiB and at most 1 GiB (flag 0).
    Auto,
    Bytes(u64),
    /// Not watched (a negative flag).
    Off,
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
    pub fn own_peer_urls(&self) -> Result<&[String], ConfigError> {
        self.initial_cluster
            .iter()
            .find(|(n, _)| *n == self.name)
            .map(|(_, urls)| urls.as_slice())
            .ok_or_else(|| {
                invalid(format!(
                    "couldn't find local name {:?} in the initial cluster configuration",
                    self.name
                ))
            })
    }

    /// Every URL flag's URLs, read as etcd reads them: http, https, unix
    /// or unixs, refused otherwise in etcd's words.
    fn check_urls(&self) -> Result<(), ConfigError> {
        let flags = [
            ("listen-client-urls", &self.listen_client_urls),
            ("advertise-client-urls", &self.advertise_client_urls),
            ("listen-peer-urls", &self.listen_peer_urls),
            (
                "initial-advertise-peer-urls",
                &self.initial_advertise_peer_urls,
            ),
            ("listen-metrics-urls", &self.listen_metrics_urls),
        ];
        let cluster = self
            .initial_cluster
            .iter()
            .map(|(_, urls)| ("initial-cluster", urls));
        for (flag, urls) in flags.into_iter().chain(cluster) {
            for url in urls {
                EtcdUrl::parse(url)
                    .map_err(|e| invalid(format!("invalid value {url:?} for --{flag}: {e}")))?;
            }
        }
        Ok(())
    }

    fn check_cluster(&self) -> Result<(), ConfigError> {
        let own = self.own_peer_urls()?;
        let mut own_sorted = own.to_vec();
        own_sorted.sort();
        let mut advertised = self.initial_advertise_peer_urls.clone();
        advertised.sort();
        if own_sorted != advertised {
            return Err(invalid(format!(
                "--initial-cluster has {}={} but --initial-advertise-peer-urls is {}",
                self.name,
                own.join(","),
                self.initial_advertise_peer_urls.join(",")
            )));
        }
        let peer_tls = self.peer_tls.auto_tls || !self.peer_tls.cert_file.is_empty();
        for url in self
            .listen_peer_urls
            .iter()
            .chain(&self.initial_advertise_peer_urls)
        {
            if is_tls(url) && !peer_tls {
                return Err(invalid(format!(
                    "{url}: an https peer URL needs --peer-auto-tls or --peer-cert-file and --peer-key-file"
                )));
            }
        }
        if self.peer_tls.cert_file.is_empty() != self.peer_tls.key_file.is_empty() {
            return Err(invalid("--peer-cert-file and --peer-key-file go together"));
        }
        Ok(())
    }

    /// The client TLS flags that cannot work together, and unknown cipher
    /// suites, refused as etcd refuses them: before anything starts.
    fn check_client_tls(&self) -> Result<(), ConfigError> {
        cairn_net::check_cipher_suites(&self.cipher_suites).map_err(|e| invalid(e.to_string()))?;
        let flags = &self.client_tls;
        if flags.cert_file.is_empty() != flags.key_file.is_empty() {
            return Err(invalid("--cert-file and --key-file go together"));
        }
        let has_cert = flags.auto_tls || !flags.cert_file.is_empty();
        for url in &self.listen_client_urls {
            if is_tls(url) && !has_cert {
                return Err(invalid(format!(
                    "TLS key/cert (--cert-file, --key-file) must be provided for client url {url} with HTTPS scheme"
                )));
            }
        }
        // etcd's Go verifies client certificates against the system's roots
        // when no CA is given; Cairn has only the CA to verify against.
        // (Under --auto-tls etcd drops --client-cert-auth, and so does Cairn.)
        if flags.client_cert_auth && !flags.cert_file.is_empty() && flags.trusted_ca_file.is_empty()
        {
            return Err(invalid(
                "--client-cert-auth needs --trusted-ca-file in Cairn",
            ));
        }
        let peer_tls = self.peer_tls.auto_tls || !self.peer_tls.cert_file.is_empty();
        if !self.cipher_suites.is_empty() && peer_tls {
            return Err(invalid("--cipher-suites is set together with peer TLS, but Cairn applies it to client TLS only so far".to_string()));
        }
        Ok(())
    }
}
