//! With --shards: what a member asks of the members holding the shards it
//! does not hold: writes, which the receiving member routes to its
//! replica, and reads of one shard at a revision of the keyspace. Both go
//! over one `Forwarding` stream per member, batched: every request that
//! queues while a batch is written goes in the next, so a request storm
//! costs a few messages rather than a call per request. The caller's token
//! rides along, and each member is reached at its first client URL.
//! Watches follow the shards held elsewhere through a `Follow` stream
//! each ([`MemberRemote`]). Streams are opened with this member's signed
//! credentials ([`crate::member_auth`]): a request without a token on them
//! is this member's own read, made for a caller it authorized.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use cairn_api::cairnpb::answered::Response as AnsweredResponse;
use cairn_api::cairnpb::forwarded::Request as ForwardedRequest;
use cairn_api::cairnpb::forwarding_client::ForwardingClient;
use cairn_api::cairnpb::{
    Answered, AnsweredBatch, FollowShard, Forwarded, ForwardedBatch, ShardDump, ShardDumpResponse,
    ShardFeed, ShardHash, ShardHashResponse, ShardHistory, ShardHistoryResponse, ShardRange,
};
use cairn_api::error;
use cairn_api::etcdserverpb::RangeResponse;
use cairn_consensus::PeerInfo;
use cairn_shard::ShardId;
use cairn_shard_replica::{ShardWrite, WriteResponse};
use futures_util::StreamExt as _;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status, Streaming};

use crate::member::Member;
use crate::member_auth::{Call, MemberCredentials};
use crate::shard_events::RemoteShards;
use crate::shards::Route;

/// How long opening a shard's feed may take: a paused member accepts the
/// connection and never answers.
const FOLLOW_OPEN: Duration = Duration::from_secs(3);
/// HTTP/2 pings on a feed's connection, so that a feed from a member that
/// stopped answering breaks rather than waits.
const FOLLOW_KEEPALIVE: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(3));

/// The message of the status a member answers a forwarded part of an
/// aborted cross-shard txn with.
pub const TXN_ABORTED: &str = "cairn: the cross-shard txn was aborted";

/// The links to the other members, by member ID, made at first use.
pub struct Forwarder {
    links: Mutex<HashMap<u64, Link>>,
    /// Signs each stream as this member's.
    credentials: Arc<MemberCredentials>,
}

/// The way to one member: the queue its link task sends from.
struct Link {
    url: String,
    queue: mpsc::UnboundedSender<Pending>,
    /// Whether its streams are signed: made once the cluster secret was
    /// applied here (a link made before is replaced, so that this
    /// member's own reads on it are taken as such).
    signed: bool,
}

type Reply = oneshot::Sender<Result<AnsweredResponse, Status>>;

/// A request waiting for its answer.
struct Pending {
    request: Forwarded,
    reply: Reply,
}

impl Forwarder {
    pub fn new(credentials: Arc<MemberCredentials>) -> Forwarder {
        Forwarder {
            links: Mutex::default(),
            credentials,
        }
    }

    /// `write` through the first of `replicas` that can be reached (one
    /// that cannot is skipped, as etcd's clients skip endpoints).
    pub async fn write(
        &self,
        replicas: &[u64],
        members: &[PeerInfo],
        token: Option<&str>,
        write: ShardWrite,
    ) -> Result<WriteResponse, Status> {
        let request = match write {
            ShardWrite::Put(r) => ForwardedRequest::Put(r),
            ShardWrite::DeleteRange(r) => ForwardedRequest::DeleteRange(r),
            ShardWrite::Txn(r) => ForwardedRequest::Txn(r),
            ShardWrite::CrossTxn(r) => ForwardedRequest::CrossTxn(r),
        };
        let answer = match self.send(replicas, members, token, request).await {
            Err(e) if e.code() == Code::Aborted && e.message() == TXN_ABORTED => {
                return Ok(WriteResponse::Aborted);
            }
            answer => answer?,
        };
        match answer {
            AnsweredResponse::Put(r) => Ok(WriteResponse::Put(r)),
            AnsweredResponse::DeleteRange(r) => Ok(WriteResponse::DeleteRange(r)),
            AnsweredResponse::Txn(r) => Ok(WriteResponse::Txn(r)),
            AnsweredResponse::Range(_)
            | AnsweredResponse::History(_)
            | AnsweredResponse::Hash(_)
            | AnsweredResponse::Dump(_) => Err(mismatched()),
        }
    }

