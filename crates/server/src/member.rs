//! One member: its identity, its store, its raft node, and what the gRPC
//! services share: proposing a write and waiting for its result, linearizable
//! read barriers, response headers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cairn_api::cairnpb::internal_request::Request;
use cairn_api::cairnpb::{InternalRequest, RequestHeader};
use cairn_api::error::{self, EtcdError};
use cairn_api::etcdserverpb::alarm_request::AlarmAction;
use cairn_api::etcdserverpb::{AlarmRequest, AlarmType, ResponseHeader};
use cairn_auth::{Auth, Caller};
use cairn_consensus::Node;
use cairn_lease::{LeaseError, Lessor};
use cairn_mvcc::{MvccError, Store};
use parking_lot::Mutex;
use prost::Message as _;
use tonic::Status;

use crate::alarms::Alarms;
use crate::apply::{Applied, ApplyError, ApplyResult};

pub struct Member {
    pub id: u64,
    pub cluster_id: u64,
    /// Where this member keeps its data (`<data-dir>/member`).
    pub data_dir: std::path::PathBuf,
    pub store: Store,
    pub node: Node<ApplyResult>,
    pub max_request_bytes: usize,
    pub max_txn_ops: usize,
    /// etcd's request timeout: 5 s plus two election timeouts.
    pub request_timeout: Duration,
    /// The leases as applied, with the leader's expiries.
    pub lessor: Arc<Mutex<Lessor>>,
    pub lease_ids: LeaseIds,
    /// The active alarms, as applied.
    pub alarms: Arc<Alarms>,
    /// Bytes of stored revisions past which writes raise NOSPACE; None for
    /// no quota.
    pub quota_bytes: Option<u64>,
    /// The auth store as applied, and the tokens.
    pub auth: Arc<Auth>,
}

/// Picks lease IDs for grants that leave it to the server, unique across
/// members as etcd's: the member ID's low 16 bits, then a counter started
/// from the clock in milliseconds, kept positive.
pub struct LeaseIds {
    prefix: u64,
    suffix: AtomicU64,
}

impl LeaseIds {
    const SUFFIX_BITS: u32 = 48;

    pub fn new(member_id: u64) -> LeaseIds {
        let millis = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        LeaseIds {
            prefix: (member_id & 0xffff) << Self::SUFFIX_BITS,
            suffix: AtomicU64::new((millis & ((1 << 40) - 1)) << 8),
        }
    }

    pub fn next(&self) -> i64 {
        loop {
            let suffix = self.suffix.fetch_add(1, Ordering::Relaxed) + 1;
            let id = (self.prefix | (suffix & ((1 << Self::SUFFIX_BITS) - 1))) & (i64::MAX as u64);
            // 0 means "no lease"; only a wrapped counter of member 0 gets it.
            if id != 0 {
                return id as i64;
            }
        }
    }
}

impl Member {
    /// A header for a response at `revision`.
    pub fn header(&self, revision: i64) -> Option<ResponseHeader> {
        Some(ResponseHeader {
            cluster_id: self.cluster_id,
            member_id: self.id,
            revision,
            raft_term: self.node.term(),
        })
    }

    /// Completes a header that mvcc filled with a revision.
    pub fn fill_header(&self, header: &mut Option<ResponseHeader>) {
        let revision = header
            .as_ref()
            .map_or_else(|| self.store.current_revision(), |h| h.revision);
        *header = self.header(revision);
    }

    /// Proposes a write of the member's own through consensus and waits for
    /// this member to apply it.
    pub async fn propose(&self, request: Request) -> Result<Applied, Status> {
        self.propose_with(None, request).await
    }

    /// Proposes a client's write, which the apply loop checks against the
    /// caller's permissions.
    pub async fn propose_for(&self, caller: &Caller, request: Request) -> Result<Applied, Status> {
        self.propose_with(Some(caller.header()), request).await
    }

    async fn propose_with(
        &self,
        header: Option<RequestHeader>,
        request: Request,
    ) -> Result<Applied, Status> {
        self.refuse_on_learner()?;
        let request = InternalRequest {
            request: Some(request),
            header,
        };
        if request.encoded_len() > self.max_request_bytes {
            return Err(error::REQUEST_TOO_LARGE.status());
        }
        let data = request.encode_to_vec();
        match tokio::time::timeout(self.request_timeout, self.node.propose(data)).await {
            Err(_) => Err(error::TIMEOUT.status()),
            Ok(Err(e)) => Err(consensus_status(e)),
            Ok(Ok(result)) => result.map_err(apply_status),
        }
    }

    /// etcd's quota check before proposing a write that adds `cost` bytes:
    /// past the quota, raises this member's NOSPACE alarm through the log
    /// and refuses the write. The quota bounds the bytes of the revisions
    /// still stored (what a defragmented etcd db holds), not the files: the
    /// LSM tree reclaims what compaction dropped on its own schedule, and
    /// the journal is preallocated.
    pub async fn check_quota(&self, cost: usize) -> Result<(), Status> {
        // Writes that add nothing (deletes, reads) make room or need none;
        // etcd refuses those too once over the quota.
        let Some(quota) = self.quota_bytes.filter(|_| cost > 0) else {
            return Ok(());
        };
        // Measuring the files is dear; the uncompressed bytes bound what
        // they hold and decide every write well under the quota.
        let cost = cost as u64;
        if self.store.stored_bytes() + cost <= quota || self.store.size().in_use + cost <= quota {
            return Ok(());
        }
        let raise = AlarmRequest {
            action: AlarmAction::Activate as i32,
            member_id: self.id,
            alarm: AlarmType::Nospace as i32,
        };
        if !self.alarms.is_active(AlarmType::Nospace)
            && let Err(e) = self.propose(Request::Alarm(raise)).await
        {
            tracing::warn!("could not raise the NOSPACE alarm: {}", e.message());
        }
        Err(error::NO_SPACE.status())
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
        other => return Status::internal(other.to_string()),
    };
    etcd.status()
}
