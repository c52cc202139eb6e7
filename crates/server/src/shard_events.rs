//! Watches over a sharded keyspace: the shards apply their batches each at
//! its own pace, and this merges their events back into the keyspace's
//! revision order for the watch hub, and serves watchers catching up from
//! the shards' stores at once. Revisions are dense (each revision is one
//! write of one shard, or a lease's revoke or a cross-shard txn, which
//! several shards deliver in parts), and the cluster group's sequencer says
//! how far each shard's batches, revokes and txns go, so revision r can be
//! published once every shard has handed over everything it has through r.
//! The shards held here hand over what their replicas apply
//! ([`EventSink`]); each shard held elsewhere is followed through a feed
//! from a member holding it ([`ShardEvents::feed`] there,
//! [`ShardEvents::follow_remote`] here), and watchers catching up read it
//! from such a member.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use cairn_api::cairnpb::shard_feed::Item;
use cairn_api::cairnpb::{
    AppliedBatch, RevisionEvents, ShardFeed, ShardHistory, ShardHistoryResponse, ShardPoint,
    ShardRange,
};
use cairn_api::etcdserverpb::{RangeRequest, RangeResponse};
use cairn_api::mvccpb::{Event, KeyValue};
use cairn_mvcc::{MvccError, Store};
use cairn_shard::{Keyspace, Sequenced, Sequencer, ShardId};
use cairn_shard_replica::{EventSink, ReadPoint};
use cairn_watch_hub::{CatchUpError, Commit, EventSource, WatchHub};
use futures_util::StreamExt as _;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use parking_lot::Mutex;
use tokio::sync::{broadcast, mpsc, watch};
use tonic::{Code, Status};

/// Items a follower's feed may fall behind its shard's replica here before
/// the feed is ended (the follower reconnects from its point).
const TAP_QUEUE: usize = 1024;
/// Events a page of a feed's history holds at most (whole revisions kept).
const HISTORY_PAGE: usize = 1000;
/// How long a feed behind what the sequencer says its shard holds may stay
/// silent before the follower tries another replica (this one may be cut
/// off from its shard, or paused).
const FEED_STALL: Duration = Duration::from_secs(3);
/// The wait before reconnecting a broken feed, doubled up to the second.
const FEED_BACKOFF: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(2));

/// How far a shard has handed over its batches.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Delivered {
    /// The shard log index its last handed-over batch covers.
    index: u64,
    /// The last revision it holds.
    revision: i64,
    /// The revision of the last revoke it handed over.
    revoked: i64,
}

impl Delivered {
    fn raise(&mut self, point: &ShardPoint) {
        self.index = self.index.max(point.index);
        self.revision = self.revision.max(point.revision);
        self.revoked = self.revoked.max(point.revoked);
    }

    fn point(&self) -> ShardPoint {
        ShardPoint {
            index: self.index,
            revision: self.revision,
            revoked: self.revoked,
        }
    }
}

/// What the merge knows of one shard.
enum Known {
    /// Held here: what its replica handed over.
    Held(Delivered),
    /// Held elsewhere.
    Remote(Remote),
}

struct Remote {
    /// What its feed handed over; `None` until a feed first caught up.
    delivered: Option<Delivered>,
    /// Every event of the shard through this revision is pending here or
    /// published: where its feed resumes, and what a feed's repeats are
    /// told by.
    received: i64,
    /// Not followed (no feed started, or its holders refused the feed:
    /// with auth enabled, until they can check this member's credentials):
    /// its revisions are passed over, and watches over it are refused.
    passed_over: bool,
}

impl Remote {
    /// Its feed says the holder's replica is at `point`.
    fn caught_up(&mut self, point: &ShardPoint) {
        self.delivered
            .get_or_insert(Delivered {
                index: 0,
                revision: 0,
                revoked: 0,
            })
            .raise(point);
        self.received = self.received.max(point.revision);
    }
}

/// A revision range's events, by shard (a revoke's revision comes in parts
/// from several shards).
type Parts = Vec<(ShardId, Vec<Event>)>;

