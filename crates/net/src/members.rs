//! Cluster discovery over the peer protocol: the `Members` call of the peer
//! service, which every member answers on its peer URLs. A member joining
//! an existing cluster learns its ID from it; etcd's v2 proxy learns the
//! cluster's client URLs.

use serde::de::DeserializeOwned;

use crate::peer_proto as pb;
use crate::{ClientTls, NetError, endpoint};

/// Asks the members at `peer_urls` (the first that answers) for the
/// cluster ID and member list. `M` is what the list's JSON is read as: the
/// consensus layer's member record, or any part of it.
pub async fn fetch_cluster<M: DeserializeOwned>(
    peer_urls: &[String],
    tls: Option<&ClientTls>,
) -> Result<(u64, Vec<M>), NetError> {
    let mut last_error = NetError::Peer {
        url: String::new(),
        reason: "no peer URLs to ask".into(),
    };
    for url in peer_urls {
        let peer_error = |reason: String| NetError::Peer {
            url: url.clone(),
            reason,
        };
        let channel = match endpoint(url, tls) {
            Ok((endpoint, connector)) => endpoint.connect_with_connector(connector).await,
            Err(e) => {
                last_error = e;
                continue;
            }
        };
        let channel = match channel {
            Ok(channel) => channel,
            Err(e) => {
                last_error = peer_error(transport_error(&e));
                continue;
            }
        };
        let mut client = pb::peer_client::PeerClient::new(channel);
        match client.members(pb::MembersRequest {}).await {
            Ok(response) => {
                let response = response.into_inner();
                let members = serde_json::from_slice(&response.members)
                    .map_err(|e| peer_error(format!("unreadable member list: {e}")))?;
                return Ok((response.cluster_id, members));
            }
            Err(status) => last_error = peer_error(status.message().to_string()),
        }
    }
    Err(last_error)
}

/// tonic's error and its causes, which say what actually failed.
fn transport_error(e: &tonic::transport::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
