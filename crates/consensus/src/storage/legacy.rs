//! Cairn kept its raft log in a fjall database until it had a log of its
//! own. A member started on such a data dir converts the database into the
//! log format once, then deletes it.

use std::fs;
use std::path::Path;

use fjall::{Database, KeyspaceCreateOptions};
use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, HardState, SnapshotMetadata};

use super::wal::{Kind, SEGMENT_BYTES, Wal};
use crate::Error;

/// Where a conversion is written before it is renamed into place, so that
/// a crash midway leaves the database as the only log.
const CONVERTING: &str = "wal.converting";

/// Converts a fjall raft log in `dir`, if any, into the log at `wal_dir`
/// (a subdirectory of `dir`), and removes the database.
pub(super) fn convert_if_present(dir: &Path, wal_dir: &Path) -> Result<(), Error> {
    if !dir.exists() {
        return Ok(());
    }
    let mut database_files = Vec::new();
    for item in fs::read_dir(dir)? {
        let path = item?.path();
        if path != wal_dir {
            database_files.push(path);
        }
    }
    if database_files.is_empty() {
        return Ok(());
    }
    // With the log in place the conversion finished; only the deletion of
    // the database was cut short.
    if !wal_dir.exists() {
        let converting = dir.join(CONVERTING);
        if converting.exists() {
            fs::remove_dir_all(&converting)?;
        }
        let entries = convert(dir, &converting)?;
        fs::rename(&converting, wal_dir)?;
        fs::File::open(dir)?.sync_all()?;
        tracing::info!(
            dir = %dir.display(),
            entries,
            "converted the raft log from fjall to Cairn's log files"
        );
    }
    for path in database_files {
        if path.ends_with(CONVERTING) {
            continue;
        }
        if path.is_dir() {
            fs::remove_dir_all(&path)?;
        } else {
            fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// Writes the database's state and entries as a new log in `out`; returns
/// how many entries it held.
fn convert(dir: &Path, out: &Path) -> Result<usize, Error> {
    let db = Database::builder(dir).open()?;
    let log = db.keyspace("raft_log", KeyspaceCreateOptions::default)?;
    let state = db.keyspace("raft_state", KeyspaceCreateOptions::default)?;
    let (mut wal, _) = Wal::open(out, SEGMENT_BYTES)?;
    let mut compacted = 0;
    if let Some(bytes) = state.get(b"compacted")? {
        let meta = SnapshotMetadata::parse_from_bytes(&bytes)?;
        compacted = meta.index;
        wal.push(Kind::Compacted, &meta)?;
    }
    if let Some(bytes) = state.get(b"hard_state")? {
        wal.push(Kind::HardState, &HardState::parse_from_bytes(&bytes)?)?;
    }
    if let Some(bytes) = state.get(b"conf_state")? {
        wal.push(Kind::ConfState, &ConfState::parse_from_bytes(&bytes)?)?;
    }
    if let Some(bytes) = state.get(b"members")? {
        wal.push_bytes(Kind::Members, &bytes)?;
    }
    let mut entries = 0;
    for item in log.iter() {
        let (_, value) = item.into_inner()?;
        let entry = Entry::parse_from_bytes(&value)?;
        if entry.index > compacted {
            wal.push_entry(&entry)?;
            entries += 1;
        }
    }
    wal.commit(true)?;
    Ok(entries)
}
