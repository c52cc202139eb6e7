//! The receiving side: the `Peer` gRPC service.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use protobuf::Message as _;
use raft::prelude::{Message, MessageType};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};

use super::pb::peer_server::{Peer, PeerServer};
use super::pb::{MembersRequest, MembersResponse, RaftBatch, SendAck, SnapshotAck, SnapshotChunk};
use super::{
    KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, MAX_RPC_MESSAGE, PeerEvent, PeerTls, Shared,
    TransportError,
};
use crate::raft_transport::{CLUSTER_GROUP, GroupId};

/// Received snapshots are written under this suffix and renamed once
/// complete and synced, so one cut short by a crash is recognisable.
const PARTIAL_SUFFIX: &str = ".snap.part";
const SNAPSHOT_SUFFIX: &str = ".snap";

/// Connections handed from the accept loop to tonic, not yet picked up.
const ACCEPT_BACKLOG: usize = 16;

pub(super) async fn serve(
    shared: Arc<Shared>,
    listener: cairn_net::Listener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), TransportError> {
    let server_tls = shared.tls.as_ref().map(PeerTls::server).transpose()?;
    let local = listener.local_addr()?;
    let (incoming, accept) = cairn_net::Accept::new(server_tls.as_ref(), "peer")
        .backlog(ACCEPT_BACKLOG)
        .spawn::<cairn_net::ServerStream>(listener);
    // Peers keep their Send streams open for good, and tonic's graceful
    // shutdown waits for every stream to end: the handlers watch this and
    // end theirs when shutdown comes.
    let (stopping, stop) = watch::channel(false);
    let signal = async move {
        shutdown.await;
        stopping.send_replace(true);
    };
    let service = PeerService {
        shared: shared.clone(),
        stop,
    };
    tracing::info!(%local, tls = shared.tls.is_some(), "serving raft peers");
    let result = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .http2_adaptive_window(Some(true))
        .add_service(
            PeerServer::new(service)
                .max_decoding_message_size(MAX_RPC_MESSAGE)
                .max_encoding_message_size(MAX_RPC_MESSAGE),
        )
        .serve_with_incoming_shutdown(incoming, signal)
        .await;
    // The listener must be closed when serve returns, so the address can be
    // bound again at once: wait for the aborted task to be dropped.
    accept.abort();
    let _ = accept.await;
    tracing::info!(%local, "stopped serving raft peers");
    Ok(result?)
}

struct PeerService {
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
}

impl PeerService {
    /// The next message of `stream`, or an error once the server is
    /// shutting down.
    async fn next<T>(&self, stream: &mut Streaming<T>) -> Result<Option<T>, Status> {
        let mut stop = self.stop.clone();
        tokio::select! {
            message = stream.message() => message,
            // An Err means the server is gone: stop as well.
            _ = stop.wait_for(|stopping| *stopping) => {
                Err(Status::unavailable("peer transport shutting down"))
            }
        }
    }

    fn check_cluster(&self, cluster_id: u64, from: u64) -> Result<(), Status> {
        if cluster_id == self.shared.cluster_id {
            return Ok(());
        }
        tracing::warn!(
            from,
            cluster_id = format_args!("{cluster_id:x}"),
            local_cluster_id = format_args!("{:x}", self.shared.cluster_id),
            "refused a raft peer of another cluster"
        );
        Err(Status::failed_precondition("cluster ID mismatch"))
    }

    /// Hands `event` to `group`'s raft thread; fails when the group is not
    /// attached here or its node has stopped.
    fn deliver(&self, group: GroupId, event: PeerEvent) -> Result<(), Status> {
        self.shared
            .route(group, |route| route.events.send(event))
            .filter(|&sent| sent)
            .map(|_| ())
            .ok_or_else(|| Status::unavailable(format!("raft group {group} is not running here")))
    }
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn members(
        &self,
        _request: Request<MembersRequest>,
    ) -> Result<Response<MembersResponse>, Status> {
        let members = self
            .shared
            .route(CLUSTER_GROUP, |route| (route.members_blob)())
            .ok_or_else(|| Status::unavailable("raft node not started"))?;
        Ok(Response::new(MembersResponse {
            cluster_id: self.shared.cluster_id,
            members: members.into(),
        }))
    }

