//! The KV service: forwarded to the members, serializable ranges answered
//! from the read cache when it can, and the cache's own whole-keyspace
//! watch that keeps it honest.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cairn_api::error::{self, EtcdError};
use cairn_api::etcdserverpb::auth_client::AuthClient;
use cairn_api::etcdserverpb::kv_client::KvClient;
use cairn_api::etcdserverpb::kv_server::Kv;
use cairn_api::etcdserverpb::watch_client::WatchClient;
use cairn_api::etcdserverpb::watch_request::RequestUnion;
use cairn_api::etcdserverpb::{
    AuthenticateRequest, CompactionRequest, CompactionResponse, DeleteRangeRequest,
    DeleteRangeResponse, PutRequest, PutResponse, RangeRequest, RangeResponse, TxnRequest,
    TxnResponse, WatchCreateRequest, WatchRequest,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::cache::{KeyRange, ReadCache};
use crate::namespace::Namespace;
use crate::upstream::{Caller, MAX_MESSAGE, Retry, Upstream};

pub struct KvProxy {
    upstream: Upstream,
    namespace: Namespace,
    cache: Arc<ReadCache>,
}

impl KvProxy {
    pub fn new(upstream: Upstream, namespace: Namespace, cache: Arc<ReadCache>) -> KvProxy {
        KvProxy {
            upstream,
            namespace,
            cache,
        }
    }

    fn client(channel: Channel) -> KvClient<Channel> {
        KvClient::new(channel).max_decoding_message_size(MAX_MESSAGE)
    }

    /// Asks a member whether `caller` may read `range`'s keys now, without
    /// reading them: a range at a revision no store has reached is checked
    /// for permission and only then refused as a future revision (in etcd's
    /// order as in Cairn's), so that refusal is the member's yes.
    async fn confirm(&self, caller: &Caller, range: &RangeRequest) -> Result<(), Status> {
        let probe = RangeRequest {
            key: range.key.clone(),
            range_end: range.range_end.clone(),
            revision: i64::MAX,
            serializable: true,
            keys_only: true,
            limit: 1,
            ..RangeRequest::default()
        };
        let answer = self
            .upstream
            .call(Retry::Idempotent, |channel| {
                let request = caller.request(probe.clone());
                async move { Ok(Self::client(channel).range(request).await?.into_inner()) }
            })
            .await;
        match answer {
            // A member that read the keys anyway checked the permission too.
            Ok(_) => Ok(()),
            Err(status) if EtcdError::from_status(&status) == Some(error::FUTURE_REV) => Ok(()),
            Err(status) => Err(self.namespace.status(status)),
        }
    }
}

#[tonic::async_trait]
impl Kv for KvProxy {
    async fn range(
        &self,
        request: Request<RangeRequest>,
    ) -> Result<Response<RangeResponse>, Status> {
        let caller = Caller::of(request.metadata());
        let mut range = request.into_inner();
        self.namespace.range(&mut range)?;
        let identity = caller.identity();
        let cacheable = ReadCache::cacheable(&range);
        if cacheable && let Some(mut hit) = self.cache.get(identity.as_deref(), &range) {
            self.confirm(&caller, &range).await?;
            self.cache.served();
            self.namespace.range_response(&mut hit);
            return Ok(Response::new(hit));
        }
        let response = self
            .upstream
            .call(Retry::Idempotent, |channel| {
                let request = caller.request(range.clone());
                async move { Ok(Self::client(channel).range(request).await?.into_inner()) }
            })
            .await
            .map_err(|s| self.namespace.status(s))?;
        if cacheable {
            self.cache.insert(identity.as_deref(), &range, &response);
        }
        let mut response = response;
        self.namespace.range_response(&mut response);
        Ok(Response::new(response))
    }

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let caller = Caller::of(request.metadata());
        let mut put = request.into_inner();
        self.namespace.put(&mut put)?;
        let mut response = self
            .upstream
            .call(Retry::IfNotSent, |channel| {
                let request = caller.request(put.clone());
                async move { Ok(Self::client(channel).put(request).await?.into_inner()) }
            })
            .await
            .map_err(|s| self.namespace.status(s))?;
        if let Some(header) = &response.header {
            self.cache
                .changed(header.revision, KeyRange::new(put.key, Bytes::new()));
        }
        self.namespace.put_response(&mut response);
        Ok(Response::new(response))
    }

    async fn delete_range(
        &self,
        request: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        let caller = Caller::of(request.metadata());
        let mut delete = request.into_inner();
        self.namespace.delete(&mut delete)?;
        let mut response = self
            .upstream
            .call(Retry::IfNotSent, |channel| {
                let request = caller.request(delete.clone());
                async move {
                    Ok(Self::client(channel)
                        .delete_range(request)
                        .await?
                        .into_inner())
                }
            })
            .await
            .map_err(|s| self.namespace.status(s))?;
        if let Some(header) = &response.header {
            self.cache
                .changed(header.revision, KeyRange::new(delete.key, delete.range_end));
        }
        self.namespace.delete_response(&mut response);
        Ok(Response::new(response))
    }

    async fn txn(&self, request: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let caller = Caller::of(request.metadata());
        let mut txn = request.into_inner();
        self.namespace.txn(&mut txn)?;
        let mut response = self
            .upstream
            .call(Retry::IfNotSent, |channel| {
                let request = caller.request(txn.clone());
                async move { Ok(Self::client(channel).txn(request).await?.into_inner()) }
            })
            .await
            .map_err(|s| self.namespace.status(s))?;
        if let Some(header) = &response.header {
            self.cache.txn_changed(header.revision, &txn);
        }
        self.namespace.txn_response(&mut response);
        Ok(Response::new(response))
    }

    async fn compact(
        &self,
        request: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        let caller = Caller::of(request.metadata());
        let compact = request.into_inner();
        let response = self
            .upstream
            .call(Retry::IfNotSent, |channel| {
                let request = caller.request(compact);
                async move { Ok(Self::client(channel).compact(request).await?.into_inner()) }
            })
            .await?;
        Ok(Response::new(response))
    }
}

