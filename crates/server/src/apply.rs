//! The apply loop's state machine: committed requests run against mvcc and
//! the lessor, a whole batch of entries in one store write together with its
//! applied index (lease records included), so a replay is exact. Each
//! committed batch's events go to the watch hub.

use cairn_api::cairnpb::internal_request::Request;
use cairn_api::cairnpb::{InternalRequest, Lease};
use cairn_api::error::{self, EtcdError};
use cairn_api::etcdserverpb::request_op::Request as Op;
use cairn_api::etcdserverpb::response_op::Response as OpResponse;
use cairn_api::etcdserverpb::{
    AlarmResponse, AlarmType, CompactionResponse, DeleteRangeRequest, LeaseCheckpointRequest,
    LeaseGrantRequest, LeaseGrantResponse, LeaseRevokeResponse, RequestOp, ResponseHeader,
    TxnRequest, TxnResponse,
};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use cairn_auth::{Auth, AuthError};
use cairn_consensus::{Committed, SnapshotSource, StateMachine};
use cairn_lease::{LeaseError, LeaseRecord, Lessor};
use cairn_mvcc::{MvccError, Store, WriteBatch};
use cairn_shard::{
    BatchReady, CompactRefused, CompareVote, Keyspace, Sequencer, ShardId, TxnId, TxnVote,
};
use cairn_watch_hub::{Commit, WatchHub};
use parking_lot::Mutex;
use prost::Message as _;
use tokio::sync::watch;

use crate::alarms::Alarms;
use crate::config::ServerConfig;
use crate::disk_space::DiskSpace;
use crate::member_auth::ClusterSecret;
use crate::proposal::Applied;
use cairn_metrics::StoreCounters;

/// Why applying one write failed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Mvcc(#[from] MvccError),
    #[error(transparent)]
    Lease(#[from] LeaseError),
    /// Refused while an alarm is active.
    #[error("{0}")]
    Alarm(EtcdError),
    /// Refused by the auth store, or an auth change that failed.
    #[error("{0}")]
    Auth(EtcdError),
}

