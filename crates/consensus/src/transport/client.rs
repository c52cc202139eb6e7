//! The sending side: one task per peer keeping a `Send` stream open, and one
//! task per outgoing snapshot.

use std::io::{self, Write};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use protobuf::Message as _;
use raft::prelude::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use super::pb::peer_client::PeerClient;
use super::pb::{RaftBatch, SnapshotChunk};
use super::{
    Addressed, BACKOFF_MAX, BACKOFF_MIN, MAX_BATCH_BYTES, PeerEvent, PeerState, SNAPSHOT_CHUNK,
    Shared, TransportError, conn,
};
use crate::raft_transport::{CLUSTER_GROUP, GroupId};

/// Batches handed to the gRPC stream but not yet written. Small: the real
/// buffer is the peer queue, whose bound is what drops messages.
const STREAM_BUFFER: usize = 2;
/// Snapshot chunks between the blocking writer and the stream.
const SNAPSHOT_BUFFER: usize = 4;
/// A stream that has stayed up this long counts as a working connection.
const ACTIVE_AFTER: Duration = Duration::from_secs(1);

/// Connects to the first of `urls` that answers, starting with the one
/// that worked last (`next`), and leaves `next` pointing at it.
async fn connect_any(
    shared: &Shared,
    to: u64,
    urls: &[String],
    next: &mut usize,
) -> Result<Channel, TransportError> {
    let mut last_error = TransportError::Url {
        url: String::new(),
        reason: format!("raft peer {to:x} has no peer URLs"),
    };
    for attempt in 0..urls.len() {
        let index = (*next + attempt) % urls.len();
        let url = &urls[index];
        match conn::connect(&shared.client_tls, url).await {
            Ok(channel) => {
                *next = index;
                return Ok(channel);
            }
            Err(e) => {
                tracing::debug!(peer = to, url, error = %e, "dialing raft peer failed");
                last_error = e;
            }
        }
    }
    Err(last_error)
}