    /// `read` from the first of `replicas` that can be reached.
    pub async fn read(
        &self,
        replicas: &[u64],
        members: &[PeerInfo],
        token: Option<&str>,
        read: ShardRange,
    ) -> Result<RangeResponse, Status> {
        match self
            .send(replicas, members, token, ForwardedRequest::Read(read))
            .await?
        {
            AnsweredResponse::Range(r) => Ok(r),
            _ => Err(mismatched()),
        }
    }

    /// `read` (a watcher's catch-up) from the first of `replicas` that can
    /// be reached.
    pub async fn history(
        &self,
        replicas: &[u64],
        members: &[PeerInfo],
        read: ShardHistory,
    ) -> Result<ShardHistoryResponse, Status> {
        match self
            .send(replicas, members, None, ForwardedRequest::History(read))
            .await?
        {
            AnsweredResponse::History(r) => Ok(r),
            _ => Err(mismatched()),
        }
    }

    /// A shard's hash (HashKV with --shards) from the first of `replicas`
    /// that can be reached, with the caller's `token`.
    pub async fn hash(
        &self,
        replicas: &[u64],
        members: &[PeerInfo],
        token: Option<&str>,
        read: ShardHash,
    ) -> Result<ShardHashResponse, Status> {
        match self
            .send(replicas, members, token, ForwardedRequest::Hash(read))
            .await?
        {
            AnsweredResponse::Hash(r) => Ok(r),
            _ => Err(mismatched()),
        }
    }

    /// A page of a shard's stored revisions (`snapshot save` with --shards)
    /// from the first of `replicas` that can be reached, with the caller's
    /// `token`.
    pub async fn dump(
        &self,
        replicas: &[u64],
        members: &[PeerInfo],
        token: Option<&str>,
        read: ShardDump,
    ) -> Result<ShardDumpResponse, Status> {
        match self
            .send(replicas, members, token, ForwardedRequest::Dump(read))
            .await?
        {
            AnsweredResponse::Dump(r) => Ok(r),
            _ => Err(mismatched()),
        }
    }

    async fn send(
        &self,
        replicas: &[u64],
        members: &[PeerInfo],
        token: Option<&str>,
        request: ForwardedRequest,
    ) -> Result<AnsweredResponse, Status> {
        let mut last = Status::unavailable("cairn: the shard has no replica");
        for &replica in replicas {
            let (reply, answer) = oneshot::channel();
            let pending = Pending {
                request: Forwarded {
                    id: 0,
                    token: token.unwrap_or_default().to_string(),
                    request: Some(request.clone()),
                },
                reply,
            };
            self.queue(replica, members, pending)?;
            match answer.await {
                Ok(Err(e)) if unreachable(&e) => last = e,
                Ok(answer) => return answer,
                Err(_) => last = Status::unavailable("cairn: a forwarded request was dropped"),
            }
        }
        Err(last)
    }

    /// Queues `pending` on the link to `member` as `members` (the cluster
    /// group's list) gives its client URL, making the link if need be.
    fn queue(&self, member: u64, members: &[PeerInfo], pending: Pending) -> Result<(), Status> {
        let url = members
            .iter()
            .find(|m| m.id == member)
            .and_then(|m| m.client_urls.first())
            .ok_or_else(|| {
                Status::unavailable(format!("cairn: no client URL known for member {member:x}"))
            })?;
        let mut links = self.links.lock();
        let signed = self.credentials.secret().is_known();
        let current = links
            .get(&member)
            .filter(|link| link.url == *url && (link.signed || !signed));
        let pending = match current {
            Some(link) => match link.queue.send(pending) {
                Ok(()) => return Ok(()),
                // The link ended (its member's URL was unusable): make it
                // again.
                Err(mpsc::error::SendError(pending)) => pending,
            },
            None => pending,
        };
        let channel = Channel::from_shared(url.clone())
            .map_err(|e| Status::unavailable(format!("member {member:x}'s client URL: {e}")))?
            .connect_lazy();
        let (queue, queued) = mpsc::unbounded_channel();
        let _ = queue.send(pending);
        tokio::spawn(run_link(member, channel, queued, self.credentials.clone()));
        links.insert(
            member,
            Link {
                url: url.clone(),
                queue,
                signed,
            },
        );
        Ok(())
    }
}

