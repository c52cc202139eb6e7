//! What the raft thread needs of its log storage, as a trait: raft-rs's
//! [`raft::Storage`] for reads, plus the writes a Ready, a compaction, a
//! snapshot and a membership change make.
//!
//! Writing a Ready is two steps, [`RaftLog::append`] then
//! [`RaftLog::flush`], so that a log shared by many raft groups (one WAL,
//! as TiKV's raft-engine) can take every group's Ready of a round and fsync
//! once for all of them. [`crate::storage::LogStore`] is the production
//! implementation, on a WAL of segment files of its own (one group) or on
//! its group's share of a [`crate::SharedRaftLog`] (many groups, one WAL,
//! fsyncs shared by group commit).

use raft::prelude::{ConfState, Entry, HardState, SnapshotMetadata};

use crate::{Error, PeerInfo};

/// The durable raft log of one raft group. The raft thread owns it (inside
/// raft-rs's `RawNode`), so calls are never concurrent.
pub(crate) trait RaftLog: raft::Storage + Send + 'static {
    /// True for a log that was never bootstrapped nor joined a cluster.
    fn is_new(&self) -> bool;

    /// Starts a new cluster's log the way every initial member does, so
    /// that all of them hold the same first entries: one membership change
    /// per initial member, committed at term 1. Durable on return.
    fn bootstrap(&mut self, members: &[PeerInfo]) -> Result<(), Error>;

    fn hard_state(&self) -> &HardState;

    /// Stages a Ready's entries (any conflicting suffix gives way to them)
    /// and its new hard state. Nothing is durable before [`Self::flush`].
    fn append(&mut self, entries: &[Entry], hard_state: Option<&HardState>) -> Result<(), Error>;

    /// Writes what was staged, and fsyncs it when `sync` (raft's
    /// `must_sync`): the Ready's persisted messages go out after this. On
    /// a log shared by several groups this writes and syncs what every
    /// group staged and handed over ([`Self::hand_over`]).
    fn flush(&mut self, sync: bool) -> Result<(), Error>;

    /// Hands what was staged to the log's writer without writing it, so
    /// that the next [`Self::flush`] of any group sharing the log writes
    /// every group's Ready in one write (a log of one group writes it with
    /// its next flush anyway).
    fn hand_over(&mut self) -> Result<(), Error>;

    /// [`Self::append`] and [`Self::flush`] in one.
    fn persist_ready(
        &mut self,
        entries: &[Entry],
        hard_state: Option<&HardState>,
        sync: bool,
    ) -> Result<(), Error> {
        self.append(entries, hard_state)?;
        self.flush(sync)
    }

    /// Notes a new commit index, written with the next append: it need not
    /// be durable, since raft learns it again from the log and its peers,
    /// and a restart raises it to what the state machine applied. Writing it
    /// at once would put a write on every commit's way to the apply thread.
    fn note_commit(&mut self, commit: u64);

    /// Records a new commit index now (not fsynced).
    fn set_commit(&mut self, commit: u64) -> Result<(), Error>;

    /// The applied index raft knows of: what a snapshot sent now reflects
    /// at least.
    fn set_applied(&mut self, applied: u64);

    /// Drops entries up to and including `index`, durably. The caller
    /// guarantees the state machine has durably applied them.
    fn compact(&mut self, index: u64) -> Result<(), Error>;

    /// Replaces the log with a snapshot's point: every entry goes, the log
    /// resumes after `meta.index`, with the snapshot's conf state and
    /// `members`. Durable on return.
    fn apply_snapshot(
        &mut self,
        meta: &SnapshotMetadata,
        members: Vec<PeerInfo>,
    ) -> Result<(), Error>;

    /// The member registry as last recorded.
    fn members(&self) -> &[PeerInfo];

    /// Records the member registry and the conf state raft now has,
    /// durably: the registry must never fall behind the state machine's
    /// applied index.
    fn set_membership(
        &mut self,
        members: Vec<PeerInfo>,
        conf_state: Option<ConfState>,
    ) -> Result<(), Error>;
}
