//! Catching up: a watcher that started before a broadcast's history (or
//! fell behind it) reads what it missed from a private upstream watch.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::upstream::member_failed;

use super::client::ClientWatcher;
use super::{Command, Hub, OpenError, RangeKey};

/// Brings one watcher to past `target` on its own: waits for its client to
/// drain, checks a past start against compaction, and reads what it misses
/// from a private upstream watch; then hands it back to the broadcast.
pub(super) async fn catch_up(
    hub: Arc<Hub>,
    key: RangeKey,
    mut watcher: ClientWatcher,
    target: i64,
    check_compaction: bool,
    broadcast: mpsc::UnboundedSender<Command>,
) {
    watcher.outbox.drained().await;
    let private = check_compaction && hub.compacted(&key, watcher.next_rev).await;
    if watcher.next_rev <= target || private {
        hub.metrics.upstream_watchers.inc();
        hub.metrics.catch_up_watchers.inc();
        let ended = private_watch(&hub, &key, &mut watcher, target).await;
        hub.metrics.upstream_watchers.dec();
        hub.metrics.catch_up_watchers.dec();
        if ended {
            let _ = broadcast.send(Command::Gone(watcher.reg));
            return;
        }
    }
    let _ = broadcast.send(Command::CaughtUp {
        reg: watcher.reg,
        next_rev: watcher.next_rev,
    });
}

/// Delivers from a private watch until `next_rev` is past `target`; true if
/// the watcher ended instead (told why).
pub(super) async fn private_watch(
    hub: &Hub,
    key: &RangeKey,
    watcher: &mut ClientWatcher,
    target: i64,
) -> bool {
    loop {
        let mut up = match hub.open(key, watcher.next_rev).await {
            Ok(up) => up,
            Err(OpenError::Compacted(compact_revision)) => {
                let header = *hub.latest.lock();
                watcher.cancel(Some(header), compact_revision, String::new());
                return true;
            }
            Err(OpenError::Refused(reason)) => {
                watcher.cancel(Some(*hub.latest.lock()), 0, reason);
                return true;
            }
            Err(OpenError::Failed(status)) => {
                if !member_failed(&status) {
                    watcher.cancel(Some(*hub.latest.lock()), 0, status.message().to_owned());
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        if watcher.next_rev > target {
            return false;
        }
        while let Ok(Some(response)) = up.responses.message().await {
            if response.canceled {
                watcher.cancel(
                    response.header,
                    response.compact_revision,
                    response.cancel_reason,
                );
                return true;
            }
            hub.saw(&response.header);
            if let Some(last) = response.events.last().and_then(|e| e.kv.as_ref()) {
                hub.cache.wait_seen(last.mod_revision).await;
            }
            if let Some(shaped) = watcher.shape(&response) {
                watcher.outbox.drained().await;
                watcher.push_events(shaped);
            }
            if watcher.next_rev > target {
                return false;
            }
            if watcher.outbox.closed() {
                return true;
            }
        }
    }
}
