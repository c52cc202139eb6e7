//! etcd's `/v3` JSON API as grpc-gateway serves it: each route is one gRPC
//! method; request bodies are the method's input message in the protobuf
//! JSON mapping (camelCase or proto field names, bytes as base64, 64-bit
//! integers as strings or numbers, enums by name or number), responses are
//! its output with proto field names and default values left out. Streamed
//! responses are one `{"result": …}` object per line.
//!
//! Messages are transcoded by reflection over etcd's descriptors, so the
//! gateway needs no code per method and forwards raw protobuf to gRPC.

use bytes::Bytes;
use http::{Response, StatusCode};
use prost::Message as _;
use prost_reflect::{
    DescriptorPool, DeserializeOptions, DynamicMessage, MessageDescriptor, MethodDescriptor,
    SerializeOptions,
};
use serde::Serialize;
use tokio_stream::StreamExt as _;
use tonic::{Code, Status};

use crate::grpc::Client;
use crate::{Body, json_response};

/// etcd's HTTP routes (after `/v3/`), and the gRPC method each one calls.
pub(crate) const ROUTES: &[(&str, &str, &str)] = &[
    ("kv/range", "etcdserverpb.KV", "Range"),
    ("kv/put", "etcdserverpb.KV", "Put"),
    ("kv/deleterange", "etcdserverpb.KV", "DeleteRange"),
    ("kv/txn", "etcdserverpb.KV", "Txn"),
    ("kv/compaction", "etcdserverpb.KV", "Compact"),
    ("watch", "etcdserverpb.Watch", "Watch"),
    ("lease/grant", "etcdserverpb.Lease", "LeaseGrant"),
    ("lease/revoke", "etcdserverpb.Lease", "LeaseRevoke"),
    ("kv/lease/revoke", "etcdserverpb.Lease", "LeaseRevoke"),
    ("lease/keepalive", "etcdserverpb.Lease", "LeaseKeepAlive"),
    ("lease/timetolive", "etcdserverpb.Lease", "LeaseTimeToLive"),
    (
        "kv/lease/timetolive",
        "etcdserverpb.Lease",
        "LeaseTimeToLive",
    ),
    ("lease/leases", "etcdserverpb.Lease", "LeaseLeases"),
    ("kv/lease/leases", "etcdserverpb.Lease", "LeaseLeases"),
    ("cluster/member/add", "etcdserverpb.Cluster", "MemberAdd"),
    (
        "cluster/member/remove",
        "etcdserverpb.Cluster",
        "MemberRemove",
    ),
    (
        "cluster/member/update",
        "etcdserverpb.Cluster",
        "MemberUpdate",
    ),
    ("cluster/member/list", "etcdserverpb.Cluster", "MemberList"),
    (
        "cluster/member/promote",
        "etcdserverpb.Cluster",
        "MemberPromote",
    ),
    ("maintenance/alarm", "etcdserverpb.Maintenance", "Alarm"),
    ("maintenance/status", "etcdserverpb.Maintenance", "Status"),
    (
        "maintenance/defragment",
        "etcdserverpb.Maintenance",
        "Defragment",
    ),
    // Hash and HashKV share this route in etcd's gateway; the later
    // registration, HashKV, is the one that answers.
    ("maintenance/hash", "etcdserverpb.Maintenance", "HashKV"),
    (
        "maintenance/snapshot",
        "etcdserverpb.Maintenance",
        "Snapshot",
    ),
    (
        "maintenance/transfer-leadership",
        "etcdserverpb.Maintenance",
        "MoveLeader",
    ),
    ("auth/enable", "etcdserverpb.Auth", "AuthEnable"),
    ("auth/disable", "etcdserverpb.Auth", "AuthDisable"),
    ("auth/authenticate", "etcdserverpb.Auth", "Authenticate"),
    ("auth/user/add", "etcdserverpb.Auth", "UserAdd"),
    ("auth/user/get", "etcdserverpb.Auth", "UserGet"),
    ("auth/user/list", "etcdserverpb.Auth", "UserList"),
    ("auth/user/delete", "etcdserverpb.Auth", "UserDelete"),
    (
        "auth/user/changepw",
        "etcdserverpb.Auth",
        "UserChangePassword",
    ),
    ("auth/user/grant", "etcdserverpb.Auth", "UserGrantRole"),
    ("auth/user/revoke", "etcdserverpb.Auth", "UserRevokeRole"),
    ("auth/role/add", "etcdserverpb.Auth", "RoleAdd"),
    ("auth/role/get", "etcdserverpb.Auth", "RoleGet"),
    ("auth/role/list", "etcdserverpb.Auth", "RoleList"),
    ("auth/role/delete", "etcdserverpb.Auth", "RoleDelete"),
    (
        "auth/role/grant",
        "etcdserverpb.Auth",
        "RoleGrantPermission",
    ),
    (
        "auth/role/revoke",
        "etcdserverpb.Auth",
        "RoleRevokePermission",
    ),
    ("lock/lock", "v3lockpb.Lock", "Lock"),
    ("lock/unlock", "v3lockpb.Lock", "Unlock"),
    ("election/campaign", "v3electionpb.Election", "Campaign"),
    ("election/proclaim", "v3electionpb.Election", "Proclaim"),
    ("election/leader", "v3electionpb.Election", "Leader"),
    ("election/observe", "v3electionpb.Election", "Observe"),
    ("election/resign", "v3electionpb.Election", "Resign"),
];

