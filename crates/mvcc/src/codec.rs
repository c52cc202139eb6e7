//! On-disk encoding of the `revisions` and `meta` keyspaces.
//!
//! A revision key is the big-endian main revision followed by the big-endian
//! sub revision, so the keyspace iterates in revision order. Its value is one
//! flag byte (put or tombstone) followed by the prost-encoded `KeyValue`.

use bytes::Bytes;
use cairn_api::mvccpb::KeyValue;
use prost::Message;

use crate::MvccError;
use crate::index::{Generation, NEVER_COMPACTED, Rev};

const PUT: u8 = 0;
const TOMBSTONE: u8 = 1;

/// Meta key of the consensus index committed with the last batch.
pub(crate) const APPLIED_INDEX: &[u8] = b"applied_index";
/// Meta key of the compact revision.
pub(crate) const COMPACT_REVISION: &[u8] = b"compact_revision";
/// Meta key of the name of the revisions keyspace in use, which a snapshot
/// restore changes; absent until the first restore.
pub(crate) const REVISIONS_KEYSPACE: &[u8] = b"revisions_keyspace";
/// Meta key naming the index checkpoint that is valid for this store: its
/// nonce, the current revision when it was made valid and the bytes of the
/// revisions stored then (so that an open from it need not add them up), as
/// big-endian u64s. Removed by a snapshot restore and by a compaction.
pub(crate) const INDEX_CHECKPOINT: &[u8] = b"index_checkpoint";
/// Meta key present from a compaction's commit until every revision it
/// dropped is deleted: a store opened meanwhile rebuilds its index from the
/// revisions, which finds the ones left to delete.
pub(crate) const COMPACTING: &[u8] = b"compacting";
/// Length of a revision key.
pub(crate) const REV_KEY_LEN: usize = 16;

/// Decodes only what rebuilding the index at start needs of a stored
/// `KeyValue` (its tags); prost skips the value.
#[derive(Clone, PartialEq, Message)]
struct IndexFields {
    #[prost(bytes = "bytes", tag = "1")]
    key: Bytes,
    #[prost(int64, tag = "2")]
    create_revision: i64,
    #[prost(int64, tag = "4")]
    version: i64,
    #[prost(int64, tag = "6")]
    lease: i64,
}

/// The key of lease `id` in the leases keyspace.
pub(crate) fn lease_key(id: i64) -> [u8; 8] {
    id.to_be_bytes()
}

pub(crate) fn decode_lease_key(key: &[u8]) -> Result<i64, MvccError> {
    let bytes: [u8; 8] = key
        .try_into()
        .map_err(|_| MvccError::Corrupt(format!("lease key of {} bytes", key.len())))?;
    Ok(i64::from_be_bytes(bytes))
}

pub(crate) fn rev_key(rev: Rev) -> [u8; REV_KEY_LEN] {
    let mut out = [0; REV_KEY_LEN];
    out[..8].copy_from_slice(&rev.main.to_be_bytes());
    out[8..].copy_from_slice(&u64::from(rev.sub).to_be_bytes());
    out
}

pub(crate) fn encode_entry(kv: &KeyValue, tombstone: bool) -> Vec<u8> {
    let body = kv.encode_to_vec();
    let mut out = Vec::with_capacity(1 + body.len());
    out.push(if tombstone { TOMBSTONE } else { PUT });
    out.extend_from_slice(&body);
    out
}

/// The revision a stored entry was written at, from its key and flag byte.
pub(crate) fn decode_rev(key: &[u8], value: &[u8]) -> Result<Rev, MvccError> {
    let (main, sub) = key
        .split_first_chunk::<8>()
        .and_then(|(main, sub)| Some((main, <[u8; 8]>::try_from(sub).ok()?)))
        .ok_or_else(|| MvccError::Corrupt(format!("revision key of {} bytes", key.len())))?;
    let main = i64::from_be_bytes(*main);
    let sub = u32::try_from(u64::from_be_bytes(sub))
        .map_err(|_| MvccError::Corrupt(format!("sub revision out of range at {main}")))?;
    let (flag, _) = split_flag(value)?;
    Ok(Rev {
        main,
        sub,
        tombstone: flag,
    })
}

/// The user key of a stored entry.
pub(crate) fn decode_key(value: &[u8]) -> Result<Bytes, MvccError> {
    decode_indexed(value).map(|(key, _)| key)
}

