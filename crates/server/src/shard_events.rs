//! Watches over a sharded keyspace: the shards apply their batches each at
//! its own pace, and this merges their events back into the keyspace's
//! revision order for the watch hub, and serves watchers catching up from
//! every shard's store at once. Every member holds every shard, and
//! revisions are dense (each revision is one write of one shard), so
//! revision r can be published once every revision before it was.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use cairn_api::etcdserverpb::RangeRequest;
use cairn_api::mvccpb::{Event, KeyValue};
use cairn_mvcc::{MvccError, Store};
use cairn_shard::{Keyspace, Sequenced, Sequencer};
use cairn_watch_hub::{CatchUpError, Commit, EventSource, WatchHub};
use parking_lot::Mutex;

/// Batches applied here whose revisions cannot be published yet.
struct Merge {
    /// The next revision to publish.
    next: i64,
    /// By first revision: the batch's end (exclusive) and its events.
    pending: BTreeMap<i64, (i64, Vec<Event>)>,
}

/// The merged events of this member's shard replicas.
pub struct ShardEvents {
    keyspace: Keyspace,
    /// By shard ID.
    stores: Vec<Store>,
    merge: Mutex<Merge>,
    /// Every revision up to this one is applied here and published.
    published: AtomicI64,
    hub: Arc<WatchHub>,
    /// The cluster group's sequencer: the keyspace's compact revision.
    sequencer: Arc<Mutex<Sequencer>>,
}

/// What a watcher reads past events from: the one store, or the shards.
#[derive(Clone)]
pub enum KeyspaceEvents {
    Store(Store),
    Shards(Arc<ShardEvents>),
}

impl ShardEvents {
    /// Over the shards' `stores` (by shard ID), before any of them applies
    /// a batch: the revision every store has applied through comes from
    /// the stores and the cluster group's `sequencer`.
    pub fn new(
        keyspace: Keyspace,
        stores: Vec<Store>,
        applied_indexes: &[u64],
        sequencer: Arc<Mutex<Sequencer>>,
        hub: Arc<WatchHub>,
    ) -> ShardEvents {
        let through = Self::applied_through(&stores, applied_indexes, &sequencer.lock());
        let events = ShardEvents {
            keyspace,
            stores,
            merge: Mutex::new(Merge {
                next: through + 1,
                pending: BTreeMap::new(),
            }),
            published: AtomicI64::new(through),
            hub,
            sequencer,
        };
        // Batches applied after the sequencer's state was stored.
        let mut merge = events.merge.lock();
        events.skip_stored(&mut merge);
        events.published.store(merge.next - 1, Ordering::Release);
        drop(merge);
        events
    }

    /// The revision through which every shard has applied what it owns.
    fn applied_through(stores: &[Store], applied_indexes: &[u64], sequencer: &Sequencer) -> i64 {
        // A shard that applied its last sequenced batch has every revision
        // of its own up to the sequencer's; one that did not has those
        // before its first unapplied batch, which starts after what its
        // store holds (or where the last batch starts, if that is the one).
        let mut through = sequencer.revision();
        for (shard, store) in stores.iter().enumerate() {
            let applied = applied_indexes.get(shard).copied().unwrap_or(0);
            if let Some(last) = sequencer.last(shard as u32)
                && last.through > applied
            {
                let first_unapplied = if last.after == applied {
                    last.first_revision
                } else {
                    store.current_revision() + 1
                };
                through = through.min(first_unapplied - 1);
            }
        }
        through
    }

    /// Takes a batch one shard applied; publishes every batch that is next.
    pub fn applied(&self, batch: &Sequenced, events: Vec<Event>) {
        if batch.revisions == 0 {
            return;
        }
        let mut merge = self.merge.lock();
        if batch.end_revision() <= merge.next {
            return;
        }
        merge
            .pending
            .insert(batch.first_revision, (batch.end_revision(), events));
        loop {
            let next = merge.next;
            if let Some((end, events)) = merge.pending.remove(&next) {
                merge.next = end;
                // Watchers catching up read up to here from the stores.
                self.published.store(end - 1, Ordering::Release);
                self.hub.publish(Commit {
                    prev_revision: next - 1,
                    revision: end - 1,
                    events,
                });
                continue;
            }
            if merge.pending.is_empty() || !self.skip_stored(&mut merge) {
                break;
            }
        }
        self.published.store(merge.next - 1, Ordering::Release);
    }

    /// Moves past revisions the stores hold that no batch here reported (a
    /// snapshot brought them); whether it moved. Watchers read them from
    /// the stores: the next commit tells them they are behind.
    fn skip_stored(&self, merge: &mut Merge) -> bool {
        let start = merge.next;
        while self.stores.iter().any(|store| {
            store
                .events_since(&[0], &[0], merge.next, 1)
                .ok()
                .and_then(|(events, _)| events.first()?.kv.as_ref().map(|kv| kv.mod_revision))
                == Some(merge.next)
        }) {
            merge.next += 1;
        }
        merge.next > start
    }

    fn current_revision(&self) -> i64 {
        self.published.load(Ordering::Acquire)
    }

    fn compact_revision(&self) -> i64 {
        self.sequencer.lock().compacted()
    }

