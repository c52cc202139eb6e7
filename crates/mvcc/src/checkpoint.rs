//! Checkpoints of the key index. Opening a store reads its index back from
//! the newest checkpoint and indexes only the revisions stored after the
//! one it starts at (the tail), instead of reading every stored revision:
//! so a restart takes time in proportion to the keys, not to the history,
//! and a bounded tail.
//!
//! A checkpoint is written on a background thread once the tail has grown
//! past [`StoreOptions`]' bounds (or past the last checkpoint's own size, so
//! that checkpoints never write more than the data does), and by
//! [`Store::checkpoint`](crate::Store::checkpoint), which a member calls as it
//! stops. The index is read in chunks, its lock released between them, so
//! the writer is never held up for long. Each chunk shows its keys as they
//! were at some revision at or after `from`, the current revision when the
//! checkpoint began; the tail, every stored revision above `from`, brings
//! every key up to date (`Index::push_newer` skips what a key already has).
//!
//! A checkpoint is valid for a store while the store's meta names its nonce
//! (`index_checkpoint`, with the revision and the bytes stored then). The
//! record is written once the file is durable, between two commits, after
//! checking that no snapshot restore and no compaction came since the
//! checkpoint began; it follows in fjall's journal every revision the
//! checkpoint shows, so a crash that keeps it kept them. A restore removes it, and so does a
//! compaction, in its own commit: it deletes tombstones (and the puts
//! before them) that the tail would need to see a key deleted. Both ask for
//! a new checkpoint at once. A store whose last compaction had not deleted
//! every revision it dropped (meta's `compacting`) is rebuilt from its
//! revisions too, since only that finds the leftovers.
//!
//! File `index-<nonce, 16 hex digits>` in the store's directory; integers
//! are LEB128 varints unless said otherwise, i64s as their u64 bits:
//!
//! ```text
//! header  magic "CAIRNIDX" | version u32 BE | nonce u64 BE | revisions keyspace name (length, bytes)
//!         | from revision | keys when it began (a capacity hint)
//! key     record length u32 BE | key length | key | created | version | lease | revision count
//!         | per revision: main (the first as is, the others as the step from the one before)
//!         | sub << 1 | tombstone
//! end     record length 0 u32 BE | key count u64 BE | CRC-32 (IEEE) u32 BE of every byte before it
//! ```

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use prost::encoding::{decode_varint, encode_varint};

use crate::index::{Generation, Index, IndexedKey, KeyHistory, Rev};
use crate::summed::Summed;
use crate::{Inner, MvccError, codec};

const MAGIC: &[u8; 8] = b"CAIRNIDX";
const VERSION: u32 = 1;
const PREFIX: &str = "index-";
/// Keys copied out of the index per hold of its lock.
const CHUNK: usize = 4096;
/// How long the background thread waits after a failed checkpoint.
const RETRY: Duration = Duration::from_secs(30);

/// When a store writes an index checkpoint by itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreOptions {
    /// Once the revisions stored since the last checkpoint take this many
    /// bytes (or as many as that checkpoint's file, if more), a new one is
    /// written in the background. What is above the last checkpoint is read
    /// again when the store opens.
    pub checkpoint_bytes: u64,
    /// The same bound in revisions (or the last checkpoint's keys, if more).
    pub checkpoint_revisions: u64,
}

impl Default for StoreOptions {
    /// 64 MiB or 100,000 revisions: about a tenth of a second to read again
    /// at open on this project's test machine (docs/performance.md).
    fn default() -> StoreOptions {
        StoreOptions {
            checkpoint_bytes: 64 * 1024 * 1024,
            checkpoint_revisions: 100_000,
        }
    }
}

