//! A group's part of the apply thread ([`super::apply_thread`]): hands
//! committed entries to the state machine in order, wakes their
//! proposers, and has raft apply membership entries in log order.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crossbeam_channel::Sender;
use raft::prelude::{Entry, EntryType};

use super::apply_thread::Applying;
use super::{
    ApplyWork, Command, KIND_MEMBER_UPDATE, STORAGE_FULL_RETRY, Shared, decode_context, guarded,
};
use crate::{Committed, Error, StateMachine, StateMachineStep, StopReason};

/// The log is also made compactable once its entries since the last sync
/// hold this many bytes, whatever `snapshot_count` says: the log keeps
/// them in memory until then, which with large values was the biggest
/// share of a loaded member's memory (100,000 entries of 1 KiB).
const LOG_BYTES_PER_SYNC: u64 = 32 << 20;

pub(super) struct ApplyLoop<S: StateMachine> {
    state_machine: S,
    shared: Arc<Shared<S::Output>>,
    snapshot_count: u64,
    /// The last index the state machine has made durable.
    durable_index: u64,
    /// The bytes of the entries applied since then.
    bytes_since_durable: u64,
    /// Dropped with the state machine: [`super::Node::shutdown`] waits
    /// for that.
    _released: Sender<()>,
}

impl<S: StateMachine> ApplyLoop<S> {
    /// A group's applying, making the state durable and the log
    /// compactable every `snapshot_count` entries (or [`LOG_BYTES_PER_SYNC`]).
    pub(super) fn new(
        state_machine: S,
        shared: Arc<Shared<S::Output>>,
        snapshot_count: u64,
        released: Sender<()>,
    ) -> Self {
        ApplyLoop {
            durable_index: state_machine.applied_index(),
            bytes_since_durable: 0,
            state_machine,
            shared,
            snapshot_count: snapshot_count.max(1),
            _released: released,
        }
    }

    fn apply_work(&mut self, work: Vec<ApplyWork>) -> Result<(), Error> {
        for item in work {
            if self.shared.stopped.load(Ordering::SeqCst) {
                return Ok(());
            }
            match item {
                ApplyWork::Snapshot { index, file } => {
                    let restored = self.state_machine.restore(&file);
                    let _ = std::fs::remove_file(&file);
                    restored.map_err(failed(StateMachineStep::Restore(index)))?;
                    self.durable_index = self.state_machine.applied_index();
                    self.report_applied(index);
                }
                ApplyWork::Entries(batch) => self.apply_entries(batch)?,
            }
        }
        Ok(())
    }

    fn apply_entries(&mut self, batch: Vec<Entry>) -> Result<(), Error> {
        let Some(last) = batch.last().map(|e| e.index) else {
            return Ok(());
        };
        let already_applied = self.state_machine.applied_index();
        let mut committed = Vec::new();
        let mut proposals = Vec::new();
        for entry in batch {
            if entry.index <= already_applied {
                // Replayed, or covered by a snapshot. Membership entries are
                // raft's own and are applied to raft regardless.
                if entry.entry_type != EntryType::EntryNormal || is_member_update(&entry) {
                    self.flush(&mut committed, &mut proposals, None)?;
                    self.apply_membership(entry)?;
                }
                continue;
            }
            match entry.entry_type {
                EntryType::EntryNormal if is_member_update(&entry) => {
                    self.flush(&mut committed, &mut proposals, Some(entry.index - 1))?;
                    self.apply_membership(entry)?;
                }
                EntryType::EntryNormal if !entry.data.is_empty() => {
                    self.bytes_since_durable += entry.data.len() as u64;
                    proposals.push(decode_context(&entry.context));
                    committed.push(Committed {
                        index: entry.index,
                        term: entry.term,
                        data: entry.data,
                    });
                }
                EntryType::EntryNormal => {}
                EntryType::EntryConfChange => {
                    return Err(Error::Corrupt(format!(
                        "entry {} is a v1 conf change, which Cairn never proposes",
                        entry.index
                    )));
                }
                EntryType::EntryConfChangeV2 => {
                    self.flush(&mut committed, &mut proposals, Some(entry.index - 1))?;
                    self.apply_membership(entry)?;
                }
            }
        }
        self.flush(&mut committed, &mut proposals, Some(last))?;
        self.report_applied(last);
        if last.saturating_sub(self.durable_index) >= self.snapshot_count
            || self.bytes_since_durable >= LOG_BYTES_PER_SYNC
        {
            self.bytes_since_durable = 0;
            self.state_machine
                .sync()
                .map_err(failed(StateMachineStep::Sync(last)))?;
            // A state machine may hold entries it has not applied yet (a
            // shard replica waits for their revisions): the log keeps them.
            self.durable_index = self.state_machine.applied_index();
            let _ = self
                .shared
                .commands
                .send(Command::CompactLog(self.durable_index));
        }
        Ok(())
    }

