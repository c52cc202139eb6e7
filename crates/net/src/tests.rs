//! TLS as servers built here behave towards real clients: certificates,
//! client-certificate verification, CRLs (webpki's and etcd's serial
//! check), etcd's allowed CN, cipher suites, stalled handshakes, and plain
//! and TLS connections on one port. Clients are rustls' own, configured
//! directly, so that each test chooses exactly what the client offers.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cairn_api::v3lockpb::LockRequest;
use cairn_api::v3lockpb::lock_client::LockClient;
use cairn_api::v3lockpb::lock_server::{Lock, LockServer};
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CertifiedIssuer, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams,
    SerialNumber,
};
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::{Endpoint, Server};

use crate::*;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// Answers every call with Unimplemented: an answer at all shows that TLS,
/// HTTP/2 and gRPC went through.
struct NoLock;

impl Lock for NoLock {}

/// A CA, and the certificates and CRL the tests use, in files.
struct Pki {
    dir: tempfile::TempDir,
}

const REVOKED_SERIAL: u8 = 4;

impl Pki {
    fn new() -> Result<Pki, Box<dyn std::error::Error + Send + Sync>> {
        let dir = tempfile::tempdir()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params
            .distinguished_name
            .push(DnType::CommonName, "cairn test CA");
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        std::fs::write(dir.path().join("ca.pem"), ca.pem())?;
        let leaves = [
            ("server", 2, ExtendedKeyUsagePurpose::ServerAuth),
            ("client", 3, ExtendedKeyUsagePurpose::ClientAuth),
            (
                "revoked",
                REVOKED_SERIAL,
                ExtendedKeyUsagePurpose::ClientAuth,
            ),
        ];
        for (name, serial, usage) in leaves {
            let mut params =
                CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?;
            params.serial_number = Some(SerialNumber::from_slice(&[serial]));
            params.extended_key_usages = vec![usage];
            params.distinguished_name.push(DnType::CommonName, name);
            let key = KeyPair::generate()?;
            let cert = params.signed_by(&key, &ca)?;
            std::fs::write(dir.path().join(format!("{name}.pem")), cert.pem())?;
            std::fs::write(
                dir.path().join(format!("{name}-key.pem")),
                key.serialize_pem(),
            )?;
        }
        let crl = CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(2024, 1, 1),
            // Long past, as in etcd's fixtures: an old CRL still counts.
            next_update: rcgen::date_time_ymd(2024, 1, 8),
            crl_number: SerialNumber::from_slice(&[1]),
            issuing_distribution_point: None,
            revoked_certs: vec![RevokedCertParams {
                serial_number: SerialNumber::from_slice(&[REVOKED_SERIAL]),
                revocation_time: rcgen::date_time_ymd(2024, 1, 1),
                reason_code: None,
                invalidity_date: None,
            }],
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&ca)?;
        // DER, as etcd's fixtures have it, and PEM.
        std::fs::write(dir.path().join("revoke.crl"), crl.der())?;
        std::fs::write(dir.path().join("revoke.crl.pem"), crl.pem()?)?;
        Ok(Pki { dir })
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    fn read(&self, name: &str) -> std::io::Result<Vec<u8>> {
        std::fs::read(self.path(name))
    }

    /// A client identity: certificate and key PEM.
    fn identity(&self, name: &str) -> std::io::Result<(Vec<u8>, Vec<u8>)> {
        Ok((
            self.read(&format!("{name}.pem"))?,
            self.read(&format!("{name}-key.pem"))?,
        ))
    }

    fn cas(&self) -> Result<TrustedCas, NetError> {
        TrustedCas::from_file(&self.path("ca.pem"), "--trusted-ca-file")
    }

    /// The server's settings, asking nothing of clients.
    fn server(&self) -> Result<ServerSettings, NetError> {
        Ok(ServerSettings::new(Identity::from_files(
            &self.path("server.pem"),
            "--cert-file",
            &self.path("server-key.pem"),
            "--key-file",
        )?))
    }

    /// The server's settings, verifying clients against the CA.
    fn verifying(&self, crls: bool) -> Result<ServerSettings, NetError> {
        let crls = if crls {
            Some(Crls::read(&self.path("revoke.crl"), "--client-crl-file")?)
        } else {
            None
        };
        Ok(ServerSettings {
            client_auth: ClientAuth::Verified(VerifiedClients {
                crls,
                ..VerifiedClients::new(self.cas()?)
            }),
            ..self.server()?
        })
    }
}

