//! One member: its identity, its store, its raft node, and what the gRPC
//! services share: proposing a write and waiting for its typed result,
//! linearizable reads, response headers, the leases, alarms and auth store
//! as applied.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cairn_api::cairnpb::CrossTxn;
use cairn_api::cairnpb::internal_request::Request;
use cairn_api::cairnpb::{
    InternalRequest, RequestHeader, SequenceRound, ShardHistory, ShardHistoryResponse, ShardRange,
};
use cairn_api::error::{self, EtcdError};
use cairn_api::etcdserverpb::alarm_request::AlarmAction;
use cairn_api::etcdserverpb::request_op::Request as Op;
use cairn_api::etcdserverpb::response_op::Response as OpResponse;
use cairn_api::etcdserverpb::{
    AlarmRequest, AlarmType, CompactionRequest, CompactionResponse, RangeRequest, RangeResponse,
    ResponseHeader,
};
use cairn_api::etcdserverpb::{RequestOp, TxnRequest, TxnResponse};
use cairn_auth::{Auth, Caller};
use cairn_consensus::{MembershipChange, Node, PeerInfo};
use cairn_lease::LeaseError;
use cairn_mvcc::{DbSize, MvccError, Store};
use cairn_shard::{ShardId, TxnId};
use cairn_shard_replica::{Attempt, ReadPoint, ShardWrite, WriteResponse};
use cairn_watch_hub::{WatchHub, WatchStream};
use futures_util::future::join_all;
use prost::Message as _;
use tonic::Status;

use crate::alarms::Alarms;
use crate::apply::{ApplyError, ApplyResult, Shared};
use crate::config::ServerConfig;
use crate::disk_space::DiskSpace;
use crate::forward::Forwarder;
use crate::leases::Leases;
use crate::member_auth::MemberCredentials;
use crate::proposal::{Answer as _, Proposal};
use crate::shard_events::KeyspaceEvents;
use crate::shards::{KvWrite, Route, Shards};
use crate::stopping::{StopSignal, Stopping};

/// How many times a cross-shard txn runs when aborted, before it fails
/// with etcd's timeout.
const CROSS_TXN_ATTEMPTS: usize = 8;

/// How often a coordinator asks again to abort a cross-shard txn while
/// the cluster group has no leader.
const ABORT_RETRY: Duration = Duration::from_millis(20);

pub struct Member {
    pub id: u64,
    /// Where this member keeps its data (`<data-dir>/member`).
    pub data_dir: PathBuf,
    pub store: Store,
    pub node: Node<ApplyResult>,
    cluster_id: u64,
    max_request_bytes: usize,
    max_txn_ops: usize,
    /// etcd's request timeout: 5 s plus two election timeouts.
    request_timeout: Duration,
    /// How long a cross-shard txn's prepare may take to commit in its
    /// shard before its coordinator aborts the txn: two election timeouts,
    /// time for the shard to elect a leader if its last one fell.
    prepare_timeout: Duration,
    leases: Leases,
    /// Takes each commit's events from the apply loop.
    hub: Arc<WatchHub>,
    /// The active alarms, as applied.
    alarms: Arc<Alarms>,
    /// Bytes of stored revisions past which writes raise NOSPACE; None for
    /// no quota.
    quota_bytes: Option<u64>,
    /// The free space kept on the data dir's disk; None when not watched.
    disk: Option<Arc<DiskSpace>>,
    /// The auth store as applied, and the tokens.
    auth: Arc<Auth>,
    /// With --shards: the shards that hold the keys; group 0 then holds
    /// none.
    shards: Option<Arc<Shards>>,
    /// With --shards: the way to the shards held on other members.
    forwarder: Forwarder,
    /// How this member signs its calls to the others, and checks theirs.
    credentials: Arc<MemberCredentials>,
    /// Where watchers read past events: the store, or the shards'.
    events: KeyspaceEvents,
    /// Ends the calls that would outlive the member once it stops.
    stopping: Stopping,
}

