//! TLS on both sides of the proxy, with etcd's grpc-proxy flags, made into
//! cairn-net's settings:
//! - to the members (https endpoints): `--cacert` verifies them (or
//!   nothing does, with `--insecure-skip-tls-verify`), `--cert` and `--key`
//!   are the client certificate they may ask for;
//! - to clients: `--cert-file` and `--key-file` serve (or, with
//!   `--auto-tls`, a self-signed certificate), `--trusted-ca-file` makes
//!   client certificates required and verified against it, and
//!   `--client-crl-file` refuses revoked ones.

use std::path::{Path, PathBuf};

use cairn_net::{
    Accept, ClientAuth, ClientTls, Crls, Identity, NetError, SelfSigned, ServerAuth,
    ServerSettings, ServerTls, TrustedCas, VerifiedClients,
};

/// Why the TLS configuration for reaching the members could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("https endpoints need --cacert to verify the members")]
    NoCacert,
    #[error("--cert and --key go together")]
    CertWithoutKey,
    #[error(transparent)]
    Net(#[from] NetError),
}

/// How the proxy accepts its clients: TLS with `--cert-file` and
/// `--key-file`, certificates verified against `--trusted-ca-file`, and a
/// client certificate whose serial `--client-crl-file` lists refused after
/// the handshake, as etcd's CRL check does (by serial alone: etcd's test
/// CRLs do not name their issuer byte for byte as the certificates do, so
/// a path-based check would not apply them), offering `cipher_suites`
/// (etcd's `--listen-cipher-suites`; empty for the defaults).
pub fn accept(
    cert: &Path,
    key: &Path,
    trusted_ca: Option<&Path>,
    crl: Option<&Path>,
    cipher_suites: &[String],
) -> Result<Accept, NetError> {
    let client_auth = match trusted_ca {
        Some(ca) => ClientAuth::Verified(VerifiedClients::new(TrustedCas::from_file(
            ca,
            "--trusted-ca-file",
        )?)),
        None => ClientAuth::None,
    };
    let tls = ServerTls::new(ServerSettings {
        client_auth,
        cipher_suites: cipher_suites.to_vec(),
        ..ServerSettings::new(Identity::from_files(
            cert,
            "--cert-file",
            key,
            "--key-file",
        )?)
    })?;
    let mut accept = Accept::new(Some(&tls), "grpc-proxy");
    if let Some(crl) = crl {
        const FLAG: &str = "--client-crl-file";
        accept = accept.refusing(Crls::read(crl, FLAG)?.revoked_serials(FLAG)?);
    }
    Ok(accept)
}

/// etcd's `--auto-tls` for the proxy's clients: a self-signed certificate
/// for the host of `listen_addr`, kept in `<data_dir>/fixtures/proxy`
/// across restarts, as etcd keeps it. Returns the certificate and key
/// files.
pub fn auto_tls(data_dir: &Path, listen_addr: &str) -> Result<(PathBuf, PathBuf), NetError> {
    let host = match listen_addr.rsplit_once(':') {
        Some((host, _port)) => host,
        None => listen_addr,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    SelfSigned::kept_in(&data_dir.join("fixtures").join("proxy"), &[host.to_owned()])
}

/// The configuration for reaching https members: their certificates
/// verified against `cacert`, or, with etcd's `--insecure-skip-tls-verify`
/// (`skip_verify`), not verified at all (only that the member holds its
/// certificate's key).
pub fn client_config(
    cert: Option<&Path>,
    key: Option<&Path>,
    cacert: Option<&Path>,
    skip_verify: bool,
) -> Result<ClientTls, TlsError> {
    let identity = match (cert, key) {
        (Some(cert), Some(key)) => Some(Identity::from_files(cert, "--cert", key, "--key")?),
        (None, None) => None,
        _ => return Err(TlsError::CertWithoutKey),
    };
    let server_auth = if skip_verify {
        tracing::warn!(
            "--insecure-skip-tls-verify was given, this grpc proxy process skips authentication of etcd server TLS certificates. This option should be enabled only for testing purposes."
        );
        ServerAuth::AnyCertificate
    } else {
        let cacert = cacert.ok_or(TlsError::NoCacert)?;
        ServerAuth::Verified(TrustedCas::from_file(cacert, "--cacert")?)
    };
    Ok(ClientTls::new(server_auth, identity)?)
}
