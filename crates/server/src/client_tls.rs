//! TLS on the client listeners: etcd's --cert-file, --key-file,
//! --trusted-ca-file, --client-cert-auth, --client-crl-file, --auto-tls and
//! --cipher-suites, on rustls with the ring provider.
//!
//! As in etcd 3.4:
//! - an https:// client URL serves TLS, an http:// one serves plain text even
//!   when certificates are given (server.rs chooses per URL);
//! - a --trusted-ca-file makes every client present a certificate that
//!   chains to it, --client-cert-auth or not (etcd's `TLSInfo.ServerConfig`);
//!   --client-crl-file then refuses the certificates it lists;
//! - --auto-tls, when no certificate is given, makes a self-signed one in
//!   `<data-dir>/fixtures/client` (kept across restarts) and verifies no
//!   client: clients skip verification or trust that certificate.
//!
//! Handshakes run in tasks of their own under a time limit, so a client that
//! stalls in its handshake holds up nobody else, and every connection then
//! goes through [`AuthorityFix`] as plain ones do.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use cairn_consensus::PeerTls;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{RootCertStore, SupportedCipherSuite};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::authority::AuthorityFix;
use crate::config::{ServerConfig, TlsFlags};

/// A TLS handshake on a client listener that takes longer is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshaken connections waiting for tonic to pick them up.
const ACCEPT_BACKLOG: usize = 64;
/// The ALPN protocol offered: clients speak gRPC, so HTTP/2 only.
const ALPN_H2: &[u8] = b"h2";

/// An accepted client connection on an https:// listener.
pub(crate) type TlsConn = AuthorityFix<TlsStream<TcpStream>>;

pub use cairn_gateway::ClientTlsInfo;

impl Connected for TlsConn {
    type ConnectInfo = ClientTlsInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        let presented = self.get_ref().get_ref().1.peer_certificates();
        client_tls_info(presented.unwrap_or_default())
    }
}

/// The names in a client's certificate chain, which rustls verified. The
/// client sends its certificate and any intermediates, not the trust
/// anchor: the anchor's common name is the last one's issuer's.
fn client_tls_info(presented: &[CertificateDer<'_>]) -> ClientTlsInfo {
    let parsed: Vec<_> = presented
        .iter()
        .filter_map(|cert| x509_parser::parse_x509_certificate(cert.as_ref()).ok())
        .map(|(_, cert)| cert)
        .collect();
    let common_name = |name: &x509_parser::x509::X509Name<'_>| {
        name.iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_string)
    };
    let mut chain_common_names: Vec<String> = parsed
        .iter()
        .filter_map(|cert| common_name(cert.subject()))
        .collect();
    if let Some(last) = parsed.last()
        && last.issuer() != last.subject()
        && let Some(anchor) = common_name(last.issuer())
    {
        chain_common_names.push(anchor);
    }
    ClientTlsInfo {
        common_name: parsed.first().and_then(|leaf| common_name(leaf.subject())),
        chain_common_names,
    }
}

