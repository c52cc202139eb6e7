//! etcd's corruption checks, by comparing HashKV across members:
//! --experimental-initial-corrupt-check before serving, and
//! --experimental-corrupt-check-time on the leader, which raises the CORRUPT
//! alarm (through the log) for a member whose hash differs.

use std::sync::Arc;
use std::time::Duration;

use cairn_api::etcdserverpb::alarm_request::AlarmAction;
use cairn_api::etcdserverpb::maintenance_client::MaintenanceClient;
use cairn_api::etcdserverpb::{AlarmRequest, AlarmType, HashKvRequest, HashKvResponse};
use cairn_mvcc::KvHash;
use tokio::task::JoinHandle;

use crate::member::Member;

/// Why a corruption check failed or found corruption.
#[derive(Debug, thiserror::Error)]
pub enum CorruptionError {
    #[error("hashing the local store: {0}")]
    Hash(String),
    /// etcd's words, which its tests wait for.
    #[error("etcdmain: {0:016x} found data inconsistency with peers")]
    Inconsistent(u64),
    #[error("raising the CORRUPT alarm: {0}")]
    Alarm(String),
}

/// A peer that does not answer this fast is skipped, as etcd skips it.
const PEER_TIMEOUT: Duration = Duration::from_secs(2);

/// Every other member's HashKV at `revision`, with its ID; members that do
/// not answer are logged and left out.
async fn peer_hashes(member: &Member, revision: i64) -> Vec<(u64, HashKvResponse)> {
    let mut hashes = Vec::new();
    for peer in member
        .node
        .members()
        .into_iter()
        .filter(|m| m.id != member.id)
    {
        let Some(url) = peer.client_urls.first() else {
            continue;
        };
        let answer = tokio::time::timeout(PEER_TIMEOUT, async {
            let mut client = MaintenanceClient::connect(url.clone()).await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                client
                    .hash_kv(HashKvRequest { revision })
                    .await?
                    .into_inner(),
            )
        })
        .await;
        match answer {
            Ok(Ok(response)) => hashes.push((peer.id, response)),
            Ok(Err(e)) => tracing::warn!(
                peer = format_args!("{:x}", peer.id),
                "cannot fetch hash from peer: {e}"
            ),
            Err(_) => tracing::warn!(
                peer = format_args!("{:x}", peer.id),
                "cannot fetch hash from peer: timed out"
            ),
        }
    }
    hashes
}

/// This member's HashKV, as its peers answer theirs (with --shards, of the
/// whole keyspace).
async fn local_hash(member: &Member) -> Result<KvHash, CorruptionError> {
    crate::shard_maintenance::hash_kv(member, None, 0)
        .await
        .map_err(|e| CorruptionError::Hash(e.message().to_string()))
}

pub async fn initial_check(member: &Member) -> Result<(), CorruptionError> {
    let local = match local_hash(member).await {
        // With --shards the hash reads the shards held elsewhere, which a
        // member starting with the cluster may not reach yet: a check it
        // cannot make is skipped, as etcd skips the peers it cannot reach.
        Err(e) if member.shards().is_some() => {
            tracing::warn!("skipped the initial corruption check: {e}");
            return Ok(());
        }
        local => local?,
    };
    tracing::info!(
        revision = local.current_revision,
        hash = local.hash,
        "starting initial corruption check"
    );
    let mut mismatches = 0;
    for (peer, response) in peer_hashes(member, local.current_revision).await {
        if response.compact_revision != local.compact_revision {
            tracing::warn!(
                peer = format_args!("{peer:x}"),
                "compact revision differs from peer's; skipped the hash comparison"
            );
        } else if response.hash != local.hash {
            tracing::error!(
                peer = format_args!("{peer:x}"),
                local = local.hash,
                remote = response.hash,
                "found different hash values from peer"
            );
            mismatches += 1;
        }
    }
    if mismatches > 0 {
        return Err(CorruptionError::Inconsistent(member.id));
    }
    tracing::info!("initial corruption checking passed; no corruption");
    Ok(())
}

/// Runs the periodic check every `interval` while this member leads.
pub fn spawn_periodic(member: Arc<Member>, interval: Option<Duration>) -> Option<JoinHandle<()>> {
    let interval = interval?;
    tracing::info!(?interval, "enabled corruption checking");
    Some(tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.tick().await;
        loop {
            ticker.tick().await;
            if member.is_leader()
                && let Err(e) = periodic_check(&member).await
            {
                tracing::warn!("corruption check failed: {e}");
            }
        }
    }))
}

/// The leader's check: a follower ahead of the leader, or with the
/// leader's compact revision but another hash, is corrupt; so is the
/// leader if its own hash changed while its revisions did not.
async fn periodic_check(member: &Member) -> Result<(), CorruptionError> {
    let before = local_hash(member).await?;
    let peers = peer_hashes(member, before.current_revision).await;
    let after = local_hash(member).await?;
    let mut corrupt = None;
    if after.hash != before.hash
        && after.current_revision == before.current_revision
        && after.compact_revision == before.compact_revision
    {
        corrupt = Some(member.id);
    }
    for (peer, response) in &peers {
        let ahead = response
            .header
            .as_ref()
            .is_some_and(|h| h.revision > after.current_revision)
            || response.compact_revision > after.compact_revision;
        let differs =
            response.compact_revision == before.compact_revision && response.hash != before.hash;
        if ahead || differs {
            tracing::error!(
                peer = format_args!("{peer:x}"),
                local = before.hash,
                remote = response.hash,
                revision = before.current_revision,
                "found a member whose data differs from the leader's"
            );
            corrupt = corrupt.or(Some(*peer));
        }
    }
    // etcd raises one alarm per check.
    if let Some(member_id) = corrupt {
        let raise = AlarmRequest {
            action: AlarmAction::Activate as i32,
            member_id,
            alarm: AlarmType::Corrupt as i32,
        };
        member
            .propose(raise)
            .await
            .map_err(|e| CorruptionError::Alarm(e.message().to_string()))?;
    }
    Ok(())
}
