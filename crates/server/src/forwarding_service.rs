//! With --shards: the receiving end of [`crate::forward`]. Each request a
//! member forwards here is served as a client's would be (its caller's
//! permissions checked again: this service is on the client port), and
//! its answer goes back as soon as it is done, with whatever else is done
//! by then. It also serves the feeds of the shards held here to the
//! members that follow them for their watches (`Follow`). A member's own
//! calls are signed ([`crate::member_auth`]): its feeds, and on its
//! `Forward` stream the reads without a token, which it makes for a caller
//! whose permission it checked (a watcher, or a client), are served without
//! a token; anyone else's call is served as a client's.

use std::sync::Arc;

use cairn_api::cairnpb::answered::Response as AnsweredResponse;
use cairn_api::cairnpb::forwarded::Request as ForwardedRequest;
use cairn_api::cairnpb::forwarding_server::Forwarding;
use cairn_api::cairnpb::{
    Answered, AnsweredBatch, FollowShard, Forwarded, ForwardedBatch, ShardFeed, ShardRange,
};
use cairn_api::etcdserverpb::RangeResponse;
use cairn_auth::{Access, Caller, Credentials};
use tokio::sync::mpsc;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status, Streaming};

use crate::kv_service;
use crate::member::Member;
use crate::member_auth::{self, Call, Refused};
use crate::shard_events::KeyspaceEvents;

pub struct ForwardingService {
    member: Arc<Member>,
}

impl ForwardingService {
    pub fn new(member: Arc<Member>) -> Self {
        ForwardingService { member }
    }

    /// Whether a call presenting member credentials `presented` is `call`
    /// signed by a member: `Ok(false)` when it presents none, or when this
    /// member cannot check them (its cluster secret not applied yet): it
    /// is then a client's.
    async fn signed_by_member(
        &self,
        presented: Option<String>,
        call: Call,
    ) -> Result<bool, Refused> {
        let Some(presented) = presented else {
            return Ok(false);
        };
        let members: Vec<u64> = self.member.peers().iter().map(|m| m.id).collect();
        match self
            .member
            .credentials()
            .check(&presented, call, &members)
            .await
        {
            Ok(_) => Ok(true),
            Err(Refused::NoSecret) => Ok(false),
            Err(refused) => Err(refused),
        }
    }
}

#[tonic::async_trait]
impl Forwarding for ForwardingService {
    async fn forward(
        &self,
        request: Request<Streaming<ForwardedBatch>>,
    ) -> Result<Response<BoxStream<AnsweredBatch>>, Status> {
        // Refused credentials leave the stream a client's, whose requests
        // carry their callers' tokens: a member whose clock is off still
        // forwards its clients' requests.
        let from_member = self
            .signed_by_member(member_auth::presented(&request), Call::Forward)
            .await
            .unwrap_or_else(|refused| {
                tracing::warn!("a forwarding stream's member credentials refused: {refused}");
                false
            });
        let mut batches = request.into_inner();
        let (answers, answered) = mpsc::unbounded_channel();
        let member = self.member.clone();
        tokio::spawn(async move {
            while let Ok(Some(batch)) = batches.message().await {
                for forwarded in batch.requests {
                    let member = member.clone();
                    let answers = answers.clone();
                    tokio::spawn(async move {
                        let _ = answers.send(serve(&member, forwarded, from_member).await);
                    });
                }
            }
        });
        // Ends once the caller's stream has ended and every answer is out.
        let batched = futures_util::stream::unfold(answered, |mut answered| async move {
            let first = answered.recv().await?;
            let mut answers = vec![first];
            while let Ok(more) = answered.try_recv() {
                answers.push(more);
            }
            Some((Ok(AnsweredBatch { answers }), answered))
        });
        Ok(Response::new(Box::pin(batched)))
    }