/// The TLS configuration of the client listeners, or `None` when neither
/// certificates nor --auto-tls are given. `hosts` are the client URLs'
/// hosts, which an --auto-tls certificate names.
pub(crate) fn server_config(
    config: &ServerConfig,
    hosts: &[String],
) -> anyhow::Result<Option<Arc<rustls::ServerConfig>>> {
    let provider = Arc::new(provider(&config.cipher_suites)?);
    let flags = &config.client_tls;
    let (cert_file, key_file, verifier) = if !flags.cert_file.is_empty() {
        if flags.auto_tls {
            tracing::warn!("ignoring client auto TLS since certs given");
        }
        let verifier = client_verifier(flags, provider.clone())?;
        (
            PathBuf::from(&flags.cert_file),
            PathBuf::from(&flags.key_file),
            verifier,
        )
    } else if flags.auto_tls {
        // etcd's auto TLS replaces all the client TLS settings with its
        // self-signed certificate: nothing is asked of clients.
        if flags.client_cert_auth || !flags.trusted_ca_file.is_empty() || !flags.crl_file.is_empty()
        {
            tracing::warn!(
                "--auto-tls ignores --client-cert-auth, --trusted-ca-file and --client-crl-file, as etcd's does"
            );
        }
        let dir = config.data_dir.join("fixtures").join("client");
        let (cert_file, key_file) = self_cert(&dir, hosts)?;
        (cert_file, key_file, None)
    } else {
        return Ok(None);
    };
    tracing::info!(
        "ClientTLS: cert = {}, key = {}, trusted-ca = {}, client-cert-auth = {}, crl-file = {}",
        cert_file.display(),
        key_file.display(),
        flags.trusted_ca_file,
        verifier.is_some(),
        flags.crl_file
    );
    let builder = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("client TLS versions and --cipher-suites")?;
    let builder = match verifier {
        Some(verifier) => builder.with_client_cert_verifier(verifier),
        None => builder.with_no_client_auth(),
    };
    let certs = pem_file::<CertificateDer<'static>>(&cert_file, "--cert-file")?;
    let key = PrivateKeyDer::from_pem_slice(&read(&key_file, "--key-file")?)
        .with_context(|| format!("--key-file {}", key_file.display()))?;
    let mut tls = builder
        .with_single_cert(certs, key)
        .context("--cert-file and --key-file")?;
    // HTTP/1.1 too: curl and etcd's v2 clients reach the HTTP gateway on
    // the same port.
    tls.alpn_protocols = vec![ALPN_H2.to_vec(), b"http/1.1".to_vec()];
    Ok(Some(Arc::new(tls)))
}

/// The verifier of client certificates: none without --trusted-ca-file.
/// With one, every client must present a certificate that chains to it, as
/// etcd 3.4 asks whether --client-cert-auth is set or not.
fn client_verifier(
    flags: &TlsFlags,
    provider: Arc<CryptoProvider>,
) -> anyhow::Result<Option<Arc<dyn ClientCertVerifier>>> {
    if flags.trusted_ca_file.is_empty() {
        // Config refused --client-cert-auth without a CA.
        if !flags.crl_file.is_empty() {
            tracing::warn!("--client-crl-file has no effect without --trusted-ca-file");
        }
        return Ok(None);
    }
    let ca_file = Path::new(&flags.trusted_ca_file);
    let mut roots = RootCertStore::empty();
    let cas = pem_file::<CertificateDer<'static>>(ca_file, "--trusted-ca-file")?;
    for ca in &cas {
        roots
            .add(ca.clone())
            .with_context(|| format!("--trusted-ca-file {}", ca_file.display()))?;
    }
    let mut builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
    if !flags.crl_file.is_empty() {
        builder = builder
            .with_crls(crls(Path::new(&flags.crl_file))?)
            // etcd refuses only the serials a CRL lists: a certificate no
            // CRL speaks for (an intermediate CA's) is not refused. Like
            // etcd, an out-of-date CRL still counts (rustls' default).
            .allow_unknown_revocation_status();
    }
    Ok(Some(Arc::new(RootsAsClients {
        webpki: builder.build().context("client certificate verifier")?,
        roots: cas,
    })))
}

/// Go accepts a client certificate that is itself one of the trusted CAs
/// (etcd's tests present a self-signed CA certificate as the client's);
/// webpki refuses a CA certificate as an end entity. Everything else,
/// handshake signatures included, is webpki's.
#[derive(Debug)]
struct RootsAsClients {
    webpki: Arc<dyn ClientCertVerifier>,
    roots: Vec<CertificateDer<'static>>,
}

