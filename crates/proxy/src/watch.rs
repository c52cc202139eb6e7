//! The Watch service, coalesced: all client watchers of one key range (and
//! one caller identity) share one upstream watch, a *broadcast*.
//!
//! A broadcast always starts its upstream watch at the current revision
//! (never at some client's older start) and from then on knows `pos`: the
//! revision up to which it has received every event of its range. Upstream
//! responses hold whole revisions, so a response's last event revision is a
//! valid `pos`. It keeps its recent responses (`history`, complete from
//! `history_start`).
//!
//! Each client watcher carries `next_rev`, the first revision it has not been
//! given; it is only ever handed events at or after `next_rev`, and `next_rev`
//! moves past every revision it is handed. That alone makes delivery
//! duplicate-free and in order. Gap-freedom is the join rule:
//! - start 0 (now) or after `pos`: the broadcast delivers everything after
//!   `pos` from now on, which covers the client's start;
//! - start in `[history_start, pos]`: the history is replayed, then live;
//! - older: a private upstream watch from the client's start delivers until
//!   `next_rev` reaches `history_start`, then the history is replayed, then
//!   live. If the history moved on meanwhile, it catches up again.
//!
//! A client that cannot keep up (its queue is full) is not given the
//! response; it is treated like a late joiner from its own `next_rev`.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use cairn_api::error;
use cairn_api::etcdserverpb::kv_client::KvClient;
use cairn_api::etcdserverpb::watch_client::WatchClient;
use cairn_api::etcdserverpb::watch_create_request::FilterType;
use cairn_api::etcdserverpb::watch_request::RequestUnion;
use cairn_api::etcdserverpb::watch_server::Watch;
use cairn_api::etcdserverpb::{
    RangeRequest, ResponseHeader, WatchCreateRequest, WatchRequest, WatchResponse,
};
use cairn_api::mvccpb::event::EventType;
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::AsciiMetadataValue;
use tonic::{Request, Response, Status, Streaming};

use crate::cache::ReadCache;
use crate::metrics::Metrics;
use crate::namespace::Namespace;
use crate::upstream::{Caller, MAX_MESSAGE, Upstream, member_failed};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Responses queued for one client stream beyond which its watchers are
/// treated as lagging and fall back to catching up.
const CLIENT_QUEUE: usize = 1024;

/// Upstream responses each broadcast keeps for late joiners.
const HISTORY: usize = 512;

/// etcd's default progress notification interval.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(600);

pub struct WatchProxy {
    hub: Arc<Hub>,
}

impl WatchProxy {
    pub fn new(
        upstream: Upstream,
        namespace: Namespace,
        cache: Arc<ReadCache>,
        metrics: Arc<Metrics>,
    ) -> WatchProxy {
        WatchProxy {
            hub: Arc::new(Hub {
                upstream,
                namespace,
                cache,
                metrics,
                broadcasts: Mutex::new(HashMap::new()),
                next_reg: AtomicU64::new(1),
                latest: Mutex::new(ResponseHeader::default()),
            }),
        }
    }
}