    async fn send(
        &self,
        request: Request<Streaming<RaftBatch>>,
    ) -> Result<Response<SendAck>, Status> {
        let mut stream = request.into_inner();
        while let Some(batch) = self.next(&mut stream).await? {
            self.check_cluster(batch.cluster_id, batch.from)?;
            if !batch.groups.is_empty() && batch.groups.len() != batch.messages.len() {
                return Err(Status::invalid_argument(format!(
                    "a raft batch of {} messages names {} groups",
                    batch.messages.len(),
                    batch.groups.len()
                )));
            }
            let groups = batch
                .groups
                .into_iter()
                .chain(std::iter::repeat(CLUSTER_GROUP));
            for (bytes, group) in batch.messages.into_iter().zip(groups) {
                let message = Message::parse_from_bytes(&bytes).map_err(|e| {
                    Status::invalid_argument(format!("malformed raft message: {e}"))
                })?;
                if message.to != self.shared.self_id {
                    // A peer URL that points at the wrong member: stepping
                    // the message here would confuse raft.
                    tracing::warn!(
                        from = message.from,
                        to = message.to,
                        "raft message for another member dropped"
                    );
                    continue;
                }
                // Raft resends what matters once the group runs here.
                if let Err(status) = self.deliver(group, PeerEvent::Message(message)) {
                    tracing::debug!(group, reason = status.message(), "raft message dropped");
                }
            }
        }
        Ok(Response::new(SendAck {}))
    }

    async fn send_snapshot(
        &self,
        request: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<SnapshotAck>, Status> {
        let mut stream = request.into_inner();
        let first = self
            .next(&mut stream)
            .await?
            .ok_or_else(|| Status::invalid_argument("empty snapshot stream"))?;
        self.check_cluster(first.cluster_id, first.from)?;
        let message = Message::parse_from_bytes(&first.message)
            .map_err(|e| Status::invalid_argument(format!("malformed raft message: {e}")))?;
        if message.msg_type != MessageType::MsgSnapshot {
            return Err(Status::invalid_argument(format!(
                "a snapshot stream must start with MsgSnapshot, not {:?}",
                message.msg_type
            )));
        }
        if message.to != self.shared.self_id {
            return Err(Status::invalid_argument(format!(
                "snapshot for member {:x} sent to member {:x}",
                message.to, self.shared.self_id
            )));
        }
        let group = first.group;
        let snap_dir = self
            .shared
            .route(group, |route| route.snap_dir.clone())
            .ok_or_else(|| {
                Status::unavailable(format!("raft group {group} is not running here"))
            })?;
        let members = first.members.to_vec();
        let index = message.get_snapshot().get_metadata().index;
        let mut file = IncomingFile::create(&snap_dir, &message)
            .await
            .map_err(|e| internal("creating the snapshot file", &e))?;
        let mut size = 0u64;
        let mut crc = crc32fast::Hasher::new();
        let mut chunk = first;
        loop {
            if !chunk.data.is_empty() {
                file.write(&chunk.data)
                    .await
                    .map_err(|e| internal("writing the snapshot file", &e))?;
                size += chunk.data.len() as u64;
                crc.update(&chunk.data);
            }
            if chunk.last {
                if chunk.size != size {
                    return Err(Status::data_loss(format!(
                        "snapshot has {size} bytes, the sender sent {}",
                        chunk.size
                    )));
                }
                let crc = crc.finalize();
                if let Some(sent) = chunk.crc32
                    && sent != crc
                {
                    tracing::warn!(
                        group,
                        from = message.from,
                        index,
                        "a received snapshot fails its checksum: refused"
                    );
                    return Err(Status::data_loss(format!(
                        "snapshot data has CRC-32 {crc:08x}, the sender sent {sent:08x}"
                    )));
                }
                break;
            }
            // Dropping `file` on any error deletes what was written.
            chunk = self
                .next(&mut stream)
                .await?
                .ok_or_else(|| Status::aborted("snapshot stream ended before its last chunk"))?;
        }
        let path = file
            .finish()
            .await
            .map_err(|e| internal("saving the snapshot file", &e))?;
        tracing::info!(group, from = message.from, index, size, file = %path.display(), "snapshot received from raft peer");
        let event = PeerEvent::SnapshotReceived {
            message,
            file: path.clone(),
            members,
        };
        if let Err(e) = self.deliver(group, event) {
            // Nobody will consume (and delete) it.
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        Ok(Response::new(SnapshotAck { size }))
    }
}

fn internal(what: &str, e: &std::io::Error) -> Status {
    tracing::error!(error = %e, "{what} failed");
    Status::internal(format!("{what}: {e}"))
}

/// A snapshot file being received: removed on drop unless `finish`ed.
struct IncomingFile {
    file: Option<tokio::fs::File>,
    partial: PathBuf,
    done: PathBuf,
    finished: bool,
}

impl IncomingFile {
    async fn create(dir: &Path, message: &Message) -> std::io::Result<IncomingFile> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let made = dir.to_owned();
        tokio::task::spawn_blocking(move || crate::create_dir_durably(&made))
            .await
            .map_err(std::io::Error::other)??;
        let meta = message.get_snapshot().get_metadata();
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        // Unique within the process (sequence) and across restarts (time).
        let stem = format!(
            "{:016x}-{:016x}-{nanos:x}-{}",
            meta.term,
            meta.index,
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let partial = dir.join(format!("{stem}{PARTIAL_SUFFIX}"));
        let done = dir.join(format!("{stem}{SNAPSHOT_SUFFIX}"));
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&partial)
            .await?;
        Ok(IncomingFile {
            file: Some(file),
            partial,
            done,
            finished: false,
        })
    }

    async fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        match &mut self.file {
            Some(file) => file.write_all(data).await,
            None => Err(std::io::Error::other("snapshot file already closed")),
        }
    }