impl ClientCertVerifier for RootsAsClients {
    fn offer_client_auth(&self) -> bool {
        self.webpki.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.webpki.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.webpki.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls_pki_types::UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if self
            .roots
            .iter()
            .any(|root| root.as_ref() == end_entity.as_ref())
        {
            return Ok(ClientCertVerified::assertion());
        }
        self.webpki
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// Reads every PEM item of one kind from a file that must hold at least one.
fn pem_file<T: PemObject>(path: &Path, flag: &str) -> anyhow::Result<Vec<T>> {
    let bytes = read(path, flag)?;
    pem_items(&bytes, path, flag)
}

fn read(path: &Path, flag: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{flag} {}", path.display()))
}

fn pem_items<T: PemObject>(bytes: &[u8], path: &Path, flag: &str) -> anyhow::Result<Vec<T>> {
    let items = T::pem_slice_iter(bytes)
        .collect::<Result<Vec<T>, _>>()
        .with_context(|| format!("{flag} {}", path.display()))?;
    if items.is_empty() {
        anyhow::bail!(
            "{flag} {}: no PEM item of the expected kind",
            path.display()
        );
    }
    Ok(items)
}

/// --client-crl-file: DER, or PEM, as Go's x509.ParseCRL takes either
/// (etcd's test fixtures are DER).
fn crls(path: &Path) -> anyhow::Result<Vec<CertificateRevocationListDer<'static>>> {
    const FLAG: &str = "--client-crl-file";
    let bytes = read(path, FLAG)?;
    if bytes.starts_with(b"-----BEGIN") {
        pem_items(&bytes, path, FLAG)
    } else {
        Ok(vec![CertificateRevocationListDer::from(bytes)])
    }
}

/// etcd's --auto-tls certificate: `cert.pem` and `key.pem` in `dir`, made
/// at the first start and used again after, as etcd does, so a client that
/// chose to trust the certificate still can after a restart.
fn self_cert(dir: &Path, hosts: &[String]) -> anyhow::Result<(PathBuf, PathBuf)> {
    let cert_file = dir.join("cert.pem");
    let key_file = dir.join("key.pem");
    if cert_file.exists() && key_file.exists() {
        return Ok((cert_file, key_file));
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let generated = PeerTls::self_signed(hosts).context("generating the --auto-tls certificate")?;
    write_file(&key_file, &generated.key_pem, 0o600)?;
    write_file(&cert_file, &generated.cert_pem, 0o644)?;
    tracing::info!("created cert file {}", cert_file.display());
    Ok((cert_file, key_file))
}

fn write_file(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let write = || -> std::io::Result<()> {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(path)?
            .write_all(contents)
    };
    write().with_context(|| format!("writing {}", path.display()))
}

/// The ring provider, its TLS 1.2 cipher suites cut down to --cipher-suites
/// when that is given. TLS 1.3's suites stay on whatever it says: Go does
/// not let a configuration choose them either.
pub(crate) fn provider(names: &[String]) -> anyhow::Result<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    if names.is_empty() {
        return Ok(provider);
    }
    let mut tls12 = Vec::new();
    for name in names {
        if let Some(suite) = go_cipher_suite(name)?
            && !tls12.contains(&suite)
        {
            tls12.push(suite);
        }
    }
    provider.cipher_suites.retain(|s| s.tls13().is_some());
    provider.cipher_suites.extend(tls12);
    Ok(provider)
}

/// Go's crypto/tls names that rustls has no suite for: CBC, RC4 and 3DES
/// ciphers, and RSA key exchange.
const GO_ONLY_SUITES: &[&str] = &[
    "TLS_RSA_WITH_RC4_128_SHA",
    "TLS_RSA_WITH_3DES_EDE_CBC_SHA",
    "TLS_RSA_WITH_AES_128_CBC_SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA",
    "TLS_RSA_WITH_AES_128_CBC_SHA256",
    "TLS_RSA_WITH_AES_128_GCM_SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_ECDSA_WITH_RC4_128_SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA",
    "TLS_ECDHE_RSA_WITH_RC4_128_SHA",
    "TLS_ECDHE_RSA_WITH_3DES_EDE_CBC_SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256",
];

/// One of etcd's --cipher-suites names (Go's, with etcd's two aliases for
/// the ChaCha20 suites): the TLS 1.2 suite it names, `None` for a TLS 1.3
/// suite, an error for a name rustls has no suite for or nobody knows.
fn go_cipher_suite(name: &str) -> anyhow::Result<Option<SupportedCipherSuite>> {
    use rustls::crypto::ring::cipher_suite as ring;
    let suite = match name {
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256" => ring::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384" => ring::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256" => ring::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384" => ring::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256"
        | "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305" => {
            ring::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
        }
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256" | "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305" => {
            ring::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256
        }
        "TLS_AES_128_GCM_SHA256" | "TLS_AES_256_GCM_SHA384" | "TLS_CHACHA20_POLY1305_SHA256" => {
            return Ok(None);
        }
        _ if GO_ONLY_SUITES.contains(&name) => anyhow::bail!(
            "TLS cipher suite {name:?} is not supported by Cairn (rustls has no CBC, RC4 or 3DES suites and no RSA key exchange)"
        ),
        _ => anyhow::bail!("unexpected TLS cipher suite {name:?}"),
    };
    Ok(Some(suite))
}

