//! The Lease service. Keep-alives are coalesced: every client stream's
//! requests go up one shared LeaseKeepAlive stream, and a request for a
//! lease that already has one in flight waits for that one's answer instead
//! of sending another.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use cairn_api::etcdserverpb::lease_client::LeaseClient;
use cairn_api::etcdserverpb::lease_server::Lease;
use cairn_api::etcdserverpb::{
    LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse,
    LeaseLeasesRequest, LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse,
    LeaseTimeToLiveRequest, LeaseTimeToLiveResponse,
};
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::Stream;
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};
use tonic::{Request, Response, Status, Streaming};

use crate::cache::{KeyRange, ReadCache};
use crate::metrics::Metrics;
use crate::namespace::Namespace;
use crate::upstream::{Caller, MAX_MESSAGE, Retry, Upstream};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// How long a keep-alive waits for the member's answer before giving up
/// (the client's own keep-alive loop sends the next one).
const RENEW_TIMEOUT: Duration = Duration::from_secs(5);

pub struct LeaseProxy {
    pub upstream: Upstream,
    pub namespace: Namespace,
    pub cache: Arc<ReadCache>,
    pub keepalives: Arc<KeepAlives>,
    pub metrics: Arc<Metrics>,
}

impl LeaseProxy {
    fn client(channel: tonic::transport::Channel) -> LeaseClient<tonic::transport::Channel> {
        LeaseClient::new(channel).max_decoding_message_size(MAX_MESSAGE)
    }
}

#[tonic::async_trait]
impl Lease for LeaseProxy {
    async fn lease_grant(
        &self,
        request: Request<LeaseGrantRequest>,
    ) -> Result<Response<LeaseGrantResponse>, Status> {
        let (caller, grant) = (Caller::of(request.metadata()), request.into_inner());
        let response = self
            .upstream
            .call(Retry::IfNotSent, |channel| {
                let request = caller.request(grant);
                async move {
                    Ok(Self::client(channel)
                        .lease_grant(request)
                        .await?
                        .into_inner())
                }
            })
            .await?;
        Ok(Response::new(response))
    }

    async fn lease_revoke(
        &self,
        request: Request<LeaseRevokeRequest>,
    ) -> Result<Response<LeaseRevokeResponse>, Status> {
        let (caller, revoke) = (Caller::of(request.metadata()), request.into_inner());
        let response = self
            .upstream
            .call(Retry::IfNotSent, |channel| {
                let request = caller.request(revoke);
                async move {
                    Ok(Self::client(channel)
                        .lease_revoke(request)
                        .await?
                        .into_inner())
                }
            })
            .await?;
        // The keys the lease held are unknown here: all cached reads from
        // before the revoke go.
        if let Some(header) = &response.header {
            self.cache.changed(header.revision, KeyRange::everything());
        }
        Ok(Response::new(response))
    }

    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<BoxStream<LeaseKeepAliveResponse>>, Status> {
        let mut requests = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let keepalives = self.keepalives.clone();
        let metrics = self.metrics.clone();
        metrics.client_keepalive_streams.inc();
        tokio::spawn(async move {
            while let Ok(Some(request)) = requests.message().await {
                let keepalives = keepalives.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    if let Some(response) = keepalives.renew(request.id).await {
                        let _ = tx.send(Ok(response)).await;
                    }
                });
            }
            metrics.client_keepalive_streams.dec();
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let (caller, ttl) = (Caller::of(request.metadata()), request.into_inner());
        let mut response = self
            .upstream
            .call(Retry::Idempotent, |channel| {
                let request = caller.request(ttl);
                async move {
                    Ok(Self::client(channel)
                        .lease_time_to_live(request)
                        .await?
                        .into_inner())
                }
            })
            .await?;
        // As etcd's namespace client: keys outside the namespace are not the
        // caller's to see.
        if !self.namespace.is_empty() {
            response.keys = response
                .keys
                .iter()
                .filter_map(|k| self.namespace.inside(k))
                .collect();
        }
        Ok(Response::new(response))
    }

    async fn lease_leases(
        &self,
        request: Request<LeaseLeasesRequest>,
    ) -> Result<Response<LeaseLeasesResponse>, Status> {
        let (caller, leases) = (Caller::of(request.metadata()), request.into_inner());
        let response = self
            .upstream
            .call(Retry::Idempotent, |channel| {
                let request = caller.request(leases);
                async move {
                    Ok(Self::client(channel)
                        .lease_leases(request)
                        .await?
                        .into_inner())
                }
            })
            .await?;
        Ok(Response::new(response))
    }
}

/// The one upstream keep-alive stream and the requests waiting on it.
pub struct KeepAlives {
    state: Mutex<KeepAliveState>,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct KeepAliveState {
    /// The open upstream stream's request side, when there is one.
    sender: Option<mpsc::UnboundedSender<LeaseKeepAliveRequest>>,
    /// Lease ID → callers waiting for its next answer. A lease is in the map
    /// exactly while a request for it is in flight.
    waiting: HashMap<i64, Vec<oneshot::Sender<LeaseKeepAliveResponse>>>,
}

impl KeepAlives {
    pub fn new(metrics: Arc<Metrics>) -> Arc<KeepAlives> {
        Arc::new(KeepAlives {
            state: Mutex::new(KeepAliveState::default()),
            metrics,
        })
    }

    /// Renews `id` once; `None` if the members did not answer in time.
    pub async fn renew(&self, id: i64) -> Option<LeaseKeepAliveResponse> {
        let (tx, rx) = oneshot::channel();
        {
            let mut state = self.state.lock();
            let waiters = state.waiting.entry(id).or_default();
            let first = waiters.is_empty();
            waiters.push(tx);
            if first {
                if let Some(sender) = &state.sender {
                    let _ = sender.send(LeaseKeepAliveRequest { id });
                }
            } else {
                self.metrics.keepalives_coalesced.inc();
            }
        }
        match tokio::time::timeout(RENEW_TIMEOUT, rx).await {
            Ok(Ok(response)) => Some(response),
            Ok(Err(_)) => None,
            Err(_) => {
                // The request (or its answer) was lost: the next caller for
                // this lease sends a fresh one.
                self.state.lock().waiting.remove(&id);
                None
            }
        }
    }

    /// Keeps the upstream stream open on whichever member answers, resending
    /// what was in flight when a stream broke.
    pub async fn run(self: Arc<Self>, upstream: Upstream) {
        loop {
            let (index, channel) = upstream.channel();
            let (tx, rx) = mpsc::unbounded_channel();
            let stream = LeaseClient::new(channel)
                .lease_keep_alive(UnboundedReceiverStream::new(rx))
                .await;
            let mut responses = match stream {
                Ok(r) => r.into_inner(),
                Err(status) => {
                    tracing::debug!("grpc-proxy: keep-alive stream: {status}");
                    upstream.failed(index);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            {
                let mut state = self.state.lock();
                for id in state.waiting.keys() {
                    let _ = tx.send(LeaseKeepAliveRequest { id: *id });
                }
                state.sender = Some(tx);
            }
            self.metrics.upstream_keepalive_streams.inc();
            loop {
                match responses.message().await {
                    Ok(Some(response)) => {
                        let waiters = self.state.lock().waiting.remove(&response.id);
                        for waiter in waiters.into_iter().flatten() {
                            let _ = waiter.send(response);
                        }
                    }
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!("grpc-proxy: keep-alive stream broke: {status}");
                        if crate::upstream::member_failed(&status) {
                            upstream.failed(index);
                        }
                        break;
                    }
                }
            }
            self.state.lock().sender = None;
            self.metrics.upstream_keepalive_streams.dec();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
