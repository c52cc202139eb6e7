//! The raft peer transport: raft-rs messages between the members of one
//! cluster, over gRPC (tonic) on their peer URLs, plain or TLS. One
//! transport serves every raft group of a member: groups attach to it, and
//! each message travels with its group's ID.
//!
//! Sending: each peer has a bounded queue and one task that keeps one
//! long-lived `Send` stream open to it, batching whatever any group queued
//! meanwhile into one `RaftBatch`. The raft thread never blocks on the
//! network: when a queue is full, or a peer is down, messages are dropped and
//! raft is told the peer is unreachable; raft retransmits what matters.
//! Snapshots are not queued: each one streams on a connection of its own,
//! the state-machine data piped from a [`SnapshotSource`] in chunks.
//!
//! Receiving: the `Peer` gRPC service hands each message to the raft thread
//! of its group as a [`PeerEvent`], and writes incoming snapshot data to a
//! file first, checking its size and CRC-32 against the sender's last chunk
//! before raft sees it. Messages of a group not attached here are dropped.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use raft::prelude::{Message, MessageType};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::SnapshotSource;
use crate::raft_transport::{EventSender, GroupEndpoint, GroupId, PeerEvent, RaftTransport};
pub use cairn_net::PeerTls;

mod client;
mod conn;
#[cfg(test)]
mod fuzz_tests;
mod server;
#[cfg(test)]
mod tests;

pub(crate) use cairn_net::peer_proto as pb;
pub(crate) use server::received_snapshot;

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
}

/// What the transport reaches of one attached group.
struct GroupRoute {
    events: EventSender,
    snapshot_source: Arc<dyn SnapshotSource>,
    members_blob: Arc<dyn Fn() -> Vec<u8> + Send + Sync>,
    /// Where the group's received snapshots are written (created when
    /// missing). Each gets a file of its own; whoever takes the
    /// SnapshotReceived deletes it.
    snap_dir: PathBuf,
}

/// What the sender tasks, snapshot tasks and the service share.
struct Shared {
    self_id: u64,
    cluster_id: u64,
    /// Built once at start; an error is kept and reported on each attempt
    /// to dial an https peer (and by `serve`), since `start` cannot fail.
    client_tls: Option<Result<cairn_net::ClientTls, String>>,
    tls: Option<PeerTls>,
    groups: parking_lot::RwLock<HashMap<GroupId, GroupRoute>>,
}

impl Shared {
    /// Tells `group`'s raft thread something without ever blocking the
    /// caller (a raft thread, or a sender task): the raft thread drains
    /// this channel, so blocking on it from a raft thread could deadlock.
    fn report(&self, group: GroupId, event: PeerEvent) {
        let groups = self.groups.read();
        let Some(route) = groups.get(&group) else {
            tracing::debug!(group, ?event, "event for a detached raft group dropped");
            return;
        };
        if !route.events.send(event) {
            tracing::debug!(group, "raft event queue closed; event dropped");
        }
    }

    /// What `read` makes of `group`'s route, or None when it is not attached.
    fn route<T>(&self, group: GroupId, read: impl FnOnce(&GroupRoute) -> T) -> Option<T> {
        self.groups.read().get(&group).map(read)
    }
}

/// Per-peer state that outlives a change of the peer's URLs.
#[derive(Default)]
struct PeerState {
    /// A queue-full Unreachable was reported and the queue has not been
    /// drained since: report it once, not once per dropped message.
    full_reported: AtomicBool,
    /// The groups with a snapshot streaming to this peer.
    snapshots_in_flight: Mutex<HashSet<GroupId>>,
    /// The groups that have this member as a peer: told when it is unreachable.
    groups: Mutex<Vec<GroupId>>,
    /// Messages dropped because the queue was full (for tests and metrics).
    dropped: AtomicU64,
}

impl PeerState {
    fn report_unreachable(&self, shared: &Shared, peer: u64) {
        for &group in self.groups.lock().iter() {
            shared.report(group, PeerEvent::Unreachable(peer));
        }
    }
}

/// A message and its group, as queued for a peer.
type Addressed = (GroupId, Message);

struct PeerHandle {
    urls: Vec<String>,
    queue: mpsc::Sender<Addressed>,
    state: Arc<PeerState>,
    task: JoinHandle<()>,
}

impl Drop for PeerHandle {
    fn drop(&mut self) {
        // A removed peer's stream stops now, not when its queue next wakes it.
        self.task.abort();
    }
}