    /// A member's watches following a shard held here: signed by a
    /// member (whose watchers' permissions it checks), or else asked by a
    /// caller allowed to read every key. Refused with PermissionDenied,
    /// which makes a follower pass the shard over and ask again later.
    async fn follow(
        &self,
        request: Request<FollowShard>,
    ) -> Result<Response<BoxStream<ShardFeed>>, Status> {
        let call = Call::Follow {
            shard: request.get_ref().shard,
            revision: request.get_ref().revision,
        };
        let presented = member_auth::presented(&request);
        let from_member = match self.signed_by_member(presented, call).await {
            Ok(signed) => signed,
            Err(refused) if self.member.auth().store().is_enabled() => {
                return Err(Status::permission_denied(format!(
                    "cairn: following a shard: member credentials refused: {refused}"
                )));
            }
            // Anyone may follow a shard while auth is disabled.
            Err(refused) => {
                tracing::warn!("a feed's member credentials refused: {refused}");
                false
            }
        };
        if !from_member {
            let credentials = crate::auth::credentials(&request);
            let auth = self.member.auth();
            let refused = |e: cairn_api::error::EtcdError| {
                Status::permission_denied(format!(
                    "cairn: following a shard: {}",
                    e.status().message()
                ))
            };
            let caller = auth.caller(&credentials).await.map_err(refused)?;
            auth.check(&caller, Access::Read, &[0], &[0])
                .map_err(refused)?;
        }
        let follow = request.into_inner();
        let Some(KeyspaceEvents::Shards(events)) = self.member.shards().map(|s| s.events()) else {
            return Err(Status::failed_precondition(
                "cairn: this member's keyspace is not sharded",
            ));
        };
        Ok(Response::new(events.feed(follow.shard, follow.revision)?))
    }
}

async fn serve(member: &Member, forwarded: Forwarded, from_member: bool) -> Answered {
    let id = forwarded.id;
    match answer(member, forwarded, from_member).await {
        Ok(response) => Answered {
            id,
            response: Some(response),
            ..Default::default()
        },
        Err(status) => Answered {
            id,
            code: status.code() as i32,
            message: status.message().to_string(),
            response: None,
        },
    }
}

async fn answer(
    member: &Member,
    forwarded: Forwarded,
    from_member: bool,
) -> Result<AnsweredResponse, Status> {
    let token = Some(forwarded.token).filter(|t| !t.is_empty());
    // The sending member's own read, for a caller it authorized. Writes
    // always carry their caller: the apply loop checks them as that user.
    if from_member && token.is_none() {
        match &forwarded.request {
            Some(ForwardedRequest::Read(read)) => {
                return Ok(AnsweredResponse::Range(member.read_held_shard(read).await?));
            }
            Some(ForwardedRequest::History(read)) => {
                return Ok(AnsweredResponse::History(
                    member.history_held_shard(read).await?,
                ));
            }
            _ => {}
        }
    }
    let credentials = Credentials {
        token,
        common_name: None,
        v2_guest: false,
    };
    let caller = member
        .auth()
        .caller(&credentials)
        .await
        .map_err(|e| e.status())?;
    let token = credentials.token.as_deref();
    Ok(match forwarded.request {
        Some(ForwardedRequest::Read(read)) => {
            AnsweredResponse::Range(read_as(member, &caller, &read).await?)
        }
        Some(ForwardedRequest::Put(r)) => {
            AnsweredResponse::Put(kv_service::put(member, &caller, token, r).await?)
        }
        Some(ForwardedRequest::DeleteRange(r)) => AnsweredResponse::DeleteRange(
            kv_service::delete_range(member, &caller, token, r).await?,
        ),
        Some(ForwardedRequest::Txn(r)) => {
            AnsweredResponse::Txn(kv_service::txn(member, &caller, token, r).await?)
        }
        Some(ForwardedRequest::CrossTxn(r)) => {
            AnsweredResponse::Txn(member.write_cross_part(&caller, r).await?)
        }
        Some(ForwardedRequest::History(read)) => {
            member
                .auth()
                .check(&caller, Access::Read, &read.key, &read.range_end)?;
            AnsweredResponse::History(member.history_held_shard(&read).await?)
        }
        Some(ForwardedRequest::Hash(read)) => {
            member.auth().check_admin(&caller)?;
            AnsweredResponse::Hash(crate::shard_maintenance::hash_held(member, &read).await?)
        }
        Some(ForwardedRequest::Dump(read)) => {
            member.auth().check_admin(&caller)?;
            AnsweredResponse::Dump(crate::shard_maintenance::dump_held(member, read).await?)
        }
        None => {
            return Err(Status::invalid_argument(
                "cairn: a forwarded request without a request",
            ));
        }
    })
}

async fn read_as(
    member: &Member,
    caller: &Caller,
    read: &ShardRange,
) -> Result<RangeResponse, Status> {
    let auth = member.auth();
    let (key, range_end) = read
        .request
        .as_ref()
        .map(|r| (r.key.clone(), r.range_end.clone()))
        .unwrap_or_default();
    auth.check(caller, Access::Read, &key, &range_end)?;
    let response = member.read_held_shard(read).await?;
    // As etcd's doSerialize: a permission revoked while the read ran must
    // not let its answer out.
    auth.check_still_current(caller)?;
    Ok(response)
}
