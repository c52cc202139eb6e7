//! The proxy's counters, served in Prometheus' text format on
//! `--metrics-addr` (`/metrics`), beside etcd's `/health`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

#[derive(Default)]
pub struct Metrics {
    /// Watchers clients have open through the proxy.
    pub client_watchers: AtomicI64,
    /// Watches the proxy has open on members for clients: one per coalesced
    /// range, plus the private catch-up watches of clients still behind.
    pub upstream_watchers: AtomicI64,
    /// Of `upstream_watchers`, the private catch-up watches.
    pub catch_up_watchers: AtomicI64,
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    pub cache_keys: AtomicI64,
    pub cache_invalidations: AtomicU64,
    /// LeaseKeepAlive streams clients have open through the proxy.
    pub client_keepalive_streams: AtomicI64,
    /// LeaseKeepAlive streams the proxy has open on members.
    pub upstream_keepalive_streams: AtomicI64,
    /// Keep-alive requests answered by a request already in flight upstream.
    pub keepalives_coalesced: AtomicU64,
}

impl Metrics {
    pub fn render(&self) -> String {
        let client = self.client_watchers.load(Ordering::Relaxed);
        let upstream = self.upstream_watchers.load(Ordering::Relaxed);
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {value}");
        };
        metric(
            "grpc_proxy_watchers_coalescing_total",
            "gauge",
            "Total number of current watchers coalescing",
            (client - upstream).max(0).to_string(),
        );
        metric(
            "cairn_proxy_client_watchers",
            "gauge",
            "Watchers clients have open through the proxy",
            client.to_string(),
        );
        metric(
            "cairn_proxy_upstream_watchers",
            "gauge",
            "Watches open on members for clients (coalesced plus catch-up)",
            upstream.to_string(),
        );
        metric(
            "cairn_proxy_catch_up_watchers",
            "gauge",
            "Private upstream watches of clients catching up to a coalesced watch",
            self.catch_up_watchers.load(Ordering::Relaxed).to_string(),
        );
        metric(
            "grpc_proxy_cache_hits_total",
            "counter",
            "Total number of cache hits",
            self.cache_hits.load(Ordering::Relaxed).to_string(),
        );
        metric(
            "grpc_proxy_cache_misses_total",
            "counter",
            "Total number of cache misses",
            self.cache_misses.load(Ordering::Relaxed).to_string(),
        );
        metric(
            "grpc_proxy_cache_keys_total",
            "gauge",
            "Total number of keys/ranges cached",
            self.cache_keys.load(Ordering::Relaxed).to_string(),
        );
        metric(
            "cairn_proxy_cache_invalidations_total",
            "counter",
            "Cached ranges dropped because a write touched them",
            self.cache_invalidations.load(Ordering::Relaxed).to_string(),
        );
        metric(
            "cairn_proxy_client_keepalive_streams",
            "gauge",
            "LeaseKeepAlive streams clients have open through the proxy",
            self.client_keepalive_streams
                .load(Ordering::Relaxed)
                .to_string(),
        );
        metric(
            "cairn_proxy_upstream_keepalive_streams",
            "gauge",
            "LeaseKeepAlive streams open on members",
            self.upstream_keepalive_streams
                .load(Ordering::Relaxed)
                .to_string(),
        );
        metric(
            "cairn_proxy_keepalives_coalesced_total",
            "counter",
            "Keep-alive requests answered by one already in flight",
            self.keepalives_coalesced
                .load(Ordering::Relaxed)
                .to_string(),
        );
        out
    }
}

/// Serves `/metrics` and `/health` over plain HTTP/1.1 until the process
/// ends. The bodies are small and every response closes its connection.
pub async fn serve(listener: TcpListener, metrics: std::sync::Arc<Metrics>) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 * 1024 {
                match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let line = String::from_utf8_lossy(&request);
            let path = line.split_whitespace().nth(1).unwrap_or("/");
            let (status, kind, body) = match path.split('?').next() {
                Some("/metrics") => ("200 OK", "text/plain; version=0.0.4", metrics.render()),
                Some("/health") => (
                    "200 OK",
                    "application/json",
                    "{\"health\":\"true\"}".to_owned(),
                ),
                _ => (
                    "404 Not Found",
                    "text/plain",
                    "404 page not found\n".to_owned(),
                ),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(response.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_metric_once() {
        let m = Metrics::default();
        m.client_watchers.store(10, Ordering::Relaxed);
        m.upstream_watchers.store(2, Ordering::Relaxed);
        let text = m.render();
        assert!(text.contains("\ngrpc_proxy_watchers_coalescing_total 8\n"));
        assert!(text.contains("\ncairn_proxy_upstream_watchers 2\n"));
        assert_eq!(text.matches("# TYPE").count(), 11);
    }
}
