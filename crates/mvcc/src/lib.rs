//! etcd's revisioned key-value model (mvcc) on fjall.
//!
//! Every change is stored under its revision (main, sub) in the `revisions`
//! keyspace; an in-memory index maps each key to its revisions, so a Range at
//! any revision is an index lookup plus point reads. One writer (the apply
//! loop) runs client requests through a [`WriteBatch`] and commits them in
//! one fjall batch together with the consensus index they came from, so a
//! replay after a crash is idempotent. Readers run alongside the writer and
//! only ever see committed revisions: the index lock is held by a reader
//! while it collects revisions, by the writer while it publishes a commit.
//!
//! A snapshot of the whole store ([`Store::write_snapshot`]) brings a member
//! that fell too far behind up to date ([`Store::restore_snapshot`]); a
//! restore fills a fresh revisions keyspace and switches to it at the end,
//! so the store is never half restored.
//!
//! ```
//! use cairn_api::etcdserverpb::{PutRequest, RangeRequest};
//! use cairn_mvcc::Store;
//!
//! let dir = tempfile::tempdir()?;
//! let store = Store::open(dir.path())?;
//! let mut batch = store.write();
//! batch.put(&PutRequest { key: "greeting".into(), value: "hello".into(), ..Default::default() })?;
//! let events = batch.commit(1)?; // the consensus index these writes came from
//! assert_eq!(events.len(), 1);
//!
//! let found = store.range(&RangeRequest { key: "greeting".into(), ..Default::default() })?;
//! assert_eq!(&found.kvs[0].value[..], b"hello");
//! assert_eq!(found.kvs[0].mod_revision, store.current_revision());
//! assert_eq!(store.applied_index(), 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod batch;
mod codec;
mod error;
mod export;
mod hash;
mod index;
mod range;
mod snapshot;

#[cfg(test)]
mod event_tests;
#[cfg(test)]
mod lease_tests;
#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod snapshot_tests;
#[cfg(test)]
mod state_tests;
#[cfg(test)]
mod tests;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use cairn_api::etcdserverpb::{RangeRequest, RangeResponse};
use cairn_api::mvccpb::event::EventType;
use cairn_api::mvccpb::{Event, KeyValue};
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode, Readable, Snapshot};
use parking_lot::{Mutex, RwLock};

pub use batch::WriteBatch;
pub use error::MvccError;
pub use export::{Export, Imported, StoredRevision, import};
pub use hash::KvHash;
pub use range::sort as sort_range;

use index::{At, INITIAL_REVISION, Index, KeyRange, Located, NEVER_COMPACTED, Pending, Rev};

/// Name of the revisions keyspace of a store never restored from a
/// snapshot; each restore writes a new one, `revisions-N`, and `meta` names
/// the one in use.
const REVISIONS: &str = "revisions";
const META: &str = "meta";
/// Leases, by big-endian ID; their encoding is the caller's.
const LEASES: &str = "leases";
/// Small records of the cluster's own state that the apply loop keeps beside
/// the data (alarms, say), by key; their encoding is the caller's.
const STATE: &str = "state";
/// Compacted revisions are deleted in fjall batches of this many, so one huge
/// compaction does not build one huge batch.
const DELETE_CHUNK: usize = 4096;

/// A state record: key and value.
pub type StateRecord = (Vec<u8>, Vec<u8>);

/// Disk use of the store, as etcd reports `dbSize` and `dbSizeInUse`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DbSize {
    /// Bytes on disk: journal and keyspace files.
    pub total: u64,
    /// Estimated bytes of the revisions still stored (not yet compacted).
    pub in_use: u64,
}

/// The revisioned store of one member. Cheap to clone; clones share it.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    meta: Keyspace,
    leases: Keyspace,
    state_records: Keyspace,
    /// Behind one lock so that a restore replaces both at once.
    state: RwLock<State>,
    applied: AtomicU64,
    in_use: AtomicU64,
    /// Held by the open [`WriteBatch`]: one writer at a time.
    writer: Mutex<()>,
}

/// The committed index with the keyspace holding the revisions it names.
struct State {
    index: Index,
    revisions: Keyspace,
}

/// The most journal fjall may keep before it flushes memtables (its own
/// lower bound).
const MAX_JOURNAL_BYTES: u64 = 64 * 1024 * 1024;

