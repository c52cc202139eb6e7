//! Power loss at random points: after any sequence of writes, the machine
//! loses what was written but not yet fsynced, except that a random choice
//! of the unsynced 512-byte sectors made it to disk (a torn write). The
//! reopened log must open, hold every entry that was durable and not since
//! overwritten, and hold nothing that was never written.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use raft::prelude::{Entry, HardState};

use super::{LogStore, WAL_DIR};
use crate::raft_log::RaftLog;

const SECTOR: usize = 512;

#[derive(Clone, Debug)]
enum Op {
    /// Append `count` entries at `offset` past the first index (capped at
    /// one past the last), fsynced when `sync`; in a new term when
    /// `new_term`, or when they replace entries (as raft only does for a
    /// newer leader: an (index, term) names one entry).
    Append {
        offset: u64,
        count: u64,
        new_term: bool,
        sync: bool,
    },
    /// Compact through `offset` past the first index (capped at the last).
    Compact(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..10u64, 1..5u64, any::<bool>(), any::<bool>())
            .prop_map(|(offset, count, new_term, sync)| Op::Append { offset, count, new_term, sync }),
        1 => (0..10u64).prop_map(Op::Compact),
    ]
}

/// Every file of the log's directory and its bytes.
type Image = BTreeMap<PathBuf, Vec<u8>>;

fn image(dir: &Path) -> Image {
    let mut files = Image::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if let Ok(bytes) = std::fs::read(entry.path()) {
            files.insert(entry.path(), bytes);
        }
    }
    files
}

/// (index, term) of every entry the store holds.
fn entries(store: &LogStore) -> Vec<(u64, u64)> {
    store.entries.iter().map(|e| (e.index, e.term)).collect()
}

/// What a power loss leaves of `now` when `durable` was all that was synced:
/// each sector written since then made it or not, as `coin` says.
fn crash(durable: &Image, now: &Image, coin: &mut impl FnMut() -> bool) -> Image {
    let mut left = Image::new();
    for (path, bytes) in now {
        let before = durable.get(path);
        if before.is_none() && !coin() {
            continue; // a file made since the sync, never on disk
        }
        let before = before.cloned().unwrap_or_default();
        let mut crashed = before.clone();
        crashed.resize(bytes.len(), 0);
        for start in (0..bytes.len()).step_by(SECTOR) {
            let end = (start + SECTOR).min(bytes.len());
            let changed = before.get(start..end) != Some(&bytes[start..end]);
            if changed && coin() {
                crashed[start..end].copy_from_slice(&bytes[start..end]);
            }
        }
        left.insert(path.clone(), crashed);
    }
    left
}

fn entry(index: u64, term: u64) -> Entry {
    Entry {
        index,
        term,
        data: vec![index as u8; 40 + (index as usize * 13) % 300].into(),
        ..Default::default()
    }
}