/// A route resolved against the descriptors.
struct Route {
    path: &'static str,
    grpc_path: String,
    method: MethodDescriptor,
}

pub struct Transcoder {
    routes: Vec<Route>,
}

#[derive(Debug, thiserror::Error)]
pub enum DescriptorError {
    #[error("etcd's descriptors do not decode: {0}")]
    Decode(#[from] prost_reflect::DescriptorError),
    #[error("etcd's descriptors have no method {0}/{1}")]
    MissingMethod(&'static str, &'static str),
}

impl Transcoder {
    pub fn new() -> Result<Self, DescriptorError> {
        let pool = DescriptorPool::decode(
            include_bytes!(concat!(env!("OUT_DIR"), "/etcd_descriptors.bin")).as_ref(),
        )?;
        let routes = ROUTES
            .iter()
            .map(|&(path, service, name)| {
                let method = pool
                    .get_service_by_name(service)
                    .and_then(|s| s.methods().find(|m| m.name() == name))
                    .ok_or(DescriptorError::MissingMethod(service, name))?;
                Ok(Route {
                    path,
                    grpc_path: format!("/{service}/{name}"),
                    method,
                })
            })
            .collect::<Result<_, DescriptorError>>()?;
        Ok(Transcoder { routes })
    }

    /// The request message of route `path`, for the fuzz harness.
    #[cfg(test)]
    pub(crate) fn input(&self, path: &str) -> Option<MessageDescriptor> {
        self.routes
            .iter()
            .find(|r| r.path == path)
            .map(|r| r.method.input())
    }

    /// Whether `path` (after the version prefix) is one of etcd's routes.
    pub fn knows(&self, path: &str) -> bool {
        self.routes.iter().any(|r| r.path == path)
    }