/// A store's checkpoint bookkeeping, shared with its background thread.
pub(crate) struct Checkpoints {
    dir: PathBuf,
    options: StoreOptions,
    /// Held while a checkpoint is written: one at a time.
    pub(crate) writing: Mutex<()>,
    /// The nonce the store's meta names; 0 if none.
    pub(crate) valid: AtomicU64,
    /// What was committed since the checkpoint began: bytes of revisions,
    /// and revisions (a compaction counts as one).
    tail_bytes: AtomicU64,
    pub(crate) tail_revisions: AtomicU64,
    /// The nonce of the last checkpoint written (valid or not since).
    last_written: AtomicU64,
    /// The last checkpoint's file size and keys.
    last_bytes: AtomicU64,
    last_keys: AtomicU64,
    /// A request to the background thread is pending.
    pub(crate) requested: AtomicBool,
    /// The last handle of the store is gone: the thread ends.
    stopping: AtomicBool,
}

/// The index a checkpoint holds and the revision its tail starts above.
pub(crate) struct Loaded {
    pub(crate) index: Index,
    pub(crate) from: i64,
    bytes: u64,
}

impl Checkpoints {
    pub(crate) fn new(dir: &Path, options: StoreOptions) -> Checkpoints {
        Checkpoints {
            dir: dir.to_path_buf(),
            options,
            writing: Mutex::new(()),
            valid: AtomicU64::new(0),
            last_written: AtomicU64::new(0),
            tail_bytes: AtomicU64::new(0),
            tail_revisions: AtomicU64::new(0),
            last_bytes: AtomicU64::new(0),
            last_keys: AtomicU64::new(0),
            requested: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
        }
    }

    /// Counts what a commit stored; called under the index's write lock, so
    /// that a checkpoint beginning under its read lock splits the counts
    /// exactly at its `from`.
    pub(crate) fn committed(&self, bytes: u64, revisions: u64) {
        self.tail_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.tail_revisions.fetch_add(revisions, Ordering::Relaxed);
    }

    /// Whether the tail has grown enough for a new checkpoint.
    pub(crate) fn due(&self) -> bool {
        let bytes = self
            .options
            .checkpoint_bytes
            .max(self.last_bytes.load(Ordering::Relaxed));
        let revisions = self
            .options
            .checkpoint_revisions
            .max(self.last_keys.load(Ordering::Relaxed));
        self.tail_bytes.load(Ordering::Relaxed) >= bytes
            || self.tail_revisions.load(Ordering::Relaxed) >= revisions
    }

    /// Marks a request to the background thread; false if one is pending.
    pub(crate) fn request(&self) -> bool {
        !self.requested.swap(true, Ordering::AcqRel)
    }

    /// Ends the background thread and any checkpoint it is writing.
    pub(crate) fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// After a snapshot restore (under the index's write lock): the meta no
    /// longer names a checkpoint.
    pub(crate) fn invalidate(&self) {
        self.valid.store(0, Ordering::Release);
    }

    /// Whether nothing changed since the valid checkpoint.
    fn current(&self) -> bool {
        self.valid.load(Ordering::Acquire) != 0
            && self.tail_revisions.load(Ordering::Relaxed) == 0
            && self.tail_bytes.load(Ordering::Relaxed) == 0
    }

    /// Reads the checkpoint named `nonce` for revisions keyspace `keyspace`;
    /// any damage or mismatch is an error, and the caller rebuilds instead.
    pub(crate) fn load(&self, nonce: u64, keyspace: &str) -> Result<Loaded, MvccError> {
        let path = self.dir.join(file_name(nonce));
        let bytes = std::fs::metadata(&path)?.len();
        let mut input = Summed::new(BufReader::with_capacity(1 << 20, File::open(&path)?));
        let head: [u8; 20] = input.take()?;
        if &head[..8] != MAGIC {
            return Err(bad("bad magic"));
        }
        let version = u32::from_be_bytes(head[8..12].try_into().map_err(|_| bad("header"))?);
        if version != VERSION {
            return Err(bad(&format!("format version {version}")));
        }
        if head[12..20] != nonce.to_be_bytes() {
            return Err(bad("another checkpoint's nonce"));
        }
        let mut record = Vec::new();
        if !next_record(&mut input, &mut record)? {
            return Err(bad("header"));
        }
        let mut buf = &record[..];
        let name_len = varint(&mut buf)? as usize;
        let name = buf.get(..name_len).ok_or_else(|| bad("header"))?;
        if name != keyspace.as_bytes() {
            return Err(bad("checkpoint of another revisions keyspace"));
        }
        buf = &buf[name_len..];
        let from = varint(&mut buf)? as i64;
        let hint = varint(&mut buf)?;
        let mut keys: Vec<(Box<[u8]>, IndexedKey)> =
            Vec::with_capacity(usize::try_from(hint).unwrap_or(0).min(1 << 26));
        loop {
            if !next_record(&mut input, &mut record)? {
                break;
            }
            let (key, indexed) = decode_key(&record)?;
            if keys.last().is_some_and(|(last, _)| *last >= key) {
                return Err(bad("keys out of order"));
            }
            keys.push((key, indexed));
        }
        let end: [u8; 8] = input.take()?;
        if input.check_sum()?.is_err() {
            return Err(bad("checksum mismatch"));
        }
        if u64::from_be_bytes(end) != keys.len() as u64 {
            return Err(bad("key count mismatch"));
        }
        let mut index = Index::new();
        // Built from sorted keys, the tree's nodes are full: smaller than
        // one grown by inserts.
        index.keys = BTreeMap::from_iter(keys);
        Ok(Loaded { index, from, bytes })
    }

