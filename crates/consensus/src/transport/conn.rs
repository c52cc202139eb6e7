//! Connections: dialing a peer URL (TCP, then rustls when https) for tonic's
//! client, and accepting connections (TCP, then rustls when TLS is
//! configured) for tonic's server.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tonic::transport::{Channel, Endpoint};

use super::{
    CONNECT_TIMEOUT, HANDSHAKE_TIMEOUT, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, TransportError,
};
use crate::tls;

/// A TCP connection, maybe wrapped in TLS.
pub(super) enum MaybeTls<T> {
    Plain(TcpStream),
    Tls(Box<T>),
}

pub(super) type ClientStream = MaybeTls<tokio_rustls::client::TlsStream<TcpStream>>;
pub(super) type ServerStream = MaybeTls<tokio_rustls::server::TlsStream<TcpStream>>;

impl<T: AsyncRead + Unpin> AsyncRead for MaybeTls<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for MaybeTls<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            MaybeTls::Plain(s) => s.is_write_vectored(),
            MaybeTls::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl Connected for ServerStream {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        match self {
            MaybeTls::Plain(s) => s.connect_info(),
            MaybeTls::Tls(s) => s.get_ref().0.connect_info(),
        }
    }
}

/// Dials one peer URL for tonic: TCP to the URL's host and port, then a
/// rustls handshake when the URL is https.
#[derive(Clone)]
struct Connector {
    host: String,
    port: u16,
    tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
}

impl tower_service::Service<http::Uri> for Connector {
    type Response = TokioIo<ClientStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        // The endpoint's URI is always http:// (see `connect`): where to dial
        // and whether to use TLS come from the peer URL kept here.
        let this = self.clone();
        Box::pin(async move {
            let host = this.host.trim_start_matches('[').trim_end_matches(']');
            let tcp = TcpStream::connect((host, this.port)).await?;
            // Raft heartbeats and votes are small and latency-bound.
            tcp.set_nodelay(true)?;
            let stream = match this.tls {
                None => MaybeTls::Plain(tcp),
                Some((config, name)) => {
                    let tls = tokio_rustls::TlsConnector::from(config)
                        .connect(name, tcp)
                        .await?;
                    MaybeTls::Tls(Box::new(tls))
                }
            };
            Ok(TokioIo::new(stream))
        })
    }
}

fn url_error(url: &str, reason: impl std::fmt::Display) -> TransportError {
    TransportError::Url {
        url: url.to_owned(),
        reason: reason.to_string(),
    }
}

/// Opens an HTTP/2 connection to one peer URL.
pub(super) async fn connect(
    client_tls: &Option<Result<Arc<rustls::ClientConfig>, String>>,
    url: &str,
) -> Result<Channel, TransportError> {
    let uri: http::Uri = url.parse().map_err(|e| url_error(url, e))?;
    let host = uri
        .host()
        .ok_or_else(|| url_error(url, "no host"))?
        .to_owned();
    let (default_port, tls) = match uri.scheme_str() {
        Some("http") => (80, None),
        Some("https") => {
            let config = match client_tls {
                Some(Ok(config)) => config.clone(),
                Some(Err(e)) => return Err(TransportError::Tls(e.clone())),
                None => {
                    return Err(url_error(
                        url,
                        "https peer URL but no peer TLS is configured",
                    ));
                }
            };
            (443, Some((config, tls::server_name(&host)?)))
        }
        _ => return Err(url_error(url, "scheme must be http or https")),
    };
    let port = uri.port_u16().unwrap_or(default_port);
    // tonic wraps https URIs in its own TLS when one of its TLS features is
    // on anywhere in the build, and refuses them when none is: give it an
    // http URI either way; the connector does TLS itself.
    let endpoint = Endpoint::from_shared(format!("http://{host}:{port}"))
        .map_err(|e| url_error(url, e))?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        // Snapshots stream megabytes: let the windows grow past 64 KiB.
        .http2_adaptive_window(true);
    let connector = Connector { host, port, tls };
    Ok(endpoint.connect_with_connector(connector).await?)
}

/// Accepts connections until `conns`' receiver is gone, doing TLS
/// handshakes in tasks of their own so a slow or hostile client never holds
/// up the others.
pub(super) async fn accept_loop(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    conns: mpsc::Sender<ServerStream>,
) {
    loop {
        let accepted = tokio::select! {
            () = conns.closed() => return,
            accepted = listener.accept() => accepted,
        };
        let (tcp, remote) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: wait rather than spin.
                tracing::warn!(error = %e, "accepting a peer connection failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(%remote, error = %e, "setting TCP_NODELAY failed");
        }
        match &tls {
            None => {
                if conns.send(MaybeTls::Plain(tcp)).await.is_err() {
                    return;
                }
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                let conns = conns.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = conns.send(MaybeTls::Tls(Box::new(stream))).await;
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(%remote, error = %e, "peer TLS handshake failed");
                        }
                        Err(_) => {
                            tracing::warn!(%remote, "peer TLS handshake timed out");
                        }
                    }
                });
            }
        }
    }
}
