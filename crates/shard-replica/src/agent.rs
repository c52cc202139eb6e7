//! A member's sequencing agent: for every shard this member leads, it asks
//! the cluster group to sequence what the shard has committed, one round
//! for all of them, then announces each sequenced batch in its shard's log;
//! and it announces there the revokes of leases with keys in the shard,
//! before the shard's next batch.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use cairn_consensus::Node;
use cairn_shard::{BatchReady, Revoke, Sequenced, Sequencer, ShardId, TxnDecision, TxnVote};
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::machine::{ShardHandle, ShardOutput, announce, announce_decision, announce_revoke};

/// Whether a lease exists, as this member's replica of the cluster group
/// has applied it.
pub type LeaseExists = Arc<dyn Fn(i64) -> bool + Send + Sync>;

/// One shard this member replicates: its replica and its raft group.
#[derive(Clone)]
pub struct LocalShard {
    pub handle: Arc<ShardHandle>,
    pub node: Node<ShardOutput>,
}

/// The agent of one member.
pub struct Agent {
    member: u64,
    shards: Vec<LocalShard>,
    /// This member's copy of the cluster group's sequencer state.
    sequencer: Arc<Mutex<Sequencer>>,
    /// The cluster group's leases, for the dry runs of puts naming one.
    leases: LeaseExists,
    /// Woken by the shards when a write is staged or a batch applied.
    work: Arc<Notify>,
    /// How long to wait when no shard has told of work: what else can
    /// make work (a shard's leadership moving here, with a batch its old
    /// leader left unannounced) is found at the latest after this.
    idle: Duration,
    /// How long a round or an announcement may take: a proposal that went
    /// to a leader that then fell is never answered.
    timeout: Duration,
}

impl Agent {
    pub fn new(
        member: u64,
        shards: Vec<LocalShard>,
        sequencer: Arc<Mutex<Sequencer>>,
        leases: LeaseExists,
        idle: Duration,
        timeout: Duration,
    ) -> Agent {
        let work = Arc::new(Notify::new());
        for shard in &shards {
            shard.handle.wake_on_work(work.clone());
        }
        Agent {
            member,
            shards,
            work,
            sequencer,
            leases,
            idle,
            timeout,
        }
    }

    /// What wakes the agent: to be told of a revoke its shards announce.
    pub fn waker(&self) -> Arc<Notify> {
        self.work.clone()
    }

    /// Runs rounds until `sequence` (which proposes a round of batches and
    /// txn votes to the cluster group and returns the batches it accepted)
    /// fails for good; the caller stops the agent by dropping the future.
    pub async fn run<F, Fut, E>(self, sequence: F)
    where
        F: Fn(Vec<BatchReady>, Vec<TxnVote>) -> Fut,
        Fut: Future<Output = Result<Vec<Sequenced>, E>>,
        E: std::fmt::Display,
    {
        loop {
            if !self.round(&sequence).await {
                // A wake-up while the round ran is kept for this wait.
                let _ = tokio::time::timeout(self.idle, self.work.notified()).await;
            }
        }
    }

