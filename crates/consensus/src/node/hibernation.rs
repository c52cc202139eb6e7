//! Hibernation of an idle raft group (TiKV's hibernate regions,
//! CockroachDB's quiescence): a leader whose followers all hold its whole
//! log, with nothing proposed or read for an election timeout, sends each
//! of them a last heartbeat marked [`QUIESCE`] and stops ticking; a
//! follower caught up to that heartbeat stops ticking too. The group then
//! costs no ticks and no heartbeats until something happens: a proposal, a
//! read, a membership change, any other raft message, or the transport
//! reporting the leader unreachable (its connection broke) wakes it, and
//! the ordinary timers take over again (a dead leader is replaced an
//! election timeout later).

use raft::prelude::{Message, MessageType};
use raft::{RawNode, StateRole};

use crate::raft_log::RaftLog;

/// The context of the heartbeat that puts followers to sleep. Heartbeat
/// responses echo it; the leader's read tracking ignores a context it does
/// not know.
pub(super) const QUIESCE: &[u8] = b"cairn-quiesce";

pub(super) struct Hibernation {
    /// Idle ticks before a leader puts the group to sleep.
    after_ticks: usize,
    idle_ticks: usize,
    asleep: bool,
}

impl Hibernation {
    pub(super) fn new(after_ticks: usize) -> Hibernation {
        Hibernation {
            after_ticks: after_ticks.max(1),
            idle_ticks: 0,
            asleep: false,
        }
    }

    pub(super) fn asleep(&self) -> bool {
        self.asleep
    }

    pub(super) fn wake(&mut self) {
        self.asleep = false;
        self.idle_ticks = 0;
    }

    /// Called on each tick of a leader: once the group has been `idle` (no
    /// proposal or read pending) with every follower caught up for long
    /// enough, returns the heartbeats that put the followers to sleep, and
    /// sleeps.
    pub(super) fn on_tick<L: RaftLog>(
        &mut self,
        raw: &RawNode<L>,
        idle: bool,
    ) -> Option<Vec<Message>> {
        let raft = &raw.raft;
        let last = raft.raft_log.last_index();
        let quiet = idle
            && raft.state == StateRole::Leader
            && raft.lead_transferee.is_none()
            && raft.raft_log.committed == last
            && raft.raft_log.applied >= last
            && raft
                .prs()
                .iter()
                .all(|(id, pr)| *id == raft.id || pr.matched == last);
        if !quiet {
            self.idle_ticks = 0;
            return None;
        }
        self.idle_ticks += 1;
        if self.idle_ticks < self.after_ticks {
            return None;
        }
        self.asleep = true;
        let heartbeats = raft
            .prs()
            .iter()
            .filter(|(id, _)| **id != raft.id)
            .map(|(id, _)| Message {
                msg_type: MessageType::MsgHeartbeat,
                to: *id,
                from: raft.id,
                term: raft.term,
                commit: last,
                context: QUIESCE.to_vec().into(),
                ..Default::default()
            })
            .collect();
        Some(heartbeats)
    }

    /// Called with each raft message before it is stepped: a follower that
    /// gets its leader's quiesce heartbeat and holds everything it names
    /// sleeps; a sleeping group wakes on any other message but a heartbeat
    /// response; an awake one counts anything but heartbeats as activity.
    pub(super) fn on_message<L: RaftLog>(&mut self, raw: &RawNode<L>, message: &Message) {
        let quiesce = message.context.as_ref() == QUIESCE;
        match message.msg_type {
            MessageType::MsgHeartbeat if quiesce => {
                let raft = &raw.raft;
                self.asleep = raft.state == StateRole::Follower
                    && message.from == raft.leader_id
                    && message.term == raft.term
                    && raft.raft_log.last_index() == message.commit;
            }
            // Answers to heartbeats carry nothing to act on: the
            // followers were caught up before the leader slept.
            MessageType::MsgHeartbeatResponse => {}
            MessageType::MsgHeartbeat if !self.asleep => {}
            _ => self.wake(),
        }
    }
}