    /// Records the checkpoint the store opened with as the valid one.
    pub(crate) fn opened_with(&self, nonce: u64, loaded: &Loaded) {
        self.valid.store(nonce, Ordering::Release);
        self.last_written.store(nonce, Ordering::Release);
        self.last_bytes.store(loaded.bytes, Ordering::Relaxed);
        self.last_keys
            .store(loaded.index.keys.len() as u64, Ordering::Relaxed);
    }

    /// Deletes checkpoint files other than the valid one (and `also`), and
    /// any a crash left half written.
    pub(crate) fn remove_others(&self, also: u64) {
        let keep = [
            file_name(self.valid.load(Ordering::Acquire)),
            file_name(also),
        ];
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with(PREFIX)
                && !keep.iter().any(|k| k == name)
                && let Err(e) = std::fs::remove_file(entry.path())
            {
                tracing::warn!(error = %e, file = name, "could not delete an old index checkpoint");
            }
        }
    }
}

/// Writes a checkpoint of the store `inner` points to, unless `if_changed`
/// and nothing changed since the valid one. Holds the store only while
/// copying a chunk and while making the checkpoint valid: returns `Ok(false)`
/// when the store went away or a snapshot restore replaced its content
/// meanwhile.
pub(crate) fn write(
    inner: &Weak<Inner>,
    checkpoints: &Checkpoints,
    if_changed: bool,
) -> Result<bool, MvccError> {
    let _writing = checkpoints.writing.lock();
    if if_changed && checkpoints.current() {
        return Ok(true);
    }
    let Some(store) = inner.upgrade() else {
        return Ok(false);
    };
    let (begun, hint, tail_bytes, tail_revisions) = {
        let state = store.state.read();
        (
            Begun {
                keyspace: state.revisions.name().to_string(),
                from: state.index.current,
                compact: state.index.compact,
            },
            state.index.keys.len(),
            checkpoints.tail_bytes.swap(0, Ordering::Relaxed),
            checkpoints.tail_revisions.swap(0, Ordering::Relaxed),
        )
    };
    drop(store);
    let written = write_file(inner, checkpoints, &begun, hint);
    if !matches!(written, Ok(true)) {
        // Counted again: the next checkpoint has all of it to cover.
        checkpoints.committed(tail_bytes, tail_revisions);
    }
    written
}

/// What a checkpoint began with; it is valid only if the store still has
/// the same revisions keyspace and compact revision when it is done.
struct Begun {
    keyspace: String,
    from: i64,
    compact: i64,
}

impl Begun {
    /// A snapshot restore switched keyspaces, or a compaction deleted
    /// revisions, since the checkpoint began.
    fn overtaken(&self, state: &crate::State) -> bool {
        **state.revisions.name() != *self.keyspace || state.index.compact != self.compact
    }
}

