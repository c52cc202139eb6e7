//! With `--shards N` (N > 1): this member's replicas of the keyspace's
//! shards, each its own raft group, and the sequencing agent that gives
//! their writes revisions through the cluster group (docs/sharding.md).
//! Each shard's replicas are on `--shard-replicas` members, placed when the
//! cluster is created; a member reads and writes the shards it does not
//! hold through a member that does.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cairn_api::cairnpb::CrossTxn;
use cairn_api::cairnpb::{self, SequenceRound};
use cairn_api::error;
use cairn_api::etcdserverpb::request_op::Request as Op;
use cairn_api::etcdserverpb::{
    Compare, DeleteRangeRequest, PutRequest, RangeRequest, RangeResponse, TxnRequest, TxnResponse,
};
use cairn_consensus::{GroupId, Node, NodeConfig, PeerNetwork, SharedRaftLog};
use cairn_mvcc::{MvccError, Store};
use cairn_shard::{BatchReady, Keyspace, Sequencer, ShardId, ShardMap, TxnId, TxnVote};
use cairn_shard_replica::{
    Agent, LocalShard, ReadPoint, ShardHandle, ShardWrite, Staged, WriteError, WriteResponse,
};
use parking_lot::Mutex;
use tokio::task::JoinHandle;
use tonic::Status;

use crate::member::Member;
use crate::proposal::Proposal;
use crate::shard_events::{KeyspaceEvents, ShardEvents};
use cairn_watch_hub::WatchHub;

/// The file in the member dir that records the shard count it was
/// created with.
const SHARDS_FILE: &str = "shard-count";

/// The file in the member dir that records where each shard's replicas
/// are (JSON), made when the cluster is created.
const PLACEMENT_FILE: &str = "shard-map";

/// How often a write or a starting member looks for a shard's new leader.
const LEADER_POLL: Duration = Duration::from_millis(10);

/// How long the agent waits for a shard to tell of work before it looks
/// anyway (a leadership moved here).
const AGENT_IDLE: Duration = Duration::from_millis(50);

/// How often a coordinator looks whether a forwarded prepare stalls.
const STALL_POLL: Duration = Duration::from_millis(50);

/// How long a cross-shard txn may stay undecided before the cluster
/// group's leader aborts it: its coordinator died before proposing it to
/// every participant (the others hold their keys until then). A live
/// coordinator whose prepare failed or did not commit aborts it itself,
/// within two election timeouts; the cluster group cannot tell a dead
/// coordinator from a shard slow to vote (one electing a leader), whose
/// txn an abort would only make run again.
const TXN_ABANDONED: Duration = Duration::from_secs(5);

/// Why the shards could not start.
#[derive(Debug, thiserror::Error)]
pub enum ShardsError {
    #[error("--shards {asked}: this data dir was created with --shards {recorded}, which is fixed")]
    Changed { asked: u32, recorded: u32 },
    #[error("{} is corrupt", .0.display())]
    Corrupt(PathBuf),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("opening shard {shard}'s store")]
    Store {
        shard: ShardId,
        #[source]
        source: MvccError,
    },
    #[error("placing the shards: {0}")]
    Placement(#[from] cairn_shard::ShardError),
    #[error("starting shard {shard}'s raft group")]
    Raft {
        shard: ShardId,
        #[source]
        source: cairn_consensus::Error,
    },
}

