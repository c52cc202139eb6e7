//! etcd's Maintenance service: Status (what `etcdctl endpoint status` shows),
//! alarms, Defragment (online: reads and writes go on), Hash, HashKV and
//! MoveLeader; with --shards, over the whole keyspace (`shard_maintenance`).

use std::sync::Arc;

use cairn_api::error;
use cairn_api::etcdserverpb::alarm_request::AlarmAction;
use cairn_api::etcdserverpb::maintenance_server::Maintenance;
use cairn_api::etcdserverpb::{
    AlarmMember, AlarmRequest, AlarmResponse, AlarmType, DefragmentRequest, DefragmentResponse,
    HashKvRequest, HashKvResponse, HashRequest, HashResponse, MoveLeaderRequest,
    MoveLeaderResponse, StatusRequest, StatusResponse,
};
use tonic::{Request, Response, Status};

use crate::auth::RequestAuth as _;
use crate::config::ETCD_VERSION;
use crate::member::{Member, consensus_status};
use crate::shard_maintenance;

pub struct MaintenanceService {
    member: Arc<Member>,
}

impl MaintenanceService {
    pub fn new(member: Arc<Member>) -> Self {
        MaintenanceService { member }
    }
}

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    /// etcd's database as of now, in chunks and with its sha256 last (see
    /// `backup`).
    async fn snapshot(
        &self,
        request: Request<cairn_api::etcdserverpb::SnapshotRequest>,
    ) -> Result<Response<crate::backup::SnapshotStream>, Status> {
        self.member.auth().admin_of(&request).await?;
        if self.member.shards().is_some() {
            // The snapshot's read point then covers every write
            // acknowledged before it began, as a linearizable range's.
            self.member.linearizable_barrier().await?;
        }
        let token = crate::auth::credentials(&request).token;
        Ok(Response::new(crate::backup::snapshot_stream(
            self.member.clone(),
            token,
        )))
    }

    async fn alarm(
        &self,
        request: Request<AlarmRequest>,
    ) -> Result<Response<AlarmResponse>, Status> {
        let request = request.into_inner();
        let member = &self.member;
        if request.action == AlarmAction::Get as i32 {
            // What every member applied up to now, as etcd's GET (which goes
            // through the log) answers.
            member.linearizable_barrier().await?;
            return Ok(Response::new(AlarmResponse {
                header: member.current_header(),
                alarms: member.alarms().list(request.alarm),
            }));
        }
        Ok(Response::new(member.propose(request).await?))
    }

    async fn defragment(
        &self,
        request: Request<DefragmentRequest>,
    ) -> Result<Response<DefragmentResponse>, Status> {
        let member = &self.member;
        member.auth().admin_of(&request).await?;
        shard_maintenance::defragment(member).await?;
        // etcd 3.4 answers with no header, and clients' tests assert it.
        Ok(Response::new(DefragmentResponse { header: None }))
    }

    async fn hash(&self, request: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        self.member.auth().admin_of(&request).await?;
        // The hash of every stored revision (Cairn's store is not etcd's
        // bolt file): equal on members that applied the same log.
        let member = &self.member;
        let token = crate::auth::credentials(&request).token;
        let hash = shard_maintenance::hash_kv(member, token.as_deref(), 0).await?;
        Ok(Response::new(HashResponse {
            header: member.header(hash.current_revision),
            hash: hash.hash,
        }))
    }

    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let member = &self.member;
        let raft = member.node.status();
        let in_use = member.db_in_use();
        let data_dir = member.data_dir.clone();
        let allocated = tokio::task::spawn_blocking(move || allocated_bytes(&data_dir))
            .await
            .unwrap_or(0);
        Ok(Response::new(StatusResponse {
            header: member.current_header(),
            version: ETCD_VERSION.to_string(),
            db_size: allocated as i64,
            leader: raft.leader,
            raft_index: raft.commit_index,
            raft_term: raft.term,
            raft_applied_index: raft.applied_index,
            errors: status_errors(raft.leader, &member.alarms().list(AlarmType::None as i32)),
            db_size_in_use: in_use as i64,
            is_learner: raft.is_learner,
        }))
    }

    async fn hash_kv(
        &self,
        request: Request<HashKvRequest>,
    ) -> Result<Response<HashKvResponse>, Status> {
        let member = &self.member;
        member.auth().admin_of(&request).await?;
        let token = crate::auth::credentials(&request).token;
        let hash = shard_maintenance::hash_kv(member, token.as_deref(), request.get_ref().revision)
            .await?;
        Ok(Response::new(HashKvResponse {
            header: member.header(hash.current_revision),
            hash: hash.hash,
            compact_revision: hash.compact_revision,
        }))
    }

    async fn move_leader(
        &self,
        request: Request<MoveLeaderRequest>,
    ) -> Result<Response<MoveLeaderResponse>, Status> {
        let member = &self.member;
        member.auth().admin_of(&request).await?;
        member.refuse_on_learner()?;
        member
            .node
            .transfer_leader(request.get_ref().target_id)
            .await
            .map_err(consensus_status)?;
        // etcd 3.4 answers with no header, to the leader itself as well.
        Ok(Response::new(MoveLeaderResponse { header: None }))
    }
}

/// etcd's Status errors: no leader, and each active alarm in protobuf's text
/// format.
fn status_errors(leader: u64, alarms: &[AlarmMember]) -> Vec<String> {
    let mut errors = Vec::new();
    if leader == 0 {
        errors.push(error::NO_LEADER.message().to_string());
    }
    errors.extend(alarms.iter().map(|a| {
        let name = AlarmType::try_from(a.alarm).map_or("UNKNOWN", |t| t.as_str_name());
        format!("memberID:{} alarm:{name} ", a.member_id)
    }));
    errors
}

/// Bytes physically allocated under `dir` (journals are sparse files, so
/// their apparent length would overstate it).
fn allocated_bytes(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => allocated_bytes(&entry.path()),
            Ok(meta) => meta.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}
