//! Reads across shards at one revision of the whole keyspace.
//!
//! A read at revision R needs, of each shard it touches, every batch the
//! cluster group sequenced at or below R. The cluster group keeps each
//! shard's last batch; the one before it ends where the last starts, and a
//! shard asks for its next batch only once the last is applied, so what R
//! needs of a shard is the last batch when it starts at or below R, and
//! the one before it otherwise.

use std::sync::Arc;

use cairn_api::etcdserverpb::{RangeRequest, RangeResponse, ResponseHeader};
use cairn_mvcc::MvccError;
use cairn_shard::{Keyspace, Sequencer, ShardId};

use crate::ShardHandle;

/// A read's revision and, for each shard, how far its replica must have
/// applied the shard's log to answer at that revision; taken from one state
/// of the cluster group's sequencer.
#[derive(Debug, Clone)]
pub struct ReadPoint {
    pub revision: i64,
    needed: Vec<u64>,
    /// By shard: the last revoke it must have applied.
    revoked: Vec<i64>,
}

impl ReadPoint {
    /// The sequencer's current revision: after a linearizable barrier on
    /// the cluster group (its ReadIndex), it covers every write
    /// acknowledged before the read began.
    pub fn latest(sequencer: &Sequencer, shards: u32) -> ReadPoint {
        let revision = sequencer.revision();
        let needed = (0..shards)
            .map(|shard| match sequencer.last(shard) {
                Some(last) if last.revisions > 0 && last.first_revision <= revision => last.through,
                Some(last) => last.after,
                None => 0,
            })
            .collect();
        let revoked = (0..shards).map(|s| sequencer.last_revoke(s)).collect();
        ReadPoint {
            revision,
            needed,
            revoked,
        }
    }

    /// The shard log index `shard` must be applied through.
    pub fn needed(&self, shard: ShardId) -> u64 {
        self.needed.get(shard as usize).copied().unwrap_or(0)
    }

    /// The revision of the last revoke `shard` must have applied.
    pub fn revoked(&self, shard: ShardId) -> i64 {
        self.revoked.get(shard as usize).copied().unwrap_or(0)
    }
}

/// One shard's part of `req` as of the keyspace's `revision`, from its
/// `replica` once that has applied the shard's log through `needed` and
/// the revoke at `revoked`.
pub async fn read_shard(
    replica: &ShardHandle,
    req: &RangeRequest,
    revision: i64,
    needed: u64,
    revoked: i64,
) -> Result<RangeResponse, MvccError> {
    replica.wait_applied(needed, revoked).await;
    // The replica may have applied more than the point needs (a batch or a
    // txn announced in its shard's log before this member's cluster group
    // applied the round that sequenced it): a read of the latest reads at
    // the point, not past it.
    if req.revision <= 0 {
        let at = RangeRequest {
            revision,
            ..req.clone()
        };
        let mut answer = replica.store().range_at(&at, revision)?;
        if let Some(header) = &mut answer.header {
            header.revision = revision;
        }
        return Ok(answer);
    }
    replica.store().range_at(req, revision)
}

/// The shards' answers to `req`, each read at `revision`, merged in the
/// order the request asks. Each shard returned up to `limit` keys: the
/// merge's first `limit` are among them.
pub fn merge(
    req: &RangeRequest,
    revision: i64,
    answers: impl IntoIterator<Item = RangeResponse>,
) -> RangeResponse {
    let mut merged = RangeResponse {
        header: Some(ResponseHeader {
            revision,
            ..Default::default()
        }),
        ..Default::default()
    };
    for answer in answers {
        merged.count += answer.count;
        merged.more |= answer.more;
        merged.kvs.extend(answer.kvs);
    }
    merged.kvs.sort_by(|a, b| a.key.cmp(&b.key));
    cairn_mvcc::sort_range(req, &mut merged.kvs);
    let limit = usize::try_from(req.limit).unwrap_or(0);
    if limit > 0 && merged.kvs.len() > limit {
        merged.kvs.truncate(limit);
        merged.more = true;
    }
    merged
}

/// Answers `req` at `point` from the local replicas of the shards it
/// touches (`replicas`, indexed by shard), each once it has applied what
/// the point needs. A request for a revision of its own reads there, at or
/// below the point's.
pub async fn range(
    keyspace: &Keyspace,
    replicas: &[Arc<ShardHandle>],
    req: &RangeRequest,
    point: &ReadPoint,
) -> Result<RangeResponse, MvccError> {
    let mut answers = Vec::new();
    for shard in keyspace.shards_of_range(&req.key, &req.range_end) {
        let Some(replica) = replicas.get(shard as usize) else {
            continue;
        };
        let (needed, revoked) = (point.needed(shard), point.revoked(shard));
        answers.push(read_shard(replica, req, point.revision, needed, revoked).await?);
    }
    Ok(merge(req, point.revision, answers))
}
