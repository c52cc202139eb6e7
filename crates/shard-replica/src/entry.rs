//! What a shard's raft log carries: writes, and the markers that say a
//! batch of them was sequenced. A marker in the log orders the batch's
//! application after every write it covers on every replica, and survives
//! restarts with the log.

use cairn_api::cairnpb::{self, CrossTxn};
use cairn_api::etcdserverpb::RequestOp;
use cairn_api::etcdserverpb::request_op::Request;
use cairn_shard::{Revoke, Sequenced, TxnDecision, TxnId, TxnOutcome};
use prost::Message;

use crate::ShardWrite;

const WRITE: u8 = 1;
const SEQUENCED: u8 = 2;
const COMPACT: u8 = 3;
const REVOKE: u8 = 4;
const CROSS_TXN: u8 = 5;
const DECISION: u8 = 6;
/// shard (4 bytes), after, through, first revision, revisions (8 each),
/// then the batch's leases (8 each).
const SEQUENCED_LEN: usize = 4 + 4 * 8;
/// revision, lease (8 each), then each key's length (4) and bytes.
const REVOKE_LEN: usize = 2 * 8;

/// One entry of a shard's log.
#[derive(Debug, Clone, PartialEq)]
pub enum ShardEntry {
    Write(ShardWrite),
    Sequenced(Sequenced),
    /// The keyspace was compacted at this revision: every replica drops
    /// its shard's older revisions.
    Compact(i64),
    /// A lease was revoked: every replica deletes these keys of its at the
    /// revoke's revision.
    Revoke(Revoke),
    /// A cross-shard txn was decided: every replica applies its part of the
    /// chosen branch (or passes an aborted txn's prepare).
    Decision(TxnDecision),
}

