//! One replica of one shard's data (design: `docs/sharding.md`).
//!
//! A shard's writes are committed in the shard's own raft log, but they
//! take their revisions from the cluster group's [`Sequencer`], which
//! orders the batches of every shard into one dense sequence. So a replica
//! holds what its shard's log has committed as *staged* entries until the
//! cluster group has sequenced them, then applies each sequenced batch to
//! its mvcc store at the revisions it was given.
//!
//! Two things make that work without gaps or double use of a revision:
//!
//! - The shard leader learns how many revisions a batch takes by running
//!   it, without committing, against the store and the staged entries
//!   before it ([`ShardReplica::ready`]). Running the same entries on the
//!   same state gives the same count on every replica, so when a replica
//!   applies the batch ([`ShardReplica::apply`]) it takes exactly the
//!   revisions the sequencer set aside; a replica that would take others
//!   stops with [`ReplicaError::Diverged`] rather than write wrong data.
//! - The store records the last applied shard-log index with the batch, so
//!   a restarted replica stages again only what follows it, and a batch
//!   sequenced before the restart is applied once.
//!
//! ```
//! use cairn_api::etcdserverpb::PutRequest;
//! use cairn_shard::{Sequencer};
//! use cairn_shard_replica::{ShardReplica, ShardWrite};
//!
//! let dir = tempfile::tempdir()?;
//! let mut replica = ShardReplica::new(0, cairn_mvcc::Store::open(dir.path())?);
//! let put = PutRequest { key: "a".into(), value: "1".into(), ..Default::default() };
//! replica.stage([(1, ShardWrite::Put(put))], 1)?;
//!
//! // The shard leader asks the cluster group for revisions...
//! let mut sequencer = Sequencer::new(1, 1)?;
//! let no_leases = |_| false;
//! let ready = replica.ready(sequencer.sequenced_through(0).unwrap_or(0), &no_leases)?.expect("a batch");
//! // ...which every replica applies once it is sequenced.
//! let sequenced = sequencer.sequence(&[ready], &no_leases);
//! let applied = replica.apply(&sequenced[0])?.expect("staged");
//! assert_eq!(applied.outcomes[0].1.as_ref().map(|r| r.revision()).ok(), Some(2));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! [`Sequencer`]: cairn_shard::Sequencer

mod agent;
mod entry;
mod machine;
mod read;
mod xtxn;

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};

use cairn_api::cairnpb::CrossTxn;
use cairn_api::etcdserverpb::request_op::Request;
use cairn_api::etcdserverpb::{
    DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse, RequestOp, ResponseHeader,
    TxnRequest, TxnResponse,
};
use cairn_api::mvccpb::Event;
use cairn_mvcc::{MvccError, Store, WriteBatch};
use cairn_shard::{BatchReady, Revoke, Sequenced, ShardId};

pub use agent::{Agent, LeaseExists, LocalShard};
pub use entry::{EntryError, ShardEntry};
pub use machine::{
    EventSink, MachineError, ShardHandle, ShardMachine, ShardOutput, Staged, WriteError, announce,
    announce_decision, announce_revoke, compact, stage, write,
};
pub use read::{ReadPoint, merge, range, read_shard};
pub use xtxn::{Attempt, Decided, NestedTxn, attempt, merge_txn, participants};

/// A write that a shard's log carries: every key it names is in the shard,
/// but for a cross-shard txn's, of which the shard does its part.
#[derive(Debug, Clone, PartialEq)]
pub enum ShardWrite {
    Put(PutRequest),
    DeleteRange(DeleteRangeRequest),
    Txn(TxnRequest),
    CrossTxn(CrossTxn),
}

/// What a [`ShardWrite`] answers once applied.
#[derive(Debug, Clone, PartialEq)]
pub enum WriteResponse {
    Put(PutResponse),
    DeleteRange(DeleteRangeResponse),
    /// A txn's response; of a cross-shard txn, this shard's part.
    Txn(TxnResponse),
    /// A cross-shard txn was aborted: nothing of it took effect.
    Aborted,
}

