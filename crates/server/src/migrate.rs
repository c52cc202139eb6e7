//! The way in from etcd: a data dir built from an etcd-format (bbolt)
//! snapshot, etcd's or Cairn's.
//!
//! Two doors lead here:
//! - `cairn snapshot restore <file> --data-dir D --name N --initial-cluster
//!   ... --initial-cluster-token T --initial-advertise-peer-urls U` (as
//!   `etcdctl snapshot restore`) checks the snapshot's sha256, imports it
//!   into `D/member/kv` and records the new cluster's membership.
//! - A member started on an etcd 3.4 data dir (`member/snap/db` and
//!   `member/wal`, e.g. written by `etcdctl snapshot restore`) without
//!   Cairn's data imports `member/snap/db` in place, taking its own ID, the
//!   cluster ID and the members from etcd's write-ahead log.
//!
//! Either way the member then starts a fresh raft log for that membership
//! (the first start of a new cluster), over a store holding every revision
//! of the snapshot, its compaction and its leases: keys, revisions and
//! leases are the snapshot's; the raft index starts again from 1.

use std::fs::File;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use bytes::Bytes;
use cairn_api::cairnpb::InternalRequest;
use cairn_api::cairnpb::Lease;
use cairn_api::mvccpb::KeyValue;
use cairn_bbolt::{Bucket, Db, Item};
use cairn_consensus::{Committed, PeerInfo, StateMachine as _};
use cairn_mvcc::{MvccError, Store, StoredRevision};
use prost::Message as _;
use sha2::{Digest as _, Sha256};

use crate::apply::Applier;
use crate::backup::{AuthBuckets, StoredMember};
use crate::config::ServerConfig;
use crate::etcd_wal::read_wal;
use crate::ids;
use crate::member::Member;

/// Where a restore leaves the membership the first start bootstraps.
const BOOTSTRAP_FILE: &str = "bootstrap.json";
/// etcd's member directory files that mark an etcd data dir.
const ETCD_DB: &str = "snap/db";
const ETCD_WAL: &str = "wal";
const SHA256_LEN: usize = 32;

/// Who the member is and which members the new cluster starts with, as a
/// restore decided.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Bootstrap {
    pub member_id: u64,
    pub cluster_id: u64,
    pub members: Vec<PeerInfo>,
}

