//! The raft log: entries, hard state and conf state, kept in memory for
//! raft-rs's reads and written through to an append-only log
//! ([`wal`]), fsynced before a Ready's persisted messages go out and before
//! anything is acknowledged.

#[cfg(test)]
mod crash_tests;
mod legacy;
mod shared;
mod wal;

use std::collections::VecDeque;
use std::path::Path;

use protobuf::Message as _;
use raft::prelude::{
    ConfChangeSingle, ConfChangeType, ConfChangeV2, ConfState, Entry, EntryType, HardState,
    Snapshot, SnapshotMetadata,
};
use raft::{GetEntriesContext, RaftState, StorageError};

use crate::raft_log::RaftLog;
use crate::{Error, PeerInfo};
pub(crate) use shared::GroupWriter;
pub use shared::SharedRaftLog;
pub use wal::create_dir_durably;
use wal::{Kind, Record, Wal};

/// The log's segments live here, under the node's raft directory.
const WAL_DIR: &str = "wal";

/// Where a [`LogStore`] writes its records: a WAL of its own, or its
/// group's share of a WAL several groups write ([`GroupWriter`]).
pub(crate) trait LogWriter: Send + 'static {
    fn push_entry(&mut self, entry: &Entry) -> Result<(), Error>;
    fn push(&mut self, kind: Kind, message: &impl protobuf::Message) -> Result<(), Error>;
    fn push_bytes(&mut self, kind: Kind, payload: &[u8]) -> Result<(), Error>;
    /// Writes what was pushed, and fdatasyncs it when `sync`.
    fn commit(&mut self, sync: bool) -> Result<(), Error>;
    /// Hands what was pushed to whatever writes it, without writing it:
    /// the next commit of any writer of the log does.
    fn hand_over(&mut self) -> Result<(), Error>;
    /// True once the log wants a new segment, opened with a checkpoint.
    fn segment_full(&self) -> bool;
    /// Closes the current segment (synced) and opens the next.
    fn start_segment(&mut self) -> Result<(), Error>;
    /// Drops what only entries at or below `index` (everything before
    /// the current segment, with `all`) still needed.
    fn remove_segments(&mut self, index: u64, all: bool) -> Result<(), Error>;
}

impl LogWriter for Wal {
    fn push_entry(&mut self, entry: &Entry) -> Result<(), Error> {
        Wal::push_entry(self, entry)
    }
    fn push(&mut self, kind: Kind, message: &impl protobuf::Message) -> Result<(), Error> {
        Wal::push(self, kind, message)
    }
    fn push_bytes(&mut self, kind: Kind, payload: &[u8]) -> Result<(), Error> {
        Wal::push_bytes(self, kind, payload)
    }
    fn commit(&mut self, sync: bool) -> Result<(), Error> {
        Wal::commit(self, sync)
    }
    /// The WAL's buffer is where records are pushed: nothing to hand over.
    fn hand_over(&mut self) -> Result<(), Error> {
        Ok(())
    }
    fn segment_full(&self) -> bool {
        Wal::segment_full(self)
    }
    fn start_segment(&mut self) -> Result<(), Error> {
        Wal::start_segment(self)
    }
    fn remove_segments(&mut self, index: u64, all: bool) -> Result<(), Error> {
        Wal::remove_segments(self, index, all)
    }
}

/// One raft group's log: in memory, written through to `W`.
pub(crate) struct LogStore<W: LogWriter = Wal> {
    wal: W,
    hard_state: HardState,
    conf_state: ConfState,
    /// Where the in-memory log starts: entries up to `compacted.index` are gone.
    compacted: SnapshotMetadata,
    entries: VecDeque<Entry>,
    members: Vec<PeerInfo>,
    /// The applied index raft knows of: what a snapshot sent now reflects at least.
    applied: u64,
}

impl LogStore {
    /// Opens the log at `dir`; a new one is empty until [`Self::bootstrap`].
    /// A log an earlier Cairn kept on fjall is moved into the new format.
    pub(crate) fn open(dir: &Path) -> Result<Self, Error> {
        Self::open_with_segments_of(dir, wal::SEGMENT_BYTES)
    }

