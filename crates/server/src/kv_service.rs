//! etcd's KV service: validates, then reads locally or writes through consensus.

use std::sync::Arc;

use cairn_api::cairnpb::internal_request::Request as Internal;
use cairn_api::etcdserverpb::kv_server::Kv;
use cairn_api::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, TxnRequest, TxnResponse,
};
use cairn_auth::Access;
use tonic::{Request, Response, Status};

use crate::alarms;
use crate::apply::Applied;
use crate::auth::RequestAuth as _;
use crate::member::{Member, mvcc_status};
use crate::validate;

pub struct KvService {
    member: Arc<Member>,
}

impl KvService {
    pub fn new(member: Arc<Member>) -> Self {
        KvService { member }
    }
}

fn unexpected(applied: Applied) -> Status {
    Status::internal(format!("apply returned a mismatched response: {applied:?}"))
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn range(
        &self,
        request: Request<RangeRequest>,
    ) -> Result<Response<RangeResponse>, Status> {
        let caller = self.member.auth.caller_of(&request).await?;
        let request = request.into_inner();
        validate::check_range(&request)?;
        self.member
            .auth
            .check(&caller, Access::Read, &request.key, &request.range_end)?;
        if !request.serializable {
            self.member.linearizable_barrier().await?;
        }
        let mut response = self.member.store.range(&request).map_err(mvcc_status)?;
        self.member.fill_header(&mut response.header);
        Ok(Response::new(response))
    }

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let caller = self.member.auth.caller_of(&request).await?;
        let request = request.into_inner();
        validate::check_put(&request)?;
        self.member.check_quota(alarms::put_cost(&request)).await?;
        match self
            .member
            .propose_for(&caller, Internal::Put(request))
            .await?
        {
            Applied::Put(mut response) => {
                self.member.fill_header(&mut response.header);
                Ok(Response::new(response))
            }
            other => Err(unexpected(other)),
        }
    }

    async fn delete_range(
        &self,
        request: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        let caller = self.member.auth.caller_of(&request).await?;
        let request = request.into_inner();
        validate::check_delete(&request)?;
        match self
            .member
            .propose_for(&caller, Internal::DeleteRange(request))
            .await?
        {
            Applied::DeleteRange(mut response) => {
                self.member.fill_header(&mut response.header);
                Ok(Response::new(response))
            }
            other => Err(unexpected(other)),
        }
    }

    async fn txn(&self, request: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let caller = self.member.auth.caller_of(&request).await?;
        let request = request.into_inner();
        validate::check_txn(&request, self.member.max_txn_ops)?;
        self.member.check_quota(alarms::txn_cost(&request)).await?;
        // Read-only txns go through the log too, which gives their compares
        // and ranges one consistent revision.
        match self
            .member
            .propose_for(&caller, Internal::Txn(request))
            .await?
        {
            Applied::Txn(mut response) => {
                self.member.fill_header(&mut response.header);
                Ok(Response::new(response))
            }
            other => Err(unexpected(other)),
        }
    }

    async fn compact(
        &self,
        request: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        let caller = self.member.auth.caller_of(&request).await?;
        let request = request.into_inner();
        match self
            .member
            .propose_for(&caller, Internal::Compaction(request))
            .await?
        {
            Applied::Compaction(mut response) => {
                self.member.fill_header(&mut response.header);
                Ok(Response::new(response))
            }
            other => Err(unexpected(other)),
        }
    }
}
