//! Dialing: TCP to a URI's host and port, or a Unix socket, then a rustls
//! handshake when TLS is configured, for tonic's
//! `Endpoint::connect_with_connector`.

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tonic::transport::Endpoint;

use crate::{Address, ClientStream, ClientTls, EtcdUrl, MaybeTls, NetError, Socket};

/// TCP connect plus TLS handshake, as etcd's peer dial timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Dials the URI tonic asks for: plain, or TLS verified as the URI's host.
#[derive(Clone, Debug)]
pub struct Connector {
    pub(crate) tls: Option<ClientTls>,
    /// Dial this Unix socket rather than the URI's host and port.
    pub(crate) unix_socket: Option<PathBuf>,
}

impl Connector {
    pub fn new(tls: Option<ClientTls>) -> Connector {
        Connector {
            tls,
            unix_socket: None,
        }
    }

    /// Dials `host:port` (brackets around an IPv6 address are dropped).
    pub async fn dial(&self, host: &str, port: u16) -> io::Result<ClientStream> {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let address = match &self.unix_socket {
            Some(path) => Address::Unix(path.clone()),
            None => Address::Tcp {
                host: host.to_owned(),
                port,
            },
        };
        let socket = Socket::connect(&address).await?;
        let Some(tls) = &self.tls else {
            return Ok(MaybeTls::Plain(socket));
        };
        let name = ServerName::try_from(host.to_owned())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let tls = tokio_rustls::TlsConnector::from(tls.0.clone())
            .connect(name, socket)
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

/// A tonic endpoint for one of etcd's URLs (a peer URL, say) and the
/// connector that dials it: TLS with `tls` when the URL is https or unixs.
///
/// tonic wraps https URIs in its own TLS when one of its TLS features is on
/// anywhere in the build, and refuses them when none is: the endpoint's URI
/// is http:// either way, and the connector does TLS itself. A Unix
/// socket's endpoint is http:// to the socket's name, which is also the
/// name its TLS certificate is verified as, as Go's clients do.
pub fn endpoint(url: &str, tls: Option<&ClientTls>) -> Result<(Endpoint, Connector), NetError> {
    let url_error = |reason: &dyn std::fmt::Display| NetError::Peer {
        url: url.to_owned(),
        reason: reason.to_string(),
    };
    let parsed = EtcdUrl::parse(url)?;
    let tls = match (parsed.tls, tls) {
        (false, _) => None,
        (true, Some(tls)) => Some(tls.clone()),
        (true, None) => {
            return Err(url_error(&"https peer URL but no peer TLS is configured"));
        }
    };
    let unix_socket = match &parsed.address {
        Address::Unix(path) => Some(path.clone()),
        Address::Tcp { .. } => None,
    };
    let endpoint = Endpoint::from_shared(format!("http://{}", parsed.address))
        .map_err(|e| url_error(&e))?
        .connect_timeout(CONNECT_TIMEOUT);
    Ok((endpoint, Connector { tls, unix_socket }))
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
        let (unix, connector) = endpoint("unixs://localhost:2380", Some(&tls))?;
        assert_eq!(unix.uri().to_string(), "http://localhost:2380/");
        assert_eq!(connector.unix_socket, Some(PathBuf::from("localhost:2380")));
        assert!(connector.tls.is_some());
        Ok(())
    }
}