impl Member {
    /// Member `id` of cluster `cluster_id`, over its started node and the
    /// state its apply loop shares, limited as `config` says.
    pub fn new(
        id: u64,
        cluster_id: u64,
        data_dir: PathBuf,
        store: Store,
        node: Node<ApplyResult>,
        shared: Shared,
        config: &ServerConfig,
    ) -> Member {
        let credentials = Arc::new(MemberCredentials::new(
            id,
            cluster_id,
            shared.cluster_secret,
        ));
        Member {
            id,
            cluster_id,
            data_dir,
            node,
            max_request_bytes: config.max_request_bytes,
            max_txn_ops: config.max_txn_ops,
            request_timeout: Duration::from_secs(5) + 2 * config.election_timeout,
            prepare_timeout: 2 * config.election_timeout,
            leases: Leases::new(shared.lessor, id),
            hub: shared.hub,
            alarms: shared.alarms,
            quota_bytes: config.quota_backend_bytes,
            disk: shared.disk,
            auth: shared.auth,
            shards: None,
            events: KeyspaceEvents::Store(store.clone()),
            store,
            stopping: Stopping::default(),
            forwarder: Forwarder::new(credentials.clone()),
            credentials,
        }
    }

    /// With --shards: the shards that hold the keys, served from then on.
    pub fn with_shards(mut self, shards: Option<Arc<Shards>>) -> Member {
        if let Some(shards) = &shards {
            self.events = shards.events();
        }
        self.shards = shards;
        self
    }

    /// With --shards: this member's shard replicas.
    pub fn shards(&self) -> Option<&Arc<Shards>> {
        self.shards.as_ref()
    }

    /// With --shards: the way to the shards held on other members.
    pub(crate) fn forwarder(&self) -> &Forwarder {
        &self.forwarder
    }

    /// How this member signs its calls to the others, and checks theirs.
    pub(crate) fn credentials(&self) -> &Arc<MemberCredentials> {
        &self.credentials
    }

    /// The cluster's members as the cluster group has them.
    pub(crate) fn peers(&self) -> Vec<PeerInfo> {
        self.node.members()
    }

    /// The revision of the keyspace as this member has applied it.
    pub fn current_revision(&self) -> i64 {
        match &self.shards {
            Some(shards) => shards.revision(),
            None => self.store.current_revision(),
        }
    }

    /// The stores this member holds: the cluster group's and, with
    /// --shards, those of the shards held here.
    pub fn stores(&self) -> Vec<Store> {
        let mut stores = vec![self.store.clone()];
        if let Some(shards) = &self.shards {
            stores.extend(shards.stores());
        }
        stores
    }

    /// The bytes in use in this member's stores, for Status and the quota.
    pub fn db_in_use(&self) -> u64 {
        self.db_size().in_use
    }

    /// The disk use of every store this member holds, as /metrics and
    /// Status report it.
    pub fn db_size(&self) -> DbSize {
        self.stores().iter().map(Store::size).fold(
            DbSize {
                total: 0,
                in_use: 0,
            },
            |sum, size| DbSize {
                total: sum.total + size.total,
                in_use: sum.in_use + size.in_use,
            },
        )
    }

    pub fn auth(&self) -> &Auth {
        &self.auth
    }

    pub fn alarms(&self) -> &Alarms {
        &self.alarms
    }

    pub fn leases(&self) -> &Leases {
        &self.leases
    }

    /// A stream of watchers over this member's store and its commits.
    pub fn watch_stream(&self) -> WatchStream<KeyspaceEvents> {
        self.hub.open(self.events.clone())
    }

    pub fn max_txn_ops(&self) -> usize {
        self.max_txn_ops
    }

    pub fn max_request_bytes(&self) -> usize {
        self.max_request_bytes
    }

    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// Ends every long-lived call (watches, keep-alives, observations,
    /// lock and campaign waits) with etcd's "server stopped", now and for
    /// any that start later.
    pub fn stop_serving(&self) {
        self.stopping.stop();
    }

