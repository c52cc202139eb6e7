//! go-grpc-prometheus's server counters for etcd's gRPC services, under
//! the names, help texts and labels etcd's members and grpc-proxy register:
//! `grpc_server_started_total`, `grpc_server_handled_total` (by status
//! code), `grpc_server_msg_received_total` and `grpc_server_msg_sent_total`,
//! every method and code shown from the start, at 0. A tower layer
//! ([`GrpcMetricsLayer`]) counts the calls of the services it wraps: a call
//! when it arrives, its code when it ends (Canceled when the client leaves
//! before the trailers), and the length-prefixed messages of its request
//! and response bodies as they pass.
//!
//! ```
//! use cairn_grpc_metrics::GrpcCounters;
//!
//! let registry = prometheus::Registry::new();
//! let counters = GrpcCounters::register(&registry)?;
//! let _layer = counters.layer(); // for tonic's Server::builder().layer(..)
//! let text = prometheus::TextEncoder::new().encode_to_string(&registry.gather())?;
//! assert!(text.contains(
//!     "grpc_server_handled_total{grpc_code=\"Canceled\",grpc_method=\"Watch\",grpc_service=\"etcdserverpb.Watch\",grpc_type=\"bidi_stream\"} 0"
//! ));
//! # Ok::<(), prometheus::Error>(())
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{Request, Response};
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};

/// etcd's gRPC methods and how each streams, in path order, so a request's
/// path finds its counters by binary search.
const GRPC_METHODS: &[(&str, &str)] = &[
    ("/etcdserverpb.Auth/AuthDisable", "unary"),
    ("/etcdserverpb.Auth/AuthEnable", "unary"),
    ("/etcdserverpb.Auth/Authenticate", "unary"),
    ("/etcdserverpb.Auth/RoleAdd", "unary"),
    ("/etcdserverpb.Auth/RoleDelete", "unary"),
    ("/etcdserverpb.Auth/RoleGet", "unary"),
    ("/etcdserverpb.Auth/RoleGrantPermission", "unary"),
    ("/etcdserverpb.Auth/RoleList", "unary"),
    ("/etcdserverpb.Auth/RoleRevokePermission", "unary"),
    ("/etcdserverpb.Auth/UserAdd", "unary"),
    ("/etcdserverpb.Auth/UserChangePassword", "unary"),
    ("/etcdserverpb.Auth/UserDelete", "unary"),
    ("/etcdserverpb.Auth/UserGet", "unary"),
    ("/etcdserverpb.Auth/UserGrantRole", "unary"),
    ("/etcdserverpb.Auth/UserList", "unary"),
    ("/etcdserverpb.Auth/UserRevokeRole", "unary"),
    ("/etcdserverpb.Cluster/MemberAdd", "unary"),
    ("/etcdserverpb.Cluster/MemberList", "unary"),
    ("/etcdserverpb.Cluster/MemberPromote", "unary"),
    ("/etcdserverpb.Cluster/MemberRemove", "unary"),
    ("/etcdserverpb.Cluster/MemberUpdate", "unary"),
    ("/etcdserverpb.KV/Compact", "unary"),
    ("/etcdserverpb.KV/DeleteRange", "unary"),
    ("/etcdserverpb.KV/Put", "unary"),
    ("/etcdserverpb.KV/Range", "unary"),
    ("/etcdserverpb.KV/Txn", "unary"),
    ("/etcdserverpb.Lease/LeaseGrant", "unary"),
    ("/etcdserverpb.Lease/LeaseKeepAlive", "bidi_stream"),
    ("/etcdserverpb.Lease/LeaseLeases", "unary"),
    ("/etcdserverpb.Lease/LeaseRevoke", "unary"),
    ("/etcdserverpb.Lease/LeaseTimeToLive", "unary"),
    ("/etcdserverpb.Maintenance/Alarm", "unary"),
    ("/etcdserverpb.Maintenance/Defragment", "unary"),
    ("/etcdserverpb.Maintenance/Hash", "unary"),
    ("/etcdserverpb.Maintenance/HashKV", "unary"),
    ("/etcdserverpb.Maintenance/MoveLeader", "unary"),
    ("/etcdserverpb.Maintenance/Snapshot", "server_stream"),
    ("/etcdserverpb.Maintenance/Status", "unary"),
    ("/etcdserverpb.Watch/Watch", "bidi_stream"),
    ("/v3electionpb.Election/Campaign", "unary"),
    ("/v3electionpb.Election/Leader", "unary"),
    ("/v3electionpb.Election/Observe", "server_stream"),
    ("/v3electionpb.Election/Proclaim", "unary"),
    ("/v3electionpb.Election/Resign", "unary"),
    ("/v3lockpb.Lock/Lock", "unary"),
    ("/v3lockpb.Lock/Unlock", "unary"),
];

/// gRPC's status codes, by number.
const GRPC_CODES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];
const CANCELED: usize = 1;
const UNKNOWN: usize = 2;

