//! etcd's Lease service, and the leader task that expires leases and
//! checkpoints their remaining TTLs. Every change of a lease is a proposal;
//! only keep-alives (expiries) stay local to the leader.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_api::cairnpb::internal_request::Request as Internal;
use cairn_api::error;
use cairn_api::etcdserverpb::lease_client::LeaseClient;
use cairn_api::etcdserverpb::lease_server::Lease;
use cairn_api::etcdserverpb::{
    LeaseCheckpoint, LeaseCheckpointRequest, LeaseGrantRequest, LeaseGrantResponse,
    LeaseKeepAliveRequest, LeaseKeepAliveResponse, LeaseLeasesRequest, LeaseLeasesResponse,
    LeaseRevokeRequest, LeaseRevokeResponse, LeaseStatus, LeaseTimeToLiveRequest,
    LeaseTimeToLiveResponse,
};
use cairn_lease::{LeaseError, MAX_LEASE_TTL};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use crate::alarms;
use crate::apply::Applied;
use crate::auth::RequestAuth as _;
use crate::member::{Member, lease_error};

/// How often the leader looks for expired leases and for leases due for a
/// checkpoint (renewed ones within this tick plus the checkpoint slack).
const EXPIRY_TICK: Duration = Duration::from_millis(100);
/// At most this many revokes per tick, as etcd bounds its revoke rate.
const REVOKES_PER_TICK: usize = 500;
/// How old a lease's checkpoint may grow before the leader records its
/// remaining TTL again, unrenewed. Only members that loaded leases from the
/// store need it: the others resume from the apply instant of the grant or
/// last checkpoint, which renewals refresh.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(5);
/// At most this many leases per checkpoint proposal, as etcd's.
const CHECKPOINTS_PER_PROPOSAL: usize = 1000;

/// The keep-alive response stream, as the generated trait spells it.
type KeepAliveStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<LeaseKeepAliveResponse, Status>> + Send + 'static>,
>;

pub struct LeaseService {
    member: Arc<Member>,
}

impl LeaseService {
    pub fn new(member: Arc<Member>) -> Self {
        LeaseService { member }
    }
}

fn unexpected(applied: Applied) -> Status {
    Status::internal(format!("apply returned a mismatched response: {applied:?}"))
}

fn is_leader(member: &Member) -> bool {
    member.node.status().leader == member.id
}

/// Answers one keep-alive: renewed here on the leader, which holds the
/// expiries; forwarded to the leader from anywhere else.
async fn keep_alive(
    member: &Member,
    leader_client: &mut Option<(u64, LeaseClient<Channel>)>,
    id: i64,
) -> Result<LeaseKeepAliveResponse, Status> {
    member.refuse_on_learner()?;
    let leader = member.node.status().leader;
    if leader == member.id {
        let renewed = {
            let mut lessor = member.lessor.lock();
            let now = Instant::now();
            // The leader task promotes within a tick; a keep-alive that
            // comes first must not be lost.
            if !lessor.is_primary() {
                lessor.promote(now);
            }
            lessor.renew(id, now)
        };
        let ttl = match renewed {
            Ok(ttl) => ttl,
            // etcd answers a keep-alive of a missing lease with TTL 0.
            Err(LeaseError::NotFound) => 0,
            Err(e) => return Err(lease_error(e).status()),
        };
        return Ok(LeaseKeepAliveResponse {
            header: member.header(member.store.current_revision()),
            id,
            ttl,
        });
    }
    if leader == 0 {
        return Err(error::NO_LEADER.status());
    }
    let client = match leader_client {
        Some((known, client)) if *known == leader => client,
        _ => {
            let url = member
                .node
                .members()
                .into_iter()
                .find(|m| m.id == leader)
                .and_then(|m| m.client_urls.into_iter().next())
                .ok_or_else(|| error::NO_LEADER.status())?;
            let channel = Channel::from_shared(url)
                .map_err(|e| Status::unavailable(format!("leader client URL: {e}")))?
                .connect_lazy();
            &mut leader_client.insert((leader, LeaseClient::new(channel))).1
        }
    };
    let forwarded = client
        .lease_keep_alive(tokio_stream::once(LeaseKeepAliveRequest { id }))
        .await;
    let mut responses = match forwarded {
        Ok(responses) => responses.into_inner(),
        Err(e) => {
            // Reconnect next time: the leader may have moved or restarted.
            *leader_client = None;
            return Err(e);
        }
    };
    match responses.message().await {
        Ok(Some(response)) => Ok(response),
        Ok(None) => Err(error::NO_LEADER.status()),
        Err(e) => {
            *leader_client = None;
            Err(e)
        }
    }
}

