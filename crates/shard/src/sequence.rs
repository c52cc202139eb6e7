//! Dense global revisions for writes committed in many shards: the
//! sequencer's state (kept by the cluster group, which orders batches) and
//! the view a shard replica or a watch keeps of what was sequenced.
//!
//! A shard commits its writes in its own raft log; its leader evaluates
//! them in log order and so knows how many revisions each entry takes.
//! It then asks the cluster group to sequence "entries `after`+1 through
//! `through`, taking `revisions` revisions". The cluster group applies such
//! requests in its log order through a [`Sequencer`], which gives each
//! accepted batch the next revisions. A batch is accepted only if it starts
//! where the shard's last sequenced batch ended, so a new shard leader that
//! re-sends what its predecessor may have sent gets no revision twice, and
//! no revision is given to anything not committed: revisions stay dense.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{ShardError, ShardId};

/// A shard's committed writes, ready for revisions: the shard's log entries
/// after `after` through `through`, which take `revisions` revisions (an
/// entry that writes nothing, such as a failed compare, takes none).
///
/// Leases are the cluster group's, so a batch that names any says what its
/// dry run found of them, and is sequenced only where that still holds:
/// every lease in `leases` exists there, none in `missing` does, and the
/// shard had applied every revoke sequenced before it (`revoked`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchReady {
    pub shard: ShardId,
    pub after: u64,
    pub through: u64,
    pub revisions: u64,
    /// The leases the batch's puts found and rely on.
    pub leases: Vec<i64>,
    /// The leases the batch's puts found missing (those puts failed).
    pub missing: Vec<i64>,
    /// The keys whose lease the batch changes, with their new lease (0:
    /// none, or the key is deleted).
    pub attach: Vec<(Vec<u8>, i64)>,
    /// The revision of the last revoke the shard had applied.
    pub revoked: i64,
}

/// A batch the sequencer accepted: its shard entries and its first
/// revision (when it takes any).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sequenced {
    pub shard: ShardId,
    pub after: u64,
    pub through: u64,
    /// The revision of the batch's first write; the batch's writes take
    /// `first_revision` .. `first_revision + revisions`.
    pub first_revision: i64,
    pub revisions: u64,
    /// The leases that exist for the batch's puts (every other is
    /// missing): what its dry run found, which held where it was sequenced.
    #[serde(default)]
    pub leases: Vec<i64>,
}

/// A lease revoked with keys on a shard: the shard deletes them at
/// `revision`, the one revision of the whole revoke.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revoke {
    pub revision: i64,
    pub lease: i64,
    pub keys: Vec<Vec<u8>>,
}

impl Sequenced {
    /// The revision after the batch's last one.
    pub fn end_revision(&self) -> i64 {
        self.first_revision + self.revisions as i64
    }
}

/// The cluster group's sequencing state: the store's current revision, and
/// for each shard the last log index sequenced and the last batch (which a
/// new shard leader may have to announce in the shard's log again).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sequencer {
    revision: i64,
    sequenced: Vec<u64>,
    last: Vec<Option<Sequenced>>,
    /// The keyspace's compact revision: older revisions are gone.
    #[serde(default)]
    compacted: i64,
    /// By shard: revokes the shard may not have applied yet (no batch run
    /// after them was sequenced), which its leader announces.
    #[serde(default)]
    revokes: Vec<Vec<Revoke>>,
    /// By shard: the revision of its last revoke (0: none).
    #[serde(default)]
    last_revoke: Vec<i64>,
    /// Cross-shard txns being decided, and decisions to announce.
    #[serde(default)]
    txns: xtxn::CrossTxns,
}

/// Why a compaction was refused, as etcd's mvcc refuses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CompactRefused {
    #[error("mvcc: required revision has been compacted")]
    Compacted,
    #[error("mvcc: required revision is a future revision")]
    FutureRevision,
}