proptest! {
    // One crash point per case: a thousand per `make test`.
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn a_power_loss_keeps_what_was_synced_and_invents_nothing(
        ops in proptest::collection::vec(op(), 1..24),
        segment_bytes in 256..2048u64,
        seed in any::<u64>(),
    ) {
        // tmpfs where there is one: the crash is simulated, real fsyncs
        // would only slow a thousand cases down.
        let shm = Path::new("/dev/shm");
        let root = if shm.is_dir() { tempfile::tempdir_in(shm)? } else { tempfile::tempdir()? };
        let wal = root.path().join(WAL_DIR);
        let mut store = LogStore::open_with_segments_of(root.path(), segment_bytes)?;
        store.bootstrap(&[])?;
        let mut durable = image(&wal);
        let mut durable_entries = entries(&store);
        let mut durable_compacted = store.compacted.index;
        // Every entry ever written, as (index, term).
        let mut written: std::collections::HashSet<(u64, u64)> = Default::default();
        let mut term = 1;
        for op in ops {
            let files = image(&wal).len();
            let synced = match op {
                Op::Append { offset, count, new_term, sync } => {
                    let first = (store.first_index() + offset).min(store.last_index() + 1);
                    if new_term || first <= store.last_index() {
                        term += 1;
                    }
                    let ents: Vec<Entry> = (first..first + count).map(|i| entry(i, term)).collect();
                    written.extend(ents.iter().map(|e| (e.index, e.term)));
                    let hs = HardState { term, ..Default::default() };
                    store.persist_ready(&ents, Some(&hs), sync)?;
                    sync
                }
                Op::Compact(offset) => {
                    let index = (store.first_index() + offset).min(store.last_index());
                    store.compact(index)?;
                    true
                }
            };
            // A new segment is started only after the last one is synced.
            if synced || image(&wal).len() != files {
                durable = image(&wal);
                durable_entries = entries(&store);
                durable_compacted = store.compacted.index;
            }
        }
        let now = image(&wal);
        let current = entries(&store);
        drop(store);

        let mut state = seed | 1;
        let mut coin = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state & 1 == 1
        };
        let left = crash(&durable, &now, &mut coin);
        for path in now.keys() {
            let _ = std::fs::remove_file(path);
        }
        for (path, bytes) in &left {
            std::fs::write(path, bytes)?;
        }

        let store = LogStore::open_with_segments_of(root.path(), segment_bytes)?;
        let reopened = entries(&store);
        prop_assert!(store.compacted.index >= durable_compacted);
        // Nothing invented: every entry was written with that term.
        for e in &reopened {
            prop_assert!(written.contains(e), "entry {:?} was never written", e);
        }
        // Contiguous from the compaction point.
        for (i, (index, _)) in reopened.iter().enumerate() {
            prop_assert_eq!(*index, store.compacted.index + 1 + i as u64);
        }
        // What was durable and not overwritten since is all there.
        let kept: Vec<(u64, u64)> = durable_entries
            .iter()
            .zip(current.iter().skip_while(|e| e.0 < durable_entries.first().map_or(0, |f| f.0)))
            .take_while(|(d, c)| d == c)
            .map(|(d, _)| *d)
            .filter(|(index, _)| *index > store.compacted.index)
            .collect();
        for e in &kept {
            prop_assert!(reopened.contains(e), "durable entry {:?} lost: {:?}", e, reopened);
        }
    }
}

/// The segments of a small log, written once for every case.
fn valid_segments() -> &'static Vec<(std::ffi::OsString, Vec<u8>)> {
    static SEGMENTS: std::sync::OnceLock<Vec<(std::ffi::OsString, Vec<u8>)>> =
        std::sync::OnceLock::new();
    SEGMENTS.get_or_init(|| {
        let root = tempfile::tempdir().expect("a temp dir");
        {
            let mut store = LogStore::open(root.path()).expect("open");
            store.bootstrap(&[]).expect("bootstrap");
            for i in 1..=6 {
                let hs = HardState {
                    term: 1,
                    commit: i,
                    ..Default::default()
                };
                store
                    .persist_ready(&[entry(i, 1)], Some(&hs), true)
                    .expect("persist");
            }
        }
        // Only a little of the zeros the segment was filled with ahead.
        image(&root.path().join(WAL_DIR))
            .into_iter()
            .filter_map(|(path, mut bytes)| {
                let written = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
                bytes.truncate(written + 1024);
                Some((path.file_name()?.to_owned(), bytes))
            })
            .collect()
    })
}

proptest! {
    /// A segment damaged anywhere (bytes flipped, cut short, garbage
    /// appended) opens or is refused, and never panics the reader. `make
    /// fuzz` runs many more cases.
    #[test]
    fn damaged_segments_never_panic(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
        cut in any::<prop::sample::Index>(),
        garbage in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let shm = Path::new("/dev/shm");
        let root = if shm.is_dir() { tempfile::tempdir_in(shm)? } else { tempfile::tempdir()? };
        let wal = root.path().join(WAL_DIR);
        std::fs::create_dir_all(&wal)?;
        for (name, mut bytes) in valid_segments().clone() {
            let written = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1).max(1);
            for (at, value) in &flips {
                let at = at.index(written);
                bytes[at] ^= value | 1;
            }
            bytes.truncate(cut.index(bytes.len() + 1));
            bytes.extend(&garbage);
            std::fs::write(wal.join(name), bytes)?;
        }
        let _ = LogStore::open(root.path());
    }
}