/// Batches handed over whose revisions cannot be published yet.
struct Merge {
    /// By shard ID.
    shards: Vec<Known>,
    /// By first revision: the batch's end (exclusive) and its events.
    pending: BTreeMap<i64, (i64, Parts)>,
    /// The revision of the last commit handed to the hub.
    last_commit: i64,
    /// The last revision a snapshot brought to a shard (or a compacted
    /// feed skipped): no commit may cover it, so that watchers read it
    /// from the stores.
    restored_through: i64,
}

impl Merge {
    /// Takes `events` of `shard` whose revisions are above `after` (and
    /// were not published) as pending, in parts by revision: a feed's
    /// history, or a batch a feed repeats in part.
    fn take_revisions(&mut self, shard: ShardId, events: Vec<Event>, after: i64) {
        let mut by_revision: BTreeMap<i64, Vec<Event>> = BTreeMap::new();
        for event in events {
            let revision = event.kv.as_ref().map_or(0, |kv| kv.mod_revision);
            if revision > after {
                by_revision.entry(revision).or_default().push(event);
            }
        }
        for (revision, events) in by_revision {
            self.pending
                .entry(revision)
                .or_insert_with(|| (revision + 1, Vec::new()))
                .1
                .push((shard, events));
        }
    }
}

/// What a shard's replica here handed over, for the feeds following it.
#[derive(Debug)]
enum Tapped {
    Item(Item),
    /// A snapshot replaced the replica: the feeds end, and their followers
    /// read what it brought from the store when they reconnect.
    Restored,
}

/// How this member reaches the shards it holds no replica of: the members
/// holding them (the `Forwarding` service), or a model in tests.
pub trait RemoteShards: Send + Sync {
    /// `shard`'s feed for a follower holding its events through `from`,
    /// from a member holding it; `attempt` turns which replica is tried
    /// first, so that a reconnect after a stall goes elsewhere.
    fn follow(
        &self,
        shard: ShardId,
        from: i64,
        attempt: usize,
    ) -> BoxFuture<'static, Result<BoxStream<'static, Result<ShardFeed, Status>>, Status>>;

    /// A watcher's catch-up read of a shard (see [`ShardHistory`]).
    fn history(
        &self,
        read: ShardHistory,
    ) -> BoxFuture<'static, Result<ShardHistoryResponse, Status>>;

    /// A read of one shard (see [`ShardRange`]).
    fn range(&self, read: ShardRange) -> BoxFuture<'static, Result<RangeResponse, Status>>;
}

