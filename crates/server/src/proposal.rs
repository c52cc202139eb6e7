//! The typed seam between the services and the apply loop: each kind of
//! write names the response its application produces, so proposing a
//! `PutRequest` answers a `PutResponse` ([`crate::member::Member::propose`]).
//! The pairs are listed once, below; the apply loop produces [`Applied`] and
//! the member turns it back into the proposal's own response.

use cairn_api::cairnpb::internal_request::Request;
use cairn_api::cairnpb::{AuthRequest, ClusterSecret, SequenceRound};
use cairn_api::etcdserverpb::{
    AlarmRequest, AlarmResponse, CompactionRequest, CompactionResponse, DeleteRangeRequest,
    DeleteRangeResponse, LeaseCheckpointRequest, LeaseGrantRequest, LeaseGrantResponse,
    LeaseRevokeRequest, LeaseRevokeResponse, PutRequest, PutResponse, ResponseHeader, TxnRequest,
    TxnResponse,
};
use cairn_auth::AuthApplied;
use cairn_shard::Sequenced;

/// A write that goes through the log, and what applying it answers.
pub trait Proposal: Send + 'static {
    type Response: Answer + Send;

    /// The request the log entry carries.
    fn into_request(self) -> Request;

    /// This request's response out of what the apply loop produced for it.
    fn response(applied: Applied) -> Result<Self::Response, Mismatch>;
}

/// The apply loop answered another kind of request than the one proposed.
#[derive(Debug, thiserror::Error)]
#[error("apply returned a mismatched response: {0}")]
pub struct Mismatch(String);

/// A response, with the header (if it has one) the proposing member fills.
pub trait Answer {
    fn header(&mut self) -> Option<&mut Option<ResponseHeader>>;
}

macro_rules! proposals {
    ($($kind:ident: $request:ty => $response:ty,)*) => {
        /// What applying one write produced, by kind of request.
        #[derive(Debug)]
        pub enum Applied {
            $($kind($response),)*
        }

        $(impl Proposal for $request {
            type Response = $response;

            fn into_request(self) -> Request {
                Request::$kind(self)
            }

            fn response(applied: Applied) -> Result<$response, Mismatch> {
                match applied {
                    Applied::$kind(response) => Ok(response),
                    other => Err(Mismatch(format!("{other:?}"))),
                }
            }
        })*
    };
}

proposals! {
    Put: PutRequest => PutResponse,
    DeleteRange: DeleteRangeRequest => DeleteRangeResponse,
    Txn: TxnRequest => TxnResponse,
    Compaction: CompactionRequest => CompactionResponse,
    LeaseGrant: LeaseGrantRequest => LeaseGrantResponse,
    LeaseRevoke: LeaseRevokeRequest => LeaseRevokeResponse,
    LeaseCheckpoint: LeaseCheckpointRequest => (),
    Alarm: AlarmRequest => AlarmResponse,
    Auth: AuthRequest => AuthApplied,
    SequenceRound: SequenceRound => Vec<Sequenced>,
    ClusterSecret: ClusterSecret => (),
}

macro_rules! with_header {
    ($($response:ty),*) => {
        $(impl Answer for $response {
            fn header(&mut self) -> Option<&mut Option<ResponseHeader>> {
                Some(&mut self.header)
            }
        })*
    };
}

with_header!(
    PutResponse,
    DeleteRangeResponse,
    TxnResponse,
    CompactionResponse,
    LeaseGrantResponse,
    LeaseRevokeResponse,
    AlarmResponse
);

/// Checkpoints answer no client.
impl Answer for () {
    fn header(&mut self) -> Option<&mut Option<ResponseHeader>> {
        None
    }
}

/// The batches a round sequenced answer the member's own agent.
impl Answer for Vec<Sequenced> {
    fn header(&mut self) -> Option<&mut Option<ResponseHeader>> {
        None
    }
}

/// The Auth service builds its responses' headers itself.
impl Answer for AuthApplied {
    fn header(&mut self) -> Option<&mut Option<ResponseHeader>> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_comes_back_only_to_its_own_kind() {
        let put = PutResponse {
            header: None,
            prev_kv: None,
        };
        assert!(PutRequest::response(Applied::Put(put.clone())).is_ok());
        let mismatch = TxnRequest::response(Applied::Put(put)).err();
        assert!(
            mismatch
                .map(|e| e.to_string())
                .is_some_and(|e| e.starts_with("apply returned a mismatched response: Put(")),
        );
        assert!(matches!(
            PutRequest::default().into_request(),
            Request::Put(_)
        ));
    }
}
