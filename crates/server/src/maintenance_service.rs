//! etcd's Maintenance service: Status (what `etcdctl endpoint status` shows)
//! the alarm list, HashKV and MoveLeader. Defragment, Hash and Snapshot come
//! with the operations issue and answer Unimplemented until then.

use std::sync::Arc;

use cairn_api::etcdserverpb::alarm_request::AlarmAction;
use cairn_api::etcdserverpb::maintenance_server::Maintenance;
use cairn_api::etcdserverpb::{
    AlarmRequest, AlarmResponse, HashKvRequest, HashKvResponse, MoveLeaderRequest,
    MoveLeaderResponse, StatusRequest, StatusResponse,
};
use tonic::{Request, Response, Status};

use crate::config::ETCD_VERSION;
use crate::member::{Member, consensus_status, mvcc_status};

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
    async fn alarm(
        &self,
        request: Request<AlarmRequest>,
    ) -> Result<Response<AlarmResponse>, Status> {
        // No alarm can be raised yet (quotas and corruption checks come
        // later), so the list is truthfully empty; raising one by hand is not
        // supported until then.
        if request.get_ref().action != AlarmAction::Get as i32 {
            return Err(Status::unimplemented(
                "alarms can only be listed in this version of Cairn",
            ));
        }
        Ok(Response::new(AlarmResponse {
            header: self.member.header(self.member.store.current_revision()),
            alarms: Vec::new(),
        }))
    }

    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let member = &self.member;
        let raft = member.node.status();
        let size = member.store.size();
        let data_dir = member.data_dir.clone();
        let allocated = tokio::task::spawn_blocking(move || allocated_bytes(&data_dir))
            .await
            .unwrap_or(0);
        Ok(Response::new(StatusResponse {
            header: member.header(member.store.current_revision()),
            version: ETCD_VERSION.to_string(),
            db_size: allocated as i64,
            leader: raft.leader,
            raft_index: raft.commit_index,
            raft_term: raft.term,
            raft_applied_index: raft.applied_index,
            errors: Vec::new(),
            db_size_in_use: size.in_use as i64,
            is_learner: raft.is_learner,
        }))
    }

    async fn hash_kv(
        &self,
        request: Request<HashKvRequest>,
    ) -> Result<Response<HashKvResponse>, Status> {
        let member = &self.member;
        let hash = member
            .store
            .hash_kv(request.get_ref().revision)
            .map_err(mvcc_status)?;
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
        member.refuse_on_learner()?;
        member
            .node
            .transfer_leader(request.get_ref().target_id)
            .await
            .map_err(consensus_status)?;
        Ok(Response::new(MoveLeaderResponse {
            header: member.header(member.store.current_revision()),
        }))
    }
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
