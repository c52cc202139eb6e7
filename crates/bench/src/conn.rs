//! gRPC connections to the endpoints, shared round-robin by the clients.

use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use cairn_api::etcdserverpb::StatusRequest;
use cairn_api::etcdserverpb::maintenance_client::MaintenanceClient;
use tonic::transport::{Channel, Endpoint};

/// etcd's default request size limit is 1.5 MiB; responses of a range over
/// many keys can be larger, so accept what etcd's client accepts.
pub const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// `--conns` HTTP/2 connections, opened round-robin over the endpoints.
#[derive(Clone, Debug)]
pub struct Connections {
    channels: Vec<Channel>,
    /// The endpoints connected to (only the leader's with --target-leader).
    urls: Vec<String>,
}

impl Connections {
    /// Opens `conns` connections spread over `endpoints`; with
    /// `target_leader`, all of them to the member that is leader.
    pub async fn open(
        endpoints: &[String],
        conns: usize,
        dial_timeout: Duration,
        target_leader: bool,
    ) -> Result<Connections> {
        if endpoints.is_empty() {
            bail!("no --endpoints");
        }
        if conns == 0 {
            bail!("--conns must be at least 1");
        }
        let urls: Vec<String> = endpoints.iter().map(|e| url(e)).collect::<Result<_>>()?;
        let urls = if target_leader {
            vec![leader(&urls, dial_timeout).await?]
        } else {
            urls
        };
        let mut channels = Vec::with_capacity(conns);
        for i in 0..conns {
            channels.push(connect(&urls[i % urls.len()], dial_timeout).await?);
        }
        Ok(Connections { channels, urls })
    }

    /// The connection of client `i`.
    pub fn get(&self, i: usize) -> Channel {
        self.channels[i % self.channels.len()].clone()
    }

    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    pub fn len(&self) -> usize {
        self.channels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.channels.is_empty()
    }
}

/// `host:port` or `http://host:port` as a URL tonic dials.
fn url(endpoint: &str) -> Result<String> {
    if endpoint.starts_with("https://") || endpoint.starts_with("unixs://") {
        bail!("{endpoint}: TLS endpoints are not supported by cairn-bench");
    }
    if endpoint.starts_with("http://") {
        Ok(endpoint.to_string())
    } else {
        Ok(format!("http://{endpoint}"))
    }
}

async fn connect(url: &str, dial_timeout: Duration) -> Result<Channel> {
    Endpoint::from_shared(url.to_string())
        .with_context(|| format!("endpoint {url}"))?
        .connect_timeout(dial_timeout)
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("connecting to {url}"))
}

/// The URL of the member that every answering member names as leader.
async fn leader(urls: &[String], dial_timeout: Duration) -> Result<String> {
    let mut leader_id = None;
    let mut ids = Vec::new();
    for url in urls {
        let Ok(channel) = connect(url, dial_timeout).await else {
            continue;
        };
        let Ok(status) = MaintenanceClient::new(channel)
            .status(StatusRequest {})
            .await
            .map(tonic::Response::into_inner)
        else {
            continue;
        };
        let member = status.header.map_or(0, |h| h.member_id);
        ids.push((member, url.clone()));
        if status.leader != 0 {
            leader_id = Some(status.leader);
        }
    }
    let Some(leader_id) = leader_id else {
        bail!("no endpoint knows a leader");
    };
    ids.into_iter()
        .find(|(member, _)| *member == leader_id)
        .map(|(_, url)| url)
        .with_context(|| format!("the leader {leader_id:x} is not among the endpoints"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_become_urls() {
        assert_eq!(
            url("127.0.0.1:2379").ok().as_deref(),
            Some("http://127.0.0.1:2379")
        );
        assert_eq!(url("http://h:1").ok().as_deref(), Some("http://h:1"));
        assert!(url("https://h:1").is_err());
    }
}