    /// Syncs the data, gives the file its final name and returns it.
    async fn finish(&mut self) -> std::io::Result<PathBuf> {
        let Some(mut file) = self.file.take() else {
            return Err(std::io::Error::other("snapshot file already closed"));
        };
        file.flush().await?;
        file.sync_all().await?;
        drop(file);
        tokio::fs::rename(&self.partial, &self.done).await?;
        self.finished = true;
        // The rename is durable only once the directory is synced.
        if let Some(dir) = self.done.parent() {
            let dir = dir.to_owned();
            let synced =
                tokio::task::spawn_blocking(move || std::fs::File::open(dir)?.sync_all()).await;
            if let Ok(Err(e)) = synced {
                tracing::debug!(error = %e, "syncing the snapshot directory failed");
            }
        }
        Ok(self.done.clone())
    }
}

impl Drop for IncomingFile {
    fn drop(&mut self) {
        if !self.finished {
            // Close the handle before removing, then remove synchronously:
            // a small file delete, and no runtime may be left to spawn on.
            self.file.take();
            if let Err(e) = std::fs::remove_file(&self.partial)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(file = %self.partial.display(), error = %e, "removing a partial snapshot failed");
            }
        }
    }
}

/// The whole snapshot of `index` received in `dir`, if one is there.
pub(crate) fn received_snapshot(dir: &Path, index: u64) -> Option<PathBuf> {
    let index = format!("-{index:016x}-");
    std::fs::read_dir(dir).ok()?.flatten().find_map(|entry| {
        let name = entry.file_name();
        let name = name.to_str()?;
        // {term:016x}-{index:016x}-...: the index at byte 16.
        (name.ends_with(SNAPSHOT_SUFFIX) && name.get(16..34) == Some(index.as_str()))
            .then(|| entry.path())
    })
}

/// Removes snapshots a crash cut short while they were being received.
pub(super) fn remove_partial_snapshots(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(PARTIAL_SUFFIX))
        {
            tracing::info!(file = %path.display(), "removing a partially received snapshot");
            let _ = std::fs::remove_file(&path);
        }
    }
}