/// The peers of every group, and one sender per member among them.
#[derive(Default)]
struct Peers {
    /// Each group's peers (member ID → peer URLs), as it last set them.
    by_group: HashMap<GroupId, HashMap<u64, Vec<String>>>,
    senders: HashMap<u64, PeerHandle>,
}

/// The raft peer transport of one member, shared by its groups.
pub(crate) struct Transport {
    shared: Arc<Shared>,
    /// Sender tasks are spawned from the raft thread, which has no runtime.
    runtime: tokio::runtime::Handle,
    peers: Mutex<Peers>,
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
        Arc::new(Transport {
            shared: Arc::new(Shared {
                self_id: config.self_id,
                cluster_id: config.cluster_id,
                client_tls,
                tls: config.tls,
                groups: Default::default(),
            }),
            runtime: tokio::runtime::Handle::current(),
            peers: Mutex::new(Peers::default()),
        })
    }

    /// Routes `endpoint.group`'s incoming messages and snapshots to it, and
    /// serves its outgoing snapshots; replaces what was attached for that
    /// group before.
    pub(crate) fn attach(&self, endpoint: &GroupEndpoint) {
        debug_assert_eq!(endpoint.member, self.shared.self_id);
        server::remove_partial_snapshots(&endpoint.snap_dir);
        self.shared.groups.write().insert(
            endpoint.group,
            GroupRoute {
                events: endpoint.events.clone(),
                snapshot_source: endpoint.snapshot_source.clone(),
                members_blob: endpoint.members_blob.clone(),
                snap_dir: endpoint.snap_dir.clone(),
            },
        );
    }

    /// Stops routing `group`'s messages, and forgets its peers.
    pub(crate) fn detach(&self, group: GroupId) {
        self.set_peers(group, &[]);
        self.shared.groups.write().remove(&group);
    }

    /// Replaces `group`'s peers (id → peer URLs, http:// or https://). A
    /// member that becomes a peer of some group gets a sender task; one
    /// that is no group's peer any more is stopped. Never includes self.
    pub(crate) fn set_peers(&self, group: GroupId, peers: &[(u64, Vec<String>)]) {
        let mut current = self.peers.lock();
        let group_peers: HashMap<u64, Vec<String>> = peers
            .iter()
            .filter(|(id, _)| *id != self.shared.self_id)
            .cloned()
            .collect();
        if group_peers.is_empty() {
            current.by_group.remove(&group);
        } else {
            current.by_group.insert(group, group_peers);
        }
        // Every member some group names, with the URLs the group that
        // named it last (by this call) gave, and the groups that name it.
        let mut wanted: HashMap<u64, (Vec<String>, Vec<GroupId>)> = HashMap::new();
        for (&g, members) in &current.by_group {
            for (id, urls) in members {
                let entry = wanted
                    .entry(*id)
                    .or_insert_with(|| (urls.clone(), Vec::new()));
                if g == group {
                    entry.0 = urls.clone();
                }
                entry.1.push(g);
            }
        }
        let mut kept_states = HashMap::new();
        current.senders.retain(|id, handle| match wanted.get(id) {
            Some((urls, _)) if *urls == handle.urls => true,
            Some(_) => {
                // New URLs: restart the sender, but keep its snapshot state
                // so two snapshots of a group never stream to one peer at once.
                kept_states.insert(*id, handle.state.clone());
                false
            }
            None => false,
        });
        for (id, (urls, groups)) in wanted {
            if let Some(handle) = current.senders.get(&id) {
                *handle.state.groups.lock() = groups;
                continue;
            }
            if urls.is_empty() {
                tracing::warn!(
                    peer = id,
                    "raft peer has no peer URLs; messages to it are dropped"
                );
            }
            let state: Arc<PeerState> = kept_states.remove(&id).unwrap_or_default();
            *state.groups.lock() = groups;
            let (queue, rx) = mpsc::channel(QUEUE_CAPACITY);
            let task = self.runtime.spawn(client::run_peer(
                self.shared.clone(),
                id,
                urls.clone(),
                rx,
                state.clone(),
            ));
            tracing::debug!(peer = id, ?urls, "raft peer added");
            current.senders.insert(
                id,
                PeerHandle {
                    urls,
                    queue,
                    state,
                    task,
                },
            );
        }
    }

    /// Called from the (non-async) raft thread; never blocks. Messages to one
    /// peer keep their order. MsgSnapshot is not queued with the others: it
    /// starts a snapshot stream to that peer (one at a time per peer and
    /// group), whose outcome comes back as PeerEvent::SnapshotSent.
    pub(crate) fn send(&self, group: GroupId, messages: Vec<Message>) {
        if !self.shared.groups.read().contains_key(&group) {
            tracing::debug!(group, "messages of a detached raft group dropped");
            return;
        }
        let peers = self.peers.lock();
        for message in messages {
            let to = message.to;
            let Some(peer) = peers.senders.get(&to) else {
                tracing::debug!(group, to, kind = ?message.msg_type, "message to unknown raft peer dropped");
                self.shared.report(group, PeerEvent::Unreachable(to));
                continue;
            };
            if message.msg_type == MessageType::MsgSnapshot {
                self.start_snapshot(group, peer, message);
                continue;
            }
            match peer.queue.try_send((group, message)) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    peer.state.dropped.fetch_add(1, Ordering::Relaxed);
                    if !peer.state.full_reported.swap(true, Ordering::AcqRel) {
                        tracing::warn!(to, "raft peer queue is full; dropping messages");
                        peer.state.report_unreachable(&self.shared, to);
                    }
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.shared.report(group, PeerEvent::Unreachable(to));
                }
            }
        }
    }

    fn start_snapshot(&self, group: GroupId, peer: &PeerHandle, message: Message) {
        let to = message.to;
        if !peer.state.snapshots_in_flight.lock().insert(group) {
            // Raft waits for an outcome of every snapshot it sends: this one
            // failed, and it will send another once the current one is done.
            tracing::warn!(
                group,
                to,
                "a snapshot is already streaming to this peer; another one dropped"
            );
            self.shared
                .report(group, PeerEvent::SnapshotSent { to, ok: false });
            return;
        }
        self.runtime.spawn(client::send_snapshot(
            self.shared.clone(),
            group,
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
        listener: impl Into<cairn_net::Listener>,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), TransportError> {
        server::serve(self.shared.clone(), listener.into(), shutdown).await
    }

    /// Messages to `peer` dropped so far because its queue was full.
    #[cfg(test)]
    pub(crate) fn dropped(&self, peer: u64) -> u64 {
        self.peers
            .lock()
            .senders
            .get(&peer)
            .map_or(0, |p| p.state.dropped.load(Ordering::Relaxed))
    }

    /// Messages waiting in `peer`'s queue.
    #[cfg(test)]
    pub(crate) fn queued(&self, peer: u64) -> usize {
        self.peers
            .lock()
            .senders
            .get(&peer)
            .map_or(0, |p| p.queue.max_capacity() - p.queue.capacity())
    }
}

/// A member's raft peer network: its peer listeners, and one connection per
/// peer that carries the messages of every raft group the member runs
/// (each started with [`crate::Node::start_in`]). Serves until it is
/// dropped.
pub struct PeerNetwork {
    transport: Arc<Transport>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl PeerNetwork {
    /// Starts serving `listeners` (TCP or Unix sockets, TLS when `tls` says
    /// so) as member `member` of cluster `cluster_id`. Call inside a tokio
    /// runtime.
    pub fn start(
        member: u64,
        cluster_id: u64,
        tls: Option<PeerTls>,
        listeners: Vec<impl Into<cairn_net::Listener>>,
    ) -> PeerNetwork {
        let transport = Transport::start(TransportConfig {
            self_id: member,
            cluster_id,
            tls,
        });
        let (stop, stopping) = tokio::sync::watch::channel(false);
        for listener in listeners {
            let listener: cairn_net::Listener = listener.into();
            let transport = transport.clone();
            let mut stopping = stopping.clone();
            tokio::spawn(async move {
                let shutdown = async move {
                    // An Err means the network was dropped: stop too.
                    let _ = stopping.wait_for(|stop| *stop).await;
                };
                if let Err(e) = transport.serve(listener, shutdown).await {
                    tracing::error!("peer listener failed: {e}");
                }
            });
        }
        PeerNetwork { transport, stop }
    }

    pub(crate) fn transport(&self) -> Arc<Transport> {
        self.transport.clone()
    }
}

impl Drop for PeerNetwork {
    fn drop(&mut self) {
        self.stop.send_replace(true);
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

impl RaftTransport for Transport {
    fn send(&self, group: GroupId, messages: Vec<Message>) {
        Transport::send(self, group, messages)
    }

    fn set_peers(&self, group: GroupId, peers: &[(u64, Vec<String>)]) {
        Transport::set_peers(self, group, peers)
    }

    fn detach(&self, group: GroupId) {
        Transport::detach(self, group)
    }
}