impl Store {
    /// Opens or creates the store at `path` and rebuilds the key index from
    /// the stored revisions, finishing a compaction a crash interrupted.
    pub fn open(path: &Path) -> Result<Store, MvccError> {
        // fjall keeps up to 512 MiB of journal by default, all of it
        // replayed when a killed member starts again; at its minimum the
        // journal forces memtables out sooner and a restart replays less.
        let db = Database::builder(path)
            .max_journaling_size(MAX_JOURNAL_BYTES)
            .open()?;
        let meta = db.keyspace(META, KeyspaceCreateOptions::default)?;
        let leases = db.keyspace(LEASES, KeyspaceCreateOptions::default)?;
        let state_records = db.keyspace(STATE, KeyspaceCreateOptions::default)?;
        let revisions = snapshot::open_revisions(&db, &meta)?;
        let applied = codec::decode_applied(meta.get(codec::APPLIED_INDEX)?.as_deref())?;
        let compact = codec::decode_compact(meta.get(codec::COMPACT_REVISION)?.as_deref())?;

        let mut rebuild = Rebuild::new();
        for entry in revisions.iter() {
            let (key, value) = entry.into_inner()?;
            rebuild.add(&key, &value)?;
        }
        let (index, in_use, leftovers) = rebuild.finish(compact);
        let keys = index.keys.len();
        let current = index.current;
        let in_use = AtomicU64::new(in_use);
        delete_revisions(&db, &revisions, &leftovers, &in_use)?;

        let inner = Inner {
            db,
            meta,
            leases,
            state_records,
            state: RwLock::new(State { index, revisions }),
            applied: AtomicU64::new(applied),
            in_use,
            writer: Mutex::new(()),
        };
        tracing::info!(
            path = %path.display(),
            revision = current,
            compact_revision = compact.max(0),
            applied_index = applied,
            keys,
            "opened mvcc store"
        );
        Ok(Store {
            inner: Arc::new(inner),
        })
    }

    /// Answers a Range from committed revisions; runs alongside the writer.
    pub fn range(&self, req: &RangeRequest) -> Result<RangeResponse, MvccError> {
        self.range_at(req, 0)
    }

    /// Answers a Range as of a store whose current revision is at least
    /// `current`: a shard's store, whose own last write may be older than
    /// the revision the whole keyspace has reached (the revisions between
    /// belong to other shards), reads there as a store at `current` would.
    pub fn range_at(&self, req: &RangeRequest, current: i64) -> Result<RangeResponse, MvccError> {
        let range = KeyRange::new(&req.key, &req.range_end);
        let (current, count, located, snapshot, revisions) = {
            let state = self.inner.state.read();
            let index = &state.index;
            let current = index.current.max(current);
            let rev = range::read_revision(req.revision, current, index.compact)?;
            let (count, located) =
                index::collect(index, &Pending::new(), range, rev, range::fetch_limit(req));
            // Taken under the lock: a compaction removes revisions from the
            // index before deleting them, so the snapshot holds all of these;
            // and a restore may switch keyspaces once the lock is released.
            let revisions = state.revisions.clone();
            (current, count, located, self.inner.db.snapshot(), revisions)
        };
        let kvs = load(&snapshot, &revisions, located)?;
        Ok(range::shape(req, count, kvs, current))
    }

