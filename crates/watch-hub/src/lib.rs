//! The watch hub: a registry of watchers, fed the events of each revision by
//! the apply loop when caught up, and by a catch-up task reading mvcc when
//! they start in the past or fall behind.
//!
//! The apply loop hands every committed batch's events to [`WatchHub::publish`],
//! which shares one copy among all streams and never blocks: each stream has
//! a bounded queue, and a stream whose queue is full is marked lagging
//! instead. A [`WatchStream`] (one per gRPC Watch stream) keeps, for each of
//! its watchers, the next revision it owes it. A watcher that already has
//! everything up to a commit's previous revision takes its events from the
//! commit (synced); any other watcher (started in the past, or its stream
//! lagged) reads from the store through [`EventSource::events_since`] in
//! batches until it reaches the head, then is synced again. Because every
//! commit moves the store from one revision to the next atomically, the next
//! revision owed decides exactly which events a watcher still needs: none is
//! sent twice and none is skipped.
//!
//! ```
//! use cairn_api::etcdserverpb::PutRequest;
//! use cairn_watch_hub::{Commit, Delivery, WatchHub, WatchSpec};
//!
//! let dir = tempfile::tempdir()?;
//! let store = cairn_mvcc::Store::open(dir.path())?;
//! let hub = WatchHub::new();
//! let mut stream = hub.open(store.clone());
//! let id = stream.create(WatchSpec { key: "config".into(), ..Default::default() })?;
//!
//! // The apply loop commits a batch and hands its events to the hub.
//! let prev_revision = store.current_revision();
//! let mut batch = store.write();
//! batch.put(&PutRequest { key: "config".into(), value: "v1".into(), ..Default::default() })?;
//! let events = batch.commit(1)?;
//! hub.publish(Commit { prev_revision, revision: store.current_revision(), events });
//!
//! let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
//! let Delivery::Events { watch_id, events, .. } = runtime.block_on(stream.next()) else {
//!     panic!("expected the put");
//! };
//! assert_eq!(watch_id, id);
//! assert_eq!(events[0].kv.as_ref().map(|kv| &kv.value[..]), Some(&b"v1"[..]));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use cairn_api::etcdserverpb::RangeRequest;
use cairn_api::mvccpb::event::EventType;
use cairn_api::mvccpb::{Event, KeyValue};
use parking_lot::Mutex;
use tokio::sync::{Notify, mpsc};

#[cfg(test)]
mod tests;

/// Commits a stream may have queued before it counts as lagging and catches
/// up from the store.
const STREAM_QUEUE: usize = 128;
/// Events one catch-up read returns at most (whole revisions are kept).
const CATCH_UP_EVENTS: usize = 1000;

/// Why a catch-up read failed.
#[derive(Debug, thiserror::Error)]
pub enum CatchUpError {
    /// The revisions asked for were compacted away.
    #[error("mvcc: required revision has been compacted")]
    Compacted,
    #[error("{0}")]
    Failed(String),
}

impl From<cairn_mvcc::MvccError> for CatchUpError {
    fn from(e: cairn_mvcc::MvccError) -> CatchUpError {
        match e {
            cairn_mvcc::MvccError::Compacted => CatchUpError::Compacted,
            other => CatchUpError::Failed(other.to_string()),
        }
    }
}

/// Where watchers that are behind read events from: the mvcc store, or a
/// model of it in tests.
pub trait EventSource: Clone + Send + Sync + 'static {
    fn current_revision(&self) -> i64;
    fn compact_revision(&self) -> i64;
    /// As [`cairn_mvcc::Store::events_since`].
    fn events_since(
        &self,
        key: &[u8],
        range_end: &[u8],
        from_revision: i64,
        limit: usize,
    ) -> Result<(Vec<Event>, i64), CatchUpError>;
    /// The key-value of `key` at `revision`, if it existed then and is still
    /// readable.
    fn kv_at(&self, key: &[u8], revision: i64) -> Option<KeyValue>;
}

impl EventSource for cairn_mvcc::Store {
    fn current_revision(&self) -> i64 {
        cairn_mvcc::Store::current_revision(self)
    }

    fn compact_revision(&self) -> i64 {
        cairn_mvcc::Store::compact_revision(self)
    }

