//! etcd's v2 keys API (`/v2/keys`) and member list (`/v2/members`),
//! emulated on the v3 store through the member's gRPC services.
//!
//! Layout: a v2 node `/a/b` is the v3 key [`PREFIX`]`/a/b`; the prefix
//! starts with a NUL byte, so keys written by v3 clients (which are text in
//! practice) do not collide with it, and v2 clients see nothing of the v3
//! keyspace. A node's value is [`Record`]: whether it is a directory, the
//! v2 action that wrote it (watchers report it), its expiry time, then the
//! value. Parent directories are created with the node, in one txn. TTLs are
//! v3 leases, so keys expire through consensus. Indexes are v3 revisions:
//! createdIndex/modifiedIndex are the key's create/mod revisions and
//! X-Etcd-Index the store's revision. Writes read the nodes they depend on,
//! then commit a txn that compares their revisions, and retry if another
//! write came between. `wait=true` is a v3 watch from waitIndex (or the next
//! revision); as etcd v2 keeps only the last 1000 events, a waitIndex more
//! than 1000 revisions old is refused with 401 "event index cleared".

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use cairn_api::etcdserverpb::cluster_client::ClusterClient;
use cairn_api::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use cairn_api::etcdserverpb::kv_client::KvClient;
use cairn_api::etcdserverpb::lease_client::LeaseClient;
use cairn_api::etcdserverpb::request_op::Request as Op;
use cairn_api::etcdserverpb::response_op::Response as OpResponse;
use cairn_api::etcdserverpb::watch_client::WatchClient;
use cairn_api::etcdserverpb::watch_request::RequestUnion;
use cairn_api::etcdserverpb::{
    Compare, DeleteRangeRequest, LeaseGrantRequest, LeaseRevokeRequest, MemberListRequest,
    PutRequest, RangeRequest, RequestOp, TxnRequest, TxnResponse, WatchCreateRequest, WatchRequest,
};
use cairn_api::mvccpb::KeyValue;
use cairn_api::mvccpb::event::EventType;
use http::request::Parts;
use http::{Method, Response, StatusCode};
use serde::Serialize;
use tokio_stream::StreamExt as _;
use tonic::Status;

use crate::grpc::GrpcService;
use crate::v2_auth::Login;
use crate::{Body, ClientTlsInfo, full};

/// Where v2 nodes live in the v3 keyspace.
pub const PREFIX: &[u8] = b"\0cairn-v2";
/// How many events etcd's v2 store keeps for watchers.
const EVENT_HISTORY: i64 = 1000;
/// Attempts at a write whose nodes keep changing under it.
const WRITE_ATTEMPTS: usize = 16;

const KIND_FILE: u8 = b'f';
const KIND_DIR: u8 = b'd';

/// What wrote a node, as v2 watchers are told.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Action {
    Set,
    Create,
    Update,
    CompareAndSwap,
    /// A parent directory created along with a node: watchers hear of the
    /// node, not of it.
    Implicit,
}

impl Action {
    fn code(self) -> u8 {
        match self {
            Action::Set => b's',
            Action::Create => b'c',
            Action::Update => b'u',
            Action::CompareAndSwap => b'w',
            Action::Implicit => b'i',
        }
    }

    fn from_code(code: u8) -> Action {
        match code {
            b'c' => Action::Create,
            b'u' => Action::Update,
            b'w' => Action::CompareAndSwap,
            b'i' => Action::Implicit,
            _ => Action::Set,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Action::Set | Action::Implicit => "set",
            Action::Create => "create",
            Action::Update => "update",
            Action::CompareAndSwap => "compareAndSwap",
        }
    }
}

/// A node's stored value.
#[derive(Clone, Debug, PartialEq)]
struct Record {
    dir: bool,
    action: Action,
    /// Milliseconds since the Unix epoch.
    expires_ms: Option<i64>,
    /// The createdIndex of a node updated in place (update,
    /// compareAndSwap); None for a node (re)created by this write, whose
    /// createdIndex is its mod revision, as a v2 set replaces the node.
    created: Option<i64>,
    value: Vec<u8>,
}