impl Sequencer {
    /// A store of `shards` shards whose current revision is `revision`
    /// (1 for a new store, as etcd's).
    pub fn new(shards: u32, revision: i64) -> Result<Sequencer, ShardError> {
        crate::Keyspace::new(shards)?;
        Ok(Sequencer {
            revision,
            sequenced: vec![0; shards as usize],
            last: vec![None; shards as usize],
            compacted: 0,
            revokes: vec![Vec::new(); shards as usize],
            last_revoke: vec![0; shards as usize],
            txns: xtxn::CrossTxns::default(),
        })
    }

    /// Compacts the keyspace at `revision`, which must be above the last
    /// compaction and at most the current revision.
    pub fn compact(&mut self, revision: i64) -> Result<(), CompactRefused> {
        if revision <= self.compacted {
            return Err(CompactRefused::Compacted);
        }
        if revision > self.revision {
            return Err(CompactRefused::FutureRevision);
        }
        self.compacted = revision;
        Ok(())
    }

    /// The keyspace's compact revision (0: never compacted).
    pub fn compacted(&self) -> i64 {
        self.compacted
    }

    /// How many shards it sequences.
    pub fn shards(&self) -> u32 {
        self.sequenced.len() as u32
    }

    /// The store's current revision: the last one given to a write.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// The last log index of `shard` that has been sequenced.
    pub fn sequenced_through(&self, shard: ShardId) -> Option<u64> {
        self.sequenced.get(shard as usize).copied()
    }

    /// The last batch of `shard` that was sequenced.
    pub fn last(&self, shard: ShardId) -> Option<&Sequenced> {
        self.last.get(shard as usize)?.as_ref()
    }

    /// The revision of `shard`'s last revoke (0: none).
    pub fn last_revoke(&self, shard: ShardId) -> i64 {
        self.last_revoke.get(shard as usize).copied().unwrap_or(0)
    }

    /// The revokes `shard` may not have applied yet, in order.
    pub fn revokes(&self, shard: ShardId) -> &[Revoke] {
        self.revokes.get(shard as usize).map_or(&[], Vec::as_slice)
    }

    /// Whether some shard may not have applied a revoke yet.
    pub fn revokes_pending(&self) -> bool {
        self.revokes.iter().any(|r| !r.is_empty())
    }

    /// Revokes lease `lease` whose keys are `keys` (by shard): one revision
    /// for all of them, which each of those shards deletes its keys at
    /// before any later batch of it is sequenced. None, and no revision,
    /// when the lease has no keys (as etcd's revoke).
    pub fn revoke(&mut self, lease: i64, keys: BTreeMap<ShardId, Vec<Vec<u8>>>) -> Option<i64> {
        let shards = self.shards() as usize;
        let keys: Vec<_> = keys
            .into_iter()
            .filter(|(shard, keys)| (*shard as usize) < shards && !keys.is_empty())
            .collect();
        if keys.is_empty() {
            return None;
        }
        // A record from before revokes has none of their state.
        self.revokes.resize(shards, Vec::new());
        self.last_revoke.resize(shards, 0);
        self.revision += 1;
        for (shard, keys) in keys {
            self.drop_vote(shard);
            self.revokes[shard as usize].push(Revoke {
                revision: self.revision,
                lease,
                keys,
            });
            self.last_revoke[shard as usize] = self.revision;
        }
        Some(self.revision)
    }