    /// Applies the collected state-machine entries, recording `applied_index`
    /// (when given) with them, and wakes their proposers.
    fn flush(
        &mut self,
        committed: &mut Vec<Committed>,
        proposals: &mut Vec<Option<(u8, u64, u64)>>,
        applied_index: Option<u64>,
    ) -> Result<(), Error> {
        let Some(applied_index) = applied_index else {
            return Ok(());
        };
        if committed.is_empty() && applied_index <= self.state_machine.applied_index() {
            return Ok(());
        }
        let outputs = self.apply_until_room(committed, applied_index)?;
        {
            let mut waiters = self.shared.waiters.lock();
            for (proposal, output) in proposals.iter().zip(outputs) {
                let Some((_, proposer, seq)) = proposal else {
                    continue;
                };
                if *proposer != self.shared.id {
                    continue;
                }
                if let Some(waiter) = waiters.remove(seq) {
                    let _ = waiter.send(Ok(output));
                }
            }
        }
        committed.clear();
        proposals.clear();
        Ok(())
    }

    /// Applies `committed`; when the state machine finds the disk full, waits
    /// and tries again (it applies a batch whole or not at all, recording
    /// the applied index with it), so a full disk pauses applying rather
    /// than stop the member.
    fn apply_until_room(
        &mut self,
        committed: &[Committed],
        applied_index: u64,
    ) -> Result<Vec<S::Output>, Error> {
        let mut warned = false;
        loop {
            match self
                .state_machine
                .apply(committed, applied_index)
                .map_err(failed(StateMachineStep::Apply(applied_index)))
            {
                Err(e) if e.is_storage_full() && !self.shared.stopped.load(Ordering::SeqCst) => {
                    if !warned {
                        tracing::error!("applying paused until space returns: {e}");
                        warned = true;
                    }
                    std::thread::sleep(STORAGE_FULL_RETRY);
                }
                Ok(outputs) if warned => {
                    tracing::info!(applied_index, "applying again: space came back");
                    return Ok(outputs);
                }
                other => return other,
            }
        }
    }

    /// Has the raft thread apply a membership entry, and waits: the registry
    /// and conf state must be stored before the state machine records an
    /// applied index past the entry, since raft never replays below it.
    fn apply_membership(&self, entry: Entry) -> Result<(), Error> {
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        self.shared
            .commands
            .send(Command::ApplyMembership {
                index: entry.index,
                entry,
                done: done_tx,
            })
            .map_err(|_| Error::Stopped)?;
        done_rx.recv().map_err(|_| Error::Stopped)
    }

    fn report_applied(&self, index: u64) {
        self.shared.applied.send_if_modified(|a| {
            let changed = *a < index;
            *a = (*a).max(index);
            changed
        });
        let _ = self.shared.commands.send(Command::Applied(index));
    }
}

impl<S: StateMachine> Applying for ApplyLoop<S> {
    fn apply(&mut self, work: Vec<ApplyWork>) -> bool {
        if let Err(reason) = guarded(|| self.apply_work(work)) {
            // A failure stops its own group only.
            self.shared.stop(StopReason::Failed(reason));
        }
        !self.shared.stopped.load(Ordering::SeqCst)
    }
}

fn is_member_update(entry: &Entry) -> bool {
    entry.entry_type == EntryType::EntryNormal && entry.context.first() == Some(&KIND_MEMBER_UPDATE)
}

/// Wraps a state machine's own error, keeping it as the source.
fn failed<E: std::error::Error + Send + Sync + 'static>(
    during: StateMachineStep,
) -> impl FnOnce(E) -> Error {
    move |e| Error::StateMachine {
        during,
        source: Box::new(e),
    }
}
