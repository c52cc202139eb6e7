//! The errors of the store; the first three carry etcd's exact messages
//! because clients match on them.

/// An error from the revisioned store.
#[derive(Debug, thiserror::Error)]
pub enum MvccError {
    /// The requested revision is below the compact revision.
    #[error("mvcc: required revision has been compacted")]
    Compacted,
    /// The requested revision is above the current revision.
    #[error("mvcc: required revision is a future revision")]
    FutureRevision,
    /// A put with `ignore_value` or `ignore_lease` named a key that does not
    /// exist.
    #[error("etcdserver: key not found")]
    KeyNotFound,
    /// A put named a lease the caller's check says does not exist.
    #[error("etcdserver: requested lease not found")]
    LeaseNotFound,
    /// A batch was asked to write at a revision its store has reached.
    #[error("mvcc: revision {revision} is not after the current revision {current}")]
    RevisionTaken { revision: i64, current: i64 },
    /// The storage engine failed.
    #[error("mvcc storage: {0}")]
    Storage(#[from] fjall::Error),
    /// Stored data could not be decoded or is inconsistent with the index.
    #[error("mvcc data corrupt: {0}")]
    Corrupt(String),
    /// A snapshot to restore is not one [`Store::write_snapshot`] wrote, or
    /// arrived damaged or cut short; the store is left as it was.
    ///
    /// [`Store::write_snapshot`]: crate::Store::write_snapshot
    #[error("invalid mvcc snapshot: {0}")]
    InvalidSnapshot(String),
    /// Writing or reading a snapshot stream failed.
    #[error("mvcc snapshot I/O: {0}")]
    Io(#[from] std::io::Error),
}