    /// The events of the stored revisions from `from_revision` on, in
    /// revision order, of the keys `key`/`range_end` name (etcd's encoding),
    /// for a watcher catching up. Stops after the revision in which `limit`
    /// events are reached, so one revision's events are never split, and
    /// returns the revision to continue from: past the current revision
    /// once everything was read.
    ///
    /// Fails with [`MvccError::Compacted`] when `from_revision` is below the
    /// compact revision, where etcd cancels the watch. Delete events carry a
    /// tombstone (key and mod revision), as the store keeps them.
    pub fn events_since(
        &self,
        key: &[u8],
        range_end: &[u8],
        from_revision: i64,
        limit: usize,
    ) -> Result<(Vec<Event>, i64), MvccError> {
        let range = KeyRange::new(key, range_end);
        let (current, compact, snapshot, revisions) = {
            let state = self.inner.state.read();
            // The snapshot is taken under the lock, as in `range`: nothing at
            // or above the compact revision read here is deleted in it.
            (
                state.index.current,
                state.index.compact,
                self.inner.db.snapshot(),
                state.revisions.clone(),
            )
        };
        if from_revision < compact {
            return Err(MvccError::Compacted);
        }
        let from = from_revision.max(INITIAL_REVISION + 1);
        let mut events: Vec<Event> = Vec::new();
        let start = codec::rev_key(Rev {
            main: from,
            sub: 0,
            tombstone: false,
        });
        for entry in snapshot.range(&revisions, start..) {
            let (rev_key, value) = entry.into_inner()?;
            let rev = codec::decode_rev(&rev_key, &value)?;
            // Revisions above `current` may be stored by a commit that is
            // not yet published; the next read gets them.
            if rev.main > current {
                break;
            }
            let revision_done = events
                .last()
                .and_then(|e| e.kv.as_ref())
                .is_some_and(|kv| kv.mod_revision != rev.main);
            if events.len() >= limit && revision_done {
                return Ok((events, rev.main));
            }
            // Most revisions are of other keys: decode only the key first.
            if !range.contains(&codec::decode_key(&value)?) {
                continue;
            }
            events.push(Event {
                r#type: if rev.tombstone {
                    EventType::Delete
                } else {
                    EventType::Put
                } as i32,
                kv: Some(codec::decode_kv(&value)?),
                prev_kv: None,
            });
        }
        Ok((events, current.max(from - 1) + 1))
    }

    /// The newest committed revision; 1 on an empty store.
    pub fn current_revision(&self) -> i64 {
        self.inner.state.read().index.current
    }

    /// The revision of the last compaction; 0 if never compacted.
    pub fn compact_revision(&self) -> i64 {
        self.inner.state.read().index.compact.max(0)
    }

    /// The consensus index committed with the last [`WriteBatch`].
    pub fn applied_index(&self) -> u64 {
        self.inner.applied.load(Ordering::Acquire)
    }

    /// The bytes of the revisions stored, uncompressed: a bound of
    /// `size().in_use` that costs no look at the files.
    pub fn stored_bytes(&self) -> u64 {
        self.inner.in_use.load(Ordering::Relaxed)
    }

    /// Disk use, for etcd's status and quota.
    pub fn size(&self) -> DbSize {
        let total = self.inner.db.disk_space().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "could not measure the journal; counting keyspace files only");
            self.inner.state.read().revisions.disk_space() + self.inner.meta.disk_space()
        });
        DbSize {
            total,
            // Compression can make the files smaller than the data.
            in_use: self.inner.in_use.load(Ordering::Relaxed).min(total),
        }
    }

    /// etcd's defragmentation, online: flushes every keyspace's memtable
    /// and rewrites its tables in one major compaction, which drops what
    /// compactions and deletes left behind and lets the journal go. Readers
    /// and the writer go on meanwhile (the LSM tree compacts immutable
    /// tables); only the memtable switch takes the journal lock briefly.
    /// Blocks the calling thread until done.
    pub fn defragment(&self) -> Result<(), MvccError> {
        let revisions = self.inner.state.read().revisions.clone();
        let before = self.size().total;
        for keyspace in [
            &revisions,
            &self.inner.leases,
            &self.inner.state_records,
            &self.inner.meta,
        ] {
            keyspace.rotate_memtable_and_wait()?;
            keyspace.major_compact()?;
        }
        tracing::info!(before, after = self.size().total, "defragmented mvcc store");
        Ok(())
    }

    /// Makes everything committed so far durable.
    pub fn sync(&self) -> Result<(), MvccError> {
        self.inner.db.persist(PersistMode::SyncAll)?;
        Ok(())
    }

    /// Every stored lease: ID and the bytes [`WriteBatch::put_lease`] stored.
    pub fn leases(&self) -> Result<Vec<(i64, Vec<u8>)>, MvccError> {
        self.inner
            .leases
            .iter()
            .map(|entry| {
                let (key, value) = entry.into_inner()?;
                Ok((codec::decode_lease_key(&key)?, value.to_vec()))
            })
            .collect()
    }

    /// Every state record whose key starts with `prefix`, in key order.
    pub fn state_records(&self, prefix: &[u8]) -> Result<Vec<StateRecord>, MvccError> {
        self.inner
            .state_records
            .prefix(prefix)
            .map(|entry| {
                let (key, value) = entry.into_inner()?;
                Ok((key.to_vec(), value.to_vec()))
            })
            .collect()
    }

    /// Every live key with a lease, and its lease: what the lessor attaches
    /// when the store opens or was restored. Reads the whole key space.
    pub fn leased_keys(&self) -> Result<Vec<(Bytes, i64)>, MvccError> {
        let all = RangeRequest {
            key: Bytes::from_static(&[0]),
            range_end: Bytes::from_static(&[0]),
            ..Default::default()
        };
        Ok(self
            .range(&all)?
            .kvs
            .into_iter()
            .filter(|kv| kv.lease != 0)
            .map(|kv| (kv.key, kv.lease))
            .collect())
    }

    /// Starts a batch of writes. Blocks while another batch is open; a thread
    /// holding one must not open another.
    pub fn write(&self) -> WriteBatch<'_> {
        WriteBatch::new(&self.inner, self.inner.writer.lock())
    }
}

