//! A data dir built from an etcd-format (bbolt) snapshot, etcd's or
//! Cairn's, through one of two doors:
//! - [`restore`] (`cairn snapshot restore`, as `etcdctl snapshot restore`)
//!   checks the snapshot's sha256, imports it into `<data dir>/member/kv`
//!   and records the new cluster's membership.
//! - [`migrate_etcd`] imports an etcd 3.4 data dir (`member/snap/db` and
//!   `member/wal`, e.g. written by `etcdctl snapshot restore`, or left by a
//!   killed etcd member) in place, taking the member's own ID, the cluster
//!   ID and the members from etcd's write-ahead log, and replaying the
//!   writes only the log holds through the member's apply logic.
//!
//! Either way the member then starts a fresh raft log for that membership
//! (the first start of a new cluster), over a store holding every revision
//! of the snapshot, its compaction and its leases: keys, revisions and
//! leases are the snapshot's; the raft index starts again from 1. The
//! membership stays in `member/bootstrap.json` ([`read_bootstrap`]) until
//! the member has started on it ([`finish_restore`]).

use std::fs::File;
use std::path::Path;

use cairn_api::cairnpb::InternalRequest;
use cairn_mvcc::Store;

use crate::import::{Summary, import_bbolt, verify_hash};
use crate::wal::read_wal;
use crate::{Error, Member};

/// Where a restore leaves the membership the first start bootstraps.
const BOOTSTRAP_FILE: &str = "bootstrap.json";
/// etcd's member directory files that mark an etcd data dir.
const ETCD_DB: &str = "snap/db";
const ETCD_WAL: &str = "wal";

/// Who the member is and which members the new cluster starts with, as a
/// restore decided.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Bootstrap {
    pub member_id: u64,
    pub cluster_id: u64,
    pub members: Vec<Member>,
}

/// The member's apply logic, through which a migration replays the writes
/// etcd's WAL holds past its database (which etcd itself would replay at
/// its next start).
pub trait ApplyWrites {
    type Error: Into<Box<dyn std::error::Error + Send + Sync>>;

    /// Applies `writes` (etcd's raft index and the request as the member
    /// proposes it, in log order) to `store` as the member applies
    /// committed entries, in one batch, leaving the store's applied index
    /// at 0. A write the member refuses as etcd refused it changes nothing
    /// and is no error. Holds nothing of `store` once it returns.
    fn apply_writes(
        &mut self,
        store: &Store,
        writes: Vec<(u64, InternalRequest)>,
    ) -> Result<(), Self::Error>;
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_owned();
    move |error| Error::File {
        action,
        path,
        error,
    }
}

fn write_bootstrap(member_dir: &Path, bootstrap: &Bootstrap) -> Result<(), Error> {
    let path = member_dir.join(BOOTSTRAP_FILE);
    let tmp = path.with_extension("tmp");
    let json = serde_json::to_vec_pretty(bootstrap).map_err(|error| Error::BootstrapFile {
        path: path.clone(),
        error,
    })?;
    std::fs::write(&tmp, json).map_err(io_error("writing", &tmp))?;
    File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io_error("syncing", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_error("renaming", &tmp))?;
    Ok(())
}

/// Restores the snapshot `file` into the new data dir `data_dir` for the
/// membership `bootstrap`; what `etcdctl snapshot restore` does. Leaves
/// nothing behind when it fails.
pub fn restore(
    file: &Path,
    data_dir: &Path,
    bootstrap: &Bootstrap,
    skip_hash_check: bool,
) -> Result<Summary, Error> {
    if data_dir.exists() {
        return Err(Error::DataDirExists(data_dir.display().to_string()));
    }
    verify_hash(file, skip_hash_check)?;
    tracing::info!(
        path = %file.display(),
        data_dir = %data_dir.display(),
        "restoring snapshot"
    );
    let member_dir = data_dir.join("member");
    std::fs::create_dir_all(&member_dir).map_err(io_error("creating", &member_dir))?;
    let restored = import_bbolt(file, &member_dir.join("kv")).and_then(|summary| {
        write_bootstrap(&member_dir, bootstrap)?;
        Ok(summary)
    });
    let summary = match restored {
        Ok(summary) => summary,
        Err(e) => {
            // Leave nothing half restored behind.
            let _ = std::fs::remove_dir_all(data_dir);
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
    Ok(summary)
}

/// The membership a restore or a migration recorded in `member_dir`, until
/// [`finish_restore`] has run.
pub fn read_bootstrap(member_dir: &Path) -> Result<Option<Bootstrap>, Error> {
    let path = member_dir.join(BOOTSTRAP_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let json = std::fs::read(&path).map_err(io_error("reading", &path))?;
    let bootstrap =
        serde_json::from_slice(&json).map_err(|error| Error::BootstrapFile { path, error })?;
    Ok(Some(bootstrap))
}

/// Forgets the restored membership: the member has started on it, and its
/// raft log records it from now on.
pub fn finish_restore(member_dir: &Path) -> Result<(), Error> {
    let path = member_dir.join(BOOTSTRAP_FILE);
    std::fs::remove_file(&path).map_err(io_error("removing the restore's bootstrap file", &path))
}

/// Migrates the etcd data dir in `member_dir`, if it holds one and no
/// Cairn store yet: imports etcd's database, applies the writes its WAL
/// holds past the database (as etcd does when it restarts) through
/// `applier`, hashing new passwords at `bcrypt_cost`, and takes the
/// membership from the WAL (on top of the database's members bucket when
/// the WAL does not reach back to the first entry). Returns the membership
/// the member then bootstraps, also left for [`read_bootstrap`].
pub fn migrate_etcd(
    member_dir: &Path,
    bcrypt_cost: u32,
    applier: &mut impl ApplyWrites,
) -> Result<Option<Bootstrap>, Error> {
    let etcd_db = member_dir.join(ETCD_DB);
    if member_dir.join("kv").exists() || !etcd_db.exists() {
        return Ok(None);
    }
    tracing::info!(
        path = %etcd_db.display(),
        "found an etcd data dir without Cairn's data: migrating it"
    );
    // Imported beside the final place and renamed when complete, so that a
    // crash midway starts over.
    let partial = member_dir.join("kv.migrating");
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(io_error("removing", &partial))?;
    }
    let summary = import_bbolt(&etcd_db, &partial)?;
    let wal = read_wal(
        &member_dir.join(ETCD_WAL),
        &summary.members,
        summary.consistent_index,
        bcrypt_cost,
    )?;
    let replayed = wal.writes.len();
    if !wal.writes.is_empty() {
        let store = Store::open(&partial)?;
        applier
            .apply_writes(&store, wal.writes)
            .map_err(|e| Error::Replay(e.into()))?;
        store.sync()?;
    }
    let members = wal.members;
    if !members.iter().any(|m| m.id == wal.member_id) {
        return Err(Error::UnknownMember {
            member: wal.member_id,
            members: members.iter().map(|m| m.id).collect(),
        });
    }
    let bootstrap = Bootstrap {
        member_id: wal.member_id,
        cluster_id: wal.cluster_id,
        members,
    };
    write_bootstrap(member_dir, &bootstrap)?;
    std::fs::rename(&partial, member_dir.join("kv")).map_err(io_error("renaming", &partial))?;
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
    Ok(Some(bootstrap))
}
