//! The way out to etcd: a store written as the bbolt database an etcd 3.4
//! member would hold, and streamed as etcd's Maintenance.Snapshot streams
//! its database, so that `etcdctl snapshot save/status/restore` work on it
//! and a real etcd starts from it.

use std::fs::File;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use cairn_api::alarm_record;
use cairn_api::etcdserverpb::{ResponseHeader, SnapshotResponse};
use cairn_bbolt::Writer;
use cairn_mvcc::{Export, StoredRevision};
use prost::Message as _;
use sha2::{Digest as _, Sha256};

use crate::auth::AuthBuckets;
use crate::member::member_json;
use crate::{Error, Member};

/// etcd's snapshot chunk size (snapshotSendBufferSize).
const CHUNK: usize = 32 * 1024;
/// The cluster version etcd 3.4 stores.
const CLUSTER_VERSION: &str = "3.4.0";

/// etcd's revision key: main and sub big-endian around `_`, `t` appended
/// for a tombstone.
pub(crate) fn revision_key(main: i64, sub: u32, tombstone: bool) -> Vec<u8> {
    let mut key = Vec::with_capacity(18);
    key.extend_from_slice(&main.to_be_bytes());
    key.push(b'_');
    key.extend_from_slice(&u64::from(sub).to_be_bytes());
    if tombstone {
        key.push(b't');
    }
    key
}

/// Writes one top-level bucket of flat key-values.
fn bucket(
    db: &mut Writer<&mut File>,
    name: &[u8],
    entries: impl IntoIterator<Item = Result<(Vec<u8>, Vec<u8>), Error>>,
) -> Result<(), Error> {
    db.begin_bucket(name).map_err(Error::WriteDb)?;
    for entry in entries {
        let (key, value) = entry?;
        db.put(&key, &value).map_err(Error::WriteDb)?;
    }
    db.end_bucket().map_err(Error::WriteDb)
}

/// The keys a snapshot holds: every stored revision in (main, sub) order,
/// tombstones included, with the compact revision (0: never compacted) and
/// the revision they are at.
pub struct History<I> {
    pub revisions: I,
    pub compact_revision: i64,
    pub current_revision: i64,
}

/// Writes `history` with what the view `export` holds besides the keys
/// (leases, the auth store, alarms, the applied index) and `members` as
/// etcd's bbolt database at the start of `out`; returns the database's size.
fn write_etcd_db(
    export: &Export,
    history: History<impl Iterator<Item = Result<StoredRevision, Error>>>,
    members: &[Member],
    out: &mut File,
) -> Result<u64, Error> {
    let auth = AuthBuckets::of(export)?;
    let mut db = Writer::new(&mut *out).map_err(Error::WriteDb)?;
    // Top-level buckets in name order, as bbolt keeps them.
    // etcd keys each alarm by its marshalled AlarmMember, with no value.
    let mut alarms: Vec<Vec<u8>> = export
        .state_records(alarm_record::PREFIX)?
        .into_iter()
        .map(|(_, alarm)| alarm)
        .collect();
    alarms.sort();
    bucket(
        &mut db,
        b"alarm",
        alarms.into_iter().map(|a| Ok((a, Vec::new()))),
    )?;
    bucket(
        &mut db,
        b"auth",
        [
            Ok((b"authEnabled".to_vec(), vec![u8::from(auth.enabled)])),
            Ok((
                b"authRevision".to_vec(),
                auth.revision.to_be_bytes().to_vec(),
            )),
        ],
    )?;
    bucket(&mut db, b"authRoles", auth.roles.into_iter().map(Ok))?;
    bucket(&mut db, b"authUsers", auth.users.into_iter().map(Ok))?;
    bucket(
        &mut db,
        b"cluster",
        [Ok((
            b"clusterVersion".to_vec(),
            CLUSTER_VERSION.as_bytes().to_vec(),
        ))],
    )?;

    let mut revisions = 0u64;
    let kvs = history.revisions.map(|revision| {
        let revision = revision?;
        let kv = if revision.tombstone {
            cairn_api::mvccpb::KeyValue {
                key: revision.kv.key,
                ..Default::default()
            }
        } else {
            revision.kv
        };
        revisions += 1;
        Ok((
            revision_key(revision.main, revision.sub, revision.tombstone),
            kv.encode_to_vec(),
        ))
    });
    bucket(&mut db, b"key", kvs)?;

    let leases = export.leases()?;
    let lease_count = leases.len();
    let leases = leases
        .into_iter()
        .map(|(id, record)| Ok((id.to_be_bytes().to_vec(), record)));
    bucket(&mut db, b"lease", leases)?;

    let mut members: Vec<(Vec<u8>, Vec<u8>)> = members
        .iter()
        .map(|m| {
            (
                format!("{:x}", m.id).into_bytes(),
                member_json(m).into_bytes(),
            )
        })
        .collect();
    members.sort();
    bucket(&mut db, b"members", members.into_iter().map(Ok))?;
    bucket(&mut db, b"members_removed", [])?;

    let mut meta = vec![(
        b"consistent_index".to_vec(),
        export.applied_index().to_be_bytes().to_vec(),
    )];
    if history.compact_revision > 0 {
        let compact = revision_key(history.compact_revision, 0, false);
        meta.push((b"finishedCompactRev".to_vec(), compact.clone()));
        meta.push((b"scheduledCompactRev".to_vec(), compact));
    }
    bucket(&mut db, b"meta", meta.into_iter().map(Ok))?;

    let out = db.finish().map_err(Error::WriteDb)?;
    let size = out.stream_position()?;
    tracing::info!(
        revisions,
        leases = lease_count,
        revision = history.current_revision,
        compact_revision = history.compact_revision,
        bytes = size,
        "wrote an etcd-format snapshot"
    );
    Ok(size)
}

