//! The proxy's counters, served in Prometheus' text format (the
//! `prometheus` crate) on `--metrics-addr` (`/metrics`), beside etcd's
//! `/health`: its own, and go-grpc-prometheus's for its gRPC server.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use cairn_grpc_metrics::{GrpcCounters, GrpcMetricsLayer};
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use prometheus::{IntCounter, IntGauge, Registry, TextEncoder};
use tokio::net::TcpListener;

pub struct Metrics {
    registry: Registry,
    /// etcd's grpc_proxy_watchers_coalescing_total: client watchers beyond
    /// the upstream ones, set when scraped.
    coalescing: IntGauge,
    /// Watchers clients have open through the proxy.
    pub client_watchers: IntGauge,
    /// Watches the proxy has open on members for clients: one per coalesced
    /// range, plus the private catch-up watches of clients still behind.
    pub upstream_watchers: IntGauge,
    /// Of `upstream_watchers`, the private catch-up watches.
    pub catch_up_watchers: IntGauge,
    pub cache_hits: IntCounter,
    pub cache_misses: IntCounter,
    pub cache_keys: IntGauge,
    pub cache_invalidations: IntCounter,
    /// LeaseKeepAlive streams clients have open through the proxy.
    pub client_keepalive_streams: IntGauge,
    /// LeaseKeepAlive streams the proxy has open on members.
    pub upstream_keepalive_streams: IntGauge,
    /// Keep-alive requests answered by a request already in flight upstream.
    pub keepalives_coalesced: IntCounter,
    /// The calls clients make of the proxy's gRPC server.
    grpc: Arc<GrpcCounters>,
}

impl Metrics {
    /// The proxy's metrics, registered under etcd's names (and Cairn's for
    /// what etcd does not count).
    pub fn new() -> prometheus::Result<Metrics> {
        let registry = Registry::new();
        let gauge = |name: &str, help: &str| -> prometheus::Result<IntGauge> {
            let gauge = IntGauge::new(name, help)?;
            registry.register(Box::new(gauge.clone()))?;
            Ok(gauge)
        };
        let counter = |name: &str, help: &str| -> prometheus::Result<IntCounter> {
            let counter = IntCounter::new(name, help)?;
            registry.register(Box::new(counter.clone()))?;
            Ok(counter)
        };
        Ok(Metrics {
            coalescing: gauge(
                "grpc_proxy_watchers_coalescing_total",
                "Total number of current watchers coalescing",
            )?,
            client_watchers: gauge(
                "cairn_proxy_client_watchers",
                "Watchers clients have open through the proxy",
            )?,
            upstream_watchers: gauge(
                "cairn_proxy_upstream_watchers",
                "Watches open on members for clients (coalesced plus catch-up)",
            )?,
            catch_up_watchers: gauge(
                "cairn_proxy_catch_up_watchers",
                "Private upstream watches of clients catching up to a coalesced watch",
            )?,
            cache_hits: counter("grpc_proxy_cache_hits_total", "Total number of cache hits")?,
            cache_misses: counter(
                "grpc_proxy_cache_misses_total",
                "Total number of cache misses",
            )?,
            cache_keys: gauge(
                "grpc_proxy_cache_keys_total",
                "Total number of keys/ranges cached",
            )?,
            cache_invalidations: counter(
                "cairn_proxy_cache_invalidations_total",
                "Cached ranges dropped because a write touched them",
            )?,
            client_keepalive_streams: gauge(
                "cairn_proxy_client_keepalive_streams",
                "LeaseKeepAlive streams clients have open through the proxy",
            )?,
            upstream_keepalive_streams: gauge(
                "cairn_proxy_upstream_keepalive_streams",
                "LeaseKeepAlive streams open on members",
            )?,
            keepalives_coalesced: counter(
                "cairn_proxy_keepalives_coalesced_total",
                "Keep-alive requests answered by one already in flight",
            )?,
            grpc: GrpcCounters::register(&registry)?,
            registry,
        })
    }

    /// The layer that counts the calls of the proxy's gRPC server.
    pub fn grpc_layer(&self) -> GrpcMetricsLayer {
        self.grpc.layer()
    }

    pub fn render(&self) -> String {
        self.coalescing
            .set((self.client_watchers.get() - self.upstream_watchers.get()).max(0));
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| {
                tracing::warn!("rendering metrics: {e}");
                String::new()
            })
    }
}

/// Serves `/metrics` and `/health` over HTTP/1.1 until the process ends.
/// The bodies are small and every response closes its connection.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            let response = respond(request.uri().path(), &metrics);
            async move { Ok::<_, Infallible>(response) }
        });
        tokio::spawn(async move {
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(conn), service)
                .await
            {
                tracing::debug!("metrics connection: {e}");
            }
        });
    }
}

fn respond(path: &str, metrics: &Metrics) -> Response<Full<Bytes>> {
    let (status, kind, body) = match path {
        "/metrics" => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            metrics.render(),
        ),
        "/health" => (
            StatusCode::OK,
            "application/json",
            "{\"health\":\"true\"}".to_owned(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "404 page not found\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_metric_once() -> prometheus::Result<()> {
        let m = Metrics::new()?;
        m.client_watchers.set(10);
        m.upstream_watchers.set(2);
        m.cache_hits.inc();
        let text = m.render();
        assert!(
            text.contains("\ngrpc_proxy_watchers_coalescing_total 8\n"),
            "{text}"
        );
        assert!(
            text.contains("\ncairn_proxy_upstream_watchers 2\n"),
            "{text}"
        );
        assert!(
            text.contains("# HELP grpc_proxy_cache_hits_total Total number of cache hits\n# TYPE grpc_proxy_cache_hits_total counter\ngrpc_proxy_cache_hits_total 1\n"),
            "{text}"
        );
        assert!(text.contains(
            "\ngrpc_server_handled_total{grpc_code=\"Canceled\",grpc_method=\"Watch\",grpc_service=\"etcdserverpb.Watch\",grpc_type=\"bidi_stream\"} 0\n"
        ));
        // Eleven of its own, four of go-grpc-prometheus.
        assert_eq!(text.matches("# TYPE").count(), 15);
        Ok(())
    }
}
