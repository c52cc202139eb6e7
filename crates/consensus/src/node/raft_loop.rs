//! One raft group on the raft thread ([`super::driver`]): owns raft-rs's
//! `RawNode` and its log, batches what the handle asks into one Ready at a
//! time, and passes committed entries to the group's apply thread.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use raft::prelude::{Entry, Message, MessageType, Snapshot};
use raft::{RawNode, Ready, SnapshotStatus, StateRole};

use super::apply_thread::ApplySender;
use super::driver::Driven;
use super::hibernation::Hibernation;
use super::{ApplyWork, Command, KIND_STATE_MACHINE, Reply, Shared, encode_context, peer_urls};
use crate::raft_log::RaftLog;
use crate::raft_transport::PeerEvent;
use crate::raft_transport::{GroupId, RaftTransport};
use crate::{Error, NodeConfig, PeerInfo, StopReason};

pub(super) struct RaftLoop<O, L: RaftLog> {
    pub(super) raw: RawNode<L>,
    pub(super) group: GroupId,
    apply: ApplySender,
    pub(super) transport: Arc<dyn RaftTransport>,
    pub(super) shared: Arc<Shared<O>>,
    tick_interval: Duration,
    next_tick: Instant,
    /// A ReadIndex unanswered for this long is asked again (raft drops them
    /// silently when the leader is unknown or has not committed in its term).
    read_retry: Duration,
    pending_reads: Vec<Reply<u64>>,
    /// On a leader, the followers' ReadIndex requests for the next round:
    /// one heartbeat round answers all of them with the leader's own reads
    /// (raft-rs would broadcast heartbeats for each request).
    follower_reads: Vec<Message>,
    /// Proposals taken from the queue since the last Ready, stepped as one
    /// message (one forward to the leader, one append for the log), with
    /// their waiters' sequence numbers.
    proposals: Vec<Entry>,
    proposal_seqs: Vec<u64>,
    reads_in_flight: HashMap<u64, ReadRound>,
    next_read_ctx: u64,
    /// The last snapshot a peer streamed to us, until raft takes or drops it.
    received_snapshot: Option<(u64, PathBuf, Vec<PeerInfo>)>,
    /// Entries kept behind the compaction point for slow followers.
    catch_up_entries: u64,
    /// Set for groups that sleep when idle (`NodeConfig::hibernate`).
    hibernation: Option<Hibernation>,
    /// The heartbeats that put the followers to sleep, sent after the
    /// tick's own messages so that those do not wake them again.
    quiesce: Vec<raft::prelude::Message>,
    /// The Ready written to the log and not yet finished (its fsync is
    /// under way).
    written: Option<Ready>,
    /// Dropped with the loop, when the group has left its raft thread:
    /// [`super::Node::shutdown`] waits for that.
    _left: Sender<()>,
}

impl<O, L: RaftLog> RaftLoop<O, L> {
    /// Raft group `group` on its raft thread, handing committed work to
    /// `apply`; `left` is dropped when it leaves the thread.
    pub(super) fn new(
        raw: RawNode<L>,
        group: GroupId,
        (apply, left): (ApplySender, Sender<()>),
        transport: Arc<dyn RaftTransport>,
        shared: Arc<Shared<O>>,
        config: &NodeConfig,
    ) -> Self {
        RaftLoop {
            raw,
            group,
            apply,
            transport,
            shared,
            tick_interval: config.tick_interval,
            next_tick: Instant::now() + config.tick_interval,
            // etcd retries an unanswered ReadIndex after 500 ms.
            read_retry: (config.tick_interval * 5).max(Duration::from_millis(500)),
            pending_reads: Vec::new(),
            follower_reads: Vec::new(),
            proposals: Vec::new(),
            proposal_seqs: Vec::new(),
            reads_in_flight: HashMap::new(),
            next_read_ctx: 0,
            received_snapshot: None,
            catch_up_entries: config.snapshot_count.clamp(1, 5000),
            hibernation: config
                .hibernate
                .then(|| Hibernation::new(config.election_ticks)),
            quiesce: Vec::new(),
            written: None,
            _left: left,
        }
    }

