//! One raft log for all the groups of a member (as TiKV's raft-engine): the
//! groups' records go to one WAL, tagged with their group, so the Readies
//! of every group share its writes and fsyncs. A group's fsync waits for
//! one that is under way to finish and then covers everything written
//! meanwhile (group commit), so N groups syncing at once cost about two
//! fsyncs, not N.
//!
//! Each new segment opens with a checkpoint of every group's state records
//! (hard state, conf state, compaction point, members), so the segments
//! before it can go once no group needs their entries: the oldest closed
//! segments are deleted while every group has compacted past them (or
//! installed a snapshot after them).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use protobuf::Message as _;
use raft::prelude::Entry;

use super::LogWriter;
use super::wal::{self, Kind, Record, Wal};
use crate::Error;
use crate::node::RaftThread;
use crate::raft_transport::GroupId;

/// The state records a group's checkpoint holds, in the order a segment
/// repeats them.
const CHECKPOINT_KINDS: [Kind; 4] = [
    Kind::HardState,
    Kind::ConfState,
    Kind::Compacted,
    Kind::Members,
];

/// The raft log shared by the groups of one member. Each group opens its
/// part of it once (`LogStore::open_in`).
#[derive(Clone)]
pub struct SharedRaftLog {
    inner: Arc<Inner>,
    /// The one raft thread that drives the groups on this log, so that a
    /// round of their Readies shares one fsync.
    raft_thread: RaftThread,
}

struct Inner {
    state: Mutex<State>,
    /// Signalled when an fsync ends.
    synced: Condvar,
}

struct State {
    wal: Wal,
    /// What each group wrote before this process, until it attaches.
    unclaimed: HashMap<GroupId, Vec<Record>>,
    attached: HashSet<GroupId>,
    groups: BTreeMap<GroupId, GroupState>,
    /// Commits written, and how many of them are known synced.
    written: u64,
    synced: u64,
    syncing: bool,
    fsyncs: u64,
}

#[derive(Default)]
struct GroupState {
    /// The group's latest state records, by kind.
    checkpoint: BTreeMap<u8, Vec<u8>>,
    /// For each segment that holds entries of the group the group may
    /// still need: the highest entry index in it.
    max_index: BTreeMap<u64, u64>,
    /// Entries at or below this index are no longer needed.
    released: u64,
}

impl State {
    fn lock(inner: &Inner) -> Result<MutexGuard<'_, State>, Error> {
        inner
            .state
            .lock()
            .map_err(|_| Error::Corrupt("the shared raft log's lock was poisoned".into()))
    }

    /// Starts a new segment with every group's checkpoint, synced.
    fn rotate(&mut self) -> Result<(), Error> {
        self.wal.start_segment()?;
        let mut records = Vec::new();
        for (&group, state) in &self.groups {
            for kind in CHECKPOINT_KINDS {
                if let Some(payload) = state.checkpoint.get(&(kind as u8)) {
                    encode(&mut records, group, kind, payload)?;
                }
            }
        }
        self.wal.push_encoded(&records, 0);
        self.wal.commit(true)?;
        self.synced = self.written;
        self.fsyncs += 2;
        Ok(())
    }

    /// Deletes the closed segments no group needs any more.
    fn remove_unneeded(&mut self) -> Result<(), Error> {
        let mut first_needed = self.wal.current_segment();
        for state in self.groups.values_mut() {
            let released = state.released;
            state.max_index.retain(|_, max| *max > released);
            if let Some((&seq, _)) = state.max_index.iter().next() {
                first_needed = first_needed.min(seq);
            }
        }
        self.wal.remove_segments_before(first_needed)
    }
}

fn encode(buf: &mut Vec<u8>, group: GroupId, kind: Kind, payload: &[u8]) -> Result<(), Error> {
    wal::encode_record(buf, Kind::Group, |out| {
        out.extend_from_slice(&group.to_le_bytes());
        out.push(kind as u8);
        out.extend_from_slice(payload);
        Ok(())
    })
}