impl WriteResponse {
    /// The header's revision: the whole keyspace's revision after the write.
    pub fn revision(&self) -> i64 {
        self.header().map_or(0, |h| h.revision)
    }

    fn header(&self) -> Option<&ResponseHeader> {
        match self {
            WriteResponse::Put(r) => r.header.as_ref(),
            WriteResponse::DeleteRange(r) => r.header.as_ref(),
            WriteResponse::Txn(r) => r.header.as_ref(),
            WriteResponse::Aborted => None,
        }
    }
}

/// One entry's result: its response, or etcd's error for it (the entry
/// then changed nothing).
pub type Outcome = Result<WriteResponse, MvccError>;

/// A sequenced batch applied: each entry's outcome by shard-log index, and
/// the events of its writes in revision order, for watchers.
#[derive(Debug)]
pub struct AppliedBatch {
    pub outcomes: Vec<(u64, Outcome)>,
    pub events: Vec<Event>,
}

/// Why a replica cannot go on: each is a broken invariant of the protocol,
/// or the store failing; the replica must stop rather than guess.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error(transparent)]
    Store(#[from] MvccError),
    #[error("shard {shard}: entry {index} staged after entry {last}")]
    OutOfOrder {
        shard: ShardId,
        index: u64,
        last: u64,
    },
    #[error("shard {shard}: batch {after}..={through} does not follow the applied entry {applied}")]
    Gap {
        shard: ShardId,
        after: u64,
        through: u64,
        applied: u64,
    },
    #[error(
        "shard {shard}: the sequencer has entries through {sequenced}, but {applied} are applied"
    )]
    SequencerBehind {
        shard: ShardId,
        sequenced: u64,
        applied: u64,
    },
    #[error(
        "shard {shard}: batch {after}..={through} took {taken} revisions where the sequencer gave {given}"
    )]
    Diverged {
        shard: ShardId,
        after: u64,
        through: u64,
        taken: u64,
        given: u64,
    },
    #[error("shard {shard}: a batch of shard {other} was given to it")]
    WrongShard { shard: ShardId, other: ShardId },
    #[error(
        "shard {shard}: a txn decision for entry {index}, which is not the prepare staged next"
    )]
    NotPrepared { shard: ShardId, index: u64 },
}

/// The state record of a shard's store that holds the revision of the last
/// revoke it applied.
const REVOKED_RECORD: &[u8] = b"revoked";

/// The revision of the last revoke `store` applied (0: none).
pub fn revoked_through(store: &Store) -> i64 {
    store
        .state_records(REVOKED_RECORD)
        .ok()
        .and_then(|records| records.into_iter().find(|(key, _)| key == REVOKED_RECORD))
        .and_then(|(_, value)| value.try_into().ok())
        .map_or(0, i64::from_be_bytes)
}

/// One replica of one shard: its store, and the committed entries of the
/// shard's log that are not applied yet.
pub struct ShardReplica {
    shard: ShardId,
    store: Store,
    /// The revision of the last revoke applied (kept in the store).
    revoked: i64,
    /// Committed entries after the applied index, in log order.
    staged: VecDeque<(u64, ShardWrite)>,
    /// The shard-log index through which every committed entry is staged
    /// (entries without a write leave no staged entry but count here).
    delivered: u64,
}

impl ShardReplica {
    /// The replica of `shard` kept in `store`, resuming after the store's
    /// applied index: the shard's log delivers again what follows it.
    pub fn new(shard: ShardId, store: Store) -> ShardReplica {
        let delivered = store.applied_index();
        ShardReplica {
            shard,
            revoked: revoked_through(&store),
            store,
            staged: VecDeque::new(),
            delivered,
        }
    }