    fn asleep(&self) -> bool {
        self.hibernation.as_ref().is_some_and(Hibernation::asleep)
    }

    fn wake(&mut self) {
        if let Some(hibernation) = &mut self.hibernation {
            hibernation.wake();
        }
    }

    /// Ticks when due, on a fixed schedule.
    fn tick_if_due(&mut self, now: Instant) {
        if now < self.next_tick || self.asleep() {
            return;
        }
        self.raw.tick();
        self.hibernate_if_idle();
        // A fixed schedule, as etcd's ticker: counting from `now` would let
        // every late tick push the next one back, and a busy thread would
        // stretch the election timeout.
        self.next_tick += self.tick_interval;
        if self.next_tick <= now {
            // Behind by more than a tick (a stall): drop the missed ones, as
            // a Go ticker does, rather than fire a burst.
            self.next_tick = now + self.tick_interval;
        }
        self.retry_stale_reads(now);
    }

    /// Runs `f`, which may wake the group: woken, its timers start over.
    fn waking<T>(&mut self, f: impl FnOnce(&mut Self) -> T) -> T {
        let was_asleep = self.asleep();
        let result = f(self);
        if was_asleep && !self.asleep() {
            self.next_tick = Instant::now() + self.tick_interval;
        }
        result
    }

    /// On a leader's tick: puts the group to sleep once it has long been
    /// idle (see `hibernation`).
    fn hibernate_if_idle(&mut self) {
        // Groups that never hibernate (the cluster group) pay nothing here.
        let Some(hibernation) = &mut self.hibernation else {
            return;
        };
        let idle = self.proposals.is_empty()
            && self.pending_reads.is_empty()
            && self.follower_reads.is_empty()
            && self.reads_in_flight.is_empty()
            && self.shared.waiters.lock().is_empty();
        if let Some(heartbeats) = hibernation.on_tick(&self.raw, idle) {
            tracing::debug!(group = self.group, "raft group idle: hibernating");
            self.quiesce = heartbeats;
        }
    }

    /// Returns false when the group should stop.
    fn handle_command(&mut self, command: Command) -> Result<bool, Error> {
        if !matches!(command, Command::Applied(_) | Command::CompactLog(_)) {
            self.wake();
        }
        match command {
            Command::Propose { seq, data } => {
                self.proposals.push(Entry {
                    data: data.into(),
                    context: encode_context(KIND_STATE_MACHINE, self.shared.id, seq).into(),
                    ..Default::default()
                });
                self.proposal_seqs.push(seq);
            }
            Command::ChangeMembership { seq, change } => {
                self.propose_queued();
                if let Err(e) = self.propose_membership(seq, change)
                    && let Some(waiter) = self.shared.member_waiters.lock().remove(&seq)
                {
                    let _ = waiter.send(Err(e));
                }
            }
            Command::ReadsWaiting => self
                .pending_reads
                .extend(self.shared.reads_waiting.lock().drain(..)),
            Command::TransferLeader { to, reply } => {
                self.propose_queued();
                self.transfer_leader(to, reply);
            }
            Command::ApplyMembership { index, entry, done } => {
                self.apply_membership(index, entry)?;
                let _ = done.send(());
            }
            Command::Applied(index) => {
                self.raw.advance_apply_to(index);
                self.raw.mut_store().set_applied(index);
                self.campaign_if_alone()?;
            }
            Command::CompactLog(durable) => {
                let index = durable.saturating_sub(self.catch_up_entries);
                if index > 0 {
                    match self.raw.mut_store().compact(index) {
                        // Compaction frees space; it is tried again at the
                        // next snapshot_count.
                        Err(e) if e.is_storage_full() => {
                            tracing::warn!("could not compact the raft log: {e}");
                        }
                        other => other?,
                    }
                }
            }
            Command::CompactLogThrough(index) => {
                let index = index.min(self.raw.raft.raft_log.applied);
                if index > 0 {
                    self.raw.mut_store().compact(index)?;
                    tracing::info!(index, "compacted the raft log");
                }
            }
            Command::Stop => return Ok(false),
        }
        Ok(true)
    }