impl SharedRaftLog {
    /// Opens (or creates) the shared log in `dir`.
    pub fn open(dir: &Path) -> Result<SharedRaftLog, Error> {
        SharedRaftLog::open_with_segments_of(dir, wal::SEGMENT_BYTES)
    }

    pub(crate) fn open_with_segments_of(
        dir: &Path,
        segment_bytes: u64,
    ) -> Result<SharedRaftLog, Error> {
        let (wal, records) = Wal::open_segmented(dir, segment_bytes)?;
        let mut groups: BTreeMap<GroupId, GroupState> = BTreeMap::new();
        let mut unclaimed: HashMap<GroupId, Vec<Record>> = HashMap::new();
        for (seq, record) in records {
            let Record::Group(group, record) = record else {
                return Err(Error::Corrupt(format!(
                    "{} holds the raft log of one group, not a shared one",
                    dir.display()
                )));
            };
            let state = groups.entry(group).or_default();
            match &*record {
                Record::Entry(entry) => {
                    let max = state.max_index.entry(seq).or_default();
                    *max = (*max).max(entry.index);
                }
                Record::State(Kind::Reset, payload) => {
                    state.max_index.clear();
                    state
                        .checkpoint
                        .insert(Kind::Compacted as u8, payload.clone());
                }
                Record::State(kind, payload) => {
                    state.checkpoint.insert(*kind as u8, payload.clone());
                }
                Record::Group(..) => {
                    return Err(Error::Corrupt("a group record inside another".into()));
                }
            }
            unclaimed.entry(group).or_default().push(*record);
        }
        Ok(SharedRaftLog {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    wal,
                    unclaimed,
                    attached: HashSet::new(),
                    groups,
                    written: 0,
                    synced: 0,
                    syncing: false,
                    fsyncs: 0,
                }),
                synced: Condvar::new(),
            }),
            raft_thread: RaftThread::shared(),
        })
    }

    /// fdatasyncs made so far (each covers every group's writes before it).
    pub fn fsyncs(&self) -> Result<u64, Error> {
        Ok(State::lock(&self.inner)?.fsyncs)
    }

    /// The raft thread of the groups on this log.
    pub(crate) fn raft_thread(&self) -> &RaftThread {
        &self.raft_thread
    }

    /// Group `group`'s writer, and what the group wrote before. A group
    /// opens its part once per opening of the log (what it wrote before is
    /// handed over once).
    pub(crate) fn attach(&self, group: GroupId) -> Result<(GroupWriter, Vec<Record>), Error> {
        let mut state = State::lock(&self.inner)?;
        if !state.attached.insert(group) {
            return Err(Error::Corrupt(format!(
                "raft group {group} is open already in this shared log"
            )));
        }
        state.groups.entry(group).or_default();
        let records = state.unclaimed.remove(&group).unwrap_or_default();
        let writer = GroupWriter {
            log: self.inner.clone(),
            group,
            buf: Vec::new(),
            max_index: 0,
            states: Vec::new(),
            reset: false,
        };
        Ok((writer, records))
    }
}

impl Inner {
    /// Waits until commit `ticket` is on disk, syncing it (and whatever
    /// else was written by then) unless an fsync under way covers it.
    fn sync(&self, ticket: u64) -> Result<(), Error> {
        let mut state = State::lock(self)?;
        loop {
            if state.synced >= ticket {
                return Ok(());
            }
            if !state.syncing {
                break;
            }
            state = self
                .synced
                .wait(state)
                .map_err(|_| Error::Corrupt("the shared raft log's lock was poisoned".into()))?;
        }
        state.syncing = true;
        let target = state.written;
        let file = state.wal.sync_handle();
        drop(state);
        let result = file.and_then(|f| f.sync_data());
        let mut state = State::lock(self)?;
        state.syncing = false;
        if result.is_ok() {
            state.synced = state.synced.max(target);
            state.fsyncs += 1;
        }
        self.synced.notify_all();
        Ok(result?)
    }
}

