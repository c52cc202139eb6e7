//! etcd's v2 keys API (`/v2/keys`) and member list (`/v2/members`),
//! emulated on the v3 store through the member's gRPC services.
//!
//! Layout: a v2 node `/a/b` is the v3 key [`PREFIX`]`/a/b`; the prefix
//! starts with a NUL byte, so keys written by v3 clients (which are text in
//! practice) do not collide with it, and v2 clients see nothing of the v3
//! keyspace. A node's value is a [`node::Record`]: whether it is a directory, the
//! v2 action that wrote it (watchers report it), its expiry time, then the
//! value. Parent directories are created with the node, in one txn. TTLs are
//! v3 leases, so keys expire through consensus. Indexes are v3 revisions:
//! createdIndex/modifiedIndex are the key's create/mod revisions and
//! X-Etcd-Index the store's revision. Writes read the nodes they depend on,
//! then commit a txn that compares their revisions, and retry if another
//! write came between. `wait=true` is a v3 watch from waitIndex (or the next
//! revision); as etcd v2 keeps only the last 1000 events, a waitIndex more
//! than 1000 revisions old is refused with 401 "event index cleared";
//! `stream=true` keeps sending events, one JSON line each. `refresh=true`
//! renews a node's TTL and keeps its value without telling watchers.
//! Successful answers carry X-Raft-Index and X-Raft-Term from the member's
//! status, as etcd's do.
//!
//! The pieces: [`node`] (how a node is stored and answered), [`params`]
//! (the request's form), [`error`] (etcd's v2 errors), [`read`] (gets and
//! long-poll waits) and [`write`] (sets, creates, compare-and-swaps and
//! deletes).

mod error;
mod node;
mod params;
mod read;
mod write;

use bytes::Bytes;
use cairn_api::etcdserverpb::cluster_client::ClusterClient;
use cairn_api::etcdserverpb::kv_client::KvClient;
use cairn_api::etcdserverpb::maintenance_client::MaintenanceClient;
use cairn_api::etcdserverpb::{MemberListRequest, RangeRequest, StatusRequest};
use http::request::Parts;
use http::{Method, Response, StatusCode};
use serde::Serialize;

use crate::grpc::GrpcService;
use crate::v2_auth::Login;
use crate::{Body, ClientTlsInfo, full};
use error::{V2Error, internal};
use node::clean_path;
pub(crate) use node::prefix_end;
use params::Params;

/// Where v2 nodes live in the v3 keyspace.
pub const PREFIX: &[u8] = b"\0cairn-v2";

/// The v2 API over one member's gRPC services.
pub struct Keys {
    grpc: GrpcService,
    /// For the X-Etcd-Cluster-Id header, learnt from the first reply.
    cluster_id: std::sync::OnceLock<u64>,
}

impl Keys {
    pub fn new(grpc: GrpcService) -> Self {
        Keys {
            grpc,
            cluster_id: std::sync::OnceLock::new(),
        }
    }

    /// The cluster's ID, asked once (a serializable read's header).
    async fn cluster_id(&self) -> Option<u64> {
        if let Some(id) = self.cluster_id.get() {
            return Some(*id);
        }
        let reply = self
            .kv()
            .range(RangeRequest {
                key: PREFIX.to_vec().into(),
                serializable: true,
                count_only: true,
                ..Default::default()
            })
            .await
            .ok()?;
        let id = reply.into_inner().header?.cluster_id;
        Some(*self.cluster_id.get_or_init(|| id))
    }

