//! The member's doors in from etcd (the work is `cairn-etcd-compat`'s):
//! `cairn snapshot restore`, and the first start on a restored data dir or
//! on an etcd 3.4 data dir, which is migrated in place through this
//! member's apply logic.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use cairn_api::cairnpb::InternalRequest;
use cairn_consensus::{Committed, PeerInfo, StateMachine as _};
use cairn_etcd_compat::{ApplyWrites, Bootstrap};
use cairn_mvcc::{MvccError, Store};
use prost::Message as _;

use crate::apply::{Applier, ApplierError, OpenError};
use crate::config::{ConfigError, ServerConfig};
use crate::ids;
use crate::member::Member;

/// Why a restore, or a member's first start on a restored or etcd data
/// dir, failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("couldn't find local name {0:?} in the initial cluster configuration")]
    UnknownName(String),
    #[error(
        "--initial-cluster has {name}={listed} but --initial-advertise-peer-urls is {advertised}"
    )]
    PeerUrls {
        name: String,
        listed: String,
        advertised: String,
    },
    #[error(transparent)]
    EtcdCompat(#[from] cairn_etcd_compat::Error),
    #[error("syncing the restored store")]
    Sync(#[source] MvccError),
}

/// Why etcd's WAL tail could not be applied.
#[derive(Debug, thiserror::Error)]
enum ReplayError {
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error(transparent)]
    Apply(#[from] ApplierError),
}

/// `cairn snapshot restore`'s options, etcdctl's names and defaults.
#[derive(clap::Parser, Debug)]
#[command(name = "cairn snapshot restore")]
struct RestoreArgs {
    /// The snapshot file.
    file: PathBuf,
    #[arg(long, default_value = "default")]
    name: String,
    /// Defaults to <name>.etcd.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[arg(long, default_value = "default=http://localhost:2380")]
    initial_cluster: String,
    #[arg(long, default_value = "etcd-cluster")]
    initial_cluster_token: String,
    #[arg(long, default_value = "http://localhost:2380")]
    initial_advertise_peer_urls: String,
    #[arg(long, default_value_t = false)]
    skip_hash_check: bool,
}

fn split_urls(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

/// The membership a restore with these flags starts: IDs derived as etcd
/// derives them, so an etcd restored with the same flags would match.
fn bootstrap_from_flags(
    name: &str,
    initial_cluster: &str,
    token: &str,
    advertise: &[String],
) -> Result<Bootstrap, RestoreError> {
    let cluster = crate::config::parse_initial_cluster(initial_cluster)?;
    let urls = cluster
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, urls)| urls)
        .ok_or_else(|| RestoreError::UnknownName(name.to_string()))?;
    let (mut own, mut listed) = (advertise.to_vec(), urls.clone());
    own.sort();
    listed.sort();
    if own != listed {
        return Err(RestoreError::PeerUrls {
            name: name.to_string(),
            listed: urls.join(","),
            advertised: advertise.join(","),
        });
    }
    let members: Vec<cairn_etcd_compat::Member> = cluster
        .iter()
        .map(|(name, urls)| cairn_etcd_compat::Member {
            id: ids::member_id(urls, token),
            name: name.clone(),
            peer_urls: urls.clone(),
            client_urls: Vec::new(),
            is_learner: false,
        })
        .collect();
    let member_ids: Vec<u64> = members.iter().map(|m| m.id).collect();
    Ok(Bootstrap {
        member_id: ids::member_id(urls, token),
        cluster_id: ids::cluster_id(&member_ids),
        members,
    })
}

/// Restores `args` into a new data dir; what `cairn snapshot restore` does.
fn restore(args: &RestoreArgs) -> Result<(), RestoreError> {
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{}.etcd", args.name)));
    let advertise = split_urls(&args.initial_advertise_peer_urls);
    let bootstrap = bootstrap_from_flags(
        &args.name,
        &args.initial_cluster,
        &args.initial_cluster_token,
        &advertise,
    )?;
    cairn_etcd_compat::restore(&args.file, &data_dir, &bootstrap, args.skip_hash_check)?;
    Ok(())
}

/// `cairn snapshot restore ...`.
pub fn snapshot_main(args: &[String]) -> ExitCode {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("info,fjall=warn,lsm_tree=warn")
            }),
        )
        .try_init();
    match args.first().map(String::as_str) {
        Some("restore") => {}
        _ => {
            eprintln!(
                "usage: cairn snapshot restore <file> [--data-dir D] [--name N] [--initial-cluster ...] [--initial-cluster-token T] [--initial-advertise-peer-urls U] [--skip-hash-check]"
            );
            return ExitCode::FAILURE;
        }
    }
    let parsed = <RestoreArgs as clap::Parser>::try_parse_from(
        std::iter::once("cairn snapshot restore".to_string()).chain(args[1..].iter().cloned()),
    );
    let args = match parsed {
        Ok(args) => args,
        Err(e) => e.exit(),
    };
    match restore(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {}", crate::server::report(&e));
            ExitCode::FAILURE
        }
    }
}

