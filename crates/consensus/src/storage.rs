//! The raft log on fjall: entries, hard state and conf state, kept in memory
//! for raft-rs's reads and written through to disk, fsynced before a Ready's
//! persisted messages go out and before anything is acknowledged.

use std::collections::VecDeque;
use std::path::Path;

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use protobuf::Message as _;
use raft::prelude::{
    ConfChangeSingle, ConfChangeType, ConfChangeV2, ConfState, Entry, EntryType, HardState,
    Snapshot, SnapshotMetadata,
};
use raft::{GetEntriesContext, RaftState, StorageError};

use crate::{Error, PeerInfo};

const HARD_STATE: &[u8] = b"hard_state";
const CONF_STATE: &[u8] = b"conf_state";
/// Index and term of the last entry dropped by log compaction.
const COMPACTED: &[u8] = b"compacted";
/// The member registry (JSON), kept beside the conf state it describes.
const MEMBERS: &[u8] = b"members";

pub(crate) struct LogStore {
    db: Database,
    log: Keyspace,
    state: Keyspace,
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
    pub(crate) fn open(dir: &Path) -> Result<Self, Error> {
        let db = Database::builder(dir).manual_journal_persist(true).open()?;
        let log = db.keyspace("raft_log", KeyspaceCreateOptions::default)?;
        let state = db.keyspace("raft_state", KeyspaceCreateOptions::default)?;
        let mut store = LogStore {
            db,
            log,
            state,
            hard_state: HardState::default(),
            conf_state: ConfState::default(),
            compacted: SnapshotMetadata::default(),
            entries: VecDeque::new(),
            members: Vec::new(),
            applied: 0,
        };
        if let Some(bytes) = store.state.get(CONF_STATE)? {
            store.load(&bytes)?;
        }
        Ok(store)
    }

    /// True for a log that was never bootstrapped nor joined a cluster.
    pub(crate) fn is_new(&self) -> bool {
        self.last_index() == 0 && self.hard_state.term == 0 && self.conf_state.voters.is_empty()
    }

    /// Starts a new cluster's log the way every initial member does, so that
    /// all of them hold the same first entries: one membership change per
    /// initial member (a member joining later replays them and learns the
    /// cluster), committed at term 1.
    pub(crate) fn bootstrap(&mut self, members: &[PeerInfo]) -> Result<(), Error> {
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
        self.state
            .insert(CONF_STATE, self.conf_state.write_to_bytes()?)?;
        self.persist_ready(&entries, Some(&hs), true)
    }

    pub(crate) fn members(&self) -> &[PeerInfo] {
        &self.members
    }

    /// Records the member registry and the conf state raft now has.
    pub(crate) fn set_membership(
        &mut self,
        members: Vec<PeerInfo>,
        conf_state: Option<ConfState>,
    ) -> Result<(), Error> {
        let mut batch = self.db.batch();
        if let Some(cs) = conf_state {
            batch.insert(&self.state, CONF_STATE, cs.write_to_bytes()?);
            self.conf_state = cs;
        }
        self.commit_with_members(batch, members)
    }

    /// Commits `batch` together with the member registry, durably: the
    /// registry must never fall behind the state machine's applied index.
    fn commit_with_members(
        &mut self,
        mut batch: fjall::OwnedWriteBatch,
        members: Vec<PeerInfo>,
    ) -> Result<(), Error> {
        let json = serde_json::to_vec(&members).map_err(|e| Error::Corrupt(e.to_string()))?;
        batch.insert(&self.state, MEMBERS, json);
        self.members = members;
        batch.commit()?;
        self.db.persist(PersistMode::SyncData)?;
        Ok(())
    }

    pub(crate) fn set_applied(&mut self, applied: u64) {
        self.applied = applied;
    }

    /// Replaces the log with a snapshot's point: every entry goes, the log
    /// resumes after `meta.index`.
    pub(crate) fn apply_snapshot(
        &mut self,
        meta: &SnapshotMetadata,
        members: Vec<PeerInfo>,
    ) -> Result<(), Error> {
        let mut batch = self.db.batch();
        for index in self.first_index()..=self.last_index() {
            batch.remove(&self.log, index.to_be_bytes());
        }
        self.entries.clear();
        self.compacted = meta.clone();
        self.compacted.clear_conf_state();
        self.hard_state.commit = self.hard_state.commit.max(meta.index);
        self.conf_state = meta.get_conf_state().clone();
        self.applied = meta.index;
        batch.insert(&self.state, COMPACTED, self.compacted.write_to_bytes()?);
        batch.insert(&self.state, HARD_STATE, self.hard_state.write_to_bytes()?);
        batch.insert(&self.state, CONF_STATE, self.conf_state.write_to_bytes()?);
        self.commit_with_members(batch, members)
    }

