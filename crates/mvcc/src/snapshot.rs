//! Snapshots of the whole store, for a raft member too far behind to catch
//! up from the log.
//!
//! Format, version 1 (integers big-endian):
//!
//! ```text
//! header  magic "CAIRNMVC" | version u32 | applied index u64 | compact revision i64 (-1: never)
//! entry   0x01 | revision key (16 bytes) | value length u32 | stored value
//! lease   0x02 | lease ID i64 | record length u32 | stored record
//! state   0x03 | key length u32 | key | value length u32 | value
//! end     0x00 | entry count u64 (entries and leases) | CRC-32 (IEEE) u32 of every byte before it
//! ```
//!
//! Lease and state records came after the first version 1 snapshots without
//! changing the version: a snapshot without them reads as before, and a
//! build that does not know them refuses the unknown tag.
//!
//! Entries are the stored revisions, tombstones included, in revision order
//! and in their on-disk encoding (see `codec`): a change to that encoding
//! is a new format version.
//!
//! A restore never touches the keyspace in use: it fills a fresh one, checks
//! the checksum, and then switches to it with one meta batch naming it (with
//! the applied index and compact revision). A crash or an error before that
//! batch leaves the old content in place and a stray keyspace that the next
//! open deletes; after it, the store is the snapshot's.

use std::io::{BufWriter, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode, Readable};

use crate::index::{INITIAL_REVISION, Index, NEVER_COMPACTED};
use crate::summed::Summed;
use crate::{MvccError, REVISIONS, Rebuild, State, Store, codec, delete_revisions};

const MAGIC: &[u8; 8] = b"CAIRNMVC";
const VERSION: u32 = 1;
const ENTRY: u8 = 1;
const LEASE: u8 = 2;
const STATE_RECORD: u8 = 3;
const END: u8 = 0;
/// The revisions keyspace's memtable (fjall's default is 64 MiB): under a
/// load of large values it and the sealed one being flushed were the
/// biggest share of a member's memory after the key index.
const REVISIONS_MEMTABLE_BYTES: u64 = 32 << 20;
impl Store {
    /// Writes a consistent snapshot of the whole store to `out`: every
    /// stored revision, tombstones included, with the compact revision and
    /// the applied index. Runs alongside the writer and readers; the
    /// snapshot reflects a whole number of committed batches. Streams the
    /// revisions, buffering only a little; flushes `out` at the end.
    ///
    /// Returns the applied index the snapshot reflects.
    pub fn write_snapshot(&self, out: &mut dyn Write) -> Result<u64, MvccError> {
        let crate::export::View {
            snapshot,
            revisions,
            applied_index: applied,
            compact,
        } = self.view()?;

        let mut out = Summed::new(BufWriter::new(out));
        out.put(MAGIC)?;
        out.put(&VERSION.to_be_bytes())?;
        out.put(&applied.to_be_bytes())?;
        out.put(&compact.to_be_bytes())?;
        let mut count = 0u64;
        for entry in snapshot.iter(&revisions) {
            let (key, value) = entry.into_inner()?;
            if key.len() != codec::REV_KEY_LEN {
                return Err(MvccError::Corrupt(format!(
                    "revision key of {} bytes",
                    key.len()
                )));
            }
            let len = u32::try_from(value.len()).map_err(|_| {
                MvccError::Corrupt(format!("stored value of {} bytes", value.len()))
            })?;
            out.put(&[ENTRY])?;
            out.put(&key)?;
            out.put(&len.to_be_bytes())?;
            out.put(&value)?;
            count += 1;
        }
        for entry in snapshot.iter(&self.inner.leases) {
            let (key, value) = entry.into_inner()?;
            let id = codec::decode_lease_key(&key)?;
            let len = u32::try_from(value.len()).map_err(|_| {
                MvccError::Corrupt(format!("stored lease of {} bytes", value.len()))
            })?;
            out.put(&[LEASE])?;
            out.put(&id.to_be_bytes())?;
            out.put(&len.to_be_bytes())?;
            out.put(&value)?;
            count += 1;
        }
        for entry in snapshot.iter(&self.inner.state_records) {
            let (key, value) = entry.into_inner()?;
            out.put(&[STATE_RECORD])?;
            out.put_bytes(&key)?;
            out.put_bytes(&value)?;
            count += 1;
        }
        out.put(&[END])?;
        out.put(&count.to_be_bytes())?;
        let (_, bytes) = out.finish()?;
        tracing::info!(
            applied_index = applied,
            compact_revision = compact.max(0),
            revisions = count,
            bytes,
            "wrote mvcc snapshot"
        );
        Ok(applied)
    }

