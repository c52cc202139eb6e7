//! The Watch service, coalesced: all client watchers of one key range (and
//! one caller identity) share one upstream watch, a *broadcast*.
//!
//! A broadcast starts its upstream watch where its first client watcher
//! starts (at the current revision for a watcher from now), as etcd's
//! proxy does, so that watcher needs no upstream watch of its own; from
//! then on it knows `pos`: the revision up to which it has received every
//! event of its range (one before the start while it has received none).
//! Upstream responses hold whole revisions, so a response's last event
//! revision is a valid `pos`. It keeps its recent responses (`history`,
//! complete from `history_start`).
//!
//! Each client watcher carries `next_rev`, the first revision it has not been
//! given; it is only ever handed events at or after `next_rev`, and `next_rev`
//! moves past every revision it is handed. That alone makes delivery
//! duplicate-free and in order. Gap-freedom is the join rule:
//! - start 0 (now) or after `pos`: the broadcast delivers everything after
//!   `pos` from now on, which covers the client's start ("now" being the
//!   newest revision a member has told the broadcast of, so that a watcher
//!   from now is not handed what a broadcast still replays for its first
//!   watcher);
//! - start in `[history_start, pos]`: the history is replayed, then live;
//! - older: a private upstream watch from the client's start delivers until
//!   `next_rev` reaches `history_start`, then the history is replayed, then
//!   live. If the history moved on meanwhile, it catches up again.
//!
//! A client that cannot keep up (its queue is full) is not given the
//! response; it is treated like a late joiner from its own `next_rev`.

mod broadcast;
mod catch_up;
mod client;
mod session;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::time::Duration;

use bytes::Bytes;
use cairn_api::error;
use cairn_api::etcdserverpb::kv_client::KvClient;
use cairn_api::etcdserverpb::watch_client::WatchClient;
use cairn_api::etcdserverpb::watch_request::RequestUnion;
use cairn_api::etcdserverpb::watch_server::Watch;
use cairn_api::etcdserverpb::{
    RangeRequest, ResponseHeader, WatchCreateRequest, WatchRequest, WatchResponse,
};
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::AsciiMetadataValue;
use tonic::{Request, Response, Status, Streaming};

use crate::cache::ReadCache;
use crate::metrics::Metrics;
use crate::namespace::Namespace;
use crate::upstream::{Caller, MAX_MESSAGE, Upstream, member_failed};

use broadcast::Broadcast;
use client::{ClientWatcher, Outbox};
use session::Session;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Responses queued for one client stream beyond which its watchers are
/// treated as lagging and fall back to catching up.
const CLIENT_QUEUE: usize = 1024;

/// Upstream responses each broadcast keeps for late joiners.
const HISTORY: usize = 512;

pub struct WatchProxy {
    hub: Arc<Hub>,
}

impl WatchProxy {
    pub fn new(
        upstream: Upstream,
        namespace: Namespace,
        cache: Arc<ReadCache>,
        metrics: Arc<Metrics>,
        progress_interval: Duration,
        max_request_bytes: usize,
    ) -> WatchProxy {
        WatchProxy {
            hub: Arc::new(Hub {
                upstream,
                namespace,
                cache,
                metrics,
                progress_interval,
                max_request_bytes,
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
    /// How often idle watchers that asked for it get a progress
    /// notification.
    progress_interval: Duration,
    /// Responses larger than this go in fragments to watchers that ask.
    max_request_bytes: usize,
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
            first_start: start,
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
