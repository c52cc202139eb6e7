//! Certificate verifiers beyond webpki's: auto TLS's (which accept any
//! certificate but still check handshake signatures), etcd's
//! --peer-cert-allowed-cn and --peer-cert-allowed-hostname, and Go's
//! acceptance of a trusted CA's own certificate as a client's.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use x509_parser::extensions::GeneralName;

/// Auto TLS, client side: any server certificate is accepted. The handshake
/// signatures are still checked, so the server must hold the key of the
/// certificate it shows.
#[derive(Debug)]
pub(crate) struct AcceptAnyServerCert {
    pub(crate) algorithms: WebPkiSupportedAlgorithms,
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
pub(crate) struct AcceptAnyClientCert {
    pub(crate) algorithms: WebPkiSupportedAlgorithms,
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

/// What a certificate that webpki verified must further be.
#[derive(Debug, Default)]
pub(crate) struct Also {
    /// Go accepts a client certificate that is itself one of the trusted
    /// CAs (etcd's tests present a self-signed CA certificate as the
    /// client's); webpki refuses a CA certificate as an end entity.
    pub(crate) roots: Vec<CertificateDer<'static>>,
    /// etcd's --peer-cert-allowed-cn: the certificate carries this common
    /// name.
    pub(crate) allowed_cn: Option<String>,
    /// etcd's --peer-cert-allowed-hostname: the certificate is valid for
    /// this host name.
    pub(crate) allowed_hostname: Option<String>,
}

/// webpki's client verification, with what [`Also`] asks on top.
/// Everything else, handshake signatures included, is webpki's.
#[derive(Debug)]
pub(crate) struct ClientVerifier {
    pub(crate) webpki: Arc<dyn ClientCertVerifier>,
    pub(crate) also: Also,
}

impl ClientVerifier {
    fn allows(&self, end_entity: &CertificateDer<'_>) -> bool {
        let Also {
            allowed_cn,
            allowed_hostname,
            ..
        } = &self.also;
        if allowed_cn.is_none() && allowed_hostname.is_none() {
            return true;
        }
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(end_entity.as_ref()) else {
            return false;
        };
        if let Some(cn) = allowed_cn
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
        if let Some(hostname) = allowed_hostname {
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
    if let Ok(v4) = <[u8; 4]>::try_from(bytes) {
        return Some(Ipv4Addr::from(v4).to_string());
    }
    <[u8; 16]>::try_from(bytes)
        .ok()
        .map(|v6| Ipv6Addr::from(v6).to_string())
}

impl ClientCertVerifier for ClientVerifier {
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
        let verified = if self
            .also
            .roots
            .iter()
            .any(|root| root.as_ref() == end_entity.as_ref())
        {
            ClientCertVerified::assertion()
        } else {
            self.webpki
                .verify_client_cert(end_entity, intermediates, now)?
        };
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
    fn host_names_as_go_matches_them() {
        assert!(host_matches("member-1.example", "MEMBER-1.example"));
        assert!(host_matches("*.example", "member-1.example"));
        assert!(!host_matches("*.example", "example"));
        assert!(!host_matches("*.example", "a.b.example"));
        assert_eq!(ip_text(&[127, 0, 0, 1]).as_deref(), Some("127.0.0.1"));
        assert_eq!(
            ip_text(&Ipv6Addr::LOCALHOST.octets()).as_deref(),
            Some("::1")
        );
        assert_eq!(ip_text(&[1, 2, 3]), None);
    }
}
