//! The errors of the store; the first three carry etcd's exact messages
//! because clients match on them.

use std::sync::{Arc, LazyLock};

use tokio::sync::watch;

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
    /// The storage engine failed, its files sound as far as it can tell.
    #[error("mvcc storage: {0}")]
    Storage(fjall::Error),
    /// The storage engine found its files damaged: a block or journal batch
    /// failing its checksum, a block whose header or trailer is not one it
    /// wrote. What was asked for cannot be read right, now or later; see
    /// [`damage_found`].
    #[error("mvcc store damaged: {0}")]
    Damaged(fjall::Error),
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

/// Every error of fjall's becomes a [`MvccError`] here, so this is where
/// damage is told from other failures, and published.
impl From<fjall::Error> for MvccError {
    fn from(e: fjall::Error) -> MvccError {
        if !is_damage(&e) {
            return MvccError::Storage(e);
        }
        let error = MvccError::Damaged(e);
        DAMAGE.send_if_modified(|found| {
            let first = found.is_none();
            if first {
                *found = Some(error.to_string().into());
            }
            first
        });
        error
    }
}

/// Whether fjall's `e` says its files are damaged (rather than, say, out
/// of space or unreadable for want of permission).
fn is_damage(e: &fjall::Error) -> bool {
    use fjall::Error as F;
    use fjall::JournalRecoveryError as J;
    use fjall::LsmError as L;
    match e {
        F::Storage(e) => matches!(
            e,
            L::ChecksumMismatch { .. }
                | L::InvalidHeader(_)
                | L::InvalidTrailer
                | L::InvalidTag(_)
                | L::Decompress(_)
                | L::Utf8(_)
                | L::Unrecoverable
        ),
        F::JournalRecovery(e) => matches!(
            e,
            J::ChecksumMismatch | J::TooManyItems | J::InsufficientLength
        ),
        F::Decompress(_) | F::InvalidTrailer | F::InvalidTag(_) | F::Unrecoverable => true,
        _ => false,
    }
}

/// The first damage any store of this process found, as its error's text.
static DAMAGE: LazyLock<watch::Sender<Option<Arc<str>>>> =
    LazyLock::new(|| watch::Sender::new(None));

/// Tells of the first [`MvccError::Damaged`] any store of this process ran
/// into, whichever call met it (a read, an apply, a watch catching up, a
/// hash, a snapshot): a member serving from that store should stop, since
/// it can no longer answer everything right.
pub fn damage_found() -> watch::Receiver<Option<Arc<str>>> {
    DAMAGE.subscribe()
}
