//! Cairn's network and TLS layer, one home for what members, peers and the
//! proxy do on the wire below gRPC:
//!
//! - one rustls configuration builder for both sides ([`ServerTls`],
//!   [`ClientTls`], and [`PeerTls`] for etcd's --peer-* flags), on ring,
//!   with etcd's --cipher-suites names ([`check_cipher_suites`]);
//! - one reader of certificates, keys, CAs ([`Identity`], [`TrustedCas`])
//!   and CRLs ([`Crls`]), and the verifiers etcd's flags ask for: auto TLS,
//!   --peer-cert-allowed-cn and --peer-cert-allowed-hostname, CRLs;
//! - self-signed certificates for auto TLS ([`SelfSigned`]);
//! - one accept loop ([`Accept`]): TLS handshakes under a time limit in
//!   tasks of their own, plain and TLS on one port told apart by their
//!   first byte;
//! - dialing for tonic ([`Connector`], [`endpoint`]) and cluster discovery
//!   over the peer protocol ([`fetch_cluster`]);
//! - [`AuthorityFix`], which mends the HTTP/2 `:authority` Go clients send;
//! - [`ClientTlsInfo`], what a client's certificate says of the caller.
//!
//! No other crate of the workspace depends on rustls: they hold this
//! crate's types.
//!
//! A TLS connection with auto TLS, as two members with --peer-auto-tls
//! make one:
//!
//! ```
//! use cairn_net::{Accept, Connector, PeerTls, ServerStream};
//! use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
//! use tokio_stream::StreamExt as _;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let tls = PeerTls::self_signed(&["localhost".to_owned()])?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let port = listener.local_addr()?.port();
//! let (mut incoming, _accepting) =
//!     Accept::new(Some(&tls.server()?), "example").spawn::<ServerStream>(listener);
//!
//! let connector = Connector::new(Some(tls.client()?));
//! let client = tokio::spawn(async move {
//!     let mut stream = connector.dial("localhost", port).await?;
//!     stream.write_all(b"hello").await?;
//!     stream.shutdown().await
//! });
//! let mut conn = incoming.next().await.ok_or("no connection")??;
//! assert!(conn.is_tls());
//! let mut got = Vec::new();
//! conn.read_to_end(&mut got).await?;
//! assert_eq!(got, b"hello");
//! client.await??;
//! # Ok(())
//! # }
//! ```

mod accept;
mod authority;
mod cipher;
mod config;
mod connect;
mod error;
mod identity;
mod members;
mod pem;
mod self_signed;
mod stream;
#[cfg(test)]
mod tests;
mod verify;

pub use accept::Accept;
pub use authority::AuthorityFix;
pub use cipher::check_cipher_suites;
pub use config::{
    ClientAuth, ClientTls, Identity, PeerTls, ServerAuth, ServerSettings, ServerTls, TrustedCas,
    VerifiedClients,
};
pub use connect::{Connector, endpoint};
pub use error::NetError;
pub use identity::{ClientTlsInfo, check_empty_common_name};
pub use members::fetch_cluster;
pub use pem::{Crls, RevokedSerials};
pub use self_signed::SelfSigned;
pub use stream::{ClientStream, MaybeTls, ServerStream};

/// A client connection on a client listener: plain or TLS, mended for Go's
/// HTTP/2 authorities.
pub type ClientConn = AuthorityFix<ServerStream>;
