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
mod checkpoint;
mod codec;
mod error;
mod export;
mod hash;
mod index;
mod range;
mod snapshot;
mod summed;

#[cfg(test)]
mod checkpoint_tests;
#[cfg(test)]
mod event_tests;
#[cfg(test)]
mod lease_tests;
#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod snapshot_fuzz_tests;
#[cfg(test)]
mod snapshot_tests;
#[cfg(test)]
mod state_tests;
#[cfg(test)]
mod tests;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::SyncSender;
use std::thread::JoinHandle;

use bytes::Bytes;
use cairn_api::etcdserverpb::{RangeRequest, RangeResponse};
use cairn_api::mvccpb::event::EventType;
use cairn_api::mvccpb::{Event, KeyValue};
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode, Readable, Snapshot};
use parking_lot::{Mutex, RwLock};

pub use batch::WriteBatch;
pub use checkpoint::StoreOptions;
pub use error::{MvccError, damage_found};
pub use export::{Export, Imported, StoredRevision, import};
pub use hash::KvHash;
pub use range::sort as sort_range;

use checkpoint::Checkpoints;
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
    /// Dropped first: the last handle stops the checkpoint thread, which
    /// lets go of the store, before the store closes.
    _closer: Arc<Closer>,
    inner: Arc<Inner>,
}

