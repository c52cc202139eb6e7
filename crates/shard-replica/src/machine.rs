//! A shard's raft group: its state machine stages writes and applies the
//! batches its log says were sequenced; the replica it keeps is shared with
//! the member's sequencing agent, which reads what is ready.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use cairn_api::mvccpb::Event;
use cairn_consensus::{Committed, Node, SnapshotSource, StateMachine};
use cairn_mvcc::{MvccError, Store};
use cairn_shard::{BatchReady, Revoke, Sequenced, ShardId, TxnDecision, TxnVote};
use parking_lot::Mutex;
use tokio::sync::{Notify, oneshot, watch};

use crate::entry::{EntryError, ShardEntry};
use crate::{Outcome, ReplicaError, ShardReplica, ShardWrite};

/// What applying one shard log entry gives its proposer.
#[derive(Debug)]
pub enum ShardOutput {
    /// A write, staged: its outcome comes once its batch is applied.
    Staged(oneshot::Receiver<Outcome>),
    /// A sequenced batch, applied here (or applied already).
    Applied,
}

/// Why a shard write got no outcome.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Consensus(#[from] cairn_consensus::Error),
    /// The replica dropped the staged write unanswered: it was replaced by
    /// a snapshot, or stopped. The write may still be applied.
    #[error("the shard replica dropped the write before it was sequenced")]
    Dropped,
    #[error("the shard's log answered a write with a batch")]
    Unexpected,
}