#[tonic::async_trait]
impl Lease for LeaseService {
    async fn lease_grant(
        &self,
        request: Request<LeaseGrantRequest>,
    ) -> Result<Response<LeaseGrantResponse>, Status> {
        let caller = self.member.auth.caller_of(&request).await?;
        let mut request = request.into_inner();
        if request.ttl > MAX_LEASE_TTL {
            return Err(error::LEASE_TTL_TOO_LARGE.status());
        }
        self.member.check_quota(alarms::LEASE_COST).await?;
        // Chosen before proposing, so every member grants the same ID.
        if request.id == 0 {
            request.id = self.member.lease_ids.next();
        }
        match self
            .member
            .propose_for(&caller, Internal::LeaseGrant(request))
            .await?
        {
            Applied::LeaseGrant(mut response) => {
                self.member.fill_header(&mut response.header);
                Ok(Response::new(response))
            }
            other => Err(unexpected(other)),
        }
    }

    async fn lease_revoke(
        &self,
        request: Request<LeaseRevokeRequest>,
    ) -> Result<Response<LeaseRevokeResponse>, Status> {
        // The apply loop checks that the caller may delete every key of
        // the lease.
        let caller = self.member.auth.caller_of(&request).await?;
        let request = request.into_inner();
        match self
            .member
            .propose_for(&caller, Internal::LeaseRevoke(request))
            .await?
        {
            Applied::LeaseRevoke(mut response) => {
                self.member.fill_header(&mut response.header);
                Ok(Response::new(response))
            }
            other => Err(unexpected(other)),
        }
    }

    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<KeepAliveStream>, Status> {
        let mut requests = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let member = self.member.clone();
        tokio::spawn(async move {
            let mut leader_client = None;
            while let Some(request) = requests.next().await {
                let answer = match request {
                    Ok(request) => keep_alive(&member, &mut leader_client, request.id).await,
                    // The client went away or sent garbage: end the stream.
                    Err(_) => break,
                };
                let failed = answer.is_err();
                if tx.send(answer).await.is_err() || failed {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let request = request.into_inner();
        self.member.linearizable_barrier().await?;
        let info = self.member.lessor.lock().info(request.id, Instant::now());
        let mut response = match info {
            Some(info) => LeaseTimeToLiveResponse {
                header: None,
                id: info.id,
                ttl: info.ttl,
                granted_ttl: info.granted_ttl,
                keys: if request.keys {
                    info.keys.into_iter().map(Into::into).collect()
                } else {
                    Vec::new()
                },
            },
            // etcd answers TTL -1 for a lease that does not exist.
            None => LeaseTimeToLiveResponse {
                header: None,
                id: request.id,
                ttl: -1,
                granted_ttl: 0,
                keys: Vec::new(),
            },
        };
        self.member.fill_header(&mut response.header);
        Ok(Response::new(response))
    }

    async fn lease_leases(
        &self,
        _request: Request<LeaseLeasesRequest>,
    ) -> Result<Response<LeaseLeasesResponse>, Status> {
        self.member.linearizable_barrier().await?;
        let ids = self.member.lessor.lock().ids();
        let mut response = LeaseLeasesResponse {
            header: None,
            leases: ids.into_iter().map(|id| LeaseStatus { id }).collect(),
        };
        self.member.fill_header(&mut response.header);
        Ok(Response::new(response))
    }
}

/// Runs the leader's lease duties for as long as the member runs: while
/// this member leads, revoke expired leases and checkpoint remaining TTLs,
/// each by a proposal; otherwise keep no expiries.
pub fn spawn_leader_task(member: Arc<Member>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(EXPIRY_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let leading = is_leader(&member);
            let now = Instant::now();
            let (expired, checkpoints) = {
                let mut lessor = member.lessor.lock();
                if !leading {
                    if lessor.is_primary() {
                        lessor.demote();
                    }
                    continue;
                }
                if !lessor.is_primary() {
                    lessor.promote(now);
                }
                let checkpoints =
                    lessor.checkpoints(now, CHECKPOINT_INTERVAL, CHECKPOINTS_PER_PROPOSAL);
                (lessor.expired(now, REVOKES_PER_TICK), checkpoints)
            };
            for id in expired {
                // Each on its own: a slow proposal does not hold up the
                // next tick; a lost one is retried by the lessor.
                let member = member.clone();
                tokio::spawn(async move {
                    let revoke = Internal::LeaseRevoke(LeaseRevokeRequest { id });
                    match member.propose(revoke).await {
                        Ok(_) => tracing::debug!("revoked expired lease {id:x}"),
                        Err(e) if e.code() == tonic::Code::NotFound => {}
                        Err(e) => tracing::warn!("revoking expired lease {id:x}: {e}"),
                    }
                });
            }
            if !checkpoints.is_empty() {
                let member = member.clone();
                tokio::spawn(async move {
                    let checkpoint = Internal::LeaseCheckpoint(LeaseCheckpointRequest {
                        checkpoints: checkpoints
                            .into_iter()
                            .map(|(id, remaining_ttl)| LeaseCheckpoint { id, remaining_ttl })
                            .collect(),
                    });
                    if let Err(e) = member.propose(checkpoint).await {
                        tracing::warn!("checkpointing lease TTLs: {e}");
                    }
                });
            }
        }
    })
}