    fn events_since(
        &self,
        key: &[u8],
        range_end: &[u8],
        from_revision: i64,
        limit: usize,
    ) -> Result<(Vec<Event>, i64), CatchUpError> {
        Ok(cairn_mvcc::Store::events_since(
            self,
            key,
            range_end,
            from_revision,
            limit,
        )?)
    }

    fn kv_at(&self, key: &[u8], revision: i64) -> Option<KeyValue> {
        let request = RangeRequest {
            key: Bytes::copy_from_slice(key),
            revision,
            ..Default::default()
        };
        // A compacted revision has no previous value to give; etcd leaves
        // prev_kv out then too.
        self.range(&request).ok()?.kvs.into_iter().next()
    }
}

/// The events one apply batch committed: the store went from
/// `prev_revision` to `revision`.
#[derive(Debug)]
pub struct Commit {
    pub prev_revision: i64,
    pub revision: i64,
    pub events: Vec<Event>,
}

/// One stream's end of the hub.
struct Feed {
    commits: mpsc::Sender<Arc<Commit>>,
    lagged: AtomicBool,
    wake: Notify,
}

impl Feed {
    fn lag(&self) {
        self.lagged.store(true, Ordering::Release);
        self.wake.notify_one();
    }
}

/// The registry of watch streams, shared by the apply loop and the Watch
/// service.
#[derive(Default)]
pub struct WatchHub {
    streams: Mutex<HashMap<u64, Arc<Feed>>>,
    next_stream: AtomicU64,
}

impl WatchHub {
    pub fn new() -> Arc<WatchHub> {
        Arc::new(WatchHub::default())
    }

    /// Hands a committed batch's events to every stream without waiting: a
    /// stream whose queue is full is marked lagging and reads them from the
    /// store later.
    pub fn publish(&self, commit: Commit) {
        if commit.events.is_empty() {
            return;
        }
        let streams = self.streams.lock();
        if streams.is_empty() {
            return;
        }
        let commit = Arc::new(commit);
        for feed in streams.values() {
            if feed.commits.try_send(commit.clone()).is_err() {
                feed.lag();
            }
        }
    }

    /// Makes every stream check the store for revisions it has not seen:
    /// after the store was replaced by a snapshot, which no commit reports.
    pub fn resync(&self) {
        for feed in self.streams.lock().values() {
            feed.lag();
        }
    }

    /// Registers a new stream reading past events from `source`.
    pub fn open<S: EventSource>(self: &Arc<Self>, source: S) -> WatchStream<S> {
        self.open_with(source, STREAM_QUEUE, CATCH_UP_EVENTS)
    }

    fn open_with<S: EventSource>(
        self: &Arc<Self>,
        source: S,
        queue: usize,
        catch_up_events: usize,
    ) -> WatchStream<S> {
        let (tx, rx) = mpsc::channel(queue);
        let feed = Arc::new(Feed {
            commits: tx,
            lagged: AtomicBool::new(false),
            wake: Notify::new(),
        });
        let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        self.streams.lock().insert(id, feed.clone());
        // Anything committed before registering is read from the store by
        // watchers that want it; the head is where synced watchers start.
        let head = source.current_revision();
        WatchStream {
            hub: self.clone(),
            id,
            feed,
            commits: rx,
            source,
            watchers: BTreeMap::new(),
            next_id: 0,
            head,
            out: VecDeque::new(),
            catch_up_events,
        }
    }
}

/// What a client asked to watch (etcd's WatchCreateRequest, decoded).
#[derive(Clone, Debug, Default)]
pub struct WatchSpec {
    /// 0 lets the stream choose.
    pub watch_id: i64,
    pub key: Bytes,
    /// etcd's encoding: empty for `key` alone, `\0` for every key from `key`.
    pub range_end: Bytes,
    /// First revision to deliver; 0 or less means the next one.
    pub start_revision: i64,
    pub no_put: bool,
    pub no_delete: bool,
    pub prev_kv: bool,
    pub progress_notify: bool,
    pub fragment: bool,
}

impl WatchSpec {
    fn matches(&self, key: &[u8]) -> bool {
        match &self.range_end[..] {
            [] => key == &self.key[..],
            [0] => key >= &self.key[..],
            end => key >= &self.key[..] && key < end,
        }
    }