/// The merged events of the keyspace's shards.
pub struct ShardEvents {
    keyspace: Keyspace,
    /// By shard ID; `None` for shards held on other members.
    stores: Vec<Option<Store>>,
    merge: Mutex<Merge>,
    /// By shard ID: what the replica here hands over, for the feeds that
    /// follow it.
    taps: Vec<broadcast::Sender<Arc<Tapped>>>,
    /// Where the shards held elsewhere are read, once their feeds started.
    remote: OnceLock<Arc<dyn RemoteShards>>,
    /// Every revision up to this one is handed over and published.
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
    /// far each store has applied its shard's log. The shards held
    /// elsewhere are passed over until [`ShardEvents::follow_remote`].
    pub fn new(
        keyspace: Keyspace,
        stores: Vec<Option<Store>>,
        applied_indexes: &[u64],
        sequencer: Arc<Mutex<Sequencer>>,
        hub: Arc<WatchHub>,
    ) -> ShardEvents {
        let shards = stores
            .iter()
            .enumerate()
            .map(|(shard, store)| match store {
                Some(store) => Known::Held(Delivered {
                    index: applied_indexes.get(shard).copied().unwrap_or(0),
                    revision: store.current_revision(),
                    revoked: cairn_shard_replica::revoked_through(store),
                }),
                None => Known::Remote(Remote {
                    delivered: None,
                    received: 0,
                    passed_over: true,
                }),
            })
            .collect();
        let mut merge = Merge {
            shards,
            pending: BTreeMap::new(),
            last_commit: 0,
            restored_through: 0,
        };
        let through = Self::publishable(&merge, &sequencer.lock());
        merge.last_commit = through;
        ShardEvents {
            keyspace,
            taps: stores
                .iter()
                .map(|_| broadcast::Sender::new(TAP_QUEUE))
                .collect(),
            stores,
            merge: Mutex::new(merge),
            remote: OnceLock::new(),
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

    /// Follows every shard held elsewhere through `remote`, one feed task
    /// each: from now on the merge publishes a revision only once it has
    /// what those shards hold through it (what is published already,
    /// watchers read from the members holding them).
    pub fn follow_remote(
        self: &Arc<Self>,
        remote: Arc<dyn RemoteShards>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        if self.remote.set(remote.clone()).is_err() {
            return Vec::new();
        }
        let published = self.current_revision();
        let mut merge = self.merge.lock();
        let mut tasks = Vec::new();
        for (shard, known) in (0..).zip(&mut merge.shards) {
            if let Known::Remote(followed) = known {
                followed.passed_over = false;
                followed.received = published;
                tasks.push(tokio::spawn(self.clone().run_feed(remote.clone(), shard)));
            }
        }
        tasks
    }

    /// Whether every shard of the keys in [key, range_end) is held here or
    /// followed: a watch over them sees all of their events.
    pub fn covers(&self, key: &[u8], range_end: &[u8]) -> bool {
        let merge = self.merge.lock();
        self.keyspace.shards_of_range(key, range_end).all(|shard| {
            match merge.shards.get(shard as usize) {
                Some(Known::Held(_)) => true,
                Some(Known::Remote(remote)) => !remote.passed_over,
                None => false,
            }
        })
    }

    /// Keeps `shard`'s feed connected to some member holding it, from
    /// where the last one stopped, until the member stops.
    async fn run_feed(self: Arc<Self>, remote: Arc<dyn RemoteShards>, shard: ShardId) {
        let mut backoff = FEED_BACKOFF.0;
        for attempt in 0.. {
            let (from, resumed) = {
                let merge = self.merge.lock();
                match merge.shards.get(shard as usize) {
                    Some(Known::Remote(r)) if r.passed_over => (self.current_revision(), true),
                    Some(Known::Remote(r)) => (r.received, false),
                    _ => return,
                }
            };
            match remote.follow(shard, from, attempt).await {
                Ok(feed) => {
                    if resumed {
                        self.resume(shard, from);
                    }
                    if self.carry(shard, feed).await {
                        backoff = FEED_BACKOFF.0;
                    }
                }
                // Auth is enabled and the holder could not check this
                // member's credentials (the cluster secret not applied
                // there or here yet): pass the shard over (watches over it
                // are refused) and ask again later.
                Err(refused) if refused.code() == Code::PermissionDenied => {
                    tracing::debug!(shard, "following the shard refused: {refused}");
                    self.pass_over(shard);
                }
                Err(e) => tracing::debug!(shard, "following the shard: {e}"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(FEED_BACKOFF.1);
        }
    }

    /// Takes what `feed` brings until it ends, breaks, or stalls behind
    /// its shard; whether it brought anything.
    async fn carry(
        &self,
        shard: ShardId,
        mut feed: BoxStream<'static, Result<ShardFeed, Status>>,
    ) -> bool {
        let mut brought = false;
        loop {
            match tokio::time::timeout(FEED_STALL, feed.next()).await {
                Err(_) if self.feed_behind(shard) => {
                    tracing::debug!(shard, "the shard's feed stalled behind it");
                    return brought;
                }
                Err(_) => {}
                Ok(Some(Ok(ShardFeed { item: Some(item) }))) => {
                    brought = true;
                    self.take(shard, item);
                }
                Ok(Some(Ok(ShardFeed { item: None }))) => {}
                Ok(Some(Err(e))) => {
                    tracing::debug!(shard, "the shard's feed broke: {e}");
                    return brought;
                }
                Ok(None) => return brought,
            }
        }
    }

    /// Whether the sequencer knows of batches or revokes of `shard` that
    /// its feed has not brought.
    fn feed_behind(&self, shard: ShardId) -> bool {
        let delivered = match self.merge.lock().shards.get(shard as usize) {
            Some(Known::Remote(remote)) => remote.delivered,
            _ => return false,
        };
        let Some(delivered) = delivered else {
            return true;
        };
        let sequencer = self.sequencer.lock();
        sequencer
            .last(shard)
            .is_some_and(|last| last.through > delivered.index)
            || sequencer.last_revoke(shard) > delivered.revoked
    }

    fn pass_over(&self, shard: ShardId) {
        let mut merge = self.merge.lock();
        if let Some(Known::Remote(remote)) = merge.shards.get_mut(shard as usize) {
            remote.passed_over = true;
            remote.delivered = None;
        }
        self.publish(&mut merge);
    }

    /// A feed of `shard`, passed over until now, opened from `from`.
    fn resume(&self, shard: ShardId, from: i64) {
        let mut merge = self.merge.lock();
        if let Some(Known::Remote(remote)) = merge.shards.get_mut(shard as usize) {
            remote.passed_over = false;
            remote.received = from;
            remote.delivered = None;
        }
    }

    /// One item of `shard`'s feed. A feed repeats nothing it brought, but
    /// a feed from another replica after a reconnect may start behind
    /// where the last stopped: what is `received` already is dropped.
    fn take(&self, shard: ShardId, item: Item) {
        let current = self.current_revision();
        let mut merge = self.merge.lock();
        let Some(Known::Remote(remote)) = merge.shards.get_mut(shard as usize) else {
            return;
        };
        let after = remote.received.max(current);
        let mut compacted = None;
        let events = match item {
            Item::History(page) => {
                remote.received = remote.received.max(page.revision);
                page.events
            }
            Item::CaughtUp(point) => {
                remote.caught_up(&point);
                Vec::new()
            }
            Item::Compacted(point) => {
                remote.caught_up(&point);
                compacted = Some(point.revision);
                Vec::new()
            }
            Item::Applied(batch) => {
                let end = batch.first_revision + batch.revisions as i64;
                let point = ShardPoint {
                    index: batch.through,
                    revision: if batch.revisions > 0 { end - 1 } else { 0 },
                    revoked: 0,
                };
                if let Some(delivered) = &mut remote.delivered {
                    delivered.raise(&point);
                }
                remote.received = remote.received.max(point.revision);
                if batch.revisions > 0 && batch.first_revision > after {
                    merge
                        .pending
                        .insert(batch.first_revision, (end, vec![(shard, batch.events)]));
                    Vec::new()
                } else {
                    batch.events
                }
            }
            Item::Revoked(part) => {
                if let Some(delivered) = &mut remote.delivered {
                    delivered.revision = delivered.revision.max(part.revision);
                    delivered.revoked = delivered.revoked.max(part.revision);
                }
                remote.received = remote.received.max(part.revision);
                part.events
            }
        };
        merge.take_revisions(shard, events, after);
        if let Some(revision) = compacted {
            merge.restored_through = merge.restored_through.max(revision);
        }
        self.publish(&mut merge);
        drop(merge);
        if compacted.is_some() {
            // Watchers behind read what was skipped, and learn it is gone.
            self.hub.resync();
        }
    }

    /// `shard`'s feed for a follower holding its events through `from`
    /// (the `Follow` call): the events its replica here handed over after
    /// `from`, read from its store, then everything it hands over from
    /// then on. The tap is taken under the merge's lock with the point the
    /// history reads through, so nothing is lost or sent twice.
    pub fn feed(
        self: &Arc<Self>,
        shard: ShardId,
        from: i64,
    ) -> Result<BoxStream<'static, Result<ShardFeed, Status>>, Status> {
        let (point, mut tap, store) = {
            let merge = self.merge.lock();
            match (
                merge.shards.get(shard as usize),
                self.stores.get(shard as usize),
            ) {
                (Some(Known::Held(delivered)), Some(Some(store))) => (
                    *delivered,
                    self.taps[shard as usize].subscribe(),
                    store.clone(),
                ),
                _ => {
                    return Err(Status::failed_precondition(format!(
                        "cairn: this member holds no replica of shard {shard}"
                    )));
                }
            }
        };
        let (items, feed) = mpsc::channel(16);
        tokio::spawn(async move {
            let mut next = from + 1;
            let caught_up = loop {
                if next > point.revision {
                    break Item::CaughtUp(point.point());
                }
                let store = store.clone();
                let read = tokio::task::spawn_blocking(move || {
                    store.events_since(&[0], &[0], next, HISTORY_PAGE)
                })
                .await;
                let (mut events, after) = match read {
                    Ok(Ok(page)) => page,
                    Ok(Err(MvccError::Compacted)) => break Item::Compacted(point.point()),
                    Ok(Err(e)) => {
                        let _ = items.send(Err(Status::internal(e.to_string()))).await;
                        return;
                    }
                    Err(e) => {
                        let _ = items.send(Err(Status::internal(e.to_string()))).await;
                        return;
                    }
                };
                events.retain(|e| {
                    e.kv.as_ref()
                        .is_some_and(|kv| kv.mod_revision <= point.revision)
                });
                let page = RevisionEvents {
                    revision: (after - 1).min(point.revision),
                    events,
                };
                if items
                    .send(Ok(feed_item(Item::History(page))))
                    .await
                    .is_err()
                {
                    return;
                }
                next = after;
            };
            if items.send(Ok(feed_item(caught_up))).await.is_err() {
                return;
            }
            loop {
                let received = tokio::select! {
                    received = tap.recv() => received,
                    // The follower went away: no need to wait for the
                    // shard's next write to notice.
                    () = items.closed() => return,
                };
                let item = match received {
                    Ok(tapped) => match &*tapped {
                        Tapped::Item(item) => Ok(feed_item(item.clone())),
                        Tapped::Restored => Err(Status::unavailable(
                            "cairn: the shard's replica was restored from a snapshot",
                        )),
                    },
                    Err(broadcast::error::RecvError::Lagged(_)) => Err(Status::unavailable(
                        "cairn: the follower fell behind the shard's feed",
                    )),
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                let end = item.is_err();
                if items.send(item).await.is_err() || end {
                    return;
                }
            }
        });
        Ok(tokio_stream::wrappers::ReceiverStream::new(feed).boxed())
    }

    /// Hands `item` of held `shard` to the feeds following it; under the
    /// merge's lock, which orders it with their starting points.
    fn tap(&self, shard: ShardId, item: impl FnOnce() -> Tapped) {
        if let Some(tap) = self.taps.get(shard as usize)
            && tap.receiver_count() > 0
        {
            let _ = tap.send(Arc::new(item()));
        }
    }

    /// The revision through which every shard followed has handed over
    /// its batches: all of the sequencer's, but for a shard that has not
    /// yet handed over its last sequenced batch, only what comes before its
    /// next batch, and for one that has not handed over its last revoke,
    /// only what it holds (what it hands over next comes after that; the
    /// revisions of other shards between wait for it, briefly). A shard
    /// held elsewhere whose feed has not caught up yet holds it at what
    /// was received of it.
    fn publishable(merge: &Merge, sequencer: &Sequencer) -> i64 {
        let mut through = sequencer.revision();
        for (shard, known) in (0..).zip(&merge.shards) {
            let delivered = match known {
                Known::Held(delivered) => delivered,
                Known::Remote(Remote {
                    passed_over: true, ..
                }) => continue,
                Known::Remote(Remote {
                    delivered: Some(delivered),
                    ..
                }) => delivered,
                Known::Remote(Remote {
                    delivered: None,
                    received,
                    ..
                }) => {
                    through = through.min(*received);
                    continue;
                }
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
        match merge.shards.get_mut(shard as usize)? {
            Known::Held(delivered) => Some(delivered),
            Known::Remote(_) => None,
        }
    }

    fn current_revision(&self) -> i64 {
        self.published.load(Ordering::Acquire)
    }

    fn compact_revision(&self) -> i64 {
        self.sequencer.lock().compacted()
    }

    /// Reads a shard held elsewhere from a member holding it, blocking:
    /// the hub's catch-up reads run off the async workers, and a
    /// watcher's previous key-values are read in place on a worker, which
    /// hands its other tasks on meanwhile (a multi-thread runtime's).
    /// `None` before the shards held elsewhere are followed.
    fn remote_blocking<T>(
        &self,
        read: impl FnOnce(&dyn RemoteShards) -> BoxFuture<'static, T>,
    ) -> Option<T> {
        let remote = self.remote.get()?;
        let handle = tokio::runtime::Handle::try_current().ok()?;
        let read = read(remote.as_ref());
        Some(tokio::task::block_in_place(|| handle.block_on(read)))
    }

    /// Each shard's events from `from` on, merged in revision order, up to
    /// what is published and what every shard read in full.
    fn events_since(
        &self,
        key: &[u8],
        range_end: &[u8],
        from: i64,
        limit: usize,
    ) -> Result<(Vec<Event>, i64), CatchUpError> {
        if from < self.compact_revision() {
            return Err(CatchUpError::Compacted);
        }
        let mut through = self.current_revision();
        // What the members holding the shards read must cover `through`.
        let point = ReadPoint::latest(&self.sequencer.lock(), self.keyspace.shards());
        let mut merged = Vec::new();
        for shard in self.keyspace.shards_of_range(key, range_end) {
            let (events, next) = match self.stores.get(shard as usize) {
                Some(Some(store)) => store.events_since(key, range_end, from, limit)?,
                _ => {
                    let read = ShardHistory {
                        shard,
                        key: bytes::Bytes::copy_from_slice(key),
                        range_end: bytes::Bytes::copy_from_slice(range_end),
                        from,
                        limit: limit as u64,
                        applied: point.needed(shard),
                        revoked: point.revoked(shard),
                    };
                    // Not followed: passed over, as watches over it are
                    // refused.
                    let Some(answer) = self.remote_blocking(|remote| remote.history(read)) else {
                        continue;
                    };
                    let answer = answer.map_err(|status| {
                        if status.message() == cairn_api::error::COMPACTED.status().message() {
                            CatchUpError::Compacted
                        } else {
                            CatchUpError::Failed(format!(
                                "cairn: reading shard {shard}'s events from a member holding it: {}",
                                status.message()
                            ))
                        }
                    })?;
                    (answer.events, answer.next)
                }
            };
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
        let shard = self.keyspace.shard_of(key);
        let request = RangeRequest {
            key: bytes::Bytes::copy_from_slice(key),
            revision,
            ..Default::default()
        };
        let response = match self.stores.get(shard as usize)? {
            Some(store) => store.range_at(&request, self.current_revision()).ok()?,
            None => {
                let point = ReadPoint::latest(&self.sequencer.lock(), self.keyspace.shards());
                let read = ShardRange {
                    shard,
                    revision: point.revision,
                    applied: point.needed(shard),
                    request: Some(request),
                    revoked: point.revoked(shard),
                };
                self.remote_blocking(|remote| remote.range(read))?.ok()?
            }
        };
        response.kvs.into_iter().next()
    }
}

fn feed_item(item: Item) -> ShardFeed {
    ShardFeed { item: Some(item) }
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
        self.tap(batch.shard, || {
            Tapped::Item(Item::Applied(AppliedBatch {
                after: batch.after,
                through: batch.through,
                first_revision: batch.first_revision,
                revisions: batch.revisions,
                events: events.clone(),
            }))
        });
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
        self.tap(shard, || {
            Tapped::Item(Item::Revoked(RevisionEvents {
                revision,
                events: events.clone(),
            }))
        });
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
        self.tap(shard, || Tapped::Restored);
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
                shards.events_since(key, range_end, from_revision, limit)
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
    use std::time::Duration;

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

    /// The revisions of shard 0's events a feed brings, in the order it
    /// brings them, until it has brought `through`; and the order of the
    /// kinds of item.
    async fn feed_revisions(
        feed: &mut BoxStream<'static, Result<ShardFeed, Status>>,
        through: i64,
    ) -> anyhow::Result<(Vec<i64>, Vec<&'static str>)> {
        let (mut seen, mut kinds) = (Vec::new(), Vec::new());
        while seen.last() != Some(&through) {
            let Some(Ok(ShardFeed { item: Some(item) })) = feed.next().await else {
                anyhow::bail!("the feed ended after {seen:?}");
            };
            let (kind, events) = match item {
                Item::History(page) => ("history", page.events),
                Item::CaughtUp(_) => ("caught up", Vec::new()),
                Item::Compacted(_) => ("compacted", Vec::new()),
                Item::Applied(batch) => ("applied", batch.events),
                Item::Revoked(part) => ("revoked", part.events),
            };
            if kinds.last() != Some(&kind) {
                kinds.push(kind);
            }
            seen.extend(
                events
                    .iter()
                    .filter_map(|e| e.kv.as_ref())
                    .map(|kv| kv.mod_revision),
            );
        }
        Ok((seen, kinds))
    }

    #[tokio::test]
    async fn a_feed_brings_history_then_live_batches_each_once() -> anyhow::Result<()> {
        let TwoShards {
            _dirs,
            stores,
            sequencer,
            events,
            ..
        } = TwoShards::held_here()?;
        let mut after = 0;
        let mut apply = |store: &Store, shard: u32, key: &str| {
            let batch = sequence(&sequencer, shard, if shard == 0 { after } else { 0 });
            if shard == 0 {
                after += 1;
            }
            let (_, written) = write(store, shard, key, batch.first_revision);
            events.applied(&batch, written);
            batch.first_revision
        };
        // Shard 0 has 2 and 3, shard 1 has 4; the follower has 2.
        assert_eq!(apply(&stores[0], 0, "a"), 2);
        assert_eq!(apply(&stores[0], 0, "b"), 3);
        assert_eq!(apply(&stores[1], 1, "c"), 4);
        let mut feed = events.feed(0, 2)?;
        // Applied after the feed took its point, and stored before its
        // history is read: they come once, live.
        assert_eq!(apply(&stores[0], 0, "d"), 5);
        assert_eq!(apply(&stores[0], 0, "e"), 6);
        let (seen, kinds) = feed_revisions(&mut feed, 6).await?;
        assert_eq!(seen, [3, 5, 6]);
        assert_eq!(kinds, ["history", "caught up", "applied"]);
        // A feed of a shard held elsewhere is refused.
        let remote = ShardEvents::new(
            Keyspace::new(2)?,
            vec![None, Some(stores[1].clone())],
            &[0, 0],
            sequencer.clone(),
            WatchHub::new(),
        );
        assert_eq!(
            Arc::new(remote).feed(0, 0).err().map(|e| e.code()),
            Some(Code::FailedPrecondition)
        );
        Ok(())
    }

    /// The member holding shard 1, as the follower's remote shards: its
    /// feeds (the first ended after `break_after` items, as a connection
    /// breaks) and its store.
    struct Holder {
        events: Arc<ShardEvents>,
        store: Store,
        break_after: Mutex<Option<usize>>,
        follows: AtomicI64,
    }

    impl RemoteShards for Holder {
        fn follow(
            &self,
            shard: ShardId,
            from: i64,
            _attempt: usize,
        ) -> BoxFuture<'static, Result<BoxStream<'static, Result<ShardFeed, Status>>, Status>>
        {
            self.follows.fetch_add(1, Ordering::AcqRel);
            let feed = self.events.feed(shard, from);
            let break_after = self.break_after.lock().take();
            Box::pin(async move {
                let feed = feed?;
                Ok(match break_after {
                    Some(items) => feed
                        .take(items)
                        .chain(futures_util::stream::iter([Err(Status::unavailable(
                            "the connection broke",
                        ))]))
                        .boxed(),
                    None => feed,
                })
            })
        }

        fn history(
            &self,
            read: ShardHistory,
        ) -> BoxFuture<'static, Result<ShardHistoryResponse, Status>> {
            let read =
                self.store
                    .events_since(&read.key, &read.range_end, read.from, read.limit as usize);
            Box::pin(async move {
                let (events, next) = read.map_err(|e| Status::internal(e.to_string()))?;
                Ok(ShardHistoryResponse { events, next })
            })
        }

        fn range(&self, read: ShardRange) -> BoxFuture<'static, Result<RangeResponse, Status>> {
            let answer = self
                .store
                .range_at(&read.request.unwrap_or_default(), read.revision)
                .map_err(|e| Status::internal(e.to_string()));
            Box::pin(async move { answer })
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_shard_held_elsewhere_is_merged_through_its_feed_across_a_reconnect()
    -> anyhow::Result<()> {
        let dirs = [tempfile::tempdir()?, tempfile::tempdir()?];
        let stores = [Store::open(dirs[0].path())?, Store::open(dirs[1].path())?];
        let sequencer = Arc::new(Mutex::new(Sequencer::new(2, 1)?));
        // This member holds shard 0, the holder shard 1.
        let hub = WatchHub::new();
        let events = Arc::new(ShardEvents::new(
            Keyspace::new(2)?,
            vec![Some(stores[0].clone()), None],
            &[0, 0],
            sequencer.clone(),
            hub.clone(),
        ));
        let holder = Arc::new(Holder {
            events: Arc::new(ShardEvents::new(
                Keyspace::new(2)?,
                vec![None, Some(stores[1].clone())],
                &[0, 0],
                sequencer.clone(),
                WatchHub::new(),
            )),
            store: stores[1].clone(),
            break_after: Mutex::new(Some(3)),
            follows: AtomicI64::new(0),
        });
        let sequenced = watch::Sender::new(1);
        let follow = events.follow(sequenced.subscribe());
        let (mut after, mut round) = ([0, 0], 1);
        let keyspace = Keyspace::new(2)?;
        // Each key on its own shard, as the watchers' reads look them up.
        let key_of = |shard: usize, name: &str| {
            (0..)
                .map(|i| format!("{name}{i}"))
                .find(|k| keyspace.shard_of(k.as_bytes()) as usize == shard)
                .unwrap_or_default()
        };
        let mut apply = |shard: usize, name: &str| {
            let key = key_of(shard, name);
            let batch = sequence(&sequencer, shard as u32, after[shard]);
            after[shard] += 1;
            round += 1;
            sequenced.send_replace(round);
            let (_, written) = write(&stores[shard], shard as u32, &key, batch.first_revision);
            if shard == 0 {
                events.applied(&batch, written);
            } else {
                holder.events.applied(&batch, written);
            }
        };
        // Before shard 1 is followed its revisions are passed over, and
        // watches over it refused.
        apply(1, "a");
        assert!(!events.covers(&[0], &[0]));
        let feeds = events.follow_remote(holder.clone());
        assert!(events.covers(&[0], &[0]));
        // Once the feed has brought revision 2, a watcher created now
        // starts after it (created before, it would rightly get it).
        while events.current_revision() < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut live = hub.open(KeyspaceEvents::Shards(events.clone()));
        live.create(WatchSpec {
            key: vec![0].into(),
            range_end: vec![0].into(),
            ..Default::default()
        })?;
        while holder.follows.load(Ordering::Acquire) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Revisions 3 to 8; the first feed breaks after its third item
        // (caught up, 4, 5) and the next resumes after 5.
        for (shard, key) in [(0, "b"), (1, "c"), (1, "d"), (0, "e"), (1, "f"), (1, "g")] {
            apply(shard, key);
        }
        let seen =
            tokio::time::timeout(Duration::from_secs(10), revisions_seen(&mut live, 6)).await?;
        assert_eq!(seen, [3, 4, 5, 6, 7, 8]);
        assert!(
            holder.follows.load(Ordering::Acquire) >= 2,
            "the feed reconnected"
        );
        // A watcher from revision 1 reads shard 1's history from the
        // holder, merged with shard 0's.
        let mut from_start = hub.open(KeyspaceEvents::Shards(events.clone()));
        from_start.create(WatchSpec {
            key: vec![0].into(),
            range_end: vec![0].into(),
            start_revision: 1,
            prev_kv: true,
            ..Default::default()
        })?;
        let seen =
            tokio::time::timeout(Duration::from_secs(10), revisions_seen(&mut from_start, 7))
                .await?;
        assert_eq!(seen, [2, 3, 4, 5, 6, 7, 8]);
        let c = key_of(1, "c");
        assert_eq!(
            events.kv_at(c.as_bytes(), 8).map(|kv| kv.mod_revision),
            Some(4)
        );
        follow.abort();
        feeds.into_iter().for_each(|feed| feed.abort());
        Ok(())
    }
}