    /// Each shard's events from `from` on, merged in revision order, up to
    /// what is published and what every shard read in full.
    fn events_since(
        &self,
        key: &[u8],
        range_end: &[u8],
        from: i64,
        limit: usize,
    ) -> Result<(Vec<Event>, i64), MvccError> {
        if from < self.compact_revision() {
            return Err(MvccError::Compacted);
        }
        let mut through = self.current_revision();
        let mut merged = Vec::new();
        for shard in self.keyspace.shards_of_range(key, range_end) {
            let Some(store) = self.stores.get(shard as usize) else {
                continue;
            };
            let (events, next) = store.events_since(key, range_end, from, limit)?;
            // A shard that stopped at its limit read nothing from `next` on.
            if events.len() >= limit {
                through = through.min(next - 1);
            }
            merged.extend(events);
        }
        merged.retain(|e| e.kv.as_ref().is_some_and(|kv| kv.mod_revision <= through));
        // Stable: one revision's events come from one shard, in its order.
        merged.sort_by_key(|e| e.kv.as_ref().map_or(0, |kv| kv.mod_revision));
        Ok((merged, through.max(from - 1) + 1))
    }

    fn kv_at(&self, key: &[u8], revision: i64) -> Option<KeyValue> {
        let store = self.stores.get(self.keyspace.shard_of(key) as usize)?;
        let request = RangeRequest {
            key: bytes::Bytes::copy_from_slice(key),
            revision,
            ..Default::default()
        };
        store
            .range_at(&request, self.current_revision())
            .ok()?
            .kvs
            .into_iter()
            .next()
    }
}

impl EventSource for KeyspaceEvents {
    fn current_revision(&self) -> i64 {
        match self {
            KeyspaceEvents::Store(store) => Store::current_revision(store),
            KeyspaceEvents::Shards(shards) => shards.current_revision(),
        }
    }

    fn compact_revision(&self) -> i64 {
        match self {
            KeyspaceEvents::Store(store) => Store::compact_revision(store),
            KeyspaceEvents::Shards(shards) => shards.compact_revision(),
        }
    }

    fn events_since(
        &self,
        key: &[u8],
        range_end: &[u8],
        from_revision: i64,
        limit: usize,
    ) -> Result<(Vec<Event>, i64), CatchUpError> {
        match self {
            KeyspaceEvents::Store(store) => {
                EventSource::events_since(store, key, range_end, from_revision, limit)
            }
            KeyspaceEvents::Shards(shards) => {
                Ok(shards.events_since(key, range_end, from_revision, limit)?)
            }
        }
    }

    fn kv_at(&self, key: &[u8], revision: i64) -> Option<KeyValue> {
        match self {
            KeyspaceEvents::Store(store) => EventSource::kv_at(store, key, revision),
            KeyspaceEvents::Shards(shards) => shards.kv_at(key, revision),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_api::etcdserverpb::PutRequest;
    use cairn_watch_hub::{Delivery, WatchSpec};

    /// Writes `key` at `revision` into `store`, as a shard applying a
    /// one-write batch does: the batch with its events.
    fn write(store: &Store, shard: u32, key: &str, revision: i64) -> (Sequenced, Vec<Event>) {
        let mut batch = store.write();
        batch.skip_to(revision).expect("a later revision");
        batch
            .put(&PutRequest {
                key: key.to_owned().into(),
                value: "v".into(),
                ..Default::default()
            })
            .expect("put");
        let events = batch.commit(revision as u64).expect("commit");
        let sequenced = Sequenced {
            shard,
            after: 0,
            through: 1,
            first_revision: revision,
            revisions: 1,
        };
        (sequenced, events)
    }

    #[tokio::test]
    async fn shards_events_reach_watchers_in_revision_order() -> anyhow::Result<()> {
        let dirs = [tempfile::tempdir()?, tempfile::tempdir()?];
        let stores = vec![Store::open(dirs[0].path())?, Store::open(dirs[1].path())?];
        let hub = WatchHub::new();
        let sequencer = Arc::new(Mutex::new(Sequencer::new(2, 1)?));
        let events = Arc::new(ShardEvents::new(
            Keyspace::new(2)?,
            stores.clone(),
            &[0, 0],
            sequencer,
            hub.clone(),
        ));
        let mut stream = hub.open(KeyspaceEvents::Shards(events.clone()));
        stream.create(WatchSpec {
            key: vec![0].into(),
            range_end: vec![0].into(),
            ..Default::default()
        })?;

        // Revision 2 is in shard 0's store, but its batch was never handed
        // over (a snapshot brought it); shard 1 applies revision 4 before
        // shard 0 applies 3.
        let _ = write(&stores[0], 0, "a", 2);
        let (four, four_events) = write(&stores[1], 1, "c", 4);
        events.applied(&four, four_events);
        assert_eq!(
            events.current_revision(),
            2,
            "2 is stored, 3 is not applied yet"
        );
        let (three, three_events) = write(&stores[0], 0, "b", 3);
        events.applied(&three, three_events);
        assert_eq!(events.current_revision(), 4);

        let mut seen = Vec::new();
        while seen.len() < 3 {
            let Delivery::Events { events, .. } = stream.next().await else {
                panic!("a watcher of every key is not cancelled");
            };
            seen.extend(
                events
                    .iter()
                    .filter_map(|e| e.kv.clone())
                    .map(|kv| kv.mod_revision),
            );
        }
        assert_eq!(seen, [2, 3, 4]);

        // A watcher from the start reads the history of both stores merged.
        let (history, next) = events.events_since(&[0], &[0], 2, 1000)?;
        let history: Vec<i64> = history
            .iter()
            .filter_map(|e| e.kv.as_ref())
            .map(|kv| kv.mod_revision)
            .collect();
        assert_eq!((history, next), (vec![2, 3, 4], 5));
        assert_eq!(events.kv_at(b"c", 4).map(|kv| kv.version), Some(1));
        Ok(())
    }
}
