//! etcd's v3lock service, and the recipe it shares with v3election: etcd's
//! clientv3/concurrency mutex run against this member. A holder's key is
//! `<name>/<lease in hex>`, put with its lease; it holds the lock once no key
//! under `<name>/` has a smaller create revision. Every write goes through
//! consensus; waiting uses the watch hub.

use std::sync::Arc;

use bytes::Bytes;
use cairn_api::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use cairn_api::etcdserverpb::range_request::{SortOrder, SortTarget};
use cairn_api::etcdserverpb::request_op::Request as Op;
use cairn_api::etcdserverpb::response_op::Response as OpResponse;
use cairn_api::etcdserverpb::{
    Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest, TxnResponse,
};
use cairn_api::mvccpb::KeyValue;
use cairn_api::mvccpb::event::EventType;
use cairn_api::v3lockpb::lock_server::Lock;
use cairn_api::v3lockpb::{LockRequest, LockResponse, UnlockRequest, UnlockResponse};
use cairn_auth::Access;
use cairn_watch_hub::{Delivery, WatchSpec, WatchStream};
use tonic::{Request, Response, Status};

use crate::auth::RequestAuth as _;
use crate::member::Member;
use crate::stopping::StopSignal;

pub struct LockService {
    member: Arc<Member>,
}

impl LockService {
    pub fn new(member: Arc<Member>) -> Self {
        LockService { member }
    }
}

#[tonic::async_trait]
impl Lock for LockService {
    async fn lock(&self, request: Request<LockRequest>) -> Result<Response<LockResponse>, Status> {
        let prefix = holder_prefix(&request.get_ref().name);
        check_recipe(&self.member, &request, &prefix, Access::Write).await?;
        let request = request.into_inner();
        let held = acquire(&self.member, &prefix, request.lease, Bytes::new()).await?;
        // As etcd's mutex: a waiter that gives up (client gone, or the wait
        // failed) takes its key back out of the queue.
        let guard = Withdraw::new(self.member.clone(), held.key.clone(), held.create_revision);
        wait_deletes(&self.member, &prefix, held.create_revision - 1).await?;
        guard.keep();
        Ok(Response::new(LockResponse {
            header: self.member.current_header(),
            key: held.key,
        }))
    }

    async fn unlock(
        &self,
        request: Request<UnlockRequest>,
    ) -> Result<Response<UnlockResponse>, Status> {
        let caller = self.member.auth().caller_of(&request).await?;
        let request = request.into_inner();
        let delete = DeleteRangeRequest {
            key: request.key,
            ..Default::default()
        };
        let response = self.member.propose_for(&caller, delete).await?;
        Ok(Response::new(UnlockResponse {
            header: response.header,
        }))
    }
}

/// With auth on, the recipes read the keys under `prefix` as the caller
/// and, for `Access::Write`, write them too (etcd runs them through a client
/// carrying the caller's credentials).
pub(crate) async fn check_recipe<T>(
    member: &Member,
    request: &Request<T>,
    prefix: &[u8],
    access: Access,
) -> Result<(), Status> {
    let auth = member.auth();
    let caller = auth.caller_of(request).await?;
    let end = prefix_end(prefix);
    auth.check(&caller, Access::Read, prefix, &end)?;
    if access == Access::Write {
        auth.check(&caller, Access::Write, prefix, &end)?;
    }
    Ok(())
}

/// `<name>/`, under which the recipes keep one key per contender.
pub(crate) fn holder_prefix(name: &[u8]) -> Bytes {
    let mut prefix = name.to_vec();
    prefix.push(b'/');
    Bytes::from(prefix)
}

/// The range end that covers every key starting with `prefix`.
pub(crate) fn prefix_end(prefix: &[u8]) -> Bytes {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Bytes::from(end);
        }
    }
    // Only 0xff bytes: etcd's "every key from here".
    Bytes::from_static(&[0])
}

/// The first (`Ascend`) or last (`Descend`) contender under `prefix` by
/// create revision, among those at most `max_create_revision` (0: any), and
/// the read's revision.
pub(crate) async fn first_or_last(
    member: &Member,
    prefix: &[u8],
    max_create_revision: i64,
    order: SortOrder,
) -> Result<(Option<KeyValue>, i64), Status> {
    let request = RangeRequest {
        key: Bytes::copy_from_slice(prefix),
        range_end: prefix_end(prefix),
        limit: 1,
        sort_order: order as i32,
        sort_target: SortTarget::Create as i32,
        max_create_revision,
        ..Default::default()
    };
    // Linearizable, as the recipes' Gets are.
    let response = member.range(&request).await?;
    let revision = response.header.as_ref().map_or(0, |h| h.revision);
    Ok((response.kvs.into_iter().next(), revision))
}

/// A contender's key once it is in the queue.
pub(crate) struct Held {
    pub key: Bytes,
    pub create_revision: i64,
    /// The value the key already had when it was there before this call.
    pub previous_value: Option<Bytes>,
}

