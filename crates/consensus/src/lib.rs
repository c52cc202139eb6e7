//! A raft-rs driver: a replicated log that feeds committed entries, in order,
//! to any [`StateMachine`].
//!
//! `RawNode` runs on a raft thread (one for all the groups of a member that
//! share a [`SharedRaftLog`], whose Readies of a round share one write and
//! one fsync). Proposals and reads that arrive while it handles one Ready
//! are batched into the next: one fsync serves them all.
//! Committed entries go to a second thread that applies them, so applying and
//! fsyncing overlap. The raft log lives in append-only segment files of its
//! own, as etcd's WAL; the state machine stores its applied index atomically
//! with its data, and on restart raft replays what came after it.
//!
//! The raft thread reaches its log and its peers through two traits, so
//! that one member can run many raft groups: the log (`RaftLog`:
//! raft-rs's `Storage` plus the writes of a Ready, split into append and
//! flush so that groups sharing one WAL share its fsyncs) and the transport
//! (`RaftTransport`: messages addressed by group and member). The WAL of
//! segment files and the gRPC transport are the production ones (a
//! [`PeerNetwork`] carries all of a member's groups, and a
//! [`SharedRaftLog`] holds their logs in one WAL, each group started with
//! [`Node::start_in`]); an
//! in-process transport with message filters runs whole clusters in the
//! crate's tests.
//!
//! A lone member summing the numbers proposed to it (in memory; the
//! `counter` example keeps its state in a file):
//!
//! ```
//! use std::sync::Arc;
//! use cairn_consensus::{Committed, Node, NodeConfig, SnapshotSource, StateMachine};
//!
//! struct Sum {
//!     applied: u64,
//!     total: u64,
//! }
//!
//! impl StateMachine for Sum {
//!     type Output = u64;
//!     type Error = std::io::Error;
//!
//!     fn applied_index(&self) -> u64 {
//!         self.applied
//!     }
//!
//!     fn apply(&mut self, entries: &[Committed], applied_index: u64) -> std::io::Result<Vec<u64>> {
//!         let mut totals = Vec::with_capacity(entries.len());
//!         for entry in entries {
//!             let number = entry.data.as_ref().try_into().map_err(std::io::Error::other)?;
//!             self.total += u64::from_be_bytes(number);
//!             totals.push(self.total);
//!         }
//!         self.applied = applied_index;
//!         Ok(totals)
//!     }
//!
//!     fn sync(&mut self) -> std::io::Result<()> {
//!         Ok(())
//!     }
//!
//!     fn snapshot_source(&self) -> Arc<dyn SnapshotSource> {
//!         Arc::new(NoPeers)
//!     }
//!
//!     fn restore(&mut self, _file: &std::path::Path) -> std::io::Result<()> {
//!         Err(std::io::Error::other("a lone member is sent no snapshots"))
//!     }
//! }
//!
//! struct NoPeers;
//!
//! impl SnapshotSource for NoPeers {
//!     fn write_snapshot(&self, _out: &mut dyn std::io::Write) -> std::io::Result<u64> {
//!         Err(std::io::Error::other("a lone member sends no snapshots"))
//!     }
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! tokio::runtime::Runtime::new()?.block_on(async {
//!     let node = Node::start(
//!         NodeConfig::single(1, dir.path().to_path_buf()),
//!         Sum { applied: 0, total: 0 },
//!     )?;
//!     // A lone voter elects itself at once.
//!     assert_eq!(node.wait_leader(std::time::Duration::from_secs(5)).await, Some(1));
//!     assert_eq!(node.propose(2u64.to_be_bytes().to_vec()).await?, 2);
//!     assert_eq!(node.propose(3u64.to_be_bytes().to_vec()).await?, 5);
//!     // A linearizable read barrier: everything committed before it is applied.
//!     let index = node.read_index().await?;
//!     assert!(node.status().applied_index >= index);
//!     node.shutdown();
//!     Ok(())
//! })
//! # }
//! ```

mod logger;
mod metrics;
mod node;
mod raft_log;
mod raft_transport;
mod storage;
#[cfg(test)]
mod test_cluster;
mod transport;

use std::path::PathBuf;
use std::time::Duration;

pub use metrics::{FSYNC_BUCKETS, RaftMetrics, RaftMetricsSnapshot};
pub use node::Node;
pub use raft_transport::{CLUSTER_GROUP, GroupId};
pub use storage::{SharedRaftLog, create_dir_durably};
pub use transport::{PeerNetwork, PeerTls, TransportError, fetch_cluster};

/// A member of the cluster as the consensus layer records it: raft ID plus
/// what clients and peers need to reach it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PeerInfo {
    pub id: u64,
    /// Empty until the member has started and published itself.
    pub name: String,
    pub peer_urls: Vec<String>,
    pub client_urls: Vec<String>,
    pub is_learner: bool,
}

/// A change of the cluster's membership.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum MembershipChange {
    /// A new voter, or a learner when `is_learner`.
    Add(PeerInfo),
    Remove(u64),
    /// Makes a learner a voter.
    Promote(u64),
    /// New peer URLs for a member.
    UpdatePeerUrls {
        id: u64,
        peer_urls: Vec<String>,
    },
    /// A member's name and client URLs, published when it starts.
    Publish {
        id: u64,
        name: String,
        client_urls: Vec<String>,
    },
}

