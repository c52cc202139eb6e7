//! TLS on both sides of the proxy, with etcd's grpc-proxy flags:
//! - to the members (https endpoints): `--cacert` verifies them, `--cert`
//!   and `--key` are the client certificate they may ask for;
//! - to clients: `--cert-file` and `--key-file` serve, `--trusted-ca-file`
//!   makes client certificates required and verified against it, and
//!   `--client-crl-file` refuses revoked ones.

use std::collections::HashSet;
use std::convert::Infallible;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use anyhow::Context as _;
use cairn_server::authority::AuthorityFix;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certificates(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("reading certificates from {}", path.display()))?;
    anyhow::ensure!(!certs.is_empty(), "{}: no certificate", path.display());
    Ok(certs)
}

fn private_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path)
        .with_context(|| format!("reading the private key in {}", path.display()))
}

fn roots(path: &Path) -> anyhow::Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(path)? {
        roots
            .add(cert)
            .with_context(|| format!("bad CA certificate in {}", path.display()))?;
    }
    Ok(roots)
}

/// The serial numbers a CRL file (DER or PEM, as etcd takes either) revokes.
pub fn revoked_serials(crl: &Path) -> anyhow::Result<HashSet<Vec<u8>>> {
    let bytes = std::fs::read(crl).with_context(|| format!("reading {}", crl.display()))?;
    let ders: Vec<Vec<u8>> = if bytes.starts_with(b"-----BEGIN") {
        CertificateRevocationListDer::pem_slice_iter(&bytes)
            .map(|der| der.map(|d| d.to_vec()))
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow::anyhow!("{}: bad CRL: {e}", crl.display()))?
    } else {
        vec![bytes]
    };
    let mut serials = HashSet::new();
    for der in &ders {
        let (_, list) = x509_parser::parse_x509_crl(der)
            .map_err(|e| anyhow::anyhow!("{}: bad CRL: {e}", crl.display()))?;
        for revoked in list.iter_revoked_certificates() {
            serials.insert(revoked.raw_serial().to_vec());
        }
    }
    Ok(serials)
}

fn serial(cert: &CertificateDer<'_>) -> Option<Vec<u8>> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert).ok()?;
    Some(cert.raw_serial().to_vec())
}

/// etcd's check of the proxy's --cert: a common name there would be taken
/// for a user name by members with --client-cert-auth.
pub fn check_empty_common_name(cert: &Path) -> anyhow::Result<()> {
    for der in certificates(cert)?.iter().take(1) {
        let (_, parsed) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| anyhow::anyhow!("{}: bad certificate: {e}", cert.display()))?;
        if let Some(cn) = parsed.subject().iter_common_name().next() {
            let cn = cn.as_str().unwrap_or_default();
            anyhow::bail!("cert has non empty Common Name ({cn}): {}", cert.display());
        }
    }
    Ok(())
}

/// The configuration for serving clients.
pub fn server_config(
    cert: &Path,
    key: &Path,
    trusted_ca: Option<&Path>,
) -> anyhow::Result<Arc<ServerConfig>> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match trusted_ca {
        Some(ca) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
                    .build()
                    .context("client verifier")?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certificates(cert)?, private_key(key)?)
        .context("serving certificate and key")?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The configuration for reaching https members.
pub fn client_config(
    cert: Option<&Path>,
    key: Option<&Path>,
    cacert: Option<&Path>,
) -> anyhow::Result<Arc<ClientConfig>> {
    let cacert = cacert.context("https endpoints need --cacert to verify the members")?;
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots(cacert)?);
    let mut config = match (cert, key) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(certificates(cert)?, private_key(key)?)
            .context("client certificate and key")?,
        (None, None) => builder.with_no_client_auth(),
        _ => anyhow::bail!("--cert and --key go together"),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Connects to a member over TLS: the connector for tonic's endpoint.
pub async fn connect(
    config: Arc<ClientConfig>,
    uri: http::Uri,
) -> io::Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>> {
    let host = uri
        .host()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(443);
    let tcp = TcpStream::connect((host.as_str(), port)).await?;
    let _ = tcp.set_nodelay(true);
    let name =
        ServerName::try_from(host).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let tls = TlsConnector::from(config).connect(name, tcp).await?;
    Ok(TokioIo::new(tls))
}

/// A client's TLS connection, mended for Go's HTTP/2 authorities.
pub struct TlsConn(AuthorityFix<TlsStream<TcpStream>>);

impl Connected for TlsConn {
    type ConnectInfo = ();

    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Accepts TLS clients; each handshake runs on its own task so a slow or
/// refused client holds up no one. A client certificate whose serial is in
/// `revoked` is refused after the handshake, as etcd's CRL check does (by
/// serial alone: etcd's test CRLs do not name their issuer byte for byte as
/// the certificates do, so a path-based check would not apply them).
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    revoked: Arc<HashSet<Vec<u8>>>,
) -> ReceiverStream<Result<TlsConn, Infallible>> {
    let (tx, rx) = mpsc::channel(128);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let tcp = tokio::select! {
                () = tx.closed() => return,
                accepted = listener.accept() => match accepted {
                    Ok((tcp, _)) => tcp,
                    Err(e) => {
                        tracing::warn!("grpc-proxy: accept failed: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx, revoked) = (acceptor.clone(), tx.clone(), revoked.clone());
            tokio::spawn(async move {
                match acceptor.accept(tcp).await {
                    Ok(tls) => {
                        let leaf = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
                        if leaf.and_then(serial).is_some_and(|s| revoked.contains(&s)) {
                            tracing::warn!("grpc-proxy: refused a revoked client certificate");
                            return;
                        }
                        let _ = tx.send(Ok(TlsConn(AuthorityFix::new(tls)))).await;
                    }
                    Err(e) => tracing::warn!("grpc-proxy: TLS handshake refused: {e}"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURES: &str = "/usr/share/gocode/src/go.etcd.io/etcd/integration/fixtures";

    #[test]
    fn etcds_crl_revokes_its_revoked_certificate() {
        let dir = Path::new(FIXTURES);
        if !dir.exists() {
            return;
        }
        let revoked = revoked_serials(&dir.join("revoke.crl")).expect("crl");
        let bad = certificates(&dir.join("server-revoked.crt")).expect("cert");
        let good = certificates(&dir.join("server.crt")).expect("cert");
        assert!(
            revoked.contains(&serial(&bad[0]).expect("serial")),
            "{revoked:?}"
        );
        assert!(!revoked.contains(&serial(&good[0]).expect("serial")));
    }
}
