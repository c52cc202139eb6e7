//! Watches over a sharded keyspace: the shards apply their batches each at
//! its own pace, and this merges the events of the shards this member
//! holds back into the keyspace's revision order for the watch hub, and
//! serves watchers catching up from those shards' stores at once.
//! Revisions are dense (each revision is one write of one shard, or a
//! lease's revoke or a cross-shard txn, which several shards deliver in
//! parts), and the cluster group's sequencer says how far each shard's
//! batches, revokes and txns go, so revision r can be published once every
//! shard held here has handed over everything it has through r; revisions
//! of shards held elsewhere are passed over (watches here cover only the
//! shards held here).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use cairn_api::etcdserverpb::RangeRequest;
use cairn_api::mvccpb::{Event, KeyValue};
use cairn_mvcc::{MvccError, Store};
use cairn_shard::{Keyspace, Sequenced, Sequencer, ShardId};
use cairn_shard_replica::EventSink;
use cairn_watch_hub::{CatchUpError, Commit, EventSource, WatchHub};
use parking_lot::Mutex;
use tokio::sync::watch;

/// How far a shard held here has handed over its batches.
#[derive(Debug, Clone, Copy)]
struct Delivered {
    /// The shard log index its last handed-over batch covers.
    index: u64,
    /// The last revision it holds.
    revision: i64,
    /// The revision of the last revoke it handed over.
    revoked: i64,
}

/// A revision range's events, by shard (a revoke's revision comes in parts
/// from several shards).
type Parts = Vec<(ShardId, Vec<Event>)>;

/// Batches applied here whose revisions cannot be published yet.
struct Merge {
    /// By shard ID; `None` for shards held on other members.
    delivered: Vec<Option<Delivered>>,
    /// By first revision: the batch's end (exclusive) and its events.
    pending: BTreeMap<i64, (i64, Parts)>,
    /// The revision of the last commit handed to the hub.
    last_commit: i64,
    /// The last revision a snapshot brought to a shard held here: no
    /// commit may cover it, so that watchers read it from the stores.
    restored_through: i64,
}

/// The merged events of this member's shard replicas.
pub struct ShardEvents {
    keyspace: Keyspace,
    /// By shard ID; `None` for shards held on other members.
    stores: Vec<Option<Store>>,
    merge: Mutex<Merge>,
    /// Every revision up to this one is applied here and published.
    published: AtomicI64,
    hub: Arc<WatchHub>,
    /// The cluster group's sequencer: how far each shard's batches go, and
    /// the keyspace's compact revision.
    sequencer: Arc<Mutex<Sequencer>>,
}

/// What a watcher reads past events from: the one store, or the shards.
#[derive(Clone)]
pub enum KeyspaceEvents {
    Store(Store),
    Shards(Arc<ShardEvents>),
}

impl ShardEvents {
    /// Over the `stores` of the shards held here (by shard ID), before any
    /// of them applies a batch; `applied_indexes` (by shard ID) says how
    /// far each store has applied its shard's log.
    pub fn new(
        keyspace: Keyspace,
        stores: Vec<Option<Store>>,
        applied_indexes: &[u64],
        sequencer: Arc<Mutex<Sequencer>>,
        hub: Arc<WatchHub>,
    ) -> ShardEvents {
        let delivered = stores
            .iter()
            .enumerate()
            .map(|(shard, store)| {
                store.as_ref().map(|store| Delivered {
                    index: applied_indexes.get(shard).copied().unwrap_or(0),
                    revision: store.current_revision(),
                    revoked: cairn_shard_replica::revoked_through(store),
                })
            })
            .collect();
        let mut merge = Merge {
            delivered,
            pending: BTreeMap::new(),
            last_commit: 0,
            restored_through: 0,
        };
        let through = Self::publishable(&merge, &sequencer.lock());
        merge.last_commit = through;
        ShardEvents {
            keyspace,
            stores,
            merge: Mutex::new(merge),
            published: AtomicI64::new(through),
            hub,
            sequencer,
        }
    }

    /// Publishes what the cluster group's new rounds allow, each time
    /// `sequenced` says it applied one, until the member stops.
    pub fn follow(
        self: &Arc<Self>,
        mut sequenced: watch::Receiver<i64>,
    ) -> tokio::task::JoinHandle<()> {
        let events = self.clone();
        tokio::spawn(async move {
            while sequenced.changed().await.is_ok() {
                let mut merge = events.merge.lock();
                events.publish(&mut merge);
            }
        })
    }

