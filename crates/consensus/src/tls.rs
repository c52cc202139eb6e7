//! TLS for the peer transport, on rustls with the ring provider.
//!
//! Two modes, as etcd has them:
//! - a certificate, key and trusted CA (`--peer-cert-file`,
//!   `--peer-key-file`, `--peer-trusted-ca-file`): servers are verified
//!   against the CA and, with `--peer-client-cert-auth`, so are clients;
//! - auto TLS (`--peer-auto-tls`): each member makes a self-signed
//!   certificate and nobody verifies anybody's, so traffic is encrypted but
//!   not authenticated, exactly as etcd's auto TLS.
//!
//! The configurations are built with an explicit ring provider rather than
//! rustls' process-wide default, so nothing here depends on (or fights over)
//! which provider another crate in the process installed.

use std::fmt;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use x509_parser::extensions::GeneralName;

use crate::transport::TransportError;

/// The ALPN protocol both sides offer: the transport is gRPC, so HTTP/2 only.
const ALPN_H2: &[u8] = b"h2";

/// A member's peer TLS settings.
#[derive(Clone)]
pub struct PeerTls {
    /// This member's certificate chain (PEM), leaf first. Presented as a
    /// server certificate, and as a client certificate when a peer asks.
    pub cert_pem: Vec<u8>,
    /// The private key of `cert_pem` (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_pem: Vec<u8>,
    /// The CA(s) (PEM) peers' certificates must chain to. `None` is auto TLS:
    /// no certificate is verified.
    pub trusted_ca_pem: Option<Vec<u8>>,
    /// Require a client certificate from peers that connect to us (verified
    /// against `trusted_ca_pem` when there is one).
    pub client_cert_auth: bool,
    /// etcd's --peer-cert-allowed-cn: a connecting peer's certificate must
    /// have this common name.
    pub allowed_cn: Option<String>,
    /// etcd's --peer-cert-allowed-hostname: a connecting peer's certificate
    /// must be valid for this host name.
    pub allowed_hostname: Option<String>,
}

impl fmt::Debug for PeerTls {
    // Never print the private key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerTls")
            .field("cert_pem", &format_args!("{} bytes", self.cert_pem.len()))
            .field("key_pem", &"<redacted>")
            .field("trusted_ca", &self.trusted_ca_pem.is_some())
            .field("client_cert_auth", &self.client_cert_auth)
            .finish()
    }
}

impl PeerTls {
    /// etcd's --peer-auto-tls: a self-signed certificate for these hosts/IPs;
    /// peers then do not verify each other's certificates (as etcd's auto
    /// TLS), but traffic is encrypted.
    pub fn self_signed(hosts: &[String]) -> Result<PeerTls, TransportError> {
        let mut names = hosts.to_vec();
        if names.is_empty() {
            // A certificate needs some subject; nobody checks it under auto TLS.
            names.push("localhost".to_owned());
        }
        let certified = rcgen::generate_simple_self_signed(names)?;
        Ok(PeerTls {
            cert_pem: certified.cert.pem().into_bytes(),
            key_pem: certified.signing_key.serialize_pem().into_bytes(),
            trusted_ca_pem: None,
            client_cert_auth: false,
            allowed_cn: None,
            allowed_hostname: None,
        })
    }

    /// Builds both the client and the server configuration, so that bad
    /// PEM or a key that does not match its certificate is reported at start
    /// rather than on the first connection.
    pub fn check(&self) -> Result<(), TransportError> {
        client_config(self)?;
        server_config(self)?;
        Ok(())
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_error(what: &str, e: impl fmt::Display) -> TransportError {
    TransportError::Tls(format!("{what}: {e}"))
}

fn certificates(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_error(what, e))?;
    if certs.is_empty() {
        return Err(TransportError::Tls(format!(
            "{what}: no certificate in PEM"
        )));
    }
    Ok(certs)
}

fn private_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, TransportError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| tls_error("peer private key", e))
}

fn roots(pem: &[u8]) -> Result<Arc<RootCertStore>, TransportError> {
    let mut store = RootCertStore::empty();
    for cert in certificates(pem, "peer trusted CA")? {
        store
            .add(cert)
            .map_err(|e| tls_error("peer trusted CA", e))?;
    }
    Ok(Arc::new(store))
}

/// The configuration this member dials its peers with.
pub(crate) fn client_config(tls: &PeerTls) -> Result<Arc<ClientConfig>, TransportError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error("peer TLS versions", e))?;
    let builder = match &tls.trusted_ca_pem {
        Some(ca) => {
            let verifier = WebPkiServerVerifier::builder_with_provider(roots(ca)?, provider)
                .build()
                .map_err(|e| tls_error("peer server verifier", e))?;
            builder.with_webpki_verifier(verifier)
        }
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyServerCert {
                algorithms: provider.signature_verification_algorithms,
            })),
    };
    // Our certificate goes out whenever a peer's server asks for one.
    let mut config = builder
        .with_client_auth_cert(
            certificates(&tls.cert_pem, "peer certificate")?,
            private_key(&tls.key_pem)?,
        )
        .map_err(|e| tls_error("peer certificate and key", e))?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// The configuration this member's peer listener accepts connections with.
