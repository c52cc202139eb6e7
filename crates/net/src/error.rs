//! The one error type of this crate.

use std::fmt::Display;
use std::path::Path;

/// What went wrong setting up TLS or reaching a peer. Every message is
/// whole: it names what was being read or built and says why, with no
/// `source()` chain to walk.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A file could not be read.
    #[error("{what} {path}: {reason}")]
    Read {
        what: String,
        path: String,
        reason: String,
    },
    /// PEM, DER, a certificate, a key, or a rustls setting was refused.
    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },
    /// One of etcd's --cipher-suites names that rustls has no suite for.
    #[error(
        "TLS cipher suite {0:?} is not supported by Cairn (rustls has no CBC, RC4 or 3DES suites and no RSA key exchange)"
    )]
    UnsupportedCipherSuite(String),
    /// A --cipher-suites name nobody knows.
    #[error("unexpected TLS cipher suite {0:?}")]
    UnknownCipherSuite(String),
    /// etcd's check of a proxy's client certificate: a common name there
    /// would be taken for a user name by members with --client-cert-auth.
    #[error("cert has non empty Common Name ({common_name}): {path}")]
    CommonName { common_name: String, path: String },
    /// Making a self-signed certificate failed.
    #[error("certificate generation: {0}")]
    Generate(String),
    /// A URL that etcd's URL flags would refuse, in etcd's words.
    #[error("{reason}: {url}")]
    Url { url: String, reason: String },
    /// A cluster member could not be reached or answered nonsense.
    #[error("peer URL {url:?}: {reason}")]
    Peer { url: String, reason: String },
}

impl From<rcgen::Error> for NetError {
    fn from(e: rcgen::Error) -> Self {
        NetError::Generate(e.to_string())
    }
}

impl NetError {
    pub(crate) fn invalid(what: impl Display, reason: impl Display) -> NetError {
        NetError::Invalid {
            what: what.to_string(),
            reason: reason.to_string(),
        }
    }

    pub(crate) fn read(what: impl Display, path: &Path, reason: impl Display) -> NetError {
        NetError::Read {
            what: what.to_string(),
            path: path.display().to_string(),
            reason: reason.to_string(),
        }
    }
}