/// Puts `<prefix><lease hex>` with `value` and the lease unless it exists
/// (a client retrying keeps its place), as etcd's recipes do.
pub(crate) async fn acquire(
    member: &Member,
    prefix: &[u8],
    lease: i64,
    value: Bytes,
) -> Result<Held, Status> {
    let mut key = prefix.to_vec();
    key.extend_from_slice(format!("{lease:x}").as_bytes());
    let key = Bytes::from(key);
    let txn = TxnRequest {
        compare: vec![create_revision_is(&key, 0)],
        success: vec![RequestOp {
            request: Some(Op::RequestPut(PutRequest {
                key: key.clone(),
                value,
                lease,
                ..Default::default()
            })),
        }],
        failure: vec![RequestOp {
            request: Some(Op::RequestRange(RangeRequest {
                key: key.clone(),
                ..Default::default()
            })),
        }],
    };
    let response = member.propose(txn).await?;
    if response.succeeded {
        let create_revision = response.header.as_ref().map_or(0, |h| h.revision);
        return Ok(Held {
            key,
            create_revision,
            previous_value: None,
        });
    }
    let existing = response
        .responses
        .into_iter()
        .find_map(|r| match r.response {
            Some(OpResponse::ResponseRange(range)) => range.kvs.into_iter().next(),
            _ => None,
        })
        // The compare failed, so the key existed at the txn's revision.
        .ok_or_else(|| Status::internal("contender key vanished inside its own txn"))?;
    Ok(Held {
        key,
        create_revision: existing.create_revision,
        previous_value: Some(existing.value),
    })
}

pub(crate) fn create_revision_is(key: &Bytes, revision: i64) -> Compare {
    Compare {
        result: CompareResult::Equal as i32,
        target: CompareTarget::Create as i32,
        key: key.clone(),
        target_union: Some(TargetUnion::CreateRevision(revision)),
        ..Default::default()
    }
}

/// Deletes `key` if it still has `create_revision`: it is still the one
/// this contender put, not a later holder's.
pub(crate) async fn delete_if_ours(
    member: &Member,
    key: &Bytes,
    create_revision: i64,
) -> Result<TxnResponse, Status> {
    let txn = TxnRequest {
        compare: vec![create_revision_is(key, create_revision)],
        success: vec![RequestOp {
            request: Some(Op::RequestDeleteRange(DeleteRangeRequest {
                key: key.clone(),
                ..Default::default()
            })),
        }],
        failure: Vec::new(),
    };
    member.propose(txn).await
}

/// Withdraws a contender's key when dropped before [`Withdraw::keep`]: the
/// request failed or its client went away while waiting.
pub(crate) struct Withdraw {
    pending: Option<(Arc<Member>, Bytes, i64)>,
}

impl Withdraw {
    pub(crate) fn new(member: Arc<Member>, key: Bytes, create_revision: i64) -> Self {
        Withdraw {
            pending: Some((member, key, create_revision)),
        }
    }

    pub(crate) fn keep(mut self) {
        self.pending = None;
    }
}

impl Drop for Withdraw {
    fn drop(&mut self) {
        let Some((member, key, create_revision)) = self.pending.take() else {
            return;
        };
        // Drop cannot wait on consensus; the delete runs on its own. Outside
        // a runtime (shutting down) the lease expiring removes the key.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) = delete_if_ours(&member, &key, create_revision).await {
                    tracing::warn!("withdrawing contender key: {e}");
                }
            });
        }
    }
}

/// Waits until no key under `prefix` has a create revision at most
/// `max_create_revision`, watching the newest such key's deletion each time,
/// as etcd's waitDeletes does.
pub(crate) async fn wait_deletes(
    member: &Member,
    prefix: &[u8],
    max_create_revision: i64,
) -> Result<(), Status> {
    // A max create revision of 0 would mean "no limit".
    if max_create_revision < 1 {
        return Ok(());
    }
    loop {
        let (last, revision) =
            first_or_last(member, prefix, max_create_revision, SortOrder::Descend).await?;
        let Some(last) = last else { return Ok(()) };
        let mut watch = KeyWatch::new(member, last.key, Bytes::new(), revision)?;
        loop {
            let (_, events) = watch.next().await?;
            if events.iter().any(|e| e.r#type == EventType::Delete as i32) {
                break;
            }
        }
    }
}

/// One watcher on the hub, for the recipes' waits; it ends with "server
/// stopped" when the member stops serving.
pub(crate) struct KeyWatch {
    stream: WatchStream<crate::shard_events::KeyspaceEvents>,
    stop: StopSignal,
}

impl KeyWatch {
    /// Watches `key` (with etcd's `range_end`) from `start_revision` on.
    pub(crate) fn new(
        member: &Member,
        key: Bytes,
        range_end: Bytes,
        start_revision: i64,
    ) -> Result<Self, Status> {
        let mut stream = member.watch_stream();
        stream
            .create(WatchSpec {
                key,
                range_end,
                start_revision,
                ..Default::default()
            })
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(KeyWatch {
            stream,
            stop: member.stop_signal(),
        })
    }

    /// The next revision's events, with that revision.
    pub(crate) async fn next(&mut self) -> Result<(i64, Vec<cairn_api::mvccpb::Event>), Status> {
        let delivery = tokio::select! {
            delivery = self.stream.next() => delivery,
            () = self.stop.stopped() => return Err(cairn_api::error::STOPPED.status()),
        };
        match delivery {
            Delivery::Events {
                revision, events, ..
            } => Ok((revision, events)),
            Delivery::Compacted { .. } => Err(cairn_api::error::COMPACTED.status()),
            Delivery::Failed { reason, .. } => Err(Status::internal(reason)),
        }
    }
}
