//! Backups in etcd's format: Maintenance.Snapshot streams the member's state
//! as the bbolt database an etcd 3.4 member would hold, so that `etcdctl
//! snapshot save/status/restore` work on it and a real etcd starts from it.
//!
//! etcd's layout (its `mvcc/backend` buckets):
//! - `key`: revision (8-byte big-endian main, `_`, 8-byte big-endian sub,
//!   and `t` for a tombstone) → mvccpb.KeyValue (a tombstone's holds only
//!   the key). Every stored revision, history since the compaction included.
//! - `meta`: `consistent_index` (u64 BE); `scheduledCompactRev` and
//!   `finishedCompactRev` (revision bytes) once compacted.
//! - `lease`: ID (8-byte BE) → leasepb.Lease{ID, TTL, RemainingTTL}, which
//!   is what Cairn stores already.
//! - `members`: hex member ID → JSON {"id","peerURLs","isLearner","name",
//!   "clientURLs"} (empty fields left out); `members_removed` empty.
//! - `cluster`: `clusterVersion` → "3.4.0".
//! - `auth`: `authEnabled` (one byte), `authRevision` (u64 BE);
//!   `authUsers`/`authRoles`: name → authpb.User/Role.
//! - `alarm`: empty.
//!
//! The stream is etcd's: the database in 32 KiB chunks, each with the bytes
//! still to come, then one last message whose blob is the sha256 of the
//! database (`etcdctl snapshot restore` checks it).

use std::fs::File;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use cairn_api::authpb::{Role, User};
use cairn_api::cairnpb::AuthState;
use cairn_api::etcdserverpb::SnapshotResponse;
use cairn_bbolt::Writer;
use cairn_consensus::PeerInfo;
use cairn_mvcc::{Export, MvccError};
use prost::Message as _;
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;
use tonic::Status;

use crate::member::Member;

/// etcd's snapshot chunk size (snapshotSendBufferSize).
const CHUNK: usize = 32 * 1024;
/// The state record the auth store keeps itself in (see `auth`).
const AUTH_RECORD: &[u8] = crate::auth::RECORD;
/// The cluster version etcd 3.4 stores.
const CLUSTER_VERSION: &str = "3.4.0";

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{0}")]
    Mvcc(#[from] MvccError),
    #[error("writing the bbolt database: {0}")]
    Bbolt(#[from] cairn_bbolt::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The auth buckets' content.
#[derive(Clone, Debug)]
pub struct AuthBuckets {
    pub enabled: bool,
    pub revision: u64,
    /// Name → authpb.User, sorted by name.
    pub users: Vec<(Vec<u8>, Vec<u8>)>,
    /// Name → authpb.Role, sorted by name.
    pub roles: Vec<(Vec<u8>, Vec<u8>)>,
}

impl AuthBuckets {
    /// The auth store as the view holds it (its state record).
    pub fn of(export: &Export) -> Result<AuthBuckets, BackupError> {
        let record = export
            .state_records(AUTH_RECORD)?
            .into_iter()
            .find(|(key, _)| key == AUTH_RECORD);
        let Some((_, record)) = record else {
            return Ok(AuthBuckets::default());
        };
        let state = AuthState::decode(record.as_slice())
            .map_err(|e| MvccError::Corrupt(format!("auth record: {e}")))?;
        let mut users: Vec<(Vec<u8>, Vec<u8>)> = state
            .users
            .iter()
            .map(|u| (u.name.to_vec(), u.encode_to_vec()))
            .collect();
        let mut roles: Vec<(Vec<u8>, Vec<u8>)> = state
            .roles
            .iter()
            .map(|r| (r.name.to_vec(), r.encode_to_vec()))
            .collect();
        users.sort();
        roles.sort();
        Ok(AuthBuckets {
            enabled: state.enabled,
            // etcd's store starts at revision 1.
            revision: state.revision.max(1),
            users,
            roles,
        })
    }

    /// The auth store's state record for these buckets.
    pub fn to_record(&self) -> Result<(Vec<u8>, Vec<u8>), prost::DecodeError> {
        let users = self
            .users
            .iter()
            .map(|(_, user)| User::decode(user.as_slice()))
            .collect::<Result<_, _>>()?;
        let roles = self
            .roles
            .iter()
            .map(|(_, role)| Role::decode(role.as_slice()))
            .collect::<Result<_, _>>()?;
        let state = AuthState {
            enabled: self.enabled,
            revision: self.revision,
            users,
            roles,
        };
        Ok((AUTH_RECORD.to_vec(), state.encode_to_vec()))
    }
}

impl Default for AuthBuckets {
    /// What a fresh etcd holds: auth never enabled, at revision 1.
    fn default() -> Self {
        AuthBuckets {
            enabled: false,
            revision: 1,
            users: Vec::new(),
            roles: Vec::new(),
        }
    }
}

/// etcd's revision key: main and sub big-endian around `_`, `t` appended
/// for a tombstone.
pub fn revision_key(main: i64, sub: u32, tombstone: bool) -> Vec<u8> {
    let mut key = Vec::with_capacity(18);
    key.extend_from_slice(&main.to_be_bytes());
    key.push(b'_');
    key.extend_from_slice(&u64::from(sub).to_be_bytes());
    if tombstone {
        key.push(b't');
    }
    key
}

/// A member as etcd's membership store keeps it: its JSON field names and
/// order, empty fields left out as Go's `omitempty` does.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct StoredMember {
    pub id: u64,
    #[serde(rename = "peerURLs", default)]
    pub peer_urls: Vec<String>,
    #[serde(
        rename = "isLearner",
        default,
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub is_learner: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(rename = "clientURLs", default, skip_serializing_if = "Vec::is_empty")]
    pub client_urls: Vec<String>,
}