pub(crate) fn server_config(tls: &PeerTls) -> Result<Arc<ServerConfig>, TransportError> {
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error("peer TLS versions", e))?;
    let builder = match (&tls.trusted_ca_pem, tls.client_cert_auth) {
        (Some(ca), true) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider)
                .build()
                .map_err(|e| tls_error("peer client verifier", e))?;
            if tls.allowed_cn.is_some() || tls.allowed_hostname.is_some() {
                builder.with_client_cert_verifier(Arc::new(AllowedPeers {
                    webpki: verifier,
                    cn: tls.allowed_cn.clone(),
                    hostname: tls.allowed_hostname.clone(),
                }))
            } else {
                builder.with_client_cert_verifier(verifier)
            }
        }
        // Client-cert auth without a CA (auto TLS): a certificate is
        // required, but, as everywhere in auto TLS, not verified.
        (None, true) => builder.with_client_cert_verifier(Arc::new(AcceptAnyClientCert {
            algorithms: provider.signature_verification_algorithms,
        })),
        (_, false) => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(
            certificates(&tls.cert_pem, "peer certificate")?,
            private_key(&tls.key_pem)?,
        )
        .map_err(|e| tls_error("peer certificate and key", e))?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// The name a server certificate is checked against: the peer URL's host,
/// as an IP address when it is one (certificates carry IP SANs for those).
pub(crate) fn server_name(host: &str) -> Result<ServerName<'static>, TransportError> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_owned()).map_err(|e| tls_error("peer host name", e))
}

/// Auto TLS, client side: any server certificate is accepted. The handshake
/// signatures are still checked, so the server must hold the key of the
/// certificate it shows.
#[derive(Debug)]
struct AcceptAnyServerCert {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AcceptAnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Auto TLS with client-cert auth, server side: a client certificate is
/// required and must be backed by its key, but is not verified.
#[derive(Debug)]
struct AcceptAnyClientCert {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for AcceptAnyClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// etcd's --peer-cert-allowed-cn and --peer-cert-allowed-hostname: on top
/// of the CA's verification, the connecting peer's certificate must carry
/// the common name, or be valid for the host name.
#[derive(Debug)]
struct AllowedPeers {
    webpki: Arc<dyn ClientCertVerifier>,
    cn: Option<String>,
    hostname: Option<String>,
}

impl AllowedPeers {
    fn allows(&self, end_entity: &CertificateDer<'_>) -> bool {
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(end_entity.as_ref()) else {
            return false;
        };
        if let Some(cn) = &self.cn
            && !cert
                .subject()
                .iter_common_name()
                .any(|name| name.as_str() == Ok(cn.as_str()))
        {
            tracing::warn!(
                "rejected peer connection: CommonName authentication failed (allowed {cn:?})"
            );
            return false;
        }
        if let Some(hostname) = &self.hostname {
            let valid = cert
                .subject_alternative_name()
                .ok()
                .flatten()
                .is_some_and(|san| {
                    san.value.general_names.iter().any(|name| match name {
                        GeneralName::DNSName(dns) => host_matches(dns, hostname),
                        GeneralName::IPAddress(ip) => ip_text(ip).as_deref() == Some(hostname),
                        _ => false,
                    })
                });
            if !valid {
                tracing::warn!(
                    "rejected peer connection: client certificate authentication failed (allowed hostname {hostname:?})"
                );
                return false;
            }
        }
        true
    }
}

/// A certificate's DNS name (maybe `*.` wildcard) against a host name, as
/// Go's `VerifyHostname`.
fn host_matches(pattern: &str, host: &str) -> bool {
    let (pattern, host) = (pattern.to_ascii_lowercase(), host.to_ascii_lowercase());
    match pattern.strip_prefix("*.") {
        Some(suffix) => host
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == suffix),
        None => pattern == host,
    }
}

fn ip_text(bytes: &[u8]) -> Option<String> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes)
            .ok()
            .map(|b| std::net::Ipv4Addr::from(b).to_string()),
        16 => <[u8; 16]>::try_from(bytes)
            .ok()
            .map(|b| std::net::Ipv6Addr::from(b).to_string()),
        _ => None,
    }
}

impl ClientCertVerifier for AllowedPeers {
    fn offer_client_auth(&self) -> bool {
        self.webpki.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.webpki.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.webpki.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .webpki
            .verify_client_cert(end_entity, intermediates, now)?;
        if !self.allows(end_entity) {
            // Go's server answers with a bad_certificate alert.
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName,
            ));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_builds_both_configs() -> Result<(), TransportError> {
        let tls = PeerTls::self_signed(&["127.0.0.1".to_owned(), "localhost".to_owned()])?;
        tls.check()?;
        let with_auth = PeerTls {
            client_cert_auth: true,
            ..tls.clone()
        };
        with_auth.check()?;
        assert!(!format!("{tls:?}").contains("PRIVATE KEY"));
        Ok(())
    }

    #[test]
    fn bad_pem_is_an_error() -> Result<(), TransportError> {
        let mut tls = PeerTls::self_signed(&[])?;
        tls.key_pem = b"not a key".to_vec();
        assert!(matches!(tls.check(), Err(TransportError::Tls(_))));
        let mut tls = PeerTls::self_signed(&[])?;
        tls.trusted_ca_pem = Some(Vec::new());
        assert!(matches!(tls.check(), Err(TransportError::Tls(_))));
        Ok(())
    }

    #[test]
    fn server_names() -> Result<(), TransportError> {
        assert!(matches!(
            server_name("127.0.0.1")?,
            ServerName::IpAddress(_)
        ));
        assert!(matches!(server_name("[::1]")?, ServerName::IpAddress(_)));
        assert!(matches!(
            server_name("member-1.example")?,
            ServerName::DnsName(_)
        ));
        Ok(())
    }
}