    /// Replaces the store's whole content with a snapshot that
    /// [`write_snapshot`](Store::write_snapshot) wrote, read from `input`,
    /// and rebuilds the index: afterwards the current revision, compact
    /// revision and applied index are the snapshot's. Waits for the open
    /// [`WriteBatch`](crate::WriteBatch), if any, and holds off new ones
    /// until done. Readers go on meanwhile and see the old content, then the
    /// new, never a mix.
    ///
    /// Reads exactly the snapshot's bytes from `input` and no further, one
    /// record at a time: give it a buffered reader. Like [`write`], it must
    /// not be called by a thread holding a [`WriteBatch`](crate::WriteBatch).
    ///
    /// A snapshot that is damaged, cut short or of an unknown format fails
    /// with [`MvccError::InvalidSnapshot`] and leaves the store as it was, as
    /// does any other error before the switch. The restored content is made
    /// durable before this returns; an error doing so (after the switch)
    /// leaves the restored content in place but maybe not on disk, and
    /// should be treated as fatal.
    ///
    /// [`write`]: Store::write
    pub fn restore_snapshot(&self, input: &mut dyn Read) -> Result<(), MvccError> {
        let inner = &self.inner;
        let _writer = inner.writer.lock();
        let mut input = Summed::new(input);
        let (applied, compact) = read_header(&mut input).map_err(cut_short)?;

        let old = inner.state.read().revisions.clone();
        let name = next_revisions_name(&inner.db, old.name());
        let fresh = inner.db.keyspace(&name, revisions_options)?;
        crate::sync_keyspace_entries(&fresh)?;
        let filled = fill(&inner.db, &fresh, &mut input, compact).map_err(cut_short);
        let switched = filled.and_then(|filled| {
            let current = filled.index.current;
            let keys = filled.index.keys.len();
            self.switch(&name, &fresh, filled, applied, compact)?;
            tracing::info!(
                keyspace = %name,
                revision = current,
                compact_revision = compact.max(0),
                applied_index = applied,
                keys,
                "restored mvcc store from a snapshot"
            );
            Ok(())
        });
        if let Err(e) = switched {
            tracing::warn!(error = %e, "mvcc snapshot restore failed; the store is unchanged");
            // The next open deletes it if this fails.
            if let Err(e) = inner.db.delete_keyspace(fresh) {
                tracing::warn!(error = %e, keyspace = %name, "could not delete the partly restored keyspace");
            }
            return Err(e);
        }

        inner.db.persist(PersistMode::SyncAll)?;
        // The next open reads the restored index back rather than rebuild it.
        inner.request_checkpoint();
        // Only once the switch is durable: until then a crash brings the old
        // keyspace back. Readers still holding it keep reading it; fjall
        // removes its files when the last of them lets go.
        let old_name = old.name().to_string();
        if let Err(e) = inner.db.delete_keyspace(old) {
            tracing::warn!(error = %e, keyspace = %old_name, "could not delete the replaced revisions keyspace; the next open will");
        }
        Ok(())
    }