    fn load(&mut self, conf_state: &[u8]) -> Result<(), Error> {
        self.conf_state = ConfState::parse_from_bytes(conf_state)?;
        if let Some(bytes) = self.state.get(HARD_STATE)? {
            self.hard_state = HardState::parse_from_bytes(&bytes)?;
        }
        if let Some(bytes) = self.state.get(COMPACTED)? {
            self.compacted = SnapshotMetadata::parse_from_bytes(&bytes)?;
        }
        if let Some(bytes) = self.state.get(MEMBERS)? {
            self.members = serde_json::from_slice(&bytes)
                .map_err(|e| Error::Corrupt(format!("member registry: {e}")))?;
        }
        for item in self.log.iter() {
            let (_, value) = item.into_inner()?;
            let entry = Entry::parse_from_bytes(&value)?;
            if entry.index <= self.compacted.index {
                continue;
            }
            let expected = self.compacted.index + self.entries.len() as u64 + 1;
            if entry.index != expected {
                return Err(Error::Corrupt(format!(
                    "raft log has entry {} where {expected} was expected",
                    entry.index
                )));
            }
            self.entries.push_back(entry);
        }
        Ok(())
    }

    pub(crate) fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    pub(crate) fn first_index(&self) -> u64 {
        self.compacted.index + 1
    }

    pub(crate) fn last_index(&self) -> u64 {
        self.compacted.index + self.entries.len() as u64
    }

    /// Appends entries from a Ready (dropping any conflicting suffix) and the
    /// new hard state, then fsyncs when raft says it must. A commit index
    /// noted since the last write rides along.
    pub(crate) fn persist_ready(
        &mut self,
        entries: &[Entry],
        hard_state: Option<&HardState>,
        sync: bool,
    ) -> Result<(), Error> {
        let mut batch = self.db.batch();
        if let Some(first) = entries.first() {
            let first_new = first.index;
            if first_new <= self.compacted.index {
                return Err(Error::Corrupt(format!(
                    "append at {first_new} below the compacted index {}",
                    self.compacted.index
                )));
            }
            let old_last = self.last_index();
            let keep = (first_new - self.compacted.index - 1) as usize;
            self.entries.truncate(keep);
            for entry in entries {
                batch.insert(
                    &self.log,
                    entry.index.to_be_bytes(),
                    entry.write_to_bytes()?,
                );
                self.entries.push_back(entry.clone());
            }
            for stale in self.last_index() + 1..=old_last {
                batch.remove(&self.log, stale.to_be_bytes());
            }
        }
        if let Some(hs) = hard_state {
            let noted_commit = self.hard_state.commit;
            self.hard_state = hs.clone();
            self.hard_state.commit = hs.commit.max(noted_commit);
        }
        if hard_state.is_some() || !entries.is_empty() {
            batch.insert(&self.state, HARD_STATE, self.hard_state.write_to_bytes()?);
        }
        batch.commit()?;
        if sync {
            self.db.persist(PersistMode::SyncData)?;
        }
        Ok(())
    }

    /// Notes a new commit index, written with the next append: it need not be
    /// durable, since raft learns it again from the log and its peers, and a
    /// restart raises it to what the state machine applied. Writing it here
    /// would put a write on every commit's way to the apply thread.
    pub(crate) fn note_commit(&mut self, commit: u64) {
        self.hard_state.commit = commit;
    }

    /// Records a new commit index now.
    pub(crate) fn set_commit(&mut self, commit: u64) -> Result<(), Error> {
        self.hard_state.commit = commit;
        self.state
            .insert(HARD_STATE, self.hard_state.write_to_bytes()?)?;
        Ok(())
    }

    /// Drops entries up to and including `index`. The caller guarantees the
    /// state machine has durably applied them.
    pub(crate) fn compact(&mut self, index: u64) -> Result<(), Error> {
        if index <= self.compacted.index || index > self.last_index() {
            return Ok(());
        }
        let term = self.term_of(index)?;
        let mut batch = self.db.batch();
        for dropped in self.first_index()..=index {
            batch.remove(&self.log, dropped.to_be_bytes());
        }
        let drop_count = (index - self.compacted.index) as usize;
        self.entries.drain(..drop_count);
        self.compacted.index = index;
        self.compacted.term = term;
        batch.insert(&self.state, COMPACTED, self.compacted.write_to_bytes()?);
        batch.commit()?;
        Ok(())
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

impl raft::Storage for LogStore {
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
        Ok(LogStore::first_index(self))
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(LogStore::last_index(self))
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
    fn append_truncate_compact_and_reopen() -> Result<(), Error> {
        let dir = tempfile::tempdir().map_err(|e| Error::Corrupt(e.to_string()))?;
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
}
