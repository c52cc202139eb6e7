//! Cairn's HTTP side, served on the client URLs beside gRPC and on
//! `--listen-metrics-urls`:
//!
//! - `/v3/…` (and `/v3beta/…`): etcd's JSON API in grpc-gateway's encoding
//!   ([`v3`]), translated to the member's gRPC services.
//! - `/v2/keys` and `/v2/members`: etcd's v2 API emulated on the v3 store,
//!   when enabled ([`v2`]).
//! - `/health`, `/version` and Prometheus `/metrics`.
//!
//! Like etcd's own gateway, it reaches the member only through gRPC, so it
//! works over any tower service that answers gRPC: a tonic `Channel` to a
//! remote member, or a member's own routes called in process.
//!
//! ```
//! use std::sync::Arc;
//! use cairn_gateway::{Gateway, Options, boxed};
//! use http_body_util::BodyExt as _;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # tokio::runtime::Runtime::new()?.block_on(async {
//! // The member's gRPC side: here a tonic channel to an address nobody serves,
//! // which the pages below never call.
//! let grpc = tonic::transport::Endpoint::from_static("http://127.0.0.1:9").connect_lazy();
//! let gateway = Gateway::new(boxed(grpc), Options {
//!     server_version: "3.4.23".into(),
//!     cluster_version: "3.4.0".into(),
//!     enable_v2: false,
//!     max_request_bytes: 1 << 20,
//!     max_concurrent_streams: 100,
//!     metrics: Some(Arc::new(|| "etcd_server_has_leader 1\n".to_string())),
//!     shards: None,
//! })?;
//!
//! let request = http::Request::get("/version").body(http_body_util::Empty::<bytes::Bytes>::new())?;
//! let body = gateway.handle(request).await.into_body().collect().await?.to_bytes();
//! assert_eq!(&body[..], br#"{"etcdserver":"3.4.23","etcdcluster":"3.4.0"}"#);
//!
//! let request = http::Request::get("/metrics").body(http_body_util::Empty::<bytes::Bytes>::new())?;
//! let body = gateway.metrics_only().handle(request).await.into_body().collect().await?.to_bytes();
//! assert_eq!(&body[..], b"etcd_server_has_leader 1\n");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # })
//! # }
//! ```

#[cfg(test)]
mod fuzz_tests;
mod grpc;
mod health;
pub mod tcp_proxy;
mod v2;
mod v2_auth;
mod v3;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt as _;

pub use grpc::{GrpcService, boxed};
pub use v3::DescriptorError;

/// What a TLS client connection's certificates say of the caller (the
/// member's client listeners attach it to every request).
pub use cairn_net::ClientTlsInfo;

/// Response bodies, as tonic's server sends them.
pub type Body = tonic::body::Body;

/// Renders the Prometheus text exposition of the member's metrics.
pub type MetricsSource = Arc<dyn Fn() -> String + Send + Sync>;

/// Renders a JSON document the member serves as it is.
pub type JsonSource = Arc<dyn Fn() -> Vec<u8> + Send + Sync>;

/// What the gateway reports and serves besides the v3 API.
#[derive(Clone)]
pub struct Options {
    /// etcd's server version this one is compatible with, for `/version`.
    pub server_version: String,
    /// etcd's cluster version, for `/version`.
    pub cluster_version: String,
    /// Serve `/v2/keys` and `/v2/members` (etcd's --enable-v2).
    pub enable_v2: bool,
    /// The largest request body accepted (etcd's --max-request-bytes).
    pub max_request_bytes: usize,
    /// How many gRPC calls the gateway keeps open at once (etcd's
    /// --max-concurrent-streams, which bounds its gateway's one connection).
    pub max_concurrent_streams: u32,
    /// `/metrics`, when the member keeps metrics.
    pub metrics: Option<MetricsSource>,
    /// `/shards` (Cairn's own), when the member's keyspace is sharded.
    pub shards: Option<JsonSource>,
}

/// The HTTP gateway: a tower service over HTTP requests of any body.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
    scope: Scope,
}

struct Inner {
    /// The /v3 JSON API's calls.
    client: grpc::Client,
    /// Health checks' calls.
    health: grpc::Client,
    v3: v3::Transcoder,
    v2: Option<v2::Keys>,
    options: Options,
}

/// Which paths a server answers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// Everything: the client URLs.
    All,
    /// `/metrics`, `/health` and `/shards` only: --listen-metrics-urls.
    Metrics,
}

impl Gateway {
    /// A gateway in front of `grpc`.
    pub fn new(grpc: GrpcService, options: Options) -> Result<Self, DescriptorError> {
        Gateway::with_v3(grpc.clone(), grpc, options)
    }

    /// A gateway whose /v3 JSON API calls `v3` and everything else `grpc`:
    /// a member passes its routes behind its gRPC call counters as `v3`,
    /// since etcd's grpc-gateway calls go through its gRPC server (and are
    /// counted), while its /health and v2 API do not.
    pub fn with_v3(
        v3: GrpcService,
        grpc: GrpcService,
        options: Options,
    ) -> Result<Self, DescriptorError> {
        let client = grpc::Client::new(v3, options.max_concurrent_streams);
        let health = grpc::Client::new(grpc.clone(), options.max_concurrent_streams);
        let v2 = options.enable_v2.then(|| v2::Keys::new(grpc));
        Ok(Gateway {
            inner: Arc::new(Inner {
                client,
                health,
                v3: v3::Transcoder::new()?,
                v2,
                options,
            }),
            scope: Scope::All,
        })
    }

