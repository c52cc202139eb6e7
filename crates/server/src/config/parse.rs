//! Reading the flags' values from the command line, the config file and
//! the environment, and turning them into a typed [`ServerConfig`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use super::flags::{FLAGS, Support, command};
use super::{
    AutoCompaction, ConfigError, DiskReserve, Invocation, ServerConfig, TlsFlags, invalid,
    parse_go_duration,
};

/// Parses the command line, the config file and the environment.
pub fn parse<I, T>(args: I, env: &[(String, String)]) -> Result<Invocation, ConfigError>
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
    let get = |name: &str| -> Result<String, ConfigError> { Ok(values.get_string(name)?) };

    for f in FLAGS {
        let value = get(f.name)?;
        if value == f.default {
            continue;
        }
        match f.support {
            Support::Yes => {}
            Support::Later(why) => {
                return Err(invalid(format!("--{} is set, but {why} in Cairn", f.name)));
            }
            Support::NoEffect(why) => tracing::warn!(flag = f.name, "flag has no effect: {why}"),
        }
    }

    let name = get("name")?;
    let data_dir = match get("data-dir")?.as_str() {
        "${name}.etcd" => format!("{name}.etcd"),
        dir => dir.to_string(),
    };
    let ms = |flag: &str| -> Result<Duration, ConfigError> {
        let v: u64 = parse_num(flag, &get(flag)?)?;
        Ok(Duration::from_millis(v))
    };
    let heartbeat_interval = ms("heartbeat-interval")?;
    let election_timeout = ms("election-timeout")?;
    if heartbeat_interval.is_zero() || election_timeout < heartbeat_interval * 5 {
        return Err(invalid(format!(
            "--election-timeout[{}ms] should be at least as 5 times as --heartbeat-interval[{}ms]",
            election_timeout.as_millis(),
            heartbeat_interval.as_millis()
        )));
    }
    let initial_cluster = parse_initial_cluster(&get("initial-cluster")?)?;
    let state = get("initial-cluster-state")?;
    let initial_cluster_state_new = match state.as_str() {
        "new" => true,
        "existing" => false,
        other => {
            return Err(invalid(format!(
                "invalid value {other:?} for --initial-cluster-state: expected new or existing"
            )));
        }
    };
    let quota_backend_bytes = parse_quota(&get("quota-backend-bytes")?)?;
    let disk_reserve = match parse_num::<i64>("disk-reserve-bytes", &get("disk-reserve-bytes")?)? {
        0 => DiskReserve::Auto,
        r if r < 0 => DiskReserve::Off,
        r => DiskReserve::Bytes(r as u64),
    };
    let corrupt_check_interval = parse_go_duration(get("experimental-corrupt-check-time")?.trim())
        .ok_or_else(|| invalid("invalid value for --experimental-corrupt-check-time"))?;
    // etcd names the peer flags after the client ones, but for the CRL's.
    let tls_flags = |prefix: &str, crl_flag: &str| -> Result<TlsFlags, ConfigError> {
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
        disk_reserve,
        shards: parse_shards(&get("shards")?)?,
        shard_replicas: parse_shard_replicas(&get("shard-replicas")?)?,
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
            other => {
                return Err(invalid(format!(
                    "unknown metrics level {other:?} (basic or extensive)"
                )));
            }
        },
    };
    config.check_urls()?;
    config.check_cluster()?;
    config.check_client_tls()?;
    Ok(Invocation::Run(Box::new(config)))
}

/// bcrypt's costs run from 4 to 31, as Go's bcrypt takes them.
fn parse_bcrypt_cost(value: &str) -> Result<u32, ConfigError> {
    match parse_num::<u32>("bcrypt-cost", value)? {
        cost @ 4..=31 => Ok(cost),
        cost => Err(invalid(format!(
            "invalid value {cost} for --bcrypt-cost: must be between 4 and 31"
        ))),
    }
}

/// A Go duration, not zero: a zero interval would notify without pause.
fn parse_progress_interval(value: &str) -> Result<Duration, ConfigError> {
    match parse_go_duration(value.trim()) {
        Some(d) if !d.is_zero() => Ok(d),
        _ => Err(invalid(format!(
            "invalid value {value:?} for --experimental-watch-progress-notify-interval"
        ))),
    }
}

/// etcd's default quota, for --quota-backend-bytes=0.
const DEFAULT_QUOTA_BYTES: u64 = 2 << 30;

fn parse_quota(value: &str) -> Result<Option<u64>, ConfigError> {
    let quota: i64 = parse_num("quota-backend-bytes", value)?;
    Ok(match quota {
        0 => Some(DEFAULT_QUOTA_BYTES),
        q if q < 0 => None,
        q => Some(q as u64),
    })
}

fn parse_num<T: std::str::FromStr>(flag: &str, value: &str) -> Result<T, ConfigError> {
    value
        .trim()
        .parse()
        .map_err(|_| invalid(format!("invalid value {value:?} for --{flag}")))
}

fn split_urls(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

pub(crate) fn parse_initial_cluster(
    value: &str,
) -> Result<Vec<(String, Vec<String>)>, ConfigError> {
    let mut members: Vec<(String, Vec<String>)> = Vec::new();
    for part in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, url) = part.split_once('=').ok_or_else(|| {
            invalid(format!(
                "--initial-cluster: {part:?} is not of the form name=url"
            ))
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
pub(super) fn parse_auto_compaction(
    mode: &str,
    retention: &str,
) -> Result<AutoCompaction, ConfigError> {
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
                    invalid(format!("invalid auto compaction retention {retention:?}"))
                })?,
            };
            if period.is_zero() {
                return Ok(AutoCompaction::Off);
            }
            Ok(AutoCompaction::Periodic(period))
        }
        other => Err(invalid(format!("unknown auto-compaction-mode {other:?}"))),
    }
}

fn parse_shard_replicas(value: &str) -> Result<usize, ConfigError> {
    match parse_num("shard-replicas", value)? {
        0 => Err(invalid("--shard-replicas must be at least 1")),
        replicas => Ok(replicas),
    }
}

fn parse_shards(value: &str) -> Result<u32, ConfigError> {
    let shards = parse_num("shards", value)?;
    cairn_shard::Keyspace::new(shards).map_err(|e| invalid(e.to_string()))?;
    Ok(shards)
}
