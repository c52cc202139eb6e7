//! etcd's peer prober: every few seconds a member times a round trip to
//! each other member over the peer protocol (its `Members` call, on one kept
//! connection per peer, as etcd probes `/raft/probing` on its pooled peer
//! connections), for etcd_network_peer_round_trip_time_seconds.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_consensus::PeerTls;
use cairn_metrics::Metrics;
use cairn_net::peer_proto::MembersRequest;
use cairn_net::peer_proto::peer_client::PeerClient;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use crate::member::Member;

/// etcd's proberInterval: its peer connection read timeout less a second.
const PROBE_INTERVAL: Duration = Duration::from_secs(4);
/// A probe that takes longer than this counts as lost, as etcd's does.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Probes the other members for as long as the task runs.
pub fn spawn(member: Arc<Member>, tls: Option<PeerTls>, metrics: Arc<Metrics>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let tls = match tls.as_ref().map(PeerTls::client).transpose() {
            Ok(tls) => tls,
            Err(e) => {
                tracing::warn!("peer round trips are not measured: {e}");
                return;
            }
        };
        // Per peer: the URL its connection is to, and the connection.
        let mut channels: HashMap<u64, (String, Channel)> = HashMap::new();
        let mut ticker = tokio::time::interval(PROBE_INTERVAL);
        loop {
            ticker.tick().await;
            let peers: Vec<(u64, String)> = member
                .node
                .members()
                .into_iter()
                .filter(|p| p.id != member.id)
                .filter_map(|p| Some((p.id, p.peer_urls.into_iter().next()?)))
                .collect();
            channels.retain(|id, _| peers.iter().any(|(p, _)| p == id));
            for (id, url) in peers {
                let channel = match channels.get(&id) {
                    Some((known, channel)) if *known == url => channel.clone(),
                    _ => match cairn_net::endpoint(&url, tls.as_ref()) {
                        Ok((endpoint, connector)) => {
                            let channel = endpoint.connect_with_connector_lazy(connector);
                            channels.insert(id, (url, channel.clone()));
                            channel
                        }
                        Err(e) => {
                            tracing::debug!("cannot probe peer {id:x}: {e}");
                            continue;
                        }
                    },
                };
                let mut client = PeerClient::new(channel);
                let started = Instant::now();
                let probe = client.members(MembersRequest {});
                match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
                    Ok(Ok(_)) => metrics.peer_round_trip(id, started.elapsed()),
                    Ok(Err(status)) => tracing::debug!("probing peer {id:x}: {status}"),
                    Err(_) => tracing::debug!("probing peer {id:x} timed out"),
                }
            }
        }
    })
}
