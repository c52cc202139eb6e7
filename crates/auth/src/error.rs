//! Why auth failed: etcd's own errors, which clients see as they are, or a
//! failure of this member (its flags, its store, hashing, signing).

use cairn_api::error::EtcdError;
use cairn_mvcc::MvccError;

use crate::AuthApplied;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// One of etcd's errors, with its exact message and gRPC code.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error(transparent)]
    TokenFlag(#[from] TokenFlagError),
    #[error("loading the auth store: {0}")]
    Read(MvccError),
    #[error("loading the auth store: {0}")]
    Decode(prost::DecodeError),
    #[error("hashing the password: {0}")]
    Hash(bcrypt::BcryptError),
    /// The blocking task that hashes or verifies a password did not finish.
    #[error(transparent)]
    Blocking(#[from] tokio::task::JoinError),
    #[error("no randomness for a token: {0}")]
    Random(getrandom::Error),
    #[error("signing the token: no jwt priv-key: this member cannot sign tokens")]
    NoSigningKey,
    #[error("signing the token: {0}")]
    Sign(jsonwebtoken::errors::Error),
    /// [`Auth::token_for`](crate::Auth::token_for) was handed what an
    /// authentication did not produce.
    #[error("authentication applied as {0:?}")]
    NotAuthenticated(AuthApplied),
}

/// What is wrong with --auth-token (etcd's syntax: `simple`, or `jwt,`
/// followed by `pub-key=`, `priv-key=`, `sign-method=`, `ttl=`).
#[derive(Debug, thiserror::Error)]
pub enum TokenFlagError {
    #[error("--auth-token: unknown token type {0:?}")]
    UnknownType(String),
    #[error("--auth-token: option {0:?} has no value")]
    NoValue(String),
    #[error("--auth-token: unknown jwt option {0:?}")]
    UnknownOption(String),
    #[error("--auth-token: invalid ttl {0:?}")]
    InvalidTtl(String),
    #[error("--auth-token: jwt needs sign-method")]
    NoSignMethod,
    #[error("--auth-token: unsupported sign-method {0:?}")]
    UnsupportedSignMethod(String),
    /// The sign method needs a key file the options do not name.
    #[error("--auth-token: {method} needs {option}")]
    KeyMissing {
        method: String,
        option: &'static str,
    },
    #[error("reading {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A key file holds no key the sign method can use.
    #[error("--auth-token {option} {path}")]
    Key {
        option: &'static str,
        path: String,
        #[source]
        source: KeyError,
    },
}

/// Why a key file holds no usable key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("not a PEM certificate: {0}")]
    Pem(x509_parser::nom::Err<x509_parser::error::PEMError>),
    #[error("not an X.509 certificate: {0}")]
    Certificate(x509_parser::nom::Err<x509_parser::error::X509Error>),
    #[error(transparent)]
    Jwt(#[from] jsonwebtoken::errors::Error),
}