    fn open_with_segments_of(dir: &Path, segment_bytes: u64) -> Result<Self, Error> {
        let wal_dir = dir.join(WAL_DIR);
        legacy::convert_if_present(dir, &wal_dir)?;
        let (wal, records) = Wal::open(&wal_dir, segment_bytes)?;
        LogStore::with_records(wal, records)
    }
}

impl LogStore<GroupWriter> {
    /// Group `group`'s log in `shared`: what it wrote there before, and
    /// where it writes from now on.
    pub(crate) fn open_in(shared: &SharedRaftLog, group: u64) -> Result<Self, Error> {
        let (writer, records) = shared.attach(group)?;
        LogStore::with_records(writer, records)
    }
}

impl<W: LogWriter> LogStore<W> {
    fn with_records(wal: W, records: Vec<Record>) -> Result<Self, Error> {
        let mut store = LogStore {
            wal,
            hard_state: HardState::default(),
            conf_state: ConfState::default(),
            compacted: SnapshotMetadata::default(),
            entries: VecDeque::new(),
            members: Vec::new(),
            applied: 0,
        };
        store.load(records)?;
        if !store.is_new() {
            // The segment written from now on opens with a whole checkpoint
            // even when a crash cut the last one short or came between a
            // new segment and its checkpoint: the segments before it may
            // be deleted later.
            store.push_checkpoint()?;
            store.wal.commit(true)?;
        }
        Ok(store)
    }

    fn push_members(&mut self) -> Result<(), Error> {
        let json = serde_json::to_vec(&self.members).map_err(|e| Error::Corrupt(e.to_string()))?;
        self.wal.push_bytes(Kind::Members, &json)
    }

    /// The state records a new segment opens with, so that the segments
    /// before it can go once their entries are compacted.
    fn push_checkpoint(&mut self) -> Result<(), Error> {
        self.wal.push(Kind::HardState, &self.hard_state)?;
        self.wal.push(Kind::ConfState, &self.conf_state)?;
        self.wal.push(Kind::Compacted, &self.compacted)?;
        self.push_members()
    }

    /// Rebuilds the state from the log's records: state records, last one
    /// wins; entries after the last reset, each replacing any entry at its
    /// index and after.
    fn load(&mut self, records: Vec<Record>) -> Result<(), Error> {
        let mut last_reset = 0;
        for (at, record) in records.iter().enumerate() {
            if let Record::State(kind, payload) = record {
                match kind {
                    Kind::HardState => self.hard_state = HardState::parse_from_bytes(payload)?,
                    Kind::ConfState => self.conf_state = ConfState::parse_from_bytes(payload)?,
                    Kind::Members => {
                        self.members = serde_json::from_slice(payload)
                            .map_err(|e| Error::Corrupt(format!("member registry: {e}")))?;
                    }
                    Kind::Compacted | Kind::Reset => {
                        self.compacted = SnapshotMetadata::parse_from_bytes(payload)?;
                        if *kind == Kind::Reset {
                            last_reset = at;
                        }
                    }
                    Kind::Entry | Kind::Group => {}
                }
            }
            if let Record::Group(group, _) = record {
                return Err(Error::Corrupt(format!(
                    "a record of raft group {group} in a log of one group"
                )));
            }
        }
        for record in records.into_iter().skip(last_reset) {
            let Record::Entry(entry) = record else {
                continue;
            };
            if entry.index <= self.compacted.index {
                // Gone itself, but it still replaced what followed it.
                self.entries.clear();
                continue;
            }
            if entry.index > self.last_index() + 1 {
                return Err(Error::Corrupt(format!(
                    "raft log has entry {} where {} was expected",
                    entry.index,
                    self.last_index() + 1
                )));
            }
            let keep = (entry.index - self.compacted.index - 1) as usize;
            self.entries.truncate(keep);
            self.entries.push_back(entry);
        }
        Ok(())
    }

    pub(crate) fn first_index(&self) -> u64 {
        self.compacted.index + 1
    }

    pub(crate) fn last_index(&self) -> u64 {
        self.compacted.index + self.entries.len() as u64
    }

