//! With --shards: what a member asks of the members holding the shards it
//! does not hold. A write goes to a replica through etcd's own KV service
//! (that member routes it to its shard's group, and checks the caller's
//! permissions again); a read of one shard at a revision of the keyspace
//! goes through Cairn's `ShardReads` service. The caller's token rides
//! along, and each member is reached at its first client URL, over one
//! shared HTTP/2 connection.

use std::collections::HashMap;

use cairn_api::cairnpb::ShardRange;
use cairn_api::cairnpb::shard_reads_client::ShardReadsClient;
use cairn_api::etcdserverpb::RangeResponse;
use cairn_api::etcdserverpb::kv_client::KvClient;
use cairn_consensus::PeerInfo;
use cairn_shard_replica::{ShardWrite, WriteResponse};
use parking_lot::Mutex;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

/// Connections to the other members' client URLs, by member ID.
#[derive(Default)]
pub struct Forwarder {
    channels: Mutex<HashMap<u64, (String, Channel)>>,
}

impl Forwarder {
    /// A connection to `member` as `members` (the cluster group's list)
    /// gives its client URLs; made at first use.
    fn channel(&self, member: u64, members: &[PeerInfo]) -> Result<Channel, Status> {
        let url = members
            .iter()
            .find(|m| m.id == member)
            .and_then(|m| m.client_urls.first())
            .ok_or_else(|| {
                Status::unavailable(format!("cairn: no client URL known for member {member:x}"))
            })?;
        let mut channels = self.channels.lock();
        if let Some((known, channel)) = channels.get(&member)
            && known == url
        {
            return Ok(channel.clone());
        }
        let channel = Channel::from_shared(url.clone())
            .map_err(|e| Status::unavailable(format!("member {member:x}'s client URL: {e}")))?
            .connect_lazy();
        channels.insert(member, (url.clone(), channel.clone()));
        Ok(channel)
    }

    /// `write` through the first of `replicas` that answers (one that
    /// cannot be reached is skipped, as etcd's clients skip endpoints).
    pub async fn write(
        &self,
        replicas: &[u64],
        members: &[PeerInfo],
        token: Option<&str>,
        write: ShardWrite,
    ) -> Result<WriteResponse, Status> {
        let mut last = Status::unavailable("cairn: the shard has no replica");
        for &replica in replicas {
            let mut kv = KvClient::new(self.channel(replica, members)?);
            let answer = match write.clone() {
                ShardWrite::Put(r) => kv
                    .put(with_token(r, token)?)
                    .await
                    .map(|r| WriteResponse::Put(r.into_inner())),
                ShardWrite::DeleteRange(r) => kv
                    .delete_range(with_token(r, token)?)
                    .await
                    .map(|r| WriteResponse::DeleteRange(r.into_inner())),
                ShardWrite::Txn(r) => kv
                    .txn(with_token(r, token)?)
                    .await
                    .map(|r| WriteResponse::Txn(r.into_inner())),
            };
            match answer {
                Err(e) if unreachable(&e) => last = e,
                answer => return answer,
            }
        }
        Err(last)
    }

    /// `read` from the first of `replicas` that answers.
    pub async fn read(
        &self,
        replicas: &[u64],
        members: &[PeerInfo],
        token: Option<&str>,
        read: ShardRange,
    ) -> Result<RangeResponse, Status> {
        let mut last = Status::unavailable("cairn: the shard has no replica");
        for &replica in replicas {
            let mut client = ShardReadsClient::new(self.channel(replica, members)?);
            match client.range(with_token(read.clone(), token)?).await {
                Err(e) if unreachable(&e) => last = e,
                answer => return answer.map(tonic::Response::into_inner),
            }
        }
        Err(last)
    }
}

/// Whether the member could not be reached at all (so nothing was done):
/// the client's own Unavailable, not one the member answered with (those
/// are etcd's, "etcdserver: ...").
fn unreachable(status: &Status) -> bool {
    status.code() == Code::Unavailable && !status.message().starts_with("etcdserver:")
}

fn with_token<T>(message: T, token: Option<&str>) -> Result<Request<T>, Status> {
    let mut request = Request::new(message);
    if let Some(token) = token {
        let value = token
            .parse()
            .map_err(|_| Status::invalid_argument("cairn: the token is not valid metadata"))?;
        request.metadata_mut().insert("token", value);
    }
    Ok(request)
}
