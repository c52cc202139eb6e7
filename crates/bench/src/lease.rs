//! The lease-keepalive benchmark: every client grants a lease, then sends
//! keep-alives on its own LeaseKeepAlive stream, one at a time.

use anyhow::{Context as _, Result};
use cairn_api::etcdserverpb::lease_client::LeaseClient;
use cairn_api::etcdserverpb::{
    LeaseGrantRequest, LeaseKeepAliveRequest, LeaseKeepAliveResponse, LeaseRevokeRequest,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::Channel;

use crate::conn::Connections;
use crate::driver::Worker;

/// Long enough that no lease expires during a run.
const LEASE_TTL: i64 = 100;

pub struct KeepAliveWorker {
    lease: LeaseClient<Channel>,
    id: i64,
    requests: mpsc::Sender<LeaseKeepAliveRequest>,
    responses: Streaming<LeaseKeepAliveResponse>,
}

impl KeepAliveWorker {
    /// Grants one lease per client and opens its keep-alive stream.
    pub async fn all(conns: &Connections, clients: usize) -> Result<Vec<Self>> {
        let mut setup = tokio::task::JoinSet::new();
        for i in 0..clients {
            let channel = conns.get(i);
            setup.spawn(async move { KeepAliveWorker::open(channel).await });
        }
        let mut workers = Vec::with_capacity(clients);
        while let Some(worker) = setup.join_next().await {
            workers.push(worker.context("lease setup task")??);
        }
        Ok(workers)
    }

    async fn open(channel: Channel) -> Result<KeepAliveWorker> {
        let mut lease = LeaseClient::new(channel);
        let id = lease
            .lease_grant(LeaseGrantRequest {
                ttl: LEASE_TTL,
                id: 0,
            })
            .await
            .context("LeaseGrant")?
            .into_inner()
            .id;
        // A server may hold the stream's response headers until it answers
        // something, so the stream opens with one keep-alive queued, whose
        // answer is part of the setup.
        let (requests, rx) = mpsc::channel(1);
        requests
            .send(LeaseKeepAliveRequest { id })
            .await
            .context("queueing the first keep-alive")?;
        let responses = lease
            .lease_keep_alive(ReceiverStream::new(rx))
            .await
            .context("LeaseKeepAlive")?
            .into_inner();
        let mut worker = KeepAliveWorker {
            lease,
            id,
            requests,
            responses,
        };
        worker
            .responses
            .message()
            .await
            .context("the first keep-alive")?
            .context("keep-alive stream closed")?;
        Ok(worker)
    }

    /// Revokes the lease (best effort: the TTL ends it anyway).
    pub async fn revoke(mut self) {
        drop(self.requests);
        let _ = self
            .lease
            .lease_revoke(LeaseRevokeRequest { id: self.id })
            .await;
    }
}

impl Worker for KeepAliveWorker {
    async fn request(&mut self, _n: u64) -> Result<(), tonic::Status> {
        self.requests
            .send(LeaseKeepAliveRequest { id: self.id })
            .await
            .map_err(|_| tonic::Status::unavailable("keep-alive stream closed"))?;
        match self.responses.message().await? {
            Some(response) if response.ttl > 0 => Ok(()),
            Some(_) => Err(tonic::Status::not_found(
                "etcdserver: requested lease not found",
            )),
            None => Err(tonic::Status::unavailable("keep-alive stream closed")),
        }
    }
}