    pub async fn handle(&self, parts: Parts, body: Bytes) -> Response<Body> {
        let path = parts.uri.path().to_string();
        if path == "/v2/members" {
            return self.members(&parts).await;
        }
        let auth_api = path == "/v2/auth" || path.starts_with("/v2/auth/");
        let mut certificate_users = Vec::new();
        let grpc = match crate::v2_auth::login(&self.grpc, &parts).await {
            Login::Anonymous => {
                if let Some(tls) = parts.extensions.get::<ClientTlsInfo>() {
                    certificate_users = tls.chain_common_names.clone();
                }
                if auth_api {
                    self.grpc.clone()
                } else {
                    crate::v2_auth::as_guest(self.grpc.clone())
                }
            }
            Login::Token(token) => crate::v2_auth::with_token(self.grpc.clone(), &token),
            Login::Refused if auth_api => {
                return crate::v2_auth::AuthApi::refused();
            }
            Login::Refused => return V2Error::new(110, "Insufficient credentials", 0).response(),
        };
        if auth_api {
            return crate::v2_auth::AuthApi::new(grpc)
                .handle(&parts, &body)
                .await;
        }
        // Without basic auth, etcd's v2 API lets a request through as any
        // user the verified certificate chain names (its CA's included),
        // and else as the guest. A refused request changes nothing, so the
        // next may be tried.
        let mut response = None;
        for name in certificate_users {
            let grpc = crate::v2_auth::as_certificate_user(self.grpc.clone(), name);
            let tried = Keys::new(grpc).keys(&path, &parts, &body).await;
            if tried.status() != StatusCode::UNAUTHORIZED {
                response = Some(tried);
                break;
            }
        }
        let mut response = match response {
            Some(response) => response,
            None => Keys::new(grpc).keys(&path, &parts, &body).await,
        };
        if let Some(id) = self.cluster_id().await
            && let Ok(value) = http::HeaderValue::from_str(&format!("{id:x}"))
        {
            response.headers_mut().insert("X-Etcd-Cluster-Id", value);
        }
        // etcd's v2 answers name the raft position along with the store's
        // index; its errors do not.
        if response.status().is_success()
            && let Some((index, term)) = self.raft_position().await
        {
            let headers = response.headers_mut();
            headers.insert("X-Raft-Index", http::HeaderValue::from(index));
            headers.insert("X-Raft-Term", http::HeaderValue::from(term));
        }
        response
    }

    /// The member's raft index and term, from its status.
    async fn raft_position(&self) -> Option<(u64, u64)> {
        let mut maintenance = MaintenanceClient::new(self.grpc.clone());
        let status = maintenance
            .status(StatusRequest {})
            .await
            .ok()?
            .into_inner();
        Some((status.raft_index, status.raft_term))
    }

    async fn keys(&self, path: &str, parts: &Parts, body: &Bytes) -> Response<Body> {
        let key = clean_path(path.strip_prefix("/v2/keys").unwrap_or(""));
        let params = Params::parse(parts, body);
        let result = match parts.method {
            Method::GET | Method::HEAD if params.flag("wait") => self.wait(&key, &params).await,
            Method::GET | Method::HEAD => self.get(&key, &params).await,
            Method::PUT => self.put(&key, &params).await,
            Method::POST => self.post(&key, &params).await,
            Method::DELETE => self.delete(&key, &params).await,
            _ => {
                let mut response =
                    full_text(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed\n");
                response.headers_mut().insert(
                    http::header::ALLOW,
                    http::HeaderValue::from_static("GET, HEAD, POST, PUT, DELETE"),
                );
                return response;
            }
        };
        match result {
            Ok(response) => response,
            Err(e) => e.response(),
        }
    }

    async fn members(&self, parts: &Parts) -> Response<Body> {
        if parts.method != Method::GET {
            return full_text(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed\n");
        }
        #[derive(Serialize)]
        struct Member {
            id: String,
            name: String,
            #[serde(rename = "peerURLs")]
            peer_urls: Vec<String>,
            #[serde(rename = "clientURLs")]
            client_urls: Vec<String>,
        }
        let mut cluster = ClusterClient::new(self.grpc.clone());
        match cluster.member_list(MemberListRequest::default()).await {
            Ok(reply) => {
                let members: Vec<Member> = reply
                    .into_inner()
                    .members
                    .into_iter()
                    .map(|m| Member {
                        id: format!("{:x}", m.id),
                        name: m.name,
                        peer_urls: m.peer_ur_ls,
                        client_urls: m.client_ur_ls,
                    })
                    .collect();
                #[derive(Serialize)]
                struct Members {
                    members: Vec<Member>,
                }
                let json = serde_json::to_vec(&Members { members }).unwrap_or_default();
                let mut response = Response::new(full(json));
                response.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json"),
                );
                response
            }
            Err(status) => crate::v3::error_response(&status),
        }
    }

    fn kv(&self) -> KvClient<GrpcService> {
        KvClient::new(self.grpc.clone())
    }

    async fn current_revision(&self) -> Result<i64, V2Error> {
        let reply = self
            .kv()
            .range(RangeRequest {
                key: PREFIX.to_vec().into(),
                count_only: true,
                ..Default::default()
            })
            .await
            .map_err(internal)?;
        Ok(reply.get_ref().header.as_ref().map_or(0, |h| h.revision))
    }
}

fn full_text(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut response = Response::new(full(text));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