    /// Serves one request to route `path`, whose body is `body`.
    pub async fn call(
        &self,
        client: &Client,
        path: &str,
        body: &[u8],
        token: Option<&str>,
    ) -> Response<Body> {
        let Some(route) = self.routes.iter().find(|r| r.path == path) else {
            return crate::not_found();
        };
        let input = route.method.input();
        let messages = match decode_requests(&input, body) {
            Ok(messages) => messages,
            Err(e) => return error_response(&Status::invalid_argument(e)),
        };
        let output = route.method.output();
        if !route.method.is_client_streaming() && !route.method.is_server_streaming() {
            // An empty body is the empty message, as grpc-gateway reads it.
            let message = messages.into_iter().next().unwrap_or_default();
            return match client.unary(&route.grpc_path, message, token).await {
                Ok(reply) => match encode_reply(&output, reply) {
                    Ok(json) => json_response(StatusCode::OK, json),
                    Err(status) => error_response(&status),
                },
                Err(status) => error_response(&status),
            };
        }
        let requests: std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Bytes> + Send>> =
            if route.method.is_client_streaming() {
                let sent = tokio_stream::iter(messages);
                if route.path == "watch" {
                    // etcd keeps a watch stream going after the client closes
                    // its side, so an HTTP watch goes on once its requests
                    // are read; it ends when the HTTP client hangs up.
                    Box::pin(sent.chain(tokio_stream::pending()))
                } else {
                    Box::pin(sent)
                }
            } else {
                Box::pin(tokio_stream::iter(messages.into_iter().take(1)))
            };
        let (mut replies, stream_permit) =
            match client.streaming(&route.grpc_path, requests, token).await {
                Ok(stream) => (stream.messages, stream.permit),
                Err(status) => return error_response(&status),
            };
        // The status line waits for the first message: a stream that fails
        // before any gets the error's HTTP status, as grpc-gateway's does.
        let first = match replies.next().await {
            Some(Ok(reply)) => stream_chunk(&output, Ok(reply)),
            Some(Err(status)) => return error_response(&status),
            None => return json_response(StatusCode::OK, Vec::new()),
        };
        // The permit goes with the stream: it counts until the HTTP client
        // has gone.
        let rest = replies.map(move |reply| {
            let _holds = &stream_permit;
            stream_chunk(&output, reply)
        });
        let chunks = tokio_stream::once(first).chain(rest).map(|chunk| {
            Ok::<_, std::convert::Infallible>(http_body::Frame::data(Bytes::from(chunk)))
        });
        let mut response = Response::new(Body::new(http_body_util::StreamBody::new(chunks)));
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        response
    }
}

/// The request messages in a body: JSON objects one after another (one for
/// a unary method), each encoded as protobuf.
fn decode_requests(input: &MessageDescriptor, body: &[u8]) -> Result<Vec<Bytes>, String> {
    let mut messages = Vec::new();
    for value in serde_json::Deserializer::from_slice(body).into_iter::<serde_json::Value>() {
        let value = value.map_err(|e| e.to_string())?;
        let message = DynamicMessage::deserialize_with_options(
            input.clone(),
            value,
            &DeserializeOptions::new().deny_unknown_fields(true),
        )
        .map_err(|e| e.to_string())?;
        messages.push(Bytes::from(message.encode_to_vec()));
    }
    Ok(messages)
}

fn serialize_options() -> SerializeOptions {
    SerializeOptions::new()
        .use_proto_field_name(true)
        .skip_default_fields(true)
        .stringify_64_bit_integers(true)
        .use_enum_numbers(false)
}

/// A reply, from protobuf to grpc-gateway's JSON.
fn encode_reply(output: &MessageDescriptor, reply: Bytes) -> Result<Vec<u8>, Status> {
    let message = DynamicMessage::decode(output.clone(), reply)
        .map_err(|e| Status::internal(format!("undecodable gRPC reply: {e}")))?;
    let mut json = Vec::new();
    message
        .serialize_with_options(
            &mut serde_json::Serializer::new(&mut json),
            &serialize_options(),
        )
        .map_err(|e| Status::internal(format!("reply not expressible in JSON: {e}")))?;
    Ok(json)
}

/// One line of a streamed response: `{"result": …}` or, when the stream
/// fails, `{"error": …}` as grpc-gateway writes them.
fn stream_chunk(output: &MessageDescriptor, reply: Result<Bytes, Status>) -> Vec<u8> {
    let mut chunk = match reply.and_then(|r| encode_reply(output, r)) {
        Ok(json) => {
            let mut chunk = b"{\"result\":".to_vec();
            chunk.extend_from_slice(&json);
            chunk.push(b'}');
            chunk
        }
        Err(status) => {
            let http = http_status(status.code());
            let error = StreamError {
                grpc_code: status.code() as i32,
                http_code: http.as_u16(),
                message: status.message(),
                http_status: http.canonical_reason().unwrap_or(""),
            };
            serde_json::to_vec(&ErrorChunk { error }).unwrap_or_default()
        }
    };
    chunk.push(b'\n');
    chunk
}

#[derive(Serialize)]
struct ErrorChunk<'a> {
    error: StreamError<'a>,
}

#[derive(Serialize)]
struct StreamError<'a> {
    grpc_code: i32,
    http_code: u16,
    message: &'a str,
    http_status: &'a str,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    message: &'a str,
    code: i32,
}

/// grpc-gateway's answer to a failed call: the gRPC code's HTTP status and
/// `{"error": message, "message": message, "code": code}`.
pub fn error_response(status: &Status) -> Response<Body> {
    let body = ErrorBody {
        error: status.message(),
        message: status.message(),
        code: status.code() as i32,
    };
    json_response(
        http_status(status.code()),
        serde_json::to_vec(&body).unwrap_or_default(),
    )
}