    /// The revision through which every shard held here has handed over
    /// its batches: all of the sequencer's, but for a shard that has not
    /// yet handed over its last sequenced batch, only what comes before its
    /// next batch, and for one that has not handed over its last revoke,
    /// only what it holds (what it hands over next comes after that; the
    /// revisions of other shards between wait for it, briefly).
    fn publishable(merge: &Merge, sequencer: &Sequencer) -> i64 {
        let mut through = sequencer.revision();
        for (shard, delivered) in (0..).zip(&merge.delivered) {
            let Some(delivered) = delivered else {
                continue;
            };
            if sequencer.last_revoke(shard) > delivered.revoked {
                through = through.min(delivered.revision);
            }
            match sequencer.last(shard) {
                Some(last) if last.through > delivered.index => {
                    // Its next batch is the last one, or starts after what
                    // it holds.
                    let next = if last.after == delivered.index {
                        last.first_revision
                    } else {
                        delivered.revision + 1
                    };
                    through = through.min(next - 1);
                }
                _ => {}
            }
        }
        through
    }

    /// Hands the hub every pending batch that is publishable, in revision
    /// order.
    fn publish(&self, merge: &mut Merge) {
        let through = Self::publishable(merge, &self.sequencer.lock());
        while let Some(entry) = merge.pending.first_entry() {
            let end = entry.get().0;
            if end - 1 > through {
                break;
            }
            let (first, (end, mut parts)) = entry.remove_entry();
            // A revoke's parts in shard order, as a catch-up read merges
            // them.
            parts.sort_by_key(|(shard, _)| *shard);
            let events = parts.into_iter().flat_map(|(_, events)| events).collect();
            // Watchers catching up read up to here from the stores.
            self.published.fetch_max(end - 1, Ordering::AcqRel);
            // The commit covers the revisions passed over since the last
            // (none of them has an event here), but not those a snapshot
            // brought: a watcher before them is behind, and reads them.
            let prev_revision = merge.last_commit.max(merge.restored_through.min(first - 1));
            self.hub.publish(Commit {
                prev_revision,
                revision: end - 1,
                events,
            });
            merge.last_commit = end - 1;
        }
        self.published.fetch_max(through, Ordering::AcqRel);
    }