    /// What a long-lived call watches to end when the member stops serving.
    pub fn stop_signal(&self) -> StopSignal {
        self.stopping.signal()
    }

    pub fn is_leader(&self) -> bool {
        self.node.status().leader == self.id
    }

    /// The keyspace's compact revision as this member has applied it.
    pub fn compact_revision(&self) -> i64 {
        match &self.shards {
            Some(shards) => shards.compact_revision(),
            None => self.store.compact_revision(),
        }
    }

    /// Compacts the keyspace through the log (for `caller`, or for the
    /// member itself); with --shards the cluster group records it and
    /// then every shard drops its older revisions.
    pub async fn compact(
        &self,
        caller: Option<&Caller>,
        request: CompactionRequest,
    ) -> Result<CompactionResponse, Status> {
        let revision = request.revision;
        let response = self
            .propose_with(caller.map(Caller::header), request)
            .await?;
        if let Some(shards) = &self.shards
            && tokio::time::timeout(self.request_timeout, shards.compact(revision))
                .await
                .is_err()
        {
            tracing::warn!(
                revision,
                "compacting the shards timed out; reads below it are refused"
            );
        }
        Ok(response)
    }

    /// A header for a response at `revision`.
    pub fn header(&self, revision: i64) -> Option<ResponseHeader> {
        Some(ResponseHeader {
            cluster_id: self.cluster_id,
            member_id: self.id,
            revision,
            raft_term: self.node.term(),
        })
    }

    /// A header at the revision this member has applied.
    pub fn current_header(&self) -> Option<ResponseHeader> {
        self.header(self.current_revision())
    }

    /// Completes a header that mvcc filled with a revision.
    pub fn fill_header(&self, header: &mut Option<ResponseHeader>) {
        let revision = header
            .as_ref()
            .map_or_else(|| self.current_revision(), |h| h.revision);
        *header = self.header(revision);
    }

    /// A read of this member's store: linearizable unless the request asks
    /// for a serializable one.
    pub async fn range(&self, request: &RangeRequest) -> Result<RangeResponse, Status> {
        self.range_as(request, None).await
    }

    /// A client's read, as [`Self::range`]; with --shards, the shards held
    /// elsewhere are read on a member that holds them with the client's
    /// `token`.
    pub async fn range_as(
        &self,
        request: &RangeRequest,
        token: Option<&str>,
    ) -> Result<RangeResponse, Status> {
        if !request.serializable {
            self.linearizable_barrier().await?;
        }
        let mut response = match &self.shards {
            Some(shards) => {
                if request.revision > 0 && request.revision < shards.compact_revision() {
                    return Err(error::COMPACTED.status());
                }
                let point = shards.read_point();
                tokio::time::timeout(
                    self.request_timeout,
                    self.read_shards(shards, request, &point, token),
                )
                .await
                .map_err(|_| error::TIMEOUT.status())??
            }
            None => self.store.range(request).map_err(mvcc_status)?,
        };
        self.fill_header(&mut response.header);
        Ok(response)
    }

    /// `request` at `point`: each shard it touches read on this member if
    /// it holds the shard, else on one that does (those in parallel), and
    /// the answers merged.
    async fn read_shards(
        &self,
        shards: &Shards,
        request: &RangeRequest,
        point: &ReadPoint,
        token: Option<&str>,
    ) -> Result<RangeResponse, Status> {
        let mut answers = Vec::new();
        let mut remote = Vec::new();
        for shard in shards.shards_of_range(&request.key, &request.range_end) {
            match shards.route(shard) {
                Route::Local(_) => answers.push(
                    shards
                        .read_local(
                            shard,
                            request,
                            point.revision,
                            point.needed(shard),
                            point.revoked(shard),
                        )
                        .await
                        .map_err(mvcc_status)?
                        .unwrap_or_default(),
                ),
                Route::Remote(replicas) => remote.push((shard, replicas)),
            }
        }
        if !remote.is_empty() {
            let members = self.node.members();
            let reads = remote.into_iter().map(|(shard, replicas)| {
                let read = ShardRange {
                    shard,
                    revision: point.revision,
                    applied: point.needed(shard),
                    request: Some(request.clone()),
                    revoked: point.revoked(shard),
                };
                let members = &members;
                async move { self.forwarder.read(&replicas, members, token, read).await }
            });
            for answer in join_all(reads).await {
                answers.push(answer?);
            }
        }
        Ok(cairn_shard_replica::merge(request, point.revision, answers))
    }

