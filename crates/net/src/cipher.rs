//! The crypto provider: ring, its TLS 1.2 suites cut down to etcd's
//! --cipher-suites when that is given.
//!
//! Every configuration here is built with an explicit provider rather than
//! rustls' process-wide default, so nothing depends on (or fights over)
//! which provider another crate in the process installed.

use std::sync::Arc;

use rustls::SupportedCipherSuite;
use rustls::crypto::CryptoProvider;

use crate::NetError;

/// ring with all its suites.
pub(crate) fn default_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// ring, its TLS 1.2 cipher suites cut down to `names` (etcd's
/// --cipher-suites, Go's names) when any are given. TLS 1.3's suites stay
/// on whatever it says: Go does not let a configuration choose them either.
pub(crate) fn provider(names: &[String]) -> Result<Arc<CryptoProvider>, NetError> {
    let mut provider = rustls::crypto::ring::default_provider();
    if names.is_empty() {
        return Ok(Arc::new(provider));
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
    Ok(Arc::new(provider))
}

/// Checks etcd's --cipher-suites names: the error a configuration check
/// reports for a name rustls has no suite for, or nobody knows.
pub fn check_cipher_suites(names: &[String]) -> Result<(), NetError> {
    provider(names).map(drop)
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
fn go_cipher_suite(name: &str) -> Result<Option<SupportedCipherSuite>, NetError> {
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
        _ if GO_ONLY_SUITES.contains(&name) => {
            return Err(NetError::UnsupportedCipherSuite(name.to_owned()));
        }
        _ => return Err(NetError::UnknownCipherSuite(name.to_owned())),
    };
    Ok(Some(suite))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cipher_suite_names() -> Result<(), NetError> {
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
        let err = check_cipher_suites(&names(&["TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA"]))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("not supported by Cairn"), "{err}");
        let err = check_cipher_suites(&names(&["TLS_NOPE"]))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert_eq!(err, "unexpected TLS cipher suite \"TLS_NOPE\"");
        Ok(())
    }
}
