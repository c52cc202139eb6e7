//! etcd's Lease service over the member's leases (`crate::leases`).

use std::sync::Arc;

use cairn_api::error;
use cairn_api::etcdserverpb::lease_server::Lease;
use cairn_api::etcdserverpb::{
    LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse,
    LeaseLeasesRequest, LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse, LeaseStatus,
    LeaseTimeToLiveRequest, LeaseTimeToLiveResponse,
};
use cairn_lease::MAX_LEASE_TTL;
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::alarms;
use crate::auth::RequestAuth as _;
use crate::leases::KeepAlive;
use crate::member::Member;
use crate::stopping::ResponseStream;

pub struct LeaseService {
    member: Arc<Member>,
}

impl LeaseService {
    pub fn new(member: Arc<Member>) -> Self {
        LeaseService { member }
    }
}

#[tonic::async_trait]
impl Lease for LeaseService {
    async fn lease_grant(
        &self,
        request: Request<LeaseGrantRequest>,
    ) -> Result<Response<LeaseGrantResponse>, Status> {
        let caller = self.member.auth().caller_of(&request).await?;
        let mut request = request.into_inner();
        if request.ttl > MAX_LEASE_TTL {
            return Err(error::LEASE_TTL_TOO_LARGE.status());
        }
        self.member.check_quota(alarms::LEASE_COST).await?;
        if request.id == 0 {
            request.id = self.member.leases().next_id();
        }
        let response = self.member.propose_for(&caller, request).await?;
        Ok(Response::new(response))
    }

    async fn lease_revoke(
        &self,
        request: Request<LeaseRevokeRequest>,
    ) -> Result<Response<LeaseRevokeResponse>, Status> {
        // The apply loop checks that the caller may delete every key of
        // the lease.
        let caller = self.member.auth().caller_of(&request).await?;
        let response = self
            .member
            .propose_for(&caller, request.into_inner())
            .await?;
        Ok(Response::new(response))
    }

    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<ResponseStream<LeaseKeepAliveResponse>>, Status> {
        let mut requests = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let mut keep_alive = KeepAlive::new(self.member.clone());
        tokio::spawn(async move {
            loop {
                let request = tokio::select! {
                    request = requests.next() => request,
                    // The responses ended (the member stops serving): drop
                    // the requests too, so the call is over.
                    () = tx.closed() => break,
                };
                let answer = match request {
                    Some(Ok(request)) => keep_alive.renew(request.id).await,
                    // The client went away or sent garbage: end the stream.
                    Some(Err(_)) | None => break,
                };
                let failed = answer.is_err();
                if tx.send(answer).await.is_err() || failed {
                    break;
                }
            }
        });
        let responses = Box::pin(ReceiverStream::new(rx));
        Ok(Response::new(
            self.member.stop_signal().until_stopped(responses),
        ))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let request = request.into_inner();
        self.member.linearizable_barrier().await?;
        let mut response = self.member.leases().time_to_live(request.id, request.keys);
        self.member.fill_header(&mut response.header);
        Ok(Response::new(response))
    }

    async fn lease_leases(
        &self,
        _request: Request<LeaseLeasesRequest>,
    ) -> Result<Response<LeaseLeasesResponse>, Status> {
        self.member.linearizable_barrier().await?;
        let ids = self.member.leases().ids();
        let mut response = LeaseLeasesResponse {
            header: None,
            leases: ids.into_iter().map(|id| LeaseStatus { id }).collect(),
        };
        self.member.fill_header(&mut response.header);
        Ok(Response::new(response))
    }
}