    fn handle_peer_event(&mut self, event: PeerEvent) -> Result<(), Error> {
        match event {
            PeerEvent::Message(message) => {
                if let Some(hibernation) = &mut self.hibernation {
                    hibernation.on_message(&self.raw, &message);
                }
                if message.get_msg_type() == MessageType::MsgReadIndex
                    && self.raw.raft.state == StateRole::Leader
                    && message.from != self.raw.raft.id
                    && message.entries.len() == 1
                {
                    self.follower_reads.push(message);
                    return Ok(());
                }
                if let Err(e) = self.raw.step(message) {
                    tracing::debug!("raft refused a peer message: {e}");
                }
            }
            PeerEvent::Unreachable(id) => {
                // A sleeping follower whose leader's connection broke must
                // time an election again.
                if id == self.raw.raft.leader_id {
                    self.wake();
                }
                self.raw.report_unreachable(id);
            }
            PeerEvent::SnapshotSent { to, ok } => {
                let status = if ok {
                    SnapshotStatus::Finish
                } else {
                    SnapshotStatus::Failure
                };
                self.raw.report_snapshot(to, status);
            }
            PeerEvent::SnapshotReceived {
                message,
                file,
                members,
            } => {
                let members: Vec<PeerInfo> = match serde_json::from_slice(&members) {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!("dropping a snapshot with an unreadable member list: {e}");
                        let _ = std::fs::remove_file(&file);
                        return Ok(());
                    }
                };
                let index = message.get_snapshot().get_metadata().index;
                if let Some((_, old, _)) = self.received_snapshot.replace((index, file, members)) {
                    let _ = std::fs::remove_file(old);
                }
                if let Err(e) = self.raw.step(message) {
                    tracing::debug!("raft refused a snapshot: {e}");
                }
            }
        }
        Ok(())
    }

    /// Steps the queued proposals as one MsgPropose, as RawNode::propose
    /// does for a single one.
    fn propose_queued(&mut self) {
        if self.proposals.is_empty() {
            return;
        }
        let message = raft::prelude::Message {
            msg_type: raft::prelude::MessageType::MsgPropose,
            from: self.shared.id,
            entries: std::mem::take(&mut self.proposals).into(),
            ..Default::default()
        };
        if let Err(e) = self.raw.raft.step(message) {
            // raft::Error is not Clone: each waiter gets its own.
            let dropped = e == raft::Error::ProposalDropped;
            let reason = e.to_string();
            let mut waiters = self.shared.waiters.lock();
            for seq in &self.proposal_seqs {
                if let Some(waiter) = waiters.remove(seq) {
                    let error = if dropped {
                        Error::NoLeader
                    } else {
                        Error::ProposalRefused(reason.clone())
                    };
                    let _ = waiter.send(Err(error));
                }
            }
        }
        self.proposal_seqs.clear();
    }

    /// A lone voter need not wait out an election timeout; raft lets it
    /// campaign once its membership entries are applied.
    fn campaign_if_alone(&mut self) -> Result<(), Error> {
        let raft = &self.raw.raft;
        if raft.state != StateRole::Leader
            && raft.prs().is_singleton()
            && raft.promotable()
            && raft.raft_log.applied >= raft.raft_log.committed
        {
            self.raw.campaign()?;
        }
        Ok(())
    }

    fn issue_reads(&mut self) {
        // One ReadIndex round at a time, as etcd's read loop: reads that
        // arrive meanwhile share the next round, so a read storm costs a few
        // heartbeat rounds instead of one per batch. A leader's round also
        // answers the followers' requests that came meanwhile.
        if self.raw.raft.state != StateRole::Leader {
            // A deposed leader's followers ask again (after `read_retry`).
            self.follower_reads.clear();
        }
        if (self.pending_reads.is_empty() && self.follower_reads.is_empty())
            || !self.reads_in_flight.is_empty()
        {
            return;
        }
        let raft = &self.raw.raft;
        let can_read = match raft.state {
            StateRole::Leader => raft.commit_to_current_term(),
            _ => raft.leader_id != raft::INVALID_ID,
        };
        if !can_read {
            return;
        }
        self.next_read_ctx += 1;
        let ctx = self.next_read_ctx;
        let round = ReadRound {
            asked: Instant::now(),
            replies: std::mem::take(&mut self.pending_reads),
            followers: std::mem::take(&mut self.follower_reads),
        };
        self.reads_in_flight.insert(ctx, round);
        // The leader keys pending reads by context: it must be unique across
        // the cluster, or one member's read would swallow another's.
        let mut request_ctx = Vec::with_capacity(16);
        request_ctx.extend_from_slice(&self.shared.id.to_be_bytes());
        request_ctx.extend_from_slice(&ctx.to_be_bytes());
        self.raw.read_index(request_ctx);
    }

    fn retry_stale_reads(&mut self, now: Instant) {
        let stale: Vec<u64> = self
            .reads_in_flight
            .iter()
            .filter(|(_, round)| now.duration_since(round.asked) >= self.read_retry)
            .map(|(ctx, _)| *ctx)
            .collect();
        for ctx in stale {
            if let Some(round) = self.reads_in_flight.remove(&ctx) {
                // The followers ask again themselves.
                self.pending_reads.extend(round.replies);
            }
        }
    }

    /// The first half of a Ready: see [`Driven::write_ready`].
    fn write_ready(&mut self) -> Result<bool, Error> {
        let mut ready = self.raw.ready();
        self.transport.send(self.group, ready.take_messages());
        if !ready.snapshot().is_empty() {
            self.install_snapshot(ready.snapshot())?;
        }
        let committed = ready.take_committed_entries();
        self.hand_to_apply(committed)?;
        for read in ready.take_read_states() {
            let ctx = read
                .request_ctx
                .get(8..16)
                .and_then(|c| c.try_into().ok())
                .map(u64::from_be_bytes)
                .unwrap_or(0);
            if let Some(round) = self.reads_in_flight.remove(&ctx) {
                for reply in round.replies {
                    let _ = reply.send(Ok(read.index));
                }
                let answers = round
                    .followers
                    .into_iter()
                    .map(|request| read_index_answer(&self.raw.raft, request, read.index))
                    .collect();
                self.transport.send(self.group, answers);
            }
        }
        let sync = ready.must_sync();
        let store = self.raw.mut_store();
        store.append(ready.entries(), ready.hs())?;
        store.hand_over()?;
        self.written = Some(ready);
        Ok(sync)
    }

    /// The second half of the Ready [`Self::write_ready`] wrote, once it is
    /// durable.
    fn finish_ready(&mut self, synced: Option<Duration>) -> Result<(), Error> {
        let Some(mut ready) = self.written.take() else {
            return Ok(());
        };
        if let Some(took) = synced {
            self.shared.metrics.fsynced(took);
        }
        self.transport
            .send(self.group, ready.take_persisted_messages());
        // advance_append, not advance: entries are applied on the apply
        // thread, which reports its progress with Command::Applied.
        let mut light = self.raw.advance_append(ready);
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().note_commit(commit);
        }
        self.transport.send(self.group, light.take_messages());
        self.hand_to_apply(light.take_committed_entries())?;
        self.publish_status();
        Ok(())
    }

    /// raft accepted a snapshot a peer streamed: reset the log to it and
    /// have the apply thread load the state machine from its file.
    fn install_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), Error> {
        let meta = snapshot.get_metadata();
        let Some((index, file, members)) = self.received_snapshot.take() else {
            return Err(Error::Corrupt(format!(
                "raft applies snapshot {} that never arrived",
                meta.index
            )));
        };
        if index != meta.index {
            let _ = std::fs::remove_file(&file);
            return Err(Error::Corrupt(format!(
                "raft applies snapshot {} but {index} arrived",
                meta.index
            )));
        }
        tracing::info!(index, "installing a snapshot from the leader");
        self.raw.mut_store().apply_snapshot(meta, members.clone())?;
        self.transport
            .set_peers(self.group, &peer_urls(&members, self.shared.id));
        *self.shared.members.lock() = members;
        self.apply.send(ApplyWork::Snapshot { index, file });
        Ok(())
    }

    fn hand_to_apply(&self, entries: Vec<Entry>) -> Result<(), Error> {
        if entries.is_empty() {
            return Ok(());
        }
        self.apply.send(ApplyWork::Entries(entries));
        Ok(())
    }

    pub(super) fn publish_status(&self) {
        let raft = &self.raw.raft;
        let s = &self.shared;
        let leader_changed = s.leader.send_if_modified(|l| {
            let changed = *l != raft.leader_id;
            *l = raft.leader_id;
            changed
        });
        if leader_changed && raft.leader_id != raft::INVALID_ID {
            s.metrics.leader_changed();
        }
        s.term.store(raft.term, Ordering::Relaxed);
        s.commit.store(raft.raft_log.committed, Ordering::Relaxed);
        s.last_index
            .store(raft.raft_log.last_index(), Ordering::Relaxed);
        s.is_learner.store(
            raft.prs().conf().learners().contains(&s.id),
            Ordering::Relaxed,
        );
    }
}