    /// Sequences one round of batches, in order: each batch that starts
    /// where its shard's last one ended, after the shard applied its
    /// revokes, and whose view of the leases (`lease_exists`: the cluster
    /// group's as of this round) still holds, gets the next revisions; the
    /// others (sequenced already, sent by a leader that knew less than the
    /// sequencer, or run on leases that changed since) are left out, and
    /// their senders learn from the shard's [`Self::sequenced_through`]
    /// where to start again. Deterministic: every replica of the cluster
    /// group gets the same answer.
    pub fn sequence(
        &mut self,
        batches: &[BatchReady],
        lease_exists: &dyn Fn(i64) -> bool,
    ) -> Vec<Sequenced> {
        let mut accepted = Vec::new();
        for batch in batches {
            let shard = batch.shard as usize;
            if self.sequenced.get(shard) != Some(&batch.after) || batch.through <= batch.after {
                continue;
            }
            let revoked = self.last_revoke.get(shard).copied().unwrap_or(0);
            if batch.revoked < revoked
                || self.voted(batch.shard).is_some()
                || !batch.leases.iter().all(|&id| lease_exists(id))
                || batch.missing.iter().any(|&id| lease_exists(id))
            {
                continue;
            }
            self.sequenced[shard] = batch.through;
            let sequenced = Sequenced {
                shard: batch.shard,
                after: batch.after,
                through: batch.through,
                first_revision: self.revision + 1,
                revisions: batch.revisions,
                leases: batch.leases.clone(),
            };
            self.last[shard] = Some(sequenced.clone());
            // The shard's leader ran the batch after these: they are in
            // its log, and every replica applies them from there.
            if let Some(revokes) = self.revokes.get_mut(shard) {
                revokes.retain(|r| r.revision > batch.revoked);
            }
            self.decisions_applied(batch.shard, batch.after);
            accepted.push(sequenced);
            self.revision += batch.revisions as i64;
        }
        accepted
    }
}

/// What one observer (a shard replica, or a watch over several shards)
/// knows of the sequenced batches of the shards it follows, from the
/// cluster group's log: which revisions belong to which shard entries.
#[derive(Debug, Clone, Default)]
pub struct RevisionLedger {
    /// Batches that take revisions, by first revision.
    by_revision: BTreeMap<i64, Sequenced>,
    /// The revision through which every sequenced batch is known.
    known: i64,
}

impl RevisionLedger {
    /// Starts knowing every batch through `revision` (as from a snapshot).
    pub fn new(revision: i64) -> RevisionLedger {
        RevisionLedger {
            by_revision: BTreeMap::new(),
            known: revision,
        }
    }

    /// Records a round of the cluster group's log: its batches of the
    /// followed shards, and the revision the store reached with it.
    pub fn record(&mut self, batches: impl IntoIterator<Item = Sequenced>, revision: i64) {
        for batch in batches {
            if batch.revisions > 0 {
                self.by_revision.insert(batch.first_revision, batch);
            }
        }
        self.known = self.known.max(revision);
    }

    /// The revision through which every sequenced batch is known here.
    pub fn known(&self) -> i64 {
        self.known
    }

    /// The batch holding revision `revision`, if it is a followed shard's.
    pub fn owner(&self, revision: i64) -> Option<&Sequenced> {
        self.by_revision
            .range(..=revision)
            .next_back()
            .map(|(_, batch)| batch)
            .filter(|batch| revision < batch.end_revision())
    }

    /// How far `shard`'s log must be applied for a read at `revision`: the
    /// last entry of the last batch at or below it. None when this ledger
    /// does not reach `revision` yet (wait for the cluster group).
    pub fn applied_needed(&self, shard: ShardId, revision: i64) -> Option<u64> {
        if revision > self.known {
            return None;
        }
        Some(
            self.by_revision
                .range(..=revision)
                .rev()
                .find(|(_, batch)| batch.shard == shard)
                .map_or(0, |(_, batch)| batch.through),
        )
    }

    /// Forgets batches that end at or below `revision` (compacted, or
    /// applied everywhere they are needed).
    pub fn forget_through(&mut self, revision: i64) {
        self.by_revision
            .retain(|_, batch| batch.end_revision() - 1 > revision);
    }
}

#[path = "xtxn.rs"]
mod xtxn;

pub use xtxn::{CompareVote, TxnDecision, TxnId, TxnOutcome, TxnVote};

#[cfg(test)]
#[path = "sequence_tests.rs"]
mod tests;