    /// Proposes a write of the member's own through consensus and waits for
    /// this member to apply it: its response, with the header filled.
    pub async fn propose<P: Proposal>(&self, proposal: P) -> Result<P::Response, Status> {
        self.propose_with(None, proposal).await
    }

    /// Proposes a client's write, which the apply loop checks against the
    /// caller's permissions.
    pub async fn propose_for<P: Proposal>(
        &self,
        caller: &Caller,
        proposal: P,
    ) -> Result<P::Response, Status> {
        self.propose_with(Some(caller.header()), proposal).await
    }

    async fn propose_with<P: Proposal>(
        &self,
        header: Option<RequestHeader>,
        proposal: P,
    ) -> Result<P::Response, Status> {
        self.refuse_on_learner()?;
        let request = InternalRequest {
            request: Some(proposal.into_request()),
            header,
        };
        if request.encoded_len() > self.max_request_bytes {
            return Err(error::REQUEST_TOO_LARGE.status());
        }
        let data = request.encode_to_vec();
        let applied =
            match tokio::time::timeout(self.request_timeout, self.node.propose(data)).await {
                Err(_) => return Err(error::TIMEOUT.status()),
                Ok(Err(e)) => return Err(consensus_status(e)),
                Ok(Ok(result)) => result.map_err(apply_status)?,
            };
        let mut response = P::response(applied).map_err(|e| Status::internal(e.to_string()))?;
        if let Some(header) = response.header() {
            self.fill_header(header);
        }
        Ok(response)
    }

    /// A client's put, delete or txn: through its key's shard with
    /// --shards (permissions checked here, against the auth store as this
    /// member has it; a shard held elsewhere is written through a member
    /// that holds it, with the client's `token`), else through the log like
    /// any write.
    pub async fn write_for<W: KvWrite>(
        &self,
        caller: &Caller,
        token: Option<&str>,
        write: W,
    ) -> Result<W::Response, Status> {
        let Some(shards) = &self.shards else {
            return self.propose_for(caller, write).await;
        };
        self.refuse_on_learner()?;
        let write = write.into_shard_write();
        let request = match write.clone() {
            ShardWrite::Put(r) => Request::Put(r),
            ShardWrite::DeleteRange(r) => Request::DeleteRange(r),
            ShardWrite::Txn(r) => Request::Txn(r),
            ShardWrite::CrossTxn(r) => Request::Txn(r.txn.unwrap_or_default()),
        };
        self.auth
            .check_applied(Some(&caller.header()), &request, &|_| Vec::new())
            .map_err(|e| e.status())?;
        let participants = shards.participants(&write)?;
        if participants.len() > 1 {
            return self
                .write_across::<W>(shards, token, write, participants)
                .await;
        }
        let shard = participants.first().copied().unwrap_or(0);
        let written = async {
            match shards.route(shard) {
                Route::Local(local) => shards.write(local, write).await,
                Route::Remote(replicas) => {
                    let members = self.node.members();
                    self.forwarder
                        .write(&replicas, &members, token, write)
                        .await
                }
            }
        };
        let applied = tokio::time::timeout(self.request_timeout, written)
            .await
            .map_err(|_| error::TIMEOUT.status())??;
        let mut response = W::from_shard(applied)?;
        if let Some(header) = response.header() {
            self.fill_header(header);
        }
        Ok(response)
    }