/// The shard count of the data in `member_dir`: recorded at its creation
/// (a data dir from before the flag holds one shard), fixed after.
/// `existing` says whether the member dir held a member before this start.
pub fn recorded_count(member_dir: &Path, asked: u32, existing: bool) -> Result<u32, ShardsError> {
    let file = member_dir.join(SHARDS_FILE);
    let recorded = match std::fs::read_to_string(&file) {
        Ok(text) => text
            .trim()
            .parse()
            .map_err(|_| ShardsError::Corrupt(file.clone()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && existing => 1,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            write_durably(&file, format!("{asked}\n").as_bytes())?;
            asked
        }
        Err(source) => {
            return Err(ShardsError::Io {
                context: format!("reading {}", file.display()),
                source,
            });
        }
    };
    if recorded != asked {
        return Err(ShardsError::Changed { asked, recorded });
    }
    Ok(recorded)
}

/// Where the shards' replicas are: read from `member_dir`, or, for a new
/// cluster (`members` are its initial members' IDs), placed with
/// `replicas` replicas each and recorded. `None` for a data dir sharded
/// before placement existed, whose members hold every shard.
pub fn placement(
    member_dir: &Path,
    shards: u32,
    replicas: usize,
    members: &[u64],
) -> Result<Option<ShardMap>, ShardsError> {
    let file = member_dir.join(PLACEMENT_FILE);
    match std::fs::read(&file) {
        Ok(bytes) => {
            let map: ShardMap =
                serde_json::from_slice(&bytes).map_err(|_| ShardsError::Corrupt(file.clone()))?;
            if map.shard_count() != shards {
                return Err(ShardsError::Corrupt(file));
            }
            return Ok(Some(map));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(ShardsError::Io {
                context: format!("reading {}", file.display()),
                source,
            });
        }
    }
    if member_dir.join("shards").exists() {
        return Ok(None);
    }
    let map = ShardMap::place(shards, replicas, members)?;
    let json = serde_json::to_vec_pretty(&map).map_err(|e| ShardsError::Io {
        context: "encoding the shard map".into(),
        source: std::io::Error::other(e),
    })?;
    write_durably(&file, &json)?;
    Ok(Some(map))
}

/// Writes `bytes` to `file` whole or not at all: a temporary file, synced,
/// then renamed over it, and the rename synced into the directory (until
/// then a power loss may take it back).
fn write_durably(file: &Path, bytes: &[u8]) -> Result<(), ShardsError> {
    let tmp = file.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        std::fs::write(&tmp, bytes)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, file)?;
        let dir = file.parent().filter(|d| !d.as_os_str().is_empty());
        std::fs::File::open(dir.unwrap_or(Path::new(".")))?.sync_all()
    };
    write().map_err(|source| ShardsError::Io {
        context: format!("writing {}", file.display()),
        source,
    })
}

/// This member's replicas of the shards it holds, and where the others are.
pub struct Shards {
    keyspace: Keyspace,
    /// Where every shard's replicas are; `None`: every member holds every
    /// shard.
    map: Option<ShardMap>,
    /// By shard ID; `None` for the shards held on other members.
    local: Vec<Option<LocalShard>>,
    /// The cluster group's sequencer as this member applied it.
    sequencer: Arc<Mutex<Sequencer>>,
    /// The sequencer's revision each time the cluster group applies a round.
    sequenced: tokio::sync::watch::Sender<i64>,
    /// Their events, in the keyspace's revision order.
    events: Arc<ShardEvents>,
    /// The sequencing agent, and the task that publishes the events the
    /// cluster group's rounds release.
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// The next cross-shard txn's number on this member (from the clock at
    /// start, so that a restarted member takes no ID it used before).
    next_txn: std::sync::atomic::AtomicU64,
}

/// Where a write or a read of one shard goes.
pub enum Route<'a> {
    /// A replica on this member.
    Local(&'a LocalShard),
    /// Members holding a replica, the preferred leader first.
    Remote(Vec<u64>),
}