/// Configuration of one raft member.
pub struct NodeConfig {
    /// This member's raft ID (never 0).
    pub id: u64,
    /// Carried on every peer message; a peer of another cluster is refused.
    pub cluster_id: u64,
    /// Which of the member's raft groups this node is ([`CLUSTER_GROUP`]
    /// for a member that runs one).
    pub group: GroupId,
    /// The members a brand-new cluster starts with. Empty when this member
    /// joins an existing cluster (it then waits to hear from the leader).
    /// Ignored when the log exists.
    pub initial_members: Vec<PeerInfo>,
    /// When joining an existing cluster: its members as they described
    /// themselves, so this member can reach them before it has replayed the
    /// log that registers them.
    pub join_members: Vec<PeerInfo>,
    /// Directory of this group's raft log and received snapshots.
    pub data_dir: PathBuf,
    /// Listeners for the peer URLs, TCP or Unix sockets ([`Node::start`]
    /// only: with [`Node::start_in`] the [`PeerNetwork`] has them).
    pub peer_listeners: Vec<cairn_net::Listener>,
    /// TLS between peers (etcd's --peer-* flags; [`Node::start`] only).
    pub peer_tls: Option<PeerTls>,
    /// Length of one raft tick (etcd's heartbeat interval).
    pub tick_interval: Duration,
    /// Ticks without a leader before an election (etcd: election timeout / heartbeat).
    pub election_ticks: usize,
    /// Ticks between heartbeats.
    pub heartbeat_ticks: usize,
    /// Applied entries after which the log is compacted (etcd's --snapshot-count).
    pub snapshot_count: u64,
    /// Whether the group sleeps when idle: no ticks and no heartbeats until
    /// a request or a message wakes it (for a member's many shard groups;
    /// a dead leader is then noticed when its connection breaks or a
    /// request comes, not by missed heartbeats).
    pub hibernate: bool,
}

impl NodeConfig {
    /// A lone voter with no peers and etcd's default timings (100 ms ticks,
    /// 1 s election).
    pub fn single(id: u64, data_dir: PathBuf) -> Self {
        NodeConfig {
            id,
            cluster_id: id,
            group: CLUSTER_GROUP,
            initial_members: vec![PeerInfo {
                id,
                name: String::new(),
                peer_urls: Vec::new(),
                client_urls: Vec::new(),
                is_learner: false,
            }],
            join_members: Vec::new(),
            data_dir,
            peer_listeners: Vec::new(),
            peer_tls: None,
            tick_interval: Duration::from_millis(100),
            election_ticks: 10,
            heartbeat_ticks: 1,
            snapshot_count: 100_000,
            hibernate: false,
        }
    }
}

/// A committed log entry carrying a proposal's data.
#[derive(Debug, Clone)]
pub struct Committed {
    pub index: u64,
    pub term: u64,
    pub data: bytes::Bytes,
}