/// A member of the restored membership as the consensus layer records it.
pub fn peer(member: cairn_etcd_compat::Member) -> PeerInfo {
    PeerInfo {
        id: member.id,
        name: member.name,
        peer_urls: member.peer_urls,
        client_urls: member.client_urls,
        is_learner: member.is_learner,
    }
}

/// A member of the registry as etcd's snapshots record it.
pub fn etcd_member(peer: PeerInfo) -> cairn_etcd_compat::Member {
    cairn_etcd_compat::Member {
        id: peer.id,
        name: peer.name,
        peer_urls: peer.peer_urls,
        client_urls: peer.client_urls,
        is_learner: peer.is_learner,
    }
}

/// The membership a member's first start bootstraps when its data dir came
/// from a restore, or from etcd (which is migrated here, in place). `None`
/// for a member that has started before or whose data dir holds neither.
///
/// Until [`drop_log_before_restore`] has run, every start returns the
/// restored membership again (the raft log, once bootstrapped, ignores it).
pub fn restored_bootstrap(
    member_dir: &Path,
    config: &ServerConfig,
) -> Result<Option<Bootstrap>, RestoreError> {
    if let Some(bootstrap) = cairn_etcd_compat::read_bootstrap(member_dir)? {
        return Ok(Some(bootstrap));
    }
    if member_dir.join("identity").exists() {
        return Ok(None);
    }
    let mut replay = Replay { config };
    Ok(cairn_etcd_compat::migrate_etcd(
        member_dir,
        config.auth.bcrypt_cost,
        &mut replay,
    )?)
}

/// The restored store is not in the raft log, which starts afresh: once
/// the member has applied the log's first entries (its membership), the log
/// up to there is dropped, so that a member joining later is sent a snapshot
/// of the store rather than replaying a log that lacks the restored data.
pub fn drop_log_before_restore(member: &Member) -> Result<(), RestoreError> {
    member.store.sync().map_err(RestoreError::Sync)?;
    let index = member.store.applied_index();
    member.node.compact_log_through(index);
    cairn_etcd_compat::finish_restore(&member.data_dir)?;
    tracing::info!(index, "dropped the raft log before the restored state");
    Ok(())
}

/// etcd's WAL tail, applied by this member's state machine.
struct Replay<'a> {
    config: &'a ServerConfig,
}

impl ApplyWrites for Replay<'_> {
    type Error = ReplayError;

    fn apply_writes(
        &mut self,
        store: &Store,
        writes: Vec<(u64, InternalRequest)>,
    ) -> Result<(), ReplayError> {
        let mut applier = Applier::open(store.clone(), self.config)?;
        let entries: Vec<Committed> = writes
            .into_iter()
            .map(|(index, request)| Committed {
                index,
                term: 0,
                data: request.encode_to_vec().into(),
            })
            .collect();
        let results = applier.apply(&entries, 0)?;
        for (entry, result) in entries.iter().zip(results) {
            // etcd answered these with the same error; they change nothing.
            if let Err(e) = result {
                tracing::info!(
                    index = entry.index,
                    "etcd's write at this raft index failed: {e}"
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_flags_give_etcds_ids() {
        let urls = vec!["http://localhost:2380".to_string()];
        let b = bootstrap_from_flags(
            "default",
            "default=http://localhost:2380",
            "etcd-cluster",
            &urls,
        )
        .expect("bootstrap");
        // What etcd's default member is called.
        assert_eq!(format!("{:x}", b.member_id), "8e9e05c52164694d");
        assert_eq!(format!("{:x}", b.cluster_id), "cdf818194e3a8c32");
        assert_eq!(b.members.len(), 1);
        assert_eq!(b.members[0].name, "default");

        let missing = bootstrap_from_flags("x", "default=http://a:1", "t", &urls);
        assert!(
            missing
                .expect_err("unknown name")
                .to_string()
                .contains("couldn't find local name")
        );
        let other = bootstrap_from_flags("default", "default=http://a:1", "t", &urls);
        assert_eq!(
            other.expect_err("other URLs").to_string(),
            "--initial-cluster has default=http://a:1 but --initial-advertise-peer-urls is http://localhost:2380"
        );
    }
}