/// Why a shard's state machine stopped.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    #[error(transparent)]
    Entry(#[from] EntryError),
    #[error(transparent)]
    Store(#[from] MvccError),
    #[error("restoring a shard snapshot: {0}")]
    Io(#[from] std::io::Error),
}

/// Where a replica tells what it applied (for watchers), in the shard's
/// log order, after it is in the store.
pub trait EventSink: Send + Sync {
    /// A sequenced batch was applied; its events.
    fn applied(&self, batch: &Sequenced, events: Vec<Event>);

    /// `shard`'s part of the revoke at `revision` was applied; its events
    /// (the deletes of its keys of the lease).
    fn revoked(&self, shard: ShardId, revision: i64, events: Vec<Event>);

    /// A snapshot replaced the replica's state: it now holds `shard`'s log
    /// through `applied_index` and its revisions through `revision`, and no
    /// batch reports what the snapshot brought.
    fn restored(&self, shard: ShardId, applied_index: u64, revision: i64);
}

/// One shard's replica on this member, shared by its raft group's state
/// machine and the member's sequencing agent.
pub struct ShardHandle {
    replica: Mutex<ShardReplica>,
    /// Senders of staged writes' outcomes, by shard log index.
    waiting: Mutex<HashMap<u64, oneshot::Sender<Outcome>>>,
    /// The applied index and the last revoke applied, for reads waiting
    /// for them.
    applied: watch::Sender<(u64, i64)>,
    events: Mutex<Option<Arc<dyn EventSink>>>,
    /// Told when the sequencing agent may have work here: a write staged,
    /// a batch applied (the next can go).
    agent: Mutex<Option<Arc<Notify>>>,
}

impl ShardHandle {
    pub fn new(shard: ShardId, store: Store) -> Arc<ShardHandle> {
        let replica = ShardReplica::new(shard, store);
        Arc::new(ShardHandle {
            applied: watch::Sender::new((replica.applied_index(), replica.revoked())),
            replica: Mutex::new(replica),
            waiting: Mutex::new(HashMap::new()),
            events: Mutex::new(None),
            agent: Mutex::new(None),
        })
    }

    /// Wakes `agent` whenever this replica stages a write or applies a
    /// batch.
    pub fn wake_on_work(&self, agent: Arc<Notify>) {
        *self.agent.lock() = Some(agent);
    }

    fn wake_agent(&self) {
        if let Some(agent) = &*self.agent.lock() {
            agent.notify_one();
        }
    }

    /// Hands the events of every batch applied from now on to `sink`.
    pub fn send_events_to(&self, sink: Arc<dyn EventSink>) {
        *self.events.lock() = Some(sink);
    }

    /// Waits until the replica has applied the shard's log through `index`
    /// and the revoke at `revoked`.
    pub async fn wait_applied(&self, index: u64, revoked: i64) {
        let mut applied = self.applied.subscribe();
        // The sender lives as long as `self`.
        let _ = applied
            .wait_for(|(applied, done)| *applied >= index && *done >= revoked)
            .await;
    }

    fn send_progress(&self) {
        let replica = self.replica.lock();
        self.applied
            .send_replace((replica.applied_index(), replica.revoked()));
    }

    /// The state machine of this shard's raft group on this member.
    pub fn machine(self: &Arc<Self>) -> ShardMachine {
        ShardMachine(self.clone())
    }

    pub fn shard(&self) -> ShardId {
        self.replica.lock().shard()
    }

    pub fn applied_index(&self) -> u64 {
        self.replica.lock().applied_index()
    }

    /// The revision of the last revoke this replica applied (0: none).
    pub fn revoked(&self) -> i64 {
        self.replica.lock().revoked()
    }

    /// The replica's store, for reads.
    pub fn store(&self) -> Store {
        self.replica.lock().store().clone()
    }

    /// What the shard leader asks the sequencer for (see
    /// [`ShardReplica::ready`]).
    pub fn ready(
        &self,
        sequenced: u64,
        lease_exists: &dyn Fn(i64) -> bool,
    ) -> Result<Option<BatchReady>, ReplicaError> {
        self.replica.lock().ready(sequenced, lease_exists)
    }

    /// The vote on the cross-shard txn whose prepare is staged next (see
    /// [`ShardReplica::vote`]).
    pub fn vote(
        &self,
        sequenced: u64,
        lease_exists: &dyn Fn(i64) -> bool,
    ) -> Result<Option<TxnVote>, ReplicaError> {
        self.replica.lock().vote(sequenced, lease_exists)
    }

    fn decide(&self, decision: &TxnDecision) -> Result<(), ReplicaError> {
        let Some(decided) = self.replica.lock().decide(decision)? else {
            return Ok(());
        };
        self.send_progress();
        if let Some((revision, events)) = decided.changed
            && let Some(sink) = self.events.lock().clone()
        {
            // Its events are one part of the txn's revision, as a revoke's.
            sink.revoked(decision.shard, revision, events);
        }
        if let Some(sender) = self.waiting.lock().remove(&decided.index) {
            let _ = sender.send(decided.outcome);
        }
        Ok(())
    }

    fn revoke(&self, revoke: &Revoke) -> Result<(), ReplicaError> {
        let Some(events) = self.replica.lock().revoke(revoke)? else {
            return Ok(());
        };
        self.send_progress();
        if let Some(sink) = self.events.lock().clone() {
            sink.revoked(self.shard(), revoke.revision, events);
        }
        Ok(())
    }

    fn apply(&self, batch: &Sequenced) -> Result<(), ReplicaError> {
        let applied = self.replica.lock().apply(batch)?;
        // The marker follows every entry it covers in the log, so they are
        // all staged.
        let Some(applied) = applied else {
            return Err(ReplicaError::Gap {
                shard: batch.shard,
                after: batch.after,
                through: batch.through,
                applied: self.applied_index(),
            });
        };
        self.send_progress();
        if let Some(sink) = self.events.lock().clone() {
            sink.applied(batch, applied.events);
        }
        let mut waiting = self.waiting.lock();
        for (index, outcome) in applied.outcomes {
            if let Some(sender) = waiting.remove(&index) {
                let _ = sender.send(outcome);
            }
        }
        Ok(())
    }
}

/// Proposes `write` to its shard's raft group and waits for its outcome:
/// committed in the shard, sequenced by the cluster group, applied.
pub async fn write(node: &Node<ShardOutput>, write: ShardWrite) -> Result<Outcome, WriteError> {
    stage(node, write).await?.outcome().await
}

/// A write committed in its shard's log and staged on this member.
#[derive(Debug)]
pub struct Staged(oneshot::Receiver<Outcome>);

impl Staged {
    /// Waits for its outcome: sequenced by the cluster group, applied.
    pub async fn outcome(self) -> Result<Outcome, WriteError> {
        self.0.await.map_err(|_| WriteError::Dropped)
    }
}

/// Proposes `write` to its shard's raft group and waits until it is
/// committed and staged here: a cross-shard txn's coordinator tells a
/// prepare lost with a shard's leader (never staged) from one waiting for
/// its decision.
pub async fn stage(node: &Node<ShardOutput>, write: ShardWrite) -> Result<Staged, WriteError> {
    match node.propose(ShardEntry::Write(write).encode()).await? {
        ShardOutput::Staged(outcome) => Ok(Staged(outcome)),
        ShardOutput::Applied => Err(WriteError::Unexpected),
    }
}

/// Announces a sequenced batch in its shard's log, and waits until this
/// member has applied it.
pub async fn announce(
    node: &Node<ShardOutput>,
    batch: Sequenced,
) -> Result<(), cairn_consensus::Error> {
    node.propose(ShardEntry::Sequenced(batch).encode())
        .await
        .map(|_| ())
}

/// Announces a cross-shard txn's decision in its shard's log, and waits
/// until this member has applied it.
pub async fn announce_decision(
    node: &Node<ShardOutput>,
    decision: TxnDecision,
) -> Result<(), cairn_consensus::Error> {
    node.propose(ShardEntry::Decision(decision).encode())
        .await
        .map(|_| ())
}

/// Announces a revoke in its shard's log, and waits until this member has
/// applied it.
pub async fn announce_revoke(
    node: &Node<ShardOutput>,
    revoke: Revoke,
) -> Result<(), cairn_consensus::Error> {
    node.propose(ShardEntry::Revoke(revoke).encode())
        .await
        .map(|_| ())
}

/// Proposes the keyspace's compaction at `revision` to a shard, and waits
/// until this member has applied it.
pub async fn compact(
    node: &Node<ShardOutput>,
    revision: i64,
) -> Result<(), cairn_consensus::Error> {
    node.propose(ShardEntry::Compact(revision).encode())
        .await
        .map(|_| ())
}

/// The raft state machine of a shard: see [`ShardHandle`].
pub struct ShardMachine(Arc<ShardHandle>);

struct StoreSnapshots(Store);

impl SnapshotSource for StoreSnapshots {
    fn write_snapshot(&self, out: &mut dyn std::io::Write) -> std::io::Result<u64> {
        self.0.write_snapshot(out).map_err(std::io::Error::other)
    }
}

impl StateMachine for ShardMachine {
    type Output = ShardOutput;
    type Error = MachineError;

    /// What the store holds: staged writes are not applied, and the log
    /// keeps them for a restart.
    fn applied_index(&self) -> u64 {
        self.0.applied_index()
    }

    fn apply(
        &mut self,
        entries: &[Committed],
        applied_index: u64,
    ) -> Result<Vec<ShardOutput>, MachineError> {
        let mut outputs = Vec::with_capacity(entries.len());
        for entry in entries {
            match ShardEntry::decode(&entry.data)? {
                ShardEntry::Write(write) => {
                    let (sender, receiver) = oneshot::channel();
                    self.0
                        .replica
                        .lock()
                        .stage([(entry.index, write)], entry.index)?;
                    self.0.waiting.lock().insert(entry.index, sender);
                    outputs.push(ShardOutput::Staged(receiver));
                }
                ShardEntry::Sequenced(batch) => {
                    self.0.replica.lock().stage([], entry.index - 1)?;
                    self.0.apply(&batch)?;
                    outputs.push(ShardOutput::Applied);
                }
                ShardEntry::Compact(revision) => {
                    self.0.replica.lock().compact(revision)?;
                    outputs.push(ShardOutput::Applied);
                }
                ShardEntry::Revoke(revoke) => {
                    self.0.revoke(&revoke)?;
                    outputs.push(ShardOutput::Applied);
                }
                ShardEntry::Decision(decision) => {
                    self.0.replica.lock().stage([], entry.index - 1)?;
                    self.0.decide(&decision)?;
                    outputs.push(ShardOutput::Applied);
                }
            }
        }
        self.0.replica.lock().stage([], applied_index)?;
        self.0.wake_agent();
        Ok(outputs)
    }

    fn sync(&mut self) -> Result<(), MachineError> {
        Ok(self.0.store().sync()?)
    }

    fn snapshot_source(&self) -> Arc<dyn SnapshotSource> {
        Arc::new(StoreSnapshots(self.0.store()))
    }

    fn restore(&mut self, file: &Path) -> Result<(), MachineError> {
        let mut input = std::io::BufReader::new(std::fs::File::open(file)?);
        let mut replica = self.0.replica.lock();
        replica.store().restore_snapshot(&mut input)?;
        let store = replica.store().clone();
        *replica = ShardReplica::new(replica.shard(), store.clone());
        let (shard, applied) = (replica.shard(), replica.applied_index());
        drop(replica);
        self.0.send_progress();
        if let Some(sink) = self.0.events.lock().clone() {
            sink.restored(shard, applied, store.current_revision());
        }
        // Staged writes the snapshot covers or replaces go unanswered
        // here; their proposers retry.
        self.0.waiting.lock().clear();
        Ok(())
    }
}
