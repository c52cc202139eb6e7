//! With `--shards N` (N > 1): this member's replicas of the keyspace's
//! shards, each its own raft group, and the sequencing agent that gives
//! their writes revisions through the cluster group (docs/sharding.md).
//! Every member holds a replica of every shard for now.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cairn_api::cairnpb::{self, SequenceRound};
use cairn_api::etcdserverpb::request_op::Request as Op;
use cairn_api::etcdserverpb::{
    Compare, DeleteRangeRequest, PutRequest, RangeRequest, RangeResponse, TxnRequest,
};
use cairn_consensus::{GroupId, Node, NodeConfig, PeerNetwork, SharedRaftLog};
use cairn_mvcc::{MvccError, Store};
use cairn_shard::{BatchReady, Keyspace, Sequencer, ShardId};
use cairn_shard_replica::{
    Agent, LocalShard, ReadPoint, ShardHandle, ShardWrite, WriteError, WriteResponse,
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

/// How often a write or a starting member looks for a shard's new leader.
const LEADER_POLL: Duration = Duration::from_millis(10);

/// How long the agent waits when no shard has anything to sequence.
const AGENT_IDLE: Duration = Duration::from_millis(2);

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
            let tmp = file.with_extension("tmp");
            let write = || -> std::io::Result<()> {
                std::fs::write(&tmp, format!("{asked}\n"))?;
                std::fs::File::open(&tmp)?.sync_all()?;
                std::fs::rename(&tmp, &file)
            };
            write().map_err(|source| ShardsError::Io {
                context: format!("writing {}", file.display()),
                source,
            })?;
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

/// This member's replicas of every shard.
pub struct Shards {
    keyspace: Keyspace,
    /// By shard ID.
    local: Vec<LocalShard>,
    /// The cluster group's sequencer as this member applied it.
    sequencer: Arc<Mutex<Sequencer>>,
    /// Their events, in the keyspace's revision order.
    events: Arc<ShardEvents>,
    agent: Mutex<Option<JoinHandle<()>>>,
}

impl Shards {
    /// Opens each shard's store under `dir` and starts its raft group
    /// (group = shard + 1) on `network` and `log`, configured as
    /// `group_config` says for the group and its snapshot dir.
    pub fn start(
        dir: &Path,
        sequencer: Arc<Mutex<Sequencer>>,
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
        let mut handles = Vec::new();
        for shard in 0..keyspace.shards() {
            let store = Store::open(&shard_dir(shard).join("kv"))
                .map_err(|source| ShardsError::Store { shard, source })?;
            handles.push(ShardHandle::new(shard, store));
        }
        // Before any shard applies a batch: the merge starts from what the
        // stores hold.
        let applied: Vec<u64> = handles.iter().map(|h| h.applied_index()).collect();
        let events = Arc::new(ShardEvents::new(
            keyspace,
            handles.iter().map(|h| h.store()).collect(),
            &applied,
            sequencer.clone(),
            hub,
        ));
        let mut local = Vec::new();
        for (shard, handle) in (0..).zip(handles) {
            let merge = events.clone();
            handle.send_events_to(Arc::new(move |batch, applied| {
                merge.applied(batch, applied)
            }));
            let config = group_config(GroupId::from(shard) + 1, shard_dir(shard));
            let node = Node::start_in(config, handle.machine(), network, log)
                .map_err(|source| ShardsError::Raft { shard, source })?;
            local.push(LocalShard { handle, node });
        }
        Ok(Shards {
            keyspace,
            local,
            sequencer,
            events,
            agent: Mutex::new(None),
        })
    }

    /// Starts the sequencing agent, which proposes its rounds through
    /// `member`'s cluster group.
    pub fn start_agent(&self, member: Arc<Member>) {
        let agent = Agent::new(
            member.id,
            self.local.clone(),
            self.sequencer.clone(),
            AGENT_IDLE,
            member.request_timeout(),
        );
        let task = tokio::spawn(agent.run(move |round: Vec<BatchReady>| {
            let member = member.clone();
            async move {
                let batches = round
                    .into_iter()
                    .map(|b| cairnpb::BatchReady {
                        shard: b.shard,
                        after: b.after,
                        through: b.through,
                        revisions: b.revisions,
                    })
                    .collect();
                member
                    .propose(SequenceRound { batches })
                    .await
                    .map_err(|e| e.message().to_string())
            }
        }));
        *self.agent.lock() = Some(task);
    }

    /// Stops the agent and every shard's raft group (blocking).
    pub fn shutdown(&self) {
        if let Some(agent) = self.agent.lock().take() {
            agent.abort();
        }
        for shard in &self.local {
            shard.node.shutdown();
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
        for shard in &self.local {
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

    /// Answers `request` at `point` from this member's replicas.
    pub async fn range(
        &self,
        request: &RangeRequest,
        point: &ReadPoint,
    ) -> Result<RangeResponse, MvccError> {
        let handles: Vec<Arc<ShardHandle>> = self.local.iter().map(|s| s.handle.clone()).collect();
        cairn_shard_replica::range(&self.keyspace, &handles, request, point).await
    }

    /// Proposes `write` to its shard and waits until it is applied here.
    /// While the shard elects a leader the write waits, as etcd's proposals
    /// do; the caller bounds the wait.
    pub async fn write(&self, write: ShardWrite) -> Result<WriteResponse, Status> {
        let shard = self.shard_of(&write)?;
        let node = &self.local[shard as usize].node;
        loop {
            return match cairn_shard_replica::write(node, write.clone()).await {
                Ok(Ok(response)) => Ok(response),
                Ok(Err(e)) => Err(crate::member::mvcc_status(e)),
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

    /// Waits until every shard has a leader, at most `timeout`: a new
    /// cluster's shards elect theirs after the cluster group, and a member
    /// that says it is ready should take writes. Whether they all do.
    pub async fn wait_for_leaders(&self, timeout: Duration) -> bool {
        let all_led = || self.local.iter().all(|s| s.node.status().leader != 0);
        tokio::time::timeout(timeout, async {
            while !all_led() {
                tokio::time::sleep(LEADER_POLL).await;
            }
        })
        .await
        .is_ok()
    }

    /// The one shard a write touches. Writes over several shards and keys
    /// attached to leases are not built yet (docs/sharding.md).
    fn shard_of(&self, write: &ShardWrite) -> Result<ShardId, Status> {
        let mut touched = Touched::default();
        match write {
            ShardWrite::Put(put) => touched.put(&self.keyspace, put)?,
            ShardWrite::DeleteRange(delete) => {
                touched.range(&self.keyspace, &delete.key, &delete.range_end)?
            }
            ShardWrite::Txn(txn) => touched.txn(&self.keyspace, txn)?,
        }
        // A txn that names no key (no compares, no operations) changes
        // nothing: any shard answers it.
        Ok(touched.0.unwrap_or(0))
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
        if put.lease != 0 {
            return Err(Status::unimplemented(
                "cairn: keys attached to leases are not supported with --shards yet",
            ));
        }
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
        let leased = PutRequest { lease: 7, ..put };
        assert!(Touched::default().put(&keyspace, &leased).is_err());
        Ok(())
    }
}