/// A group's way into the [`SharedRaftLog`]: its records are encoded here
/// and written to the shared WAL on commit.
pub(crate) struct GroupWriter {
    log: Arc<Inner>,
    group: GroupId,
    buf: Vec<u8>,
    /// The highest entry index in `buf`.
    max_index: u64,
    /// State records in `buf`, for the group's checkpoint.
    states: Vec<(Kind, Vec<u8>)>,
    /// `buf` holds a reset: the group's earlier entries are obsolete.
    reset: bool,
}

impl GroupWriter {
    /// Moves the group's records into the WAL's buffer, and notes what its
    /// checkpoint and the segment now hold.
    fn hand_over_to(&mut self, state: &mut State) {
        if self.buf.is_empty() && self.states.is_empty() && !self.reset {
            return;
        }
        let seq = state.wal.current_segment();
        let group = state.groups.entry(self.group).or_default();
        if std::mem::take(&mut self.reset) {
            group.max_index.clear();
        }
        if self.max_index > 0 {
            let max = group.max_index.entry(seq).or_default();
            *max = (*max).max(self.max_index);
        }
        for (kind, payload) in self.states.drain(..) {
            let kind = if kind == Kind::Reset {
                Kind::Compacted
            } else {
                kind
            };
            group.checkpoint.insert(kind as u8, payload);
        }
        state.wal.push_encoded(&self.buf, self.max_index);
        self.buf.clear();
        self.max_index = 0;
    }
}

impl LogWriter for GroupWriter {
    fn push_entry(&mut self, entry: &Entry) -> Result<(), Error> {
        self.max_index = self.max_index.max(entry.index);
        encode(
            &mut self.buf,
            self.group,
            Kind::Entry,
            &entry.write_to_bytes()?,
        )
    }

    fn push(&mut self, kind: Kind, message: &impl protobuf::Message) -> Result<(), Error> {
        self.push_bytes(kind, &message.write_to_bytes()?)
    }

    fn push_bytes(&mut self, kind: Kind, payload: &[u8]) -> Result<(), Error> {
        encode(&mut self.buf, self.group, kind, payload)?;
        if kind == Kind::Reset {
            self.reset = true;
            self.max_index = 0;
        }
        self.states.push((kind, payload.to_vec()));
        Ok(())
    }

    fn commit(&mut self, sync: bool) -> Result<(), Error> {
        let log = self.log.clone();
        let ticket = {
            let mut state = State::lock(&log)?;
            self.hand_over_to(&mut state);
            // Records a failed write (a full disk) left in the WAL's buffer,
            // and those other groups handed over, anyone's, go with this
            // one, and a retry finds them there.
            if state.wal.has_unwritten() {
                state.wal.commit(false)?;
                state.written += 1;
            }
            if state.wal.segment_full() {
                state.rotate()?;
            }
            state.written
        };
        if sync {
            log.sync(ticket)?;
        }
        Ok(())
    }

    fn hand_over(&mut self) -> Result<(), Error> {
        let log = self.log.clone();
        let mut state = State::lock(&log)?;
        self.hand_over_to(&mut state);
        Ok(())
    }

    /// The shared log starts its segments itself, when full.
    fn segment_full(&self) -> bool {
        false
    }

    fn start_segment(&mut self) -> Result<(), Error> {
        Ok(())
    }

    fn remove_segments(&mut self, index: u64, _all: bool) -> Result<(), Error> {
        let mut state = State::lock(&self.log)?;
        let group = state.groups.entry(self.group).or_default();
        group.released = group.released.max(index);
        state.remove_unneeded()
    }
}

#[cfg(test)]
#[path = "shared_tests.rs"]
mod tests;