    /// With --shards: a txn (or a delete over a key range) over keys of
    /// several shards, coordinated here: proposed to each participant's log
    /// at once, decided by the cluster group, answered from the
    /// participants' parts merged. An aborted attempt (a deadlock with
    /// another txn, or one left undecided) changed nothing and runs again,
    /// a few times, within the request timeout.
    async fn write_across<W: KvWrite>(
        &self,
        shards: &Shards,
        token: Option<&str>,
        write: ShardWrite,
        participants: Vec<ShardId>,
    ) -> Result<W::Response, Status> {
        let (txn, delete) = match write {
            ShardWrite::Txn(txn) => (txn, false),
            ShardWrite::DeleteRange(delete) => (
                TxnRequest {
                    success: vec![RequestOp {
                        request: Some(Op::RequestDeleteRange(delete)),
                    }],
                    ..Default::default()
                },
                true,
            ),
            _ => {
                return Err(Status::internal(
                    "cairn: only txns and deletes span several shards",
                ));
            }
        };
        let attempts = async {
            for attempt in 0..CROSS_TXN_ATTEMPTS {
                if let Some(response) = self
                    .cross_txn_once(shards, token, &txn, &participants, attempt)
                    .await?
                {
                    return Ok(response);
                }
            }
            Err(error::TIMEOUT.status())
        };
        let response = tokio::time::timeout(self.request_timeout, attempts)
            .await
            .map_err(|_| error::TIMEOUT.status())??;
        let applied = if delete {
            match response
                .responses
                .into_iter()
                .next()
                .and_then(|r| r.response)
            {
                Some(OpResponse::ResponseDeleteRange(r)) => WriteResponse::DeleteRange(r),
                _ => {
                    return Err(Status::internal(
                        "cairn: a delete answered without its response",
                    ));
                }
            }
        } else {
            WriteResponse::Txn(response)
        };
        let mut response = W::from_shard(applied)?;
        if let Some(header) = response.header() {
            self.fill_header(header);
        }
        Ok(response)
    }

    /// One attempt of a cross-shard txn: its merged response, or None when
    /// it was aborted (nothing of it took effect: it runs again). A
    /// participant whose prepare fails or is not committed within
    /// [`Member::prepare_timeout`] has the cluster group abort the txn at
    /// once (`cairn_shard_replica::attempt`). A prepare of a shard held
    /// elsewhere goes to one member holding it, the next one each attempt:
    /// sent on to another after a failure that may have come after the
    /// first committed it, it would sit twice in the shard's log, and the
    /// second, voted for after the txn was decided, could end aborted and
    /// have the txn run again.
    async fn cross_txn_once(
        &self,
        shards: &Shards,
        token: Option<&str>,
        txn: &TxnRequest,
        participants: &[ShardId],
        attempt: usize,
    ) -> Result<Option<TxnResponse>, Status> {
        let id = shards.next_txn_id(self.id);
        let members = self.node.members();
        let prepare = |shard: ShardId| {
            let part = CrossTxn {
                id: Some(cairn_api::cairnpb::TxnId {
                    member: id.member,
                    seq: id.seq,
                }),
                participants: participants.to_vec(),
                shards: shards.count(),
                txn: Some(txn.clone()),
                shard,
            };
            let members = &members;
            async move {
                match shards.route(shard) {
                    Route::Local(local) => shards.prepare(local, part, self.prepare_timeout).await,
                    Route::Remote(replicas) => {
                        // The member holding it bounds the prepare's
                        // commit, unless it is paused or cut off.
                        let write = ShardWrite::CrossTxn(part);
                        let one = replicas.get(attempt % replicas.len().max(1));
                        let one: Vec<u64> = one.into_iter().copied().collect();
                        let forwarded = self.forwarder.write(&one, members, token, write);
                        let stalled = shards.prepare_stalled(id, shard, self.prepare_timeout);
                        let answer = tokio::select! {
                            answer = forwarded => answer?,
                            () = stalled => return Err(error::TIMEOUT.status()),
                        };
                        match answer {
                            WriteResponse::Txn(partial) => Ok(Some(partial)),
                            WriteResponse::Aborted => Ok(None),
                            other => Err(Status::internal(format!(
                                "cairn: a shard answered a txn with {other:?}"
                            ))),
                        }
                    }
                }
            }
        };
        let abort = |id: TxnId| self.abort_cross_txn(id);
        match cairn_shard_replica::attempt(id, participants, prepare, abort).await {
            Attempt::Done(partials) => {
                let revision = partials
                    .first()
                    .and_then(|(_, p)| p.header.as_ref())
                    .map_or(0, |h| h.revision);
                Ok(Some(cairn_shard_replica::merge_txn(
                    shards.keyspace(),
                    txn,
                    &partials,
                    revision,
                )))
            }
            // A participant refused the txn (its member's auth store, say):
            // running it again would be refused again.
            Attempt::Aborted(Some(refused)) if is_refusal(&refused) => Err(refused),
            Attempt::Aborted(_) => {
                tracing::debug!(
                    seq = id.seq,
                    "a cross-shard txn was aborted; running it again"
                );
                Ok(None)
            }
            Attempt::Failed(e) => Err(e),
        }
    }