/// Stops the checkpoint thread when the last [`Store`] handle goes, and
/// waits for it: a store reopened at once finds its database unlocked.
struct Closer {
    checkpoints: Arc<Checkpoints>,
    wake: Option<SyncSender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Closer {
    fn drop(&mut self) {
        self.checkpoints.stop();
        if let Some(wake) = self.wake.take() {
            // Full: the thread has a request to wake for already.
            let _ = wake.try_send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// fjall makes each new keyspace's directory without syncing the one that
/// holds it: until that is synced, a power loss may take the keyspace's
/// tables away while the database still names it. Syncs it.
fn sync_keyspace_entries(keyspace: &Keyspace) -> std::io::Result<()> {
    match keyspace.path().parent() {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
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
    checkpoints: Arc<Checkpoints>,
    /// Asks the checkpoint thread for a checkpoint.
    requests: Option<SyncSender<()>>,
}

impl Inner {
    /// After a commit: asks for a checkpoint once the tail is long enough.
    fn maybe_checkpoint(&self) {
        if self.checkpoints.due() {
            self.request_checkpoint();
        }
    }

    fn request_checkpoint(&self) {
        if let Some(requests) = &self.requests
            && self.checkpoints.request()
        {
            let _ = requests.try_send(());
        }
    }
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
    /// Opens or creates the store at `path` with the default
    /// [`StoreOptions`].
    pub fn open(path: &Path) -> Result<Store, MvccError> {
        Store::open_with(path, StoreOptions::default())
    }

    /// Opens or creates the store at `path`: reads the key index back from
    /// its checkpoint and indexes the revisions stored after it, or rebuilds
    /// the index from every stored revision if there is no valid checkpoint
    /// (and then writes one, if that took long); finishes a compaction a
    /// crash interrupted.
    pub fn open_with(path: &Path, options: StoreOptions) -> Result<Store, MvccError> {
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
        sync_keyspace_entries(&revisions)?;
        let applied = codec::decode_applied(meta.get(codec::APPLIED_INDEX)?.as_deref())?;
        let compact = codec::decode_compact(meta.get(codec::COMPACT_REVISION)?.as_deref())?;

        let checkpoints = Arc::new(Checkpoints::new(path, options));
        let started = std::time::Instant::now();
        let opened = open_index(&meta, &revisions, compact, &checkpoints)?;
        let keys = opened.index.keys.len();
        let current = opened.index.current;
        let in_use = AtomicU64::new(opened.in_use);
        if opened.compacting || !opened.leftovers.is_empty() {
            delete_revisions(&db, &revisions, &opened.leftovers, &in_use)?;
        }
        if opened.compacting {
            meta.remove(codec::COMPACTING)?;
        }
        if opened.rebuilt {
            meta.remove(codec::INDEX_CHECKPOINT)?;
        }
        checkpoints.remove_others(0);

        let (requests, received) = std::sync::mpsc::sync_channel(1);
        let inner = Arc::new(Inner {
            db,
            meta,
            leases,
            state_records,
            state: RwLock::new(State {
                index: opened.index,
                revisions,
            }),
            applied: AtomicU64::new(applied),
            in_use,
            writer: Mutex::new(()),
            checkpoints: checkpoints.clone(),
            requests: Some(requests.clone()),
        });
        let thread = {
            let (weak, checkpoints) = (Arc::downgrade(&inner), checkpoints.clone());
            std::thread::Builder::new()
                .name("mvcc-checkpoint".into())
                .spawn(move || checkpoint::run(weak, checkpoints, received))
                .inspect_err(|e| {
                    tracing::warn!(error = %e, "no checkpoint thread; the key index is checkpointed only on request");
                })
                .ok()
        };
        let closer = Arc::new(Closer {
            checkpoints,
            wake: Some(requests),
            thread,
        });
        tracing::info!(
            path = %path.display(),
            revision = current,
            compact_revision = compact.max(0),
            applied_index = applied,
            keys,
            from_checkpoint = !opened.rebuilt,
            revisions_read = opened.read,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "opened mvcc store"
        );
        // A store that was slow to open (no checkpoint yet: a new version,
        // an import, a damaged file) is not slow again.
        if opened.rebuilt && inner.checkpoints.due() {
            checkpoint::write(&Arc::downgrade(&inner), &inner.checkpoints, false)?;
        }
        Ok(Store {
            _closer: closer,
            inner,
        })
    }

    /// Writes a checkpoint of the key index now, unless nothing changed
    /// since the last one, so that the next open reads no revision again.
    /// A member calls it as it stops. Runs alongside readers and the writer,
    /// holding off the writer only briefly; blocks until written. Like
    /// [`write`](Store::write), it must not be called by a thread holding a
    /// [`WriteBatch`].
    pub fn checkpoint(&self) -> Result<(), MvccError> {
        // Overtaken only by a compaction or a restore committed meanwhile,
        // which are rare: a few tries suffice.
        for _ in 0..3 {
            if checkpoint::write(&Arc::downgrade(&self.inner), &self.inner.checkpoints, true)? {
                return Ok(());
            }
        }
        tracing::warn!(
            "every index checkpoint was overtaken by a compaction; the next open rebuilds more"
        );
        Ok(())
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
        Ok((events, current.max(from - 1).saturating_add(1)))
    }

    /// The live keys at the current revision (etcd's keys_total); 0 when
    /// the store cannot be read.
    pub fn key_count(&self) -> u64 {
        self.range(&RangeRequest {
            key: vec![0].into(),
            range_end: vec![0].into(),
            count_only: true,
            ..Default::default()
        })
        .map_or(0, |r| r.count.max(0) as u64)
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

    /// Bytes of table blocks fjall's block cache holds now (bounded by its
    /// capacity): the part of the member's memory that follows reads.
    pub fn block_cache_bytes(&self) -> u64 {
        self.inner.db.cache_size()
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
    /// when the store opens or was restored. Walks the key index; reads no
    /// value.
    pub fn leased_keys(&self) -> Result<Vec<(Bytes, i64)>, MvccError> {
        let state = self.inner.state.read();
        Ok(state
            .index
            .keys
            .iter()
            .filter_map(|(key, indexed)| {
                let lease = indexed.live_generation()?.lease;
                (lease != 0).then(|| (Bytes::copy_from_slice(key), lease))
            })
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
    /// Bytes and number of the revisions added.
    in_use: u64,
    read: u64,
    last: i64,
}

impl Rebuild {
    fn new() -> Rebuild {
        Rebuild::from(Index::new())
    }

    /// Continues `index`, which a checkpoint held.
    fn from(index: Index) -> Rebuild {
        Rebuild {
            index,
            in_use: 0,
            read: 0,
            last: INITIAL_REVISION,
        }
    }

    /// Indexes one stored revision, newer than every one added before.
    fn add(&mut self, key: &[u8], value: &[u8]) -> Result<(), MvccError> {
        let rev = codec::decode_rev(key, value)?;
        let (user_key, generation) = codec::decode_indexed(value)?;
        self.index.push(&user_key, rev, generation);
        self.added(rev, key.len() + value.len());
        Ok(())
    }

    /// As [`add`](Rebuild::add), for a revision of a checkpoint's tail,
    /// which the checkpoint may already show; returns the revision.
    fn add_newer(&mut self, key: &[u8], value: &[u8]) -> Result<Rev, MvccError> {
        let rev = codec::decode_rev(key, value)?;
        let (user_key, generation) = codec::decode_indexed(value)?;
        self.index.push_newer(&user_key, rev, generation);
        self.added(rev, key.len() + value.len());
        Ok(rev)
    }

    fn added(&mut self, rev: Rev, bytes: usize) {
        self.last = self.last.max(rev.main);
        self.in_use += bytes as u64;
        self.read += 1;
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

/// The key index a store opens with, and how it came by it.
struct Opened {
    index: Index,
    in_use: u64,
    /// Revisions below the compact revision still stored, to delete.
    leftovers: Vec<Rev>,
    /// The last compaction had not deleted everything it dropped.
    compacting: bool,
    /// Rebuilt from every revision rather than read from a checkpoint.
    rebuilt: bool,
    /// Revisions read from the revisions keyspace.
    read: u64,
}

/// The key index from the valid checkpoint and the revisions after it, or,
/// if there is none, from every stored revision.
fn open_index(
    meta: &Keyspace,
    revisions: &Keyspace,
    compact: i64,
    checkpoints: &Checkpoints,
) -> Result<Opened, MvccError> {
    let token = match meta.get(codec::INDEX_CHECKPOINT)? {
        Some(v) => Some(codec::CheckpointToken::decode(&v)?),
        None => None,
    };
    let compacting = meta.get(codec::COMPACTING)?.is_some();
    if let (Some(token), false) = (token, compacting) {
        match checkpoints.load(token.nonce, revisions.name()) {
            Ok(loaded) => {
                checkpoints.opened_with(token.nonce, &loaded);
                let start = codec::rev_key(Rev {
                    main: loaded.from.saturating_add(1),
                    sub: 0,
                    tombstone: false,
                });
                let mut rebuild = Rebuild::from(loaded.index);
                // The token counted the bytes of the revisions up to its own.
                let mut in_use = token.in_use;
                for entry in revisions.range(start..) {
                    let (key, value) = entry.into_inner()?;
                    if rebuild.add_newer(&key, &value)?.main > token.revision {
                        in_use += (key.len() + value.len()) as u64;
                    }
                }
                // The newest stored revision, when the tail is empty.
                if let Some(newest) = revisions.last_key_value() {
                    let key = newest.key()?;
                    let main = key
                        .first_chunk::<8>()
                        .map(|b| i64::from_be_bytes(*b))
                        .ok_or_else(|| {
                            MvccError::Corrupt(format!("revision key of {} bytes", key.len()))
                        })?;
                    rebuild.last = rebuild.last.max(main);
                }
                checkpoints.committed(rebuild.in_use, rebuild.read);
                let read = rebuild.read;
                let (index, _, leftovers) = rebuild.finish(compact);
                return Ok(Opened {
                    index,
                    in_use,
                    leftovers,
                    compacting,
                    rebuilt: false,
                    read,
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "the index checkpoint cannot be used; rebuilding the index from every revision");
            }
        }
    }
    let mut rebuild = Rebuild::new();
    for entry in revisions.iter() {
        let (key, value) = entry.into_inner()?;
        rebuild.add(&key, &value)?;
    }
    checkpoints.committed(rebuild.in_use, rebuild.read);
    let read = rebuild.read;
    let (index, in_use, leftovers) = rebuild.finish(compact);
    Ok(Opened {
        index,
        in_use,
        leftovers,
        compacting,
        rebuilt: true,
        read,
    })
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

/// Deletes revisions a compaction dropped from the index (those still
/// stored), taking their size off `in_use`.
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
            // A store opened from a checkpoint may be told again of
            // revisions already deleted.
            if let Some(size) = revisions.size_of(key)? {
                freed += key.len() as u64 + u64::from(size);
                batch.remove(revisions, key);
            }
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
