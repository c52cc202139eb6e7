//! The whole store as plain records, for backups in other formats (etcd's
//! bbolt snapshots) and for building a store from one.
//!
//! [`Store::export`] takes one consistent view: every stored revision (the
//! history since the last compaction, tombstones included), the compact
//! revision, the leases and the applied index, as of one committed batch.
//! [`import`] builds a new store on disk from such records.

use std::path::Path;

use cairn_api::mvccpb::KeyValue;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode, Readable, Snapshot};

use crate::index::{NEVER_COMPACTED, Rev};
use crate::{LEASES, META, MvccError, REVISIONS, STATE, Store, codec};

/// Revisions are written to a new store in fjall batches of this many.
const IMPORT_CHUNK: usize = 4096;

/// One stored revision: a put's key-value, or a delete's tombstone (whose
/// key-value holds the key; etcd's hold nothing else).
#[derive(Clone, Debug, PartialEq)]
pub struct StoredRevision {
    pub main: i64,
    pub sub: u32,
    pub tombstone: bool,
    pub kv: KeyValue,
}

/// A consistent view of the whole store; reading it never blocks writers.
pub struct Export {
    snapshot: Snapshot,
    revisions: Keyspace,
    leases: Keyspace,
    state_records: Keyspace,
    applied_index: u64,
    compact_revision: i64,
    current_revision: i64,
}

impl Store {
    /// Takes a consistent view of the whole store, as of a whole number of
    /// committed batches.
    pub fn export(&self) -> Result<Export, MvccError> {
        let View {
            snapshot,
            revisions,
            applied_index,
            compact,
        } = self.view()?;
        let last = match snapshot.iter(&revisions).next_back() {
            Some(entry) => {
                let (key, value) = entry.into_inner()?;
                codec::decode_rev(&key, &value)?.main
            }
            None => crate::index::INITIAL_REVISION,
        };
        Ok(Export {
            snapshot,
            revisions,
            leases: self.inner.leases.clone(),
            state_records: self.inner.state_records.clone(),
            applied_index,
            compact_revision: compact.max(0),
            current_revision: last.max(compact),
        })
    }
}

/// A consistent view of the store with the applied index and the compact
/// revision (NEVER_COMPACTED if never) that its batches committed.
pub(crate) struct View {
    pub snapshot: Snapshot,
    pub revisions: Keyspace,
    pub applied_index: u64,
    pub compact: i64,
}

impl Store {
    /// Takes the view for an export or a raft snapshot.
    pub(crate) fn view(&self) -> Result<View, MvccError> {
        let (snapshot, revisions) = {
            let state = self.inner.state.read();
            // Under the lock: a restore switches keyspaces (and commits the
            // meta naming the new one) while holding it for writing, so this
            // snapshot and this keyspace go together.
            (self.inner.db.snapshot(), state.revisions.clone())
        };
        // From the snapshot, not from memory: a batch commits its revisions,
        // applied index and compact revision together, and publishes them to
        // memory only afterwards.
        let applied_index = codec::decode_applied(
            snapshot
                .get(&self.inner.meta, codec::APPLIED_INDEX)?
                .as_deref(),
        )?;
        let compact = codec::decode_compact(
            snapshot
                .get(&self.inner.meta, codec::COMPACT_REVISION)?
                .as_deref(),
        )?;
        Ok(View {
            snapshot,
            revisions,
            applied_index,
            compact,
        })
    }
}

impl Export {
    /// The consensus index the view reflects.
    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }

    /// The revision of the last compaction; 0 if never compacted.
    pub fn compact_revision(&self) -> i64 {
        self.compact_revision
    }

    /// The store's revision in this view.
    pub fn current_revision(&self) -> i64 {
        self.current_revision
    }

    /// Every stored revision, in revision order.
    pub fn revisions(&self) -> impl Iterator<Item = Result<StoredRevision, MvccError>> + '_ {
        self.revisions_from(0, 0)
    }

    /// The stored revisions from (`main`, `sub`) on, in revision order:
    /// a backup read in pages starts each where the last ended.
    pub fn revisions_from(
        &self,
        main: i64,
        sub: u32,
    ) -> impl Iterator<Item = Result<StoredRevision, MvccError>> + '_ {
        let start = codec::rev_key(Rev {
            main,
            sub,
            tombstone: false,
        });
        self.snapshot
            .range(&self.revisions, start.to_vec()..)
            .map(|entry| {
                let (key, value) = entry.into_inner()?;
                let rev = codec::decode_rev(&key, &value)?;
                Ok(StoredRevision {
                    main: rev.main,
                    sub: rev.sub,
                    tombstone: rev.tombstone,
                    kv: codec::decode_kv(&value)?,
                })
            })
    }

    /// Every lease: its ID and the record stored for it.
    pub fn leases(&self) -> Result<Vec<(i64, Vec<u8>)>, MvccError> {
        self.snapshot
            .iter(&self.leases)
            .map(|entry| {
                let (key, value) = entry.into_inner()?;
                Ok((codec::decode_lease_key(&key)?, value.to_vec()))
            })
            .collect()
    }
}

