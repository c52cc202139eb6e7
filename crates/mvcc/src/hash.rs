//! etcd's HashKV: a checksum of the store up to a revision, equal on every
//! member that applied the same log, for consistency checks between members.

use fjall::Readable;

use crate::index::Rev;
use crate::{MvccError, Store, codec};

/// The result of [`Store::hash_kv`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvHash {
    pub hash: u32,
    /// The compact revision of the hashed store.
    pub compact_revision: i64,
    /// The store's current revision when it was hashed.
    pub current_revision: i64,
}

impl Store {
    /// Hashes every stored revision (key and stored value) up to `revision`
    /// (current when ≤ 0). Compaction deletes revisions in the same commit
    /// that records it, so two members with the same compact revision hash
    /// the same revisions.
    pub fn hash_kv(&self, revision: i64) -> Result<KvHash, MvccError> {
        let current = self.current_revision();
        let upto = if revision <= 0 { current } else { revision };
        if upto > current {
            return Err(MvccError::FutureRevision);
        }
        self.hash_through(upto)
    }

    /// Hashes every stored revision up to `revision` as [`Store::hash_kv`]
    /// does, even past this store's own last write: a shard's store holds
    /// the keyspace's revisions of its keys only, so the keyspace's revision
    /// is usually ahead of it (its caller knows the shard applied through
    /// it).
    pub fn hash_through(&self, upto: i64) -> Result<KvHash, MvccError> {
        let (snapshot, revisions) = {
            let state = self.inner.state.read();
            (self.inner.db.snapshot(), state.revisions.clone())
        };
        let current = self.current_revision();
        let compact = codec::decode_compact(
            snapshot
                .get(&self.inner.meta, codec::COMPACT_REVISION)?
                .as_deref(),
        )?;
        if upto < compact {
            return Err(MvccError::Compacted);
        }
        let end = codec::rev_key(Rev {
            main: upto + 1,
            sub: 0,
            tombstone: false,
        });
        let mut hasher = crc32fast::Hasher::new();
        for entry in snapshot.range(&revisions, ..end.as_slice()) {
            let (key, value) = entry.into_inner()?;
            hasher.update(&key);
            hasher.update(&value);
        }
        Ok(KvHash {
            hash: hasher.finalize(),
            compact_revision: compact.max(0),
            current_revision: current,
        })
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use cairn_api::etcdserverpb::PutRequest;

    use super::*;

    fn put(store: &Store, key: &str, value: &str, index: u64) -> Result<(), MvccError> {
        let mut batch = store.write();
        batch.put(&PutRequest {
            key: Bytes::from(key.to_string()),
            value: Bytes::from(value.to_string()),
            ..Default::default()
        })?;
        batch.commit(index).map(drop)
    }

    #[test]
    fn equal_histories_hash_equal_and_history_matters() -> Result<(), Box<dyn std::error::Error>> {
        let (a, b) = (tempfile::tempdir()?, tempfile::tempdir()?);
        let (a, b) = (Store::open(a.path())?, Store::open(b.path())?);
        for (i, (k, v)) in [("x", "1"), ("y", "2"), ("x", "3")].into_iter().enumerate() {
            put(&a, k, v, i as u64 + 1)?;
            put(&b, k, v, i as u64 + 1)?;
        }
        assert_eq!(a.hash_kv(0)?, b.hash_kv(0)?);
        let at_3 = a.hash_kv(3)?;
        assert_ne!(
            at_3.hash,
            a.hash_kv(4)?.hash,
            "a later revision changes the hash"
        );
        put(&b, "z", "9", 4)?;
        assert_eq!(
            a.hash_kv(3)?.hash,
            b.hash_kv(3)?.hash,
            "later writes do not change an old hash"
        );
        assert_ne!(a.hash_kv(0)?.hash, b.hash_kv(0)?.hash);
        assert!(matches!(a.hash_kv(99), Err(MvccError::FutureRevision)));
        // Past the store's last write: what the store holds through it.
        assert_eq!(a.hash_through(99)?.hash, a.hash_kv(0)?.hash);
        Ok(())
    }
}