/// grpc-gateway's mapping from gRPC codes to HTTP statuses.
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::REQUEST_TIMEOUT,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_api::etcdserverpb::{PutRequest, RangeRequest, RangeResponse, range_request};
    use cairn_api::mvccpb::KeyValue;

    fn transcoder() -> Transcoder {
        Transcoder::new().expect("etcd's descriptors")
    }

    fn input(t: &Transcoder, path: &str) -> MessageDescriptor {
        t.routes
            .iter()
            .find(|r| r.path == path)
            .expect("route")
            .method
            .input()
    }

    #[test]
    fn every_route_resolves() {
        let t = transcoder();
        assert_eq!(t.routes.len(), ROUTES.len());
        assert!(t.knows("kv/range") && t.knows("election/observe"));
        assert!(!t.knows("kv/nothing"));
    }

    #[test]
    fn requests_take_either_field_name_and_base64_and_enum_names() {
        let t = transcoder();
        let body = br#"{"key":"Zm9v","range_end":"Zm9w","sortOrder":"DESCEND","limit":"5","keys_only":true}"#;
        let messages = decode_requests(&input(&t, "kv/range"), body).expect("decodes");
        let request = RangeRequest::decode(messages[0].clone()).expect("protobuf");
        assert_eq!(request.key, b"foo".as_slice());
        assert_eq!(request.range_end, b"fop".as_slice());
        assert_eq!(request.sort_order, range_request::SortOrder::Descend as i32);
        assert_eq!(request.limit, 5);
        assert!(request.keys_only);
    }

    #[test]
    fn bad_requests_are_refused() {
        let t = transcoder();
        let put = input(&t, "kv/put");
        for body in [
            br#"{"key":"Zm9v"#.as_slice(),
            br#"{"key":"!!!"}"#,
            br#"{"kee":"Zm9v"}"#,
            br#"{"key":"Zm9v","lease":"x"}"#,
            br#"[1]"#,
        ] {
            assert!(
                decode_requests(&put, body).is_err(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        let empty = decode_requests(&put, b"").expect("an empty body is no message");
        assert!(empty.is_empty());
        let messages = decode_requests(&put, br#"{"key":"YQ==","value":"Yg=="}"#).expect("put");
        let put = PutRequest::decode(messages[0].clone()).expect("protobuf");
        assert_eq!(
            (put.key.as_ref(), put.value.as_ref()),
            (b"a".as_slice(), b"b".as_slice())
        );
    }

    #[test]
    fn replies_use_proto_names_strings_for_int64_and_skip_defaults() {
        let t = transcoder();
        let output = t
            .routes
            .iter()
            .find(|r| r.path == "kv/range")
            .expect("route")
            .method
            .output();
        let reply = RangeResponse {
            header: Some(cairn_api::etcdserverpb::ResponseHeader {
                cluster_id: 1,
                member_id: 2,
                revision: 3,
                raft_term: 4,
            }),
            kvs: vec![KeyValue {
                key: b"foo".to_vec().into(),
                create_revision: 2,
                mod_revision: 3,
                version: 1,
                value: b"bar".to_vec().into(),
                lease: 0,
            }],
            more: false,
            count: 1,
        };
        let json = encode_reply(&output, Bytes::from(reply.encode_to_vec())).expect("json");
        assert_eq!(
            String::from_utf8(json).expect("utf-8"),
            r#"{"header":{"cluster_id":"1","member_id":"2","revision":"3","raft_term":"4"},"kvs":[{"key":"Zm9v","create_revision":"2","mod_revision":"3","version":"1","value":"YmFy"}],"count":"1"}"#
        );
    }

    #[test]
    fn errors_look_like_grpc_gateways() {
        let response = error_response(&Status::invalid_argument("etcdserver: key is not provided"));
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let chunk = stream_chunk(
            &transcoder().routes[0].method.output(),
            Err(Status::unavailable("no leader")),
        );
        assert_eq!(
            String::from_utf8(chunk).expect("utf-8"),
            "{\"error\":{\"grpc_code\":14,\"http_code\":503,\"message\":\"no leader\",\"http_status\":\"Service Unavailable\"}}\n"
        );
    }
}