impl Shards {
    /// Opens the store of each shard `map` places on `member` under `dir`
    /// and starts its raft group (group = shard + 1) on `network` and
    /// `log`, configured as `group_config` says for the group and its
    /// snapshot dir, with the shard's replicas as its initial members.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        dir: &Path,
        member: u64,
        map: Option<ShardMap>,
        sequencer: Arc<Mutex<Sequencer>>,
        sequenced: tokio::sync::watch::Sender<i64>,
        group_config: impl Fn(GroupId, PathBuf) -> NodeConfig,
        network: &PeerNetwork,
        log: &SharedRaftLog,
        hub: Arc<WatchHub>,
    ) -> Result<Shards, ShardsError> {
        let keyspace = Keyspace::new(sequencer.lock().shards()).map_err(|e| ShardsError::Io {
            context: "the sequencer's shard count".into(),
            source: std::io::Error::other(e),
        })?;
        let shard_dir = |shard: ShardId| dir.join(format!("s{shard}"));
        let replicas = |shard: ShardId| {
            map.as_ref()
                .and_then(|map| map.shard(shard))
                .map(|placed| placed.replicas.clone())
        };
        let mut handles = Vec::new();
        for shard in 0..keyspace.shards() {
            if replicas(shard).is_some_and(|replicas| !replicas.contains(&member)) {
                handles.push(None);
                continue;
            }
            let store = Store::open(&shard_dir(shard).join("kv"))
                .map_err(|source| ShardsError::Store { shard, source })?;
            handles.push(Some(ShardHandle::new(shard, store)));
        }
        // Before any shard applies a batch: the merge starts from what the
        // stores hold.
        let applied: Vec<u64> = handles
            .iter()
            .map(|h| h.as_ref().map_or(0, |h| h.applied_index()))
            .collect();
        let events = Arc::new(ShardEvents::new(
            keyspace,
            handles
                .iter()
                .map(|h| h.as_ref().map(|h| h.store()))
                .collect(),
            &applied,
            sequencer.clone(),
            hub,
        ));
        let mut local = Vec::new();
        for (shard, handle) in (0..).zip(handles) {
            let Some(handle) = handle else {
                local.push(None);
                continue;
            };
            handle.send_events_to(events.clone());
            let mut config = group_config(GroupId::from(shard) + 1, shard_dir(shard));
            if let Some(replicas) = replicas(shard) {
                config.initial_members.retain(|m| replicas.contains(&m.id));
            }
            let node = Node::start_in(config, handle.machine(), network, log)
                .map_err(|source| ShardsError::Raft { shard, source })?;
            local.push(Some(LocalShard { handle, node }));
        }
        let follow = events.follow(sequenced.subscribe());
        Ok(Shards {
            keyspace,
            map,
            local,
            sequencer,
            sequenced,
            events,
            tasks: Mutex::new(vec![follow]),
            next_txn: std::sync::atomic::AtomicU64::new(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64),
            ),
        })
    }

    /// The shards this member holds a replica of, with it.
    pub fn held(&self) -> impl Iterator<Item = (ShardId, &LocalShard)> {
        (0..)
            .zip(&self.local)
            .filter_map(|(shard, local)| local.as_ref().map(|local| (shard, local)))
    }

    /// The stores of the shards this member holds.
    pub fn stores(&self) -> impl Iterator<Item = Store> + '_ {
        self.held().map(|(_, local)| local.handle.store())
    }

    pub fn count(&self) -> u32 {
        self.keyspace.shards()
    }

    /// Where each shard's replicas are; `None` for a data dir sharded
    /// before placement, whose members hold every shard.
    pub fn map(&self) -> Option<&ShardMap> {
        self.map.as_ref()
    }

    /// Starts the sequencing agent, which proposes its rounds through
    /// `member`'s cluster group and looks leases up in its lessor.
    pub fn start_agent(&self, member: Arc<Member>) {
        let lessor = member.clone();
        let agent = Agent::new(
            member.id,
            self.held().map(|(_, local)| local.clone()).collect(),
            self.sequencer.clone(),
            Arc::new(move |id| lessor.leases().exists(id)),
            AGENT_IDLE,
            member.request_timeout(),
        );
        // A revoke or a txn decision the cluster group applied is for the
        // shards' leaders to announce at once: wake the agent.
        let waker = agent.waker();
        let sequencer = self.sequencer.clone();
        let mut sequenced = self.sequenced.subscribe();
        let revokes = tokio::spawn(async move {
            while sequenced.changed().await.is_ok() {
                let sequencer = sequencer.lock();
                if sequencer.revokes_pending() || sequencer.decisions_pending() {
                    waker.notify_one();
                }
            }
        });
        self.tasks.lock().push(revokes);
        let abandoned = tokio::spawn(abort_abandoned(member.clone(), self.sequencer.clone()));
        self.tasks.lock().push(abandoned);
        let task = tokio::spawn(
            agent.run(move |round: Vec<BatchReady>, votes: Vec<TxnVote>| {
                let member = member.clone();
                async move {
                    let batches = round
                        .into_iter()
                        .map(|b| cairnpb::BatchReady {
                            shard: b.shard,
                            after: b.after,
                            through: b.through,
                            revisions: b.revisions,
                            leases: b.leases,
                            missing: b.missing,
                            attach: b
                                .attach
                                .into_iter()
                                .map(|(key, lease)| cairnpb::KeyLease {
                                    key: key.into(),
                                    lease,
                                })
                                .collect(),
                            revoked: b.revoked,
                        })
                        .collect();
                    let votes = votes.into_iter().map(vote_message).collect();
                    member
                        .propose(SequenceRound {
                            batches,
                            votes,
                            aborts: Vec::new(),
                        })
                        .await
                        .map_err(|e| e.message().to_string())
                }
            }),
        );
        self.tasks.lock().push(task);
    }

    /// Stops the agent and every shard's raft group (blocking).
    pub fn shutdown(&self) {
        for task in self.tasks.lock().drain(..) {
            task.abort();
        }
        for (_, shard) in self.held() {
            shard.node.shutdown();
        }
    }

    /// Where `shard`'s replicas are to be reached from this member.
    pub fn route(&self, shard: ShardId) -> Route<'_> {
        if let Some(Some(local)) = self.local.get(shard as usize) {
            return Route::Local(local);
        }
        let placed = self.map.as_ref().and_then(|map| map.shard(shard));
        let mut members = placed.map_or_else(Vec::new, |p| p.replicas.clone());
        if let Some(leader) = placed.map(|p| p.leader) {
            members.sort_by_key(|m| *m != leader);
        }
        Route::Remote(members)
    }

    /// Whether a watch here over the keys in [key, range_end) sees all of
    /// their events: each of their shards is held here or followed.
    pub fn watchable(&self, key: &[u8], range_end: &[u8]) -> bool {
        self.events.covers(key, range_end)
    }

    /// Follows the shards held elsewhere, for this member's watches,
    /// through the members holding them.
    pub fn start_feeds(&self, member: &Arc<Member>) {
        let remote = Arc::new(crate::forward::MemberRemote(Arc::downgrade(member)));
        let feeds = self.events.follow_remote(remote);
        self.tasks.lock().extend(feeds);
    }

    /// The shards the keys in [key, range_end) belong to.
    pub fn shards_of_range(&self, key: &[u8], range_end: &[u8]) -> Vec<ShardId> {
        self.keyspace.shards_of_range(key, range_end).collect()
    }

    /// Waits until this member's cluster group has applied the sequencer
    /// through `revision`: then its read points cover that revision.
    pub async fn wait_sequenced(&self, revision: i64) {
        let mut sequenced = self.sequenced.subscribe();
        // The sender lives as long as `self`.
        let _ = sequenced.wait_for(|r| *r >= revision).await;
    }

    /// Moves each shard's leadership to its preferred leader when this
    /// member is that and a replica of it leads elsewhere, as the
    /// placement spreads leaders evenly; a starting cluster's elections
    /// pick leaders at random.
    pub async fn take_preferred_leaderships(&self, member: u64) {
        let Some(map) = &self.map else {
            return;
        };
        for (shard, local) in (0..).zip(&self.local) {
            let Some(local) = local else {
                continue;
            };
            let preferred = map.shard(shard).map(|p| p.leader);
            let leader = local.node.status().leader;
            if preferred == Some(member)
                && leader != 0
                && leader != member
                && let Err(e) = local.node.transfer_leader(member).await
            {
                tracing::debug!(shard, "taking the shard's leadership: {e}");
            }
        }
    }

    /// Where watchers read the shards' past events.
    pub fn events(&self) -> KeyspaceEvents {
        KeyspaceEvents::Shards(self.events.clone())
    }

    /// The keyspace's compact revision as the cluster group recorded it.
    pub fn compact_revision(&self) -> i64 {
        self.sequencer.lock().compacted()
    }

    /// Has every shard drop its revisions older than `revision` (the
    /// cluster group recorded the compaction), waiting for each.
    pub async fn compact(&self, revision: i64) {
        let mut compacting = tokio::task::JoinSet::new();
        for (_, shard) in self.held() {
            let node = shard.node.clone();
            compacting.spawn(async move {
                while let Err(e) = cairn_shard_replica::compact(&node, revision).await {
                    if !matches!(e, cairn_consensus::Error::NoLeader) {
                        tracing::warn!(revision, "compacting a shard: {e}");
                        return;
                    }
                    tokio::time::sleep(LEADER_POLL).await;
                }
            });
        }
        compacting.join_all().await;
    }

    /// The revision of the whole keyspace as this member knows it.
    pub fn revision(&self) -> i64 {
        self.sequencer.lock().revision()
    }

    /// A read point at the sequencer's revision as this member applied it:
    /// after a barrier on the cluster group it covers every write
    /// acknowledged before the barrier.
    pub fn read_point(&self) -> ReadPoint {
        ReadPoint::latest(&self.sequencer.lock(), self.keyspace.shards())
    }

    /// `shard`'s part of `request` at `revision`, from this member's
    /// replica once it has applied the shard's log through `needed` and the
    /// revoke at `revoked`.
    pub async fn read_local(
        &self,
        shard: ShardId,
        request: &RangeRequest,
        revision: i64,
        needed: u64,
        revoked: i64,
    ) -> Result<Option<RangeResponse>, MvccError> {
        let Some(Some(local)) = self.local.get(shard as usize) else {
            return Ok(None);
        };
        cairn_shard_replica::read_shard(&local.handle, request, revision, needed, revoked)
            .await
            .map(Some)
    }

    /// The shards `write` touches: one, or for a delete over a key range or
    /// a txn over keys of several shards, each it may touch. A txn with
    /// nested txns must stay in one shard.
    pub fn participants(&self, write: &ShardWrite) -> Result<Vec<ShardId>, Status> {
        let mut touched = Touched::default();
        let one = match write {
            ShardWrite::Put(put) => touched.put(&self.keyspace, put),
            ShardWrite::DeleteRange(delete) => {
                touched.range(&self.keyspace, &delete.key, &delete.range_end)
            }
            ShardWrite::Txn(txn) => touched.txn(&self.keyspace, txn),
            ShardWrite::CrossTxn(txn) => return Ok(txn.participants.clone()),
        };
        match (one, write) {
            // A txn that names no key (no compares, no operations) changes
            // nothing: any shard answers it.
            (Ok(()), _) => Ok(vec![touched.0.unwrap_or(0)]),
            (Err(_), ShardWrite::DeleteRange(delete)) => {
                Ok(self.shards_of_range(&delete.key, &delete.range_end))
            }
            (Err(_), ShardWrite::Txn(txn)) => {
                cairn_shard_replica::participants(&self.keyspace, txn)
                    .map_err(|e| Status::unimplemented(e.to_string()))
            }
            (Err(e), _) => Err(e),
        }
    }

    pub fn keyspace(&self) -> &Keyspace {
        &self.keyspace
    }

    /// A new cross-shard txn's ID, unique to this member.
    pub fn next_txn_id(&self, member: u64) -> TxnId {
        TxnId {
            member,
            seq: self
                .next_txn
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// Proposes `write` to `local`, its shard's replica here, and waits
    /// until it is applied here. While the shard elects a leader the write
    /// waits, as etcd's proposals do; the caller bounds the wait.
    pub async fn write(
        &self,
        local: &LocalShard,
        write: ShardWrite,
    ) -> Result<WriteResponse, Status> {
        let staged = stage(local, write).await?;
        outcome(staged).await
    }

    /// Proposes a cross-shard txn's prepare to `local`, its shard's replica
    /// here: this shard's part of it, or None when the txn was aborted.
    /// Fails with etcd's timeout when the prepare is not committed and
    /// staged here within `stage_timeout` (lost with the shard's leader, as
    /// like as not): its coordinator then aborts the txn rather than leave
    /// the participants that voted waiting. The caller bounds the wait for
    /// the decision.
    pub async fn prepare(
        &self,
        local: &LocalShard,
        txn: CrossTxn,
        stage_timeout: Duration,
    ) -> Result<Option<TxnResponse>, Status> {
        let staged = tokio::time::timeout(stage_timeout, stage(local, ShardWrite::CrossTxn(txn)))
            .await
            .map_err(|_| error::TIMEOUT.status())??;
        match outcome(staged).await? {
            WriteResponse::Txn(part) => Ok(Some(part)),
            WriteResponse::Aborted => Ok(None),
            other => Err(Status::internal(format!(
                "cairn: a shard answered a txn with {other:?}"
            ))),
        }
    }

    /// Resolves once cross-shard txn `id` has waited on `shard` for
    /// `patience`: another participant voted for it, and `shard` voted for
    /// no txn. Its prepare there is likely lost (the member it was
    /// forwarded to paused, or the shard's leader killed before committing
    /// it); a shard blocked on another txn is not.
    pub async fn prepare_stalled(&self, id: TxnId, shard: ShardId, patience: Duration) {
        let mut since = None;
        let mut tick = tokio::time::interval(STALL_POLL);
        loop {
            tick.tick().await;
            let stalled = {
                let sequencer = self.sequencer.lock();
                sequencer.voted(shard).is_none() && sequencer.undecided().contains(&id)
            };
            let now = tokio::time::Instant::now();
            match (stalled, since) {
                (false, _) => since = None,
                (true, None) => since = Some(now),
                (true, Some(at)) if now.duration_since(at) >= patience => return,
                (true, Some(_)) => {}
            }
        }
    }

    /// Waits until every shard has a leader, at most `timeout`: a new
    /// cluster's shards elect theirs after the cluster group, and a member
    /// that says it is ready should take writes. Whether they all do.
    pub async fn wait_for_leaders(&self, timeout: Duration) -> bool {
        let all_led = || self.held().all(|(_, s)| s.node.status().leader != 0);
        tokio::time::timeout(timeout, async {
            while !all_led() {
                tokio::time::sleep(LEADER_POLL).await;
            }
        })
        .await
        .is_ok()
    }
}

/// Proposes `write` to `local`'s log until it is committed and staged
/// there; while the shard elects a leader it waits.
async fn stage(local: &LocalShard, write: ShardWrite) -> Result<Staged, Status> {
    loop {
        return match cairn_shard_replica::stage(&local.node, write.clone()).await {
            Ok(staged) => Ok(staged),
            // Dropped before the log took it: nothing to undo.
            Err(WriteError::Consensus(cairn_consensus::Error::NoLeader)) => {
                tokio::time::sleep(LEADER_POLL).await;
                continue;
            }
            Err(WriteError::Consensus(e)) => Err(crate::member::consensus_status(e)),
            Err(e) => Err(Status::unavailable(e.to_string())),
        };
    }
}

/// A staged write's outcome, once the shard applied it.
async fn outcome(staged: Staged) -> Result<WriteResponse, Status> {
    match staged.outcome().await {
        Ok(Ok(response)) => Ok(response),
        Ok(Err(e)) => Err(crate::member::mvcc_status(e)),
        Err(e) => Err(Status::unavailable(e.to_string())),
    }
}

/// A vote as a sequencing round carries it.
fn vote_message(vote: TxnVote) -> cairnpb::TxnVote {
    let attach = |keys: Vec<(Vec<u8>, i64)>| {
        keys.into_iter()
            .map(|(key, lease)| cairnpb::KeyLease {
                key: key.into(),
                lease,
            })
            .collect()
    };
    cairnpb::TxnVote {
        shard: vote.shard,
        index: vote.index,
        after: vote.after,
        revoked: vote.revoked,
        id: Some(cairnpb::TxnId {
            member: vote.id.member,
            seq: vote.id.seq,
        }),
        participants: vote.participants,
        compares: vote
            .compares
            .into_iter()
            .map(|c| cairnpb::CompareVote {
                found: c.found,
                holds: c.holds,
            })
            .collect(),
        changes_success: vote.changes_success,
        changes_failure: vote.changes_failure,
        fails_success: vote.fails_success,
        fails_failure: vote.fails_failure,
        leases: vote.leases,
        missing: vote.missing,
        attach_success: attach(vote.attach_success),
        attach_failure: attach(vote.attach_failure),
    }
}

/// On the cluster group's leader: aborts the cross-shard txns that stayed
/// undecided longer than [`TXN_ABANDONED`] (as this member has seen them).
async fn abort_abandoned(member: Arc<Member>, sequencer: Arc<Mutex<Sequencer>>) {
    let mut seen: std::collections::HashMap<TxnId, std::time::Instant> = Default::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let undecided = sequencer.lock().undecided();
        let now = std::time::Instant::now();
        seen.retain(|id, _| undecided.contains(id));
        for id in &undecided {
            seen.entry(*id).or_insert(now);
        }
        if !member.is_leader() {
            continue;
        }
        let aborts: Vec<cairnpb::TxnId> = seen
            .iter()
            .filter(|(_, since)| now.duration_since(**since) > TXN_ABANDONED)
            .map(|(id, _)| cairnpb::TxnId {
                member: id.member,
                seq: id.seq,
            })
            .collect();
        if aborts.is_empty() {
            continue;
        }
        tracing::info!(
            count = aborts.len(),
            "aborting cross-shard txns left undecided"
        );
        let round = SequenceRound {
            batches: Vec::new(),
            votes: Vec::new(),
            aborts,
        };
        if let Err(e) = member.propose(round).await {
            tracing::debug!("aborting undecided txns: {}", e.message());
        }
    }
}