/// Why the applier failed: the member stops with it.
#[derive(Debug, thiserror::Error)]
pub enum ApplierError {
    /// A committed entry that cannot be applied.
    #[error("{0}")]
    Entry(String),
    #[error(transparent)]
    Mvcc(#[from] MvccError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// Too little free space to apply a batch (StorageFull): consensus
    /// waits and tries again.
    #[error("applying paused: {0}")]
    NoRoom(#[source] std::io::Error),
    /// Reloading auth from a restored snapshot.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// Reloading leases from a restored snapshot.
    #[error(transparent)]
    Leases(LoadLeasesError),
}

pub type ApplyResult = Result<Applied, ApplyError>;

pub struct Applier {
    store: Store,
    /// Shared with the lease service and the leader task, which read it and
    /// keep expiries in it; only this loop changes records and attachments.
    lessor: Arc<Mutex<Lessor>>,
    /// Takes each commit's events; never blocks this loop.
    hub: Arc<WatchHub>,
    /// Shared with the Maintenance service, which lists them.
    alarms: Arc<Alarms>,
    /// Shared with the services, which check permissions and tokens in it.
    auth: Arc<Auth>,
    /// Where applied puts and deletes are counted: the member's metrics.
    counters: Option<StoreCounters>,
    /// The data dir's free space, checked before each batch.
    disk: Option<Arc<DiskSpace>>,
    /// With --shards: the sequencer this group's log drives, shared with
    /// the member's sequencing agent and its readers.
    sequencer: Option<Arc<Mutex<Sequencer>>>,
    /// The sequencer's revision, sent after each batch that changed it.
    sequenced: watch::Sender<i64>,
    /// Shared with the members' calls to each other, which sign and check
    /// with it.
    cluster_secret: Arc<ClusterSecret>,
}

/// What the apply loop shares with the services: the state as applied.
pub struct Shared {
    pub lessor: Arc<Mutex<Lessor>>,
    pub hub: Arc<WatchHub>,
    pub alarms: Arc<Alarms>,
    pub auth: Arc<Auth>,
    /// The data dir's free space, when watched.
    pub disk: Option<Arc<DiskSpace>>,
    /// With --shards: the sequencer as applied.
    pub sequencer: Option<Arc<Mutex<Sequencer>>>,
    /// With --shards: the sequencer's revision, sent whenever it changes
    /// (the shards' watch merge and remote reads wait on it).
    pub sequenced: watch::Sender<i64>,
    /// The secret members sign their calls to each other with, as applied.
    pub cluster_secret: Arc<ClusterSecret>,
}

/// Why the applied state could not be loaded at start.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("loading leases: {0}")]
    Leases(LoadLeasesError),
    #[error("loading alarms: {0}")]
    Alarms(MvccError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("loading the sequencer: {0}")]
    Sequencer(String),
    #[error("loading the cluster secret: {0}")]
    ClusterSecret(MvccError),
}

/// The state record that holds the sequencer (JSON: small, and rewritten
/// only by the batches that sequence).
const SEQUENCER_RECORD: &[u8] = b"sequencer";

/// With --shards, the cluster group's store holds no keys: which lease each
/// leased key is attached to is kept in state records under this prefix
/// (the key after it, the lease's ID as the value), for the lessor to load.
const LEASED_KEY_PREFIX: &[u8] = b"leased-key/";

fn leased_key_record(key: &[u8]) -> Vec<u8> {
    [LEASED_KEY_PREFIX, key].concat()
}

/// The sequencer `store` holds, or a new one for `shards` shards.
fn load_sequencer(store: &Store, shards: u32) -> Result<Sequencer, String> {
    let records = store
        .state_records(SEQUENCER_RECORD)
        .map_err(|e| e.to_string())?;
    match records.into_iter().find(|r| r.0 == SEQUENCER_RECORD) {
        Some((_, bytes)) => serde_json::from_slice(&bytes).map_err(|e| e.to_string()),
        None => Sequencer::new(shards, store.current_revision()).map_err(|e| e.to_string()),
    }
}

impl Applier {
    /// An applier over `store` with the leases, alarms and auth store it
    /// holds, set up as the member's flags say.
    pub fn open(store: Store, config: &ServerConfig) -> Result<Applier, OpenError> {
        let mut lessor = Lessor::new(config.min_lease_ttl());
        load_lessor(&store, &mut lessor).map_err(OpenError::Leases)?;
        let alarms = Alarms::default();
        alarms.load(&store).map_err(OpenError::Alarms)?;
        let auth = Auth::open(store.clone(), &config.auth)?;
        let sequencer = if config.shards > 1 {
            let sequencer = load_sequencer(&store, config.shards).map_err(OpenError::Sequencer)?;
            Some(Arc::new(Mutex::new(sequencer)))
        } else {
            None
        };
        let sequenced = watch::Sender::new(sequencer.as_ref().map_or(0, |s| s.lock().revision()));
        let cluster_secret = ClusterSecret::load(&store).map_err(OpenError::ClusterSecret)?;
        Ok(Applier {
            store,
            lessor: Arc::new(Mutex::new(lessor)),
            hub: WatchHub::new(),
            alarms: Arc::new(alarms),
            auth: Arc::new(auth),
            counters: None,
            disk: None,
            sequencer,
            sequenced,
            cluster_secret: Arc::new(cluster_secret),
        })
    }

    pub fn shared(&self) -> Shared {
        Shared {
            lessor: self.lessor.clone(),
            hub: self.hub.clone(),
            alarms: self.alarms.clone(),
            auth: self.auth.clone(),
            disk: self.disk.clone(),
            sequencer: self.sequencer.clone(),
            sequenced: self.sequenced.clone(),
            cluster_secret: self.cluster_secret.clone(),
        }
    }

    /// Counts the puts and deletes applied from now on in `counters`.
    pub fn count_into(&mut self, counters: StoreCounters) {
        self.counters = Some(counters);
    }