/// What was read from a snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub revisions: u64,
    pub revision: i64,
    pub compact_revision: i64,
    pub leases: u64,
    /// The last raft index the database holds (etcd's `consistent_index`).
    pub consistent_index: u64,
    pub auth_enabled: bool,
    pub users: u64,
    /// The members bucket (the cluster the snapshot was taken from).
    pub members: Vec<PeerInfo>,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    #[error("{0}")]
    Bbolt(#[from] cairn_bbolt::Error),
    #[error("{0}")]
    Mvcc(#[from] MvccError),
    #[error("{0}")]
    Invalid(String),
}

/// A revision key of etcd's `key` bucket: 8-byte main, `_`, 8-byte sub,
/// and `t` for a tombstone.
fn decode_revision_key(key: &[u8]) -> Result<(i64, u32, bool), ReadError> {
    let invalid = || ReadError::Invalid(format!("revision key {key:02x?}"));
    if !(key.len() == 17 || key.len() == 18 && key[17] == b't') || key[8] != b'_' {
        return Err(invalid());
    }
    let main = i64::from_be_bytes(key[..8].try_into().map_err(|_| invalid())?);
    let sub = u64::from_be_bytes(key[9..17].try_into().map_err(|_| invalid())?);
    Ok((
        main,
        u32::try_from(sub).map_err(|_| invalid())?,
        key.len() == 18,
    ))
}

fn value(item: Item) -> Result<Vec<u8>, ReadError> {
    match item {
        Item::Value(v) => Ok(v),
        Item::Bucket(_) => Err(ReadError::Invalid("unexpected nested bucket".into())),
    }
}

fn bucket(db: &Db, name: &str) -> Result<Option<Bucket>, ReadError> {
    Ok(db.bucket(db.root(), name.as_bytes())?)
}

pub(crate) fn stored_member(json: &[u8]) -> Result<PeerInfo, ReadError> {
    let m: StoredMember = serde_json::from_slice(json)
        .map_err(|e| ReadError::Invalid(format!("member record: {e}")))?;
    Ok(PeerInfo {
        id: m.id,
        name: m.name,
        peer_urls: m.peer_urls,
        client_urls: m.client_urls,
        is_learner: m.is_learner,
    })
}

/// The `auth`, `authUsers` and `authRoles` buckets.
fn read_auth(db: &Db) -> Result<AuthBuckets, ReadError> {
    let mut auth = AuthBuckets::default();
    if let Some(b) = bucket(db, "auth")? {
        for entry in db.entries(&b) {
            let (key, item) = entry?;
            let v = value(item)?;
            match key.as_slice() {
                b"authEnabled" => auth.enabled = v == [1],
                b"authRevision" => {
                    auth.revision = u64::from_be_bytes(v.as_slice().try_into().map_err(|_| {
                        ReadError::Invalid(format!("authRevision of {} bytes", v.len()))
                    })?)
                }
                _ => {}
            }
        }
    }
    for (name, list) in [
        ("authUsers", &mut auth.users),
        ("authRoles", &mut auth.roles),
    ] {
        if let Some(b) = bucket(db, name)? {
            for entry in db.entries(&b) {
                let (key, item) = entry?;
                list.push((key, value(item)?));
            }
        }
    }
    Ok(auth)
}

/// Imports the bbolt database at `db_path` into a new mvcc store at
/// `kv_dir`: every revision of the `key` bucket, the leases and the
/// compact revision.
pub fn import_bbolt(db_path: &Path, kv_dir: &Path) -> anyhow::Result<Summary> {
    let db = Db::open(db_path).with_context(|| format!("reading {}", db_path.display()))?;
    let mut summary = Summary::default();
    if let Some(meta) = bucket(&db, "meta")? {
        for entry in db.entries(&meta) {
            let (key, item) = entry?;
            // A compaction scheduled but not finished is finished by the
            // store when it opens.
            if key == b"finishedCompactRev" || key == b"scheduledCompactRev" {
                let (main, _, _) = decode_revision_key(&value(item)?)?;
                summary.compact_revision = summary.compact_revision.max(main);
            } else if key == b"consistent_index" {
                let index = value(item)?;
                summary.consistent_index =
                    u64::from_be_bytes(index.as_slice().try_into().map_err(|_| {
                        ReadError::Invalid(format!("consistent_index of {} bytes", index.len()))
                    })?);
            }
        }
    }
    let mut leases = Vec::new();
    if let Some(lease) = bucket(&db, "lease")? {
        for entry in db.entries(&lease) {
            let (key, item) = entry?;
            let record = value(item)?;
            let id = i64::from_be_bytes(
                key.as_slice()
                    .try_into()
                    .map_err(|_| ReadError::Invalid(format!("lease key {key:02x?}")))?,
            );
            // etcd's leasepb.Lease is Cairn's lease record.
            Lease::decode(record.as_slice())
                .map_err(|e| ReadError::Invalid(format!("lease {id:x}: {e}")))?;
            leases.push((id, record));
        }
    }
    if let Some(members) = bucket(&db, "members")? {
        for entry in db.entries(&members) {
            let (_, item) = entry?;
            summary.members.push(stored_member(&value(item)?)?);
        }
    }
    let auth = read_auth(&db)?;
    summary.auth_enabled = auth.enabled;
    summary.users = auth.users.len() as u64;
    let auth_record = auth
        .to_record()
        .map_err(|e| ReadError::Invalid(format!("auth users or roles: {e}")))?;
    let key = bucket(&db, "key")?
        .ok_or_else(|| anyhow::anyhow!("{} has no key bucket", db_path.display()))?;
    let revisions = db.entries(&key).map(|entry| {
        let (key, item) = entry?;
        let (main, sub, tombstone) = decode_revision_key(&key)?;
        let kv = KeyValue::decode(Bytes::from(value(item)?))
            .map_err(|e| ReadError::Invalid(format!("revision {main}/{sub}: {e}")))?;
        Ok::<_, ReadError>(StoredRevision {
            main,
            sub,
            tombstone,
            kv,
        })
    });
    let imported = cairn_mvcc::import(
        kv_dir,
        0,
        summary.compact_revision,
        revisions,
        leases,
        [auth_record],
    )
    .map_err(|e: ReadError| anyhow::anyhow!("importing {}: {e}", db_path.display()))?;
    summary.revisions = imported.revisions;
    summary.revision = imported.last_revision.max(summary.compact_revision);
    summary.leases = imported.leases;
    Ok(summary)
}

/// Checks the sha256 `etcdctl snapshot save` (and Maintenance.Snapshot)
/// appends to a snapshot, as `etcdctl snapshot restore` does: a database of
/// whole 512-byte sectors followed by 32 bytes.
pub fn verify_hash(path: &Path, skip_hash_check: bool) -> anyhow::Result<()> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    let has_hash = len % 512 == SHA256_LEN as u64;
    if !has_hash {
        if skip_hash_check {
            return Ok(());
        }
        anyhow::bail!("snapshot missing hash but --skip-hash-check=false");
    }
    if skip_hash_check {
        return Ok(());
    }
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut remaining = len - SHA256_LEN as u64;
    let mut buf = vec![0; 1 << 16];
    while remaining > 0 {
        let n = buf.len().min(remaining as usize);
        file.read_exact(&mut buf[..n])?;
        hasher.update(&buf[..n]);
        remaining -= n as u64;
    }
    let mut stored = [0; SHA256_LEN];
    file.read_exact(&mut stored)?;
    let computed = hasher.finalize();
    if computed.as_slice() != stored {
        anyhow::bail!("expected sha256 {stored:?}, got {:?}", computed.as_slice());
    }
    Ok(())
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
) -> anyhow::Result<Bootstrap> {
    let cluster = crate::config::parse_initial_cluster(initial_cluster)?;
    let urls = cluster
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, urls)| urls)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "couldn't find local name {name:?} in the initial cluster configuration"
            )
        })?;
    let (mut own, mut listed) = (advertise.to_vec(), urls.clone());
    own.sort();
    listed.sort();
    if own != listed {
        anyhow::bail!(
            "--initial-cluster has {name}={} but --initial-advertise-peer-urls is {}",
            urls.join(","),
            advertise.join(",")
        );
    }
    let members: Vec<PeerInfo> = cluster
        .iter()
        .map(|(name, urls)| PeerInfo {
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

fn write_bootstrap(member_dir: &Path, bootstrap: &Bootstrap) -> anyhow::Result<()> {
    let path = member_dir.join(BOOTSTRAP_FILE);
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(bootstrap)?)?;
    File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    Ok(())
}

/// Restores `args` into a new data dir; what `cairn snapshot restore` does.
fn restore(args: &RestoreArgs) -> anyhow::Result<()> {
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{}.etcd", args.name)));
    if data_dir.exists() {
        anyhow::bail!("data-dir {:?} exists", data_dir.display().to_string());
    }
    let advertise = split_urls(&args.initial_advertise_peer_urls);
    let bootstrap = bootstrap_from_flags(
        &args.name,
        &args.initial_cluster,
        &args.initial_cluster_token,
        &advertise,
    )?;
    verify_hash(&args.file, args.skip_hash_check)?;
    tracing::info!(
        path = %args.file.display(),
        data_dir = %data_dir.display(),
        "restoring snapshot"
    );
    let member_dir = data_dir.join("member");
    std::fs::create_dir_all(&member_dir)
        .with_context(|| format!("creating {}", member_dir.display()))?;
    let restored = import_bbolt(&args.file, &member_dir.join("kv")).and_then(|summary| {
        write_bootstrap(&member_dir, &bootstrap)?;
        Ok(summary)
    });
    let summary = match restored {
        Ok(summary) => summary,
        Err(e) => {
            // Leave nothing half restored behind.
            let _ = std::fs::remove_dir_all(&data_dir);
            return Err(e);
        }
    };
    for member in &bootstrap.members {
        tracing::info!(
            "added member {:x} {:?} to cluster {:x}",
            member.id,
            member.peer_urls,
            bootstrap.cluster_id
        );
    }
    tracing::info!(
        revision = summary.revision,
        compact_revision = summary.compact_revision,
        revisions = summary.revisions,
        leases = summary.leases,
        auth_enabled = summary.auth_enabled,
        users = summary.users,
        "restored snapshot"
    );
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
            eprintln!("Error: {e:#}");
            ExitCode::FAILURE
        }
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
) -> anyhow::Result<Option<Bootstrap>> {
    let file = member_dir.join(BOOTSTRAP_FILE);
    if file.exists() {
        let bootstrap: Bootstrap = serde_json::from_slice(&std::fs::read(&file)?)
            .with_context(|| format!("reading {}", file.display()))?;
        return Ok(Some(bootstrap));
    }
    if member_dir.join("identity").exists() {
        return Ok(None);
    }
    let kv = member_dir.join("kv");
    let etcd_db = member_dir.join(ETCD_DB);
    if kv.exists() || !etcd_db.exists() {
        return Ok(None);
    }
    migrate_etcd(member_dir, config).map(Some)
}

