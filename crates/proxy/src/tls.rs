//! TLS on both sides of the proxy, with etcd's grpc-proxy flags, made into
//! cairn-net's settings:
//! - to the members (https endpoints): `--cacert` verifies them, `--cert`
//!   and `--key` are the client certificate they may ask for;
//! - to clients: `--cert-file` and `--key-file` serve, `--trusted-ca-file`
//!   makes client certificates required and verified against it, and
//!   `--client-crl-file` refuses revoked ones.

use std::path::Path;

use anyhow::Context as _;
use cairn_net::{
    Accept, ClientAuth, ClientTls, Crls, Identity, ServerAuth, ServerSettings, ServerTls,
    TrustedCas, VerifiedClients,
};

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
) -> anyhow::Result<Accept> {
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
) -> anyhow::Result<ClientTls> {
    let cacert = cacert.context("https endpoints need --cacert to verify the members")?;
    let identity = match (cert, key) {
        (Some(cert), Some(key)) => Some(Identity::from_files(cert, "--cert", key, "--key")?),
        (None, None) => None,
        _ => anyhow::bail!("--cert and --key go together"),
    };
    Ok(ClientTls::new(
        ServerAuth::Verified(TrustedCas::from_file(cacert, "--cacert")?),
        identity,
    )?)
}
