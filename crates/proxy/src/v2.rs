//! `cairn --proxy on`: etcd's v2 proxy mode. It learns the cluster's client
//! URLs from the peers named in --initial-cluster and passes client
//! connections through to them (at the TCP level: HTTP/1.1 and HTTP/2 alike),
//! trying the next member when one refuses.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cairn_net::{NetError, PeerTls};
use tokio::net::{TcpListener, TcpStream};

/// Why the v2 proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum V2Error {
    #[error("proxy: --initial-cluster names no peers")]
    NoPeers,
    /// A --peer-* file that could not be read.
    #[error("{path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] NetError),
    #[error("listening on {url}")]
    Listen {
        url: String,
        #[source]
        source: std::io::Error,
    },
}

fn read(path: &str) -> Result<Vec<u8>, V2Error> {
    std::fs::read(path).map_err(|source| V2Error::Read {
        path: path.to_owned(),
        source,
    })
}

/// The flags of `--proxy on` the proxy uses; the rest of a member's flags
/// are accepted and ignored, as a proxy has no data of its own.
#[derive(Debug, Default)]
pub struct V2Config {
    pub listen_client_urls: Vec<String>,
    pub peer_urls: Vec<String>,
    pub peer_auto_tls: bool,
    pub peer_cert_file: Option<String>,
    pub peer_key_file: Option<String>,
    pub peer_trusted_ca_file: Option<String>,
}

/// True when the arguments ask for etcd's v2 proxy (`--proxy on` or
/// `--proxy readonly`).
pub fn wanted(args: &[String]) -> bool {
    flag_values(args, "proxy").any(|v| v == "on" || v == "readonly")
}

fn flag_values<'a>(args: &'a [String], name: &'a str) -> impl Iterator<Item = String> + 'a {
    let long = format!("--{name}");
    let short = format!("-{name}");
    args.iter().enumerate().filter_map(move |(i, a)| {
        if a == &long || a == &short {
            args.get(i + 1).cloned()
        } else {
            a.strip_prefix(&format!("{long}="))
                .or_else(|| a.strip_prefix(&format!("{short}=")))
                .map(str::to_owned)
        }
    })
}

fn has_flag(args: &[String], name: &str) -> bool {
    args.iter()
        .any(|a| a == &format!("--{name}") || a == &format!("--{name}=true"))
}

impl V2Config {
    pub fn parse(args: &[String]) -> Result<V2Config, V2Error> {
        let listen_client_urls = flag_values(args, "listen-client-urls")
            .flat_map(|v| v.split(',').map(str::to_owned).collect::<Vec<_>>())
            .collect::<Vec<_>>();
        let peer_urls = flag_values(args, "initial-cluster")
            .flat_map(|v| {
                v.split(',')
                    .filter_map(|m| m.split_once('=').map(|(_, url)| url.to_owned()))
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>();
        if peer_urls.is_empty() {
            return Err(V2Error::NoPeers);
        }
        Ok(V2Config {
            listen_client_urls: if listen_client_urls.is_empty() {
                vec!["http://localhost:2379".to_owned()]
            } else {
                listen_client_urls
            },
            peer_urls,
            peer_auto_tls: has_flag(args, "peer-auto-tls"),
            peer_cert_file: flag_values(args, "peer-cert-file").next(),
            peer_key_file: flag_values(args, "peer-key-file").next(),
            peer_trusted_ca_file: flag_values(args, "peer-trusted-ca-file").next(),
        })
    }

    fn peer_tls(&self) -> Result<Option<PeerTls>, V2Error> {
        if let (Some(cert), Some(key)) = (&self.peer_cert_file, &self.peer_key_file) {
            let ca = match &self.peer_trusted_ca_file {
                Some(ca) => Some(read(ca)?),
                None => None,
            };
            return Ok(Some(PeerTls {
                cert_pem: read(cert)?,
                key_pem: read(key)?,
                trusted_ca_pem: ca,
                client_cert_auth: false,
                allowed_cn: None,
                allowed_hostname: None,
            }));
        }
        if self.peer_auto_tls || self.peer_urls.iter().any(|u| u.starts_with("https://")) {
            return Ok(Some(PeerTls::self_signed(&[])?));
        }
        Ok(None)
    }
}

/// What the proxy reads of a member in the peers' member list.
#[derive(serde::Deserialize)]
struct Member {
    client_urls: Vec<String>,
}

pub async fn run(config: V2Config) -> Result<(), V2Error> {
    let tls = config.peer_tls()?.map(|tls| tls.client()).transpose()?;
    let client_urls = loop {
        match cairn_net::fetch_cluster::<Member>(&config.peer_urls, tls.as_ref()).await {
            Ok((_, members)) => {
                let urls: Vec<String> = members.into_iter().flat_map(|m| m.client_urls).collect();
                if !urls.is_empty() {
                    break urls;
                }
            }
            Err(e) => tracing::warn!("proxy: cannot reach the cluster yet: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    tracing::info!("httpproxy: endpoints found {client_urls:?}");
    let targets: Arc<Vec<String>> = Arc::new(
        client_urls
            .iter()
            .map(|u| host_port(u).to_owned())
            .collect(),
    );
    let next = Arc::new(AtomicUsize::new(0));
    let mut servers = Vec::new();
    for url in &config.listen_client_urls {
        let listener =
            TcpListener::bind(host_port(url))
                .await
                .map_err(|source| V2Error::Listen {
                    url: url.clone(),
                    source,
                })?;
        tracing::info!("proxy: listening for client requests on {url}");
        let (targets, next) = (targets.clone(), next.clone());
        servers.push(tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let (targets, next) = (targets.clone(), next.clone());
                tokio::spawn(pass_through(client, targets, next));
            }
        }));
    }
    let _ = tokio::signal::ctrl_c().await;
    for server in servers {
        server.abort();
    }
    Ok(())
}

/// Connects the client to the first member that accepts, starting with the
/// one after the last used, and copies bytes both ways until either side
/// closes.
async fn pass_through(mut client: TcpStream, targets: Arc<Vec<String>>, next: Arc<AtomicUsize>) {
    let first = next.fetch_add(1, Ordering::Relaxed);
    for i in 0..targets.len() {
        let target = &targets[(first + i) % targets.len()];
        if let Ok(mut member) = TcpStream::connect(target).await {
            let _ = client.set_nodelay(true);
            let _ = member.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut client, &mut member).await;
            return;
        }
    }
    tracing::warn!("proxy: no member accepted a client connection");
}

fn host_port(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn parses_etcds_proxy_flags() {
        let a = args(
            "--name p --proxy on --listen-client-urls http://localhost:20002 --initial-cluster m0=https://localhost:20001 --peer-auto-tls",
        );
        assert!(wanted(&a));
        let c = V2Config::parse(&a).expect("config");
        assert_eq!(c.listen_client_urls, vec!["http://localhost:20002"]);
        assert_eq!(c.peer_urls, vec!["https://localhost:20001"]);
        assert!(c.peer_auto_tls);
        assert!(!wanted(&args("--proxy off --name x")));
        assert_eq!(host_port("http://127.0.0.1:2379/x"), "127.0.0.1:2379");
    }
}
