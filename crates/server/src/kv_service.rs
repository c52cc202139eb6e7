//! etcd's KV service: validates, then reads locally or writes through consensus.

use std::sync::Arc;

use cairn_api::cairnpb::ShardRange;
use cairn_api::cairnpb::shard_reads_server::ShardReads;
use cairn_api::etcdserverpb::kv_server::Kv;
use cairn_api::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, TxnRequest, TxnResponse,
};
use cairn_auth::Access;
use tonic::{Request, Response, Status};

use crate::alarms;
use crate::auth::{RequestAuth as _, credentials};
use crate::member::Member;
use crate::validate;

pub struct KvService {
    member: Arc<Member>,
}

impl KvService {
    pub fn new(member: Arc<Member>) -> Self {
        KvService { member }
    }
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn range(
        &self,
        request: Request<RangeRequest>,
    ) -> Result<Response<RangeResponse>, Status> {
        let auth = self.member.auth();
        let caller = auth.caller_of(&request).await?;
        let token = credentials(&request).token;
        let request = request.into_inner();
        validate::check_range(&request)?;
        auth.check(&caller, Access::Read, &request.key, &request.range_end)?;
        let response = self.member.range_as(&request, token.as_deref()).await?;
        // As etcd's doSerialize: a permission revoked while the read ran
        // must not let its answer out.
        auth.check_still_current(&caller)?;
        Ok(Response::new(response))
    }

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let caller = self.member.auth().caller_of(&request).await?;
        let token = credentials(&request).token;
        let request = request.into_inner();
        validate::check_put(&request)?;
        self.member.check_quota(alarms::put_cost(&request)).await?;
        let response = self
            .member
            .write_for(&caller, token.as_deref(), request)
            .await?;
        Ok(Response::new(response))
    }

    async fn delete_range(
        &self,
        request: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        let caller = self.member.auth().caller_of(&request).await?;
        let token = credentials(&request).token;
        let request = request.into_inner();
        validate::check_delete(&request)?;
        let response = self
            .member
            .write_for(&caller, token.as_deref(), request)
            .await?;
        Ok(Response::new(response))
    }

    async fn txn(&self, request: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let caller = self.member.auth().caller_of(&request).await?;
        let token = credentials(&request).token;
        let request = request.into_inner();
        validate::check_txn(&request, self.member.max_txn_ops())?;
        self.member.check_quota(alarms::txn_cost(&request)).await?;
        // Read-only txns go through the log too, which gives their compares
        // and ranges one consistent revision.
        let response = self
            .member
            .write_for(&caller, token.as_deref(), request)
            .await?;
        Ok(Response::new(response))
    }

    async fn compact(
        &self,
        request: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        let caller = self.member.auth().caller_of(&request).await?;
        let response = self
            .member
            .compact(Some(&caller), request.into_inner())
            .await?;
        Ok(Response::new(response))
    }
}

/// With --shards: reads of the shards this member holds, for the members
/// that do not hold them.
pub struct ShardReadsService {
    member: Arc<Member>,
}

impl ShardReadsService {
    pub fn new(member: Arc<Member>) -> Self {
        ShardReadsService { member }
    }
}

#[tonic::async_trait]
impl ShardReads for ShardReadsService {
    async fn range(&self, request: Request<ShardRange>) -> Result<Response<RangeResponse>, Status> {
        // The caller's permissions, checked here as well: this service is
        // on the client port.
        let auth = self.member.auth();
        let caller = auth.caller_of(&request).await?;
        let read = request.into_inner();
        let (key, range_end) = read
            .request
            .as_ref()
            .map(|r| (r.key.clone(), r.range_end.clone()))
            .unwrap_or_default();
        auth.check(&caller, Access::Read, &key, &range_end)?;
        let response = self.member.read_held_shard(&read).await?;
        auth.check_still_current(&caller)?;
        Ok(Response::new(response))
    }
}
