//! The one rustls configuration builder, for both sides of a connection.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

use crate::cipher::{default_provider, provider};
use crate::pem::{Crls, certificates, private_key, read_file, roots};
use crate::verify::{AcceptAnyClientCert, AcceptAnyServerCert, Also, ClientVerifier};
use crate::{NetError, SelfSigned};

/// The ALPN protocol of gRPC: HTTP/2 only.
const ALPN_H2: &[u8] = b"h2";
const ALPN_HTTP1: &[u8] = b"http/1.1";

/// A certificate chain and its private key: what one side presents.
pub struct Identity {
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// Names the pair in errors about it.
    what: String,
}

impl fmt::Debug for Identity {
    // Never print the private key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("certs", &self.certs.len())
            .field("what", &self.what)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// A chain (PEM, leaf first) and its key (PEM: PKCS#8, PKCS#1 or SEC1);
    /// errors say `what` they were ("peer" makes "peer certificate: ...").
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8], what: &str) -> Result<Identity, NetError> {
        Ok(Identity {
            certs: certificates(cert_pem, &format!("{what} certificate"))?,
            key: private_key(key_pem, &format!("{what} private key"))?,
            what: format!("{what} certificate and key"),
        })
    }

    /// A chain and key from files, given by these flags; errors name the
    /// flag and the file.
    pub fn from_files(
        cert: &Path,
        cert_flag: &str,
        key: &Path,
        key_flag: &str,
    ) -> Result<Identity, NetError> {
        let cert_what = format!("{cert_flag} {}", cert.display());
        let key_what = format!("{key_flag} {}", key.display());
        Ok(Identity {
            certs: certificates(&read_file(cert, cert_flag)?, &cert_what)?,
            key: private_key(&read_file(key, key_flag)?, &key_what)?,
            what: format!("{cert_flag} and {key_flag}"),
        })
    }
}

/// Certificate authorities to verify the other side against.
#[derive(Clone, Debug)]
pub struct TrustedCas {
    store: Arc<RootCertStore>,
    certs: Vec<CertificateDer<'static>>,
}

impl TrustedCas {
    pub fn from_pem(pem: &[u8], what: &str) -> Result<TrustedCas, NetError> {
        let (store, certs) = roots(pem, what)?;
        Ok(TrustedCas {
            store: Arc::new(store),
            certs,
        })
    }

    /// Reads the CAs in a file, given by this flag.
    pub fn from_file(path: &Path, flag: &str) -> Result<TrustedCas, NetError> {
        TrustedCas::from_pem(
            &read_file(path, flag)?,
            &format!("{flag} {}", path.display()),
        )
    }
}

/// What a server asks of its clients' certificates.
#[derive(Debug, Default)]
pub enum ClientAuth {
    /// Nothing: no certificate is asked for.
    #[default]
    None,
    /// A certificate backed by its key, not verified (auto TLS).
    AnyCertificate,
    /// A certificate that chains to one of these CAs (or is one).
    Verified(VerifiedClients),
}

/// How client certificates are verified.
#[derive(Debug)]
pub struct VerifiedClients {
    pub cas: TrustedCas,
    /// Revoked certificates, judged by webpki against their issuer; a
    /// certificate no CRL speaks for (an intermediate CA's) is not refused,
    /// and, as in etcd, an out-of-date CRL still counts.
    pub crls: Option<Crls>,
    /// etcd's --peer-cert-allowed-cn: the certificate must carry this
    /// common name.
    pub allowed_cn: Option<String>,
    /// etcd's --peer-cert-allowed-hostname: the certificate must be valid
    /// for this host name.
    pub allowed_hostname: Option<String>,
}

impl VerifiedClients {
    pub fn new(cas: TrustedCas) -> VerifiedClients {
        VerifiedClients {
            cas,
            crls: None,
            allowed_cn: None,
            allowed_hostname: None,
        }
    }
}

/// Everything a TLS server is configured with.
#[derive(Debug)]
pub struct ServerSettings {
    pub identity: Identity,
    pub client_auth: ClientAuth,
    /// etcd's --cipher-suites (Go's names); empty is rustls' defaults.
    pub cipher_suites: Vec<String>,
    /// Offer HTTP/1.1 besides HTTP/2 (ALPN): for ports that serve an HTTP
    /// gateway beside gRPC.
    pub http1: bool,
}

impl ServerSettings {
    pub fn new(identity: Identity) -> ServerSettings {
        ServerSettings {
            identity,
            client_auth: ClientAuth::None,
            cipher_suites: Vec::new(),
            http1: false,
        }
    }
}

/// A server's TLS configuration, ready to accept connections with
/// ([`crate::Accept`]). Cheap to clone.
#[derive(Clone, Debug)]
pub struct ServerTls(pub(crate) Arc<rustls::ServerConfig>);