/// A link's task: opens a stream when there is something to send, sends
/// what queues in batches, and hands each answer to its waiter. A broken
/// stream fails what it was carrying and opens again at the next request.
/// Ends when the forwarder drops the link.
async fn run_link(
    member: u64,
    channel: Channel,
    mut queued: mpsc::UnboundedReceiver<Pending>,
    credentials: Arc<MemberCredentials>,
) {
    let mut client = ForwardingClient::new(channel).max_decoding_message_size(usize::MAX);
    let mut in_flight = InFlight::default();
    while let Some(first) = queued.recv().await {
        let (batches, outbound) = mpsc::unbounded_channel();
        let _ = batches.send(in_flight.batch(first, &mut queued));
        let mut outbound = tonic::Request::new(
            tokio_stream::wrappers::UnboundedReceiverStream::new(outbound),
        );
        credentials.sign(&mut outbound, member, Call::Forward);
        let broken = match client.forward(outbound).await {
            Ok(inbound) => carry(&mut queued, batches, inbound.into_inner(), &mut in_flight).await,
            // The stream never opened: nothing reached the member, and
            // every request may go to another replica.
            Err(e) => {
                in_flight.fail(|_| e.clone());
                continue;
            }
        };
        tracing::debug!(
            member = format_args!("{member:x}"),
            "forwarding stream ended: {broken}"
        );
        in_flight.fail(|is_write| {
            if is_write {
                // It may have been applied: only the client can tell.
                error::TIMEOUT.status()
            } else {
                Status::unavailable(format!("cairn: lost member {member:x}: {broken}"))
            }
        });
    }
}

/// The requests sent on a link and not answered yet.
#[derive(Default)]
struct InFlight {
    /// Each one's waiter, and whether it is a write.
    waiting: HashMap<u64, (Reply, bool)>,
    next_id: u64,
}

impl InFlight {
    /// `first` and whatever else is queued, as one batch.
    fn batch(
        &mut self,
        first: Pending,
        queued: &mut mpsc::UnboundedReceiver<Pending>,
    ) -> ForwardedBatch {
        let mut requests = Vec::new();
        let mut next = Some(first);
        while let Some(pending) = next {
            self.next_id += 1;
            let mut request = pending.request;
            request.id = self.next_id;
            let is_write = !matches!(
                request.request,
                Some(
                    ForwardedRequest::Read(_)
                        | ForwardedRequest::History(_)
                        | ForwardedRequest::Hash(_)
                        | ForwardedRequest::Dump(_)
                )
            );
            self.waiting.insert(self.next_id, (pending.reply, is_write));
            requests.push(request);
            next = queued.try_recv().ok();
        }
        ForwardedBatch { requests }
    }

    fn answer(&mut self, answered: Answered) {
        if let Some((reply, _)) = self.waiting.remove(&answered.id) {
            let _ = reply.send(answer_of(
                answered.code,
                answered.message,
                answered.response,
            ));
        }
    }

    /// Fails every request with the status `why` gives for it (by whether
    /// it is a write).
    fn fail(&mut self, why: impl Fn(bool) -> Status) {
        for (_, (reply, is_write)) in self.waiting.drain() {
            let _ = reply.send(Err(why(is_write)));
        }
    }
}

/// Carries one stream until it breaks, or the forwarder dropped the link
/// and everything sent on it is answered; returns why it ended.
async fn carry(
    queued: &mut mpsc::UnboundedReceiver<Pending>,
    batches: mpsc::UnboundedSender<ForwardedBatch>,
    mut inbound: Streaming<AnsweredBatch>,
    in_flight: &mut InFlight,
) -> Status {
    let mut batches = Some(batches);
    loop {
        if batches.is_none() && in_flight.waiting.is_empty() {
            return Status::cancelled("the link was dropped");
        }
        tokio::select! {
            pending = queued.recv(), if batches.is_some() => {
                let (Some(pending), Some(sender)) = (pending, &batches) else {
                    // Dropped (or replaced by a signed link): the requests
                    // sent are still answered here, so that no write is
                    // failed as timed out for that.
                    batches = None;
                    continue;
                };
                if sender.send(in_flight.batch(pending, queued)).is_err() {
                    return Status::unavailable("the stream's sender ended");
                }
            }
            answers = inbound.message() => match answers {
                Ok(Some(batch)) => {
                    for answered in batch.answers {
                        in_flight.answer(answered);
                    }
                }
                Ok(None) => return Status::unavailable("the member ended the stream"),
                Err(e) => return e,
            },
        }
    }
}

/// The shards a member holds no replica of, as its watches reach them:
/// through the members holding them. Weak: the member holds its shards'
/// events, which hold this.
pub struct MemberRemote(pub Weak<Member>);