fn write_file(
    inner: &Weak<Inner>,
    checkpoints: &Checkpoints,
    begun: &Begun,
    hint: usize,
) -> Result<bool, MvccError> {
    let (keyspace, from) = (&begun.keyspace, begun.from);
    let started = std::time::Instant::now();
    let nonce = new_nonce();
    let path = checkpoints.dir.join(file_name(nonce));
    let partial = Partial(
        checkpoints
            .dir
            .join(format!("{}.partial", file_name(nonce))),
    );
    let mut out = Summed::new(BufWriter::with_capacity(1 << 20, File::create(&partial.0)?));
    out.put(MAGIC)?;
    out.put(&VERSION.to_be_bytes())?;
    out.put(&nonce.to_be_bytes())?;
    let mut record = Vec::new();
    encode_varint(keyspace.len() as u64, &mut record);
    record.extend_from_slice(keyspace.as_bytes());
    encode_varint(from as u64, &mut record);
    encode_varint(hint as u64, &mut record);
    out.put_bytes(&record)?;

    let mut keys = 0u64;
    let mut after: Option<Box<[u8]>> = None;
    let mut chunk = Vec::new();
    loop {
        chunk.clear();
        let copied = {
            let Some(store) = inner.upgrade().filter(|_| !checkpoints.stopping()) else {
                return Ok(false);
            };
            let state = store.state.read();
            if begun.overtaken(&state) {
                return Ok(false);
            }
            let lower = after.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
            let mut copied = 0;
            for (key, indexed) in state
                .index
                .keys
                .range::<[u8], _>((lower, Bound::Unbounded))
                .take(CHUNK)
            {
                encode_key(&mut chunk, key, indexed);
                after = Some(key.clone());
                copied += 1;
            }
            copied
        };
        if copied == 0 {
            break;
        }
        keys += copied;
        out.put(&chunk)?;
    }
    out.put(&0u32.to_be_bytes())?;
    out.put(&keys.to_be_bytes())?;
    let (out, bytes) = out.finish()?;
    let file = out.into_inner().map_err(|e| e.into_error())?;

    let Some(store) = inner.upgrade().filter(|_| !checkpoints.stopping()) else {
        return Ok(false);
    };
    file.sync_all()?;
    drop(file);
    std::fs::rename(&partial.0, &path)?;
    partial.keep();
    File::open(&checkpoints.dir)?.sync_all()?;
    {
        // Between two commits (a commit deletes what its compaction
        // dropped before it lets go), so that the bytes stored are exactly
        // those of the revisions up to the current one.
        let _writer = store.writer.lock();
        let state = store.state.read();
        if begun.overtaken(&state) {
            drop(state);
            let _ = std::fs::remove_file(&path);
            return Ok(false);
        }
        let token = codec::CheckpointToken {
            nonce,
            revision: state.index.current,
            in_use: store.in_use.load(Ordering::Relaxed),
        };
        // After every revision the checkpoint shows in fjall's journal: if
        // a crash keeps the record, it kept them too.
        store.meta.insert(codec::INDEX_CHECKPOINT, token.encode())?;
        checkpoints.valid.store(nonce, Ordering::Release);
    }
    drop(store);
    checkpoints.last_bytes.store(bytes, Ordering::Relaxed);
    checkpoints.last_keys.store(keys, Ordering::Relaxed);
    // The record is not fsynced (that would hold up the writer): a power
    // loss may take it and leave the one before, whose file stays until
    // the next checkpoint.
    let previous = checkpoints.last_written.swap(nonce, Ordering::AcqRel);
    checkpoints.remove_others(previous);
    tracing::info!(
        from_revision = from,
        keys,
        bytes,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "wrote index checkpoint"
    );
    Ok(true)
}

