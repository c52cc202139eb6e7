//! Reading certificates, keys, trust anchors and CRLs: PEM (and DER for
//! CRLs), from bytes or files, each error naming what was read.

use std::collections::HashSet;
use std::path::Path;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

use crate::NetError;

/// Reads a whole file; the error names `what` (a flag, say) and the path.
pub(crate) fn read_file(path: &Path, what: &str) -> Result<Vec<u8>, NetError> {
    std::fs::read(path).map_err(|e| NetError::read(what, path, e))
}

/// Every PEM item of one kind in `pem`, which must hold at least one.
fn items<T: PemObject>(pem: &[u8], what: &str) -> Result<Vec<T>, NetError> {
    let items = T::pem_slice_iter(pem)
        .collect::<Result<Vec<T>, _>>()
        .map_err(|e| NetError::invalid(what, e))?;
    if items.is_empty() {
        return Err(NetError::invalid(what, "no PEM item of the expected kind"));
    }
    Ok(items)
}

/// A certificate chain (PEM), leaf first.
pub(crate) fn certificates(
    pem: &[u8],
    what: &str,
) -> Result<Vec<CertificateDer<'static>>, NetError> {
    items(pem, what)
}

/// A private key (PEM: PKCS#8, PKCS#1 or SEC1).
pub(crate) fn private_key(pem: &[u8], what: &str) -> Result<PrivateKeyDer<'static>, NetError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| NetError::invalid(what, e))
}

/// Trust anchors (PEM), as a store and as the certificates themselves.
pub(crate) fn roots(
    pem: &[u8],
    what: &str,
) -> Result<(RootCertStore, Vec<CertificateDer<'static>>), NetError> {
    let certs = certificates(pem, what)?;
    let mut store = RootCertStore::empty();
    for cert in &certs {
        store
            .add(cert.clone())
            .map_err(|e| NetError::invalid(what, e))?;
    }
    Ok((store, certs))
}

/// Certificate revocation lists: DER, or PEM, as Go's x509.ParseCRL takes
/// either (etcd's test fixtures are DER).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Crls(pub(crate) Vec<CertificateRevocationListDer<'static>>);

impl Crls {
    pub(crate) fn parse(bytes: Vec<u8>, what: &str) -> Result<Crls, NetError> {
        if bytes.starts_with(b"-----BEGIN") {
            Ok(Crls(items(&bytes, what)?))
        } else {
            Ok(Crls(vec![CertificateRevocationListDer::from(bytes)]))
        }
    }

    /// Reads a CRL file (etcd's --client-crl-file).
    pub fn read(path: &Path, what: &str) -> Result<Crls, NetError> {
        let what_path = format!("{what} {}", path.display());
        Crls::parse(read_file(path, what)?, &what_path)
    }

    /// The serial numbers the lists revoke, whoever issued them: etcd's own
    /// CRL check, which compares serials alone.
    pub fn revoked_serials(&self, what: &str) -> Result<RevokedSerials, NetError> {
        let mut serials = HashSet::new();
        for der in &self.0 {
            let (_, list) = x509_parser::parse_x509_crl(der)
                .map_err(|e| NetError::invalid(what, format!("bad CRL: {e}")))?;
            for revoked in list.iter_revoked_certificates() {
                serials.insert(revoked.raw_serial().to_vec());
            }
        }
        Ok(RevokedSerials(serials))
    }
}

/// Certificate serial numbers that are refused.
#[derive(Clone, Debug, Default)]
pub struct RevokedSerials(HashSet<Vec<u8>>);

impl RevokedSerials {
    /// Whether the certificate (DER) has a revoked serial. One that does not
    /// parse is not judged here: the handshake verified it already.
    pub fn revokes(&self, cert: &[u8]) -> bool {
        x509_parser::parse_x509_certificate(cert)
            .is_ok_and(|(_, cert)| self.0.contains(cert.raw_serial()))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}
