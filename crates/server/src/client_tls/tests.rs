//! The client TLS flags as a member's https listeners apply them. How TLS
//! itself behaves (CRLs, cipher suites, stalled handshakes) is tested in
//! cairn-net.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use cairn_api::v3lockpb::LockRequest;
use cairn_api::v3lockpb::lock_client::LockClient;
use cairn_api::v3lockpb::lock_server::{Lock, LockServer};
use cairn_net::{Accept, ClientConn, ClientTls, Connector, Identity, ServerAuth};
use tokio::net::TcpListener;
use tonic::transport::{Endpoint, Server};

use super::*;
use crate::config::{Invocation, parse};

/// Answers every call with Unimplemented: an answer at all shows that TLS,
/// HTTP/2 and gRPC went through.
struct NoLock;

impl Lock for NoLock {}

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
    let (incoming, _) = Accept::new(Some(&tls), "client").spawn::<ClientConn>(listener);
    let router = Server::builder().add_service(LockServer::new(NoLock));
    tokio::spawn(router.serve_with_incoming(incoming));
    Ok(addr)
}

/// One gRPC call over TLS as "localhost", trusting `ca` (PEM) and
/// presenting `identity`; Ok when the server answered.
async fn call(addr: SocketAddr, ca: &[u8], identity: Option<Identity>) -> anyhow::Result<()> {
    let tls = ClientTls::new(
        ServerAuth::Verified(cairn_net::TrustedCas::from_pem(ca, "test CA")?),
        identity,
    )?;
    let connector = Connector::new(Some(tls));
    let answer = tokio::time::timeout(Duration::from_secs(10), async {
        let uri = format!("https://localhost:{}", addr.port());
        let channel = Endpoint::from_shared(uri)?
            .connect_with_connector(connector)
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

#[tokio::test]
async fn auto_tls_makes_a_certificate_and_keeps_it() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let data_dir = data.path().display().to_string();
    let args = ["--auto-tls", "--data-dir", &data_dir];
    let addr = serve(&args).await?;
    let cert_file = data.path().join("fixtures/client/cert.pem");
    let cert = std::fs::read(&cert_file)?;
    // A client that trusts the generated certificate gets through.
    call(addr, &cert, None).await?;
    // The next start serves the same certificate.
    serve(&args).await?;
    assert_eq!(std::fs::read(&cert_file)?, cert);
    Ok(())
}

#[tokio::test]
async fn a_trusted_ca_alone_wants_client_certificates_too() -> anyhow::Result<()> {
    // One self-signed certificate serves, is the CA, and is the client's.
    let dir = tempfile::tempdir()?;
    let (cert, key) = SelfSigned::kept_in(dir.path(), &["localhost".to_owned()])?;
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let addr = serve(&[
        "--cert-file",
        &cert,
        "--key-file",
        &key,
        "--trusted-ca-file",
        &cert,
    ])
    .await?;
    let ca = std::fs::read(&cert)?;
    let err = call(addr, &ca, None).await.err().map(|e| format!("{e:#}"));
    assert!(
        err.as_deref()
            .is_some_and(|e| e.contains("CertificateRequired")),
        "{err:?}"
    );
    let identity = Identity::from_pem(&ca, &std::fs::read(&key)?, "client")?;
    call(addr, &ca, Some(identity)).await
}

#[test]
fn files_are_read_or_named_in_the_error() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (cert, key) = SelfSigned::kept_in(dir.path(), &[])?;
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let missing = dir.path().join("missing.pem").display().to_string();
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
    let crl = [
        "--cert-file",
        &cert,
        "--key-file",
        &key,
        "--trusted-ca-file",
    ];
    let err = server_config(
        &config(&[&crl[..], &[&cert, "--client-crl-file", &missing]].concat())?,
        &[],
    )
    .err()
    .map(|e| format!("{e:#}"))
    .unwrap_or_default();
    assert!(err.starts_with("--client-crl-file"), "{err}");
    Ok(())
}
