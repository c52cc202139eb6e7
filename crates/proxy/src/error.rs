//! Why the grpc-proxy could not start or stopped serving.

use crate::tls::TlsError;
use crate::upstream::UpstreamError;

/// Why [`crate::run`] failed. [`report`] gives the text the proxy logs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("grpc-proxy: --trusted-ca-file needs --cert-file and --key-file")]
    TrustedCaWithoutCert,
    #[error("grpc-proxy: --cert-file and --key-file go together")]
    CertWithoutKey,
    #[error("grpc-proxy: --resolver-prefix needs --advertise-client-url")]
    ResolverWithoutAdvertise,
    #[error("grpc-proxy: --resolver-ttl must be at least 5 seconds")]
    ResolverTtl,
    #[error("grpc-proxy: --cache-user must be name:password")]
    CacheUser,
    /// A certificate, key, CA or CRL of the proxy's own flags.
    #[error(transparent)]
    Net(#[from] cairn_net::NetError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// The client or metrics address could not be bound.
    #[error("listening on {addr}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("registering metrics")]
    Metrics(#[source] prometheus::Error),
    #[error(transparent)]
    Serve(#[from] tonic::transport::Error),
}

pub(crate) use cairn_api::error::report;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_names_every_cause() {
        let error = Error::Listen {
            addr: "127.0.0.1:1".to_string(),
            source: std::io::Error::new(std::io::ErrorKind::AddrInUse, "address in use"),
        };
        assert_eq!(report(&error), "listening on 127.0.0.1:1: address in use");
    }
}