/// The restored store is not in the raft log, which starts afresh: once
/// the member has applied the log's first entries (its membership), the log
/// up to there is dropped, so that a member joining later is sent a snapshot
/// of the store rather than replaying a log that lacks the restored data.
pub fn drop_log_before_restore(member: &Member) -> anyhow::Result<()> {
    member.store.sync().context("syncing the restored store")?;
    let index = member.store.applied_index();
    member.node.compact_log_through(index);
    std::fs::remove_file(member.data_dir.join(BOOTSTRAP_FILE))
        .context("removing the restore's bootstrap file")?;
    tracing::info!(index, "dropped the raft log before the restored state");
    Ok(())
}

/// Imports an etcd data dir's database, applies the writes its WAL holds
/// past the database (as etcd does when it restarts), and takes the
/// membership from the WAL (on top of the database's members bucket when
/// the WAL does not reach back to the first entry).
fn migrate_etcd(member_dir: &Path, config: &ServerConfig) -> anyhow::Result<Bootstrap> {
    let etcd_db = member_dir.join(ETCD_DB);
    tracing::info!(
        path = %etcd_db.display(),
        "found an etcd data dir without Cairn's data: migrating it"
    );
    // Imported beside the final place and renamed when complete, so that a
    // crash midway starts over.
    let partial = member_dir.join("kv.migrating");
    if partial.exists() {
        std::fs::remove_dir_all(&partial)?;
    }
    let summary = import_bbolt(&etcd_db, &partial)?;
    let wal = read_wal(
        &member_dir.join(ETCD_WAL),
        &summary.members,
        summary.consistent_index,
        config.auth.bcrypt_cost,
    )?;
    let replayed = wal.writes.len();
    replay(&partial, wal.writes, config)?;
    let members = wal.members;
    if !members.iter().any(|m| m.id == wal.member_id) {
        anyhow::bail!(
            "etcd's WAL names member {:x}, which is not among the members {:x?}",
            wal.member_id,
            members.iter().map(|m| m.id).collect::<Vec<_>>()
        );
    }
    let bootstrap = Bootstrap {
        member_id: wal.member_id,
        cluster_id: wal.cluster_id,
        members,
    };
    write_bootstrap(member_dir, &bootstrap)?;
    std::fs::rename(&partial, member_dir.join("kv"))?;
    tracing::info!(
        member = %format!("{:x}", bootstrap.member_id),
        cluster = %format!("{:x}", bootstrap.cluster_id),
        members = bootstrap.members.len(),
        revision = summary.revision,
        compact_revision = summary.compact_revision,
        revisions = summary.revisions,
        leases = summary.leases,
        auth_enabled = summary.auth_enabled,
        users = summary.users,
        replayed,
        "migrated etcd's data: keys, revisions and leases imported, and the writes only its WAL held replayed; a new raft log starts for these members (etcd's member/wal and member/snap are no longer read)"
    );
    Ok(bootstrap)
}