    fn wants(&self, event: &Event) -> bool {
        let Some(kv) = &event.kv else { return false };
        let dropped = if event.r#type == EventType::Delete as i32 {
            self.no_delete
        } else {
            self.no_put
        };
        !dropped && self.matches(&kv.key)
    }
}

/// Why a watcher was not created; etcd 3.4's messages.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CreateError {
    #[error("mvcc: duplicate watch ID provided on the WatchStream")]
    DuplicateId,
    #[error("mvcc: watcher range is empty")]
    EmptyRange,
}

/// What a stream has for its client.
#[derive(Clone, Debug, PartialEq)]
pub enum Delivery {
    /// Events of one or more whole revisions, at most up to `revision`.
    Events {
        watch_id: i64,
        revision: i64,
        events: Vec<Event>,
        /// The watcher accepts the response split into fragments.
        fragment: bool,
    },
    /// The watcher's start revision was compacted; it is gone.
    Compacted {
        watch_id: i64,
        compact_revision: i64,
    },
    /// Reading the store failed; the watcher is gone.
    Failed { watch_id: i64, reason: String },
}

impl Delivery {
    fn watch_id(&self) -> i64 {
        match self {
            Delivery::Events { watch_id, .. }
            | Delivery::Compacted { watch_id, .. }
            | Delivery::Failed { watch_id, .. } => *watch_id,
        }
    }
}

struct Watcher {
    spec: WatchSpec,
    /// The revision whose events are the next this watcher is owed.
    next_rev: i64,
    /// No events sent since the last progress check.
    quiet: bool,
}

/// The watchers of one Watch stream. Dropping it unregisters the stream.
pub struct WatchStream<S: EventSource> {
    hub: Arc<WatchHub>,
    id: u64,
    feed: Arc<Feed>,
    commits: mpsc::Receiver<Arc<Commit>>,
    source: S,
    watchers: BTreeMap<i64, Watcher>,
    /// The next ID to try for a watcher the client left the choice of.
    next_id: i64,
    /// The newest revision this stream knows is committed.
    head: i64,
    out: VecDeque<Delivery>,
    catch_up_events: usize,
}

impl<S: EventSource> Drop for WatchStream<S> {
    fn drop(&mut self) {
        self.hub.streams.lock().remove(&self.id);
    }
}

impl<S: EventSource> WatchStream<S> {
    /// The store's current revision, for response headers.
    pub fn revision(&self) -> i64 {
        self.source.current_revision()
    }

    /// Adds a watcher; returns its ID. A start revision in the past is
    /// served from the store (and a compacted one reported by [`next`]).
    ///
    /// [`next`]: WatchStream::next
    pub fn create(&mut self, mut spec: WatchSpec) -> Result<i64, CreateError> {
        if !matches!(&spec.range_end[..], [] | [0]) && spec.key >= spec.range_end {
            return Err(CreateError::EmptyRange);
        }
        // etcd's AutoWatchID is 0: a client cannot choose 0 itself.
        let id = if spec.watch_id == 0 {
            while self.watchers.contains_key(&self.next_id) {
                self.next_id += 1;
            }
            let id = self.next_id;
            self.next_id += 1;
            id
        } else if self.watchers.contains_key(&spec.watch_id) {
            return Err(CreateError::DuplicateId);
        } else {
            spec.watch_id
        };
        spec.watch_id = id;
        let current = self.source.current_revision();
        self.head = self.head.max(current);
        let next_rev = if spec.start_revision > 0 {
            spec.start_revision
        } else {
            current + 1
        };
        self.watchers.insert(
            id,
            Watcher {
                spec,
                next_rev,
                quiet: true,
            },
        );
        Ok(id)
    }

    /// Removes a watcher and whatever it still had queued; false if there
    /// was no such watcher.
    pub fn cancel(&mut self, watch_id: i64) -> bool {
        self.out.retain(|d| d.watch_id() != watch_id);
        self.watchers.remove(&watch_id).is_some()
    }

    /// The watchers that asked for progress notifications, are caught up,
    /// and were sent no events since the last call.
    pub fn progress_due(&mut self) -> Vec<i64> {
        let head = self.head;
        let mut due = Vec::new();
        for (id, w) in &mut self.watchers {
            if w.spec.progress_notify && w.quiet && w.next_rev > head {
                due.push(*id);
            }
            w.quiet = true;
        }
        due
    }