/// Builds the key index from stored revisions read in revision order.
struct Rebuild {
    index: Index,
    in_use: u64,
    last: i64,
}

impl Rebuild {
    fn new() -> Rebuild {
        Rebuild {
            index: Index::new(),
            in_use: 0,
            last: INITIAL_REVISION,
        }
    }

    /// Indexes one stored revision, newer than every one added before.
    fn add(&mut self, key: &[u8], value: &[u8]) -> Result<(), MvccError> {
        let rev = codec::decode_rev(key, value)?;
        let (user_key, generation) = codec::decode_indexed(value)?;
        self.index.push(&user_key, rev, generation);
        self.last = self.last.max(rev.main);
        self.in_use += (key.len() + value.len()) as u64;
        Ok(())
    }

    /// The index at compact revision `compact`, the bytes stored, and the
    /// revisions below `compact` still stored (a crash or a snapshot caught
    /// a compaction between its commit and its deletes) that are to go.
    fn finish(mut self, compact: i64) -> (Index, u64, Vec<Rev>) {
        // A compaction may have removed every revision up to the current one.
        self.index.current = self.last.max(compact);
        self.index.compact = compact;
        let leftovers = if compact == NEVER_COMPACTED {
            Vec::new()
        } else {
            self.index.compact(compact)
        };
        (self.index, self.in_use, leftovers)
    }
}

/// The key-values of `located`, reading stored ones from `snapshot`.
fn load(
    snapshot: &Snapshot,
    revisions: &Keyspace,
    located: Vec<Located>,
) -> Result<Vec<KeyValue>, MvccError> {
    located
        .into_iter()
        .map(|found| match found.at {
            At::Pending(kv) => Ok(kv),
            At::Stored(rev) => read(snapshot, revisions, rev),
        })
        .collect()
}

fn read(snapshot: &Snapshot, revisions: &Keyspace, rev: Rev) -> Result<KeyValue, MvccError> {
    match snapshot.get(revisions, codec::rev_key(rev))? {
        Some(value) => codec::decode_kv(&value),
        None => Err(MvccError::Corrupt(format!(
            "revision {}/{} is indexed but not stored",
            rev.main, rev.sub
        ))),
    }
}

/// Deletes revisions a compaction dropped from the index, taking their size
/// off `in_use`.
fn delete_revisions(
    db: &Database,
    revisions: &Keyspace,
    revs: &[Rev],
    in_use: &AtomicU64,
) -> Result<(), MvccError> {
    for chunk in revs.chunks(DELETE_CHUNK) {
        let mut batch = db.batch();
        let mut freed = 0u64;
        for &rev in chunk {
            let key = codec::rev_key(rev);
            if let Some(size) = revisions.size_of(key)? {
                freed += key.len() as u64 + u64::from(size);
            }
            batch.remove(revisions, key);
        }
        batch.commit()?;
        // The closure always returns Some, so this cannot fail.
        let _ = in_use.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
            Some(v.saturating_sub(freed))
        });
    }
    if !revs.is_empty() {
        tracing::debug!(revisions = revs.len(), "deleted compacted revisions");
    }
    Ok(())
}