#[tonic::async_trait]
impl Watch for WatchProxy {
    async fn watch(
        &self,
        request: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<BoxStream<WatchResponse>>, Status> {
        let caller = Caller::of(request.metadata());
        let requests = request.into_inner();
        let (out, rx) = mpsc::channel(16);
        let (outbox_tx, outbox_rx) = mpsc::unbounded_channel();
        let session = Session {
            hub: self.hub.clone(),
            token: caller.token,
            outbox: Outbox {
                tx: outbox_tx,
                queued: Arc::new(AtomicUsize::new(0)),
            },
            watchers: HashMap::new(),
            next_id: 0,
            out,
        };
        tokio::spawn(session.run(requests, outbox_rx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

struct Hub {
    upstream: Upstream,
    namespace: Namespace,
    cache: Arc<ReadCache>,
    metrics: Arc<Metrics>,
    broadcasts: Mutex<HashMap<RangeKey, mpsc::UnboundedSender<Command>>>,
    next_reg: AtomicU64,
    /// The newest header any upstream watch brought (progress answers).
    latest: Mutex<ResponseHeader>,
}

/// What a broadcast serves: a range, for one caller identity (a member
/// checks permissions per caller, so callers never share a watch).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct RangeKey {
    key: Bytes,
    end: Bytes,
    token: Option<AsciiMetadataValue>,
}

enum Command {
    Join(ClientWatcher, i64),
    Leave(u64),
    /// A catch-up task brought the watcher to `next_rev`.
    CaughtUp {
        reg: u64,
        next_rev: i64,
    },
    /// A catch-up task ended the watcher (compacted start, failure).
    Gone(u64),
}

/// A response for the client stream, tagged with the watcher registration
/// it belongs to (a cancelled watcher's stragglers are dropped by it).
struct Outgoing {
    reg: u64,
    /// The client's ID of the watcher (a refused create answers as -1).
    watch_id: i64,
    response: WatchResponse,
}

#[derive(Clone)]
struct Outbox {
    tx: mpsc::UnboundedSender<Outgoing>,
    queued: Arc<AtomicUsize>,
}

impl Outbox {
    fn push(&self, reg: u64, response: WatchResponse) {
        self.push_for(reg, response.watch_id, response);
    }

    fn push_for(&self, reg: u64, watch_id: i64, response: WatchResponse) {
        self.queued.fetch_add(1, Ordering::AcqRel);
        let outgoing = Outgoing {
            reg,
            watch_id,
            response,
        };
        if self.tx.send(outgoing).is_err() {
            self.queued.fetch_sub(1, Ordering::AcqRel);
        }
    }

    fn full(&self) -> bool {
        self.queued.load(Ordering::Acquire) >= CLIENT_QUEUE
    }

    fn closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Waits until the client has room again (or has gone).
    async fn drained(&self) {
        while self.queued.load(Ordering::Acquire) > CLIENT_QUEUE / 2 && !self.closed() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// One client watcher as the broadcast serves it.
#[derive(Clone)]
struct ClientWatcher {
    reg: u64,
    watch_id: i64,
    outbox: Outbox,
    no_put: bool,
    no_delete: bool,
    prev_kv: bool,
    progress_notify: bool,
    /// The first revision this watcher has not been given.
    next_rev: i64,
    /// No events since the last progress tick.
    quiet: bool,
    namespace: Namespace,
}

impl ClientWatcher {
    /// The part of an upstream response this watcher is owed, shaped as it
    /// asked; moves `next_rev` past the response's revisions. `None` when
    /// nothing in it is for this watcher.
    fn shape(&mut self, response: &WatchResponse) -> Option<WatchResponse> {
        let from = self.next_rev;
        let last = response.events.last()?.kv.as_ref()?.mod_revision;
        if last < from {
            return None;
        }
        self.next_rev = last + 1;
        let events: Vec<_> = response
            .events
            .iter()
            .filter(|e| e.kv.as_ref().is_some_and(|kv| kv.mod_revision >= from))
            .filter(|e| {
                if e.r#type == EventType::Delete as i32 {
                    !self.no_delete
                } else {
                    !self.no_put
                }
            })
            .map(|e| {
                let mut e = e.clone();
                if !self.prev_kv {
                    e.prev_kv = None;
                }
                if let Some(kv) = &mut e.kv {
                    self.namespace.strip_kv(kv);
                }
                if let Some(kv) = &mut e.prev_kv {
                    self.namespace.strip_kv(kv);
                }
                e
            })
            .collect();
        if events.is_empty() {
            return None;
        }
        self.quiet = false;
        Some(WatchResponse {
            header: response.header,
            watch_id: self.watch_id,
            events,
            ..Default::default()
        })
    }

    /// Hands the watcher its part of `response`; false (and nothing moved)
    /// when the client is too far behind to take more now.
    fn offer(&mut self, response: &WatchResponse) -> bool {
        if self.outbox.full() {
            return false;
        }
        if let Some(shaped) = self.shape(response) {
            self.outbox.push(self.reg, shaped);
        }
        true
    }

    fn cancel(&self, header: Option<ResponseHeader>, compact_revision: i64, reason: String) {
        self.outbox.push(
            self.reg,
            WatchResponse {
                header,
                watch_id: self.watch_id,
                canceled: true,
                compact_revision,
                cancel_reason: reason,
                ..Default::default()
            },
        );
    }
}

/// How a joining watcher is brought up to the broadcast's position.
#[derive(Debug, PartialEq, Eq)]
enum JoinPlan {
    /// Nothing to catch up: it starts at `next_rev`.
    Live(i64),
    /// Replay the history from `next_rev`.
    Replay(i64),
    /// Catch up privately from `next_rev` through `target`, then replay.
    CatchUp { next_rev: i64, target: i64 },
}

impl JoinPlan {
    fn new(start: i64, pos: i64, history_start: i64) -> JoinPlan {
        if start <= 0 || start > pos {
            JoinPlan::Live(start.max(pos + 1))
        } else if start >= history_start {
            JoinPlan::Replay(start)
        } else {
            JoinPlan::CatchUp {
                next_rev: start,
                target: history_start - 1,
            }
        }
    }
}

/// How an upstream watch could not be created.
enum OpenError {
    Compacted(i64),
    Refused(String),
    Failed(Status),
}

struct UpstreamWatch {
    // Dropping it ends the upstream stream.
    _requests: mpsc::Sender<WatchRequest>,
    responses: Streaming<WatchResponse>,
    header: Option<ResponseHeader>,
}

impl Hub {
    fn join(self: &Arc<Self>, key: RangeKey, watcher: ClientWatcher, start: i64) {
        let mut broadcasts = self.broadcasts.lock();
        let command = Command::Join(watcher, start);
        let command = match broadcasts.get(&key) {
            Some(tx) => match tx.send(command) {
                Ok(()) => return,
                Err(mpsc::error::SendError(command)) => command,
            },
            None => command,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = tx.send(command);
        broadcasts.insert(key.clone(), tx.clone());
        let broadcast = Broadcast {
            hub: self.clone(),
            key,
            commands: tx,
            members: HashMap::new(),
            pos: 0,
            header: None,
            history: VecDeque::new(),
            history_start: 1,
            ended: None,
        };
        tokio::spawn(broadcast.run(rx));
    }

    fn leave(&self, key: &RangeKey, reg: u64) {
        if let Some(tx) = self.broadcasts.lock().get(key) {
            let _ = tx.send(Command::Leave(reg));
        }
    }

    fn saw(&self, header: &Option<ResponseHeader>) {
        if let Some(h) = header {
            let mut latest = self.latest.lock();
            if h.revision >= latest.revision {
                *latest = *h;
            }
        }
    }

    /// Opens a watch on a member, failing over until one answers.
    async fn open(&self, key: &RangeKey, start: i64) -> Result<UpstreamWatch, OpenError> {
        let caller = Caller {
            token: key.token.clone(),
        };
        for _ in 0..self.upstream.len() {
            let (index, channel) = self.upstream.channel();
            let (tx, rx) = mpsc::channel(1);
            let create = WatchRequest {
                request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                    key: key.key.clone(),
                    range_end: key.end.clone(),
                    start_revision: start,
                    prev_kv: true,
                    ..Default::default()
                })),
            };
            let _ = tx.send(create).await;
            let opened = WatchClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE)
                .watch(caller.request(ReceiverStream::new(rx)))
                .await;
            let mut responses = match opened {
                Ok(r) => r.into_inner(),
                Err(status) if member_failed(&status) => {
                    self.upstream.failed(index);
                    continue;
                }
                Err(status) => return Err(OpenError::Failed(status)),
            };
            match responses.message().await {
                Ok(Some(created)) if created.canceled => {
                    return Err(if created.compact_revision > 0 {
                        OpenError::Compacted(created.compact_revision)
                    } else {
                        OpenError::Refused(created.cancel_reason)
                    });
                }
                Ok(Some(created)) => {
                    self.saw(&created.header);
                    return Ok(UpstreamWatch {
                        _requests: tx,
                        responses,
                        header: created.header,
                    });
                }
                Ok(None) => continue,
                Err(status) => {
                    if member_failed(&status) {
                        self.upstream.failed(index);
                        continue;
                    }
                    return Err(OpenError::Failed(status));
                }
            }
        }
        Err(OpenError::Failed(Status::unavailable(
            "no member accepted the watch",
        )))
    }

    /// Whether `start` is below the compacted revision (etcd refuses such
    /// watches; the history here may still hold them).
    async fn compacted(&self, key: &RangeKey, start: i64) -> bool {
        let caller = Caller {
            token: key.token.clone(),
        };
        let probe = RangeRequest {
            key: key.key.clone(),
            range_end: key.end.clone(),
            revision: start,
            limit: 1,
            count_only: true,
            serializable: true,
            ..Default::default()
        };
        let (_, channel) = self.upstream.channel();
        match KvClient::new(channel).range(caller.request(probe)).await {
            Ok(_) => false,
            Err(status) => error::EtcdError::from_status(&status) == Some(error::COMPACTED),
        }
    }
}

/// One upstream watch and the client watchers it serves.
struct Broadcast {
    hub: Arc<Hub>,
    key: RangeKey,
    commands: mpsc::UnboundedSender<Command>,
    members: HashMap<u64, Member>,
    /// Every event of the range up to here has been received.
    pos: i64,
    header: Option<ResponseHeader>,
    history: VecDeque<Arc<WatchResponse>>,
    /// The history holds every event from this revision to `pos`.
    history_start: i64,
    /// Why the upstream watch ended: (compact revision, reason).
    ended: Option<(i64, String)>,
}

struct Member {
    watcher: ClientWatcher,
    /// Set while the watcher catches up on its own.
    catching_up: Option<JoinHandle<()>>,
}

impl Broadcast {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let metrics = self.hub.metrics.clone();
        metrics.upstream_watchers.fetch_add(1, Ordering::Relaxed);
        let mut upstream = match self.open(0).await {
            Some(up) => up,
            None => return self.close(commands, &metrics),
        };
        let created = upstream.header.as_ref().map_or(0, |h| h.revision);
        self.pos = created;
        self.history_start = created + 1;
        self.header = upstream.header.take();
        let mut ticker = tokio::time::interval(PROGRESS_INTERVAL);
        ticker.tick().await;
        loop {
            if self.members.is_empty() {
                // Joins are sent under the registry lock: if none is queued
                // now, none can arrive once the entry is gone.
                let mut broadcasts = self.hub.broadcasts.lock();
                match commands.try_recv() {
                    Ok(command) => {
                        drop(broadcasts);
                        self.command(command);
                        continue;
                    }
                    Err(_) => {
                        if broadcasts
                            .get(&self.key)
                            .is_some_and(|tx| tx.same_channel(&self.commands))
                        {
                            broadcasts.remove(&self.key);
                        }
                        break;
                    }
                }
            }
            tokio::select! {
                command = commands.recv() => match command {
                    Some(command) => self.command(command),
                    None => break,
                },
                message = upstream.responses.message() => match message {
                    Ok(Some(response)) => {
                        if !self.upstream_response(response).await {
                            break;
                        }
                    }
                    Ok(None) | Err(_) => {
                        tracing::debug!("grpc-proxy: coalesced watch broke; resuming at {}", self.pos + 1);
                        match self.open(self.pos + 1).await {
                            Some(up) => upstream = up,
                            None => break,
                        }
                    }
                },
                _ = ticker.tick() => self.progress(),
            }
        }
        self.close(commands, &metrics);
    }

    fn close(mut self, mut commands: mpsc::UnboundedReceiver<Command>, metrics: &Metrics) {
        {
            let mut broadcasts = self.hub.broadcasts.lock();
            if broadcasts
                .get(&self.key)
                .is_some_and(|tx| tx.same_channel(&self.commands))
            {
                broadcasts.remove(&self.key);
            }
        }
        commands.close();
        // Joins never served (the upstream watch could not be had, e.g.
        // permission denied): created and cancelled at once with the reason
        // and watch ID -1, as a member answers a watch it refuses.
        let (compact_revision, reason) = self.ended.take().unwrap_or_default();
        while let Ok(command) = commands.try_recv() {
            if let Command::Join(watcher, _) = command {
                watcher.outbox.push_for(
                    watcher.reg,
                    watcher.watch_id,
                    WatchResponse {
                        header: self.some_header(),
                        watch_id: -1,
                        created: true,
                        canceled: true,
                        compact_revision,
                        cancel_reason: reason.clone(),
                        ..Default::default()
                    },
                );
            }
        }
        for (_, member) in self.members.drain() {
            if let Some(task) = member.catching_up {
                task.abort();
            }
        }
        metrics.upstream_watchers.fetch_sub(1, Ordering::Relaxed);
    }

    /// Opens the upstream watch at `start`, retrying while members are
    /// unreachable; `None` (members told why) when it cannot be had.
    async fn open(&mut self, start: i64) -> Option<UpstreamWatch> {
        loop {
            match self.hub.open(&self.key, start).await {
                Ok(up) => return Some(up),
                Err(OpenError::Compacted(compact_revision)) => {
                    self.end_all(compact_revision, String::new());
                    return None;
                }
                Err(OpenError::Refused(reason)) => {
                    self.end_all(0, reason);
                    return None;
                }
                Err(OpenError::Failed(status)) if !member_failed(&status) => {
                    self.end_all(0, status.message().to_owned());
                    return None;
                }
                Err(OpenError::Failed(_)) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// A header for responses of our own making: Go's client reads it
    /// unconditionally.
    fn some_header(&self) -> Option<ResponseHeader> {
        Some(self.header.unwrap_or_else(|| *self.hub.latest.lock()))
    }

    fn end_all(&mut self, compact_revision: i64, reason: String) {
        self.ended = Some((compact_revision, reason.clone()));
        let header = self.some_header();
        for (_, member) in self.members.drain() {
            if let Some(task) = member.catching_up {
                task.abort();
            }
            member
                .watcher
                .cancel(header, compact_revision, reason.clone());
        }
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Join(mut watcher, start) => {
                let header = ResponseHeader {
                    revision: self.pos,
                    ..self.header.unwrap_or_default()
                };
                watcher.outbox.push(
                    watcher.reg,
                    WatchResponse {
                        header: Some(header),
                        watch_id: watcher.watch_id,
                        created: true,
                        ..Default::default()
                    },
                );
                match JoinPlan::new(start, self.pos, self.history_start) {
                    JoinPlan::Live(next_rev) => {
                        watcher.next_rev = next_rev;
                        self.members.insert(
                            watcher.reg,
                            Member {
                                watcher,
                                catching_up: None,
                            },
                        );
                    }
                    // A past start is checked against compaction first, in
                    // the catch-up task: etcd refuses a compacted start even
                    // if the history here still has it.
                    JoinPlan::Replay(next_rev) => {
                        watcher.next_rev = next_rev;
                        self.catch_up(watcher, next_rev - 1, true);
                    }
                    JoinPlan::CatchUp { next_rev, target } => {
                        watcher.next_rev = next_rev;
                        self.catch_up(watcher, target, true);
                    }
                }
            }
            Command::Leave(reg) => {
                if let Some(Member {
                    catching_up: Some(task),
                    ..
                }) = self.members.remove(&reg)
                {
                    task.abort();
                }
            }
            Command::Gone(reg) => {
                self.members.remove(&reg);
            }
            Command::CaughtUp { reg, next_rev } => {
                let Some(member) = self.members.remove(&reg) else {
                    return;
                };
                let mut watcher = member.watcher;
                watcher.next_rev = next_rev;
                self.resume(watcher);
            }
        }
    }

    /// Brings a watcher that is at or past the history's start up to `pos`
    /// from the history, and makes it live; or sends it catching up again.
    fn resume(&mut self, mut watcher: ClientWatcher) {
        if watcher.next_rev < self.history_start {
            let target = self.history_start - 1;
            self.catch_up(watcher, target, false);
            return;
        }
        for response in &self.history {
            if !watcher.offer(response) {
                self.catch_up(watcher, self.history_start - 1, false);
                return;
            }
        }
        self.members.insert(
            watcher.reg,
            Member {
                watcher,
                catching_up: None,
            },
        );
    }

    fn catch_up(&mut self, watcher: ClientWatcher, target: i64, check_compaction: bool) {
        let task = tokio::spawn(catch_up(
            self.hub.clone(),
            self.key.clone(),
            watcher.clone(),
            target,
            check_compaction,
            self.commands.clone(),
        ));
        self.members.insert(
            watcher.reg,
            Member {
                watcher,
                catching_up: Some(task),
            },
        );
    }

    /// False when the upstream watch was cancelled and the broadcast ends.
    async fn upstream_response(&mut self, response: WatchResponse) -> bool {
        self.hub.saw(&response.header);
        if response.canceled {
            self.end_all(response.compact_revision, response.cancel_reason);
            return false;
        }
        self.header = response.header;
        let Some(last) = response
            .events
            .last()
            .and_then(|e| e.kv.as_ref())
            .map(|kv| kv.mod_revision)
        else {
            return true;
        };
        // The cache learns of a change before any client watcher does.
        self.hub.cache.wait_seen(last).await;
        let response = Arc::new(response);
        self.pos = last;
        self.history.push_back(response.clone());
        while self.history.len() > HISTORY {
            if let Some(old) = self.history.pop_front()
                && let Some(kv) = old.events.last().and_then(|e| e.kv.as_ref())
            {
                self.history_start = kv.mod_revision + 1;
            }
        }
        let mut lagging = Vec::new();
        for (reg, member) in &mut self.members {
            if member.catching_up.is_none() && !member.watcher.offer(&response) {
                lagging.push(*reg);
            }
        }
        for reg in lagging {
            if let Some(member) = self.members.remove(&reg) {
                let target = self.history_start - 1;
                self.catch_up(member.watcher, target, false);
            }
        }
        true
    }

    /// etcd's progress notification for idle watchers that asked for it.
    fn progress(&mut self) {
        let header = ResponseHeader {
            revision: self.pos,
            ..self.header.unwrap_or_default()
        };
        for member in self.members.values_mut() {
            let w = &mut member.watcher;
            if member.catching_up.is_none() && w.progress_notify && w.quiet {
                w.outbox.push(
                    w.reg,
                    WatchResponse {
                        header: Some(header),
                        watch_id: w.watch_id,
                        ..Default::default()
                    },
                );
            }
            w.quiet = true;
        }
    }
}

/// Brings one watcher to past `target` on its own: waits for its client to
/// drain, checks a past start against compaction, and reads what it misses
/// from a private upstream watch; then hands it back to the broadcast.
async fn catch_up(
    hub: Arc<Hub>,
    key: RangeKey,
    mut watcher: ClientWatcher,
    target: i64,
    check_compaction: bool,
    broadcast: mpsc::UnboundedSender<Command>,
) {
    watcher.outbox.drained().await;
    let private = check_compaction && hub.compacted(&key, watcher.next_rev).await;
    if watcher.next_rev <= target || private {
        hub.metrics
            .upstream_watchers
            .fetch_add(1, Ordering::Relaxed);
        hub.metrics
            .catch_up_watchers
            .fetch_add(1, Ordering::Relaxed);
        let ended = private_watch(&hub, &key, &mut watcher, target).await;
        hub.metrics
            .upstream_watchers
            .fetch_sub(1, Ordering::Relaxed);
        hub.metrics
            .catch_up_watchers
            .fetch_sub(1, Ordering::Relaxed);
        if ended {
            let _ = broadcast.send(Command::Gone(watcher.reg));
            return;
        }
    }
    let _ = broadcast.send(Command::CaughtUp {
        reg: watcher.reg,
        next_rev: watcher.next_rev,
    });
}

/// Delivers from a private watch until `next_rev` is past `target`; true if
/// the watcher ended instead (told why).
async fn private_watch(
    hub: &Hub,
    key: &RangeKey,
    watcher: &mut ClientWatcher,
    target: i64,
) -> bool {
    loop {
        let mut up = match hub.open(key, watcher.next_rev).await {
            Ok(up) => up,
            Err(OpenError::Compacted(compact_revision)) => {
                let header = *hub.latest.lock();
                watcher.cancel(Some(header), compact_revision, String::new());
                return true;
            }
            Err(OpenError::Refused(reason)) => {
                watcher.cancel(Some(*hub.latest.lock()), 0, reason);
                return true;
            }
            Err(OpenError::Failed(status)) => {
                if !member_failed(&status) {
                    watcher.cancel(Some(*hub.latest.lock()), 0, status.message().to_owned());
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        if watcher.next_rev > target {
            return false;
        }
        while let Ok(Some(response)) = up.responses.message().await {
            if response.canceled {
                watcher.cancel(
                    response.header,
                    response.compact_revision,
                    response.cancel_reason,
                );
                return true;
            }
            hub.saw(&response.header);
            if let Some(last) = response.events.last().and_then(|e| e.kv.as_ref()) {
                hub.cache.wait_seen(last.mod_revision).await;
            }
            if let Some(shaped) = watcher.shape(&response) {
                watcher.outbox.drained().await;
                watcher.outbox.push(watcher.reg, shaped);
            }
            if watcher.next_rev > target {
                return false;
            }
            if watcher.outbox.closed() {
                return true;
            }
        }
    }
}

/// One client's Watch stream.
struct Session {
    hub: Arc<Hub>,
    token: Option<AsciiMetadataValue>,
    outbox: Outbox,
    /// watch ID → (registration, broadcast).
    watchers: HashMap<i64, (u64, RangeKey)>,
    next_id: i64,
    out: mpsc::Sender<Result<WatchResponse, Status>>,
}

impl Session {
    async fn run(
        mut self,
        mut requests: Streaming<WatchRequest>,
        mut outbox: mpsc::UnboundedReceiver<Outgoing>,
    ) {
        loop {
            tokio::select! {
                request = requests.message() => match request {
                    Ok(Some(request)) => {
                        if self.handle(request).await.is_err() {
                            break;
                        }
                    }
                    Ok(None) | Err(_) => break,
                },
                Some(outgoing) = outbox.recv() => {
                    self.outbox.queued.fetch_sub(1, Ordering::AcqRel);
                    if self.deliver(outgoing).await.is_err() {
                        break;
                    }
                }
            }
        }
        for (_, (reg, key)) in self.watchers.drain() {
            self.hub.leave(&key, reg);
            self.hub
                .metrics
                .client_watchers
                .fetch_sub(1, Ordering::Relaxed);
        }
    }

    async fn deliver(&mut self, outgoing: Outgoing) -> Result<(), ()> {
        let watch_id = outgoing.watch_id;
        match self.watchers.get(&watch_id) {
            Some((reg, _)) if *reg == outgoing.reg => {}
            _ => return Ok(()),
        }
        if outgoing.response.canceled {
            self.watchers.remove(&watch_id);
            self.hub
                .metrics
                .client_watchers
                .fetch_sub(1, Ordering::Relaxed);
        }
        self.send(outgoing.response).await
    }

    async fn send(&self, response: WatchResponse) -> Result<(), ()> {
        self.out.send(Ok(response)).await.map_err(|_| ())
    }

    async fn handle(&mut self, request: WatchRequest) -> Result<(), ()> {
        match request.request_union {
            Some(RequestUnion::CreateRequest(create)) => self.create(create).await,
            Some(RequestUnion::CancelRequest(cancel)) => {
                let Some((reg, key)) = self.watchers.remove(&cancel.watch_id) else {
                    return Ok(());
                };
                self.hub.leave(&key, reg);
                self.hub
                    .metrics
                    .client_watchers
                    .fetch_sub(1, Ordering::Relaxed);
                let header = *self.hub.latest.lock();
                self.send(WatchResponse {
                    header: Some(header),
                    watch_id: cancel.watch_id,
                    canceled: true,
                    ..Default::default()
                })
                .await
            }
            Some(RequestUnion::ProgressRequest(_)) => {
                let header = *self.hub.latest.lock();
                self.send(WatchResponse {
                    header: Some(header),
                    watch_id: -1,
                    ..Default::default()
                })
                .await
            }
            None => Ok(()),
        }
    }

    async fn create(&mut self, create: WatchCreateRequest) -> Result<(), ()> {
        let key = if create.key.is_empty() {
            Bytes::from_static(&[0])
        } else {
            create.key.clone()
        };
        let empty_range = !matches!(&create.range_end[..], [] | [0]) && key >= create.range_end;
        let duplicate = create.watch_id != 0 && self.watchers.contains_key(&create.watch_id);
        if empty_range || duplicate {
            let reason = if empty_range {
                "mvcc: watcher range is empty"
            } else {
                "mvcc: duplicate watch ID provided on the WatchStream"
            };
            let header = *self.hub.latest.lock();
            return self
                .send(WatchResponse {
                    header: Some(header),
                    watch_id: -1,
                    created: true,
                    canceled: true,
                    cancel_reason: reason.to_owned(),
                    ..Default::default()
                })
                .await;
        }
        let watch_id = if create.watch_id == 0 {
            while self.watchers.contains_key(&self.next_id) {
                self.next_id += 1;
            }
            self.next_id += 1;
            self.next_id - 1
        } else {
            create.watch_id
        };
        let (key, end) = self.hub.namespace.interval(&key, &create.range_end);
        let range = RangeKey {
            key,
            end,
            token: self.token.clone(),
        };
        let reg = self.hub.next_reg.fetch_add(1, Ordering::Relaxed);
        let watcher = ClientWatcher {
            reg,
            watch_id,
            outbox: self.outbox.clone(),
            no_put: create.filters.contains(&(FilterType::Noput as i32)),
            no_delete: create.filters.contains(&(FilterType::Nodelete as i32)),
            prev_kv: create.prev_kv,
            progress_notify: create.progress_notify,
            next_rev: 0,
            quiet: true,
            namespace: self.hub.namespace.clone(),
        };
        self.watchers.insert(watch_id, (reg, range.clone()));
        self.hub
            .metrics
            .client_watchers
            .fetch_add(1, Ordering::Relaxed);
        self.hub.join(range, watcher, create.start_revision);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use cairn_api::mvccpb::{Event, KeyValue};
    use proptest::prelude::*;

    use super::*;

    fn event(revision: i64, delete: bool) -> Event {
        Event {
            r#type: if delete {
                EventType::Delete as i32
            } else {
                EventType::Put as i32
            },
            kv: Some(KeyValue {
                key: Bytes::from_static(b"k"),
                mod_revision: revision,
                ..Default::default()
            }),
            prev_kv: Some(KeyValue::default()),
        }
    }

    fn response(events: Vec<Event>) -> WatchResponse {
        WatchResponse {
            events,
            ..Default::default()
        }
    }

    fn watcher() -> (ClientWatcher, mpsc::UnboundedReceiver<Outgoing>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let w = ClientWatcher {
            reg: 1,
            watch_id: 7,
            outbox: Outbox {
                tx,
                queued: Arc::new(AtomicUsize::new(0)),
            },
            no_put: false,
            no_delete: false,
            prev_kv: false,
            progress_notify: false,
            next_rev: 0,
            quiet: true,
            namespace: Namespace::default(),
        };
        (w, rx)
    }

    fn delivered(rx: &mut mpsc::UnboundedReceiver<Outgoing>) -> Vec<i64> {
        let mut seen = Vec::new();
        while let Ok(o) = rx.try_recv() {
            for e in o.response.events {
                seen.push(e.kv.map_or(0, |kv| kv.mod_revision));
            }
        }
        seen
    }

    #[test]
    fn join_plans() {
        assert_eq!(JoinPlan::new(0, 10, 5), JoinPlan::Live(11));
        assert_eq!(JoinPlan::new(15, 10, 5), JoinPlan::Live(15));
        assert_eq!(JoinPlan::new(11, 10, 5), JoinPlan::Live(11));
        assert_eq!(JoinPlan::new(7, 10, 5), JoinPlan::Replay(7));
        assert_eq!(
            JoinPlan::new(3, 10, 5),
            JoinPlan::CatchUp {
                next_rev: 3,
                target: 4
            }
        );
    }

    #[test]
    fn shape_applies_filters_and_prev_kv() {
        let (mut w, _rx) = watcher();
        w.no_delete = true;
        w.next_rev = 2;
        let shaped = w
            .shape(&response(vec![
                event(1, false),
                event(2, false),
                event(3, true),
            ]))
            .expect("events");
        assert_eq!(shaped.watch_id, 7);
        assert_eq!(shaped.events.len(), 1);
        assert!(shaped.events[0].prev_kv.is_none());
        assert_eq!(w.next_rev, 4);
        // Everything filtered: nothing sent, but the position moves.
        assert!(w.shape(&response(vec![event(4, true)])).is_none());
        assert_eq!(w.next_rev, 5);
    }

    #[test]
    fn a_full_client_is_not_handed_more() {
        let (mut w, _rx) = watcher();
        w.outbox.queued.store(CLIENT_QUEUE, Ordering::Release);
        assert!(!w.offer(&response(vec![event(1, false)])));
        assert_eq!(w.next_rev, 0);
    }

    proptest! {
        /// The join rule, run against a store of events: however the
        /// broadcast's history is cut, the responses grouped and the client
        /// started, the client gets exactly the events from its start, once,
        /// in order.
        #[test]
        fn joins_are_gap_and_duplicate_free(
            revisions in proptest::collection::btree_set(1i64..200, 1..60),
            created in 0i64..200,
            kept in 1usize..20,
            start in 0i64..220,
            group in 1usize..4,
        ) {
            let store: Vec<i64> = revisions.into_iter().collect();
            let after = |from: i64| -> Vec<WatchResponse> {
                store.iter().copied().filter(|r| *r >= from).collect::<Vec<_>>()
                    .chunks(group).map(|c| response(c.iter().map(|r| event(*r, false)).collect()))
                    .collect()
            };
            // The broadcast started at `created` and received the rest; it
            // keeps the last `kept` responses.
            let received = after(created + 1);
            let pos = received.last().and_then(|r| r.events.last())
                .and_then(|e| e.kv.as_ref()).map_or(created, |kv| kv.mod_revision);
            let cut = received.len().saturating_sub(kept);
            let history_start = if cut == 0 {
                created + 1
            } else {
                received[cut - 1].events.last().and_then(|e| e.kv.as_ref())
                    .map_or(created, |kv| kv.mod_revision) + 1
            };
            let history = &received[cut..];
            let (mut w, mut rx) = watcher();
            match JoinPlan::new(start, pos, history_start) {
                JoinPlan::Live(next) => w.next_rev = next,
                JoinPlan::Replay(next) => {
                    w.next_rev = next;
                    for r in history { prop_assert!(w.offer(r)); }
                }
                JoinPlan::CatchUp { next_rev, target } => {
                    w.next_rev = next_rev;
                    for r in after(next_rev) {
                        if w.next_rev > target { break; }
                        prop_assert!(w.offer(&r));
                    }
                    for r in history { prop_assert!(w.offer(r)); }
                }
            }
            // Then live events after the join.
            let live: Vec<i64> = (pos + 1..pos + 4).collect();
            for r in &live { prop_assert!(w.offer(&response(vec![event(*r, false)]))); }
            let from = if start <= 0 { pos + 1 } else { start };
            let expected: Vec<i64> = store.iter().copied().chain(live.iter().copied())
                .filter(|r| *r >= from).collect();
            prop_assert_eq!(delivered(&mut rx), expected);
        }
    }
}