/// The user key of a stored entry, and the generation it records.
pub(crate) fn decode_indexed(value: &[u8]) -> Result<(Bytes, Generation), MvccError> {
    let (_, body) = split_flag(value)?;
    let fields = IndexFields::decode(body)
        .map_err(|e| MvccError::Corrupt(format!("stored key-value: {e}")))?;
    let generation = Generation {
        created: fields.create_revision,
        version: fields.version,
        lease: fields.lease,
    };
    Ok((fields.key, generation))
}

pub(crate) fn decode_kv(value: &[u8]) -> Result<KeyValue, MvccError> {
    let (_, body) = split_flag(value)?;
    KeyValue::decode(body).map_err(|e| MvccError::Corrupt(format!("stored key-value: {e}")))
}

fn split_flag(value: &[u8]) -> Result<(bool, &[u8]), MvccError> {
    match value.split_first() {
        Some((&PUT, body)) => Ok((false, body)),
        Some((&TOMBSTONE, body)) => Ok((true, body)),
        Some((flag, _)) => Err(MvccError::Corrupt(format!("revision flag {flag}"))),
        None => Err(MvccError::Corrupt("empty revision value".into())),
    }
}

/// The stored applied index; 0 if none was ever committed.
pub(crate) fn decode_applied(value: Option<&[u8]>) -> Result<u64, MvccError> {
    value.map_or(Ok(0), |v| decode_u64(v, "applied index"))
}

/// What meta's [`INDEX_CHECKPOINT`] holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CheckpointToken {
    pub(crate) nonce: u64,
    pub(crate) revision: i64,
    pub(crate) in_use: u64,
}

impl CheckpointToken {
    pub(crate) fn encode(&self) -> [u8; 24] {
        let mut out = [0; 24];
        out[..8].copy_from_slice(&self.nonce.to_be_bytes());
        out[8..16].copy_from_slice(&self.revision.to_be_bytes());
        out[16..].copy_from_slice(&self.in_use.to_be_bytes());
        out
    }

    pub(crate) fn decode(value: &[u8]) -> Result<CheckpointToken, MvccError> {
        let bytes: &[u8; 24] = value.try_into().map_err(|_| {
            MvccError::Corrupt(format!("index checkpoint record: {} bytes", value.len()))
        })?;
        let (nonce, rest) = bytes.split_at(8);
        let (revision, in_use) = rest.split_at(8);
        let word = |b: &[u8]| -> [u8; 8] { b.try_into().unwrap_or_default() };
        Ok(CheckpointToken {
            nonce: u64::from_be_bytes(word(nonce)),
            revision: i64::from_be_bytes(word(revision)),
            in_use: u64::from_be_bytes(word(in_use)),
        })
    }
}

/// A big-endian u64 meta value; `what` names it in the error.
pub(crate) fn decode_u64(value: &[u8], what: &str) -> Result<u64, MvccError> {
    <[u8; 8]>::try_from(value)
        .map(u64::from_be_bytes)
        .map_err(|_| MvccError::Corrupt(format!("{what}: {} bytes", value.len())))
}

/// The stored compact revision; [`NEVER_COMPACTED`] if none.
pub(crate) fn decode_compact(value: Option<&[u8]>) -> Result<i64, MvccError> {
    value.map_or(Ok(NEVER_COMPACTED), |v| {
        <[u8; 8]>::try_from(v)
            .map(i64::from_be_bytes)
            .map_err(|_| MvccError::Corrupt(format!("compact revision: {} bytes", v.len())))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revision_keys_sort_in_revision_order() {
        let a = rev_key(Rev {
            main: 2,
            sub: 300,
            tombstone: false,
        });
        let b = rev_key(Rev {
            main: 3,
            sub: 0,
            tombstone: false,
        });
        let c = rev_key(Rev {
            main: 3,
            sub: 1,
            tombstone: false,
        });
        assert!(a < b && b < c);
    }

    #[test]
    fn entry_round_trip() -> Result<(), MvccError> {
        let kv = KeyValue {
            key: Bytes::from_static(b"k"),
            value: Bytes::from_static(b"v"),
            create_revision: 2,
            mod_revision: 5,
            version: 3,
            lease: 7,
        };
        let rev = Rev {
            main: 5,
            sub: 1,
            tombstone: true,
        };
        let value = encode_entry(&kv, true);
        assert_eq!(decode_rev(&rev_key(rev), &value)?, rev);
        assert_eq!(decode_key(&value)?, kv.key);
        let generation = Generation {
            created: 2,
            version: 3,
            lease: 7,
        };
        assert_eq!(decode_indexed(&value)?, (kv.key.clone(), generation));
        assert_eq!(decode_kv(&value)?, kv);
        assert!(decode_kv(&[9, 1]).is_err());
        assert!(decode_rev(&[0; 15], &value).is_err());
        Ok(())
    }
}