/// What the log drives. Implementations must make `apply` atomic with
/// recording `applied_index`, so that replaying entries after a crash is
/// exactly-once.
pub trait StateMachine: Send + 'static {
    /// The result of applying one entry, handed to whoever proposed it.
    type Output: Send + 'static;

    /// Why applying, syncing or restoring failed; the node stops with it
    /// ([`StopReason::Failed`]).
    type Error: std::error::Error + Send + Sync + 'static;

    /// The last log index whose effects are stored (0 for a new machine).
    fn applied_index(&self) -> u64;

    /// Applies `entries` in order, and records `applied_index` (≥ the last
    /// entry's index: entries of raft's own, without data, are not passed)
    /// with their effects. Returns one output per entry. An error is fatal:
    /// the node stops.
    fn apply(
        &mut self,
        entries: &[Committed],
        applied_index: u64,
    ) -> Result<Vec<Self::Output>, Self::Error>;

    /// Makes everything applied so far durable, so that the log before it
    /// can be dropped.
    fn sync(&mut self) -> Result<(), Self::Error>;

    /// A handle that writes consistent snapshots of the state while apply
    /// goes on; the leader streams them to members too far behind.
    fn snapshot_source(&self) -> std::sync::Arc<dyn SnapshotSource>;

    /// Replaces the whole state with a snapshot written by a
    /// [`SnapshotSource`] (on another member), stored in `file`. Afterwards
    /// `applied_index` is the index the snapshot reflects.
    fn restore(&mut self, file: &std::path::Path) -> Result<(), Self::Error>;
}

/// Writes consistent snapshots of a state machine.
pub trait SnapshotSource: Send + Sync + 'static {
    /// Writes one consistent snapshot to `out` and returns the applied index
    /// it reflects. Errors of the source's own are io errors too
    /// ([`std::io::Error::other`]): the transport only reports them.
    fn write_snapshot(&self, out: &mut dyn std::io::Write) -> std::io::Result<u64>;
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What the state machine was doing when it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateMachineStep {
    /// Applying entries up to this index.
    Apply(u64),
    /// Making everything up to this index durable.
    Sync(u64),
    /// Restoring the snapshot of this index.
    Restore(u64),
}

impl std::fmt::Display for StateMachineStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StateMachineStep::Apply(index) => write!(f, "applying through {index}"),
            StateMachineStep::Sync(index) => write!(f, "syncing through {index}"),
            StateMachineStep::Restore(index) => write!(f, "restoring snapshot {index}"),
        }
    }
}

/// Why a node stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// [`Node::shutdown`] was called.
    Shutdown,
    /// The cluster removed this member; it must not come back.
    Removed,
    /// A fatal error: storage, the state machine, or a raft invariant.
    Failed(String),
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopReason::Shutdown => write!(f, "shut down"),
            StopReason::Removed => write!(
                f,
                "the member has been permanently removed from the cluster"
            ),
            StopReason::Failed(reason) => write!(f, "{reason}"),
        }
    }
}

/// A snapshot of the member's raft state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Status {
    pub id: u64,
    /// 0 when no leader is known.
    pub leader: u64,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub last_index: u64,
    pub is_learner: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Only from converting a raft log an earlier Cairn kept on fjall.
    #[error("raft log storage: {0}")]
    Storage(#[from] fjall::Error),
    #[error("raft log: {0}")]
    Io(#[from] std::io::Error),
    #[error("raft log encoding: {0}")]
    Encoding(#[from] protobuf::ProtobufError),
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    #[error("raft log is corrupt: {0}")]
    Corrupt(String),
    /// raft refused a proposal for a reason other than having no leader.
    #[error("raft refused the proposal: {0}")]
    ProposalRefused(String),
    /// The state machine failed; the error is its own.
    #[error("state machine: {during}: {source}")]
    StateMachine {
        during: StateMachineStep,
        source: BoxError,
    },
    /// raft dropped the proposal or read: no leader is known.
    #[error("no leader")]
    NoLeader,
    /// The node has stopped (shut down, or a fatal storage error).
    #[error("node stopped")]
    Stopped,
    #[error("member not found")]
    MemberNotFound,
    #[error("peer URLs already exist")]
    PeerUrlExists,
    #[error("member already exists")]
    MemberExists,
    #[error("not a learner")]
    MemberNotLearner,
    #[error("learner is not in sync with the leader")]
    LearnerNotReady,
    #[error("too many learners")]
    TooManyLearners,
    #[error("not the leader")]
    NotLeader,
    #[error("bad leader transferee")]
    BadLeaderTransferee,
    #[error("leader transfer timed out")]
    LeaderTransferTimeout,
}

impl Error {
    /// Whether the disk was full (ENOSPC, or a state machine that found too
    /// little room to apply): a condition that passes when space comes
    /// back, so the node waits and retries rather than stop.
    pub fn is_storage_full(&self) -> bool {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(error) = source {
            if let Some(io) = error.downcast_ref::<std::io::Error>()
                && io.kind() == std::io::ErrorKind::StorageFull
            {
                return true;
            }
            source = error.source();
        }
        false
    }
}
