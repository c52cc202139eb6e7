//! etcd's auto-compaction: `revision` mode keeps the last N revisions,
//! `periodic` mode keeps a window of history. Compactions are proposals like
//! any write, so every member compacts at the same point of the log.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use cairn_api::etcdserverpb::CompactionRequest;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::AutoCompaction;
use crate::member::Member;

/// etcd's revision compactor checks every five minutes.
const REVISION_CHECK_INTERVAL: Duration = Duration::from_secs(300);

pub fn spawn(member: Arc<Member>, mode: AutoCompaction) -> Option<JoinHandle<()>> {
    match mode {
        AutoCompaction::Off => None,
        AutoCompaction::Revision(keep) => Some(tokio::spawn(by_revision(member, keep))),
        AutoCompaction::Periodic(window) => Some(tokio::spawn(periodic(member, window))),
    }
}

async fn compact(member: &Member, revision: i64) {
    if revision <= member.compact_revision() || revision <= 0 {
        return;
    }
    tracing::info!(revision, "starting auto-compaction");
    let request = CompactionRequest {
        revision,
        physical: false,
    };
    match member.compact(None, request).await {
        Ok(_) => tracing::info!(revision, "finished auto-compaction"),
        Err(e) => tracing::warn!(revision, "auto-compaction failed: {}", e.message()),
    }
}

async fn by_revision(member: Arc<Member>, keep: i64) {
    let mut ticker = tokio::time::interval(REVISION_CHECK_INTERVAL);
    loop {
        ticker.tick().await;
        compact(&member, member.current_revision() - keep).await;
    }
}

/// Samples the revision every tenth of the window and compacts to the newest
/// sample that is at least a window old.
async fn periodic(member: Arc<Member>, window: Duration) {
    let step = (window / 10).max(Duration::from_secs(1));
    let mut samples: VecDeque<(Instant, i64)> = VecDeque::new();
    let mut ticker = tokio::time::interval(step);
    loop {
        ticker.tick().await;
        let now = Instant::now();
        samples.push_back((now, member.current_revision()));
        let mut target = None;
        while let Some(&(at, revision)) = samples.front() {
            if now.duration_since(at) < window {
                break;
            }
            target = Some(revision);
            samples.pop_front();
        }
        if let Some(revision) = target {
            compact(&member, revision).await;
        }
    }
}
