//! Untrusted requests through the gateway: random methods, paths (every
//! route, with random segments, escapes, dots and slashes), query strings
//! of the v2 parameters with random values, `Authorization` headers, and
//! bodies: JSON built from the v3 and v2 auth fields with random values,
//! JSON of each /v3 route's request schema (from etcd's descriptors) with
//! values at the edges, v2 forms, or random bytes; in front of a member that answers every call
//! with an error, an empty message or random bytes. The gateway answers
//! each within a bound and never panics. `make fuzz` runs many more cases.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response};
use http_body_util::{BodyExt as _, Full, StreamBody};
use proptest::prelude::*;

use crate::{Gateway, Options, boxed};

/// A request's answer, body included, takes less than this; more is a hang.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// How the member behind the gateway answers every gRPC call.
#[derive(Debug, Clone)]
enum Member {
    /// A status, no message.
    Fails(i32),
    /// One message: empty (every field default) or these bytes.
    Answers(Vec<u8>),
}

fn member() -> impl Strategy<Value = Member> {
    prop_oneof![
        (1i32..17).prop_map(Member::Fails),
        Just(Member::Answers(Vec::new())),
        prop::collection::vec(any::<u8>(), 0..64).prop_map(Member::Answers),
    ]
}

type Frame = Result<http_body::Frame<Bytes>, Infallible>;

fn answer(member: &Member) -> Response<StreamBody<tokio_stream::Iter<std::vec::IntoIter<Frame>>>> {
    let mut frames = Vec::new();
    let mut trailers = HeaderMap::new();
    match member {
        Member::Fails(code) => {
            trailers.insert("grpc-status", HeaderValue::from(*code));
            trailers.insert("grpc-message", HeaderValue::from_static("refused"));
        }
        Member::Answers(message) => {
            let mut data = vec![0];
            data.extend((message.len() as u32).to_be_bytes());
            data.extend(message);
            frames.push(Ok(http_body::Frame::data(Bytes::from(data))));
            trailers.insert("grpc-status", HeaderValue::from(0));
        }
    }
    frames.push(Ok(http_body::Frame::trailers(trailers)));
    let mut response = Response::new(StreamBody::new(tokio_stream::iter(frames)));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    response
}

fn gateway(member: Member) -> Gateway {
    let grpc = tower::service_fn(move |_request: Request<tonic::body::Body>| {
        let member = member.clone();
        async move { Ok::<_, Infallible>(answer(&member)) }
    });
    Gateway::new(
        boxed(grpc),
        Options {
            server_version: "3.4.23".into(),
            cluster_version: "3.4.0".into(),
            enable_v2: true,
            max_request_bytes: 1 << 16,
            max_concurrent_streams: 100,
            metrics: None,
            shards: None,
        },
    )
    .expect("etcd's descriptors")
}

/// A path: a route's, with random segments after it.
fn path() -> impl Strategy<Value = String> {
    let mut routes: Vec<String> = crate::v3::ROUTES
        .iter()
        .flat_map(|(route, _, _)| [format!("/v3/{route}"), format!("/v3beta/{route}")])
        .collect();
    routes.extend(
        [
            "/v2/keys",
            "/v2/keys/",
            "/v2/keys/a/b",
            "/v2/members",
            "/v2/auth/enable",
            "/v2/auth/users",
            "/v2/auth/users/",
            "/v2/auth/roles",
            "/v2/auth/roles/",
            "/health",
            "/version",
            "/metrics",
            "/shards",
            "/",
        ]
        .map(String::from),
    );
    let segment = prop_oneof![
        Just(String::new()),
        Just(".".to_string()),
        Just("..".to_string()),
        Just("%2F".to_string()),
        Just("%00".to_string()),
        Just("%zz".to_string()),
        Just("root".to_string()),
        Just("guest".to_string()),
        Just("_hidden".to_string()),
        "[a-z%0-9]{1,6}",
        "\\PC{1,4}".prop_map(|s| form_urlencoded::byte_serialize(s.as_bytes()).collect()),
    ];
    (
        prop::sample::select(routes),
        prop::collection::vec(segment, 0..4),
    )
        .prop_map(|(route, segments)| {
            let mut path = route;
            for segment in segments {
                path.push('/');
                path.push_str(&segment);
            }
            path
        })
}

/// A value near what a field wants: numbers at the edges, flags, strings.
fn scalar() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("true".to_string()),
        Just("false".to_string()),
        Just(String::new()),
        Just("0".to_string()),
        Just("-1".to_string()),
        Just("18446744073709551616".to_string()),
        Just("9223372036854775807".to_string()),
        Just("1e400".to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        "[a-zA-Z0-9+/=]{0,12}",
        "\\PC{0,6}",
    ]
}

