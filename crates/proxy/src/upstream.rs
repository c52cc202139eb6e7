//! The members behind the proxy: one lazily connected channel per endpoint,
//! a current endpoint that every call starts with, and failover to the next
//! one when the current is unreachable.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

/// How long a connection attempt to one member may take before the next
/// member is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Responses from members can be as large as the member allows; the proxy
/// passes on whatever arrives.
pub const MAX_MESSAGE: usize = usize::MAX;

/// Whether a request may be sent again after an error that leaves its fate
/// unknown.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Reads: any failure of the member moves on to the next one.
    Idempotent,
    /// Writes: only when the request never left the proxy (no connection).
    IfNotSent,
}

/// Why the members' endpoints could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("no --endpoints given")]
    NoEndpoints,
    #[error("bad endpoint {url}: {error}")]
    BadEndpoint {
        url: String,
        error: tonic::transport::Error,
    },
    #[error("{0}: https endpoints need --cacert")]
    NoCacert(String),
}

#[derive(Clone)]
pub struct Upstream {
    inner: Arc<Inner>,
}

struct Inner {
    endpoints: Vec<(String, Channel)>,
    current: AtomicUsize,
}

impl Upstream {
    /// `tls` is needed for https endpoints.
    pub fn new(
        endpoints: &[String],
        tls: Option<cairn_net::ClientTls>,
    ) -> Result<Upstream, UpstreamError> {
        if endpoints.is_empty() {
            return Err(UpstreamError::NoEndpoints);
        }
        let mut channels = Vec::new();
        for url in endpoints {
            let url = with_scheme(url);
            let endpoint = Endpoint::from_shared(url.clone())
                .map_err(|error| UpstreamError::BadEndpoint {
                    url: url.clone(),
                    error,
                })?
                .connect_timeout(CONNECT_TIMEOUT)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5))
                .keep_alive_while_idle(true);
            let channel = if url.starts_with("https://") {
                let tls = tls
                    .clone()
                    .ok_or_else(|| UpstreamError::NoCacert(url.clone()))?;
                endpoint.connect_with_connector_lazy(cairn_net::Connector::new(Some(tls)))
            } else {
                endpoint.connect_lazy()
            };
            channels.push((url, channel));
        }
        Ok(Upstream {
            inner: Arc::new(Inner {
                endpoints: channels,
                current: AtomicUsize::new(0),
            }),
        })
    }

    /// The member calls start with, and its index for [`Upstream::failed`].
    pub fn channel(&self) -> (usize, Channel) {
        let i = self.inner.current.load(Ordering::Acquire) % self.inner.endpoints.len();
        (i, self.inner.endpoints[i].1.clone())
    }

    pub fn len(&self) -> usize {
        self.inner.endpoints.len()
    }

    /// The member at `index` failed: move on, unless another caller already
    /// did.
    pub fn failed(&self, index: usize) {
        let next = (index + 1) % self.inner.endpoints.len();
        let moved = self
            .inner
            .current
            .compare_exchange(index, next, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if moved && next != index {
            tracing::warn!(
                failed = %self.inner.endpoints[index].0,
                next = %self.inner.endpoints[next].0,
                "grpc-proxy: endpoint unreachable, switching"
            );
        }
    }

    /// Runs `call` against the current member, and against the next ones
    /// while it fails as `retry` allows, once per member.
    pub async fn call<T, F, Fut>(&self, retry: Retry, call: F) -> Result<T, Status>
    where
        F: Fn(Channel) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let mut last = None;
        for _ in 0..self.len() {
            let (index, channel) = self.channel();
            match call(channel).await {
                Err(status) if unreachable(&status, retry) => {
                    self.failed(index);
                    last = Some(status);
                }
                result => return result,
            }
        }
        Err(last.unwrap_or_else(|| Status::unavailable("no endpoints")))
    }
}

fn with_scheme(url: &str) -> String {
    if url.contains("://") {
        url.to_owned()
    } else {
        format!("http://{url}")
    }
}

/// The member failed rather than answered: Unavailable, or an error that
/// tonic made from a broken connection (those carry their transport error as
/// the source; a member's own errors carry none).
pub fn member_failed(status: &Status) -> bool {
    match status.code() {
        Code::Unavailable => true,
        Code::Unknown | Code::Internal | Code::Cancelled => {
            std::error::Error::source(status).is_some()
        }
        _ => false,
    }
}

/// The member could not be reached: trying another one is safe for reads,
/// and for writes only if the connection was never made.
fn unreachable(status: &Status, retry: Retry) -> bool {
    if !member_failed(status) {
        return false;
    }
    match retry {
        Retry::Idempotent => true,
        Retry::IfNotSent => never_sent(status),
    }
}

/// tonic reports a refused or timed-out connection as Unavailable with the
/// connector's error underneath; a request that was on the wire when the
/// connection broke is not one of those.
fn never_sent(status: &Status) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(e) = source {
        let text = e.to_string();
        if text.contains("error trying to connect")
            || text.contains("Connection refused")
            || text.contains("connection refused")
        {
            return true;
        }
        source = e.source();
    }
    status.message().contains("error trying to connect")
        || status.message().contains("Connection refused")
}

/// The caller's auth token, passed on to the member with each request.
#[derive(Clone, Default)]
pub struct Caller {
    pub token: Option<AsciiMetadataValue>,
}

impl Caller {
    /// The token as etcd's members take it: `token` (Go's clientv3), else
    /// `authorization` (the gateway's header, which Rust's etcd-client
    /// sends); forwarded as `token`.
    pub fn of(metadata: &MetadataMap) -> Caller {
        Caller {
            token: metadata
                .get("token")
                .or_else(|| metadata.get("authorization"))
                .cloned(),
        }
    }

    /// The identity that cached reads are keyed by.
    pub fn identity(&self) -> Option<Vec<u8>> {
        self.token.as_ref().map(|t| t.as_bytes().to_vec())
    }

    pub fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(token) = &self.token {
            request.metadata_mut().insert("token", token.clone());
        }
        request
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_retried_only_when_never_sent() {
        let refused = Status::unavailable("error trying to connect: tcp connect error");
        let broken = Status::unavailable("connection reset");
        assert!(unreachable(&refused, Retry::IfNotSent));
        assert!(!unreachable(&broken, Retry::IfNotSent));
        assert!(unreachable(&broken, Retry::Idempotent));
        assert!(!unreachable(
            &Status::invalid_argument("x"),
            Retry::Idempotent
        ));
    }

    #[test]
    fn the_token_comes_from_either_header() {
        let mut metadata = MetadataMap::new();
        metadata.insert("authorization", AsciiMetadataValue::from_static("t1"));
        assert_eq!(Caller::of(&metadata).identity(), Some(b"t1".to_vec()));
        metadata.insert("token", AsciiMetadataValue::from_static("t2"));
        assert_eq!(Caller::of(&metadata).identity(), Some(b"t2".to_vec()));
        let forwarded = Caller::of(&metadata).request(());
        assert_eq!(
            forwarded.metadata().get("token").map(|t| t.as_bytes()),
            Some(&b"t2"[..])
        );
    }

    #[tokio::test]
    async fn fails_over_to_the_next_endpoint() {
        let upstream = Upstream::new(&["127.0.0.1:1".to_owned(), "127.0.0.1:2".to_owned()], None)
            .expect("upstream");
        let first = upstream.channel().0;
        upstream.failed(first);
        assert_ne!(upstream.channel().0, first);
        // A stale report about the old endpoint does not move it again.
        let second = upstream.channel().0;
        upstream.failed(first);
        assert_eq!(upstream.channel().0, second);
    }
}
