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
    pub name: String,
    pub id: u64,
    pub cluster_id: u64,
    pub peer_urls: Vec<String>,
    pub client_urls: Vec<String>,
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

    /// Waits until this member has applied everything committed before now.
    pub async fn linearizable_barrier(&self) -> Result<(), Status> {
        match tokio::time::timeout(self.request_timeout, self.node.read_index()).await {
            Err(_) => Err(error::TIMEOUT.status()),
            Ok(Err(e)) => Err(consensus_status(e)),
            Ok(Ok(_)) => Ok(()),
        }
    }
}

pub fn consensus_status(e: cairn_consensus::Error) -> Status {
    use cairn_consensus::Error as E;
    match e {
        E::NoLeader => error::NO_LEADER.status(),
        E::Stopped => error::STOPPED.status(),
        other => Status::internal(other.to_string()),
    }
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
