//! Maintenance.Snapshot: a consistent view of the store now (with --shards,
//! of every shard at one read point), streamed as etcd streams its database
//! (`cairn-etcd-compat` writes it in etcd's format).

use std::sync::Arc;

use cairn_api::etcdserverpb::SnapshotResponse;
use cairn_etcd_compat::{EtcdSnapshot, History};
use tokio::sync::mpsc;
use tonic::Status;

use crate::member::Member;
use crate::shard_maintenance::{HeldViews, KeyspaceDump};
use crate::shards::Shards;

pub type SnapshotStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<SnapshotResponse, Status>> + Send + 'static>,
>;

/// Maintenance.Snapshot: a consistent view of the store now, streamed as
/// etcd streams its database. With --shards, the keys of every shard at one
/// read point, those held elsewhere read with the caller's `token`.
pub fn snapshot_stream(member: Arc<Member>, token: Option<String>) -> SnapshotStream {
    let (tx, rx) = mpsc::channel(4);
    let runtime = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let sent = match member.shards() {
            Some(shards) => send_keyspace_snapshot(&member, shards, token, runtime, &tx),
            None => send_snapshot(&member, &tx),
        };
        if let Err(e) = sent {
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
    let snapshot = EtcdSnapshot::write(&export, &etcd_members(member), &member.data_dir)?;
    // The snapshot is in its own file: the store's view can go.
    drop(export);
    stream(snapshot, header, tx)
}

/// With --shards: every shard's stored revisions through one read point,
/// merged in revision order, with the cluster group's leases, auth store
/// and alarms, as one store's snapshot.
fn send_keyspace_snapshot(
    member: &Member,
    shards: &Shards,
    token: Option<String>,
    runtime: tokio::runtime::Handle,
    tx: &mpsc::Sender<Result<SnapshotResponse, Status>>,
) -> Result<(), cairn_etcd_compat::Error> {
    let point = shards.read_point();
    let compact_revision = shards.compact_revision().max(0);
    let held = HeldViews::take(member, shards, &point, &runtime)?;
    let cluster = member.store.export()?;
    let history = History {
        revisions: KeyspaceDump::new(member, shards, &held, &point, token, runtime),
        compact_revision,
        current_revision: point.revision,
    };
    let snapshot =
        EtcdSnapshot::write_history(&cluster, history, &etcd_members(member), &member.data_dir)?;
    drop((cluster, held));
    stream(snapshot, member.header(point.revision), tx)
}

/// The cluster's members, for etcd's `members` bucket.
fn etcd_members(member: &Member) -> Vec<cairn_etcd_compat::Member> {
    member
        .node
        .members()
        .into_iter()
        .map(crate::migrate::etcd_member)
        .collect()
}

/// Sends `snapshot` as etcd streams its database.
fn stream(
    snapshot: EtcdSnapshot,
    header: Option<cairn_api::etcdserverpb::ResponseHeader>,
    tx: &mpsc::Sender<Result<SnapshotResponse, Status>>,
) -> Result<(), cairn_etcd_compat::Error> {
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