/// Per method: calls started, calls handled by status code, and messages
/// received and sent.
pub struct GrpcCounters {
    started: Vec<IntCounter>,
    handled: Vec<Vec<IntCounter>>,
    received: Vec<IntCounter>,
    sent: Vec<IntCounter>,
}

impl GrpcCounters {
    /// The counters of every method, registered in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Arc<GrpcCounters>> {
        let labels = ["grpc_method", "grpc_service", "grpc_type"];
        let per_method = |name: &str, help: &str| -> prometheus::Result<Vec<IntCounter>> {
            let vec = IntCounterVec::new(Opts::new(name, help), &labels)?;
            registry.register(Box::new(vec.clone()))?;
            GRPC_METHODS
                .iter()
                .map(|(path, kind)| {
                    let (service, method) = split_path(path);
                    vec.get_metric_with_label_values(&[method, service, kind])
                })
                .collect()
        };
        let started = per_method(
            "grpc_server_started_total",
            "Total number of RPCs started on the server.",
        )?;
        let handled = IntCounterVec::new(
            Opts::new(
                "grpc_server_handled_total",
                "Total number of RPCs completed on the server, regardless of success or failure.",
            ),
            &["grpc_code", "grpc_method", "grpc_service", "grpc_type"],
        )?;
        registry.register(Box::new(handled.clone()))?;
        let handled = GRPC_METHODS
            .iter()
            .map(|(path, kind)| {
                let (service, method) = split_path(path);
                GRPC_CODES
                    .iter()
                    .map(|code| {
                        handled.get_metric_with_label_values(&[code, method, service, kind])
                    })
                    .collect::<prometheus::Result<Vec<_>>>()
            })
            .collect::<prometheus::Result<_>>()?;
        let received = per_method(
            "grpc_server_msg_received_total",
            "Total number of RPC stream messages received on the server.",
        )?;
        let sent = per_method(
            "grpc_server_msg_sent_total",
            "Total number of gRPC stream messages sent by the server.",
        )?;
        Ok(Arc::new(GrpcCounters {
            started,
            handled,
            received,
            sent,
        }))
    }

    /// The layer that counts the calls of the services it wraps.
    pub fn layer(self: &Arc<Self>) -> GrpcMetricsLayer {
        GrpcMetricsLayer {
            counters: self.clone(),
        }
    }
}

fn method_index(path: &str) -> Option<usize> {
    GRPC_METHODS.binary_search_by(|(m, _)| m.cmp(&path)).ok()
}

fn split_path(path: &str) -> (&str, &str) {
    path.trim_start_matches('/')
        .split_once('/')
        .unwrap_or((path, ""))
}

/// A counted call of one method, until it ends.
struct Call {
    counters: Arc<GrpcCounters>,
    method: usize,
}

impl Call {
    fn ended(self, code: usize) {
        self.counters.handled[self.method][code.min(GRPC_CODES.len() - 1)].inc();
    }
}

/// Counts gRPC calls as go-grpc-prometheus does for etcd:
/// grpc_server_started_total when a call arrives, grpc_server_handled_total
/// with its status code when it ends, Canceled when the client leaves first,
/// and the messages each way.
#[derive(Clone)]
pub struct GrpcMetricsLayer {
    counters: Arc<GrpcCounters>,
}

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> GrpcMetrics<S> {
        GrpcMetrics {
            inner,
            counters: self.counters.clone(),
        }
    }
}

#[derive(Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
    counters: Arc<GrpcCounters>,
}

impl<S, B, ResBody> tower::Service<Request<B>> for GrpcMetrics<S>
where
    S: tower::Service<Request<CountedBody<B>>, Response = Response<ResBody>>,
{
    type Response = Response<CountedBody<ResBody>>;
    type Error = S::Error;
    type Future = CountedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let method = method_index(request.uri().path());
        if let Some(method) = method {
            self.counters.started[method].inc();
        }
        let received = method.map(|m| self.counters.received[m].clone());
        let request = request.map(|inner| CountedBody::new(inner, received, None));
        CountedFuture {
            inner: self.inner.call(request),
            call: method.map(|method| Call {
                counters: self.counters.clone(),
                method,
            }),
        }
    }
}

pin_project_lite::pin_project! {
    pub struct CountedFuture<F> {
        #[pin]
        inner: F,
        call: Option<Call>,
    }
}

impl<F, ResBody, E> Future for CountedFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
{
    type Output = Result<Response<CountedBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.inner.poll(cx))?;
        let mut call = this.call.take();
        let sent = call.as_ref().map(|c| c.counters.sent[c.method].clone());
        if let Some(code) = grpc_status(response.headers())
            && let Some(call) = call.take()
        {
            // A trailers-only answer: the call ended with its headers.
            call.ended(code);
        }
        Poll::Ready(Ok(response.map(|inner| CountedBody::new(inner, sent, call))))
    }
}

fn grpc_status(headers: &http::HeaderMap) -> Option<usize> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// Where a body is in gRPC's length-prefixed messages (a flag byte and a
/// 4-byte big-endian length, then the message), across data frames cut
/// anywhere.
#[derive(Default)]
struct Messages {
    prefix: [u8; 5],
    prefix_len: usize,
    /// Bytes of the current message still to come.
    remaining: usize,
}

