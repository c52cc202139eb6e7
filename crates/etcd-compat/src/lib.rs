//! etcd compatibility on disk: the way out to etcd and the way in from it.
//!
//! - Out: [`EtcdSnapshot`] writes a store (an [`Export`](cairn_mvcc::Export)
//!   of `cairn-mvcc`) as the bbolt database an etcd 3.4 member would hold, and
//!   streams it as etcd's Maintenance.Snapshot does, so that `etcdctl
//!   snapshot save/status/restore` work on it and a real etcd starts from it.
//! - In: [`import_bbolt`] reads such a database, etcd's or Cairn's, into a
//!   new store; [`restore`] is `etcdctl snapshot restore` into a new data
//!   dir, and [`migrate_etcd`] turns an etcd 3.4 data dir into a Cairn one in
//!   place, replaying the writes only etcd's write-ahead log holds
//!   ([`read_wal`]) through the member's apply logic, which the member
//!   lends as an [`ApplyWrites`].
//!
//! The bbolt file format itself is `cairn-bbolt`'s, and the key the auth
//! store keeps itself under `cairn-auth`'s; this crate knows
//! etcd's buckets, records and log, and nothing of the member beyond
//! [`ApplyWrites`] and the plain [`Member`] and [`Bootstrap`] it hands over.
//!
//! A store saved as etcd would save it, and read back:
//!
//! ```
//! use std::io::Write as _;
//!
//! use cairn_api::etcdserverpb::{PutRequest, RangeRequest};
//! use cairn_etcd_compat::{EtcdSnapshot, Member, import_bbolt, verify_hash};
//! use cairn_mvcc::Store;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let store = Store::open(&dir.path().join("kv"))?;
//! let mut batch = store.write();
//! batch.put(&PutRequest {
//!     key: "greeting".into(),
//!     value: "hello".into(),
//!     ..Default::default()
//! })?;
//! batch.commit(1)?;
//!
//! // What `etcdctl snapshot save` receives and keeps: the database, then
//! // its sha256.
//! let members = [Member {
//!     id: 0x8e9e05c52164694d,
//!     name: "default".into(),
//!     peer_urls: vec!["http://localhost:2380".into()],
//!     ..Default::default()
//! }];
//! let snapshot = EtcdSnapshot::write(&store.export()?, &members, dir.path())?;
//! let saved = dir.path().join("snapshot.db");
//! let mut file = std::fs::File::create(&saved)?;
//! for response in snapshot.responses(None) {
//!     file.write_all(&response?.blob)?;
//! }
//! verify_hash(&saved, false)?;
//!
//! let summary = import_bbolt(&saved, &dir.path().join("restored"))?;
//! assert_eq!((summary.revision, summary.consistent_index), (2, 1));
//! assert_eq!(summary.members, members);
//! let restored = Store::open(&dir.path().join("restored"))?;
//! let read = restored.range(&RangeRequest {
//!     key: "greeting".into(),
//!     ..Default::default()
//! })?;
//! assert_eq!(&read.kvs[0].value[..], b"hello");
//! # Ok(())
//! # }
//! ```

mod auth;
mod export;
mod import;
mod member;
mod restore;
mod wal;

#[cfg(test)]
mod tests;

use std::path::PathBuf;

pub use export::{EtcdSnapshot, History, Responses};
pub use import::{Summary, import_bbolt, verify_hash};
pub use member::Member;
pub use restore::{ApplyWrites, Bootstrap, finish_restore, migrate_etcd, read_bootstrap, restore};
pub use wal::{Wal, read_wal};

/// Why a snapshot, a restore or a migration failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Mvcc(#[from] cairn_mvcc::MvccError),
    /// A bbolt database could not be read.
    #[error(transparent)]
    Bbolt(#[from] cairn_bbolt::Error),
    /// A file is not a bbolt database.
    #[error("reading {}: {error}", path.display())]
    Open {
        path: PathBuf,
        error: cairn_bbolt::Error,
    },
    /// Writing a snapshot failed.
    #[error("writing the bbolt database: {0}")]
    WriteDb(cairn_bbolt::Error),
    /// A database's records could not be stored.
    #[error("importing {}: {error}", path.display())]
    Import { path: PathBuf, error: Box<Error> },
    /// etcd's database or WAL holds what etcd 3.4 does not write.
    #[error("{0}")]
    Invalid(String),
    /// A record of etcd's WAL does not decode.
    #[error("decoding {what}: {error}")]
    Decode {
        what: String,
        error: prost::DecodeError,
    },
    /// A password etcd's WAL adds could not be hashed.
    #[error("hashing a password: {0}")]
    Bcrypt(bcrypt::BcryptError),
    /// etcdctl's words for a snapshot without its sha256.
    #[error("snapshot missing hash but --skip-hash-check=false")]
    MissingHash,
    /// The snapshot is not the one its sha256 was computed over.
    #[error("expected sha256 {expected:?}, got {computed:?}")]
    HashMismatch {
        expected: Vec<u8>,
        computed: Vec<u8>,
    },
    /// A restore never writes over a data dir (etcdctl's words).
    #[error("data-dir {0:?} exists")]
    DataDirExists(String),
    /// The restore's bootstrap file is damaged.
    #[error("reading {}: {error}", path.display())]
    BootstrapFile {
        path: PathBuf,
        error: serde_json::Error,
    },
    /// etcd's WAL is another member's than its conf changes name.
    #[error("etcd's WAL names member {member:x}, which is not among the members {members:x?}")]
    UnknownMember { member: u64, members: Vec<u64> },
    /// The member's apply logic failed on etcd's writes.
    #[error("replaying etcd's WAL: {0}")]
    Replay(Box<dyn std::error::Error + Send + Sync>),
    /// The keys of a snapshot could not be read where they are kept (with
    /// --shards, on other members).
    #[error("reading the keys: {0}")]
    History(Box<dyn std::error::Error + Send + Sync>),
    /// Reading, writing or moving a file of the data dir failed.
    #[error("{action} {}: {error}", path.display())]
    File {
        action: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}
