//! etcd's KV service: validates, then reads locally or writes through consensus.

use std::sync::Arc;

use cairn_api::etcdserverpb::kv_server::Kv;
use cairn_api::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, TxnRequest, TxnResponse,
};
use cairn_auth::{Access, Caller};
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
        let response = put(
            &self.member,
            &caller,
            token.as_deref(),
            request.into_inner(),
        )
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
        let response = delete_range(&self.member, &caller, token.as_deref(), request).await?;
        Ok(Response::new(response))
    }

    async fn txn(&self, request: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let caller = self.member.auth().caller_of(&request).await?;
        let token = credentials(&request).token;
        let response = txn(
            &self.member,
            &caller,
            token.as_deref(),
            request.into_inner(),
        )
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

/// A put as etcd takes it, from a client or forwarded by another member
/// (`token` is the caller's, for a member it is forwarded on to).
pub async fn put(
    member: &Member,
    caller: &Caller,
    token: Option<&str>,
    request: PutRequest,
) -> Result<PutResponse, Status> {
    validate::check_put(&request)?;
    member.check_quota(alarms::put_cost(&request)).await?;
    member.write_for(caller, token, request).await
}

/// A delete as etcd takes it (see [`put`]).
pub async fn delete_range(
    member: &Member,
    caller: &Caller,
    token: Option<&str>,
    request: DeleteRangeRequest,
) -> Result<DeleteRangeResponse, Status> {
    validate::check_delete(&request)?;
    member.write_for(caller, token, request).await
}

/// A txn as etcd takes it (see [`put`]).
pub async fn txn(
    member: &Member,
    caller: &Caller,
    token: Option<&str>,
    request: TxnRequest,
) -> Result<TxnResponse, Status> {
    validate::check_txn(&request, member.max_txn_ops())?;
    member.check_quota(alarms::txn_cost(&request)).await?;
    // Read-only txns go through the log too, which gives their compares
    // and ranges one consistent revision.
    member.write_for(caller, token, request).await
}
