//! `--resolver-prefix`: the proxy registers its advertised address under
//! `<prefix>/<addr>` with a lease (etcd's gRPC naming format), and answers
//! MemberList with the proxies registered there.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cairn_api::etcdserverpb::kv_client::KvClient;
use cairn_api::etcdserverpb::lease_client::LeaseClient;
use cairn_api::etcdserverpb::{
    LeaseGrantRequest, Member, MemberListResponse, PutRequest, RangeRequest,
};
use serde::{Deserialize, Serialize};
use tonic::Status;

use crate::lease::KeepAlives;
use crate::namespace::prefix_end;
use crate::upstream::{Caller, Retry, Upstream};

/// etcd's `naming.Update` as its GRPCResolver stores it.
#[derive(Serialize, Deserialize)]
struct Update {
    #[serde(rename = "Op")]
    op: u32,
    #[serde(rename = "Addr")]
    addr: String,
    #[serde(rename = "Metadata")]
    metadata: String,
}

/// The metadata etcd's proxy registers: its host name.
#[derive(Serialize, Deserialize)]
struct Meta {
    #[serde(rename = "Name")]
    name: String,
}

#[derive(Clone)]
pub struct Registry {
    upstream: Upstream,
    prefix: String,
}

impl Registry {
    pub fn new(upstream: Upstream, prefix: String) -> Registry {
        Registry { upstream, prefix }
    }

    fn dir(&self) -> Bytes {
        Bytes::from(format!("{}/", self.prefix))
    }

    /// The proxies registered under the prefix, as members with no ID.
    pub async fn member_list(&self) -> Result<MemberListResponse, Status> {
        let dir = self.dir();
        let range = RangeRequest {
            range_end: prefix_end(&dir),
            key: dir,
            ..Default::default()
        };
        let response = self
            .upstream
            .call(Retry::Idempotent, |channel| {
                let request = Caller::default().request(range.clone());
                async move { Ok(KvClient::new(channel).range(request).await?.into_inner()) }
            })
            .await?;
        let mut members = Vec::new();
        for kv in &response.kvs {
            let update: Update = serde_json::from_slice(&kv.value)
                .map_err(|e| Status::internal(format!("bad registration: {e}")))?;
            let name = serde_json::from_str::<Meta>(&update.metadata)
                .map(|m| m.name)
                .unwrap_or_default();
            members.push(Member {
                name,
                client_ur_ls: vec![update.addr],
                ..Default::default()
            });
        }
        Ok(MemberListResponse {
            header: response.header,
            members,
        })
    }

    /// Keeps `<prefix>/<addr>` registered under a lease of `ttl` seconds for
    /// as long as the proxy runs; registers again when the lease is lost.
    pub async fn register(self, addr: String, ttl: i64, keepalives: Arc<KeepAlives>) {
        let host = hostname();
        loop {
            match self.register_once(&addr, ttl, &host).await {
                Ok(lease) => {
                    tracing::info!(prefix = %self.prefix, %addr, "grpc-proxy: registered");
                    let every = Duration::from_millis((ttl.max(1) as u64) * 1000 / 3);
                    loop {
                        tokio::time::sleep(every).await;
                        match keepalives.renew(lease).await {
                            Some(r) if r.ttl > 0 => {}
                            _ => break,
                        }
                    }
                    tracing::warn!("grpc-proxy: registration lease lost; registering again");
                }
                Err(status) => {
                    tracing::warn!("grpc-proxy: cannot register: {status}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    async fn register_once(&self, addr: &str, ttl: i64, host: &str) -> Result<i64, Status> {
        let grant = LeaseGrantRequest { ttl, id: 0 };
        let lease = self
            .upstream
            .call(Retry::IfNotSent, |channel| {
                let request = Caller::default().request(grant);
                async move {
                    Ok(LeaseClient::new(channel)
                        .lease_grant(request)
                        .await?
                        .into_inner())
                }
            })
            .await?
            .id;
        let update = Update {
            op: 0,
            addr: addr.to_owned(),
            metadata: serde_json::to_string(&Meta {
                name: host.to_owned(),
            })
            .map_err(|e| Status::internal(e.to_string()))?,
        };
        let put = PutRequest {
            key: Bytes::from(format!("{}/{addr}", self.prefix)),
            value: serde_json::to_vec(&update)
                .map_err(|e| Status::internal(e.to_string()))?
                .into(),
            lease,
            ..Default::default()
        };
        self.upstream
            .call(Retry::IfNotSent, |channel| {
                let request = Caller::default().request(put.clone());
                async move { Ok(KvClient::new(channel).put(request).await?.into_inner()) }
            })
            .await?;
        Ok(lease)
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_default()
}