impl ServerTls {
    pub fn new(settings: ServerSettings) -> Result<ServerTls, NetError> {
        let provider = provider(&settings.cipher_suites)?;
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| NetError::invalid("TLS versions and cipher suites", e))?;
        let builder = match settings.client_auth {
            ClientAuth::None => builder.with_no_client_auth(),
            ClientAuth::AnyCertificate => {
                builder.with_client_cert_verifier(Arc::new(AcceptAnyClientCert {
                    algorithms: provider.signature_verification_algorithms,
                }))
            }
            ClientAuth::Verified(clients) => {
                let mut webpki =
                    WebPkiClientVerifier::builder_with_provider(clients.cas.store, provider);
                if let Some(crls) = clients.crls {
                    webpki = webpki.with_crls(crls.0).allow_unknown_revocation_status();
                }
                let webpki = webpki
                    .build()
                    .map_err(|e| NetError::invalid("client certificate verifier", e))?;
                builder.with_client_cert_verifier(Arc::new(ClientVerifier {
                    webpki,
                    also: Also {
                        roots: clients.cas.certs,
                        allowed_cn: clients.allowed_cn,
                        allowed_hostname: clients.allowed_hostname,
                    },
                }))
            }
        };
        let Identity { certs, key, what } = settings.identity;
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|e| NetError::invalid(what, e))?;
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        if settings.http1 {
            config.alpn_protocols.push(ALPN_HTTP1.to_vec());
        }
        Ok(ServerTls(Arc::new(config)))
    }
}

/// How a client checks the server's certificate.
#[derive(Debug)]
pub enum ServerAuth {
    /// Any certificate backed by its key (auto TLS).
    AnyCertificate,
    /// A certificate for the host dialed that chains to one of these CAs.
    Verified(TrustedCas),
}

/// A client's TLS configuration, ready to dial with
/// ([`crate::Connector`]). Cheap to clone.
#[derive(Clone, Debug)]
pub struct ClientTls(pub(crate) Arc<rustls::ClientConfig>);

impl ClientTls {
    /// Offers HTTP/2 only; `identity` goes out when a server asks for a
    /// client certificate.
    pub fn new(server_auth: ServerAuth, identity: Option<Identity>) -> Result<ClientTls, NetError> {
        let provider = default_provider();
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| NetError::invalid("TLS versions", e))?;
        let builder = match server_auth {
            ServerAuth::Verified(cas) => {
                let verifier = WebPkiServerVerifier::builder_with_provider(cas.store, provider)
                    .build()
                    .map_err(|e| NetError::invalid("server certificate verifier", e))?;
                builder.with_webpki_verifier(verifier)
            }
            ServerAuth::AnyCertificate => {
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(AcceptAnyServerCert {
                        algorithms: provider.signature_verification_algorithms,
                    }))
            }
        };
        let mut config = match identity {
            Some(Identity { certs, key, what }) => builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| NetError::invalid(what, e))?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(ClientTls(Arc::new(config)))
    }
}

/// A member's peer TLS settings, both sides: etcd's --peer-* flags.
///
/// Two modes, as etcd has them:
/// - a certificate, key and trusted CA (`--peer-cert-file`,
///   `--peer-key-file`, `--peer-trusted-ca-file`): servers are verified
///   against the CA and, with `--peer-client-cert-auth`, so are clients;
/// - auto TLS (`--peer-auto-tls`): each member makes a self-signed
///   certificate and nobody verifies anybody's, so traffic is encrypted but
///   not authenticated, exactly as etcd's auto TLS.
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
    pub fn self_signed(hosts: &[String]) -> Result<PeerTls, NetError> {
        let SelfSigned { cert_pem, key_pem } = SelfSigned::generate(hosts)?;
        Ok(PeerTls {
            cert_pem,
            key_pem,
            trusted_ca_pem: None,
            client_cert_auth: false,
            allowed_cn: None,
            allowed_hostname: None,
        })
    }

    /// Builds both the client and the server configuration, so that bad
    /// PEM or a key that does not match its certificate is reported at start
    /// rather than on the first connection.
    pub fn check(&self) -> Result<(), NetError> {
        self.client()?;
        self.server()?;
        Ok(())
    }

    fn identity(&self) -> Result<Identity, NetError> {
        Identity::from_pem(&self.cert_pem, &self.key_pem, "peer")
    }

    fn cas(&self) -> Result<Option<TrustedCas>, NetError> {
        self.trusted_ca_pem
            .as_deref()
            .map(|pem| TrustedCas::from_pem(pem, "peer trusted CA"))
            .transpose()
    }

    /// The configuration a member dials its peers with. Its certificate
    /// goes out whenever a peer's server asks for one.
    pub fn client(&self) -> Result<ClientTls, NetError> {
        let server_auth = match self.cas()? {
            Some(cas) => ServerAuth::Verified(cas),
            None => ServerAuth::AnyCertificate,
        };
        ClientTls::new(server_auth, Some(self.identity()?))
    }

    /// The configuration a member's peer listener accepts connections with.
    pub fn server(&self) -> Result<ServerTls, NetError> {
        let client_auth = match (self.cas()?, self.client_cert_auth) {
            (Some(cas), true) => ClientAuth::Verified(VerifiedClients {
                allowed_cn: self.allowed_cn.clone(),
                allowed_hostname: self.allowed_hostname.clone(),
                ..VerifiedClients::new(cas)
            }),
            // Client-cert auth without a CA (auto TLS): a certificate is
            // required, but, as everywhere in auto TLS, not verified.
            (None, true) => ClientAuth::AnyCertificate,
            (_, false) => ClientAuth::None,
        };
        ServerTls::new(ServerSettings {
            client_auth,
            ..ServerSettings::new(self.identity()?)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_builds_both_configs() -> Result<(), NetError> {
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
    fn bad_pem_is_an_error() -> Result<(), NetError> {
        let mut tls = PeerTls::self_signed(&[])?;
        tls.key_pem = b"not a key".to_vec();
        let err = tls.check().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.starts_with("peer private key"), "{err}");
        let mut tls = PeerTls::self_signed(&[])?;
        tls.trusted_ca_pem = Some(Vec::new());
        let err = tls.check().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.starts_with("peer trusted CA"), "{err}");
        Ok(())
    }
}
