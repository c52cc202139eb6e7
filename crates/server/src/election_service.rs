//! etcd's v3election service: etcd's clientv3/concurrency election run
//! against this member. Candidates queue as the lock recipe's contenders do
//! (see `lock_service`); the leader is the key under `<name>/` with the
//! smallest create revision, and its value is what it proclaimed.

use std::sync::Arc;

use bytes::Bytes;
use cairn_api::etcdserverpb::range_request::SortOrder;
use cairn_api::etcdserverpb::request_op::Request as Op;
use cairn_api::etcdserverpb::{PutRequest, RequestOp, TxnRequest};
use cairn_api::mvccpb::KeyValue;
use cairn_api::mvccpb::event::EventType;
use cairn_api::v3electionpb::election_server::Election;
use cairn_api::v3electionpb::{
    CampaignRequest, CampaignResponse, LeaderKey, LeaderRequest, LeaderResponse, ProclaimRequest,
    ProclaimResponse, ResignRequest, ResignResponse,
};
use cairn_auth::Access;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::lock_service::{
    KeyWatch, Withdraw, acquire, check_recipe, create_revision_is, delete_if_ours, first_or_last,
    holder_prefix, prefix_end, wait_deletes,
};
use crate::member::Member;
use crate::stopping::ResponseStream;

/// etcd 3.4's errors (concurrency.ErrElectionNotLeader and friends, and
/// v3election.ErrMissingLeaderKey); plain Go errors, so gRPC code Unknown.
fn not_leader() -> Status {
    Status::unknown("election: not leader")
}

fn no_leader() -> Status {
    Status::unknown("election: no leader")
}

fn missing_leader_key() -> Status {
    Status::unknown("\"leader\" field must be provided")
}

pub struct ElectionService {
    member: Arc<Member>,
}

impl ElectionService {
    pub fn new(member: Arc<Member>) -> Self {
        ElectionService { member }
    }
}

/// Observe's queue of answers; the client reads them at its own pace.
const OBSERVE_QUEUE: usize = 16;

#[tonic::async_trait]
impl Election for ElectionService {
    async fn campaign(
        &self,
        request: Request<CampaignRequest>,
    ) -> Result<Response<CampaignResponse>, Status> {
        let prefix = holder_prefix(&request.get_ref().name);
        check_recipe(&self.member, &request, &prefix, Access::Write).await?;
        let request = request.into_inner();
        let held = acquire(&self.member, &prefix, request.lease, request.value.clone()).await?;
        // As etcd's Campaign: a candidate that gives up resigns.
        let guard = Withdraw::new(self.member.clone(), held.key.clone(), held.create_revision);
        if held
            .previous_value
            .as_ref()
            .is_some_and(|v| *v != request.value)
        {
            proclaim(
                &self.member,
                &held.key,
                held.create_revision,
                request.lease,
                request.value,
            )
            .await?;
        }
        wait_deletes(&self.member, &prefix, held.create_revision - 1).await?;
        guard.keep();
        Ok(Response::new(CampaignResponse {
            header: self.member.current_header(),
            leader: Some(LeaderKey {
                name: request.name,
                key: held.key,
                rev: held.create_revision,
                lease: request.lease,
            }),
        }))
    }

    async fn proclaim(
        &self,
        request: Request<ProclaimRequest>,
    ) -> Result<Response<ProclaimResponse>, Status> {
        let name = request.get_ref().leader.as_ref().map(|l| l.name.clone());
        let prefix = holder_prefix(&name.ok_or_else(missing_leader_key)?);
        check_recipe(&self.member, &request, &prefix, Access::Write).await?;
        let request = request.into_inner();
        let leader = request.leader.ok_or_else(missing_leader_key)?;
        let header = proclaim(
            &self.member,
            &leader.key,
            leader.rev,
            leader.lease,
            request.value,
        )
        .await?;
        Ok(Response::new(ProclaimResponse { header }))
    }

    async fn leader(
        &self,
        request: Request<LeaderRequest>,
    ) -> Result<Response<LeaderResponse>, Status> {
        let prefix = holder_prefix(&request.get_ref().name);
        check_recipe(&self.member, &request, &prefix, Access::Read).await?;
        let (first, revision) = first_or_last(&self.member, &prefix, 0, SortOrder::Ascend).await?;
        let kv = first.ok_or_else(no_leader)?;
        Ok(Response::new(LeaderResponse {
            header: self.member.header(revision),
            kv: Some(kv),
        }))
    }

