//! The URLs of etcd's URL flags (--listen-client-urls, --listen-peer-urls,
//! the advertised URLs, --initial-cluster), read as etcd reads them
//! (pkg/types.NewURLs): http and https name a TCP host and port, unix and
//! unixs a Unix socket; https and unixs mean TLS.

use std::fmt;
use std::path::PathBuf;

use crate::NetError;

/// etcd's words for a URL of another scheme.
const SCHEMES: &str = "URL scheme must be http, https, unix, or unixs";

/// One URL of etcd's URL flags: whether it means TLS, and where it points.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdUrl {
    /// https:// or unixs://.
    pub tls: bool,
    pub address: Address,
}

/// Where an [`EtcdUrl`] points.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    /// A host (name or IP, without brackets) and port; the port defaults
    /// to 80 or 443.
    Tcp { host: String, port: u16 },
    /// A Unix socket: the URL's `host:port` as written, a file name
    /// relative to the working directory, as etcd names its sockets
    /// (`unix://etcd.unix:1` listens on the file `etcd.unix:1`).
    Unix(PathBuf),
}

impl EtcdUrl {
    /// Reads `url`; a trailing `/` is allowed.
    pub fn parse(url: &str) -> Result<EtcdUrl, NetError> {
        let url = url.trim();
        let refused = |reason: &str| NetError::Url {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let (scheme, rest) = url.split_once("://").ok_or_else(|| refused(SCHEMES))?;
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.is_empty() {
            return Err(refused("URL has no host"));
        }
        if authority.contains('/') {
            return Err(refused("URL must not contain a path"));
        }
        let (tls, unix) = match scheme {
            "http" => (false, false),
            "https" => (true, false),
            "unix" => (false, true),
            "unixs" => (true, true),
            _ => return Err(refused(SCHEMES)),
        };
        if unix {
            return Ok(EtcdUrl {
                tls,
                address: Address::Unix(PathBuf::from(authority)),
            });
        }
        let authority: http::uri::Authority = authority
            .parse()
            .map_err(|_| refused("URL has no valid host"))?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        Ok(EtcdUrl {
            tls,
            address: Address::Tcp {
                host: host.to_owned(),
                port: authority.port_u16().unwrap_or(if tls { 443 } else { 80 }),
            },
        })
    }

    /// The host a certificate for this URL names: the TCP host, or the
    /// part of a socket's name before its last `:` (`etcd.unix` for
    /// `unix://etcd.unix:1`), which is what a client verifies as the
    /// server's name.
    pub fn host(&self) -> String {
        match &self.address {
            Address::Tcp { host, .. } => host.clone(),
            Address::Unix(path) => {
                let name = path.to_string_lossy();
                match name.rsplit_once(':') {
                    Some((host, _port)) => host.to_owned(),
                    None => name.into_owned(),
                }
            }
        }
    }

    pub fn is_unix(&self) -> bool {
        matches!(self.address, Address::Unix(_))
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Address::Tcp { host, port } => write!(f, "{host}:{port}"),
            Address::Unix(path) => write!(f, "{}", path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(tls: bool, host: &str, port: u16) -> EtcdUrl {
        EtcdUrl {
            tls,
            address: Address::Tcp {
                host: host.to_owned(),
                port,
            },
        }
    }

    #[test]
    fn urls_of_each_scheme() -> Result<(), NetError> {
        assert_eq!(
            EtcdUrl::parse("http://127.0.0.1:2379/")?,
            tcp(false, "127.0.0.1", 2379)
        );
        assert_eq!(
            EtcdUrl::parse("https://[::1]:2380")?,
            tcp(true, "::1", 2380)
        );
        assert_eq!(
            EtcdUrl::parse("http://member-1")?,
            tcp(false, "member-1", 80)
        );
        let unix = EtcdUrl::parse("unix://etcd.unix:1")?;
        assert_eq!(unix.address, Address::Unix(PathBuf::from("etcd.unix:1")));
        assert!(!unix.tls && unix.is_unix());
        assert_eq!(unix.host(), "etcd.unix");
        assert!(EtcdUrl::parse("unixs://localhost:2380")?.tls);
        assert_eq!(
            EtcdUrl::parse("https://[::1]:2380")?.address.to_string(),
            "[::1]:2380"
        );
        Ok(())
    }

    #[test]
    fn other_urls_refused_in_etcds_words() {
        let refusal = |url: &str| EtcdUrl::parse(url).err().map(|e| e.to_string());
        assert_eq!(
            refusal("ftp://h:1").as_deref(),
            Some("URL scheme must be http, https, unix, or unixs: ftp://h:1")
        );
        assert_eq!(
            refusal("localhost:2379").as_deref(),
            Some("URL scheme must be http, https, unix, or unixs: localhost:2379")
        );
        assert_eq!(
            refusal("http://h:1/v2").as_deref(),
            Some("URL must not contain a path: http://h:1/v2")
        );
        assert!(refusal("unix://").is_some());
    }
}
