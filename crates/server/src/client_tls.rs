//! TLS on the client listeners: etcd's --cert-file, --key-file,
//! --trusted-ca-file, --client-cert-auth, --client-crl-file, --auto-tls and
//! --cipher-suites, made into cairn-net's server settings.
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

use std::path::{Path, PathBuf};

use cairn_net::{
    ClientAuth, Crls, Identity, NetError, SelfSigned, ServerSettings, ServerTls, TrustedCas,
    VerifiedClients,
};

pub use cairn_net::ClientTlsInfo;

use crate::config::{ServerConfig, TlsFlags};

/// The TLS configuration of the client listeners, or `None` when neither
/// certificates nor --auto-tls are given. `hosts` are the client URLs'
/// hosts, which an --auto-tls certificate names.
pub(crate) fn server_config(
    config: &ServerConfig,
    hosts: &[String],
) -> Result<Option<ServerTls>, NetError> {
    let flags = &config.client_tls;
    let (cert_file, key_file, client_auth) = if !flags.cert_file.is_empty() {
        if flags.auto_tls {
            tracing::warn!("ignoring client auto TLS since certs given");
        }
        (
            PathBuf::from(&flags.cert_file),
            PathBuf::from(&flags.key_file),
            client_auth(flags)?,
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
        let (cert_file, key_file) = SelfSigned::kept_in(&dir, hosts)?;
        (cert_file, key_file, ClientAuth::None)
    } else {
        return Ok(None);
    };
    tracing::info!(
        "ClientTLS: cert = {}, key = {}, trusted-ca = {}, client-cert-auth = {}, crl-file = {}",
        cert_file.display(),
        key_file.display(),
        flags.trusted_ca_file,
        matches!(client_auth, ClientAuth::Verified(_)),
        flags.crl_file
    );
    let identity = Identity::from_files(&cert_file, "--cert-file", &key_file, "--key-file")?;
    let tls = ServerTls::new(ServerSettings {
        client_auth,
        cipher_suites: config.cipher_suites.clone(),
        // HTTP/1.1 too: curl and etcd's v2 clients reach the HTTP gateway on
        // the same port.
        http1: true,
        ..ServerSettings::new(identity)
    })?;
    Ok(Some(tls))
}

/// What is asked of client certificates: nothing without
/// --trusted-ca-file. With one, every client must present a certificate
/// that chains to it, as etcd 3.4 asks whether --client-cert-auth is set or
/// not.
fn client_auth(flags: &TlsFlags) -> Result<ClientAuth, NetError> {
    if flags.trusted_ca_file.is_empty() {
        // Config refused --client-cert-auth without a CA.
        if !flags.crl_file.is_empty() {
            tracing::warn!("--client-crl-file has no effect without --trusted-ca-file");
        }
        return Ok(ClientAuth::None);
    }
    let cas = TrustedCas::from_file(Path::new(&flags.trusted_ca_file), "--trusted-ca-file")?;
    let crls = if flags.crl_file.is_empty() {
        None
    } else {
        Some(Crls::read(Path::new(&flags.crl_file), "--client-crl-file")?)
    };
    Ok(ClientAuth::Verified(VerifiedClients {
        crls,
        ..VerifiedClients::new(cas)
    }))
}

#[cfg(test)]
mod tests;
