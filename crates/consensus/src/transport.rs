//! The raft peer transport: raft-rs messages between the members of one
//! cluster, over gRPC (tonic) on their peer URLs, plain or TLS.
//!
//! Sending: each peer has a bounded queue and one task that keeps one
//! long-lived `Send` stream open to it, batching whatever raft queued
//! meanwhile into one `RaftBatch`. The raft thread never blocks on the
//! network: when a queue is full, or a peer is down, messages are dropped and
//! raft is told the peer is unreachable; raft retransmits what matters.
//! Snapshots are not queued: each one streams on a connection of its own,
//! the state-machine data piped from a [`SnapshotSource`] in chunks.
//!
//! Receiving: the `Peer` gRPC service hands each message to the raft thread
//! as a [`PeerEvent`], and writes incoming snapshot data to a file first.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crossbeam_channel::Sender;
use parking_lot::Mutex;
use raft::prelude::{Message, MessageType};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::SnapshotSource;
pub use cairn_net::PeerTls;

mod client;
mod conn;
mod server;
#[cfg(test)]
mod tests;

pub(crate) use cairn_net::peer_proto as pb;

/// Messages waiting for one peer. Past this, messages are dropped (and the
/// peer reported unreachable) rather than memory growing without bound.
pub(crate) const QUEUE_CAPACITY: usize = 4096;
/// A batch stops growing past this many encoded bytes (it always holds at
/// least one message, however large).
const MAX_BATCH_BYTES: usize = 4 << 20;
/// The largest gRPC message the service decodes: a batch of up to
/// MAX_BATCH_BYTES plus one message, which raft may make bigger than its
/// max_size_per_msg when a single entry is.
const MAX_RPC_MESSAGE: usize = 128 << 20;
/// Snapshot data goes out in chunks of this size.
const SNAPSHOT_CHUNK: usize = 64 << 10;
/// Reconnection backoff: doubled after each failure, up to the cap.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// TCP connect plus TLS handshake, as etcd's peer dial timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// HTTP/2 pings find a peer that vanished without closing its connection.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the transport tells the raft thread.
pub(crate) enum PeerEvent {
    /// A raft message from a peer, to step into the local RawNode.
    Message(Message),
    /// Sending to this peer failed or its queue was full: RawNode::report_unreachable.
    Unreachable(u64),
    /// The outcome of streaming a snapshot to a peer: report_snapshot(to, Finish or Failure).
    SnapshotSent { to: u64, ok: bool },
    /// A snapshot arrived: its MsgSnapshot (as sent), the state-machine data
    /// saved in `file`, and the `members` blob the sender attached.
    SnapshotReceived {
        message: Message,
        file: PathBuf,
        members: Vec<u8>,
    },
}

impl std::fmt::Debug for PeerEvent {
    // Raft messages can carry megabytes of entries: print their gist only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerEvent::Message(m) => write!(
                f,
                "Message({:?} {} -> {}, term {}, {} entries)",
                m.msg_type,
                m.from,
                m.to,
                m.term,
                m.entries.len()
            ),
            PeerEvent::Unreachable(id) => write!(f, "Unreachable({id})"),
            PeerEvent::SnapshotSent { to, ok } => {
                write!(f, "SnapshotSent {{ to: {to}, ok: {ok} }}")
            }
            PeerEvent::SnapshotReceived {
                message,
                file,
                members,
            } => write!(
                f,
                "SnapshotReceived {{ from: {}, index: {}, file: {}, members: {} bytes }}",
                message.from,
                message.get_snapshot().get_metadata().index,
                file.display(),
                members.len()
            ),
        }
    }
}