    /// The next thing to tell the client. Cancel-safe: dropping the future
    /// loses nothing, so it can race the client's requests in a select.
    pub async fn next(&mut self) -> Delivery {
        loop {
            if let Some(delivery) = self.out.pop_front() {
                return delivery;
            }
            if let Some(id) = self.behind() {
                self.catch_up(id).await;
                continue;
            }
            tokio::select! {
                commit = self.commits.recv() => match commit {
                    Some(commit) => self.fan_out(&commit),
                    // The feed holds the sender as long as this stream lives.
                    None => std::future::pending::<()>().await,
                },
                () = self.feed.wake.notified() => {
                    if self.feed.lagged.swap(false, Ordering::AcqRel) {
                        self.head = self.head.max(self.source.current_revision());
                    }
                }
            }
        }
    }

    /// The watcher furthest behind the head, if any is.
    fn behind(&self) -> Option<i64> {
        self.watchers
            .iter()
            .filter(|(_, w)| w.next_rev <= self.head)
            .min_by_key(|(_, w)| w.next_rev)
            .map(|(id, _)| *id)
    }

    /// Gives a commit's events to the watchers that have everything before it.
    fn fan_out(&mut self, commit: &Commit) {
        self.head = self.head.max(commit.revision);
        for (id, w) in &mut self.watchers {
            // Behind (the catch-up reads this commit too), or starting later.
            if w.next_rev <= commit.prev_revision || w.next_rev > commit.revision {
                continue;
            }
            let from = w.next_rev;
            let events = shape(
                &self.source,
                &w.spec,
                commit
                    .events
                    .iter()
                    .filter(|e| e.kv.as_ref().is_some_and(|kv| kv.mod_revision >= from)),
            );
            w.next_rev = commit.revision + 1;
            if !events.is_empty() {
                w.quiet = false;
                self.out.push_back(Delivery::Events {
                    watch_id: *id,
                    revision: commit.revision,
                    events,
                    fragment: w.spec.fragment,
                });
            }
        }
    }

    /// Reads one batch of a lagging watcher's events from the store.
    async fn catch_up(&mut self, id: i64) {
        let Some(w) = self.watchers.get(&id) else {
            return;
        };
        let (key, range_end, from) = (w.spec.key.clone(), w.spec.range_end.clone(), w.next_rev);
        let source = self.source.clone();
        let limit = self.catch_up_events;
        // Store reads block on disk: off the async workers.
        let read =
            tokio::task::spawn_blocking(move || source.events_since(&key, &range_end, from, limit))
                .await
                .unwrap_or_else(|e| Err(CatchUpError::Failed(format!("catch-up read: {e}"))));
        let Some(w) = self.watchers.get_mut(&id) else {
            return;
        };
        match read {
            Ok((events, next)) => {
                w.next_rev = next;
                self.head = self.head.max(next - 1);
                let events = shape(&self.source, &w.spec, events.iter());
                if !events.is_empty() {
                    w.quiet = false;
                    self.out.push_back(Delivery::Events {
                        watch_id: id,
                        revision: self.head,
                        events,
                        fragment: w.spec.fragment,
                    });
                }
            }
            Err(CatchUpError::Compacted) => {
                self.watchers.remove(&id);
                self.out.push_back(Delivery::Compacted {
                    watch_id: id,
                    compact_revision: self.source.compact_revision(),
                });
            }
            Err(CatchUpError::Failed(reason)) => {
                self.watchers.remove(&id);
                self.out.push_back(Delivery::Failed {
                    watch_id: id,
                    reason,
                });
            }
        }
    }
}

/// The events a watcher gets of `events`: its keys, its filters, with the
/// previous key-values when it asked for them.
fn shape<'e, S: EventSource>(
    source: &S,
    spec: &WatchSpec,
    events: impl Iterator<Item = &'e Event>,
) -> Vec<Event> {
    events
        .filter(|e| spec.wants(e))
        .map(|e| {
            let mut event = e.clone();
            if spec.prev_kv
                && let Some(kv) = &e.kv
            {
                event.prev_kv = source.kv_at(&kv.key, kv.mod_revision - 1);
            }
            event
        })
        .collect()
}