/// The shard a write has touched so far.
#[derive(Default)]
struct Touched(Option<ShardId>);

impl Touched {
    fn range(&mut self, keyspace: &Keyspace, key: &[u8], range_end: &[u8]) -> Result<(), Status> {
        for shard in keyspace.shards_of_range(key, range_end) {
            match self.0 {
                Some(seen) if seen != shard => {
                    return Err(Status::unimplemented(
                        "cairn: a write over keys of several shards is not supported with --shards yet",
                    ));
                }
                _ => self.0 = Some(shard),
            }
        }
        Ok(())
    }

    fn put(&mut self, keyspace: &Keyspace, put: &PutRequest) -> Result<(), Status> {
        self.range(keyspace, &put.key, &[])
    }

    fn txn(&mut self, keyspace: &Keyspace, txn: &TxnRequest) -> Result<(), Status> {
        for Compare { key, range_end, .. } in &txn.compare {
            self.range(keyspace, key, range_end)?;
        }
        for op in txn.success.iter().chain(&txn.failure) {
            match &op.request {
                Some(Op::RequestRange(r)) => self.range(keyspace, &r.key, &r.range_end)?,
                Some(Op::RequestPut(r)) => self.put(keyspace, r)?,
                Some(Op::RequestDeleteRange(r)) => self.range(keyspace, &r.key, &r.range_end)?,
                Some(Op::RequestTxn(nested)) => self.txn(keyspace, nested)?,
                None => {}
            }
        }
        Ok(())
    }
}