pub fn member_json(member: &PeerInfo) -> String {
    let stored = StoredMember {
        id: member.id,
        peer_urls: member.peer_urls.clone(),
        is_learner: member.is_learner,
        name: member.name.clone(),
        client_urls: member.client_urls.clone(),
    };
    // Strings and numbers only: serializing cannot fail.
    serde_json::to_string(&stored).unwrap_or_default()
}

/// Writes the view `export`, with the members and auth, as etcd's bbolt
/// database at the start of `out`; returns the database's size.
pub fn write_etcd_db(
    export: &Export,
    members: &[PeerInfo],
    auth: &AuthBuckets,
    out: &mut File,
) -> Result<u64, BackupError> {
    let mut db = Writer::new(&mut *out)?;
    // Top-level buckets in name order, as bbolt keeps them.
    db.begin_bucket(b"alarm")?;
    db.end_bucket()?;

    db.begin_bucket(b"auth")?;
    db.put(b"authEnabled", &[u8::from(auth.enabled)])?;
    db.put(b"authRevision", &auth.revision.to_be_bytes())?;
    db.end_bucket()?;
    db.begin_bucket(b"authRoles")?;
    for (name, role) in &auth.roles {
        db.put(name, role)?;
    }
    db.end_bucket()?;
    db.begin_bucket(b"authUsers")?;
    for (name, user) in &auth.users {
        db.put(name, user)?;
    }
    db.end_bucket()?;

    db.begin_bucket(b"cluster")?;
    db.put(b"clusterVersion", CLUSTER_VERSION.as_bytes())?;
    db.end_bucket()?;

    db.begin_bucket(b"key")?;
    let mut revisions = 0u64;
    for revision in export.revisions() {
        let revision = revision?;
        let kv = if revision.tombstone {
            cairn_api::mvccpb::KeyValue {
                key: revision.kv.key,
                ..Default::default()
            }
        } else {
            revision.kv
        };
        db.put(
            &revision_key(revision.main, revision.sub, revision.tombstone),
            &kv.encode_to_vec(),
        )?;
        revisions += 1;
    }
    db.end_bucket()?;

    db.begin_bucket(b"lease")?;
    let leases = export.leases()?;
    for (id, record) in &leases {
        db.put(&id.to_be_bytes(), record)?;
    }
    db.end_bucket()?;

    db.begin_bucket(b"members")?;
    let mut members = members.to_vec();
    members.sort_by_key(|m| format!("{:x}", m.id));
    for member in &members {
        db.put(
            format!("{:x}", member.id).as_bytes(),
            member_json(member).as_bytes(),
        )?;
    }
    db.end_bucket()?;
    db.begin_bucket(b"members_removed")?;
    db.end_bucket()?;

    db.begin_bucket(b"meta")?;
    db.put(b"consistent_index", &export.applied_index().to_be_bytes())?;
    if export.compact_revision() > 0 {
        let compact = revision_key(export.compact_revision(), 0, false);
        db.put(b"finishedCompactRev", &compact)?;
        db.put(b"scheduledCompactRev", &compact)?;
    }
    db.end_bucket()?;

    let out = db.finish()?;
    let size = out.stream_position()?;
    tracing::info!(
        revisions,
        leases = leases.len(),
        revision = export.current_revision(),
        compact_revision = export.compact_revision(),
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

pub type SnapshotStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<SnapshotResponse, Status>> + Send + 'static>,
>;

/// Maintenance.Snapshot: a consistent view of the store now, streamed as
/// etcd streams its database.
pub fn snapshot_stream(member: Arc<Member>) -> SnapshotStream {
    let (tx, rx) = mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        if let Err(e) = send_snapshot(&member, &tx) {
            tracing::warn!("snapshot failed: {e}");
            let _ = tx.blocking_send(Err(Status::internal(e.to_string())));
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

fn send_snapshot(
    member: &Member,
    tx: &mpsc::Sender<Result<SnapshotResponse, Status>>,
) -> Result<(), BackupError> {
    let export = member.store.export()?;
    let header = member.header(export.current_revision());
    let mut file = anonymous_file(&member.data_dir)?;
    let auth = AuthBuckets::of(&export)?;
    let size = write_etcd_db(&export, &member.node.members(), &auth, &mut file)?;
    drop(export);
    file.seek(SeekFrom::Start(0))?;
    let mut sha = Sha256::new();
    let mut sent = 0u64;
    let mut first = true;
    while sent < size {
        let mut chunk = vec![0; CHUNK.min((size - sent) as usize)];
        file.read_exact(&mut chunk)?;
        sha.update(&chunk);
        sent += chunk.len() as u64;
        let response = SnapshotResponse {
            header: if first { header } else { None },
            remaining_bytes: size - sent,
            blob: Bytes::from(chunk),
        };
        first = false;
        if tx.blocking_send(Ok(response)).is_err() {
            // The client went away.
            return Ok(());
        }
    }
    let _ = tx.blocking_send(Ok(SnapshotResponse {
        header: None,
        remaining_bytes: 0,
        blob: Bytes::from(sha.finalize().to_vec()),
    }));
    tracing::info!(bytes = size, "sent a snapshot");
    Ok(())
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

    #[test]
    fn member_json_matches_etcds_store() {
        // As etcd 3.4 stores its default member.
        let member = PeerInfo {
            id: 0x2e1259d415f2a040,
            name: "default".into(),
            peer_urls: vec!["http://127.0.0.1:23800".into()],
            client_urls: vec!["http://127.0.0.1:23790".into()],
            is_learner: false,
        };
        assert_eq!(
            member_json(&member),
            r#"{"id":3319814642761637952,"peerURLs":["http://127.0.0.1:23800"],"name":"default","clientURLs":["http://127.0.0.1:23790"]}"#
        );
        let learner = PeerInfo {
            id: 1,
            name: String::new(),
            peer_urls: vec!["http://a:1".into()],
            client_urls: Vec::new(),
            is_learner: true,
        };
        assert_eq!(
            member_json(&learner),
            r#"{"id":1,"peerURLs":["http://a:1"],"isLearner":true}"#
        );
    }
}