/// Errors of the peer transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("peer TLS: {0}")]
    Tls(String),
    #[error("peer URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("peer transport I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("peer transport: {0}")]
    Grpc(#[from] tonic::transport::Error),
    /// A peer answered with an error status (boxed: a Status is large).
    #[error("peer refused: {0}")]
    Refused(Box<tonic::Status>),
    #[error("raft message encoding: {0}")]
    Encoding(#[from] protobuf::ProtobufError),
    #[error("snapshot: {0}")]
    Snapshot(String),
    /// The peer was removed or the transport dropped.
    #[error("peer transport stopped")]
    Stopped,
}

impl From<cairn_net::NetError> for TransportError {
    fn from(e: cairn_net::NetError) -> Self {
        match e {
            cairn_net::NetError::Peer { url, reason } => TransportError::Url { url, reason },
            other => TransportError::Tls(other.to_string()),
        }
    }
}

impl From<tonic::Status> for TransportError {
    fn from(status: tonic::Status) -> Self {
        TransportError::Refused(Box::new(status))
    }
}

/// How a [`Transport`] is set up.
pub(crate) struct TransportConfig {
    pub self_id: u64,
    pub cluster_id: u64,
    pub tls: Option<PeerTls>,
    /// Where received snapshots are written (created when missing). Each gets
    /// a file of its own; whoever takes the SnapshotReceived deletes it.
    pub snap_dir: PathBuf,
    /// Writes the state-machine data of outgoing snapshots.
    pub snapshot_source: Arc<dyn SnapshotSource>,
    /// Attached to each outgoing snapshot's first chunk.
    pub members_blob: Arc<dyn Fn() -> Vec<u8> + Send + Sync>,
    pub events: Sender<PeerEvent>,
}

/// What the sender tasks, snapshot tasks and the service share.
struct Shared {
    self_id: u64,
    cluster_id: u64,
    /// Built once at start; an error is kept and reported on each attempt
    /// to dial an https peer (and by `serve`), since `start` cannot fail.
    client_tls: Option<Result<cairn_net::ClientTls, String>>,
    tls: Option<PeerTls>,
    snap_dir: PathBuf,
    snapshot_source: Arc<dyn SnapshotSource>,
    members_blob: Arc<dyn Fn() -> Vec<u8> + Send + Sync>,
    events: Sender<PeerEvent>,
}

impl Shared {
    /// Tells raft something without ever blocking the caller (the raft
    /// thread, or a sender task): the raft thread drains this channel, so
    /// blocking on it from the raft thread could deadlock.
    fn report(&self, event: PeerEvent) {
        if let Err(e) = self.events.try_send(event) {
            tracing::debug!(event = ?e.into_inner(), "raft event channel full or closed; event dropped");
        }
    }
}

/// Per-peer state that outlives a change of the peer's URLs.
#[derive(Default)]
struct PeerState {
    /// A queue-full Unreachable was reported and the queue has not been
    /// drained since: report it once, not once per dropped message.
    full_reported: AtomicBool,
    /// A snapshot is streaming to this peer.
    snapshot_in_flight: AtomicBool,
    /// Messages dropped because the queue was full (for tests and metrics).
    dropped: AtomicU64,
}

struct PeerHandle {
    urls: Vec<String>,
    queue: mpsc::Sender<Message>,
    state: Arc<PeerState>,
    task: JoinHandle<()>,
}

impl Drop for PeerHandle {
    fn drop(&mut self) {
        // A removed peer's stream stops now, not when its queue next wakes it.
        self.task.abort();
    }
}

/// The raft peer transport of one member.
pub(crate) struct Transport {
    shared: Arc<Shared>,
    /// Sender tasks are spawned from the raft thread, which has no runtime.
    runtime: tokio::runtime::Handle,
    peers: Mutex<HashMap<u64, PeerHandle>>,
}

impl Transport {
    /// Starts the sender machinery; must be called inside a tokio runtime.
    pub(crate) fn start(config: TransportConfig) -> Arc<Transport> {
        let client_tls = config
            .tls
            .as_ref()
            .map(|t| t.client().map_err(|e| e.to_string()));
        if let Some(Err(e)) = &client_tls {
            tracing::error!(error = %e, "peer TLS configuration is unusable; https peers cannot be reached");
        }
        server::remove_partial_snapshots(&config.snap_dir);
        Arc::new(Transport {
            shared: Arc::new(Shared {
                self_id: config.self_id,
                cluster_id: config.cluster_id,
                client_tls,
                tls: config.tls,
                snap_dir: config.snap_dir,
                snapshot_source: config.snapshot_source,
                members_blob: config.members_blob,
                events: config.events,
            }),
            runtime: tokio::runtime::Handle::current(),
            peers: Mutex::new(HashMap::new()),
        })
    }

    /// Replaces the set of peers (id → peer URLs, http:// or https://). New
    /// ids get a sender task; removed ids are stopped. Never includes self.
    pub(crate) fn set_peers(&self, peers: &[(u64, Vec<String>)]) {
        let wanted: HashMap<u64, &Vec<String>> = peers
            .iter()
            .filter(|(id, _)| *id != self.shared.self_id)
            .map(|(id, urls)| (*id, urls))
            .collect();
        let mut current = self.peers.lock();
        let mut kept_states = HashMap::new();
        current.retain(|id, handle| match wanted.get(id) {
            Some(urls) if **urls == handle.urls => true,
            Some(_) => {
                // New URLs: restart the sender, but keep its snapshot state
                // so two snapshots never stream to one peer at once.
                kept_states.insert(*id, handle.state.clone());
                false
            }
            None => false,
        });
        for (id, urls) in wanted {
            if current.contains_key(&id) {
                continue;
            }
            if urls.is_empty() {
                tracing::warn!(
                    peer = id,
                    "raft peer has no peer URLs; messages to it are dropped"
                );
            }
            let state = kept_states.remove(&id).unwrap_or_default();
            let (queue, rx) = mpsc::channel(QUEUE_CAPACITY);
            let task = self.runtime.spawn(client::run_peer(
                self.shared.clone(),
                id,
                urls.clone(),
                rx,
                state.clone(),
            ));
            tracing::debug!(peer = id, ?urls, "raft peer added");
            current.insert(
                id,
                PeerHandle {
                    urls: urls.clone(),
                    queue,
                    state,
                    task,
                },
            );
        }
    }

    /// Called from the (non-async) raft thread; never blocks. Messages to one
    /// peer keep their order. MsgSnapshot is not queued with the others: it
    /// starts a snapshot stream to that peer (one at a time per peer), whose
    /// outcome comes back as PeerEvent::SnapshotSent.
    pub(crate) fn send(&self, messages: Vec<Message>) {
        let peers = self.peers.lock();
        for message in messages {
            let to = message.to;
            let Some(peer) = peers.get(&to) else {
                tracing::debug!(to, kind = ?message.msg_type, "message to unknown raft peer dropped");
                self.shared.report(PeerEvent::Unreachable(to));
                continue;
            };
            if message.msg_type == MessageType::MsgSnapshot {
                self.start_snapshot(peer, message);
                continue;
            }
            match peer.queue.try_send(message) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    peer.state.dropped.fetch_add(1, Ordering::Relaxed);
                    if !peer.state.full_reported.swap(true, Ordering::AcqRel) {
                        tracing::warn!(to, "raft peer queue is full; dropping messages");
                        self.shared.report(PeerEvent::Unreachable(to));
                    }
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.shared.report(PeerEvent::Unreachable(to));
                }
            }
        }
    }

    fn start_snapshot(&self, peer: &PeerHandle, message: Message) {
        let to = message.to;
        if peer.state.snapshot_in_flight.swap(true, Ordering::AcqRel) {
            // Raft waits for an outcome of every snapshot it sends: this one
            // failed, and it will send another once the current one is done.
            tracing::warn!(
                to,
                "a snapshot is already streaming to this peer; another one dropped"
            );
            self.shared
                .report(PeerEvent::SnapshotSent { to, ok: false });
            return;
        }
        self.runtime.spawn(client::send_snapshot(
            self.shared.clone(),
            peer.urls.clone(),
            peer.state.clone(),
            message,
        ));
    }

    /// Serves the Peer service on `listener` (TLS when configured, with
    /// client-certificate verification against trusted_ca_pem when
    /// client_cert_auth) until `shutdown` resolves.
    pub(crate) async fn serve(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), TransportError> {
        server::serve(self.shared.clone(), listener, shutdown).await
    }

    /// Messages to `peer` dropped so far because its queue was full.
    #[cfg(test)]
    pub(crate) fn dropped(&self, peer: u64) -> u64 {
        self.peers
            .lock()
            .get(&peer)
            .map_or(0, |p| p.state.dropped.load(Ordering::Relaxed))
    }

    /// Messages waiting in `peer`'s queue.
    #[cfg(test)]
    pub(crate) fn queued(&self, peer: u64) -> usize {
        self.peers
            .lock()
            .get(&peer)
            .map_or(0, |p| p.queue.max_capacity() - p.queue.capacity())
    }
}

/// Asks the members at `peer_urls` (any that answers) for the cluster ID and
/// member registry: how a member joining an existing cluster learns who it is.
pub async fn fetch_cluster(
    peer_urls: &[String],
    tls: Option<&PeerTls>,
) -> Result<(u64, Vec<crate::PeerInfo>), TransportError> {
    let client_tls = tls.map(PeerTls::client).transpose()?;
    Ok(cairn_net::fetch_cluster(peer_urls, client_tls.as_ref()).await?)
}