/// A KV write, as a shard carries it and as its service answers it.
pub trait KvWrite: Proposal {
    fn into_shard_write(self) -> ShardWrite;

    fn from_shard(applied: WriteResponse) -> Result<Self::Response, Status>;
}

macro_rules! kv_writes {
    ($($kind:ident: $request:ty,)*) => {
        $(impl KvWrite for $request {
            fn into_shard_write(self) -> ShardWrite {
                ShardWrite::$kind(self)
            }

            fn from_shard(applied: WriteResponse) -> Result<Self::Response, Status> {
                match applied {
                    WriteResponse::$kind(response) => Ok(response),
                    other => Err(Status::internal(format!(
                        "a shard answered another kind of write: {other:?}"
                    ))),
                }
            }
        })*
    };
}

kv_writes! {
    Put: PutRequest,
    DeleteRange: DeleteRangeRequest,
    Txn: TxnRequest,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shard_count_is_fixed_when_the_data_dir_is_created() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        assert_eq!(recorded_count(dir.path(), 8, false)?, 8);
        assert_eq!(recorded_count(dir.path(), 8, true)?, 8);
        let changed = recorded_count(dir.path(), 4, true)
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            changed.as_deref(),
            Some("--shards 4: this data dir was created with --shards 8, which is fixed")
        );
        // A data dir from before --shards holds one shard.
        let old = tempfile::tempdir()?;
        assert_eq!(recorded_count(old.path(), 1, true)?, 1);
        assert!(recorded_count(old.path(), 16, true).is_err());
        Ok(())
    }

    #[test]
    fn a_write_goes_to_the_one_shard_it_touches() -> anyhow::Result<()> {
        let keyspace = Keyspace::new(16)?;
        let key = |k: &str| bytes::Bytes::copy_from_slice(k.as_bytes());
        let mut one = Touched::default();
        let put = PutRequest {
            key: key("a"),
            ..Default::default()
        };
        let txn = TxnRequest {
            compare: vec![Compare {
                key: key("a"),
                ..Default::default()
            }],
            success: vec![cairn_api::etcdserverpb::RequestOp {
                request: Some(Op::RequestPut(put.clone())),
            }],
            failure: Vec::new(),
        };
        one.txn(&keyspace, &txn)?;
        assert_eq!(one.0, Some(keyspace.shard_of(b"a")));

        let elsewhere = (0..)
            .map(|i| format!("k{i}"))
            .find(|k| keyspace.shard_of(k.as_bytes()) != keyspace.shard_of(b"a"))
            .unwrap_or_default();
        let mut two = Touched::default();
        two.put(&keyspace, &put)?;
        let spanning = two.range(&keyspace, elsewhere.as_bytes(), &[]).err();
        let spanning = spanning.map(|e| e.code());
        assert_eq!(spanning, Some(tonic::Code::Unimplemented));
        let mut prefix = Touched::default();
        assert!(prefix.range(&keyspace, b"a", b"b").is_err());
        // A put naming a lease goes to its key's shard like any other.
        let leased = PutRequest { lease: 7, ..put };
        let mut one = Touched::default();
        one.put(&keyspace, &leased)?;
        assert_eq!(one.0, Some(keyspace.shard_of(b"a")));
        Ok(())
    }
}
