//! Maintenance.Snapshot: a consistent view of the store now, streamed as
//! etcd streams its database (`cairn-etcd-compat` writes it in etcd's
//! format).

use std::sync::Arc;

use cairn_api::etcdserverpb::SnapshotResponse;
use cairn_etcd_compat::EtcdSnapshot;
use tokio::sync::mpsc;
use tonic::Status;

use crate::member::Member;

pub type SnapshotStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<SnapshotResponse, Status>> + Send + 'static>,
>;

/// Maintenance.Snapshot: a consistent view of the store now, streamed as
/// etcd streams its database.
pub fn snapshot_stream(member: Arc<Member>) -> SnapshotStream {
    let (tx, rx) = mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        if let Err(e) = send_snapshot(&member, &tx) {
            tracing::warn!("snapshot failed: {e}");
            let _ = tx.blocking_send(Err(Status::internal(e.to_string())));
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

fn send_snapshot(
    member: &Member,
    tx: &mpsc::Sender<Result<SnapshotResponse, Status>>,
) -> Result<(), cairn_etcd_compat::Error> {
    let export = member.store.export()?;
    let header = member.header(export.current_revision());
    let members: Vec<cairn_etcd_compat::Member> = member
        .node
        .members()
        .into_iter()
        .map(crate::migrate::etcd_member)
        .collect();
    let snapshot = EtcdSnapshot::write(&export, &members, &member.data_dir)?;
    // The snapshot is in its own file: the store's view can go.
    drop(export);
    let size = snapshot.size();
    for response in snapshot.responses(header) {
        if tx.blocking_send(Ok(response?)).is_err() {
            // The client went away.
            return Ok(());
        }
    }
    tracing::info!(bytes = size, "sent a snapshot");
    Ok(())
}
