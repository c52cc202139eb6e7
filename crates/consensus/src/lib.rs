//! A raft-rs driver: a replicated log that feeds committed entries, in order,
//! to any [`StateMachine`].
//!
//! `RawNode` runs on its own OS thread. Proposals and reads that arrive while
//! it handles one Ready are batched into the next: one fsync serves them all.
//! Committed entries go to a second thread that applies them, so applying and
//! fsyncing overlap. The raft log lives in a fjall database of its own; the
//! state machine stores its applied index atomically with its data, and on
//! restart raft replays what came after it.
//!
//! ```no_run
//! # use cairn_consensus::*;
//! # async fn demo<S: StateMachine<Output = u64>>(sm: S) -> Result<(), Error> {
//! let node = Node::start(NodeConfig::single(1, "/tmp/raft".into()), sm)?;
//! let output = node.propose(b"command".to_vec()).await?;
//! let applied = node.read_index().await?; // linearizable read barrier
//! # Ok(()) }
//! ```

mod logger;
mod node;
mod storage;

use std::path::PathBuf;
use std::time::Duration;

pub use node::Node;

/// Configuration of one raft member.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This member's raft ID (never 0).
    pub id: u64,
    /// The voters a brand-new log starts with; ignored when the log exists.
    pub initial_voters: Vec<u64>,
    /// Directory of the raft log database.
    pub log_dir: PathBuf,
    /// Length of one raft tick (etcd's heartbeat interval).
    pub tick_interval: Duration,
    /// Ticks without a leader before an election (etcd: election timeout / heartbeat).
    pub election_ticks: usize,
    /// Ticks between heartbeats.
    pub heartbeat_ticks: usize,
    /// Applied entries after which the log is compacted (etcd's --snapshot-count).
    pub snapshot_count: u64,
}

impl NodeConfig {
    /// A lone voter with etcd's default timings (100 ms ticks, 1 s election).
    pub fn single(id: u64, log_dir: PathBuf) -> Self {
        NodeConfig {
            id,
            initial_voters: vec![id],
            log_dir,
            tick_interval: Duration::from_millis(100),
            election_ticks: 10,
            heartbeat_ticks: 1,
            snapshot_count: 100_000,
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
    ) -> Result<Vec<Self::Output>, BoxError>;

    /// Makes everything applied so far durable, so that the log before it
    /// can be dropped.
    fn sync(&mut self) -> Result<(), BoxError>;
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

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
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("raft log storage: {0}")]
    Storage(#[from] fjall::Error),
    #[error("raft log encoding: {0}")]
    Encoding(#[from] protobuf::ProtobufError),
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    #[error("raft log is corrupt: {0}")]
    Corrupt(String),
    #[error("state machine: {0}")]
    StateMachine(String),
    /// raft dropped the proposal or read: no leader is known.
    #[error("no leader")]
    NoLeader,
    /// The node has stopped (shut down, or a fatal storage error).
    #[error("node stopped")]
    Stopped,
}