/// Keeps a `Send` stream open to peer `to` and feeds it from `queue`, until
/// the queue's sender is gone (the peer was removed, or the transport
/// dropped). Reconnects with exponential backoff; each failure is reported
/// once as Unreachable, and whatever was queued then is dropped: raft resends.
pub(super) async fn run_peer(
    shared: Arc<Shared>,
    to: u64,
    urls: Vec<String>,
    mut queue: mpsc::Receiver<Addressed>,
    state: Arc<PeerState>,
) {
    let mut backoff = BACKOFF_MIN;
    let mut next_url = 0;
    // Warn when the peer goes down (or is down from the start), then stay
    // quiet while it stays down for the same reason (a peer refused at
    // first and then refusing this member's certificate says so: operators
    // and etcd's tests look for the TLS error); `active` is set once a
    // stream has lived long enough to count as working.
    let mut warned: Option<String> = None;
    let mut active = false;
    loop {
        let result = match connect_any(&shared, to, &urls, &mut next_url).await {
            Ok(channel) => {
                let url = &urls[next_url];
                stream_to(&shared, to, url, channel, &mut queue, &state, &mut active).await
            }
            Err(e) => Err(e),
        };
        let error = match result {
            Ok(()) | Err(TransportError::Stopped) => return,
            Err(e) => e,
        };
        let text = e_display(&error);
        if active || warned.as_ref() != Some(&text) {
            tracing::warn!(peer = to, error = %text, "raft peer unreachable");
            warned = Some(text);
        } else {
            tracing::debug!(peer = to, error = %text, "raft peer still unreachable");
        }
        let was_active = std::mem::take(&mut active);
        state.report_unreachable(&shared, to);
        // What was queued for the failed stream is stale by the time a new
        // one is up; raft resends what still matters.
        loop {
            match queue.try_recv() {
                Ok(_) => {}
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => return,
            }
        }
        state.full_reported.store(false, Ordering::Release);
        // A stream that lived a while was a real connection: start over from
        // the shortest wait. One refused at once (say, another cluster's
        // member) keeps backing off.
        if was_active {
            backoff = BACKOFF_MIN;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// An error with its chain of causes: tonic's own messages ("transport
/// error") say little without them.
fn e_display(e: &TransportError) -> String {
    let mut text = match e {
        TransportError::Refused(status) => {
            format!("{:?}: {}", status.code(), status.message())
        }
        other => other.to_string(),
    };
    // Our own variants already print their direct cause.
    let mut source = match e {
        TransportError::Refused(status) => std::error::Error::source(&**status),
        other => std::error::Error::source(other).and_then(|cause| cause.source()),
    };
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    // Go's words for a peer refusing our certificate, which etcd's tools
    // and tests look for.
    if text.contains("received fatal alert: BadCertificate") {
        text.push_str(" (remote error: tls: bad certificate)");
    }
    text
}

/// Why a stream's call ended: it only ends on failure, or when the receiver
/// shuts down, which is a failure from here too.
fn call_ended<T>(result: Result<tonic::Response<T>, tonic::Status>) -> TransportError {
    match result {
        Ok(_) => TransportError::Refused(Box::new(tonic::Status::unavailable(
            "the peer closed the stream",
        ))),
        Err(status) => status.into(),
    }
}

/// Streams queued messages to the peer over one `Send` call until it fails
/// (Err) or the queue closes (Err(Stopped)). Sets `active` once the stream
/// has stayed up for ACTIVE_AFTER.
async fn stream_to(
    shared: &Shared,
    to: u64,
    url: &str,
    channel: Channel,
    queue: &mut mpsc::Receiver<Addressed>,
    state: &PeerState,
    active: &mut bool,
) -> Result<(), TransportError> {
    let mut client = PeerClient::new(channel);
    let (batches, rx) = mpsc::channel(STREAM_BUFFER);
    let call = client.send(ReceiverStream::new(rx));
    tokio::pin!(call);
    tracing::debug!(peer = to, url, "raft message stream open");
    // A peer that refuses the stream does so at once; one that is still
    // streaming after this long is working.
    let settled = tokio::time::sleep(ACTIVE_AFTER);
    tokio::pin!(settled);
    loop {
        let first = tokio::select! {
            () = &mut settled, if !*active => {
                *active = true;
                tracing::info!(peer = to, url, "raft peer active");
                continue;
            }
            result = &mut call => return Err(call_ended(result)),
            message = queue.recv() => match message {
                Some(message) => message,
                None => return Err(TransportError::Stopped),
            },
        };
        // The queue has room again: a new overflow is worth a new report.
        state.full_reported.store(false, Ordering::Release);
        let batch = batch(shared, first, queue);
        if batch.messages.is_empty() {
            continue;
        }
        tokio::select! {
            result = &mut call => return Err(call_ended(result)),
            sent = batches.send(batch) => {
                if sent.is_err() {
                    return Err(TransportError::Refused(Box::new(tonic::Status::unavailable(
                        "the stream to the peer closed",
                    ))));
                }
            }
        }
    }
}

/// `first` and whatever else is queued already, up to MAX_BATCH_BYTES.
fn batch(shared: &Shared, first: Addressed, queue: &mut mpsc::Receiver<Addressed>) -> RaftBatch {
    let mut messages = Vec::new();
    let mut groups = Vec::new();
    let mut size = 0;
    let mut next = Some(first);
    while let Some((group, message)) = next {
        match message.write_to_bytes() {
            Ok(bytes) => {
                size += bytes.len();
                messages.push(Bytes::from(bytes));
                groups.push(group);
            }
            Err(e) => {
                tracing::error!(to = message.to, error = %e, "encoding a raft message failed; dropped");
            }
        }
        next = if size < MAX_BATCH_BYTES {
            queue.try_recv().ok()
        } else {
            None
        };
    }
    // The wire leaves the groups out when every message is the cluster
    // group's, as a member with one group sends.
    if groups.iter().all(|&g| g == CLUSTER_GROUP) {
        groups.clear();
    }
    RaftBatch {
        cluster_id: shared.cluster_id,
        from: shared.self_id,
        messages,
        groups,
    }
}

/// Clears the in-flight mark and reports the outcome when the snapshot task
/// ends however it ends (even by panic), so raft always hears back.
struct SnapshotOutcome {
    shared: Arc<Shared>,
    group: GroupId,
    state: Arc<PeerState>,
    to: u64,
    ok: bool,
}

impl Drop for SnapshotOutcome {
    fn drop(&mut self) {
        self.state.snapshots_in_flight.lock().remove(&self.group);
        self.shared.report(
            self.group,
            PeerEvent::SnapshotSent {
                to: self.to,
                ok: self.ok,
            },
        );
    }
}

/// Streams the snapshot of `message` (a MsgSnapshot) to its recipient.
pub(super) async fn send_snapshot(
    shared: Arc<Shared>,
    group: GroupId,
    urls: Vec<String>,
    state: Arc<PeerState>,
    message: Message,
) {
    let to = message.to;
    let index = message.get_snapshot().get_metadata().index;
    let mut outcome = SnapshotOutcome {
        shared: shared.clone(),
        group,
        state,
        to,
        ok: false,
    };
    let started = Instant::now();
    match stream_snapshot(&shared, group, &urls, message).await {
        Ok((size, applied)) => {
            tracing::info!(
                group,
                peer = to,
                index,
                applied,
                size,
                took = ?started.elapsed(),
                "snapshot sent to raft peer"
            );
            outcome.ok = true;
        }
        Err(e) => {
            tracing::warn!(group, peer = to, index, error = %e_display(&e), "sending snapshot to raft peer failed");
        }
    }
}

/// Returns the data bytes sent and the applied index the source reported.
async fn stream_snapshot(
    shared: &Arc<Shared>,
    group: GroupId,
    urls: &[String],
    message: Message,
) -> Result<(u64, u64), TransportError> {
    let to = message.to;
    let (source, members) = shared
        .route(group, |route| {
            (route.snapshot_source.clone(), (route.members_blob)())
        })
        .ok_or(TransportError::Stopped)?;
    let mut next_url = 0;
    let channel = connect_any(shared, to, urls, &mut next_url).await?;
    let mut client = PeerClient::new(channel);
    let (chunks, rx) = mpsc::channel(SNAPSHOT_BUFFER);
    let first = SnapshotChunk {
        cluster_id: shared.cluster_id,
        from: shared.self_id,
        message: Bytes::from(message.write_to_bytes()?),
        members: Bytes::from(members),
        group,
        ..Default::default()
    };
    chunks
        .send(first)
        .await
        .map_err(|_| TransportError::Snapshot("snapshot stream closed".to_owned()))?;
    // The source writes synchronously; its output goes through the bounded
    // channel, so at most a few chunks are in memory at once.
    let producer = tokio::task::spawn_blocking(move || {
        let mut writer = ChunkWriter {
            chunks,
            buffer: Vec::with_capacity(SNAPSHOT_CHUNK),
            sent: 0,
            crc: crc32fast::Hasher::new(),
            closed: false,
        };
        let result = source.write_snapshot(&mut writer);
        let applied = result.map_err(|e| {
            let error = TransportError::Snapshot(format!("writing the snapshot: {e}"));
            (error, writer.closed)
        })?;
        writer.send_buffer().map_err(|e| (e, true))?;
        // Without this last chunk the receiver discards what it got: a
        // source that failed halfway just drops `chunks`, ending the stream.
        let last = SnapshotChunk {
            last: true,
            size: writer.sent,
            applied_index: applied,
            crc32: Some(writer.crc.clone().finalize()),
            ..Default::default()
        };
        writer
            .chunks
            .blocking_send(last)
            .map_err(|_| (closed(), true))?;
        Ok((writer.sent, applied))
    });
    let (response, produced) =
        tokio::join!(client.send_snapshot(ReceiverStream::new(rx)), producer);
    let (sent, applied) = match produced {
        Ok(Ok(produced)) => produced,
        // The stream broke under the writer: the peer's answer says why.
        Ok(Err((e, stream_closed))) => {
            return Err(match response {
                Err(status) if stream_closed => status.into(),
                _ => e,
            });
        }
        Err(e) => {
            return Err(TransportError::Snapshot(format!(
                "the snapshot writer panicked: {e}"
            )));
        }
    };
    let ack = response?.into_inner();
    if ack.size != sent {
        return Err(TransportError::Snapshot(format!(
            "the peer stored {} bytes of {sent}",
            ack.size
        )));
    }
    Ok((sent, applied))
}

fn closed() -> TransportError {
    TransportError::Snapshot("the snapshot stream to the peer closed".to_owned())
}

/// A `Write` that cuts what it is given into SNAPSHOT_CHUNK-sized chunks
/// and sends them down the stream, blocking while the stream is behind.
struct ChunkWriter {
    chunks: mpsc::Sender<SnapshotChunk>,
    buffer: Vec<u8>,
    sent: u64,
    /// Of every data byte sent, for the last chunk.
    crc: crc32fast::Hasher,
    /// The stream is gone: whatever the source reports, that is why it failed.
    closed: bool,
}

impl ChunkWriter {
    fn send_buffer(&mut self) -> Result<(), TransportError> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let data = std::mem::replace(&mut self.buffer, Vec::with_capacity(SNAPSHOT_CHUNK));
        self.sent += data.len() as u64;
        self.crc.update(&data);
        let sent = self.chunks.blocking_send(SnapshotChunk {
            data: Bytes::from(data),
            ..Default::default()
        });
        if sent.is_err() {
            self.closed = true;
            return Err(closed());
        }
        Ok(())
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = SNAPSHOT_CHUNK - self.buffer.len();
        let n = data.len().min(room);
        self.buffer.extend_from_slice(&data[..n]);
        if self.buffer.len() >= SNAPSHOT_CHUNK {
            // A broken stream must stop the source, so it sees an error here.
            self.send_buffer()
                .map_err(|e| io::Error::new(io::ErrorKind::BrokenPipe, e.to_string()))?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        // Chunks go out when full; a flush need not cut a small one.
        Ok(())
    }
}