    /// The same gateway answering only `/metrics` and `/health`, for
    /// --listen-metrics-urls.
    pub fn metrics_only(&self) -> Gateway {
        Gateway {
            inner: self.inner.clone(),
            scope: Scope::Metrics,
        }
    }

    /// Answers one request.
    pub async fn handle<B>(&self, request: Request<B>) -> Response<Body>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<tower::BoxError>,
    {
        self.route(boxed_request(request)).await
    }

    async fn route(&self, request: Request<RequestBody>) -> Response<Body> {
        let inner = &self.inner;
        let scope = self.scope;
        let path = request.uri().path().to_string();
        match path.as_str() {
            "/health" => {
                let method = request.method().clone();
                let query = request.uri().query().map(str::to_string);
                drop(request);
                return health::health(&inner.health, method, query).await;
            }
            "/metrics" => {
                return match &inner.options.metrics {
                    Some(render) => text_response(
                        StatusCode::OK,
                        "text/plain; version=0.0.4; charset=utf-8",
                        render(),
                    ),
                    None => not_found(),
                };
            }
            "/shards" => {
                return match &inner.options.shards {
                    Some(render) => json_response(StatusCode::OK, render()),
                    None => not_found(),
                };
            }
            _ if scope == Scope::Metrics => return not_found(),
            "/version" => {
                #[derive(serde::Serialize)]
                struct Versions<'a> {
                    etcdserver: &'a str,
                    etcdcluster: &'a str,
                }
                let versions = Versions {
                    etcdserver: &inner.options.server_version,
                    etcdcluster: &inner.options.cluster_version,
                };
                return json_response(
                    StatusCode::OK,
                    serde_json::to_vec(&versions).unwrap_or_default(),
                );
            }
            _ => {}
        }
        if let Some(route) = path
            .strip_prefix("/v3/")
            .or_else(|| path.strip_prefix("/v3beta/"))
        {
            if !inner.v3.knows(route) {
                return not_found();
            }
            if request.method() != Method::POST {
                return text_response(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "text/plain; charset=utf-8",
                    "Method Not Allowed\n".to_string(),
                );
            }
            let token = auth_token(&request);
            let body = match read_body(request.into_body(), inner.options.max_request_bytes).await {
                Ok(body) => body,
                Err(status) => return v3::error_response(&status),
            };
            return inner
                .v3
                .call(&inner.client, route, &body, token.as_deref())
                .await;
        }
        if let Some(v2) = &inner.v2
            && (path == "/v2/keys"
                || path.starts_with("/v2/keys/")
                || path == "/v2/members"
                || path == "/v2/auth"
                || path.starts_with("/v2/auth/"))
        {
            let (parts, body) = request.into_parts();
            let body = match read_body(body, inner.options.max_request_bytes).await {
                Ok(body) => body,
                Err(status) => return v3::error_response(&status),
            };
            return v2.handle(parts, body).await;
        }
        not_found()
    }
}

/// The token a client sends for etcd's auth, which etcd's gateway takes from
/// the `Authorization` header.
fn auth_token<B>(request: &Request<B>) -> Option<String> {
    request
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// Request bodies of any kind, once they reach the router.
type RequestBody = http_body_util::combinators::UnsyncBoxBody<Bytes, grpc::TransportError>;

fn boxed_request<B>(request: Request<B>) -> Request<RequestBody>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<tower::BoxError>,
{
    request.map(|body| {
        body.map_err(|e| grpc::TransportError::new(e.into()))
            .boxed_unsync()
    })
}

async fn read_body(body: RequestBody, limit: usize) -> Result<Bytes, tonic::Status> {
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) => Err(tonic::Status::invalid_argument(format!(
            "reading the request body: {e}"
        ))),
    }
}

fn full(body: impl Into<Bytes>) -> Body {
    Body::new(http_body_util::Full::new(body.into()))
}

fn json_response(status: StatusCode, json: Vec<u8>) -> Response<Body> {
    let mut response = Response::new(full(json));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn text_response(status: StatusCode, content_type: &'static str, text: String) -> Response<Body> {
    let mut response = Response::new(full(text));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    response
}

/// Go's answer for a path nobody serves.
fn not_found() -> Response<Body> {
    text_response(
        StatusCode::NOT_FOUND,
        "text/plain; charset=utf-8",
        "404 page not found\n".to_string(),
    )
}

type ResponseFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

impl<B> tower_service::Service<Request<B>> for Gateway
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<tower::BoxError>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let gateway = self.clone();
        let request = boxed_request(request);
        Box::pin(async move { Ok(gateway.route(request).await) })
    }
}

/// Serves HTTP/1.1 (and HTTP/2) on the connections `incoming` yields (as
/// cairn-net's accept loop hands them over, TLS or not) with `service`
/// until `stop` resolves: the metrics listeners.
pub async fn serve<S, C>(
    incoming: impl tokio_stream::Stream<Item = Result<C, Infallible>>,
    service: S,
    stop: impl Future<Output = ()>,
) where
    S: tower_service::Service<
            Request<hyper::body::Incoming>,
            Response = Response<Body>,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use tokio_stream::StreamExt as _;
    let mut incoming = std::pin::pin!(incoming);
    let mut stop = std::pin::pin!(stop);
    loop {
        let socket = tokio::select! {
            accepted = incoming.next() => match accepted {
                Some(Ok(socket)) => socket,
                Some(Err(never)) => match never {},
                None => return,
            },
            _ = &mut stop => return,
        };
        let service = hyper_util::service::TowerToHyperService::new(service.clone());
        tokio::spawn(async move {
            let builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            if let Err(e) = builder
                .serve_connection(hyper_util::rt::TokioIo::new(socket), service)
                .await
            {
                tracing::debug!("metrics connection: {e}");
            }
        });
    }
}