/// The connections of one https:// client listener, for tonic, each
/// handshaken in a task of its own. Accepting stops when tonic drops the
/// stream (at shutdown).
pub(crate) fn incoming(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
) -> ReceiverStream<Result<TlsConn, Infallible>> {
    let (conns, stream) = mpsc::channel(ACCEPT_BACKLOG);
    tokio::spawn(accept_loop(listener, TlsAcceptor::from(tls), conns, None));
    ReceiverStream::new(stream)
}

/// Plain connections of a listener shared by an https:// and an http://
/// client URL.
pub(crate) type PlainConns = ReceiverStream<Result<AuthorityFix<TcpStream>, Infallible>>;

/// The connections of a listener that serves https:// and http:// on one
/// address (both in --listen-client-urls, as etcd allows): one that opens
/// with a TLS handshake record is handshaken, any other is plain.
pub(crate) fn incoming_mixed(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
) -> (ReceiverStream<Result<TlsConn, Infallible>>, PlainConns) {
    let (conns, stream) = mpsc::channel(ACCEPT_BACKLOG);
    let (plain, plain_stream) = mpsc::channel(ACCEPT_BACKLOG);
    tokio::spawn(accept_loop(
        listener,
        TlsAcceptor::from(tls),
        conns,
        Some(plain),
    ));
    (
        ReceiverStream::new(stream),
        ReceiverStream::new(plain_stream),
    )
}

/// The first byte of a TLS ClientHello: a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    conns: mpsc::Sender<Result<TlsConn, Infallible>>,
    plain: Option<mpsc::Sender<Result<AuthorityFix<TcpStream>, Infallible>>>,
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
                tracing::warn!(error = %e, "accepting a client connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // As on plain client connections: replies are small and
        // latency-bound.
        let _ = tcp.set_nodelay(true);
        let Some(plain) = plain.clone() else {
            tokio::spawn(handshake(acceptor.clone(), tcp, remote, conns.clone()));
            continue;
        };
        let (acceptor, conns) = (acceptor.clone(), conns.clone());
        tokio::spawn(async move {
            let mut first = [0u8; 1];
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, tcp.peek(&mut first)).await {
                Ok(Ok(1)) if first[0] == TLS_HANDSHAKE_RECORD => {
                    handshake(acceptor, tcp, remote, conns).await;
                }
                Ok(Ok(1)) => {
                    let _ = plain.send(Ok(AuthorityFix::new(tcp))).await;
                }
                // Closed or silent before its first byte.
                _ => {}
            }
        });
    }
}

