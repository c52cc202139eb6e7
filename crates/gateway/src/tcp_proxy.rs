//! `cairn gateway start`: etcd's L4 gateway, a TCP proxy that hands each
//! client connection to one of the cluster's endpoints, moving on to the
//! next when one refuses, and leaving out for `retry_delay` an endpoint
//! that failed.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};

/// When an endpoint last failed to connect.
type Unreachable = std::sync::Mutex<Option<Instant>>;

/// The endpoints and how to pick among them.
pub struct TcpProxy {
    endpoints: Vec<(String, Unreachable)>,
    next: AtomicUsize,
    retry_delay: Duration,
}

impl TcpProxy {
    pub fn new(endpoints: Vec<String>, retry_delay: Duration) -> Arc<Self> {
        Arc::new(TcpProxy {
            endpoints: endpoints
                .into_iter()
                .map(|e| (e, Unreachable::default()))
                .collect(),
            next: AtomicUsize::new(0),
            retry_delay,
        })
    }

    /// Accepts and proxies connections until the listener fails.
    pub async fn run(self: Arc<Self>, listener: TcpListener) -> std::io::Result<()> {
        loop {
            let (client, peer) = listener.accept().await?;
            let proxy = self.clone();
            tokio::spawn(async move {
                let _ = client.set_nodelay(true);
                match proxy.connect().await {
                    Some(mut upstream) => {
                        let mut client = client;
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                    }
                    None => tracing::warn!("gateway: no endpoint reachable for {peer}"),
                }
            });
        }
    }

    /// A connection to the next endpoint, round robin, skipping those that
    /// failed within the retry delay unless all did.
    async fn connect(&self) -> Option<TcpStream> {
        let n = self.endpoints.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        for pass in 0..2 {
            for i in 0..n {
                let (addr, failed) = &self.endpoints[(start + i) % n];
                let recently_failed = failed
                    .lock()
                    .ok()
                    .and_then(|f| *f)
                    .is_some_and(|at| at.elapsed() < self.retry_delay);
                if pass == 0 && recently_failed {
                    continue;
                }
                match TcpStream::connect(addr.as_str()).await {
                    Ok(stream) => {
                        let _ = stream.set_nodelay(true);
                        return Some(stream);
                    }
                    Err(e) => {
                        tracing::warn!("gateway: failed to connect to {addr}: {e}");
                        if let Ok(mut f) = failed.lock() {
                            *f = Some(Instant::now());
                        }
                    }
                }
            }
        }
        None
    }
}

/// `host:port` from an endpoint given as a URL or as `host:port`.
pub fn endpoint_addr(endpoint: &str) -> String {
    let rest = endpoint
        .strip_prefix("http://")
        .or_else(|| endpoint.strip_prefix("https://"))
        .unwrap_or(endpoint);
    rest.trim_end_matches('/').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[test]
    fn endpoints_lose_their_scheme() {
        assert_eq!(endpoint_addr("http://127.0.0.1:2379/"), "127.0.0.1:2379");
        assert_eq!(endpoint_addr("127.0.0.1:2379"), "127.0.0.1:2379");
    }

    #[tokio::test]
    async fn bytes_reach_a_live_endpoint_past_a_dead_one() {
        let upstream = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let live = upstream.local_addr().expect("addr").to_string();
        let dead = {
            let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            l.local_addr().expect("addr").to_string()
        };
        tokio::spawn(async move {
            let (mut s, _) = upstream.accept().await.expect("accept");
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).await.expect("read");
            s.write_all(&buf).await.expect("echo");
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let proxy = TcpProxy::new(vec![dead, live], Duration::from_secs(60));
        tokio::spawn(proxy.run(listener));
        let mut client = TcpStream::connect(addr).await.expect("connect");
        client.write_all(b"ping").await.expect("write");
        let mut buf = [0u8; 4];
        client.read_exact(&mut buf).await.expect("echoed");
        assert_eq!(&buf, b"ping");
    }
}