    /// One round; false when there was nothing to do or it failed.
    async fn round<F, Fut, E>(&self, sequence: &F) -> bool
    where
        F: Fn(Vec<BatchReady>, Vec<TxnVote>) -> Fut,
        Fut: Future<Output = Result<Vec<Sequenced>, E>>,
        E: std::fmt::Display,
    {
        let mut ready = Vec::new();
        let mut unannounced = Vec::new();
        let mut revokes = Vec::new();
        let mut votes = Vec::new();
        let mut decided = Vec::new();
        for shard in &self.shards {
            if shard.node.status().leader != self.member {
                continue;
            }
            let id = shard.handle.shard();
            let (through, last, last_revoke, pending, decisions, voted) = {
                let sequencer = self.sequencer.lock();
                (
                    sequencer.sequenced_through(id).unwrap_or(0),
                    sequencer.last(id).cloned(),
                    sequencer.last_revoke(id),
                    sequencer.revokes(id).to_vec(),
                    sequencer.decisions(id).to_vec(),
                    sequencer.voted(id),
                )
            };
            let applied = shard.handle.applied_index();
            // A decided txn's prepare is the next entry to apply: every
            // batch before it was applied when the shard voted.
            if let Some(decision) = decisions.into_iter().find(|d| d.index > applied) {
                decided.push((shard.node.clone(), decision));
                continue;
            }
            if applied < through {
                // Sequenced, but the leader that asked fell before it
                // announced the batch (or the announcement is on its way).
                if let Some(last) = last.filter(|l| l.after == applied) {
                    unannounced.push(last);
                }
                continue;
            }
            let revoked = shard.handle.revoked();
            if revoked < last_revoke {
                // Every batch before them is applied: the revokes go next
                // in the shard's log, and its next batch runs after them.
                let pending: Vec<Revoke> = pending
                    .into_iter()
                    .filter(|r| r.revision > revoked)
                    .collect();
                if !pending.is_empty() {
                    revokes.push((shard.node.clone(), pending));
                }
                continue;
            }
            match shard.handle.vote(through, &*self.leases) {
                // Recorded already: the shard waits for the decision.
                Ok(Some(vote)) if voted == Some(vote.id) => continue,
                Ok(Some(vote)) => {
                    votes.push(vote);
                    continue;
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(shard = id, "cannot vote: {e}"),
            }
            match shard.handle.ready(through, &*self.leases) {
                Ok(Some(batch)) => ready.push(batch),
                Ok(None) => {}
                Err(e) => tracing::warn!(shard = id, "cannot sequence: {e}"),
            }
        }
        let announced = !revokes.is_empty() || !decided.is_empty();
        if !decided.is_empty() {
            self.announce_decisions(decided).await;
        }
        if !revokes.is_empty() {
            self.announce_revokes(revokes).await;
        }
        if ready.is_empty() && votes.is_empty() && unannounced.is_empty() {
            // After an announcement the shards' next entries can go now.
            return announced;
        }
        if !ready.is_empty() || !votes.is_empty() {
            match tokio::time::timeout(self.timeout, sequence(ready, votes)).await {
                Ok(Ok(sequenced)) => unannounced.extend(sequenced),
                // Sequenced or not, the next round finds out from the
                // cluster group's state.
                Ok(Err(e)) => {
                    tracing::debug!("sequencing round failed, retrying: {e}");
                    return false;
                }
                Err(_) => {
                    tracing::debug!("sequencing round timed out, retrying");
                    return false;
                }
            }
        }
        let mut announcing = tokio::task::JoinSet::new();
        for batch in unannounced {
            let Some(shard) = self.shard(batch.shard) else {
                continue;
            };
            let node = shard.node.clone();
            let timeout = self.timeout;
            announcing.spawn(async move {
                let shard = batch.shard;
                match tokio::time::timeout(timeout, announce(&node, batch)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::debug!(shard, "announcing a batch failed: {e}"),
                    Err(_) => tracing::debug!(shard, "announcing a batch timed out"),
                }
            });
        }
        announcing.join_all().await;
        true
    }

    /// Announces each shard's revokes in its log, in order, the shards at
    /// once; one that fails is announced again by a later round.
    async fn announce_revokes(&self, revokes: Vec<(Node<ShardOutput>, Vec<Revoke>)>) {
        let mut announcing = tokio::task::JoinSet::new();
        for (node, pending) in revokes {
            let timeout = self.timeout;
            announcing.spawn(async move {
                for revoke in pending {
                    let revision = revoke.revision;
                    match tokio::time::timeout(timeout, announce_revoke(&node, revoke)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            tracing::debug!(revision, "announcing a revoke failed: {e}");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(revision, "announcing a revoke timed out");
                            return;
                        }
                    }
                }
            });
        }
        announcing.join_all().await;
    }

    /// Announces each decision in its shard's log, the shards at once; one
    /// that fails is announced again by a later round.
    async fn announce_decisions(&self, decided: Vec<(Node<ShardOutput>, TxnDecision)>) {
        let mut announcing = tokio::task::JoinSet::new();
        for (node, decision) in decided {
            let timeout = self.timeout;
            announcing.spawn(async move {
                let shard = decision.shard;
                match tokio::time::timeout(timeout, announce_decision(&node, decision)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::debug!(shard, "announcing a txn decision failed: {e}"),
                    Err(_) => tracing::debug!(shard, "announcing a txn decision timed out"),
                }
            });
        }
        announcing.join_all().await;
    }

    fn shard(&self, id: ShardId) -> Option<&LocalShard> {
        self.shards.iter().find(|s| s.handle.shard() == id)
    }
}