async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    remote: SocketAddr,
    conns: mpsc::Sender<Result<TlsConn, Infallible>>,
) {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => {
            // Fails only when the server is shutting down: the connection
            // is dropped then.
            let _ = conns.send(Ok(AuthorityFix::new(tls))).await;
        }
        Ok(Err(e)) => tracing::warn!("rejected connection from \"{remote}\" (error \"{e}\")"),
        Err(_) => tracing::warn!(
            "rejected connection from \"{remote}\" (TLS handshake not done in {HANDSHAKE_TIMEOUT:?})"
        ),
    }
}

#[cfg(test)]
mod tests {
    use cairn_api::v3lockpb::LockRequest;
    use cairn_api::v3lockpb::lock_client::LockClient;
    use cairn_api::v3lockpb::lock_server::{Lock, LockServer};
    use hyper_util::rt::TokioIo;
    use rcgen::{
        BasicConstraints, CertificateParams, CertificateRevocationListParams, CertifiedIssuer,
        DnType, ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose,
        RevokedCertParams, SerialNumber,
    };
    use rustls_pki_types::ServerName;
    use tokio::io::AsyncWriteExt as _;
    use tonic::transport::{Endpoint, Server};

    use super::*;
    use crate::config::{Invocation, parse};

    /// Answers every call with Unimplemented: an answer at all shows that
    /// TLS, HTTP/2 and gRPC went through.
    struct NoLock;

    impl Lock for NoLock {}

    /// A CA, and the certificates and CRL the tests use, in files.
    struct Pki {
        dir: tempfile::TempDir,
    }

    const REVOKED_SERIAL: u8 = 4;

    impl Pki {
        fn new() -> anyhow::Result<Pki> {
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

        fn path(&self, name: &str) -> String {
            self.dir.path().join(name).display().to_string()
        }

        fn read(&self, name: &str) -> anyhow::Result<Vec<u8>> {
            Ok(std::fs::read(self.dir.path().join(name))?)
        }

        /// A client identity: certificate and key PEM.
        fn identity(&self, name: &str) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
            Ok((
                self.read(&format!("{name}.pem"))?,
                self.read(&format!("{name}-key.pem"))?,
            ))
        }
    }

    /// etcd's v2 API takes the CA's common name as a user too, though the
    /// client never sends the CA's certificate.
    #[test]
    fn the_chain_names_the_client_and_its_ca() -> anyhow::Result<()> {
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "Autogenerated CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
        let mut leaf_params = CertificateParams::new(vec!["localhost".to_owned()])?;
        leaf_params.distinguished_name = rcgen::DistinguishedName::new();
        leaf_params
            .distinguished_name
            .push(DnType::CommonName, "example.com");
        let leaf = leaf_params.signed_by(&KeyPair::generate()?, &ca)?;

        let info = client_tls_info(&[leaf.der().clone()]);
        assert_eq!(info.common_name.as_deref(), Some("example.com"));
        assert_eq!(info.chain_common_names, ["example.com", "Autogenerated CA"]);
        // A self-signed client certificate is its own anchor.
        let alone = client_tls_info(&[ca.der().clone()]);
        assert_eq!(alone.chain_common_names, ["Autogenerated CA"]);
        assert!(client_tls_info(&[]).common_name.is_none());
        Ok(())
    }

    fn config(args: &[&str]) -> anyhow::Result<ServerConfig> {
        let args = std::iter::once("cairn").chain(args.iter().copied());
        match parse(args, &[])? {
            Invocation::Run(config) => Ok(*config),
            Invocation::Version => anyhow::bail!("--version"),
        }
    }

    /// Serves NoLock on a loopback port with the client TLS these flags ask
    /// for, the way the member's https listeners do.
    async fn serve(args: &[&str]) -> anyhow::Result<SocketAddr> {
        let config = config(args)?;
        let hosts = ["127.0.0.1".to_owned(), "localhost".to_owned()];
        let tls = server_config(&config, &hosts)?.context("no TLS configured")?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let router = Server::builder().add_service(LockServer::new(NoLock));
        tokio::spawn(router.serve_with_incoming(incoming(listener, tls)));
        Ok(addr)
    }