    async fn observe(
        &self,
        request: Request<LeaderRequest>,
    ) -> Result<Response<ResponseStream<LeaderResponse>>, Status> {
        let prefix = holder_prefix(&request.get_ref().name);
        check_recipe(&self.member, &request, &prefix, Access::Read).await?;
        let (tx, rx) = mpsc::channel(OBSERVE_QUEUE);
        let member = self.member.clone();
        tokio::spawn(async move {
            tokio::select! {
                result = observe(&member, &prefix, &tx) => {
                    if let Err(status) = result {
                        // The client may be gone already; nothing to tell then.
                        let _ = tx.send(Err(status)).await;
                    }
                }
                // The client hung up: stop watching.
                () = tx.closed() => {}
            }
        });
        let observations = Box::pin(ReceiverStream::new(rx));
        Ok(Response::new(
            self.member.stop_signal().until_stopped(observations),
        ))
    }

    async fn resign(
        &self,
        request: Request<ResignRequest>,
    ) -> Result<Response<ResignResponse>, Status> {
        let name = request.get_ref().leader.as_ref().map(|l| l.name.clone());
        let prefix = holder_prefix(&name.ok_or_else(missing_leader_key)?);
        check_recipe(&self.member, &request, &prefix, Access::Write).await?;
        let request = request.into_inner();
        let leader = request.leader.ok_or_else(missing_leader_key)?;
        // As etcd: resigning a key that is no longer ours is not an error.
        let response = delete_if_ours(&self.member, &leader.key, leader.rev).await?;
        Ok(Response::new(ResignResponse {
            header: response.header,
        }))
    }
}

/// Sets the leader key's value if it still has `create_revision`.
async fn proclaim(
    member: &Member,
    key: &Bytes,
    create_revision: i64,
    lease: i64,
    value: Bytes,
) -> Result<Option<cairn_api::etcdserverpb::ResponseHeader>, Status> {
    let txn = TxnRequest {
        compare: vec![create_revision_is(key, create_revision)],
        success: vec![RequestOp {
            request: Some(Op::RequestPut(PutRequest {
                key: key.clone(),
                value,
                lease,
                ..Default::default()
            })),
        }],
        failure: Vec::new(),
    };
    let response = member.propose(txn).await?;
    if !response.succeeded {
        return Err(not_leader());
    }
    Ok(response.header)
}

/// Sends the leader on every change, as etcd's Election.Observe: the first
/// key by create revision, then its updates until it is deleted, then the
/// next leader. Returns only on failure, or when the client is gone.
async fn observe(
    member: &Member,
    prefix: &Bytes,
    tx: &mpsc::Sender<Result<LeaderResponse, Status>>,
) -> Result<(), Status> {
    loop {
        let (first, revision) = first_or_last(member, prefix, 0, SortOrder::Ascend).await?;
        let (kv, revision) = match first {
            Some(kv) => (kv, revision),
            None => first_put(member, prefix, revision).await?,
        };
        let key = kv.key.clone();
        if !send(member, tx, revision, kv).await {
            return Ok(());
        }
        let mut watch = KeyWatch::new(member, key, Bytes::new(), revision + 1)?;
        'leader: loop {
            let (revision, events) = watch.next().await?;
            for event in events {
                if event.r#type == EventType::Delete as i32 {
                    break 'leader;
                }
                if let Some(kv) = event.kv
                    && !send(member, tx, revision, kv).await
                {
                    return Ok(());
                }
            }
        }
    }
}

/// Waits for the first put under `prefix` from `revision` on: with no
/// leader, the first candidate to arrive is it.
async fn first_put(
    member: &Member,
    prefix: &Bytes,
    revision: i64,
) -> Result<(KeyValue, i64), Status> {
    let end = prefix_end(prefix);
    let mut watch = KeyWatch::new(member, prefix.clone(), end, revision)?;
    loop {
        let (_, events) = watch.next().await?;
        // Deletes are skipped, as etcd does, so observe does not spin.
        if let Some(kv) = events
            .into_iter()
            .filter(|e| e.r#type == EventType::Put as i32)
            .find_map(|e| e.kv)
        {
            let revision = kv.mod_revision;
            return Ok((kv, revision));
        }
    }
}

/// Sends one observation; false once the client is gone.
async fn send(
    member: &Member,
    tx: &mpsc::Sender<Result<LeaderResponse, Status>>,
    revision: i64,
    kv: KeyValue,
) -> bool {
    let response = LeaderResponse {
        header: member.header(revision),
        kv: Some(kv),
    };
    tx.send(Ok(response)).await.is_ok()
}
