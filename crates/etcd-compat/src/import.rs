//! The way in from etcd: an etcd-format (bbolt) database, etcd's or
//! Cairn's, read into a new mvcc store.

use std::fs::File;
use std::io::Read as _;
use std::path::Path;

use bytes::Bytes;
use cairn_api::alarm_record;
use cairn_api::cairnpb::Lease;
use cairn_api::etcdserverpb::AlarmMember;
use cairn_api::mvccpb::KeyValue;
use cairn_bbolt::{Bucket, Db, Item};
use cairn_mvcc::StoredRevision;
use prost::Message as _;
use sha2::{Digest as _, Sha256};

use crate::auth::AuthBuckets;
use crate::member::stored_member;
use crate::{Error, Member};

const SHA256_LEN: usize = 32;

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
    pub members: Vec<Member>,
}

/// A revision key of etcd's `key` bucket: 8-byte main, `_`, 8-byte sub,
/// and `t` for a tombstone.
fn decode_revision_key(key: &[u8]) -> Result<(i64, u32, bool), Error> {
    let invalid = || Error::Invalid(format!("revision key {key:02x?}"));
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

fn value(item: Item) -> Result<Vec<u8>, Error> {
    match item {
        Item::Value(v) => Ok(v),
        Item::Bucket(_) => Err(Error::Invalid("unexpected nested bucket".into())),
    }
}

fn bucket(db: &Db, name: &str) -> Result<Option<Bucket>, Error> {
    Ok(db.bucket(db.root(), name.as_bytes())?)
}

fn u64_value(name: &str, v: &[u8]) -> Result<u64, Error> {
    Ok(u64::from_be_bytes(v.try_into().map_err(|_| {
        Error::Invalid(format!("{name} of {} bytes", v.len()))
    })?))
}

/// The `alarm` bucket (a marshalled AlarmMember per key), as alarm records.
fn read_alarms(db: &Db) -> Result<Vec<cairn_mvcc::StateRecord>, Error> {
    let mut alarms = Vec::new();
    if let Some(b) = bucket(db, "alarm")? {
        for entry in db.entries(&b) {
            let (key, _) = entry?;
            let alarm = AlarmMember::decode(key.as_slice())
                .map_err(|e| Error::Invalid(format!("alarm {key:02x?}: {e}")))?;
            alarms.push((alarm_record::key(&alarm), alarm.encode_to_vec()));
        }
    }
    Ok(alarms)
}

/// The `auth`, `authUsers` and `authRoles` buckets.
fn read_auth(db: &Db) -> Result<AuthBuckets, Error> {
    let mut auth = AuthBuckets::default();
    if let Some(b) = bucket(db, "auth")? {
        for entry in db.entries(&b) {
            let (key, item) = entry?;
            let v = value(item)?;
            match key.as_slice() {
                b"authEnabled" => auth.enabled = v == [1],
                b"authRevision" => auth.revision = u64_value("authRevision", &v)?,
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

/// Imports the bbolt database at `db_path` (bytes after its last page, such
/// as a snapshot's sha256, are not read) into a new mvcc store at `kv_dir`:
/// every revision of the `key` bucket, the leases, the compact revision, the
/// auth store and the active alarms. The store's applied index is 0.
pub fn import_bbolt(db_path: &Path, kv_dir: &Path) -> Result<Summary, Error> {
    let db = Db::open(db_path).map_err(|error| Error::Open {
        path: db_path.to_owned(),
        error,
    })?;
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
                summary.consistent_index = u64_value("consistent_index", &value(item)?)?;
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
                    .map_err(|_| Error::Invalid(format!("lease key {key:02x?}")))?,
            );
            // etcd's leasepb.Lease is Cairn's lease record.
            Lease::decode(record.as_slice())
                .map_err(|e| Error::Invalid(format!("lease {id:x}: {e}")))?;
            leases.push((id, record));
        }
    }
    if let Some(members) = bucket(&db, "members")? {
        for entry in db.entries(&members) {
            let (_, item) = entry?;
            summary.members.push(stored_member(&value(item)?)?);
        }
    }
    let alarms = read_alarms(&db)?;
    let auth = read_auth(&db)?;
    summary.auth_enabled = auth.enabled;
    summary.users = auth.users.len() as u64;
    let auth_record = auth
        .to_record()
        .map_err(|e| Error::Invalid(format!("auth users or roles: {e}")))?;
    let key = bucket(&db, "key")?
        .ok_or_else(|| Error::Invalid(format!("{} has no key bucket", db_path.display())))?;
    let revisions = db.entries(&key).map(|entry| {
        let (key, item) = entry?;
        let (main, sub, tombstone) = decode_revision_key(&key)?;
        let kv = KeyValue::decode(Bytes::from(value(item)?))
            .map_err(|e| Error::Invalid(format!("revision {main}/{sub}: {e}")))?;
        Ok::<_, Error>(StoredRevision {
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
        std::iter::once(auth_record).chain(alarms),
    )
    .map_err(|error| Error::Import {
        path: db_path.to_owned(),
        error: Box::new(error),
    })?;
    summary.revisions = imported.revisions;
    summary.revision = imported.last_revision.max(summary.compact_revision);
    summary.leases = imported.leases;
    Ok(summary)
}

/// Checks the sha256 `etcdctl snapshot save` (and Maintenance.Snapshot)
/// appends to a snapshot, as `etcdctl snapshot restore` does: a database of
/// whole 512-byte sectors followed by 32 bytes.
pub fn verify_hash(path: &Path, skip_hash_check: bool) -> Result<(), Error> {
    let io = |error| Error::File {
        action: "reading",
        path: path.to_owned(),
        error,
    };
    let len = std::fs::metadata(path).map_err(io)?.len();
    let has_hash = len % 512 == SHA256_LEN as u64;
    if !has_hash {
        if skip_hash_check {
            return Ok(());
        }
        return Err(Error::MissingHash);
    }
    if skip_hash_check {
        return Ok(());
    }
    let mut file = File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut remaining = len - SHA256_LEN as u64;
    let mut buf = vec![0; 1 << 16];
    while remaining > 0 {
        let n = buf.len().min(remaining as usize);
        file.read_exact(&mut buf[..n]).map_err(io)?;
        hasher.update(&buf[..n]);
        remaining -= n as u64;
    }
    let mut stored = [0; SHA256_LEN];
    file.read_exact(&mut stored).map_err(io)?;
    let computed = hasher.finalize();
    if computed.as_slice() != stored {
        return Err(Error::HashMismatch {
            expected: stored.to_vec(),
            computed: computed.to_vec(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn revision_keys_decode() {
        let key = crate::export::revision_key(5, 1, true);
        assert_eq!(decode_revision_key(&key).expect("valid"), (5, 1, true));
        assert!(decode_revision_key(&key[..10]).is_err());
    }
}