    /// Makes `fresh` the revisions keyspace, on disk and in memory at once.
    fn switch(
        &self,
        name: &str,
        fresh: &Keyspace,
        filled: Filled,
        applied: u64,
        compact: i64,
    ) -> Result<(), MvccError> {
        let Filled {
            index,
            in_use,
            leases,
            state_records,
        } = filled;
        let inner = &self.inner;
        let mut batch = inner.db.batch();
        for entry in inner.state_records.iter() {
            batch.remove(&inner.state_records, entry.key()?);
        }
        for (key, value) in state_records {
            batch.insert(&inner.state_records, key, value);
        }
        // Leases are few: replaced in the same batch as the switch.
        for entry in inner.leases.iter() {
            batch.remove(&inner.leases, entry.key()?);
        }
        for (id, record) in leases {
            batch.insert(&inner.leases, codec::lease_key(id), record);
        }
        batch.insert(&inner.meta, codec::REVISIONS_KEYSPACE, name.as_bytes());
        // The index checkpoint was of the old content; fill deleted what the
        // snapshot's compaction left.
        batch.remove(&inner.meta, codec::INDEX_CHECKPOINT);
        batch.remove(&inner.meta, codec::COMPACTING);
        batch.insert(&inner.meta, codec::APPLIED_INDEX, applied.to_be_bytes());
        if compact == NEVER_COMPACTED {
            batch.remove(&inner.meta, codec::COMPACT_REVISION);
        } else {
            batch.insert(&inner.meta, codec::COMPACT_REVISION, compact.to_be_bytes());
        }
        // Committed under the write lock so that a concurrent write_snapshot
        // sees the old keyspace with the old meta or the new with the new.
        let mut state = inner.state.write();
        batch.commit()?;
        *state = State {
            index,
            revisions: fresh.clone(),
        };
        inner.checkpoints.invalidate();
        // Not before the index: a linearizable read waits for the applied
        // index and then reads the index.
        inner.applied.store(applied, Ordering::Release);
        inner.in_use.store(in_use, Ordering::Relaxed);
        Ok(())
    }
}

/// Opens the revisions keyspace `meta` names, and deletes any other a
/// restore left behind: a fresh one it failed to fill or crashed filling,
/// or the one it replaced if it crashed before deleting it.
pub(crate) fn open_revisions(db: &Database, meta: &Keyspace) -> Result<Keyspace, MvccError> {
    let name = match meta.get(codec::REVISIONS_KEYSPACE)? {
        Some(v) => String::from_utf8(v.to_vec())
            .map_err(|_| MvccError::Corrupt("revisions keyspace name is not UTF-8".into()))?,
        None => REVISIONS.to_owned(),
    };
    // Opening a keyspace creates it if missing: a named one that is gone
    // would come back empty and look valid.
    if name != REVISIONS && !db.keyspace_exists(&name) {
        return Err(MvccError::Corrupt(format!(
            "revisions keyspace {name} is missing"
        )));
    }
    let revisions = db.keyspace(&name, revisions_options)?;
    for other in db.list_keyspace_names() {
        if is_revisions_name(&other) && *other != *name {
            let stray = db.keyspace(&other, KeyspaceCreateOptions::default)?;
            db.delete_keyspace(stray)?;
            tracing::info!(keyspace = %other, "deleted a revisions keyspace left by a snapshot restore");
        }
    }
    Ok(revisions)
}

/// How a revisions keyspace is created: every level's data blocks are
/// compressed with LZ4 (fjall's default leaves the first two levels
/// uncompressed), since a store's bulk is values that a client often sends
/// alike, and LZ4 costs little beside the write. A keyspace created
/// earlier keeps the options it was created with.
fn revisions_options() -> KeyspaceCreateOptions {
    KeyspaceCreateOptions::default()
        .data_block_compression_policy(fjall::config::CompressionPolicy::all(
            fjall::CompressionType::Lz4,
        ))
        .max_memtable_size(REVISIONS_MEMTABLE_BYTES)
}