    /// Serves with the Pki's server certificate and these further flags.
    async fn serve_pki(pki: &Pki, more: &[&str]) -> anyhow::Result<SocketAddr> {
        let (cert, key) = (pki.path("server.pem"), pki.path("server-key.pem"));
        let mut args = vec!["--cert-file", &cert, "--key-file", &key];
        args.extend_from_slice(more);
        serve(&args).await
    }

    fn client_config(
        provider: CryptoProvider,
        trusted_pem: &[u8],
        identity: Option<(Vec<u8>, Vec<u8>)>,
    ) -> anyhow::Result<rustls::ClientConfig> {
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
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(config)
    }

    /// One gRPC call over TLS as "localhost"; Ok when the server answered.
    async fn call(addr: SocketAddr, config: rustls::ClientConfig) -> anyhow::Result<()> {
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let connect = tower::service_fn(move |_| {
            let connector = connector.clone();
            async move {
                let tcp = TcpStream::connect(addr).await?;
                let name = ServerName::try_from("localhost").map_err(std::io::Error::other)?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
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
                .context("NoLock answered Ok")?;
            anyhow::ensure!(
                status.code() == tonic::Code::Unimplemented,
                "not answered by the server: {status}"
            );
            Ok(())
        });
        answer.await.context("timed out")?
    }

    async fn call_with(
        addr: SocketAddr,
        trusted_pem: &[u8],
        identity: Option<(Vec<u8>, Vec<u8>)>,
    ) -> anyhow::Result<()> {
        let provider = rustls::crypto::ring::default_provider();
        call(addr, client_config(provider, trusted_pem, identity)?).await
    }

    /// Asserts that a call failed, for this reason (a TLS alert or error).
    fn refused(result: anyhow::Result<()>, why: &str) {
        let err = result.err().map(|e| format!("{e:#}")).unwrap_or_default();
        assert!(err.contains(why), "expected {why}, got {err:?}");
    }

    #[tokio::test]
    async fn serves_tls_with_a_certificate() -> anyhow::Result<()> {
        let pki = Pki::new()?;
        let addr = serve_pki(&pki, &[]).await?;
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
    async fn client_cert_auth_wants_a_certificate_from_the_ca() -> anyhow::Result<()> {
        let pki = Pki::new()?;
        let addr = serve_pki(
            &pki,
            &[
                "--trusted-ca-file",
                &pki.path("ca.pem"),
                "--client-cert-auth",
            ],
        )
        .await?;
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
    async fn a_trusted_ca_alone_wants_client_certificates_too() -> anyhow::Result<()> {
        let pki = Pki::new()?;
        let addr = serve_pki(&pki, &["--trusted-ca-file", &pki.path("ca.pem")]).await?;
        let ca = pki.read("ca.pem")?;
        refused(call_with(addr, &ca, None).await, "CertificateRequired");
        call_with(addr, &ca, Some(pki.identity("client")?)).await
    }

    #[tokio::test]
    async fn a_revoked_certificate_is_refused() -> anyhow::Result<()> {
        let pki = Pki::new()?;
        let addr = serve_pki(
            &pki,
            &[
                "--trusted-ca-file",
                &pki.path("ca.pem"),
                "--client-crl-file",
                &pki.path("revoke.crl"),
                "--client-cert-auth",
            ],
        )
        .await?;
        let ca = pki.read("ca.pem")?;
        refused(
            call_with(addr, &ca, Some(pki.identity("revoked")?)).await,
            "CertificateRevoked",
        );
        call_with(addr, &ca, Some(pki.identity("client")?)).await
    }

    #[tokio::test]
    async fn auto_tls_makes_a_certificate_and_keeps_it() -> anyhow::Result<()> {
        let data = tempfile::tempdir()?;
        let data_dir = data.path().display().to_string();
        let args = ["--auto-tls", "--data-dir", &data_dir];
        let addr = serve(&args).await?;
        let cert_file = data.path().join("fixtures/client/cert.pem");
        let cert = std::fs::read(&cert_file)?;
        // A client that trusts the generated certificate gets through.
        call_with(addr, &cert, None).await?;
        // The next start serves the same certificate.
        serve(&args).await?;
        assert_eq!(std::fs::read(&cert_file)?, cert);
        Ok(())
    }

    #[tokio::test]
    async fn a_stalled_handshake_holds_up_nobody() -> anyhow::Result<()> {
        let pki = Pki::new()?;
        let addr = serve_pki(&pki, &[]).await?;
        // Half a ClientHello record header, and then nothing.
        let mut stalled = TcpStream::connect(addr).await?;
        stalled.write_all(&[0x16, 0x03]).await?;
        call_with(addr, &pki.read("ca.pem")?, None).await
    }

    #[tokio::test]
    async fn cipher_suites_limit_tls12() -> anyhow::Result<()> {
        let pki = Pki::new()?;
        // rcgen's keys are ECDSA P-256.
        let addr = serve_pki(
            &pki,
            &[
                "--cipher-suites",
                "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305",
            ],
        )
        .await?;
        let ca = pki.read("ca.pem")?;
        let tls12_only = |suite: SupportedCipherSuite| -> anyhow::Result<rustls::ClientConfig> {
            let mut provider = rustls::crypto::ring::default_provider();
            provider.cipher_suites = vec![suite];
            client_config(provider, &ca, None)
        };
        use rustls::crypto::ring::cipher_suite as ring;
        call(
            addr,
            tls12_only(ring::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256)?,
        )
        .await?;
        let aes256 = tls12_only(ring::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384)?;
        refused(call(addr, aes256).await, "HandshakeFailure");
        // TLS 1.3 is not restricted, as in Go.
        call_with(addr, &ca, None).await
    }

    #[test]
    fn files_are_read_or_named_in_the_error() -> anyhow::Result<()> {
        let pki = Pki::new()?;
        let der = crls(Path::new(&pki.path("revoke.crl")))?;
        assert_eq!(der, crls(Path::new(&pki.path("revoke.crl.pem")))?);
        let missing = pki.path("missing.pem");
        let (cert, key) = (pki.path("server.pem"), pki.path("server-key.pem"));
        for (args, flag) in [
            (["--cert-file", &missing, "--key-file", &key], "--cert-file"),
            (["--cert-file", &key, "--key-file", &key], "--cert-file"),
            (["--cert-file", &cert, "--key-file", &missing], "--key-file"),
            (["--cert-file", &cert, "--key-file", &cert], "--key-file"),
        ] {
            let err = server_config(&config(&args)?, &[])
                .err()
                .map(|e| format!("{e:#}"))
                .unwrap_or_default();
            assert!(err.starts_with(flag), "{flag}: {err}");
        }
        Ok(())
    }

    #[test]
    fn cipher_suite_names() -> anyhow::Result<()> {
        let names = |list: &[&str]| -> Vec<String> { list.iter().map(|s| s.to_string()).collect() };
        let chosen = provider(&names(&[
            "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
            "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305",
            "TLS_AES_128_GCM_SHA256",
        ]))?;
        let tls12: Vec<_> = chosen
            .cipher_suites
            .iter()
            .filter(|s| s.tls13().is_none())
            .map(|s| s.suite())
            .collect();
        assert_eq!(
            tls12,
            [
                rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
                rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            ]
        );
        assert_eq!(chosen.cipher_suites.len(), 5);
        let err = provider(&names(&["TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA"]))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("not supported by Cairn"), "{err}");
        let err = provider(&names(&["TLS_NOPE"]))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert_eq!(err, "unexpected TLS cipher suite \"TLS_NOPE\"");
        Ok(())
    }
}