impl Record {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(11 + self.value.len());
        out.push(if self.dir { KIND_DIR } else { KIND_FILE });
        out.push(self.action.code());
        for field in [self.expires_ms, self.created] {
            match field {
                Some(n) => {
                    out.push(1);
                    out.extend_from_slice(&n.to_be_bytes());
                }
                None => out.push(0),
            }
        }
        out.extend_from_slice(&self.value);
        out
    }

    fn decode(bytes: &[u8]) -> Option<Record> {
        let (&kind, rest) = bytes.split_first()?;
        let (&action, rest) = rest.split_first()?;
        let (expires_ms, rest) = optional_i64(rest)?;
        let (created, value) = optional_i64(rest)?;
        Some(Record {
            dir: kind == KIND_DIR,
            action: Action::from_code(action),
            expires_ms,
            created,
            value: value.to_vec(),
        })
    }
}

/// A presence byte, then the big-endian number if present.
fn optional_i64(bytes: &[u8]) -> Option<(Option<i64>, &[u8])> {
    let (&present, rest) = bytes.split_first()?;
    if present == 1 {
        let (n, rest) = rest.split_at_checked(8)?;
        Some((Some(i64::from_be_bytes(n.try_into().ok()?)), rest))
    } else {
        Some((None, rest))
    }
}

/// etcd's v2 errors.
#[derive(Debug)]
struct V2Error {
    code: u32,
    cause: String,
    index: i64,
}

impl V2Error {
    fn new(code: u32, cause: impl Into<String>, index: i64) -> Self {
        V2Error {
            code,
            cause: cause.into(),
            index,
        }
    }

    fn message(&self) -> &'static str {
        match self.code {
            100 => "Key not found",
            101 => "Compare failed",
            102 => "Not a file",
            104 => "Not a directory",
            105 => "Key already exists",
            107 => "Root is read only",
            108 => "Directory not empty",
            201 => "PrevValue is Required in POST form",
            202 => "The given TTL in POST form is not a number",
            203 => "The given index in POST form is not a number",
            209 => "Invalid field",
            110 => "The request requires user authentication",
            300 => "Raft Internal Error",
            401 => "The event in requested index is outdated and cleared",
            _ => "Internal error",
        }
    }

    fn status(&self) -> StatusCode {
        match self.code {
            100 => StatusCode::NOT_FOUND,
            102 | 108 => StatusCode::FORBIDDEN,
            101 | 105 => StatusCode::PRECONDITION_FAILED,
            110 => StatusCode::UNAUTHORIZED,
            300 => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    fn response(&self) -> Response<Body> {
        #[derive(Serialize)]
        struct ErrorBody<'a> {
            #[serde(rename = "errorCode")]
            error_code: u32,
            message: &'a str,
            cause: &'a str,
            index: i64,
        }
        let body = ErrorBody {
            error_code: self.code,
            message: self.message(),
            cause: &self.cause,
            index: self.index,
        };
        let mut json = serde_json::to_vec(&body).unwrap_or_default();
        json.push(b'\n');
        v2_response(self.status(), json, self.index)
    }
}

fn internal(status: Status) -> V2Error {
    let denied = matches!(
        status.code(),
        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
    ) || status.message().contains("user name is empty");
    if denied {
        return V2Error::new(110, "Insufficient credentials", 0);
    }
    V2Error::new(300, status.message().to_string(), 0)
}

fn v2_response(status: StatusCode, json: Vec<u8>, index: i64) -> Response<Body> {
    let mut response = Response::new(full(json));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    headers.insert("X-Etcd-Index", http::HeaderValue::from(index.max(0)));
    response
}

/// A node as v2 answers it.
#[derive(Serialize, Default, Debug, Clone)]
struct Node {
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    dir: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    expiration: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ttl: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    nodes: Option<Vec<Node>>,
    #[serde(rename = "modifiedIndex", skip_serializing_if = "is_zero")]
    modified_index: i64,
    #[serde(rename = "createdIndex", skip_serializing_if = "is_zero")]
    created_index: i64,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

#[derive(Serialize)]
struct Event {
    action: &'static str,
    node: Node,
    #[serde(rename = "prevNode", skip_serializing_if = "Option::is_none")]
    prev_node: Option<Node>,
}

/// A stored node: its path, record and revisions.
#[derive(Clone, Debug)]
struct Stored {
    path: String,
    record: Record,
    mod_revision: i64,
}

impl Stored {
    fn from_kv(kv: &KeyValue) -> Option<Stored> {
        let path = std::str::from_utf8(kv.key.strip_prefix(PREFIX)?).ok()?;
        Some(Stored {
            path: path.to_string(),
            record: Record::decode(&kv.value)?,
            mod_revision: kv.mod_revision,
        })
    }

    fn created_index(&self) -> i64 {
        self.record.created.unwrap_or(self.mod_revision)
    }