    pub fn shard(&self) -> ShardId {
        self.shard
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The last shard-log index whose write is in the store.
    pub fn applied_index(&self) -> u64 {
        self.store.applied_index()
    }

    /// The revision of the last revoke this replica applied (0: none).
    pub fn revoked(&self) -> i64 {
        self.revoked
    }

    /// The last shard-log index delivered: staged or applied.
    pub fn delivered_index(&self) -> u64 {
        self.delivered
    }

    /// Stages committed `entries` of the shard's log, in order; the log is
    /// then delivered through `through`. Entries at or below the applied
    /// index (a log replayed after a restart) are skipped.
    pub fn stage(
        &mut self,
        entries: impl IntoIterator<Item = (u64, ShardWrite)>,
        through: u64,
    ) -> Result<(), ReplicaError> {
        let applied = self.applied_index();
        for (index, write) in entries {
            if index <= applied {
                continue;
            }
            let last = self.staged.back().map_or(applied, |(i, _)| *i);
            if index <= last {
                return Err(ReplicaError::OutOfOrder {
                    shard: self.shard,
                    index,
                    last,
                });
            }
            self.staged.push_back((index, write));
        }
        self.delivered = self.delivered.max(through);
        Ok(())
    }

    /// Drops the shard's revisions older than the keyspace's `revision`
    /// (all but each key's newest at it). A replica that has not applied
    /// every batch through `revision` yet compacts what it has, which is
    /// at most what was asked. Compacting again at or below what was
    /// compacted does nothing (a log replayed after a restart).
    pub fn compact(&mut self, revision: i64) -> Result<(), ReplicaError> {
        let at = revision.min(self.store.current_revision());
        if at <= self.store.compact_revision() {
            return Ok(());
        }
        let mut write = self.store.write();
        write.compact(at)?;
        // The applied index stays: staged writes before this entry are
        // delivered again after a restart.
        write.commit(self.applied_index())?;
        Ok(())
    }

    /// What the shard leader asks the cluster group to sequence: the staged
    /// entries after `sequenced` (the last index the sequencer has for this
    /// shard) and how many revisions they take. None when no write came
    /// after it. Changes nothing: the entries run against the store and the
    /// staged entries before them, and are dropped. Puts naming a lease
    /// take `lease_exists` (the cluster group's lessor as this member has
    /// it) for whether it exists; the batch lists what they found, and the
    /// keys whose lease it changes.
    pub fn ready(
        &self,
        sequenced: u64,
        lease_exists: &dyn Fn(i64) -> bool,
    ) -> Result<Option<BatchReady>, ReplicaError> {
        let applied = self.applied_index();
        if sequenced < applied {
            return Err(ReplicaError::SequencerBehind {
                shard: self.shard,
                sequenced,
                applied,
            });
        }
        // A batch ends right before a cross-shard txn's prepare: the txn is
        // decided on the shard's state with everything before it applied.
        let prepare = self
            .staged
            .iter()
            .find(|(_, write)| matches!(write, ShardWrite::CrossTxn(_)))
            .map(|(index, _)| *index);
        let before = |index: u64| prepare.is_none_or(|p| index < p);
        // Only writes need sequencing: entries of the log's own (the
        // announcements of earlier batches among them) just ride along.
        if !self
            .staged
            .iter()
            .any(|(index, _)| *index > sequenced && before(*index))
        {
            return Ok(None);
        }
        // Each lease is looked up once, so the whole batch sees one answer.
        let found = RefCell::new(BTreeMap::new());
        let exists = |id: i64| {
            *found
                .borrow_mut()
                .entry(id)
                .or_insert_with(|| lease_exists(id))
        };
        let mut batch = self.store.write();
        let mut revisions = 0;
        for (index, write) in self.staged.iter().take_while(|(index, _)| before(*index)) {
            let before = batch.current_revision();
            // An entry that fails takes no revision, and fails the same
            // way when the batch is applied.
            let _ = run(&mut batch, write, &exists);
            if *index > sequenced {
                revisions += (batch.current_revision() - before) as u64;
            }
        }
        let attach = batch
            .lease_changes()
            .into_iter()
            .map(|(key, lease)| (key.to_vec(), lease))
            .collect();
        let (leases, missing): (Vec<_>, Vec<_>) = found
            .into_inner()
            .into_iter()
            .partition(|(_, found)| *found);
        Ok(Some(BatchReady {
            shard: self.shard,
            after: sequenced,
            through: prepare.map_or(self.delivered, |p| p - 1),
            revisions,
            leases: leases.into_iter().map(|(id, _)| id).collect(),
            missing: missing.into_iter().map(|(id, _)| id).collect(),
            attach,
            revoked: self.revoked,
        }))
    }

    /// Deletes this shard's keys of a revoked lease at the revoke's
    /// revision. None when it was applied already (an announcement made
    /// twice, or a log replayed after a restart); else the deletes' events.
    pub fn revoke(&mut self, revoke: &Revoke) -> Result<Option<Vec<Event>>, ReplicaError> {
        if revoke.revision <= self.revoked {
            return Ok(None);
        }
        let deletes = TxnRequest {
            compare: Vec::new(),
            success: revoke
                .keys
                .iter()
                .map(|key| RequestOp {
                    request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
                        key: key.clone().into(),
                        ..Default::default()
                    })),
                })
                .collect(),
            failure: Vec::new(),
        };
        let mut write = self.store.write();
        write.skip_to(revoke.revision)?;
        write.txn(&deletes)?;
        write.put_state_record(
            REVOKED_RECORD.to_vec(),
            revoke.revision.to_be_bytes().to_vec(),
        );
        // The applied index stays: staged writes before this entry are
        // sequenced after it, and delivered again after a restart.
        let events = write.commit(self.applied_index())?;
        self.revoked = revoke.revision;
        Ok(Some(events))
    }

    /// Applies a batch the cluster group sequenced, at its revisions. None
    /// when its entries are not all delivered yet (apply it again after
    /// staging more); an empty batch when it was applied already.
    pub fn apply(&mut self, batch: &Sequenced) -> Result<Option<AppliedBatch>, ReplicaError> {
        if batch.shard != self.shard {
            return Err(ReplicaError::WrongShard {
                shard: self.shard,
                other: batch.shard,
            });
        }
        let applied = self.applied_index();
        if batch.through <= applied {
            return Ok(Some(AppliedBatch {
                outcomes: Vec::new(),
                events: Vec::new(),
            }));
        }
        if batch.after != applied {
            return Err(ReplicaError::Gap {
                shard: self.shard,
                after: batch.after,
                through: batch.through,
                applied,
            });
        }
        if self.delivered < batch.through {
            return Ok(None);
        }
        let mut write = self.store.write();
        // Every request runs where the sequence puts it, so that what it
        // reads and the revisions its headers report are the whole
        // keyspace's, even in a batch that writes nothing.
        let base = batch.first_revision - 1;
        write.skip_to(batch.first_revision)?;
        let mut outcomes = Vec::new();
        // The leases its dry run found, which held where it was sequenced.
        let exists = |id: i64| batch.leases.contains(&id);
        for (index, entry) in self.staged.iter().take_while(|(i, _)| *i <= batch.through) {
            outcomes.push((*index, run(&mut write, entry, &exists)));
        }
        let taken = (write.current_revision() - base) as u64;
        if taken != batch.revisions {
            return Err(ReplicaError::Diverged {
                shard: self.shard,
                after: batch.after,
                through: batch.through,
                taken,
                given: batch.revisions,
            });
        }
        let events = write.commit(batch.through)?;
        self.staged.drain(..outcomes.len());
        Ok(Some(AppliedBatch { outcomes, events }))
    }
}

fn run(
    batch: &mut WriteBatch<'_>,
    write: &ShardWrite,
    lease_exists: &dyn Fn(i64) -> bool,
) -> Outcome {
    Ok(match write {
        ShardWrite::Put(req) => WriteResponse::Put(batch.put_checked(req, lease_exists)?),
        ShardWrite::DeleteRange(req) => WriteResponse::DeleteRange(batch.delete_range(req)?),
        ShardWrite::Txn(req) => WriteResponse::Txn(batch.txn_checked(req, lease_exists)?),
        // Never in a batch: batches end before a prepare.
        ShardWrite::CrossTxn(_) => WriteResponse::Aborted,
    })
}

#[cfg(test)]
mod cluster_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod xtxn_tests;