    fn delivered(merge: &mut Merge, shard: ShardId) -> Option<&mut Delivered> {
        merge.delivered.get_mut(shard as usize)?.as_mut()
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
            let Some(Some(store)) = self.stores.get(shard as usize) else {
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
        // Stable: one revision's events come from one shard in its order, or
        // (a revoke's or a cross-shard txn's) from several in shard order.
        merged.sort_by_key(|e| e.kv.as_ref().map_or(0, |kv| kv.mod_revision));
        Ok((merged, through.max(from - 1) + 1))
    }

    fn kv_at(&self, key: &[u8], revision: i64) -> Option<KeyValue> {
        let store = self
            .stores
            .get(self.keyspace.shard_of(key) as usize)?
            .as_ref()?;
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

impl EventSink for ShardEvents {
    fn applied(&self, batch: &Sequenced, events: Vec<Event>) {
        let mut merge = self.merge.lock();
        if let Some(delivered) = Self::delivered(&mut merge, batch.shard) {
            delivered.index = delivered.index.max(batch.through);
            if batch.revisions > 0 {
                delivered.revision = delivered.revision.max(batch.end_revision() - 1);
            }
        }
        if batch.revisions > 0 && batch.end_revision() - 1 > self.current_revision() {
            merge.pending.insert(
                batch.first_revision,
                (batch.end_revision(), vec![(batch.shard, events)]),
            );
        }
        self.publish(&mut merge);
    }

    fn revoked(&self, shard: ShardId, revision: i64, events: Vec<Event>) {
        let mut merge = self.merge.lock();
        if let Some(delivered) = Self::delivered(&mut merge, shard) {
            delivered.revoked = delivered.revoked.max(revision);
            delivered.revision = delivered.revision.max(revision);
        }
        if revision > self.current_revision() {
            merge
                .pending
                .entry(revision)
                .or_insert_with(|| (revision + 1, Vec::new()))
                .1
                .push((shard, events));
        }
        self.publish(&mut merge);
    }

    fn restored(&self, shard: ShardId, applied_index: u64, revision: i64) {
        let revoked = self
            .stores
            .get(shard as usize)
            .and_then(Option::as_ref)
            .map_or(0, cairn_shard_replica::revoked_through);
        let mut merge = self.merge.lock();
        if let Some(delivered) = Self::delivered(&mut merge, shard) {
            delivered.index = delivered.index.max(applied_index);
            delivered.revision = delivered.revision.max(revision);
            delivered.revoked = delivered.revoked.max(revoked);
        }
        merge.restored_through = merge.restored_through.max(revision);
        self.publish(&mut merge);
        drop(merge);
        // No commit reports what the snapshot brought: watchers read it
        // from the stores.
        self.hub.resync();
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
    use cairn_shard::BatchReady;
    use cairn_watch_hub::{Delivery, WatchSpec, WatchStream};

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
            leases: Vec::new(),
        };
        (sequenced, events)
    }

    /// Sequences one batch of one write of `shard` after its shard log
    /// index `after`: its revision.
    fn sequence(sequencer: &Mutex<Sequencer>, shard: u32, after: u64) -> Sequenced {
        let ready = BatchReady {
            shard,
            after,
            through: after + 1,
            revisions: 1,
            ..Default::default()
        };
        sequencer.lock().sequence(&[ready], &|_| false).remove(0)
    }

    async fn revisions_seen(stream: &mut WatchStream<KeyspaceEvents>, count: usize) -> Vec<i64> {
        let mut seen = Vec::new();
        while seen.len() < count {
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
        seen
    }

    /// Two shards, both held on this member, and a watcher of every key.
    struct TwoShards {
        _dirs: [tempfile::TempDir; 2],
        stores: [Store; 2],
        sequencer: Arc<Mutex<Sequencer>>,
        events: Arc<ShardEvents>,
        stream: WatchStream<KeyspaceEvents>,
    }

    impl TwoShards {
        fn held_here() -> anyhow::Result<TwoShards> {
            let dirs = [tempfile::tempdir()?, tempfile::tempdir()?];
            let stores = [Store::open(dirs[0].path())?, Store::open(dirs[1].path())?];
            let hub = WatchHub::new();
            let sequencer = Arc::new(Mutex::new(Sequencer::new(2, 1)?));
            let events = Arc::new(ShardEvents::new(
                Keyspace::new(2)?,
                stores.iter().cloned().map(Some).collect(),
                &[0, 0],
                sequencer.clone(),
                hub.clone(),
            ));
            let mut stream = hub.open(KeyspaceEvents::Shards(events.clone()));
            stream.create(WatchSpec {
                key: vec![0].into(),
                range_end: vec![0].into(),
                ..Default::default()
            })?;
            Ok(TwoShards {
                _dirs: dirs,
                stores,
                sequencer,
                events,
                stream,
            })
        }
    }

    #[tokio::test]
    async fn shards_events_reach_watchers_in_revision_order() -> anyhow::Result<()> {
        let TwoShards {
            _dirs,
            stores,
            sequencer,
            events,
            mut stream,
        } = TwoShards::held_here()?;
        // Revisions 2 and 3 are shard 0's, 4 is shard 1's.
        let two = sequence(&sequencer, 0, 0);
        let three = sequence(&sequencer, 0, 1);
        let four = sequence(&sequencer, 1, 0);
        assert_eq!([&two, &three, &four].map(|b| b.first_revision), [2, 3, 4]);

        // Revision 2 came in a snapshot of shard 0 (no batch reports it);
        // shard 1 applies revision 4 before shard 0 applies 3.
        let _ = write(&stores[0], 0, "a", 2);
        events.restored(0, 1, 2);
        let (_, four_events) = write(&stores[1], 1, "c", 4);
        events.applied(&four, four_events);
        assert_eq!(
            events.current_revision(),
            2,
            "2 is stored, 3 is not applied yet"
        );
        let (_, three_events) = write(&stores[0], 0, "b", 3);
        events.applied(&three, three_events);
        assert_eq!(events.current_revision(), 4);
        assert_eq!(revisions_seen(&mut stream, 3).await, [2, 3, 4]);

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

    #[tokio::test]
    async fn revisions_of_shards_held_elsewhere_are_passed_over() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        let hub = WatchHub::new();
        let sequencer = Arc::new(Mutex::new(Sequencer::new(2, 1)?));
        let sequenced = watch::Sender::new(1);
        // Shard 1 is held on another member.
        let events = Arc::new(ShardEvents::new(
            Keyspace::new(2)?,
            vec![Some(store.clone()), None],
            &[0, 0],
            sequencer.clone(),
            hub.clone(),
        ));
        let follow = events.follow(sequenced.subscribe());
        let mut stream = hub.open(KeyspaceEvents::Shards(events.clone()));
        stream.create(WatchSpec {
            key: vec![0].into(),
            range_end: vec![0].into(),
            ..Default::default()
        })?;
        let two = sequence(&sequencer, 0, 0);
        let three = sequence(&sequencer, 1, 0);
        let four = sequence(&sequencer, 1, 1);
        let five = sequence(&sequencer, 0, 1);
        assert_eq!(three.first_revision + 1, four.first_revision);
        sequenced.send_replace(5);

        let (_, two_events) = write(&store, 0, "a", 2);
        events.applied(&two, two_events);
        // 3 and 4 are shard 1's: only the cluster group's round says so,
        // and then they are passed over.
        for _ in 0..100 {
            if events.current_revision() == 4 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(events.current_revision(), 4);
        let (_, five_events) = write(&store, 0, "b", 5);
        events.applied(&five, five_events);
        assert_eq!(events.current_revision(), 5);
        assert_eq!(revisions_seen(&mut stream, 2).await, [2, 5]);
        follow.abort();
        Ok(())
    }

    #[tokio::test]
    async fn a_revoke_is_published_once_every_held_shard_delivered_its_part() -> anyhow::Result<()>
    {
        let TwoShards {
            _dirs,
            stores,
            sequencer,
            events,
            mut stream,
        } = TwoShards::held_here()?;
        // "a" on shard 0 at 2, "b" on shard 1 at 3; the lease of both is
        // revoked at 4.
        let two = sequence(&sequencer, 0, 0);
        let three = sequence(&sequencer, 1, 0);
        let keys =
            std::collections::BTreeMap::from([(0, vec![b"a".to_vec()]), (1, vec![b"b".to_vec()])]);
        assert_eq!(sequencer.lock().revoke(7, keys), Some(4));
        let (_, two_events) = write(&stores[0], 0, "a", 2);
        events.applied(&two, two_events);
        let (_, three_events) = write(&stores[1], 1, "b", 3);
        events.applied(&three, three_events);
        // Shard 0 has not handed over the revoke: what it holds is
        // published, the rest waits.
        assert_eq!(events.current_revision(), 2);
        let delete = |store: &Store, key: &str| -> anyhow::Result<Vec<Event>> {
            let mut batch = store.write();
            batch.skip_to(4)?;
            batch.delete_range(&cairn_api::etcdserverpb::DeleteRangeRequest {
                key: key.to_owned().into(),
                ..Default::default()
            })?;
            Ok(batch.commit(1)?)
        };
        events.revoked(1, 4, delete(&stores[1], "b")?);
        assert_eq!(events.current_revision(), 2, "shard 0's part is missing");
        events.revoked(0, 4, delete(&stores[0], "a")?);
        assert_eq!(events.current_revision(), 4);
        let mut seen = Vec::new();
        while seen.len() < 4 {
            let Delivery::Events { events, .. } = stream.next().await else {
                panic!("a watcher of every key is not cancelled");
            };
            seen.extend(
                events
                    .iter()
                    .filter_map(|e| e.kv.as_ref())
                    .map(|kv| (kv.mod_revision, kv.key.clone())),
            );
        }
        let key = |k: &str| bytes::Bytes::copy_from_slice(k.as_bytes());
        assert_eq!(
            seen,
            vec![(2, key("a")), (3, key("b")), (4, key("a")), (4, key("b"))]
        );
        // A watcher from the start reads the same from the stores.
        let (history, _) = events.events_since(&[0], &[0], 2, 1000)?;
        let history: Vec<(i64, bytes::Bytes)> = history
            .iter()
            .filter_map(|e| e.kv.as_ref())
            .map(|kv| (kv.mod_revision, kv.key.clone()))
            .collect();
        assert_eq!(history, seen);
        Ok(())
    }
}
