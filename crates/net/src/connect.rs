//! Dialing: TCP to a URI's host and port, then a rustls handshake when TLS
//! is configured, for tonic's `Endpoint::connect_with_connector`.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tonic::transport::Endpoint;

use crate::{ClientStream, ClientTls, MaybeTls, NetError};

/// TCP connect plus TLS handshake, as etcd's peer dial timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Dials the URI tonic asks for: plain, or TLS verified as the URI's host.
#[derive(Clone, Debug)]
pub struct Connector {
    tls: Option<ClientTls>,
}

impl Connector {
    pub fn new(tls: Option<ClientTls>) -> Connector {
        Connector { tls }
    }

    /// Dials `host:port` (brackets around an IPv6 address are dropped).
    pub async fn dial(&self, host: &str, port: u16) -> io::Result<ClientStream> {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let tcp = TcpStream::connect((host, port)).await?;
        // Requests and replies are small and latency-bound.
        tcp.set_nodelay(true)?;
        let Some(tls) = &self.tls else {
            return Ok(MaybeTls::Plain(tcp));
        };
        let name = ServerName::try_from(host.to_owned())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let tls = tokio_rustls::TlsConnector::from(tls.0.clone())
            .connect(name, tcp)
            .await?;
        Ok(MaybeTls::Tls(Box::new(tls)))
    }
}

impl tower_service::Service<http::Uri> for Connector {
    type Response = TokioIo<ClientStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no host"))?;
            let default_port = if this.tls.is_some() { 443 } else { 80 };
            let stream = this
                .dial(host, uri.port_u16().unwrap_or(default_port))
                .await?;
            Ok(TokioIo::new(stream))
        })
    }
}

/// A tonic endpoint for an http:// or https:// URL (a peer URL, say) and
/// the connector that dials it: TLS with `tls` when the URL is https.
///
/// tonic wraps https URIs in its own TLS when one of its TLS features is on
/// anywhere in the build, and refuses them when none is: the endpoint's URI
/// is http:// either way, and the connector does TLS itself.
pub fn endpoint(url: &str, tls: Option<&ClientTls>) -> Result<(Endpoint, Connector), NetError> {
    let url_error = |reason: &dyn std::fmt::Display| NetError::Peer {
        url: url.to_owned(),
        reason: reason.to_string(),
    };
    let uri: http::Uri = url.parse().map_err(|e| url_error(&e))?;
    let host = uri.host().ok_or_else(|| url_error(&"no host"))?;
    let (default_port, tls) = match uri.scheme_str() {
        Some("http") => (80, None),
        Some("https") => match tls {
            Some(tls) => (443, Some(tls.clone())),
            None => return Err(url_error(&"https peer URL but no peer TLS is configured")),
        },
        _ => return Err(url_error(&"scheme must be http or https")),
    };
    let port = uri.port_u16().unwrap_or(default_port);
    let endpoint = Endpoint::from_shared(format!("http://{host}:{port}"))
        .map_err(|e| url_error(&e))?
        .connect_timeout(CONNECT_TIMEOUT);
    Ok((endpoint, Connector::new(tls)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_of_peer_urls() -> Result<(), NetError> {
        let (ipv6, connector) = endpoint("http://[::1]:2380", None)?;
        assert_eq!(ipv6.uri().to_string(), "http://[::1]:2380/");
        assert!(connector.tls.is_none());
        let (named, _) = endpoint("http://member-1.example", None)?;
        assert_eq!(named.uri().port_u16(), Some(80));
        let refused = |url: &str| endpoint(url, None).err().map(|e| e.to_string());
        assert!(refused("https://127.0.0.1:2380").is_some_and(|e| e.contains("no peer TLS")));
        assert!(refused("ftp://h:1").is_some_and(|e| e.contains("scheme")));
        let tls = crate::PeerTls::self_signed(&[])?.client()?;
        let (https, connector) = endpoint("https://127.0.0.1", Some(&tls))?;
        assert_eq!(https.uri().to_string(), "http://127.0.0.1:443/");
        assert!(connector.tls.is_some());
        Ok(())
    }
}
