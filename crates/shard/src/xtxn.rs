//! Transactions over keys of several shards, decided by the sequencer.
//!
//! Each participant shard carries the txn in its log (its *prepare*); its
//! leader, once everything before the prepare is applied, evaluates the
//! compares and both branches on the shard's keys without committing, and
//! sends a [`TxnVote`]. Later entries of the shard wait behind the
//! prepare, so its keys stay as voted until the txn is decided. When every
//! participant voted, the sequencer decides: the compares' outcome, and
//! one revision for the whole txn when its branch changes anything. Each
//! participant then applies its part of the branch at that revision.
//!
//! Two shards may carry two txns in opposite orders, each blocked on the
//! txn it voted for: the sequencer sees every shard's block, and when a
//! vote closes a cycle it aborts the youngest txn in it. A txn whose
//! prepare may be lost (its coordinator saw a proposal fail or not commit
//! in time, or died) is aborted on request ([`Sequencer::abort`]), voted
//! for or not yet. Nothing of an aborted txn takes effect, and it stays
//! aborted: a prepare that commits after the abort is passed where its
//! shard votes for it. Its coordinator runs it again under a new ID.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::Sequencer;
use crate::ShardId;

/// How many aborted txns the sequencer remembers by ID, for the
/// participants that reach their prepares after the abort. Older ones are
/// covered by their coordinator's floor ([`CrossTxns::floors`]); the list
/// is part of the record every round rewrites, so it stays short.
const ABORTED_KEPT: usize = 128;

/// A cross-shard txn's ID: its coordinator and the coordinator's counter.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct TxnId {
    pub member: u64,
    pub seq: u64,
}

/// One compare, as one shard sees it: whether its range holds keys of the
/// shard, and whether all of them satisfy it (with none: etcd's comparison
/// against an absent key, which every shard makes the same way).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompareVote {
    pub found: bool,
    pub holds: bool,
}

/// A participant's vote: what it found, evaluated on its own keys with
/// every entry before the prepare (`index` in its log) applied.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnVote {
    pub shard: ShardId,
    /// The prepare's index in the shard's log.
    pub index: u64,
    /// The shard's applied index when it voted: the sequencer's last for it.
    pub after: u64,
    /// The revision of the last revoke (or txn) it had applied.
    pub revoked: i64,
    pub id: TxnId,
    pub participants: Vec<ShardId>,
    pub compares: Vec<CompareVote>,
    /// Whether its part of each branch would change anything here.
    pub changes_success: bool,
    pub changes_failure: bool,
    /// Whether its part of each branch fails here (a put naming a lease
    /// that does not exist): the whole txn then fails, changing nothing.
    pub fails_success: bool,
    pub fails_failure: bool,
    /// The leases its puts found, and those they found missing.
    pub leases: Vec<i64>,
    pub missing: Vec<i64>,
    /// The keys whose lease each branch changes here, with the new lease.
    pub attach_success: Vec<(Vec<u8>, i64)>,
    pub attach_failure: Vec<(Vec<u8>, i64)>,
}

/// How a txn ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxnOutcome {
    /// Nothing of it takes effect; its coordinator runs it again.
    Aborted,
    Succeeded,
    Failed,
}

/// A txn's decision for one participant, which its leader announces in the
/// shard's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnDecision {
    pub id: TxnId,
    pub shard: ShardId,
    /// The prepare's index in the shard's log.
    pub index: u64,
    pub outcome: TxnOutcome,
    /// The txn's revision when it changes anything (on any shard); else the
    /// keyspace's revision when it was decided.
    pub revision: i64,
    /// Whether this shard's part changes anything: it then applies it at
    /// `revision`.
    pub changes: bool,
    /// The leases that exist for its puts (every other is missing).
    pub leases: Vec<i64>,
}

/// A txn some participants voted for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Undecided {
    id: TxnId,
    /// When the sequencer first heard of it, in its own count: the
    /// youngest of a cycle has the highest.
    order: u64,
    participants: Vec<ShardId>,
    votes: Vec<TxnVote>,
}

/// The sequencer's state of cross-shard txns (part of its record).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct CrossTxns {
    next_order: u64,
    undecided: Vec<Undecided>,
    /// Aborted txns, oldest first.
    aborted: std::collections::VecDeque<TxnId>,
    /// By coordinator member: the highest seq of an aborted txn it no
    /// longer lists. A coordinator's seqs only grow, so a txn at or below
    /// its floor that is not undecided is aborted when a shard votes for
    /// it: a forgotten abort stays an abort (at worst an old txn still
    /// running is aborted too, and its coordinator runs it again).
    #[serde(default)]
    floors: std::collections::BTreeMap<u64, u64>,
    /// By shard: decisions its leader may not have announced yet.
    decisions: Vec<Vec<TxnDecision>>,
}