    /// Applies no batch that `disk` has no room for: fjall poisons a
    /// database whose journal write fails, which only a restart undoes,
    /// while a batch refused before it starts is retried by consensus.
    pub fn keep_room_on(&mut self, disk: Arc<DiskSpace>) {
        self.disk = Some(disk);
    }
}

/// Why the store's leases could not be loaded into the lessor. Messages are
/// whole, as the start-up report shows them after "loading leases: ".
#[derive(Debug, thiserror::Error)]
pub enum LoadLeasesError {
    #[error(transparent)]
    Mvcc(#[from] MvccError),
    #[error("lease {id:x} does not decode: {error}")]
    Decode { id: i64, error: prost::DecodeError },
}

/// Fills the lessor from the store's leases and leased keys: at start, and
/// after a snapshot replaced the store.
pub fn load_lessor(store: &Store, lessor: &mut Lessor) -> Result<(), LoadLeasesError> {
    let records = store
        .leases()?
        .into_iter()
        .map(|(id, bytes)| {
            let lease = Lease::decode(bytes.as_slice())
                .map_err(|error| LoadLeasesError::Decode { id, error })?;
            Ok(LeaseRecord {
                id: lease.id,
                ttl: lease.ttl,
                remaining_ttl: lease.remaining_ttl,
            })
        })
        .collect::<Result<Vec<_>, LoadLeasesError>>()?;
    let keys = store
        .leased_keys()?
        .into_iter()
        .map(|(key, id)| (key.to_vec(), id));
    // The shards' keys, with --shards (and none without).
    let sharded = store
        .state_records(LEASED_KEY_PREFIX)?
        .into_iter()
        .filter_map(|(record, id)| {
            let key = record.strip_prefix(LEASED_KEY_PREFIX)?.to_vec();
            Some((key, i64::from_be_bytes(id.try_into().ok()?)))
        });
    lessor.load(records, keys.chain(sharded));
    Ok(())
}

/// Errors that say the store itself failed, not the request.
fn is_fatal(e: &ApplyError) -> bool {
    match e {
        ApplyError::Mvcc(e) => !matches!(
            e,
            MvccError::Compacted
                | MvccError::FutureRevision
                | MvccError::KeyNotFound
                | MvccError::LeaseNotFound
        ),
        ApplyError::Lease(_) | ApplyError::Alarm(_) | ApplyError::Auth(_) => false,
    }
}

/// Whether a txn only reads, in both branches and nested txns.
fn txn_is_read_only(r: &TxnRequest) -> bool {
    r.success
        .iter()
        .chain(&r.failure)
        .all(|op| match &op.request {
            Some(Op::RequestRange(_)) | None => true,
            Some(Op::RequestTxn(nested)) => txn_is_read_only(nested),
            Some(Op::RequestPut(_) | Op::RequestDeleteRange(_)) => false,
        })
}

/// The error an active alarm answers this request with, as etcd's capped
/// (NOSPACE) and corrupt appliers do: under NOSPACE nothing that can grow
/// the store runs, while deletes and compactions, which make room, do;
/// under CORRUPT no write runs.
fn refused_by_alarm(alarms: &Alarms, request: &Request) -> Option<EtcdError> {
    let writes = !matches!(
        request,
        Request::Alarm(_)
            | Request::LeaseCheckpoint(_)
            | Request::SequenceRound(_)
            | Request::ClusterSecret(_)
    );
    if writes && alarms.is_active(AlarmType::Corrupt) {
        return Some(error::CORRUPT);
    }
    let grows = match request {
        Request::Put(_) | Request::LeaseGrant(_) => true,
        Request::Txn(r) => !txn_is_read_only(r),
        _ => false,
    };
    (grows && alarms.is_active(AlarmType::Nospace)).then_some(error::NO_SPACE)
}

fn header(revision: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader {
        revision,
        ..Default::default()
    })
}

fn store_lease(batch: &mut WriteBatch<'_>, record: LeaseRecord) {
    let lease = Lease {
        id: record.id,
        ttl: record.ttl,
        remaining_ttl: record.remaining_ttl,
    };
    batch.put_lease(record.id, lease.encode_to_vec());
}

/// Detaches the keys a delete-range removed from their leases.
fn detach_deleted(lessor: &mut Lessor, r: &DeleteRangeRequest) {
    match r.range_end.as_ref() {
        [] => lessor.detach(&r.key),
        [0] => lessor.detach_range(&r.key, None),
        end => lessor.detach_range(&r.key, Some(end)),
    }
}

/// Follows a txn's writes in the branches it took.
fn track_txn(lessor: &mut Lessor, r: &TxnRequest, response: &TxnResponse) {
    let ops = if response.succeeded {
        &r.success
    } else {
        &r.failure
    };
    for (op, done) in ops.iter().zip(&response.responses) {
        match (&op.request, &done.response) {
            (Some(Op::RequestPut(p)), _) if !p.ignore_lease => lessor.attach(&p.key, p.lease),
            (Some(Op::RequestDeleteRange(d)), _) => detach_deleted(lessor, d),
            (Some(Op::RequestTxn(t)), Some(OpResponse::ResponseTxn(nested))) => {
                track_txn(lessor, t, nested)
            }
            _ => {}
        }
    }
}

fn grant(
    batch: &mut WriteBatch<'_>,
    lessor: &mut Lessor,
    r: &LeaseGrantRequest,
    now: Instant,
) -> ApplyResult {
    let record = lessor.grant(r.id, r.ttl, now)?;
    store_lease(batch, record);
    Ok(Applied::LeaseGrant(LeaseGrantResponse {
        header: header(batch.current_revision()),
        id: record.id,
        ttl: record.ttl,
        error: String::new(),
    }))
}

/// Removes a lease and deletes its keys, all in one revision.
fn revoke(batch: &mut WriteBatch<'_>, lessor: &mut Lessor, id: i64) -> ApplyResult {
    let keys = lessor.revoke(id)?;
    let deletes = TxnRequest {
        compare: Vec::new(),
        success: keys
            .into_iter()
            .map(|key| RequestOp {
                request: Some(Op::RequestDeleteRange(DeleteRangeRequest {
                    key: key.into(),
                    ..Default::default()
                })),
            })
            .collect(),
        failure: Vec::new(),
    };
    let response = batch.txn(&deletes)?;
    batch.delete_lease(id);
    Ok(Applied::LeaseRevoke(LeaseRevokeResponse {
        header: response.header,
    }))
}

/// With --shards: removes a lease, and has every shard holding keys of it
/// delete them at one revision, which the sequencer gives (none when it has
/// no keys, as etcd's revoke).
fn revoke_sharded(
    batch: &mut WriteBatch<'_>,
    lessor: &mut Lessor,
    sequencer: &Mutex<Sequencer>,
    id: i64,
) -> ApplyResult {
    let keys = lessor.revoke(id)?;
    batch.delete_lease(id);
    let mut sequencer = sequencer.lock();
    let keyspace = Keyspace::new(sequencer.shards())
        .map_err(|e| ApplyError::Mvcc(MvccError::Io(std::io::Error::other(e))))?;
    let mut by_shard: std::collections::BTreeMap<ShardId, Vec<Vec<u8>>> = Default::default();
    for key in keys {
        batch.delete_state_record(leased_key_record(&key));
        by_shard
            .entry(keyspace.shard_of(&key))
            .or_default()
            .push(key);
    }
    sequencer.revoke(id, by_shard);
    Ok(Applied::LeaseRevoke(LeaseRevokeResponse {
        header: header(sequencer.revision()),
    }))
}

/// With --shards: what a sequenced batch changed of the keys' leases, in
/// the lessor and in the records it is loaded from.
fn attach_sharded(batch: &mut WriteBatch<'_>, lessor: &mut Lessor, attach: &[(Vec<u8>, i64)]) {
    for (key, lease) in attach {
        lessor.attach(key, *lease);
        match lessor.lease_of(key) {
            Some(id) => batch.put_state_record(leased_key_record(key), id.to_be_bytes().to_vec()),
            None => batch.delete_state_record(leased_key_record(key)),
        }
    }
}

/// A participant's vote on a cross-shard txn, as the round carries it.
fn txn_vote(vote: cairn_api::cairnpb::TxnVote) -> TxnVote {
    let id = vote.id.unwrap_or_default();
    let attach = |keys: Vec<cairn_api::cairnpb::KeyLease>| {
        keys.into_iter()
            .map(|a| (a.key.to_vec(), a.lease))
            .collect()
    };
    TxnVote {
        shard: vote.shard,
        index: vote.index,
        after: vote.after,
        revoked: vote.revoked,
        id: TxnId {
            member: id.member,
            seq: id.seq,
        },
        participants: vote.participants,
        compares: vote
            .compares
            .into_iter()
            .map(|c| CompareVote {
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

fn checkpoint(
    batch: &mut WriteBatch<'_>,
    lessor: &mut Lessor,
    r: &LeaseCheckpointRequest,
    now: Instant,
) -> ApplyResult {
    for cp in &r.checkpoints {
        if let Some(record) = lessor.checkpoint(cp.id, cp.remaining_ttl, now) {
            store_lease(batch, record);
        }
    }
    Ok(Applied::LeaseCheckpoint(()))
}

impl StateMachine for Applier {
    type Output = ApplyResult;
    type Error = ApplierError;

    fn applied_index(&self) -> u64 {
        self.store.applied_index()
    }

    fn apply(
        &mut self,
        entries: &[Committed],
        applied_index: u64,
    ) -> Result<Vec<ApplyResult>, ApplierError> {
        if let Some(disk) = &self.disk {
            let bytes = entries.iter().map(|e| e.data.len() as u64).sum();
            disk.room_to_apply(bytes).map_err(ApplierError::NoRoom)?;
        }
        let mut batch = self.store.write();
        let prev_revision = batch.current_revision();
        let mut lessor = self.lessor.lock();
        // The leader's expiries and every member's apply instants of grants
        // and checkpoints (which a next leader resumes from) depend on it;
        // records never do.
        let now = Instant::now();
        let mut results = Vec::with_capacity(entries.len());
        let mut sequenced = false;
        for entry in entries {
            let request = InternalRequest::decode(entry.data.clone()).map_err(|e| {
                ApplierError::Entry(format!("entry {} does not decode: {e}", entry.index))
            })?;
            let lessor = &mut *lessor;
            if let Some(refused) = request
                .request
                .as_ref()
                .and_then(|r| refused_by_alarm(&self.alarms, r))
            {
                results.push(Err(ApplyError::Alarm(refused)));
                continue;
            }
            if let Some(r) = request.request.as_ref()
                && let Err(e) = self.auth.check_applied(request.header.as_ref(), r, &|id| {
                    lessor.info(id, now).map(|i| i.keys).unwrap_or_default()
                })
            {
                results.push(Err(ApplyError::Auth(e)));
                continue;
            }
            let result = match request.request {
                Some(Request::Put(r)) => {
                    let put = batch.put_checked(&r, &|id| lessor.contains(id));
                    if put.is_ok() && !r.ignore_lease {
                        lessor.attach(&r.key, r.lease);
                    }
                    put.map(Applied::Put).map_err(ApplyError::from)
                }
                Some(Request::DeleteRange(r)) => {
                    let deleted = batch.delete_range(&r);
                    if deleted.is_ok() {
                        detach_deleted(lessor, &r);
                    }
                    deleted.map(Applied::DeleteRange).map_err(ApplyError::from)
                }
                Some(Request::Txn(r)) => {
                    let done = batch.txn_checked(&r, &|id| lessor.contains(id));
                    if let Ok(response) = &done {
                        track_txn(lessor, &r, response);
                    }
                    done.map(Applied::Txn).map_err(ApplyError::from)
                }
                // With --shards the cluster group records the compaction,
                // and the shards apply it through their logs.
                Some(Request::Compaction(r)) => match &self.sequencer {
                    Some(sequencer) => {
                        sequenced = true;
                        let mut sequencer = sequencer.lock();
                        sequencer
                            .compact(r.revision)
                            .map(|()| {
                                Applied::Compaction(CompactionResponse {
                                    header: header(sequencer.revision()),
                                })
                            })
                            .map_err(|refused| {
                                ApplyError::Mvcc(match refused {
                                    CompactRefused::Compacted => MvccError::Compacted,
                                    CompactRefused::FutureRevision => MvccError::FutureRevision,
                                })
                            })
                    }
                    None => batch
                        .compact(r.revision)
                        .map(Applied::Compaction)
                        .map_err(ApplyError::from),
                },
                Some(Request::LeaseGrant(r)) => {
                    let granted = grant(&mut batch, lessor, &r, now);
                    // With --shards the keyspace's revision is the
                    // sequencer's: the cluster group's store holds no keys.
                    match (granted, &self.sequencer) {
                        (Ok(Applied::LeaseGrant(response)), Some(sequencer)) => {
                            Ok(Applied::LeaseGrant(LeaseGrantResponse {
                                header: header(sequencer.lock().revision()),
                                ..response
                            }))
                        }
                        (granted, _) => granted,
                    }
                }
                Some(Request::LeaseRevoke(r)) => match &self.sequencer {
                    Some(sequencer) => {
                        sequenced = true;
                        revoke_sharded(&mut batch, lessor, sequencer, r.id)
                    }
                    None => revoke(&mut batch, lessor, r.id),
                },
                Some(Request::LeaseCheckpoint(r)) => checkpoint(&mut batch, lessor, &r, now),
                Some(Request::Alarm(r)) => Ok(Applied::Alarm(AlarmResponse {
                    header: header(batch.current_revision()),
                    alarms: self.alarms.apply(&mut batch, &r),
                })),
                Some(Request::Auth(r)) => self
                    .auth
                    .apply(&mut batch, request.header.as_ref(), r, entry.index)
                    .map(Applied::Auth)
                    .map_err(ApplyError::Auth),
                Some(Request::SequenceRound(r)) => {
                    let Some(sequencer) = &self.sequencer else {
                        return Err(ApplierError::Entry(format!(
                            "entry {} sequences shards, but this member has --shards 1",
                            entry.index
                        )));
                    };
                    sequenced = true;
                    let round: Vec<BatchReady> = r
                        .batches
                        .into_iter()
                        .map(|b| BatchReady {
                            shard: b.shard,
                            after: b.after,
                            through: b.through,
                            revisions: b.revisions,
                            leases: b.leases,
                            missing: b.missing,
                            attach: b
                                .attach
                                .into_iter()
                                .map(|a| (a.key.to_vec(), a.lease))
                                .collect(),
                            revoked: b.revoked,
                        })
                        .collect();
                    let mut sequencer = sequencer.lock();
                    let accepted = sequencer.sequence(&round, &|id| lessor.contains(id));
                    // The leases of the keys they write change here, in the
                    // order the batches were sequenced, so that a revoke
                    // after them finds every shard with keys of its lease.
                    for done in &accepted {
                        if let Some(ready) = round
                            .iter()
                            .find(|b| b.shard == done.shard && b.after == done.after)
                        {
                            attach_sharded(&mut batch, lessor, &ready.attach);
                        }
                    }
                    for vote in r.votes {
                        let attach = sequencer.vote(txn_vote(vote), &|id| lessor.contains(id));
                        attach_sharded(&mut batch, lessor, &attach);
                    }
                    for id in r.aborts {
                        sequencer.abort(TxnId {
                            member: id.member,
                            seq: id.seq,
                        });
                    }
                    Ok(Applied::SequenceRound(accepted))
                }
                Some(Request::ClusterSecret(r)) => {
                    self.cluster_secret.apply(&mut batch, &r);
                    Ok(Applied::ClusterSecret(()))
                }
                None => {
                    return Err(ApplierError::Entry(format!(
                        "entry {} holds no request",
                        entry.index
                    )));
                }
            };
            if let Err(e) = &result
                && is_fatal(e)
            {
                return Err(ApplierError::Entry(format!(
                    "applying entry {}: {e}",
                    entry.index
                )));
            }
            results.push(result);
        }
        if sequenced && let Some(sequencer) = &self.sequencer {
            let state = serde_json::to_vec(&*sequencer.lock())
                .map_err(|e| ApplierError::Entry(format!("encoding the sequencer: {e}")))?;
            batch.put_state_record(SEQUENCER_RECORD.to_vec(), state);
        }
        let revision = batch.current_revision();
        let events = batch.commit(applied_index)?;
        if sequenced && let Some(sequencer) = &self.sequencer {
            self.sequenced.send_replace(sequencer.lock().revision());
        }
        if let Some(counters) = &self.counters {
            counters.record(&events);
        }
        // After the commit: a watcher catching up from the store meanwhile
        // reads these revisions there, and the hub skips them for it.
        self.hub.publish(Commit {
            prev_revision,
            revision,
            events,
        });
        Ok(results)
    }

    fn sync(&mut self) -> Result<(), ApplierError> {
        Ok(self.store.sync()?)
    }

    fn snapshot_source(&self) -> Arc<dyn SnapshotSource> {
        Arc::new(StoreSnapshots(self.store.clone()))
    }

    fn restore(&mut self, file: &Path) -> Result<(), ApplierError> {
        let mut input = std::io::BufReader::new(std::fs::File::open(file)?);
        self.store.restore_snapshot(&mut input)?;
        // No commit reports what the snapshot brought: watchers look for it.
        self.hub.resync();
        self.alarms.load(&self.store)?;
        self.auth.reload()?;
        self.cluster_secret.reload(&self.store)?;
        if let Some(sequencer) = &self.sequencer {
            let shards = sequencer.lock().shards();
            *sequencer.lock() = load_sequencer(&self.store, shards).map_err(ApplierError::Entry)?;
            self.sequenced.send_replace(sequencer.lock().revision());
        }
        load_lessor(&self.store, &mut self.lessor.lock()).map_err(ApplierError::Leases)
    }
}

/// Snapshots of the mvcc store, streamed to members that fell behind.
struct StoreSnapshots(Store);

impl SnapshotSource for StoreSnapshots {
    fn write_snapshot(&self, out: &mut dyn std::io::Write) -> std::io::Result<u64> {
        self.0.write_snapshot(out).map_err(std::io::Error::other)
    }
}