impl Messages {
    /// The messages whose prefix ends in `data`.
    fn count(&mut self, mut data: &[u8]) -> u64 {
        let mut messages = 0;
        while !data.is_empty() {
            if self.remaining > 0 {
                let skipped = self.remaining.min(data.len());
                self.remaining -= skipped;
                data = &data[skipped..];
                continue;
            }
            let taken = (self.prefix.len() - self.prefix_len).min(data.len());
            self.prefix[self.prefix_len..self.prefix_len + taken].copy_from_slice(&data[..taken]);
            self.prefix_len += taken;
            data = &data[taken..];
            if self.prefix_len == self.prefix.len() {
                let [_, a, b, c, d] = self.prefix;
                self.remaining = u32::from_be_bytes([a, b, c, d]) as usize;
                self.prefix_len = 0;
                messages += 1;
            }
        }
        messages
    }
}

pin_project_lite::pin_project! {
    /// A request or response body of a counted call: counts its messages,
    /// and (a response's) the call once it ends.
    pub struct CountedBody<B> {
        #[pin]
        inner: B,
        messages: Messages,
        counter: Option<IntCounter>,
        call: Option<Call>,
    }

    impl<B> PinnedDrop for CountedBody<B> {
        fn drop(this: Pin<&mut Self>) {
            // Dropped before its trailers: the client went away.
            if let Some(call) = this.project().call.take() {
                call.ended(CANCELED);
            }
        }
    }
}

impl<B> CountedBody<B> {
    fn new(inner: B, counter: Option<IntCounter>, call: Option<Call>) -> CountedBody<B> {
        CountedBody {
            inner,
            messages: Messages::default(),
            counter,
            call,
        }
    }
}

impl<B: http_body::Body<Data = Bytes>> http_body::Body for CountedBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if let (Some(Ok(frame)), Some(counter)) = (&frame, this.counter.as_ref())
            && let Some(data) = frame.data_ref()
        {
            counter.inc_by(this.messages.count(data));
        }
        if this.call.is_some() {
            let code = match &frame {
                Some(Ok(f)) => f.trailers_ref().and_then(grpc_status),
                Some(Err(_)) | None => Some(UNKNOWN),
            };
            if let Some(code) = code
                && let Some(call) = this.call.take()
            {
                call.ended(code);
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_are_sorted_for_lookup() {
        assert!(GRPC_METHODS.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(
            method_index("/etcdserverpb.Watch/Watch").map(|i| GRPC_METHODS[i].1),
            Some("bidi_stream")
        );
        assert_eq!(method_index("/v3/kv/range"), None);
        assert_eq!(
            split_path("/etcdserverpb.KV/Range"),
            ("etcdserverpb.KV", "Range")
        );
    }

    #[test]
    fn messages_are_counted_across_frames() {
        let message = |len: u32| {
            let mut m = vec![0];
            m.extend_from_slice(&len.to_be_bytes());
            m.extend(std::iter::repeat_n(7, len as usize));
            m
        };
        let body: Vec<u8> = [message(3), message(0), message(300)].concat();
        for cut in [1, 2, 4, 5, 6, 100, body.len()] {
            let mut messages = Messages::default();
            let counted: u64 = body.chunks(cut).map(|c| messages.count(c)).sum();
            assert_eq!(counted, 3, "in chunks of {cut}");
        }
    }

    #[test]
    fn renders_go_grpc_prometheus_names_and_every_method() -> prometheus::Result<()> {
        let registry = Registry::new();
        let counters = GrpcCounters::register(&registry)?;
        let put = method_index("/etcdserverpb.KV/Put").expect("a known method");
        counters.started[put].inc();
        counters.received[put].inc();
        Call {
            counters: counters.clone(),
            method: put,
        }
        .ended(0);
        let text = prometheus::TextEncoder::new().encode_to_string(&registry.gather())?;
        for expected in [
            "grpc_server_started_total{grpc_method=\"Put\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"} 1\n",
            "grpc_server_handled_total{grpc_code=\"OK\",grpc_method=\"Put\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"} 1\n",
            "grpc_server_handled_total{grpc_code=\"Canceled\",grpc_method=\"Watch\",grpc_service=\"etcdserverpb.Watch\",grpc_type=\"bidi_stream\"} 0\n",
            "# HELP grpc_server_msg_received_total Total number of RPC stream messages received on the server.\n",
            "grpc_server_msg_received_total{grpc_method=\"Put\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"} 1\n",
            "# HELP grpc_server_msg_sent_total Total number of gRPC stream messages sent by the server.\n",
            "grpc_server_msg_sent_total{grpc_method=\"Snapshot\",grpc_service=\"etcdserverpb.Maintenance\",grpc_type=\"server_stream\"} 0\n",
        ] {
            assert!(
                text.contains(expected),
                "{expected:?} missing from:\n{text}"
            );
        }
        assert_eq!(
            text.matches("\ngrpc_server_handled_total{").count(),
            GRPC_METHODS.len() * GRPC_CODES.len()
        );
        Ok(())
    }
}
