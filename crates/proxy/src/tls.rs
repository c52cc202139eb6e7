//! TLS on both sides of the proxy, with etcd's grpc-proxy flags, made into
//! cairn-net's settings:
//! - to the members (https endpoints): `--cacert` verifies them, `--cert`
//!   and `--key` are the client certificate they may ask for;
//! - to clients: `--cert-file` and `--key-file` serve, `--trusted-ca-file`
//!   makes client certificates required and verified against it, and
//!   `--client-crl-file` refuses revoked ones.

use std::path::Path;

use cairn_net::{
    Accept, ClientAuth, ClientTls, Crls, Identity, NetError, ServerAuth, ServerSettings, ServerTls,
    TrustedCas, VerifiedClients,
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
/// a path-based check would not apply them).
pub fn accept(
    cert: &Path,
    key: &Path,
    trusted_ca: Option<&Path>,
    crl: Option<&Path>,
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

/// The configuration for reaching https members.
pub fn client_config(
    cert: Option<&Path>,
    key: Option<&Path>,
    cacert: Option<&Path>,
) -> Result<ClientTls, TlsError> {
    let cacert = cacert.ok_or(TlsError::NoCacert)?;
    let identity = match (cert, key) {
        (Some(cert), Some(key)) => Some(Identity::from_files(cert, "--cert", key, "--key")?),
        (None, None) => None,
        _ => return Err(TlsError::CertWithoutKey),
    };
    Ok(ClientTls::new(
        ServerAuth::Verified(TrustedCas::from_file(cacert, "--cacert")?),
        identity,
    )?)
}
