//! One member: its identity, its store, its raft node, and what the gRPC
//! services share: proposing a write and waiting for its result, linearizable
//! read barriers, response headers.

use std::time::Duration;

use cairn_api::cairnpb::InternalRequest;
use cairn_api::cairnpb::internal_request::Request;
use cairn_api::error::{self, EtcdError};
use cairn_api::etcdserverpb::ResponseHeader;
use cairn_consensus::Node;
use cairn_mvcc::{MvccError, Store};
use prost::Message as _;
use tonic::Status;

use crate::apply::{Applied, ApplyResult};

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

    /// Proposes a write through consensus and waits for this member to apply it.
    pub async fn propose(&self, request: Request) -> Result<Applied, Status> {
        self.refuse_on_learner()?;
        let request = InternalRequest {
            request: Some(request),
        };
        if request.encoded_len() > self.max_request_bytes {
            return Err(error::REQUEST_TOO_LARGE.status());
        }
        let data = request.encode_to_vec();
        match tokio::time::timeout(self.request_timeout, self.node.propose(data)).await {
            Err(_) => Err(error::TIMEOUT.status()),
            Ok(Err(e)) => Err(consensus_status(e)),
            Ok(Ok(result)) => result.map_err(mvcc_status),
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

pub fn mvcc_status(e: MvccError) -> Status {
    let etcd: EtcdError = match e {
        MvccError::Compacted => error::COMPACTED,
        MvccError::FutureRevision => error::FUTURE_REV,
        MvccError::KeyNotFound => error::KEY_NOT_FOUND,
        other => return Status::internal(other.to_string()),
    };
    etcd.status()
}