/// A shard log entry that is not one [`ShardEntry::encode`] wrote.
#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    #[error("shard log entry: {0}")]
    Malformed(&'static str),
    #[error("shard log entry: {0}")]
    Decode(#[from] prost::DecodeError),
}

impl ShardEntry {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            ShardEntry::Decision(decision) => {
                let decision = cairnpb::TxnDecision {
                    id: Some(cairnpb::TxnId {
                        member: decision.id.member,
                        seq: decision.id.seq,
                    }),
                    shard: decision.shard,
                    index: decision.index,
                    outcome: match decision.outcome {
                        TxnOutcome::Aborted => 0,
                        TxnOutcome::Succeeded => 1,
                        TxnOutcome::Failed => 2,
                    },
                    revision: decision.revision,
                    changes: decision.changes,
                    leases: decision.leases.clone(),
                };
                let mut out = Vec::with_capacity(1 + decision.encoded_len());
                out.push(DECISION);
                decision
                    .encode(&mut out)
                    .expect("a Vec grows to hold what it is given");
                out
            }
            ShardEntry::Write(write) => {
                let request = match write.clone() {
                    ShardWrite::Put(put) => Request::RequestPut(put),
                    ShardWrite::DeleteRange(delete) => Request::RequestDeleteRange(delete),
                    ShardWrite::Txn(txn) => Request::RequestTxn(txn),
                    ShardWrite::CrossTxn(txn) => {
                        let mut out = Vec::with_capacity(1 + txn.encoded_len());
                        out.push(CROSS_TXN);
                        txn.encode(&mut out)
                            .expect("a Vec grows to hold what it is given");
                        return out;
                    }
                };
                let op = RequestOp {
                    request: Some(request),
                };
                let mut out = Vec::with_capacity(1 + op.encoded_len());
                out.push(WRITE);
                op.encode(&mut out)
                    .expect("a Vec grows to hold what it is given");
                out
            }
            ShardEntry::Sequenced(batch) => {
                let mut out = Vec::with_capacity(1 + SEQUENCED_LEN);
                out.push(SEQUENCED);
                out.extend_from_slice(&batch.shard.to_be_bytes());
                out.extend_from_slice(&batch.after.to_be_bytes());
                out.extend_from_slice(&batch.through.to_be_bytes());
                out.extend_from_slice(&batch.first_revision.to_be_bytes());
                out.extend_from_slice(&batch.revisions.to_be_bytes());
                for lease in &batch.leases {
                    out.extend_from_slice(&lease.to_be_bytes());
                }
                out
            }
            ShardEntry::Revoke(revoke) => {
                let keys: usize = revoke.keys.iter().map(|k| 4 + k.len()).sum();
                let mut out = Vec::with_capacity(1 + REVOKE_LEN + keys);
                out.push(REVOKE);
                out.extend_from_slice(&revoke.revision.to_be_bytes());
                out.extend_from_slice(&revoke.lease.to_be_bytes());
                for key in &revoke.keys {
                    // A key is at most etcd's request size, well under 4 GiB.
                    out.extend_from_slice(&(key.len() as u32).to_be_bytes());
                    out.extend_from_slice(key);
                }
                out
            }
            ShardEntry::Compact(revision) => {
                let mut out = Vec::with_capacity(9);
                out.push(COMPACT);
                out.extend_from_slice(&revision.to_be_bytes());
                out
            }
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<ShardEntry, EntryError> {
        let Some((&kind, body)) = bytes.split_first() else {
            return Err(EntryError::Malformed("empty"));
        };
        match kind {
            WRITE => match RequestOp::decode(body)?.request {
                Some(Request::RequestPut(put)) => Ok(ShardEntry::Write(ShardWrite::Put(put))),
                Some(Request::RequestDeleteRange(delete)) => {
                    Ok(ShardEntry::Write(ShardWrite::DeleteRange(delete)))
                }
                Some(Request::RequestTxn(txn)) => Ok(ShardEntry::Write(ShardWrite::Txn(txn))),
                Some(Request::RequestRange(_)) | None => {
                    Err(EntryError::Malformed("a write that writes nothing"))
                }
            },
            SEQUENCED => {
                if body.len() < SEQUENCED_LEN || !(body.len() - SEQUENCED_LEN).is_multiple_of(8) {
                    return Err(EntryError::Malformed("a sequenced batch of the wrong size"));
                }
                let word = |at: usize| {
                    let mut bytes = [0; 8];
                    bytes.copy_from_slice(&body[at..at + 8]);
                    bytes
                };
                let mut shard = [0; 4];
                shard.copy_from_slice(&body[..4]);
                Ok(ShardEntry::Sequenced(Sequenced {
                    shard: u32::from_be_bytes(shard),
                    after: u64::from_be_bytes(word(4)),
                    through: u64::from_be_bytes(word(12)),
                    first_revision: i64::from_be_bytes(word(20)),
                    revisions: u64::from_be_bytes(word(28)),
                    leases: (SEQUENCED_LEN..body.len())
                        .step_by(8)
                        .map(|at| i64::from_be_bytes(word(at)))
                        .collect(),
                }))
            }
            REVOKE => decode_revoke(body),
            CROSS_TXN => Ok(ShardEntry::Write(ShardWrite::CrossTxn(CrossTxn::decode(
                body,
            )?))),
            DECISION => {
                let decision = cairnpb::TxnDecision::decode(body)?;
                let id = decision.id.unwrap_or_default();
                Ok(ShardEntry::Decision(TxnDecision {
                    id: TxnId {
                        member: id.member,
                        seq: id.seq,
                    },
                    shard: decision.shard,
                    index: decision.index,
                    outcome: match decision.outcome {
                        0 => TxnOutcome::Aborted,
                        1 => TxnOutcome::Succeeded,
                        2 => TxnOutcome::Failed,
                        _ => return Err(EntryError::Malformed("an unknown txn outcome")),
                    },
                    revision: decision.revision,
                    changes: decision.changes,
                    leases: decision.leases,
                }))
            }
            COMPACT => {
                let bytes: [u8; 8] = body
                    .try_into()
                    .map_err(|_| EntryError::Malformed("a compaction of the wrong size"))?;
                Ok(ShardEntry::Compact(i64::from_be_bytes(bytes)))
            }
            _ => Err(EntryError::Malformed("unknown kind")),
        }
    }
}

fn decode_revoke(body: &[u8]) -> Result<ShardEntry, EntryError> {
    let malformed = || EntryError::Malformed("a revoke of the wrong size");
    let (head, mut rest) = body.split_at_checked(REVOKE_LEN).ok_or_else(malformed)?;
    let word = |at: usize| {
        let mut bytes = [0; 8];
        bytes.copy_from_slice(&head[at..at + 8]);
        i64::from_be_bytes(bytes)
    };
    let mut keys = Vec::new();
    while !rest.is_empty() {
        let (len, tail) = rest.split_at_checked(4).ok_or_else(malformed)?;
        let len = u32::from_be_bytes(len.try_into().map_err(|_| malformed())?) as usize;
        let (key, tail) = tail.split_at_checked(len).ok_or_else(malformed)?;
        keys.push(key.to_vec());
        rest = tail;
    }
    Ok(ShardEntry::Revoke(Revoke {
        revision: word(0),
        lease: word(8),
        keys,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_decode_as_encoded() -> Result<(), EntryError> {
        let entries = [
            ShardEntry::Sequenced(Sequenced {
                shard: 3,
                after: 4,
                through: 9,
                first_revision: 12,
                revisions: 2,
                leases: vec![7, 1 << 40],
            }),
            ShardEntry::Sequenced(Sequenced::default()),
            ShardEntry::Revoke(Revoke {
                revision: 20,
                lease: 7,
                keys: vec![b"a".to_vec(), Vec::new(), b"key".to_vec()],
            }),
            ShardEntry::Compact(5),
            ShardEntry::Write(ShardWrite::CrossTxn(CrossTxn {
                id: Some(cairnpb::TxnId { member: 3, seq: 9 }),
                participants: vec![0, 2],
                shards: 4,
                shard: 2,
                txn: Some(Default::default()),
            })),
            ShardEntry::Decision(TxnDecision {
                id: TxnId { member: 3, seq: 9 },
                shard: 2,
                index: 17,
                outcome: TxnOutcome::Failed,
                revision: 30,
                changes: true,
                leases: vec![5],
            }),
        ];
        for entry in entries {
            assert_eq!(ShardEntry::decode(&entry.encode())?, entry);
        }
        let mut cut = ShardEntry::Revoke(Revoke {
            revision: 1,
            lease: 1,
            keys: vec![b"abc".to_vec()],
        })
        .encode();
        cut.pop();
        assert!(ShardEntry::decode(&cut).is_err());
        Ok(())
    }
}