impl Export {
    /// The state records (see [`Store::state_records`]) whose keys start
    /// with `prefix`.
    pub fn state_records(&self, prefix: &[u8]) -> Result<Vec<crate::StateRecord>, MvccError> {
        self.snapshot
            .prefix(&self.state_records, prefix)
            .map(|entry| {
                let (key, value) = entry.into_inner()?;
                Ok((key.to_vec(), value.to_vec()))
            })
            .collect()
    }
}

/// What [`import`] wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Imported {
    pub revisions: u64,
    pub leases: u64,
    /// The newest revision stored.
    pub last_revision: i64,
}

/// Builds a new store at `path` (which must not hold one) from `revisions`
/// (in strictly increasing revision order), `leases` (ID and record), state
/// records (key and value), the compact revision (0: never compacted) and
/// the applied index, and makes it durable. [`Store::open`] then opens it like any other.
///
/// A tombstone's key-value needs only its key (etcd's hold nothing else);
/// its mod revision is set to the tombstone's.
pub fn import<E: From<MvccError>>(
    path: &Path,
    applied_index: u64,
    compact_revision: i64,
    revisions: impl Iterator<Item = Result<StoredRevision, E>>,
    leases: impl IntoIterator<Item = (i64, Vec<u8>)>,
    state_records: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>,
) -> Result<Imported, E> {
    if path.exists()
        && std::fs::read_dir(path)
            .map_err(MvccError::from)?
            .next()
            .is_some()
    {
        return Err(MvccError::Corrupt(format!(
            "cannot import into {}: it is not empty",
            path.display()
        ))
        .into());
    }
    let db = Database::builder(path).open().map_err(MvccError::from)?;
    let open = |name: &str| {
        db.keyspace(name, KeyspaceCreateOptions::default)
            .map_err(MvccError::from)
    };
    let meta = open(META)?;
    let revisions_keyspace = open(REVISIONS)?;
    let leases_keyspace = open(LEASES)?;
    let state_keyspace = open(STATE)?;

    let mut imported = Imported {
        revisions: 0,
        leases: 0,
        last_revision: 0,
    };
    let mut last: Option<(i64, u32)> = None;
    let mut batch = db.batch();
    let mut in_batch = 0;
    for revision in revisions {
        let StoredRevision {
            main,
            sub,
            tombstone,
            mut kv,
        } = revision?;
        if main < 1 || last.is_some_and(|l| l >= (main, sub)) {
            return Err(MvccError::Corrupt(format!(
                "revision {main}/{sub} is out of order or invalid"
            ))
            .into());
        }
        last = Some((main, sub));
        if tombstone {
            kv.mod_revision = main;
        }
        let key = codec::rev_key(Rev {
            main,
            sub,
            tombstone,
        });
        batch.insert(
            &revisions_keyspace,
            key,
            codec::encode_entry(&kv, tombstone),
        );
        imported.revisions += 1;
        imported.last_revision = main;
        in_batch += 1;
        if in_batch == IMPORT_CHUNK {
            batch.commit().map_err(MvccError::from)?;
            batch = db.batch();
            in_batch = 0;
        }
    }
    for (id, record) in leases {
        batch.insert(&leases_keyspace, codec::lease_key(id), record);
        imported.leases += 1;
    }
    for (key, value) in state_records {
        batch.insert(&state_keyspace, key, value);
    }
    batch.insert(&meta, codec::APPLIED_INDEX, applied_index.to_be_bytes());
    if compact_revision > 0 && compact_revision != NEVER_COMPACTED {
        batch.insert(
            &meta,
            codec::COMPACT_REVISION,
            compact_revision.to_be_bytes(),
        );
    }
    batch.commit().map_err(MvccError::from)?;
    db.persist(PersistMode::SyncAll).map_err(MvccError::from)?;
    tracing::info!(
        path = %path.display(),
        revisions = imported.revisions,
        leases = imported.leases,
        compact_revision,
        applied_index,
        "imported mvcc store"
    );
    Ok(imported)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use cairn_api::etcdserverpb::{DeleteRangeRequest, PutRequest, RangeRequest};

    use super::*;

    fn put(store: &Store, key: &str, value: &str, index: u64) {
        let mut batch = store.write();
        batch
            .put(&PutRequest {
                key: Bytes::from(key.to_string()),
                value: Bytes::from(value.to_string()),
                lease: if key == "leased" { 7 } else { 0 },
                ..Default::default()
            })
            .expect("put");
        batch.commit(index).expect("commit");
    }

    fn get(store: &Store, key: &str, revision: i64) -> Result<Vec<KeyValue>, MvccError> {
        Ok(store
            .range(&RangeRequest {
                key: Bytes::from(key.to_string()),
                revision,
                ..Default::default()
            })?
            .kvs)
    }

    #[test]
    fn export_then_import_keeps_history_tombstones_leases_and_compaction() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("a")).expect("open");
        put(&store, "a", "1", 1); // rev 2
        put(&store, "a", "2", 2); // rev 3
        put(&store, "b", "1", 3); // rev 4
        put(&store, "leased", "x", 4); // rev 5
        let mut batch = store.write();
        batch.put_lease(7, vec![1, 2, 3]);
        batch
            .delete_range(&DeleteRangeRequest {
                key: Bytes::from_static(b"b"),
                ..Default::default()
            })
            .expect("delete");
        batch.commit(5).expect("commit"); // rev 6
        let mut batch = store.write();
        batch.compact(3).expect("compact");
        batch.commit(6).expect("commit");
        put(&store, "a", "3", 7); // rev 7

        let export = store.export().expect("export");
        // Written after the view was taken: not in it.
        put(&store, "later", "x", 8);
        assert_eq!(export.applied_index(), 7);
        assert_eq!(export.compact_revision(), 3);
        assert_eq!(export.current_revision(), 7);
        let revisions: Vec<StoredRevision> =
            export.revisions().collect::<Result<_, _>>().expect("read");
        let mains: Vec<i64> = revisions.iter().map(|r| r.main).collect();
        assert_eq!(mains, vec![3, 4, 5, 6, 7]);
        let from: Vec<i64> = export
            .revisions_from(5, 0)
            .map(|r| r.map(|r| r.main))
            .collect::<Result<_, _>>()
            .expect("read");
        assert_eq!(from, vec![5, 6, 7]);
        assert!(revisions[3].tombstone);
        assert_eq!(export.leases().expect("leases"), vec![(7, vec![1, 2, 3])]);

        // Strip tombstones down to their key, as etcd stores them.
        let stripped = revisions.into_iter().map(|mut r| {
            if r.tombstone {
                r.kv = KeyValue {
                    key: r.kv.key,
                    ..Default::default()
                };
            }
            Ok::<_, MvccError>(r)
        });
        let path = dir.path().join("b");
        let imported = import(
            &path,
            0,
            export.compact_revision(),
            stripped,
            export.leases().expect("leases"),
            [(b"auth".to_vec(), b"record".to_vec())],
        )
        .expect("import");
        assert_eq!(imported.revisions, 5);
        assert_eq!(imported.last_revision, 7);
        drop(export);

        let restored = Store::open(&path).expect("open");
        assert_eq!(restored.current_revision(), 7);
        assert_eq!(restored.compact_revision(), 3);
        assert_eq!(restored.applied_index(), 0);
        assert_eq!(get(&restored, "a", 0).expect("get")[0].value, "3");
        assert_eq!(get(&restored, "a", 3).expect("get")[0].value, "2");
        assert_eq!(get(&restored, "b", 5).expect("get")[0].value, "1");
        assert!(get(&restored, "b", 6).expect("get").is_empty());
        assert!(matches!(get(&restored, "a", 2), Err(MvccError::Compacted)));
        assert_eq!(restored.leases().expect("leases"), vec![(7, vec![1, 2, 3])]);
        assert_eq!(
            restored.state_records(b"auth").expect("state"),
            vec![(b"auth".to_vec(), b"record".to_vec())]
        );
        let (events, _) = restored.events_since(b"b", &[], 6, 10).expect("events");
        assert_eq!(events[0].kv.as_ref().map(|kv| kv.mod_revision), Some(6));

        // Never into an existing store.
        let again = import(
            &path,
            0,
            0,
            std::iter::empty::<Result<_, MvccError>>(),
            [],
            [],
        );
        assert!(again.is_err());
    }
}