/// A file in `dir` that is gone from the directory as soon as it is made:
/// nothing is left behind whatever happens to the process.
fn anonymous_file(dir: &Path) -> std::io::Result<File> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let path = dir.join(format!(
        "snapshot-{}-{}.tmp",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let file = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    std::fs::remove_file(&path)?;
    Ok(file)
}

/// A store written as etcd's bbolt database (its `member/snap/db`), in a
/// file of its own: the store's view can be let go while it is sent.
///
/// etcd's layout (its `mvcc/backend` buckets):
/// - `key`: revision (8-byte big-endian main, `_`, 8-byte big-endian sub,
///   and `t` for a tombstone) → mvccpb.KeyValue (a tombstone's holds only
///   the key). Every stored revision, history since the compaction included.
/// - `meta`: `consistent_index` (u64 BE); `scheduledCompactRev` and
///   `finishedCompactRev` (revision bytes) once compacted.
/// - `lease`: ID (8-byte BE) → leasepb.Lease{ID, TTL, RemainingTTL}, which
///   is what Cairn stores already.
/// - `members`: hex member ID → JSON {"id","peerURLs","isLearner","name",
///   "clientURLs"} (empty fields left out); `members_removed` empty.
/// - `cluster`: `clusterVersion` → "3.4.0".
/// - `auth`: `authEnabled` (one byte), `authRevision` (u64 BE);
///   `authUsers`/`authRoles`: name → authpb.User/Role.
/// - `alarm`: the active alarms, each a marshalled etcdserverpb.AlarmMember
///   as the key, with no value.
pub struct EtcdSnapshot {
    file: File,
    size: u64,
}

impl EtcdSnapshot {
    /// Writes the view `export` with `members` (etcd's `members` bucket)
    /// to a file in `dir` that no other process can see.
    pub fn write(export: &Export, members: &[Member], dir: &Path) -> Result<EtcdSnapshot, Error> {
        let history = History {
            revisions: export.revisions().map(|r| r.map_err(Error::from)),
            compact_revision: export.compact_revision(),
            current_revision: export.current_revision(),
        };
        EtcdSnapshot::write_history(export, history, members, dir)
    }

    /// As [`EtcdSnapshot::write`], with the keys of `history` rather than
    /// those of `export` (a keyspace whose keys are in other stores: with
    /// --shards, the cluster group's store holds the rest).
    pub fn write_history(
        export: &Export,
        history: History<impl Iterator<Item = Result<StoredRevision, Error>>>,
        members: &[Member],
        dir: &Path,
    ) -> Result<EtcdSnapshot, Error> {
        let mut file = anonymous_file(dir)?;
        let size = write_etcd_db(export, history, members, &mut file)?;
        file.seek(SeekFrom::Start(0))?;
        Ok(EtcdSnapshot { file, size })
    }

    /// The database's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Maintenance.Snapshot's responses, as etcd streams its database: the
    /// database in 32 KiB chunks, each with the bytes still to come (the
    /// first with `header`), then one last message whose blob is the sha256
    /// of the database (`etcdctl snapshot restore` checks it).
    pub fn responses(self, header: Option<ResponseHeader>) -> Responses {
        Responses {
            file: self.file,
            size: self.size,
            sent: 0,
            header,
            sha: Some(Sha256::new()),
        }
    }
}

/// The responses of [`EtcdSnapshot::responses`]; ends after the first error.
pub struct Responses {
    file: File,
    size: u64,
    sent: u64,
    header: Option<ResponseHeader>,
    /// Taken when the last message is made.
    sha: Option<Sha256>,
}

impl Iterator for Responses {
    type Item = Result<SnapshotResponse, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        let sha = self.sha.as_mut()?;
        if self.sent == self.size {
            let digest = self.sha.take()?.finalize();
            return Some(Ok(SnapshotResponse {
                header: self.header.take(),
                remaining_bytes: 0,
                blob: Bytes::from(digest.to_vec()),
            }));
        }
        let mut chunk = vec![0; CHUNK.min((self.size - self.sent) as usize)];
        if let Err(e) = self.file.read_exact(&mut chunk) {
            self.sha = None;
            return Some(Err(e.into()));
        }
        sha.update(&chunk);
        self.sent += chunk.len() as u64;
        Some(Ok(SnapshotResponse {
            header: self.header.take(),
            remaining_bytes: self.size - self.sent,
            blob: Bytes::from(chunk),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revision_keys_are_etcds() {
        assert_eq!(
            revision_key(5, 1, false),
            [0, 0, 0, 0, 0, 0, 0, 5, b'_', 0, 0, 0, 0, 0, 0, 0, 1]
        );
        assert_eq!(revision_key(4, 0, true).last(), Some(&b't'));
    }
}
