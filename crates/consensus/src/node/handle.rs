//! The async API of a running member: proposals, reads, membership, status.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::{Command, Node, Reply};
use crate::metrics::RaftMetrics;
use crate::{Error, MembershipChange, PeerInfo, Status, StopReason};

impl<O: Send + 'static> Node<O> {
    fn next_seq(&self) -> u64 {
        self.shared.next_seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Replicates `data` and returns what the state machine made of it, once
    /// this member has applied it. Dropping the future abandons the wait, not
    /// the proposal.
    pub async fn propose(&self, data: Vec<u8>) -> Result<O, Error> {
        let metrics = &self.shared.metrics;
        metrics.proposal_started();
        let result = self
            .submit(&self.shared.waiters, |seq| Command::Propose { seq, data })
            .await;
        metrics.proposal_ended(result.is_err());
        result
    }

    /// The counters behind the member's consensus metrics.
    pub fn metrics(&self) -> &RaftMetrics {
        &self.shared.metrics
    }

    /// Changes the membership and returns the members once this member has
    /// applied the change.
    pub async fn change_membership(
        &self,
        change: MembershipChange,
    ) -> Result<Vec<PeerInfo>, Error> {
        self.submit(&self.shared.member_waiters, |seq| {
            Command::ChangeMembership { seq, change }
        })
        .await
    }

    /// Registers a waiter under a new sequence number, sends the command
    /// made for it, and waits for the apply that answers it.
    async fn submit<T>(
        &self,
        waiters: &Mutex<HashMap<u64, Reply<T>>>,
        command: impl FnOnce(u64) -> Command,
    ) -> Result<T, Error> {
        let seq = self.next_seq();
        let (tx, rx) = oneshot::channel();
        waiters.lock().insert(seq, tx);
        let _forget = WaiterGuard { waiters, seq };
        self.send_command(command(seq))?;
        rx.await.map_err(|_| Error::Stopped)?
    }

    fn send_command(&self, command: Command) -> Result<(), Error> {
        if self.shared.stopped.load(Ordering::SeqCst) {
            return Err(Error::Stopped);
        }
        self.shared
            .commands
            .send(command)
            .map_err(|_| Error::Stopped)
    }

    /// A linearizable read barrier: returns once this member has applied
    /// everything committed when the read arrived (raft's ReadIndex, batched
    /// with every read that arrives meanwhile).
    pub async fn read_index(&self) -> Result<u64, Error> {
        let (tx, rx) = oneshot::channel();
        let first = {
            let mut waiting = self.shared.reads_waiting.lock();
            waiting.push(tx);
            waiting.len() == 1
        };
        if first && let Err(e) = self.send_command(Command::ReadsWaiting) {
            // Whoever rode along with this read is failed with it.
            self.shared.fail_waiters();
            return Err(e);
        }
        let index = rx.await.map_err(|_| Error::Stopped)??;
        let mut applied = self.shared.applied.subscribe();
        applied
            .wait_for(|applied| *applied >= index)
            .await
            .map_err(|_| Error::Stopped)?;
        Ok(index)
    }

    /// Hands leadership to `to` and waits until it has it (etcd's MoveLeader).
    pub async fn transfer_leader(&self, to: u64) -> Result<(), Error> {
        let (tx, rx) = oneshot::channel();
        self.send_command(Command::TransferLeader { to, reply: tx })?;
        rx.await.map_err(|_| Error::Stopped)??;
        let mut leader = self.shared.leader.subscribe();
        let timeout = self.shared.tick_interval * (self.shared.election_ticks as u32) * 2;
        match tokio::time::timeout(timeout, leader.wait_for(|l| *l == to)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(Error::Stopped),
            Err(_) => Err(Error::LeaderTransferTimeout),
        }
    }

    /// Waits until some leader is known, or `timeout` passes.
    pub async fn wait_leader(&self, timeout: Duration) -> Option<u64> {
        let mut leader = self.shared.leader.subscribe();
        match tokio::time::timeout(timeout, leader.wait_for(|l| *l != 0)).await {
            Ok(Ok(l)) => Some(*l),
            _ => None,
        }
    }

    pub fn id(&self) -> u64 {
        self.shared.id
    }

    /// The current raft term (cheap: read on every response header).
    pub fn term(&self) -> u64 {
        self.shared.term.load(Ordering::Relaxed)
    }

    pub fn is_learner(&self) -> bool {
        self.shared.is_learner.load(Ordering::Relaxed)
    }

    /// The member registry as this member has applied it.
    pub fn members(&self) -> Vec<PeerInfo> {
        self.shared.members.lock().clone()
    }

    pub fn status(&self) -> Status {
        let s = &self.shared;
        Status {
            id: s.id,
            leader: *s.leader.borrow(),
            term: s.term.load(Ordering::Relaxed),
            commit_index: s.commit.load(Ordering::Relaxed),
            applied_index: *s.applied.borrow(),
            last_index: s.last_index.load(Ordering::Relaxed),
            is_learner: s.is_learner.load(Ordering::Relaxed),
        }
    }

    /// Resolves when the node stops, with why.
    pub async fn stopped(&self) -> StopReason {
        let mut rx = self.shared.stop_reason.subscribe();
        match rx.wait_for(|r| r.is_some()).await {
            Ok(reason) => reason.clone().unwrap_or(StopReason::Shutdown),
            Err(_) => StopReason::Shutdown,
        }
    }

    /// Drops the log through `index` (at most the applied index), keeping
    /// no entries for slow followers: a member that needs any of them gets a
    /// snapshot instead. For a log that does not hold the state machine's
    /// history, as after a restore from a backup. The state machine must
    /// have made `index` durable.
    pub fn compact_log_through(&self, index: u64) {
        let _ = self.shared.commands.send(Command::CompactLogThrough(index));
    }

    /// Stops the group and waits until its raft and apply threads have let
    /// it go (its state machine dropped); applied work is kept. The member's other
    /// groups run on.
    pub fn shutdown(&self) {
        self.shared.stop(StopReason::Shutdown);
        let _ = self.shared.left.recv();
        let _ = self.shared.released.recv();
        let threads: Vec<_> = self.shared.threads.lock().drain(..).collect();
        for thread in threads {
            let _ = thread.join();
        }
    }
}

/// Forgets a waiter when its caller goes away.
struct WaiterGuard<'a, T> {
    waiters: &'a Mutex<HashMap<u64, Reply<T>>>,
    seq: u64,
}

impl<T> Drop for WaiterGuard<'_, T> {
    fn drop(&mut self) {
        self.waiters.lock().remove(&self.seq);
    }
}