    /// The node alone (a directory without its children).
    fn node(&self, now_ms: i64) -> Node {
        let (expiration, ttl) = match self.record.expires_ms {
            Some(ms) => {
                let left = ms - now_ms;
                // Whole seconds left, rounded up, as etcd's v2 store.
                let ttl = left.div_euclid(1000) + i64::from(left.rem_euclid(1000) > 0);
                (Some(rfc3339(ms)), Some(ttl))
            }
            None => (None, None),
        };
        Node {
            key: Some(self.path.clone()),
            value: (!self.record.dir)
                .then(|| String::from_utf8_lossy(&self.record.value).into_owned()),
            dir: self.record.dir,
            expiration,
            ttl,
            nodes: None,
            modified_index: self.mod_revision,
            created_index: self.created_index(),
        }
    }
}

/// Milliseconds since the epoch as RFC 3339 in UTC, as Go prints times.
fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// `path.Clean("/" + path)`, as etcd's v2 store names nodes.
fn clean_path(raw: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in raw.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            part => parts.push(part),
        }
    }
    format!("/{}", parts.join("/"))
}

fn v3_key(path: &str) -> Vec<u8> {
    let mut key = PREFIX.to_vec();
    key.extend_from_slice(path.as_bytes());
    key
}

/// The range end that covers every key starting with `prefix`.
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// `/a/b/c` → `["/a", "/a/b"]`.
fn ancestors(path: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(i) = path[at + 1..].find('/') {
        at += i + 1;
        out.push(path[..at].to_string());
    }
    out
}

fn is_hidden(name: &str) -> bool {
    name.starts_with('_')
}

/// The request's parameters: the query, then the form body over it, as
/// Go's `ParseForm` merges them.
struct Params(Vec<(String, String)>);

impl Params {
    fn parse(parts: &Parts, body: &[u8]) -> Params {
        let mut params = Vec::new();
        let form = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_none_or(|v| v.starts_with("application/x-www-form-urlencoded"));
        if form && !body.is_empty() {
            params.extend(parse_urlencoded(body));
        }
        if let Some(query) = parts.uri.query() {
            params.extend(parse_urlencoded(query.as_bytes()));
        }
        Params(params)
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn flag(&self, name: &str) -> bool {
        self.get(name) == Some("true")
    }
}

fn parse_urlencoded(input: &[u8]) -> Vec<(String, String)> {
    input
        .split(|&b| b == b'&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (name, value) = match pair.iter().position(|&b| b == b'=') {
                Some(i) => (&pair[..i], &pair[i + 1..]),
                None => (pair, &[][..]),
            };
            (percent_decode(name), percent_decode(value))
        })
        .collect()
}

