//! What the raft thread needs of the network, as a trait: send a group's
//! messages to member IDs, and know which members are its peers. What comes
//! back (messages, unreachable peers, snapshot outcomes, received
//! snapshots) arrives as [`PeerEvent`]s on the group's channel.
//!
//! Every call names the raft group, so that one member can carry many
//! groups over one connection per peer: a transport keys its routes by
//! (group, member) and batches every group's messages to one member
//! together. The gRPC transport ([`crate::transport::Transport`]) carries
//! every group a member attaches to it over one stream per peer; the
//! in-process transport of the test cluster routes by (group, member).

use std::path::PathBuf;
use std::sync::Arc;

use raft::prelude::Message;

use tokio::sync::watch;

use crate::{SnapshotSource, StopReason};

/// What the transport tells the raft thread.
pub(crate) enum PeerEvent {
    /// A raft message from a peer, to step into the local RawNode.
    Message(Message),
    /// Sending to this peer failed or its queue was full: RawNode::report_unreachable.
    Unreachable(u64),
    /// The outcome of streaming a snapshot to a peer: report_snapshot(to, Finish or Failure).
    SnapshotSent { to: u64, ok: bool },
    /// A snapshot arrived: its MsgSnapshot (as sent), the state-machine data
    /// saved in `file`, and the `members` blob the sender attached.
    SnapshotReceived {
        message: Message,
        file: PathBuf,
        members: Vec<u8>,
    },
}

impl std::fmt::Debug for PeerEvent {
    // Raft messages can carry megabytes of entries: print their gist only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerEvent::Message(m) => write!(
                f,
                "Message({:?} {} -> {}, term {}, {} entries)",
                m.msg_type,
                m.from,
                m.to,
                m.term,
                m.entries.len()
            ),
            PeerEvent::Unreachable(id) => write!(f, "Unreachable({id})"),
            PeerEvent::SnapshotSent { to, ok } => {
                write!(f, "SnapshotSent {{ to: {to}, ok: {ok} }}")
            }
            PeerEvent::SnapshotReceived {
                message,
                file,
                members,
            } => write!(
                f,
                "SnapshotReceived {{ from: {}, index: {}, file: {}, members: {} bytes }}",
                message.from,
                message.get_snapshot().get_metadata().index,
                file.display(),
                members.len()
            ),
        }
    }
}

/// Which raft group a message belongs to.
pub type GroupId = u64;

/// The group every member belongs to, which holds the member registry (the
/// only group of a member that runs one).
pub const CLUSTER_GROUP: GroupId = 0;

/// The raft peer transport of one member, as the raft thread uses it.
/// Calls come from the raft thread, which has no async runtime: they must
/// never block.
pub(crate) trait RaftTransport: Send + Sync + 'static {
    /// Sends `messages` of `group`, each to its `to` member, keeping their
    /// order per member. A MsgSnapshot streams the group's state-machine
    /// snapshot; its outcome comes back as [`PeerEvent::SnapshotSent`].
    /// What cannot be sent is dropped and reported as
    /// [`PeerEvent::Unreachable`]: raft retransmits what matters.
    fn send(&self, group: GroupId, messages: Vec<Message>);

    /// Replaces the peers of `group`: member ID and peer URLs (never this
    /// member itself).
    fn set_peers(&self, group: GroupId, peers: &[(u64, Vec<String>)]);

    /// The group has stopped here: its messages are no longer routed to
    /// it, and it has no peers.
    fn detach(&self, group: GroupId);
}

/// Where a transport hands a group's [`PeerEvent`]s: the queue of the raft
/// thread that drives the group. Never blocks.
#[derive(Clone)]
pub(crate) struct EventSender(Arc<dyn Fn(PeerEvent) -> bool + Send + Sync>);

impl EventSender {
    /// `send` queues an event, false when the group's raft thread is gone.
    pub(crate) fn new(send: impl Fn(PeerEvent) -> bool + Send + Sync + 'static) -> EventSender {
        EventSender(Arc::new(send))
    }

    /// False when the event could not be queued.
    pub(crate) fn send(&self, event: PeerEvent) -> bool {
        (self.0)(event)
    }

    /// Whether `other` is this sender or a clone of it.
    #[cfg(test)]
    pub(crate) fn same(&self, other: &EventSender) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// A sender onto a channel of the test's own.
    #[cfg(test)]
    pub(crate) fn channel() -> (EventSender, crossbeam_channel::Receiver<PeerEvent>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        (EventSender::new(move |event| tx.send(event).is_ok()), rx)
    }
}

/// What a transport must reach of one raft group on this member.
pub(crate) struct GroupEndpoint {
    pub group: GroupId,
    /// This member's raft ID.
    pub member: u64,
    /// Where the group's raft thread takes [`PeerEvent`]s from.
    pub events: EventSender,
    /// Writes the state-machine data of outgoing snapshots.
    pub snapshot_source: Arc<dyn SnapshotSource>,
    /// The member registry, attached to each outgoing snapshot.
    pub members_blob: Arc<dyn Fn() -> Vec<u8> + Send + Sync>,
    /// Where received snapshots are written; whoever takes the
    /// SnapshotReceived deletes the file.
    pub snap_dir: PathBuf,
    /// Holds a reason once the member's node has stopped.
    pub stopped: watch::Receiver<Option<StopReason>>,
}
