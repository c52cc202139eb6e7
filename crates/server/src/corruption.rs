//! etcd's --experimental-initial-corrupt-check: before serving, compare this
//! member's HashKV with every peer that answers, at this member's revision.

use std::time::Duration;

use anyhow::Context as _;
use cairn_api::etcdserverpb::HashKvRequest;
use cairn_api::etcdserverpb::maintenance_client::MaintenanceClient;

use crate::member::Member;

/// A peer that does not answer this fast is skipped, as etcd skips it.
const PEER_TIMEOUT: Duration = Duration::from_secs(2);

pub async fn initial_check(member: &Member) -> anyhow::Result<()> {
    let local = member.store.hash_kv(0).context("hashing the local store")?;
    tracing::info!(
        revision = local.current_revision,
        hash = local.hash,
        "starting initial corruption check"
    );
    let mut mismatches = 0;
    for peer in member
        .node
        .members()
        .into_iter()
        .filter(|m| m.id != member.id)
    {
        let Some(url) = peer.client_urls.first() else {
            continue;
        };
        let request = HashKvRequest {
            revision: local.current_revision,
        };
        let answer = tokio::time::timeout(PEER_TIMEOUT, async {
            let mut client = MaintenanceClient::connect(url.clone()).await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                client.hash_kv(request).await?.into_inner(),
            )
        })
        .await;
        let response = match answer {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => {
                tracing::warn!(
                    peer = format_args!("{:x}", peer.id),
                    "cannot fetch hash from peer: {e}"
                );
                continue;
            }
            Err(_) => {
                tracing::warn!(
                    peer = format_args!("{:x}", peer.id),
                    "cannot fetch hash from peer: timed out"
                );
                continue;
            }
        };
        if response.compact_revision != local.compact_revision {
            tracing::warn!(
                peer = format_args!("{:x}", peer.id),
                "compact revision differs from peer's; skipped the hash comparison"
            );
        } else if response.hash != local.hash {
            tracing::error!(
                peer = format_args!("{:x}", peer.id),
                local = local.hash,
                remote = response.hash,
                "found different hash values from peer"
            );
            mismatches += 1;
        }
    }
    if mismatches > 0 {
        anyhow::bail!("{:x} found data inconsistency with peers", member.id);
    }
    tracing::info!("initial corruption checking passed; no corruption");
    Ok(())
}