    fn term_of(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.compacted.index {
            return Ok(self.compacted.term);
        }
        if idx < self.compacted.index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        match self.entries.get((idx - self.compacted.index - 1) as usize) {
            Some(entry) => Ok(entry.term),
            None => Err(raft::Error::Store(StorageError::Unavailable)),
        }
    }
}

impl<W: LogWriter> RaftLog for LogStore<W> {
    fn is_new(&self) -> bool {
        self.last_index() == 0 && self.hard_state.term == 0 && self.conf_state.voters.is_empty()
    }

    fn bootstrap(&mut self, members: &[PeerInfo]) -> Result<(), Error> {
        let mut entries = Vec::with_capacity(members.len());
        for (i, member) in members.iter().enumerate() {
            let change = ConfChangeSingle {
                change_type: ConfChangeType::AddNode,
                node_id: member.id,
                ..Default::default()
            };
            let cc = ConfChangeV2 {
                changes: vec![change].into(),
                ..Default::default()
            };
            entries.push(Entry {
                entry_type: EntryType::EntryConfChangeV2,
                term: 1,
                index: i as u64 + 1,
                data: cc.write_to_bytes()?.into(),
                context: crate::node::membership_context(member)?.into(),
                ..Default::default()
            });
        }
        self.conf_state
            .set_voters(members.iter().map(|m| m.id).collect());
        let hs = HardState {
            term: 1,
            commit: entries.len() as u64,
            ..Default::default()
        };
        self.wal.push(Kind::ConfState, &self.conf_state)?;
        self.persist_ready(&entries, Some(&hs), true)
    }

    fn members(&self) -> &[PeerInfo] {
        &self.members
    }

    fn set_membership(
        &mut self,
        members: Vec<PeerInfo>,
        conf_state: Option<ConfState>,
    ) -> Result<(), Error> {
        if let Some(cs) = conf_state {
            self.conf_state = cs;
            self.wal.push(Kind::ConfState, &self.conf_state)?;
        }
        self.members = members;
        self.push_members()?;
        self.wal.commit(true)
    }

    fn set_applied(&mut self, applied: u64) {
        self.applied = applied;
    }

    /// Replaces the log with a snapshot's point: every entry goes, the log
    /// resumes after `meta.index`.
    fn apply_snapshot(
        &mut self,
        meta: &SnapshotMetadata,
        members: Vec<PeerInfo>,
    ) -> Result<(), Error> {
        self.entries.clear();
        self.compacted = meta.clone();
        self.compacted.clear_conf_state();
        self.hard_state.commit = self.hard_state.commit.max(meta.index);
        self.conf_state = meta.get_conf_state().clone();
        self.applied = meta.index;
        self.members = members;
        self.wal.start_segment()?;
        self.wal.push(Kind::Reset, &self.compacted)?;
        self.push_checkpoint()?;
        self.wal.commit(true)?;
        self.wal.remove_segments(meta.index, true)
    }

    fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    /// Any conflicting suffix gives way to the new entries; a commit
    /// index noted since the last write rides along with the hard state.
    fn append(&mut self, entries: &[Entry], hard_state: Option<&HardState>) -> Result<(), Error> {
        if let Some(first) = entries.first() {
            let first_new = first.index;
            if first_new <= self.compacted.index {
                return Err(Error::Corrupt(format!(
                    "append at {first_new} below the compacted index {}",
                    self.compacted.index
                )));
            }
            let keep = (first_new - self.compacted.index - 1) as usize;
            self.entries.truncate(keep);
            for entry in entries {
                self.wal.push_entry(entry)?;
                self.entries.push_back(entry.clone());
            }
        }
        if let Some(hs) = hard_state {
            let noted_commit = self.hard_state.commit;
            self.hard_state = hs.clone();
            self.hard_state.commit = hs.commit.max(noted_commit);
        }
        if hard_state.is_some() || !entries.is_empty() {
            self.wal.push(Kind::HardState, &self.hard_state)?;
        }
        Ok(())
    }

    fn flush(&mut self, sync: bool) -> Result<(), Error> {
        self.wal.commit(sync)?;
        if self.wal.segment_full() {
            self.wal.start_segment()?;
            self.push_checkpoint()?;
            self.wal.commit(true)?;
        }
        Ok(())
    }

    fn hand_over(&mut self) -> Result<(), Error> {
        self.wal.hand_over()
    }