/// The background thread: writes a checkpoint whenever a commit asks,
/// until the store is dropped.
pub(crate) fn run(inner: Weak<Inner>, checkpoints: Arc<Checkpoints>, requests: Receiver<()>) {
    while requests.recv().is_ok() && !checkpoints.stopping() {
        // Before writing: a request made meanwhile (a compaction that
        // overtakes this checkpoint) is another turn.
        checkpoints.requested.store(false, Ordering::Release);
        // Unless changed: a request that a checkpoint on request (one at
        // stop, say) served meanwhile would otherwise replace the valid
        // checkpoint of a store nothing was written to.
        match write(&inner, &checkpoints, true) {
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "could not write an index checkpoint; retrying later");
                let waited = requests.recv_timeout(RETRY);
                if matches!(waited, Err(RecvTimeoutError::Disconnected)) || checkpoints.stopping() {
                    return;
                }
            }
        }
    }
}

fn file_name(nonce: u64) -> String {
    format!("{PREFIX}{nonce:016x}")
}

/// Never 0 (which means none) and, in practice, never the last one's.
fn new_nonce() -> u64 {
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let n = time ^ (u64::from(std::process::id()) << 32) ^ COUNT.fetch_add(1, Ordering::Relaxed);
    n.max(1)
}

fn encode_key(out: &mut Vec<u8>, key: &[u8], indexed: &IndexedKey) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    encode_varint(key.len() as u64, out);
    out.extend_from_slice(key);
    let generation = indexed.generation;
    encode_varint(generation.created as u64, out);
    encode_varint(generation.version as u64, out);
    encode_varint(generation.lease as u64, out);
    let revs = indexed.history.revs();
    encode_varint(revs.len() as u64, out);
    let mut before = 0i64;
    for rev in revs {
        encode_varint(rev.main.wrapping_sub(before) as u64, out);
        encode_varint(u64::from(rev.sub) << 1 | u64::from(rev.tombstone), out);
        before = rev.main;
    }
    // A key is at most 64 KiB and a history of 2^32 revisions is far beyond
    // memory, so the length fits.
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

fn decode_key(mut buf: &[u8]) -> Result<(Box<[u8]>, IndexedKey), MvccError> {
    let buf = &mut buf;
    let key_len = varint(buf)? as usize;
    let key: Box<[u8]> = buf.get(..key_len).ok_or_else(|| bad("key record"))?.into();
    *buf = &buf[key_len..];
    let generation = Generation {
        created: varint(buf)? as i64,
        version: varint(buf)? as i64,
        lease: varint(buf)? as i64,
    };
    let count = varint(buf)? as usize;
    // Each revision takes at least two bytes: a damaged count cannot make
    // this allocate more than the record holds.
    let mut revs = Vec::with_capacity(count.min(buf.len() / 2));
    let mut before = 0i64;
    for _ in 0..count {
        let main = before.wrapping_add(varint(buf)? as i64);
        let sub = varint(buf)?;
        let rev = Rev {
            main,
            sub: u32::try_from(sub >> 1).map_err(|_| bad("sub revision"))?,
            tombstone: sub & 1 == 1,
        };
        if revs
            .last()
            .is_some_and(|r: &Rev| (r.main, r.sub) >= (rev.main, rev.sub))
        {
            return Err(bad("revisions out of order"));
        }
        revs.push(rev);
        before = main;
    }
    if !buf.is_empty() {
        return Err(bad("key record longer than its fields"));
    }
    let history = KeyHistory::of(revs).ok_or_else(|| bad("key without revisions"))?;
    Ok((
        key,
        IndexedKey {
            history,
            generation,
        },
    ))
}

fn varint(buf: &mut &[u8]) -> Result<u64, MvccError> {
    decode_varint(buf).map_err(|_| bad("varint"))
}

fn bad(what: &str) -> MvccError {
    MvccError::Corrupt(format!("index checkpoint: {what}"))
}

/// A file being written, deleted if dropped before [`keep`](Partial::keep).
struct Partial(PathBuf);

impl Partial {
    fn keep(self) {
        std::mem::forget(self);
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Reads the next record (its length, u32 big-endian, before it) into
/// `record`; false at the end marker, a zero length.
fn next_record<R: Read>(input: &mut Summed<R>, record: &mut Vec<u8>) -> Result<bool, MvccError> {
    let len = u32::from_be_bytes(input.take()?) as usize;
    if len == 0 {
        return Ok(false);
    }
    input.take_into(len, record)?;
    Ok(true)
}