fn percent_decode(input: &[u8]) -> String {
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        match input[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < input.len() => {
                let hex = std::str::from_utf8(&input[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

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
        response
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

    /// The node at `path` and, for a directory, every node under it, at one
    /// revision.
    async fn read_tree(&self, path: &str) -> Result<(i64, Option<Stored>, Vec<Stored>), V2Error> {
        let key = v3_key(path);
        let mut children_prefix = key.clone();
        if path != "/" {
            children_prefix.push(b'/');
        }
        let txn = TxnRequest {
            compare: Vec::new(),
            success: vec![
                range_op(key, Vec::new()),
                range_op(children_prefix.clone(), prefix_end(&children_prefix)),
            ],
            failure: Vec::new(),
        };
        let reply = self.kv().txn(txn).await.map_err(internal)?.into_inner();
        let revision = reply.header.as_ref().map_or(0, |h| h.revision);
        let mut ranges = reply
            .responses
            .into_iter()
            .filter_map(|r| match r.response {
                Some(OpResponse::ResponseRange(range)) => Some(range),
                _ => None,
            });
        let node = ranges
            .next()
            .and_then(|r| r.kvs.first().and_then(Stored::from_kv));
        let children = ranges
            .next()
            .map(|r| r.kvs.iter().filter_map(Stored::from_kv).collect())
            .unwrap_or_default();
        Ok((revision, node, children))
    }

    async fn get(&self, path: &str, params: &Params) -> Result<Response<Body>, V2Error> {
        let (revision, node, children) = self.read_tree(path).await?;
        let now = now_ms();
        let node = match node {
            Some(stored) if !stored.record.dir => stored.node(now),
            Some(stored) => {
                let mut node = stored.node(now);
                node.nodes = listing(path, &children, params.flag("recursive"), now);
                node
            }
            None if path == "/" => Node {
                dir: true,
                nodes: listing(path, &children, params.flag("recursive"), now),
                ..Node::default()
            },
            None => return Err(V2Error::new(100, path, revision)),
        };
        let event = Event {
            action: "get",
            node,
            prev_node: None,
        };
        Ok(v2_response(StatusCode::OK, event_json(&event), revision))
    }

    async fn put(&self, path: &str, params: &Params) -> Result<Response<Body>, V2Error> {
        if path == "/" {
            return Err(V2Error::new(107, "/", 0));
        }
        let dir = params.flag("dir");
        let value = params.get("value").unwrap_or("").to_string();
        let ttl = parse_ttl(params)?;
        let prev_exist = match params.get("prevExist") {
            None | Some("") => None,
            Some("true") => Some(true),
            Some("false") => Some(false),
            Some(_) => return Err(V2Error::new(209, "prevExist", 0)),
        };
        let prev_value = params.get("prevValue").filter(|v| !v.is_empty());
        let prev_index = match params.get("prevIndex").filter(|v| !v.is_empty()) {
            Some(index) => Some(
                index
                    .parse::<i64>()
                    .map_err(|_| V2Error::new(203, "CompareAndSwap", 0))?,
            ),
            None => None,
        };
        if params.get("prevValue") == Some("") {
            return Err(V2Error::new(201, "CompareAndSwap", 0));
        }
        let write = Write {
            path: path.to_string(),
            dir,
            value,
            ttl,
            prev_exist,
            prev_value: prev_value.map(str::to_string),
            prev_index,
        };
        self.write(write).await
    }

    /// An in-order key in directory `path`, named after the index it is
    /// created at.
    async fn post(&self, path: &str, params: &Params) -> Result<Response<Body>, V2Error> {
        let value = params.get("value").unwrap_or("").to_string();
        let ttl = parse_ttl(params)?;
        for _ in 0..WRITE_ATTEMPTS {
            let revision = self.current_revision().await?;
            let write = Write {
                path: format!("{}/{:020}", path.trim_end_matches('/'), revision + 1),
                dir: params.flag("dir"),
                value: value.clone(),
                ttl,
                prev_exist: Some(false),
                prev_value: None,
                prev_index: None,
            };
            match self.write(write).await {
                // Another write took the name: take the next revision's.
                Err(e) if e.code == 105 => continue,
                other => return other,
            }
        }
        Err(V2Error::new(300, "too many concurrent writes", 0))
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

    /// A set, create, update or compare-and-swap.
    async fn write(&self, write: Write) -> Result<Response<Body>, V2Error> {
        let parents = ancestors(&write.path);
        for _ in 0..WRITE_ATTEMPTS {
            // The node and its parents, at one revision.
            let mut ops = vec![range_op(v3_key(&write.path), Vec::new())];
            ops.extend(parents.iter().map(|p| range_op(v3_key(p), Vec::new())));
            let reply = self
                .kv()
                .txn(TxnRequest {
                    compare: Vec::new(),
                    success: ops,
                    failure: Vec::new(),
                })
                .await
                .map_err(internal)?
                .into_inner();
            let revision = reply.header.as_ref().map_or(0, |h| h.revision);
            let found: Vec<Option<Stored>> = reply
                .responses
                .iter()
                .map(|r| match &r.response {
                    Some(OpResponse::ResponseRange(range)) => {
                        range.kvs.first().and_then(Stored::from_kv)
                    }
                    _ => None,
                })
                .collect();
            let current = found.first().cloned().flatten();
            let mut compare = Vec::new();
            let mut success = Vec::new();
            for (parent, stored) in parents.iter().zip(found.iter().skip(1)) {
                match stored {
                    Some(s) if !s.record.dir => return Err(V2Error::new(104, parent, revision)),
                    Some(s) => compare.push(mod_revision_is(v3_key(parent), s.mod_revision)),
                    None => {
                        compare.push(mod_revision_is(v3_key(parent), 0));
                        success.push(put_op(
                            v3_key(parent),
                            Record {
                                dir: true,
                                action: Action::Implicit,
                                expires_ms: None,
                                created: None,
                                value: Vec::new(),
                            },
                            0,
                        ));
                    }
                }
            }
            let action = check_write(&write, current.as_ref(), revision)?;
            compare.push(mod_revision_is(
                v3_key(&write.path),
                current.as_ref().map_or(0, |c| c.mod_revision),
            ));
            let lease = match write.ttl {
                Some(ttl) => self.grant(ttl).await?,
                None => 0,
            };
            let record = Record {
                dir: write.dir,
                action,
                expires_ms: write.ttl.map(|ttl| now_ms() + ttl * 1000),
                created: match action {
                    Action::Update | Action::CompareAndSwap => {
                        current.as_ref().map(Stored::created_index)
                    }
                    _ => None,
                },
                value: if write.dir {
                    Vec::new()
                } else {
                    write.value.clone().into_bytes()
                },
            };
            success.push(put_op(v3_key(&write.path), record, lease));
            success.push(range_op(v3_key(&write.path), Vec::new()));
            let reply = self.txn(compare, success).await;
            let reply = match reply {
                Ok(reply) if reply.succeeded => reply,
                other => {
                    if lease != 0 {
                        self.revoke(lease).await;
                    }
                    other?;
                    continue;
                }
            };
            let index = reply.header.as_ref().map_or(0, |h| h.revision);
            let written = reply
                .responses
                .last()
                .and_then(|r| match &r.response {
                    Some(OpResponse::ResponseRange(range)) => {
                        range.kvs.first().and_then(Stored::from_kv)
                    }
                    _ => None,
                })
                .ok_or_else(|| V2Error::new(300, "the written node is missing", index))?;
            let now = now_ms();
            let created = current.is_none();
            let event = Event {
                action: action.name(),
                node: written.node(now),
                prev_node: current.map(|c| c.node(now)),
            };
            let status = if created && matches!(action, Action::Set | Action::Create) {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            return Ok(v2_response(status, event_json(&event), index));
        }
        Err(V2Error::new(300, "too many concurrent writes", 0))
    }

    async fn txn(
        &self,
        compare: Vec<Compare>,
        success: Vec<RequestOp>,
    ) -> Result<TxnResponse, V2Error> {
        Ok(self
            .kv()
            .txn(TxnRequest {
                compare,
                success,
                failure: Vec::new(),
            })
            .await
            .map_err(internal)?
            .into_inner())
    }

    async fn grant(&self, ttl: i64) -> Result<i64, V2Error> {
        let mut lease = LeaseClient::new(self.grpc.clone());
        let reply = lease
            .lease_grant(LeaseGrantRequest { ttl, id: 0 })
            .await
            .map_err(internal)?;
        Ok(reply.get_ref().id)
    }

    async fn revoke(&self, id: i64) {
        let mut lease = LeaseClient::new(self.grpc.clone());
        if let Err(e) = lease.lease_revoke(LeaseRevokeRequest { id }).await {
            tracing::debug!("v2: revoking unused lease {id:x}: {e}");
        }
    }

    async fn delete(&self, path: &str, params: &Params) -> Result<Response<Body>, V2Error> {
        if path == "/" {
            return Err(V2Error::new(107, "/", 0));
        }
        let recursive = params.flag("recursive");
        let dir = params.flag("dir") || recursive;
        let prev_value = params.get("prevValue").filter(|v| !v.is_empty());
        let prev_index = match params.get("prevIndex").filter(|v| !v.is_empty()) {
            Some(index) => Some(
                index
                    .parse::<i64>()
                    .map_err(|_| V2Error::new(203, "CompareAndDelete", 0))?,
            ),
            None => None,
        };
        for _ in 0..WRITE_ATTEMPTS {
            let (revision, node, children) = self.read_tree(path).await?;
            let Some(current) = node else {
                return Err(V2Error::new(100, path, revision));
            };
            if current.record.dir {
                if !dir {
                    return Err(V2Error::new(102, path, revision));
                }
                if !recursive && !children.is_empty() {
                    return Err(V2Error::new(108, path, revision));
                }
            }
            let compare_and_delete = prev_value.is_some() || prev_index.is_some();
            if compare_and_delete {
                if current.record.dir {
                    return Err(V2Error::new(102, path, revision));
                }
                if let Some(cause) = compare_fail_cause(&current, prev_value, prev_index) {
                    return Err(V2Error::new(101, cause, revision));
                }
            }
            let key = v3_key(path);
            let mut success = vec![RequestOp {
                request: Some(Op::RequestDeleteRange(DeleteRangeRequest {
                    key: key.clone().into(),
                    ..Default::default()
                })),
            }];
            if current.record.dir {
                let mut children_prefix = key.clone();
                children_prefix.push(b'/');
                success.push(RequestOp {
                    request: Some(Op::RequestDeleteRange(DeleteRangeRequest {
                        key: children_prefix.clone().into(),
                        range_end: prefix_end(&children_prefix).into(),
                        ..Default::default()
                    })),
                });
            }
            let reply = self
                .txn(vec![mod_revision_is(key, current.mod_revision)], success)
                .await?;
            if !reply.succeeded {
                continue;
            }
            let index = reply.header.as_ref().map_or(0, |h| h.revision);
            let now = now_ms();
            let event = Event {
                action: if compare_and_delete {
                    "compareAndDelete"
                } else {
                    "delete"
                },
                node: Node {
                    key: Some(path.to_string()),
                    dir: current.record.dir,
                    modified_index: index,
                    created_index: current.created_index(),
                    ..Node::default()
                },
                prev_node: Some(current.node(now)),
            };
            return Ok(v2_response(StatusCode::OK, event_json(&event), index));
        }
        Err(V2Error::new(300, "too many concurrent writes", 0))
    }

    /// A long poll: the first change to `path` (or under it, if recursive)
    /// at or after waitIndex.
    async fn wait(&self, path: &str, params: &Params) -> Result<Response<Body>, V2Error> {
        let recursive = params.flag("recursive");
        let current = self.current_revision().await?;
        let start = match params.get("waitIndex").filter(|v| !v.is_empty()) {
            Some(index) => index
                .parse::<i64>()
                .map_err(|_| V2Error::new(203, "Watch", current))?,
            None => 0,
        };
        // waitIndex 0 (what etcdctl sends without --after-index) means the
        // next change, as in etcd's v2 store.
        let start = if start == 0 { current + 1 } else { start };
        let oldest = (current - EVENT_HISTORY + 1).max(1);
        if start < oldest {
            return Err(V2Error::new(
                401,
                format!("the requested history has been cleared [{oldest}/{start}]"),
                current,
            ));
        }
        let key = v3_key(path);
        let mut watch_prefix = key.clone();
        if path != "/" {
            watch_prefix.push(b'/');
        }
        // One range covers the node and everything under it; events for
        // neighbours that merely share the prefix (/foo2 for /foo) are
        // dropped below.
        let create = WatchCreateRequest {
            key: key.clone().into(),
            range_end: prefix_end(&key).into(),
            start_revision: start.max(1),
            prev_kv: true,
            ..Default::default()
        };
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let _ = tx
            .send(WatchRequest {
                request_union: Some(RequestUnion::CreateRequest(create)),
            })
            .await;
        let mut watch = WatchClient::new(self.grpc.clone());
        // `tx` lives as long as this poll, so the stream stays open.
        let mut responses = watch
            .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map_err(internal)?
            .into_inner();
        while let Some(reply) = responses.next().await {
            let reply = reply.map_err(internal)?;
            if reply.compact_revision > 0 {
                return Err(V2Error::new(
                    401,
                    format!(
                        "the requested history has been cleared [{}/{start}]",
                        reply.compact_revision
                    ),
                    current,
                ));
            }
            if reply.canceled {
                return Err(V2Error::new(300, reply.cancel_reason, current));
            }
            for event in reply.events {
                let Some(kv) = event.kv.as_ref() else {
                    continue;
                };
                let Some(event_path) = kv
                    .key
                    .strip_prefix(PREFIX)
                    .and_then(|k| std::str::from_utf8(k).ok())
                else {
                    continue;
                };
                let under = path == "/"
                    || event_path
                        .strip_prefix(path)
                        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'));
                let matches = event_path == path
                    || (recursive && under && !event_path[path.len()..].split('/').any(is_hidden));
                if !matches || !under {
                    continue;
                }
                if let Some(v2_event) = watch_event(&event, kv, event_path) {
                    drop(tx);
                    return Ok(v2_response(StatusCode::OK, event_json(&v2_event), current));
                }
            }
        }
        Err(V2Error::new(300, "the watch ended", current))
    }
}

/// A v3 watch event as a v2 one; None for parent directories created along
/// with a node.
fn watch_event(event: &cairn_api::mvccpb::Event, kv: &KeyValue, path: &str) -> Option<Event> {
    let now = now_ms();
    let prev = event.prev_kv.as_ref().and_then(Stored::from_kv);
    if event.r#type == EventType::Delete as i32 {
        let expired = prev
            .as_ref()
            .and_then(|p| p.record.expires_ms)
            .is_some_and(|ms| ms <= now + 1000);
        return Some(Event {
            action: if expired { "expire" } else { "delete" },
            node: Node {
                key: Some(path.to_string()),
                dir: prev.as_ref().is_some_and(|p| p.record.dir),
                modified_index: kv.mod_revision,
                created_index: prev.as_ref().map_or(0, Stored::created_index),
                ..Node::default()
            },
            prev_node: prev.map(|p| p.node(now)),
        });
    }
    let stored = Stored::from_kv(kv)?;
    if stored.record.action == Action::Implicit {
        return None;
    }
    Some(Event {
        action: stored.record.action.name(),
        node: stored.node(now),
        prev_node: prev.map(|p| p.node(now)),
    })
}

/// What a PUT asks for.
struct Write {
    path: String,
    dir: bool,
    value: String,
    ttl: Option<i64>,
    prev_exist: Option<bool>,
    prev_value: Option<String>,
    prev_index: Option<i64>,
}

/// The action a write is, or the v2 error its conditions give against the
/// current node.
fn check_write(write: &Write, current: Option<&Stored>, revision: i64) -> Result<Action, V2Error> {
    let path = &write.path;
    if write.prev_value.is_some() || write.prev_index.is_some() {
        let Some(current) = current else {
            return Err(V2Error::new(100, path, revision));
        };
        if current.record.dir {
            return Err(V2Error::new(102, path, revision));
        }
        if let Some(cause) =
            compare_fail_cause(current, write.prev_value.as_deref(), write.prev_index)
        {
            return Err(V2Error::new(101, cause, revision));
        }
        return Ok(Action::CompareAndSwap);
    }
    match (write.prev_exist, current) {
        (Some(false), Some(_)) => Err(V2Error::new(105, path, revision)),
        (Some(false), None) => Ok(Action::Create),
        (Some(true), None) => Err(V2Error::new(100, path, revision)),
        (Some(true), Some(c)) if c.record.dir && !write.dir => {
            Err(V2Error::new(102, path, revision))
        }
        (Some(true), Some(_)) => Ok(Action::Update),
        (None, Some(c)) if c.record.dir => Err(V2Error::new(102, path, revision)),
        (None, _) => Ok(Action::Set),
    }
}

/// etcd's cause for a failed compare, or None when it holds.
fn compare_fail_cause(
    current: &Stored,
    prev_value: Option<&str>,
    prev_index: Option<i64>,
) -> Option<String> {
    let value = String::from_utf8_lossy(&current.record.value);
    let value_fails = prev_value.is_some_and(|v| v != value);
    let index_fails = prev_index.is_some_and(|i| i != current.mod_revision);
    match (value_fails, index_fails) {
        (false, false) => None,
        (true, false) => Some(format!("[{} != {value}]", prev_value.unwrap_or(""))),
        (false, true) => Some(format!(
            "[{} != {}]",
            prev_index.unwrap_or(0),
            current.mod_revision
        )),
        (true, true) => Some(format!(
            "[{} != {value}] [{} != {}]",
            prev_value.unwrap_or(""),
            prev_index.unwrap_or(0),
            current.mod_revision
        )),
    }
}

fn parse_ttl(params: &Params) -> Result<Option<i64>, V2Error> {
    match params.get("ttl").filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(ttl) => match ttl.parse::<i64>() {
            Ok(ttl) if ttl > 0 => Ok(Some(ttl)),
            _ => Err(V2Error::new(202, "Update", 0)),
        },
    }
}

/// The children of directory `path` among `descendants` (every node under
/// it), sorted by key, nested when recursive; hidden nodes left out.
fn listing(path: &str, descendants: &[Stored], recursive: bool, now: i64) -> Option<Vec<Node>> {
    let base = if path == "/" { "" } else { path };
    let mut nodes = Vec::new();
    for stored in descendants {
        let Some(rest) = stored
            .path
            .strip_prefix(base)
            .and_then(|r| r.strip_prefix('/'))
        else {
            continue;
        };
        if rest.contains('/') || is_hidden(rest) {
            continue;
        }
        let mut node = stored.node(now);
        if recursive && stored.record.dir {
            node.nodes = listing(&stored.path, descendants, true, now);
        }
        nodes.push(node);
    }
    nodes.sort_by(|a, b| a.key.cmp(&b.key));
    (!nodes.is_empty()).then_some(nodes)
}

fn event_json(event: &Event) -> Vec<u8> {
    let mut json = serde_json::to_vec(event).unwrap_or_default();
    json.push(b'\n');
    json
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

fn range_op(key: Vec<u8>, range_end: Vec<u8>) -> RequestOp {
    RequestOp {
        request: Some(Op::RequestRange(RangeRequest {
            key: key.into(),
            range_end: range_end.into(),
            ..Default::default()
        })),
    }
}

fn put_op(key: Vec<u8>, record: Record, lease: i64) -> RequestOp {
    RequestOp {
        request: Some(Op::RequestPut(PutRequest {
            key: key.into(),
            value: record.encode().into(),
            lease,
            ..Default::default()
        })),
    }
}

/// The key's mod revision is `revision` (0: the key does not exist).
fn mod_revision_is(key: Vec<u8>, revision: i64) -> Compare {
    Compare {
        result: CompareResult::Equal as i32,
        target: CompareTarget::Mod as i32,
        key: key.into(),
        range_end: Bytes::new(),
        target_union: Some(TargetUnion::ModRevision(revision)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        for record in [
            Record {
                dir: false,
                action: Action::CompareAndSwap,
                expires_ms: Some(1_700_000_000_123),
                created: Some(42),
                value: b"hello".to_vec(),
            },
            Record {
                dir: true,
                action: Action::Implicit,
                expires_ms: None,
                created: None,
                value: Vec::new(),
            },
        ] {
            assert_eq!(Record::decode(&record.encode()), Some(record));
        }
        assert_eq!(Record::decode(b"f"), None);
    }

    #[test]
    fn paths_are_cleaned_like_go() {
        assert_eq!(clean_path(""), "/");
        assert_eq!(clean_path("/foo/"), "/foo");
        assert_eq!(clean_path("//a/./b/../c"), "/a/c");
        assert_eq!(
            ancestors("/a/b/c"),
            vec!["/a".to_string(), "/a/b".to_string()]
        );
        assert!(ancestors("/a").is_empty());
    }

    #[test]
    fn forms_decode() {
        let params = parse_urlencoded(b"value=Hello+world%21&ttl=5&dir");
        assert_eq!(
            params,
            vec![
                ("value".to_string(), "Hello world!".to_string()),
                ("ttl".to_string(), "5".to_string()),
                ("dir".to_string(), String::new()),
            ]
        );
        assert_eq!(percent_decode(b"100%"), "100%");
    }

    #[test]
    fn times_print_as_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_795_690_811_008), "2026-11-26T11:00:11.008Z");
    }

    fn stored(path: &str, dir: bool, revision: i64) -> Stored {
        Stored {
            path: path.to_string(),
            record: Record {
                dir,
                action: Action::Set,
                expires_ms: None,
                created: None,
                value: if dir { Vec::new() } else { b"v".to_vec() },
            },
            mod_revision: revision,
        }
    }

    #[test]
    fn listings_nest_sort_and_hide() {
        let descendants = vec![
            stored("/dir/c", false, 10),
            stored("/dir/a", true, 9),
            stored("/dir/a/b", false, 9),
            stored("/dir/_hidden", false, 11),
        ];
        let flat = listing("/dir", &descendants, false, 0).expect("children");
        let keys: Vec<_> = flat.iter().filter_map(|n| n.key.clone()).collect();
        assert_eq!(keys, vec!["/dir/a", "/dir/c"]);
        assert!(flat[0].nodes.is_none());
        let nested = listing("/dir", &descendants, true, 0).expect("children");
        let inner = nested[0].nodes.as_ref().expect("nested");
        assert_eq!(inner[0].key.as_deref(), Some("/dir/a/b"));
    }

    #[test]
    fn writes_check_their_conditions() {
        let file = stored("/k", false, 7);
        let create = Write {
            path: "/k".to_string(),
            dir: false,
            value: "x".to_string(),
            ttl: None,
            prev_exist: Some(false),
            prev_value: None,
            prev_index: None,
        };
        assert_eq!(
            check_write(&create, Some(&file), 7)
                .map_err(|e| e.code)
                .err(),
            Some(105)
        );
        assert_eq!(check_write(&create, None, 7).ok(), Some(Action::Create));
        let cas = Write {
            prev_exist: None,
            prev_value: Some("w".to_string()),
            prev_index: Some(7),
            ..create
        };
        let error = check_write(&cas, Some(&file), 7).expect_err("compare fails");
        assert_eq!((error.code, error.cause.as_str()), (101, "[w != v]"));
        assert_eq!(check_write(&cas, None, 7).err().map(|e| e.code), Some(100));
    }
}