impl Sequencer {
    /// Records a participant's vote. When it is the last the txn needed,
    /// decides it, and returns the keys whose lease its branch changes;
    /// when it closes a cycle of shards blocked on each other's txns,
    /// aborts the youngest txn in it. A vote that does not start where the
    /// shard's sequenced entries end, or made before the shard applied its
    /// last revoke, is ignored (the shard votes again).
    pub fn vote(
        &mut self,
        vote: TxnVote,
        lease_exists: &dyn Fn(i64) -> bool,
    ) -> Vec<(Vec<u8>, i64)> {
        let shard = vote.shard as usize;
        let shards = self.shards() as usize;
        if shard >= shards
            || self.sequenced[shard] != vote.after
            || vote.index <= vote.after
            || vote.revoked < self.last_revoke(vote.shard)
            || !vote.participants.contains(&vote.shard)
            || vote.participants.iter().any(|&p| p as usize >= shards)
        {
            return Vec::new();
        }
        self.txns.decisions.resize(shards, Vec::new());
        self.txns.decisions[shard].retain(|d| d.index > vote.after);
        if self.is_aborted(vote.id) {
            self.decide_for(&vote, TxnOutcome::Aborted, self.revision, false, Vec::new());
            return Vec::new();
        }
        // A shard is blocked on one txn at a time: a vote for another
        // replaces nothing but its own.
        if self
            .blocked_on(vote.shard)
            .is_some_and(|txn| txn.id != vote.id)
        {
            return Vec::new();
        }
        let id = vote.id;
        let at = match self.txns.undecided.iter().position(|t| t.id == id) {
            Some(at) => at,
            None => {
                self.txns.next_order += 1;
                let mut participants = vote.participants.clone();
                participants.sort_unstable();
                participants.dedup();
                self.txns.undecided.push(Undecided {
                    id,
                    order: self.txns.next_order,
                    participants,
                    votes: Vec::new(),
                });
                self.txns.undecided.len() - 1
            }
        };
        let txn = &mut self.txns.undecided[at];
        txn.votes.retain(|v| v.shard != vote.shard);
        txn.votes.push(vote);
        if txn.votes.len() == txn.participants.len() {
            let txn = self.txns.undecided.remove(at);
            return self.decide(txn, lease_exists);
        }
        if let Some(cycle) = self.cycle_through(id) {
            let youngest = cycle
                .iter()
                .filter_map(|id| self.txns.undecided.iter().find(|t| t.id == *id))
                .max_by_key(|t| t.order)
                .map(|t| t.id);
            if let Some(youngest) = youngest {
                self.abort(youngest);
            }
        }
        Vec::new()
    }

    /// Aborts a txn that is not decided: the participants that voted pass
    /// its prepare, and those that vote for it later (a prepare whose
    /// proposal's outcome its coordinator did not learn may commit after
    /// this) do too. A txn decided already keeps its outcome: no
    /// participant votes for it again. Whether it was undecided (some
    /// participant had voted for it).
    pub fn abort(&mut self, id: TxnId) -> bool {
        let undecided = match self.txns.undecided.iter().position(|t| t.id == id) {
            Some(at) => {
                let txn = self.txns.undecided.remove(at);
                for vote in &txn.votes {
                    self.decide_for(vote, TxnOutcome::Aborted, self.revision, false, Vec::new());
                }
                true
            }
            None => false,
        };
        if !self.is_aborted(id) {
            self.txns.aborted.push_back(id);
        }
        while self.txns.aborted.len() > ABORTED_KEPT {
            let Some(old) = self.txns.aborted.pop_front() else {
                break;
            };
            let floor = self.txns.floors.entry(old.member).or_default();
            *floor = (*floor).max(old.seq);
        }
        undecided
    }

    /// Whether a vote for `id` finds it aborted: listed, or at or below
    /// its coordinator's floor and not undecided.
    fn is_aborted(&self, id: TxnId) -> bool {
        let floor = self.txns.floors.get(&id.member).copied();
        self.txns.aborted.contains(&id)
            || (floor.is_some_and(|floor| id.seq <= floor)
                && !self.txns.undecided.iter().any(|t| t.id == id))
    }

    /// The txns some participant voted for and that are not decided.
    pub fn undecided(&self) -> Vec<TxnId> {
        self.txns.undecided.iter().map(|t| t.id).collect()
    }

    /// The txn `shard` voted for and waits on, if any.
    pub fn voted(&self, shard: ShardId) -> Option<TxnId> {
        self.blocked_on(shard).map(|t| t.id)
    }

    /// The decisions `shard`'s leader may not have announced yet, in order.
    pub fn decisions(&self, shard: ShardId) -> &[TxnDecision] {
        self.txns
            .decisions
            .get(shard as usize)
            .map_or(&[], Vec::as_slice)
    }

    /// Whether some shard may not have applied a decision yet.
    pub fn decisions_pending(&self) -> bool {
        self.txns.decisions.iter().any(|d| !d.is_empty())
    }