    /// Has the cluster group abort cross-shard txn `id` (a participant's
    /// prepare failed): it stays aborted, even where the prepare commits
    /// after all. Tries again while the cluster group elects a leader,
    /// within the request timeout.
    async fn abort_cross_txn(&self, id: TxnId) -> Result<(), Status> {
        let round = SequenceRound {
            batches: Vec::new(),
            votes: Vec::new(),
            aborts: vec![cairn_api::cairnpb::TxnId {
                member: id.member,
                seq: id.seq,
            }],
        };
        let aborting = async {
            loop {
                // A proposal that went to a leader that then fell is never
                // answered; an abort asked twice is one abort.
                match tokio::time::timeout(self.prepare_timeout, self.propose(round.clone())).await
                {
                    Ok(Ok(_)) => return Ok(()),
                    Ok(Err(e)) if e.message() == error::NO_LEADER.message() => {
                        tokio::time::sleep(ABORT_RETRY).await;
                    }
                    Ok(Err(e)) => return Err(e),
                    Err(_) => {}
                }
            }
        };
        tokio::time::timeout(self.request_timeout, aborting)
            .await
            .map_err(|_| error::TIMEOUT.status())?
    }

    /// With --shards: a participant's part of a cross-shard txn another
    /// member coordinates, proposed to its shard held here.
    pub async fn write_cross_part(
        &self,
        caller: &Caller,
        txn: CrossTxn,
    ) -> Result<TxnResponse, Status> {
        let shards = self.shards.as_ref().ok_or_else(|| {
            Status::failed_precondition("cairn: this member's keyspace is not sharded")
        })?;
        self.refuse_on_learner()?;
        let request = Request::Txn(txn.txn.clone().unwrap_or_default());
        self.auth
            .check_applied(Some(&caller.header()), &request, &|_| Vec::new())
            .map_err(|e| e.status())?;
        let shard = txn.shard;
        let Route::Local(local) = shards.route(shard) else {
            return Err(Status::failed_precondition(format!(
                "cairn: member {:x} holds no replica of shard {shard}",
                self.id
            )));
        };
        let prepared = shards.prepare(local, txn, self.prepare_timeout);
        tokio::time::timeout(self.request_timeout, prepared)
            .await
            .map_err(|_| error::TIMEOUT.status())??
            .ok_or_else(|| Status::aborted(crate::forward::TXN_ABORTED))
    }