impl MemberRemote {
    /// The member, the replicas of `shard` (none here), and the members'
    /// list.
    fn route(&self, shard: ShardId) -> Result<Routed, Status> {
        let member = self
            .0
            .upgrade()
            .ok_or_else(|| Status::unavailable("cairn: the member stopped"))?;
        let replicas = match member.shards().map(|shards| shards.route(shard)) {
            Some(Route::Remote(replicas)) => replicas,
            _ => {
                return Err(Status::failed_precondition(format!(
                    "cairn: shard {shard} is held here"
                )));
            }
        };
        let members = member.peers();
        Ok(Routed {
            member,
            replicas,
            members,
        })
    }
}

/// Where a request of a shard held elsewhere goes.
struct Routed {
    member: Arc<Member>,
    replicas: Vec<u64>,
    members: Vec<PeerInfo>,
}

impl RemoteShards for MemberRemote {
    fn follow(
        &self,
        shard: ShardId,
        from: i64,
        attempt: usize,
    ) -> BoxFuture<'static, Result<BoxStream<'static, Result<ShardFeed, Status>>, Status>> {
        let route = self.route(shard);
        Box::pin(async move {
            let Routed {
                member,
                mut replicas,
                members,
            } = route?;
            replicas.retain(|r| *r != member.id);
            if !replicas.is_empty() {
                let turn = attempt % replicas.len();
                replicas.rotate_left(turn);
            }
            let mut last = Status::unavailable("cairn: the shard has no replica");
            for replica in replicas {
                let Some(url) = members
                    .iter()
                    .find(|m| m.id == replica)
                    .and_then(|m| m.client_urls.first())
                else {
                    continue;
                };
                let endpoint = match Endpoint::from_shared(url.clone()) {
                    Ok(endpoint) => endpoint
                        .connect_timeout(FOLLOW_OPEN)
                        .http2_keep_alive_interval(FOLLOW_KEEPALIVE.0)
                        .keep_alive_timeout(FOLLOW_KEEPALIVE.1)
                        .keep_alive_while_idle(true),
                    Err(e) => {
                        last = Status::unavailable(format!("member {replica:x}'s client URL: {e}"));
                        continue;
                    }
                };
                let opened = tokio::time::timeout(FOLLOW_OPEN, async {
                    let channel = endpoint
                        .connect()
                        .await
                        .map_err(|e| Status::unavailable(e.to_string()))?;
                    let mut follow = tonic::Request::new(FollowShard {
                        shard,
                        revision: from,
                    });
                    let call = Call::Follow {
                        shard,
                        revision: from,
                    };
                    member.credentials().sign(&mut follow, replica, call);
                    ForwardingClient::new(channel)
                        .max_decoding_message_size(usize::MAX)
                        .follow(follow)
                        .await
                })
                .await;
                match opened {
                    Ok(Ok(feed)) => return Ok(feed.into_inner().boxed()),
                    Ok(Err(refused)) if refused.code() == Code::PermissionDenied => {
                        return Err(refused);
                    }
                    Ok(Err(e)) => last = e,
                    Err(_) => {
                        last = Status::unavailable(format!("member {replica:x} did not answer"))
                    }
                }
            }
            Err(last)
        })
    }

    fn history(
        &self,
        read: ShardHistory,
    ) -> BoxFuture<'static, Result<ShardHistoryResponse, Status>> {
        let route = self.route(read.shard);
        Box::pin(async move {
            let Routed {
                member,
                replicas,
                members,
            } = route?;
            member.forwarder().history(&replicas, &members, read).await
        })
    }

    fn range(&self, read: ShardRange) -> BoxFuture<'static, Result<RangeResponse, Status>> {
        let route = self.route(read.shard);
        Box::pin(async move {
            let Routed {
                member,
                replicas,
                members,
            } = route?;
            member
                .forwarder()
                .read(&replicas, &members, None, read)
                .await
        })
    }
}

fn answer_of(
    code: i32,
    message: String,
    response: Option<AnsweredResponse>,
) -> Result<AnsweredResponse, Status> {
    match (Code::from_i32(code), response) {
        (Code::Ok, Some(response)) => Ok(response),
        (Code::Ok, None) => Err(Status::internal(
            "cairn: a forwarded request answered empty",
        )),
        (code, _) => Err(Status::new(code, message)),
    }
}

fn mismatched() -> Status {
    Status::internal("cairn: a forwarded request answered with another's response")
}

/// Whether the member could not be reached at all (so nothing was done):
/// the client's own Unavailable, not one the member answered with (those
/// are etcd's, "etcdserver: ...").
fn unreachable(status: &Status) -> bool {
    status.code() == Code::Unavailable && !status.message().starts_with("etcdserver:")
}