impl<O: Send + 'static, L: RaftLog> Driven for RaftLoop<O, L> {
    fn start(&mut self) -> Result<(), Error> {
        self.next_tick = Instant::now() + self.tick_interval;
        self.campaign_if_alone()
    }

    fn handle(&mut self, command: Command) -> Result<bool, Error> {
        self.waking(|this| this.handle_command(command))
    }

    fn handle_event(&mut self, event: PeerEvent) -> Result<(), Error> {
        self.waking(|this| this.handle_peer_event(event))
    }

    fn next_tick(&self) -> Option<Instant> {
        (!self.asleep()).then_some(self.next_tick)
    }

    fn prepare(&mut self, now: Instant) -> Result<(), Error> {
        self.tick_if_due(now);
        self.propose_queued();
        self.issue_reads();
        Ok(())
    }

    fn has_ready(&self) -> bool {
        self.raw.has_ready()
    }

    fn write_ready(&mut self) -> Result<bool, Error> {
        RaftLoop::write_ready(self)
    }

    fn flush(&mut self, sync: bool) -> Result<(), Error> {
        self.raw.mut_store().flush(sync)
    }

    fn finish_ready(&mut self, synced: Option<Duration>) -> Result<(), Error> {
        RaftLoop::finish_ready(self, synced)
    }

    fn end_round(&mut self) {
        if !self.quiesce.is_empty() {
            self.transport
                .send(self.group, std::mem::take(&mut self.quiesce));
        }
    }

    fn stopped(&self) -> bool {
        self.shared.stopped.load(Ordering::SeqCst)
    }

    fn fail(&self, reason: StopReason) {
        self.shared.stop(reason);
    }

    fn finish(mut self: Box<Self>) {
        for reply in self.pending_reads.drain(..) {
            let _ = reply.send(Err(Error::Stopped));
        }
        for (_, round) in self.reads_in_flight.drain() {
            for reply in round.replies {
                let _ = reply.send(Err(Error::Stopped));
            }
        }
        if let Some((_, file, _)) = self.received_snapshot.take() {
            let _ = std::fs::remove_file(file);
        }
        self.transport.detach(self.group);
        self.shared.stop(StopReason::Shutdown);
        self.shared.fail_waiters();
    }
}

/// A ReadIndex round in flight: the member's own reads, and on a leader
/// the followers' requests it answers.
struct ReadRound {
    asked: Instant,
    replies: Vec<Reply<u64>>,
    followers: Vec<Message>,
}

/// The leader's answer to a follower's ReadIndex `request`, as raft-rs
/// gives it: the read index, in the leader's term (the entry at a
/// leader's read index is of its term), with the request's context.
fn read_index_answer<L: RaftLog>(raft: &raft::Raft<L>, request: Message, index: u64) -> Message {
    let mut answer = Message::default();
    answer.set_msg_type(MessageType::MsgReadIndexResp);
    answer.to = request.from;
    answer.from = raft.id;
    answer.term = raft.term;
    answer.index = index;
    answer.entries = request.entries;
    answer
}