    /// With --shards: `read` of a shard this member holds, for another
    /// member; `None` if it holds no replica of it.
    pub async fn read_held_shard(&self, read: &ShardRange) -> Result<RangeResponse, Status> {
        let shards = self.shards.as_ref().ok_or_else(|| {
            Status::failed_precondition("cairn: this member's keyspace is not sharded")
        })?;
        let request = read.request.clone().unwrap_or_default();
        let answer = tokio::time::timeout(
            self.request_timeout,
            shards.read_local(
                read.shard,
                &request,
                read.revision,
                read.applied,
                read.revoked,
            ),
        )
        .await
        .map_err(|_| error::TIMEOUT.status())?
        .map_err(mvcc_status)?;
        answer.ok_or_else(|| {
            Status::failed_precondition(format!(
                "cairn: member {:x} holds no replica of shard {}",
                self.id, read.shard
            ))
        })
    }

    /// With --shards: a watcher's catch-up `read` of a shard this member
    /// holds, for another member.
    pub async fn history_held_shard(
        &self,
        read: &ShardHistory,
    ) -> Result<ShardHistoryResponse, Status> {
        let handle = match self.shards.as_ref().map(|shards| shards.route(read.shard)) {
            Some(Route::Local(local)) => local.handle.clone(),
            _ => {
                return Err(Status::failed_precondition(format!(
                    "cairn: member {:x} holds no replica of shard {}",
                    self.id, read.shard
                )));
            }
        };
        tokio::time::timeout(
            self.request_timeout,
            handle.wait_applied(read.applied, read.revoked),
        )
        .await
        .map_err(|_| error::TIMEOUT.status())?;
        let store = handle.store();
        let read = read.clone();
        let (events, next) = tokio::task::spawn_blocking(move || {
            store.events_since(&read.key, &read.range_end, read.from, read.limit as usize)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(mvcc_status)?;
        Ok(ShardHistoryResponse { events, next })
    }

    pub async fn change_membership(
        &self,
        change: MembershipChange,
    ) -> Result<Vec<PeerInfo>, Status> {
        self.refuse_on_learner()?;
        let change = self.node.change_membership(change);
        tokio::time::timeout(self.request_timeout, change)
            .await
            .map_err(|_| error::TIMEOUT.status())?
            .map_err(consensus_status)
    }

    /// etcd's quota check before proposing a write that adds `cost` bytes:
    /// past the quota, or with the data dir's disk below its reserve,
    /// raises this member's NOSPACE alarm through the log and refuses the
    /// write. While any member's NOSPACE alarm is active such writes are
    /// refused here, as every applier would refuse them, so that they add
    /// nothing to a full disk's raft log. The quota bounds the bytes of the
    /// revisions still stored (what a defragmented etcd db holds), not the
    /// files: the LSM tree reclaims what compaction dropped on its own
    /// schedule, and the journal is preallocated.
    pub async fn check_quota(&self, cost: usize) -> Result<(), Status> {
        // Writes that add nothing (deletes, reads) make room or need none.
        if cost == 0 {
            return Ok(());
        }
        if self.alarms.is_active(AlarmType::Nospace) {
            return Err(error::NO_SPACE.status());
        }
        if let Some(disk) = self.disk.as_ref().filter(|d| d.below_reserve()) {
            disk.note_raised();
            self.raise_nospace().await;
            return Err(error::NO_SPACE.status());
        }
        let Some(quota) = self.quota_bytes else {
            return Ok(());
        };
        // Measuring the files is dear; the uncompressed bytes bound what
        // they hold and decide every write well under the quota.
        let cost = cost as u64;
        let stored: u64 = self.stores().iter().map(Store::stored_bytes).sum();
        if stored + cost <= quota {
            return Ok(());
        }
        if self.db_in_use() + cost <= quota {
            return Ok(());
        }
        self.raise_nospace().await;
        Err(error::NO_SPACE.status())
    }

    /// Raises this member's NOSPACE alarm through the log, unless it is
    /// active already.
    pub async fn raise_nospace(&self) {
        if self.alarms.is_active_for(self.id, AlarmType::Nospace) {
            return;
        }
        if let Err(e) = self.propose(self.nospace(AlarmAction::Activate)).await {
            tracing::warn!("could not raise the NOSPACE alarm: {}", e.message());
        }
    }

    /// Clears this member's NOSPACE alarm through the log; whether it did.
    pub async fn clear_nospace(&self) -> bool {
        match self.propose(self.nospace(AlarmAction::Deactivate)).await {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!("could not clear the NOSPACE alarm: {}", e.message());
                false
            }
        }
    }

    fn nospace(&self, action: AlarmAction) -> AlarmRequest {
        AlarmRequest {
            action: action as i32,
            member_id: self.id,
            alarm: AlarmType::Nospace as i32,
        }
    }

    /// etcd's learners serve serializable reads and status only.
    pub fn refuse_on_learner(&self) -> Result<(), Status> {
        if self.node.is_learner() {
            return Err(error::NOT_SUPPORTED_FOR_LEARNER.status());
        }
        Ok(())
    }

    /// Waits until this member has applied everything committed before now.
    pub async fn linearizable_barrier(&self) -> Result<(), Status> {
        self.refuse_on_learner()?;
        match tokio::time::timeout(self.request_timeout, self.node.read_index()).await {
            Err(_) => Err(error::TIMEOUT.status()),
            Ok(Err(e)) => Err(consensus_status(e)),
            Ok(Ok(_)) => Ok(()),
        }
    }
}

/// Whether `status` refuses a request as such (its permissions, its
/// form), so that running it again would be refused again.
fn is_refusal(status: &Status) -> bool {
    use tonic::Code;
    matches!(
        status.code(),
        Code::PermissionDenied
            | Code::Unauthenticated
            | Code::InvalidArgument
            | Code::FailedPrecondition
            | Code::Unimplemented
            | Code::ResourceExhausted
            | Code::OutOfRange
    )
}

pub fn consensus_status(e: cairn_consensus::Error) -> Status {
    use cairn_consensus::Error as E;
    let etcd = match e {
        E::NoLeader => error::NO_LEADER,
        E::Stopped => error::STOPPED,
        E::MemberNotFound => error::MEMBER_NOT_FOUND,
        E::MemberExists => error::MEMBER_EXIST,
        E::PeerUrlExists => error::PEER_URL_EXIST,
        E::MemberNotLearner => error::MEMBER_NOT_LEARNER,
        E::LearnerNotReady => error::LEARNER_NOT_READY,
        E::TooManyLearners => error::TOO_MANY_LEARNERS,
        E::NotLeader => error::NOT_LEADER,
        E::BadLeaderTransferee => error::BAD_LEADER_TRANSFEREE,
        E::LeaderTransferTimeout => {
            return Status::unavailable(
                "etcdserver: request timed out, leader transfer took too long",
            );
        }
        other => return Status::internal(other.to_string()),
    };
    etcd.status()
}

pub fn apply_status(e: ApplyError) -> Status {
    match e {
        ApplyError::Mvcc(e) => mvcc_status(e),
        ApplyError::Lease(e) => lease_error(e).status(),
        ApplyError::Auth(e) => e.status(),
        ApplyError::Alarm(e) => e.status(),
    }
}

pub fn lease_error(e: LeaseError) -> EtcdError {
    match e {
        LeaseError::NotFound => error::LEASE_NOT_FOUND,
        LeaseError::Exists => error::LEASE_EXIST,
        LeaseError::TtlTooLarge => error::LEASE_TTL_TOO_LARGE,
    }
}

pub fn mvcc_status(e: MvccError) -> Status {
    let etcd: EtcdError = match e {
        MvccError::Compacted => error::COMPACTED,
        MvccError::FutureRevision => error::FUTURE_REV,
        MvccError::KeyNotFound => error::KEY_NOT_FOUND,
        MvccError::LeaseNotFound => error::LEASE_NOT_FOUND,
        // The member stops on it (see `damage`): Unavailable sends the
        // client's retry to another member.
        damaged @ MvccError::Damaged(_) => {
            return Status::unavailable(format!("etcdserver: {damaged}; the member is stopping"));
        }
        other => return Status::internal(other.to_string()),
    };
    etcd.status()
}