/// Whether `name` is one of the revisions keyspaces: `revisions` or
/// `revisions-N`.
fn is_revisions_name(name: &str) -> bool {
    name == REVISIONS
        || name
            .strip_prefix(REVISIONS)
            .and_then(|rest| rest.strip_prefix('-'))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// A name for the keyspace a restore fills, after `current`'s.
fn next_revisions_name(db: &Database, current: &str) -> String {
    let mut generation = current
        .strip_prefix(REVISIONS)
        .and_then(|rest| rest.strip_prefix('-'))
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    loop {
        generation = generation.wrapping_add(1);
        let name = format!("{REVISIONS}-{generation}");
        // One may be left from a failed restore whose delete failed too.
        if name != current && !db.keyspace_exists(&name) {
            return name;
        }
    }
}

/// Reads the header; returns the applied index and the compact revision.
fn read_header(input: &mut Summed<&mut dyn Read>) -> Result<(u64, i64), MvccError> {
    let magic: [u8; 8] = input.take()?;
    if &magic != MAGIC {
        return Err(MvccError::InvalidSnapshot(
            "not an mvcc snapshot (bad magic)".into(),
        ));
    }
    let version = u32::from_be_bytes(input.take()?);
    if version != VERSION {
        return Err(MvccError::InvalidSnapshot(format!(
            "format version {version}, this build reads {VERSION}"
        )));
    }
    let applied = u64::from_be_bytes(input.take()?);
    let compact = i64::from_be_bytes(input.take()?);
    if !(NEVER_COMPACTED..i64::MAX).contains(&compact) {
        return Err(MvccError::InvalidSnapshot(format!(
            "compact revision {compact}"
        )));
    }
    Ok((applied, compact))
}

/// What a restore read: the index of the revisions, the bytes they take,
/// and the lease and state records to store with the switch.
struct Filled {
    index: Index,
    in_use: u64,
    leases: Vec<(i64, Vec<u8>)>,
    state_records: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Fills `fresh` from the entries of `input`, checks the end record, and
/// builds the index; returns it with the bytes stored and the leases.
fn fill(
    db: &Database,
    fresh: &Keyspace,
    input: &mut Summed<&mut dyn Read>,
    compact: i64,
) -> Result<Filled, MvccError> {
    let mut leases = Vec::new();
    let mut state_records = Vec::new();
    let mut rebuild = Rebuild::new();
    // Ingestion writes tables directly, bypassing the journal: much faster
    // for a whole store, and durable once finished.
    let mut ingestion = fresh.start_ingestion()?;
    let mut last: Option<[u8; codec::REV_KEY_LEN]> = None;
    let mut count = 0u64;
    loop {
        let [tag] = input.take()?;
        match tag {
            ENTRY => {
                let key: [u8; codec::REV_KEY_LEN] = input.take()?;
                // Ingestion panics on keys out of order; the index needs
                // them in order too.
                if last.is_some_and(|l| l >= key) {
                    return Err(MvccError::InvalidSnapshot("revisions out of order".into()));
                }
                last = Some(key);
                // Revisions start after the initial one, and one must be
                // left above the last for the next write.
                let main = i64::from_be_bytes(key[..8].try_into().unwrap_or_default());
                if !(INITIAL_REVISION..i64::MAX).contains(&main) {
                    return Err(MvccError::InvalidSnapshot(format!(
                        "entry {count}: revision {main}"
                    )));
                }
                let len = u32::from_be_bytes(input.take()?);
                let value = input.take_vec(len as usize)?;
                rebuild
                    .add(&key, &value)
                    .map_err(|e| MvccError::InvalidSnapshot(format!("entry {count}: {e}")))?;
                ingestion.write(key, value)?;
                count += 1;
            }
            LEASE => {
                let id = i64::from_be_bytes(input.take()?);
                let len = u32::from_be_bytes(input.take()?);
                leases.push((id, input.take_vec(len as usize)?));
                count += 1;
            }
            STATE_RECORD => {
                let len = u32::from_be_bytes(input.take()?);
                // fjall panics on an empty key or one over 64 KiB.
                if len == 0 || len > u32::from(u16::MAX) {
                    return Err(MvccError::InvalidSnapshot(format!(
                        "record {count}: a state key of {len} bytes"
                    )));
                }
                let key = input.take_vec(len as usize)?;
                let len = u32::from_be_bytes(input.take()?);
                state_records.push((key, input.take_vec(len as usize)?));
                count += 1;
            }
            END => break,
            other => {
                return Err(MvccError::InvalidSnapshot(format!(
                    "unknown record tag {other}"
                )));
            }
        }
    }
    let expected = u64::from_be_bytes(input.take()?);
    if let Err((crc, stored)) = input.check_sum()? {
        return Err(MvccError::InvalidSnapshot(format!(
            "checksum {crc:08x}, expected {stored:08x}"
        )));
    }
    if expected != count {
        return Err(MvccError::InvalidSnapshot(format!(
            "{count} entries, the end record says {expected}"
        )));
    }
    ingestion.finish()?;

    let (index, in_use, leftovers) = rebuild.finish(compact);
    let in_use = AtomicU64::new(in_use);
    delete_revisions(db, fresh, &leftovers, &in_use)?;
    Ok(Filled {
        index,
        in_use: in_use.into_inner(),
        leases,
        state_records,
    })
}

/// A stream cut short is an invalid snapshot, not an I/O failure.
fn cut_short(e: MvccError) -> MvccError {
    match e {
        MvccError::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            MvccError::InvalidSnapshot(format!("the snapshot {e}"))
        }
        e => e,
    }
}