/// Applies the committed writes of etcd's WAL tail to the imported store
/// in `kv_dir`, through the apply loop's state machine, as one batch.
/// The store's applied index stays 0: the new raft log starts at 1.
fn replay(
    kv_dir: &Path,
    writes: Vec<(u64, InternalRequest)>,
    config: &ServerConfig,
) -> anyhow::Result<()> {
    if writes.is_empty() {
        return Ok(());
    }
    let store = Store::open(kv_dir).context("opening the imported store")?;
    let mut applier = Applier::open(store.clone(), config)?;
    let entries: Vec<Committed> = writes
        .into_iter()
        .map(|(index, request)| Committed {
            index,
            term: 0,
            data: request.encode_to_vec().into(),
        })
        .collect();
    let results = applier
        .apply(&entries, 0)
        .map_err(|e| anyhow::anyhow!("replaying etcd's WAL: {e}"))?;
    for (entry, result) in entries.iter().zip(results) {
        // etcd answered these with the same error; they change nothing.
        if let Err(e) = result {
            tracing::info!(
                index = entry.index,
                "etcd's write at this raft index failed: {e}"
            );
        }
    }
    store.sync().context("syncing the imported store")?;
    Ok(())
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
        assert!(other.is_err());
    }

    #[test]
    fn snapshot_hash_is_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("snap");
        let db = vec![7u8; 1024];
        let mut file = db.clone();
        file.extend_from_slice(&Sha256::digest(&db));
        std::fs::write(&path, &file).expect("write");
        verify_hash(&path, false).expect("a good hash");

        file[10] ^= 1;
        std::fs::write(&path, &file).expect("write");
        let err = verify_hash(&path, false).expect_err("a damaged db");
        assert!(err.to_string().contains("expected sha256"), "{err}");
        verify_hash(&path, true).expect("skipped");

        std::fs::write(&path, &db).expect("write");
        let err = verify_hash(&path, false).expect_err("no hash");
        assert!(err.to_string().contains("snapshot missing hash"), "{err}");
        verify_hash(&path, true).expect("a bare db with --skip-hash-check");
    }
}