    /// Forgets `shard`'s decisions through its log index `applied` (a batch
    /// after them was sequenced).
    pub(super) fn decisions_applied(&mut self, shard: ShardId, applied: u64) {
        if let Some(decisions) = self.txns.decisions.get_mut(shard as usize) {
            decisions.retain(|d| d.index > applied);
        }
    }

    /// A revoke on `shard` comes before any txn decided after it: the
    /// shard's vote, made before the revoke, no longer holds.
    pub(super) fn drop_vote(&mut self, shard: ShardId) {
        for txn in &mut self.txns.undecided {
            txn.votes.retain(|v| v.shard != shard);
        }
    }

    fn blocked_on(&self, shard: ShardId) -> Option<&Undecided> {
        self.txns
            .undecided
            .iter()
            .find(|t| t.votes.iter().any(|v| v.shard == shard))
    }

    /// A cycle of txns through `start`: each waits for a participant that
    /// has not voted for it and is blocked on the next.
    fn cycle_through(&self, start: TxnId) -> Option<Vec<TxnId>> {
        let mut path = vec![start];
        let mut seen = BTreeSet::new();
        self.search(start, &mut path, &mut seen).then_some(path)
    }

    fn search(&self, from: TxnId, path: &mut Vec<TxnId>, seen: &mut BTreeSet<TxnId>) -> bool {
        let Some(txn) = self.txns.undecided.iter().find(|t| t.id == from) else {
            return false;
        };
        for &shard in &txn.participants {
            if txn.votes.iter().any(|v| v.shard == shard) {
                continue;
            }
            let Some(next) = self.blocked_on(shard).map(|t| t.id) else {
                continue;
            };
            if next == path[0] {
                return true;
            }
            if seen.insert(next) {
                path.push(next);
                if self.search(next, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }

    fn decide(
        &mut self,
        txn: Undecided,
        lease_exists: &dyn Fn(i64) -> bool,
    ) -> Vec<(Vec<u8>, i64)> {
        // The leases its dry runs relied on must still be as they found
        // them; else it runs again.
        let leases_hold = txn.votes.iter().all(|v| {
            v.leases.iter().all(|&id| lease_exists(id))
                && !v.missing.iter().any(|&id| lease_exists(id))
        });
        if !leases_hold {
            self.txns.undecided.push(txn.clone());
            self.abort(txn.id);
            return Vec::new();
        }
        let compares = txn
            .votes
            .iter()
            .map(|v| v.compares.len())
            .max()
            .unwrap_or(0);
        let succeeded = (0..compares).all(|c| {
            let seen: Vec<CompareVote> = txn
                .votes
                .iter()
                .map(|v| v.compares.get(c).copied().unwrap_or_default())
                .collect();
            if seen.iter().any(|v| v.found) {
                seen.iter().filter(|v| v.found).all(|v| v.holds)
            } else {
                seen.iter().all(|v| v.holds)
            }
        });
        let branch = |v: &TxnVote| {
            if succeeded {
                (v.changes_success, v.fails_success)
            } else {
                (v.changes_failure, v.fails_failure)
            }
        };
        let fails = txn.votes.iter().any(|v| branch(v).1);
        let changes = !fails && txn.votes.iter().any(|v| branch(v).0);
        if changes {
            self.revision += 1;
        }
        let outcome = if succeeded {
            TxnOutcome::Succeeded
        } else {
            TxnOutcome::Failed
        };
        let mut leases: Vec<i64> = txn.votes.iter().flat_map(|v| v.leases.clone()).collect();
        leases.sort_unstable();
        leases.dedup();
        let mut attach = Vec::new();
        for vote in &txn.votes {
            let here = changes && branch(vote).0;
            self.decide_for(vote, outcome, self.revision, here, leases.clone());
            if here {
                attach.extend(if succeeded {
                    vote.attach_success.clone()
                } else {
                    vote.attach_failure.clone()
                });
            }
        }
        attach
    }

    /// Records `vote`'s shard's decision: its prepare is sequenced, and
    /// when it changes the shard, reads and later batches there wait for it
    /// as for a revoke.
    fn decide_for(
        &mut self,
        vote: &TxnVote,
        outcome: TxnOutcome,
        revision: i64,
        changes: bool,
        leases: Vec<i64>,
    ) {
        let shard = vote.shard as usize;
        self.txns
            .decisions
            .resize(self.shards() as usize, Vec::new());
        self.last_revoke.resize(self.shards() as usize, 0);
        self.sequenced[shard] = vote.index;
        if changes {
            self.last_revoke[shard] = revision;
        }
        self.txns.decisions[shard].push(TxnDecision {
            id: vote.id,
            shard: vote.shard,
            index: vote.index,
            outcome,
            revision,
            changes,
            leases,
        });
    }
}

#[cfg(test)]
#[path = "xtxn_tests.rs"]
mod tests;