    fn note_commit(&mut self, commit: u64) {
        self.hard_state.commit = commit;
    }

    fn set_commit(&mut self, commit: u64) -> Result<(), Error> {
        self.hard_state.commit = commit;
        self.wal.push(Kind::HardState, &self.hard_state)?;
        self.wal.commit(false)
    }

    /// Drops entries up to and including `index`. The caller guarantees the
    /// state machine has durably applied them.
    fn compact(&mut self, index: u64) -> Result<(), Error> {
        if index <= self.compacted.index || index > self.last_index() {
            return Ok(());
        }
        let term = self.term_of(index)?;
        let drop_count = (index - self.compacted.index) as usize;
        self.entries.drain(..drop_count);
        self.compacted.index = index;
        self.compacted.term = term;
        self.wal.push(Kind::Compacted, &self.compacted)?;
        // Synced before any segment it makes unnecessary is deleted.
        self.wal.commit(true)?;
        self.wal.remove_segments(index, false)
    }
}

impl<W: LogWriter> raft::Storage for LogStore<W> {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState {
            hard_state: self.hard_state.clone(),
            conf_state: self.conf_state.clone(),
        })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low <= self.compacted.index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last_index() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let start = (low - self.compacted.index - 1) as usize;
        let end = (high - self.compacted.index - 1) as usize;
        let mut entries: Vec<Entry> = self.entries.range(start..end).cloned().collect();
        raft::util::limit_size(&mut entries, max_size.into());
        Ok(entries)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.term_of(idx)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(LogStore::<W>::first_index(self))
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(LogStore::<W>::last_index(self))
    }

    /// Only the metadata: the transport streams the state machine's own
    /// snapshot, taken when it sends, which reflects at least this index
    /// (the receiver's apply loop skips entries it already holds).
    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let index = self.applied.max(self.compacted.index);
        if index < request_index {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        let mut snapshot = Snapshot::default();
        let meta = snapshot.mut_metadata();
        meta.index = index;
        meta.term = self.term_of(index)?;
        meta.set_conf_state(self.conf_state.clone());
        Ok(snapshot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::Storage as _;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: format!("e{index}").into_bytes().into(),
            ..Default::default()
        }
    }

    #[test]
    fn directories_are_made_at_every_missing_level_and_kept_if_there() -> Result<(), Error> {
        let dir = tempfile::tempdir()?;
        let deep = dir.path().join("member/raft/wal");
        create_dir_durably(&deep)?;
        assert!(deep.is_dir());
        std::fs::write(deep.join("kept"), "x")?;
        create_dir_durably(&deep)?;
        assert_eq!(std::fs::read_to_string(deep.join("kept"))?, "x");
        // A file where a directory should be is an error, not a success.
        let file = dir.path().join("member/file");
        std::fs::write(&file, "x")?;
        assert!(create_dir_durably(&file.join("below")).is_err());
        Ok(())
    }

    #[test]
    fn append_truncate_compact_and_reopen() -> Result<(), Error> {
        let dir = tempfile::tempdir()?;
        {
            let mut store = LogStore::open(dir.path())?;
            assert!(store.is_new());
            store.bootstrap(&[])?;
            assert_eq!((store.first_index(), store.last_index()), (1, 0));
            let ents: Vec<Entry> = (1..=5).map(|i| entry(i, 1)).collect();
            let hs = HardState {
                term: 1,
                ..Default::default()
            };
            store.persist_ready(&ents, Some(&hs), true)?;
            // A new leader overwrites 4 and 5 with a shorter suffix.
            store.persist_ready(&[entry(4, 2)], None, true)?;
            assert_eq!(store.last_index(), 4);
            assert_eq!(store.term(4).ok(), Some(2));
            store.compact(2)?;
            assert_eq!(store.first_index(), 3);
            assert!(store.term(1).is_err());
            assert_eq!(store.term(2).ok(), Some(1));
            // A noted commit is written with the next append.
            store.note_commit(3);
            store.persist_ready(&[entry(5, 2)], None, false)?;
            store.note_commit(4);
        }
        let store = LogStore::open(dir.path())?;
        assert_eq!((store.first_index(), store.last_index()), (3, 5));
        let state = store
            .initial_state()
            .map_err(|e| Error::Corrupt(e.to_string()))?;
        assert_eq!(state.hard_state.commit, 3);
        let ents = store
            .entries(3, 6, None, GetEntriesContext::empty(false))
            .map_err(|e| Error::Corrupt(e.to_string()))?;
        assert_eq!(
            ents.iter().map(|e| (e.index, e.term)).collect::<Vec<_>>(),
            vec![(3, 1), (4, 2), (5, 2)]
        );
        Ok(())
    }

    fn peer(id: u64) -> PeerInfo {
        PeerInfo {
            id,
            name: format!("m{id}"),
            peer_urls: vec![format!("http://127.0.0.1:{}", 2380 + id)],
            client_urls: Vec::new(),
            is_learner: false,
        }
    }

    fn segment_files(dir: &Path) -> Result<Vec<std::path::PathBuf>, Error> {
        let mut files: Vec<_> = std::fs::read_dir(dir.join(WAL_DIR))?
            .map(|item| item.map(|i| i.path()))
            .collect::<Result<_, _>>()?;
        files.sort();
        Ok(files)
    }

    #[test]
    fn a_torn_last_record_is_cut_off_and_the_log_goes_on() -> Result<(), Error> {
        let dir = tempfile::tempdir()?;
        {
            let mut store = LogStore::open(dir.path())?;
            store.bootstrap(&[])?;
            let ents: Vec<Entry> = (1..=3).map(|i| entry(i, 1)).collect();
            store.persist_ready(&ents, None, true)?;
        }
        // A crash in the middle of the last write: its last bytes never
        // reached the disk, and the zeros ahead of the records remain.
        let last = segment_files(dir.path())?.pop().expect("a segment");
        let mut bytes = std::fs::read(&last)?;
        let end = bytes.iter().rposition(|&b| b != 0).expect("records") + 1;
        bytes[end - 3..end].fill(0);
        std::fs::write(&last, &bytes)?;
        {
            let mut store = LogStore::open(dir.path())?;
            // The torn record was the hard state written after entry 3.
            assert_eq!(store.last_index(), 3);
            store.persist_ready(&[entry(4, 2)], None, true)?;
        }
        let store = LogStore::open(dir.path())?;
        assert_eq!(store.last_index(), 4);
        assert_eq!(store.term(4).ok(), Some(2));
        Ok(())
    }

    #[test]
    fn a_flipped_bit_in_the_last_segment_is_refused_not_cut() -> Result<(), Error> {
        let dir = tempfile::tempdir()?;
        {
            let mut store = LogStore::open(dir.path())?;
            store.bootstrap(&[])?;
            for i in 1..=5 {
                store.persist_ready(&[entry(i, 1)], None, true)?;
            }
        }
        // Bit rot in the middle of the segment, records after it intact:
        // cutting there would silently drop acknowledged entries.
        let last = segment_files(dir.path())?.pop().expect("a segment");
        let mut bytes = std::fs::read(&last)?;
        let end = bytes.iter().rposition(|&b| b != 0).expect("records") + 1;
        bytes[end / 2] ^= 0x10;
        std::fs::write(&last, &bytes)?;
        match LogStore::open(dir.path()) {
            Err(Error::Corrupt(message)) => {
                assert!(message.contains("fails its checksum"), "{message}");
            }
            Err(other) => panic!("unexpected error: {other}"),
            Ok(_) => panic!("a damaged log was opened"),
        }
        Ok(())
    }

    #[test]
    fn damage_before_the_last_segment_is_refused() -> Result<(), Error> {
        let dir = tempfile::tempdir()?;
        {
            let mut store = LogStore::open_with_segments_of(dir.path(), 64)?;
            store.bootstrap(&[])?;
            for i in 1..=10 {
                store.persist_ready(&[entry(i, 1)], None, true)?;
            }
        }
        let first = segment_files(dir.path())?.remove(0);
        let mut bytes = std::fs::read(&first)?;
        bytes[12] ^= 0xff;
        std::fs::write(&first, bytes)?;
        match LogStore::open(dir.path()) {
            Err(Error::Corrupt(reason)) => assert!(reason.contains("damaged"), "{reason}"),
            other => panic!(
                "expected a damaged log, got {:?}",
                other.map(|s| s.last_index())
            ),
        }
        Ok(())
    }

    #[test]
    fn compaction_deletes_whole_segments_and_keeps_the_state() -> Result<(), Error> {
        let dir = tempfile::tempdir()?;
        {
            let mut store = LogStore::open_with_segments_of(dir.path(), 256)?;
            store.bootstrap(&[peer(1), peer(2)])?;
            store.set_membership(vec![peer(1), peer(2)], None)?;
            let hs = HardState {
                term: 3,
                vote: 2,
                commit: 2,
                ..Default::default()
            };
            store.persist_ready(&[], Some(&hs), true)?;
            for i in 3..=100 {
                store.persist_ready(&[entry(i, 3)], None, false)?;
            }
            let before = segment_files(dir.path())?.len();
            assert!(before > 5, "{before} segments");
            store.compact(90)?;
            let after = segment_files(dir.path())?.len();
            assert!(
                after < before / 2,
                "{before} segments, {after} after compaction"
            );
        }
        let store = LogStore::open(dir.path())?;
        assert_eq!((store.first_index(), store.last_index()), (91, 100));
        assert_eq!(store.term(90).ok(), Some(3));
        let hs = store.hard_state();
        assert_eq!((hs.term, hs.vote, hs.commit), (3, 2, 2));
        assert_eq!(store.conf_state.voters, vec![1, 2]);
        assert_eq!(store.members().len(), 2);
        Ok(())
    }

    #[test]
    fn a_crash_between_a_new_segment_and_its_checkpoint_loses_no_state() -> Result<(), Error> {
        let dir = tempfile::tempdir()?;
        let mut store = LogStore::open_with_segments_of(dir.path(), 256)?;
        store.bootstrap(&[peer(1)])?;
        store.set_membership(vec![peer(1)], None)?;
        for i in 2..=20 {
            store.persist_ready(&[entry(i, 1)], None, true)?;
        }
        drop(store);
        // The crash: the next segment exists, empty.
        let last = segment_files(dir.path())?.pop().expect("a segment");
        let seq = u64::from_str_radix(
            last.file_stem().and_then(|s| s.to_str()).expect("a name"),
            16,
        )
        .map_err(|e| Error::Corrupt(e.to_string()))?;
        std::fs::File::create(
            dir.path()
                .join(WAL_DIR)
                .join(format!("{:016x}.wal", seq + 1)),
        )?;
        let mut store = LogStore::open_with_segments_of(dir.path(), 256)?;
        store.persist_ready(&[entry(21, 1)], None, true)?;
        // Every segment before the empty one goes.
        store.compact(21)?;
        drop(store);
        let store = LogStore::open(dir.path())?;
        assert_eq!((store.first_index(), store.last_index()), (22, 21));
        assert_eq!(store.conf_state.voters, vec![1]);
        assert_eq!(store.members().len(), 1);
        assert_eq!(store.hard_state().term, 1);
        Ok(())
    }

    #[test]
    fn a_log_kept_on_fjall_is_converted() -> Result<(), Error> {
        let dir = tempfile::tempdir()?;
        {
            let db = fjall::Database::builder(dir.path()).open()?;
            let log = db.keyspace("raft_log", fjall::KeyspaceCreateOptions::default)?;
            let state = db.keyspace("raft_state", fjall::KeyspaceCreateOptions::default)?;
            for i in 1..=6u64 {
                log.insert(i.to_be_bytes(), entry(i, 2).write_to_bytes()?)?;
            }
            let compacted = SnapshotMetadata {
                index: 2,
                term: 2,
                ..Default::default()
            };
            let hs = HardState {
                term: 2,
                vote: 1,
                commit: 5,
                ..Default::default()
            };
            let mut cs = ConfState::default();
            cs.set_voters(vec![1]);
            state.insert(b"compacted", compacted.write_to_bytes()?)?;
            state.insert(b"hard_state", hs.write_to_bytes()?)?;
            state.insert(b"conf_state", cs.write_to_bytes()?)?;
            let members =
                serde_json::to_vec(&[peer(1)]).map_err(|e| Error::Corrupt(e.to_string()))?;
            state.insert(b"members", members)?;
            db.persist(fjall::PersistMode::SyncAll)?;
        }
        for _ in 0..2 {
            let store = LogStore::open(dir.path())?;
            assert_eq!((store.first_index(), store.last_index()), (3, 6));
            assert_eq!(store.term(2).ok(), Some(2));
            assert_eq!(store.hard_state().commit, 5);
            assert_eq!(store.conf_state.voters, vec![1]);
            assert_eq!(store.members().len(), 1);
        }
        let left: Vec<_> = std::fs::read_dir(dir.path())?
            .map(|item| item.map(|i| i.file_name()))
            .collect::<Result<_, _>>()?;
        assert_eq!(left, vec![std::ffi::OsString::from(WAL_DIR)]);
        Ok(())
    }

    #[derive(Clone, Debug)]
    enum Op {
        /// Append `count` entries of `term` at `offset` past the first index
        /// (capped at one past the last).
        Append {
            offset: u64,
            count: u64,
            term: u64,
        },
        Commit(u64),
        /// Compact through `offset` past the first index (capped at the last).
        Compact(u64),
        /// Install a snapshot `past` entries past the last index.
        Snapshot {
            past: u64,
            term: u64,
        },
        Members(u64),
        Reopen,
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            6 => (0..12u64, 1..6u64, 1..4u64)
                .prop_map(|(offset, count, term)| Op::Append { offset, count, term }),
            1 => (0..40u64).prop_map(Op::Commit),
            1 => (0..12u64).prop_map(Op::Compact),
            1 => (0..4u64, 1..4u64).prop_map(|(past, term)| Op::Snapshot { past, term }),
            1 => (1..4u64).prop_map(Op::Members),
            2 => Just(Op::Reopen),
        ]
    }

    /// What the log must hold: (index, term) of every entry, and the state.
    #[derive(Debug, Default, PartialEq)]
    struct Model {
        compacted: (u64, u64),
        entries: Vec<(u64, u64)>,
        commit: u64,
        members: usize,
    }

    fn observe(store: &LogStore) -> Model {
        Model {
            compacted: (store.compacted.index, store.compacted.term),
            entries: store.entries.iter().map(|e| (e.index, e.term)).collect(),
            commit: store.hard_state().commit,
            members: store.members().len(),
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// Whatever was written, in any order, in segments of any size, a
        /// reopened log holds exactly what the open one held.
        #[test]
        fn a_reopened_log_holds_what_was_written(
            ops in proptest::collection::vec(op(), 1..40),
            segment_bytes in 64..600u64,
        ) {
            let dir = tempfile::tempdir()?;
            let mut store = LogStore::open_with_segments_of(dir.path(), segment_bytes)?;
            store.bootstrap(&[])?;
            for op in ops {
                match op {
                    Op::Append { offset, count, term } => {
                        let first = (store.first_index() + offset).min(store.last_index() + 1);
                        let ents: Vec<Entry> =
                            (first..first + count).map(|i| entry(i, term)).collect();
                        store.persist_ready(&ents, None, false)?;
                    }
                    Op::Commit(commit) => {
                        let hs = HardState { term: 1, commit, ..Default::default() };
                        store.persist_ready(&[], Some(&hs), false)?;
                    }
                    Op::Compact(offset) => {
                        let index = (store.first_index() + offset).min(store.last_index());
                        store.compact(index)?;
                    }
                    Op::Snapshot { past, term } => {
                        let meta = SnapshotMetadata {
                            index: store.last_index() + past,
                            term,
                            ..Default::default()
                        };
                        let members = store.members().to_vec();
                        store.apply_snapshot(&meta, members)?;
                    }
                    Op::Members(n) => {
                        store.set_membership((1..=n).map(peer).collect(), None)?;
                    }
                    Op::Reopen => {
                        let before = observe(&store);
                        drop(store);
                        store = LogStore::open_with_segments_of(dir.path(), segment_bytes)?;
                        proptest::prop_assert_eq!(observe(&store), before);
                    }
                }
            }
            let before = observe(&store);
            drop(store);
            let store = LogStore::open(dir.path())?;
            proptest::prop_assert_eq!(observe(&store), before);
        }
    }
}
