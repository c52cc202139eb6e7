//! The keyspace in shards: which shard a key belongs to ([`Keyspace`]);
//! where the replicas and the leader of each shard go ([`ShardMap`]): the
//! first placement of a new cluster, and the moves that rebalance it when
//! members come and go; and how writes committed in many shards get one
//! dense sequence of revisions ([`Sequencer`], [`RevisionLedger`]). Pure
//! data and arithmetic: no I/O, no raft. The design is in
//! `docs/sharding.md`.
//!
//! ```
//! use cairn_shard::{Keyspace, ShardMap};
//!
//! let keyspace = Keyspace::new(16)?;
//! let shard = keyspace.shard_of(b"/registry/pods/default/web-0");
//! assert!(shard < 16);
//!
//! // 16 shards of 3 replicas over members 1..=4: 12 replicas each, 4 leaderships each.
//! let mut map = ShardMap::place(16, 3, &[1, 2, 3, 4])?;
//! assert!(map.replica_counts().values().all(|&n| n == 12));
//! assert!(map.leader_counts().values().all(|&n| n == 4));
//!
//! // A fifth member: the plan moves replicas and leaderships onto it.
//! let moves = map.plan(&[1, 2, 3, 4, 5], 3);
//! for step in &moves {
//!     map.apply(step)?;
//! }
//! assert!(map.is_balanced(&[1, 2, 3, 4, 5], 3));
//! # Ok::<(), cairn_shard::ShardError>(())
//! ```

mod placement;
mod sequence;

pub use placement::{Move, ShardMap, ShardReplicas};
pub use sequence::{
    BatchReady, CompactRefused, CompareVote, RevisionLedger, Revoke, Sequenced, Sequencer,
    TxnDecision, TxnId, TxnOutcome, TxnVote,
};

/// A shard's number: 0 to the shard count - 1.
pub type ShardId = u32;

/// A member's raft ID.
pub type MemberId = u64;

/// The most shards a cluster may have: each is a raft group on several
/// members, and a member hosts its share of them.
pub const MAX_SHARDS: u32 = 4096;

/// Errors of shard arithmetic and placement.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardError {
    #[error("--shards must be between 1 and {MAX_SHARDS}, not {0}")]
    ShardCount(u32),
    #[error("--shard-replicas must be at least 1")]
    NoReplicas,
    #[error("a shard map needs at least one member")]
    NoMembers,
    #[error("shard {0} does not exist")]
    NoSuchShard(ShardId),
    #[error("shard {shard} has no replica on member {member:x}")]
    NotAReplica { shard: ShardId, member: MemberId },
    #[error("shard {shard} has a replica on member {member:x} already")]
    AlreadyAReplica { shard: ShardId, member: MemberId },
    #[error("shard {0} would be left without replicas")]
    LastReplica(ShardId),
}

/// How the keyspace is split: `shards` shards by hash of the key. Fixed
/// when a cluster is created, so the shard of a key never changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keyspace {
    shards: u32,
}

impl Keyspace {
    pub fn new(shards: u32) -> Result<Keyspace, ShardError> {
        if shards == 0 || shards > MAX_SHARDS {
            return Err(ShardError::ShardCount(shards));
        }
        Ok(Keyspace { shards })
    }

    pub fn shards(&self) -> u32 {
        self.shards
    }

    /// The shard holding `key`: xxh3 of the key, modulo the shard count.
    /// xxh3 has a fixed specification, so every member and every version
    /// agrees on it.
    pub fn shard_of(&self, key: &[u8]) -> ShardId {
        (xxhash_rust::xxh3::xxh3_64(key) % u64::from(self.shards)) as ShardId
    }

    /// The shards a request on `key` with etcd's `range_end` may touch: the
    /// key's own shard when the request names one key (empty `range_end`),
    /// every shard otherwise (hashing scatters a range).
    pub fn shards_of_range(&self, key: &[u8], range_end: &[u8]) -> std::ops::Range<ShardId> {
        if range_end.is_empty() {
            let shard = self.shard_of(key);
            shard..shard + 1
        } else {
            0..self.shards
        }
    }
}

#[cfg(test)]
mod tests;