/// The user the cache's watch runs as under auth (`--cache-user
/// name:password`): it must be allowed to read every key.
#[derive(Clone)]
pub struct CacheUser {
    pub name: String,
    pub password: String,
}

impl CacheUser {
    /// etcdctl's `--user` form, `name:password`.
    pub fn parse(spec: &str) -> Option<CacheUser> {
        let (name, password) = spec.split_once(':')?;
        (!name.is_empty()).then(|| CacheUser {
            name: name.to_owned(),
            password: password.to_owned(),
        })
    }

    /// A fresh token, or none if auth is off.
    async fn token(&self, channel: Channel) -> Result<Caller, Status> {
        let request = AuthenticateRequest {
            name: self.name.clone(),
            password: self.password.clone(),
        };
        match AuthClient::new(channel).authenticate(request).await {
            Ok(response) => {
                let token = response.into_inner().token.parse().map_err(|_| {
                    Status::internal("the member's token is not valid gRPC metadata")
                })?;
                Ok(Caller { token: Some(token) })
            }
            Err(status) if EtcdError::from_status(&status) == Some(error::AUTH_NOT_ENABLED) => {
                Ok(Caller::default())
            }
            Err(status) => Err(status),
        }
    }
}

/// Keeps the cache's watch on the whole keyspace running, on whichever
/// member answers, for as long as the proxy runs, as `user` when given
/// (authenticating again each time). A broken watch suspends the cache; the
/// next one starts it again, empty, at its own revision.
pub async fn run_cache_watch(upstream: Upstream, cache: Arc<ReadCache>, user: Option<CacheUser>) {
    loop {
        let (index, channel) = upstream.channel();
        let caller = match &user {
            Some(user) => user.token(channel.clone()).await,
            None => Ok(Caller::default()),
        };
        let watched = match caller {
            Ok(caller) => cache_watch(channel, &caller, &cache).await,
            Err(status) => Err(status),
        };
        if let Err(status) = watched {
            tracing::debug!("grpc-proxy: cache watch ended: {status}");
            if crate::upstream::member_failed(&status) {
                upstream.failed(index);
            }
        }
        cache.suspend();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn cache_watch(channel: Channel, caller: &Caller, cache: &ReadCache) -> Result<(), Status> {
    let (tx, rx) = mpsc::channel(1);
    let create = WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: Bytes::from_static(&[0]),
            range_end: Bytes::from_static(&[0]),
            ..Default::default()
        })),
    };
    tx.send(create)
        .await
        .map_err(|_| Status::internal("watch request stream closed"))?;
    let mut responses = WatchClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .watch(caller.request(ReceiverStream::new(rx)))
        .await?
        .into_inner();
    while let Some(response) = responses.message().await? {
        if response.canceled {
            return Err(Status::cancelled(format!(
                "cache watch canceled: {}",
                response.cancel_reason
            )));
        }
        if response.created {
            let revision = response.header.map_or(0, |h| h.revision);
            cache.resume(revision);
            continue;
        }
        let Some(last) = response
            .events
            .last()
            .and_then(|e| e.kv.as_ref())
            .map(|kv| kv.mod_revision)
        else {
            continue;
        };
        for event in &response.events {
            if let Some(kv) = &event.kv {
                cache.changed(kv.mod_revision, KeyRange::new(kv.key.clone(), Bytes::new()));
            }
        }
        cache.advance(last);
    }
    // Keep the request side open for as long as the responses come.
    drop(tx);
    Err(Status::unavailable("cache watch stream ended"))
}