/// Serves NoLock on a loopback port as a member's client listener does.
async fn serve(accept: Accept) -> Result<SocketAddr, std::io::Error> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (incoming, _) = accept.spawn::<ClientConn>(listener);
    let router = Server::builder().add_service(LockServer::new(NoLock));
    tokio::spawn(router.serve_with_incoming(incoming));
    Ok(addr)
}

async fn serve_tls(
    settings: ServerSettings,
) -> Result<SocketAddr, Box<dyn std::error::Error + Send + Sync>> {
    Ok(serve(Accept::new(Some(&ServerTls::new(settings)?), "test")).await?)
}

fn client_config(
    provider: CryptoProvider,
    trusted_pem: &[u8],
    identity: Option<(Vec<u8>, Vec<u8>)>,
) -> Result<rustls::ClientConfig, Box<dyn std::error::Error + Send + Sync>> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(trusted_pem) {
        roots.add(cert?)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let mut config = match identity {
        Some((cert, key)) => builder.with_client_auth_cert(
            CertificateDer::pem_slice_iter(&cert).collect::<Result<_, _>>()?,
            PrivateKeyDer::from_pem_slice(&key)?,
        )?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// One gRPC call over TLS as "localhost" (or plain, without a config); Ok
/// when the server answered.
async fn call(addr: SocketAddr, config: Option<rustls::ClientConfig>) -> TestResult {
    let connector = config.map(|c| tokio_rustls::TlsConnector::from(Arc::new(c)));
    let connect = tower::service_fn(move |_| {
        let connector = connector.clone();
        async move {
            let tcp = crate::Socket::Tcp(TcpStream::connect(addr).await?);
            let stream = match connector {
                Some(connector) => {
                    let name = ServerName::try_from("localhost").map_err(std::io::Error::other)?;
                    crate::MaybeTls::Tls(Box::new(connector.connect(name, tcp).await?))
                }
                None => crate::MaybeTls::Plain(tcp),
            };
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }
    });
    let answer = tokio::time::timeout(Duration::from_secs(10), async {
        let channel = Endpoint::from_static("http://localhost")
            .connect_with_connector(connect)
            .await?;
        let status = LockClient::new(channel)
            .lock(LockRequest::default())
            .await
            .err()
            .ok_or("NoLock answered Ok")?;
        if status.code() != tonic::Code::Unimplemented {
            return Err(format!("not answered by the server: {status}").into());
        }
        Ok(())
    });
    answer.await?
}

async fn call_with(
    addr: SocketAddr,
    trusted_pem: &[u8],
    identity: Option<(Vec<u8>, Vec<u8>)>,
) -> TestResult {
    let provider = rustls::crypto::ring::default_provider();
    call(addr, Some(client_config(provider, trusted_pem, identity)?)).await
}

/// Asserts that a call failed, for this reason (a TLS alert or error).
fn refused(result: TestResult, why: &str) {
    let mut err = String::new();
    let mut cause: Option<&(dyn std::error::Error + 'static)> =
        result.as_ref().err().map(|e| &**e as _);
    while let Some(e) = cause {
        err.push_str(&format!("{e}: "));
        cause = e.source();
    }
    assert!(err.contains(why), "expected {why}, got {err:?}");
}

#[tokio::test]
async fn serves_tls_with_a_certificate() -> TestResult {
    let pki = Pki::new()?;
    let addr = serve_tls(pki.server()?).await?;
    // No CA given: no client certificate is asked for.
    call_with(addr, &pki.read("ca.pem")?, None).await?;
    // A client that does not trust the server's CA gets nowhere.
    let other = Pki::new()?;
    refused(
        call_with(addr, &other.read("ca.pem")?, None).await,
        "BadSignature",
    );
    Ok(())
}

#[tokio::test]
async fn client_certificates_must_come_from_the_ca() -> TestResult {
    let pki = Pki::new()?;
    let addr = serve_tls(pki.verifying(false)?).await?;
    let ca = pki.read("ca.pem")?;
    refused(call_with(addr, &ca, None).await, "CertificateRequired");
    // Signed by another CA of the same name.
    let stranger = Pki::new()?.identity("client")?;
    refused(call_with(addr, &ca, Some(stranger)).await, "DecryptError");
    call_with(addr, &ca, Some(pki.identity("client")?)).await?;
    // Without a CRL, the certificate the next test revokes is fine.
    call_with(addr, &ca, Some(pki.identity("revoked")?)).await
}

#[tokio::test]
async fn a_revoked_certificate_is_refused() -> TestResult {
    let pki = Pki::new()?;
    let addr = serve_tls(pki.verifying(true)?).await?;
    let ca = pki.read("ca.pem")?;
    refused(
        call_with(addr, &ca, Some(pki.identity("revoked")?)).await,
        "CertificateRevoked",
    );
    call_with(addr, &ca, Some(pki.identity("client")?)).await
}

#[tokio::test]
async fn a_revoked_serial_is_refused_after_the_handshake() -> TestResult {
    let pki = Pki::new()?;
    let revoked = Crls::read(&pki.path("revoke.crl"), "--client-crl-file")?
        .revoked_serials("--client-crl-file")?;
    let tls = ServerTls::new(pki.verifying(false)?)?;
    let addr = serve(Accept::new(Some(&tls), "test").refusing(revoked)).await?;
    let ca = pki.read("ca.pem")?;
    assert!(
        call_with(addr, &ca, Some(pki.identity("revoked")?))
            .await
            .is_err()
    );
    call_with(addr, &ca, Some(pki.identity("client")?)).await
}

#[tokio::test]
async fn an_allowed_common_name_refuses_others() -> TestResult {
    let pki = Pki::new()?;
    let settings = ServerSettings {
        client_auth: ClientAuth::Verified(VerifiedClients {
            allowed_cn: Some("client".to_owned()),
            ..VerifiedClients::new(pki.cas()?)
        }),
        ..pki.server()?
    };
    let addr = serve_tls(settings).await?;
    let ca = pki.read("ca.pem")?;
    call_with(addr, &ca, Some(pki.identity("client")?)).await?;
    // Signed by the CA, but named otherwise: Go's bad_certificate.
    refused(
        call_with(addr, &ca, Some(pki.identity("revoked")?)).await,
        "BadCertificate",
    );
    Ok(())
}

#[tokio::test]
async fn an_allowed_hostname_refuses_certificates_not_valid_for_it() -> TestResult {
    let pki = Pki::new()?;
    let allowing = |hostname: &str| -> Result<ServerSettings, NetError> {
        Ok(ServerSettings {
            client_auth: ClientAuth::Verified(VerifiedClients {
                allowed_hostname: Some(hostname.to_owned()),
                ..VerifiedClients::new(pki.cas()?)
            }),
            ..pki.server()?
        })
    };
    let ca = pki.read("ca.pem")?;
    // The client certificate names 127.0.0.1 and localhost.
    let addr = serve_tls(allowing("127.0.0.1")?).await?;
    call_with(addr, &ca, Some(pki.identity("client")?)).await?;
    let addr = serve_tls(allowing("member-9.example")?).await?;
    refused(
        call_with(addr, &ca, Some(pki.identity("client")?)).await,
        "BadCertificate",
    );
    Ok(())
}

#[tokio::test]
async fn a_stalled_handshake_holds_up_nobody() -> TestResult {
    let pki = Pki::new()?;
    let addr = serve_tls(pki.server()?).await?;
    // Half a ClientHello record header, and then nothing.
    let mut stalled = TcpStream::connect(addr).await?;
    stalled.write_all(&[0x16, 0x03]).await?;
    call_with(addr, &pki.read("ca.pem")?, None).await
}

#[tokio::test]
async fn plain_and_tls_share_a_port() -> TestResult {
    let pki = Pki::new()?;
    let tls = ServerTls::new(pki.server()?)?;
    let addr = serve(Accept::new(Some(&tls), "test").or_plain()).await?;
    call(addr, None).await?;
    call_with(addr, &pki.read("ca.pem")?, None).await?;
    // Without or_plain, a plain client gets no answer.
    let addr = serve(Accept::new(Some(&tls), "test")).await?;
    assert!(call(addr, None).await.is_err());
    Ok(())
}

#[tokio::test]
async fn unix_sockets_carry_plain_and_tls_connections() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("etcd.unix:1");
    let url = EtcdUrl {
        tls: true,
        address: Address::Unix(path.clone()),
    };
    // A file left by an earlier process is no obstacle.
    std::fs::write(&path, b"stale")?;
    let listener = Listener::bind(&url).await?;
    let tls = PeerTls::self_signed(&["localhost".to_owned()])?;
    let (incoming, accepting) = Accept::new(Some(&tls.server()?), "test")
        .or_plain()
        .spawn::<ClientConn>(listener);
    let router = Server::builder().add_service(LockServer::new(NoLock));
    tokio::spawn(router.serve_with_incoming(incoming));
    for client_tls in [None, Some(tls.client()?)] {
        let connector = Connector {
            tls: client_tls,
            unix_socket: Some(path.clone()),
        };
        let channel = Endpoint::from_static("http://localhost")
            .connect_with_connector(connector)
            .await?;
        let status = LockClient::new(channel)
            .lock(LockRequest::default())
            .await
            .err()
            .ok_or("NoLock answered Ok")?;
        assert_eq!(status.code(), tonic::Code::Unimplemented);
    }
    // The socket's file goes with its listener.
    accepting.abort();
    let _ = accepting.await;
    assert!(!path.exists());
    Ok(())
}

#[tokio::test]
async fn cipher_suites_limit_tls12() -> TestResult {
    let pki = Pki::new()?;
    // rcgen's keys are ECDSA P-256.
    let addr = serve_tls(ServerSettings {
        cipher_suites: vec![
            "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256".to_owned(),
            "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305".to_owned(),
        ],
        ..pki.server()?
    })
    .await?;
    let ca = pki.read("ca.pem")?;
    let tls12_only = |suite: rustls::SupportedCipherSuite| {
        let mut provider = rustls::crypto::ring::default_provider();
        provider.cipher_suites = vec![suite];
        client_config(provider, &ca, None)
    };
    use rustls::crypto::ring::cipher_suite as ring;
    call(
        addr,
        Some(tls12_only(ring::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256)?),
    )
    .await?;
    let aes256 = tls12_only(ring::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384)?;
    refused(call(addr, Some(aes256)).await, "HandshakeFailure");
    // TLS 1.3 is not restricted, as in Go.
    call_with(addr, &ca, None).await
}

#[test]
fn crls_are_read_as_der_or_pem() -> TestResult {
    let pki = Pki::new()?;
    let der = Crls::read(&pki.path("revoke.crl"), "--client-crl-file")?;
    assert_eq!(
        der,
        Crls::read(&pki.path("revoke.crl.pem"), "--client-crl-file")?
    );
    let missing = Crls::read(&pki.path("missing"), "--client-crl-file")
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(missing.starts_with("--client-crl-file "), "{missing}");
    Ok(())
}

#[test]
fn a_client_certificate_with_a_common_name_is_refused_for_the_proxy() -> TestResult {
    let pki = Pki::new()?;
    let err = check_empty_common_name(&pki.path("client.pem"), "--cert")
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.starts_with("cert has non empty Common Name (client)"),
        "{err}"
    );
    let mut params = CertificateParams::new(vec!["localhost".to_owned()])?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    let unnamed = pki.path("unnamed.pem");
    std::fs::write(&unnamed, params.self_signed(&KeyPair::generate()?)?.pem())?;
    check_empty_common_name(&unnamed, "--cert")?;
    Ok(())
}

#[test]
fn etcds_crl_revokes_its_revoked_certificate() -> TestResult {
    let dir = Path::new("/usr/share/gocode/src/go.etcd.io/etcd/integration/fixtures");
    if !dir.exists() {
        return Ok(());
    }
    let revoked = Crls::read(&dir.join("revoke.crl"), "crl")?.revoked_serials("crl")?;
    let first = |name: &str| -> Result<Vec<u8>, Box<dyn std::error::Error + Send + Sync>> {
        let pem = std::fs::read(dir.join(name))?;
        Ok(CertificateDer::pem_slice_iter(&pem)
            .next()
            .ok_or("no certificate")??
            .to_vec())
    };
    assert!(revoked.revokes(&first("server-revoked.crt")?));
    assert!(!revoked.revokes(&first("server.crt")?));
    Ok(())
}