fn query() -> impl Strategy<Value = String> {
    let name = prop::sample::select(vec![
        "recursive",
        "sorted",
        "wait",
        "waitIndex",
        "prevExist",
        "prevValue",
        "prevIndex",
        "ttl",
        "dir",
        "value",
        "refresh",
        "quorum",
        "stream",
        "noValueOnSuccess",
        "serializable",
        "x",
    ]);
    prop::collection::vec((name, scalar()), 0..5).prop_map(|pairs| {
        form_urlencoded::Serializer::new(String::new())
            .extend_pairs(pairs)
            .finish()
    })
}

/// JSON of the fields the v3 API and v2 auth know, nested a little, with
/// random values.
fn json() -> impl Strategy<Value = serde_json::Value> {
    let field = prop::sample::select(vec![
        "key",
        "range_end",
        "rangeEnd",
        "value",
        "lease",
        "limit",
        "revision",
        "sort_order",
        "sortOrder",
        "sort_target",
        "keys_only",
        "count_only",
        "prev_kv",
        "ignore_value",
        "compare",
        "success",
        "failure",
        "request_put",
        "request_range",
        "request_delete_range",
        "request_txn",
        "target",
        "result",
        "create_request",
        "cancel_request",
        "watch_id",
        "start_revision",
        "filters",
        "ID",
        "TTL",
        "keys",
        "name",
        "password",
        "role",
        "user",
        "roles",
        "grant",
        "revoke",
        "permissions",
        "kv",
        "read",
        "write",
        "perm",
        "permType",
        "peerURLs",
        "isLearner",
        "physical",
        "election",
        "leader",
    ]);
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::Bool),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        scalar().prop_map(serde_json::Value::String),
    ];
    leaf.prop_recursive(3, 24, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
            prop::collection::vec((field.clone(), inner), 0..6).prop_map(|fields| {
                serde_json::Value::Object(
                    fields
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), v))
                        .collect(),
                )
            }),
        ]
    })
}

fn body() -> impl Strategy<Value = (Option<&'static str>, Vec<u8>)> {
    let content_type = prop_oneof![
        Just(None),
        Just(Some("application/json")),
        Just(Some("application/x-www-form-urlencoded")),
        Just(Some("text/plain")),
    ];
    (
        content_type,
        prop_oneof![
            3 => json().prop_map(|v| serde_json::to_vec(&v).unwrap_or_default()),
            2 => query().prop_map(String::into_bytes),
            1 => prop::collection::vec(any::<u8>(), 0..128),
        ],
    )
}

fn authorization() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        Just(None),
        "[ -~]{0,24}".prop_map(Some),
        ("\\PC{0,8}", "\\PC{0,8}").prop_map(|(user, password)| {
            use base64::Engine as _;
            let pair = format!("{user}:{password}");
            Some(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(pair)
            ))
        }),
    ]
}

fn method() -> impl Strategy<Value = Method> {
    prop_oneof![
        Just(Method::GET),
        Just(Method::POST),
        Just(Method::PUT),
        Just(Method::DELETE),
        Just(Method::HEAD),
        Just(Method::PATCH),
        Just(Method::OPTIONS),
    ]
}

fn through_gateway(
    member: Member,
    method: Method,
    uri: String,
    authorization: Option<String>,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> Result<(), TestCaseError> {
    let mut request = Request::builder().method(method).uri(uri);
    if let Some(value) = authorization {
        request = request.header(http::header::AUTHORIZATION, value);
    }
    if let Some(value) = content_type {
        request = request.header(http::header::CONTENT_TYPE, value);
    }
    // Not a request a client could send (http refuses the URI or header).
    let Ok(request) = request.body(Full::new(Bytes::from(body))) else {
        return Ok(());
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    runtime.block_on(async move {
        let gateway = gateway(member);
        let answered = tokio::time::timeout(ANSWER_TIMEOUT, async {
            let response = gateway.handle(request).await;
            let status = response.status();
            let _ = response.into_body().collect().await;
            status
        })
        .await;
        prop_assert!(answered.is_ok(), "no answer within {ANSWER_TIMEOUT:?}");
        Ok(())
    })
}

/// A small deterministic generator, seeded by proptest.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn edge_number(rng: &mut Rng) -> serde_json::Value {
    use serde_json::Value;
    match rng.below(9) {
        0 => Value::from(0),
        1 => Value::from(-1),
        2 => Value::from(i64::MAX),
        3 => Value::from(i64::MIN),
        4 => Value::from(u64::MAX),
        5 => Value::from(1u64 << 53 | 1),
        6 => Value::from(1.5),
        7 => Value::String("18446744073709551616".into()),
        _ => Value::from(rng.next() as i64),
    }
}

/// A value of any JSON type, for a field that wants another.
fn stray_value(rng: &mut Rng) -> serde_json::Value {
    use serde_json::Value;
    match rng.below(5) {
        0 => Value::Null,
        1 => Value::Bool(true),
        2 => Value::String("\u{0}\u{ffff}%zz".into()),
        3 => Value::Array(vec![Value::from(1)]),
        _ => edge_number(rng),
    }
}

/// JSON for `message` of etcd's schema: some of its fields, by their proto
/// or JSON names, with values of their kinds (edges included), now and then
/// of another kind, or a field it does not have.
fn message_json(
    message: &prost_reflect::MessageDescriptor,
    rng: &mut Rng,
    depth: u32,
) -> serde_json::Value {
    use serde_json::{Map, Value};
    let mut object = Map::new();
    for field in message.fields() {
        if rng.below(3) != 0 {
            continue;
        }
        let name = if rng.below(2) == 0 {
            field.name().to_string()
        } else {
            field.json_name().to_string()
        };
        let kind = field.kind();
        let value = if field.is_map() {
            Value::Object(Map::new())
        } else if field.is_list() {
            Value::Array(
                (0..rng.below(4))
                    .map(|_| kind_json(&kind, rng, depth))
                    .collect(),
            )
        } else {
            kind_json(&kind, rng, depth)
        };
        object.insert(name, value);
    }
    if rng.below(16) == 0 {
        object.insert("no_such_field".into(), Value::Null);
    }
    Value::Object(object)
}

fn kind_json(kind: &prost_reflect::Kind, rng: &mut Rng, depth: u32) -> serde_json::Value {
    use base64::Engine as _;
    use prost_reflect::Kind;
    use serde_json::Value;
    if rng.below(16) == 0 {
        return stray_value(rng);
    }
    match kind {
        Kind::Message(message) if depth < 4 => message_json(message, rng, depth + 1),
        Kind::Message(_) => Value::Object(serde_json::Map::new()),
        Kind::Enum(e) => {
            let values: Vec<_> = e.values().collect();
            match values.get(rng.below(values.len() + 1)) {
                Some(value) if rng.below(2) == 0 => Value::String(value.name().to_string()),
                Some(value) => Value::from(value.number()),
                None => Value::from(rng.next() as i32),
            }
        }
        Kind::Bool => Value::Bool(rng.below(2) == 0),
        Kind::String => {
            let len = rng.below(6);
            Value::String(
                (0..len)
                    .map(|_| char::from(b'a' + rng.below(3) as u8))
                    .collect(),
            )
        }
        Kind::Bytes => {
            let bytes: Vec<u8> = (0..rng.below(6)).map(|_| rng.next() as u8).collect();
            let mut text = base64::engine::general_purpose::STANDARD.encode(bytes);
            if rng.below(8) == 0 {
                text.push('!');
            }
            Value::String(text)
        }
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 | Kind::Uint64 | Kind::Fixed64 => {
            match edge_number(rng) {
                Value::Number(n) if rng.below(2) == 0 => Value::String(n.to_string()),
                other => other,
            }
        }
        Kind::Double | Kind::Float => match rng.below(4) {
            0 => Value::String("NaN".into()),
            1 => Value::String("-Infinity".into()),
            _ => edge_number(rng),
        },
        _ => edge_number(rng),
    }
}

static TRANSCODER: std::sync::LazyLock<crate::v3::Transcoder> =
    std::sync::LazyLock::new(|| crate::v3::Transcoder::new().expect("etcd's descriptors"));

/// A /v3 route and a body of its request's schema.
fn v3_request() -> impl Strategy<Value = (String, Vec<u8>)> {
    let routes: Vec<&'static str> = crate::v3::ROUTES
        .iter()
        .map(|(route, _, _)| *route)
        .collect();
    (prop::sample::select(routes), any::<u64>()).prop_map(|(route, seed)| {
        let mut rng = Rng(seed | 1);
        let body = TRANSCODER
            .input(route)
            .map(|input| message_json(&input, &mut rng, 0))
            .unwrap_or_default();
        (
            format!("/v3/{route}"),
            serde_json::to_vec(&body).unwrap_or_default(),
        )
    })
}

proptest! {
    #[test]
    fn hostile_requests_never_panic(
        member in member(),
        method in method(),
        path in path(),
        query in query(),
        authorization in authorization(),
        (content_type, body) in body(),
    ) {
        let uri = if query.is_empty() { path } else { format!("{path}?{query}") };
        through_gateway(member, method, uri, authorization, content_type, body)?;
    }

    #[test]
    fn random_paths_and_bodies_never_panic(
        member in member(),
        path in "/[ -~]{0,40}",
        body in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        through_gateway(member.clone(), Method::POST, path.clone(), None, None, body.clone())?;
        through_gateway(member, Method::PUT, path, None, Some("application/x-www-form-urlencoded"), body)?;
    }

    #[test]
    fn v3_requests_of_etcds_schema_never_panic(
        member in member(),
        (path, body) in v3_request(),
        authorization in authorization(),
    ) {
        through_gateway(member, Method::POST, path, authorization, Some("application/json"), body)?;
    }
}
