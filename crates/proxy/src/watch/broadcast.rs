//! A broadcast: one upstream watch of a range and the client watchers it
//! serves, with its recent history for late joiners.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use cairn_api::etcdserverpb::{ResponseHeader, WatchResponse};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::metrics::Metrics;
use crate::upstream::member_failed;

use super::catch_up::catch_up;
use super::client::{ClientWatcher, JoinPlan};
use super::{Command, HISTORY, Hub, OpenError, RangeKey, UpstreamWatch};

/// One upstream watch and the client watchers it serves.
pub(super) struct Broadcast {
    pub(super) hub: Arc<Hub>,
    /// Where the first client watcher starts (0: now).
    pub(super) first_start: i64,
    pub(super) key: RangeKey,
    pub(super) commands: mpsc::UnboundedSender<Command>,
    pub(super) members: HashMap<u64, Member>,
    /// Every event of the range up to here has been received.
    pub(super) pos: i64,
    pub(super) header: Option<ResponseHeader>,
    pub(super) history: VecDeque<Arc<WatchResponse>>,
    /// The history holds every event from this revision to `pos`.
    pub(super) history_start: i64,
    /// Why the upstream watch ended: (compact revision, reason).
    pub(super) ended: Option<(i64, String)>,
}

pub(super) struct Member {
    pub(super) watcher: ClientWatcher,
    /// Set while the watcher catches up on its own.
    pub(super) catching_up: Option<JoinHandle<()>>,
}

impl Broadcast {
    pub(super) async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let metrics = self.hub.metrics.clone();
        metrics.upstream_watchers.inc();
        // From the first watcher's start, as etcd's proxy: that watcher then
        // needs no private catch-up watch, so a member sees one watch per
        // client watch. Not from a start in the future (past the newest
        // revision seen here): the broadcast would lack what comes before
        // it, which watchers from now need. A start the member refuses
        // (compacted, say) is opened at now instead, and the watcher is told
        // in its catch-up.
        let newest = self.hub.latest.lock().revision.max(self.hub.cache.seen());
        let from_first = match self.first_start {
            start if start > 0 && start <= newest + 1 => self.hub.open(&self.key, start).await.ok(),
            _ => None,
        };
        let mut upstream = match from_first {
            Some(up) => {
                self.pos = self.first_start - 1;
                up
            }
            None => match self.open(0).await {
                Some(up) => {
                    self.pos = up.header.as_ref().map_or(0, |h| h.revision);
                    up
                }
                None => return self.close(commands, &metrics),
            },
        };
        self.history_start = self.pos + 1;
        self.header = upstream.header.take();
        let mut ticker = tokio::time::interval(self.hub.progress_interval);
        ticker.tick().await;
        loop {
            if self.members.is_empty() {
                // Joins are sent under the registry lock: if none is queued
                // now, none can arrive once the entry is gone.
                let mut broadcasts = self.hub.broadcasts.lock();
                match commands.try_recv() {
                    Ok(command) => {
                        drop(broadcasts);
                        self.command(command);
                        continue;
                    }
                    Err(_) => {
                        if broadcasts
                            .get(&self.key)
                            .is_some_and(|tx| tx.same_channel(&self.commands))
                        {
                            broadcasts.remove(&self.key);
                        }
                        break;
                    }
                }
            }
            tokio::select! {
                command = commands.recv() => match command {
                    Some(command) => self.command(command),
                    None => break,
                },
                message = upstream.responses.message() => match message {
                    Ok(Some(response)) => {
                        if !self.upstream_response(response).await {
                            break;
                        }
                    }
                    Ok(None) | Err(_) => {
                        tracing::debug!("grpc-proxy: coalesced watch broke; resuming at {}", self.pos + 1);
                        match self.open(self.pos + 1).await {
                            Some(up) => upstream = up,
                            None => break,
                        }
                    }
                },
                _ = ticker.tick() => self.progress(),
            }
        }
        self.close(commands, &metrics);
    }

    pub(super) fn close(
        mut self,
        mut commands: mpsc::UnboundedReceiver<Command>,
        metrics: &Metrics,
    ) {
        {
            let mut broadcasts = self.hub.broadcasts.lock();
            if broadcasts
                .get(&self.key)
                .is_some_and(|tx| tx.same_channel(&self.commands))
            {
                broadcasts.remove(&self.key);
            }
        }
        commands.close();
        // Joins never served (the upstream watch could not be had, e.g.
        // permission denied): created and cancelled at once with the reason
        // and watch ID -1, as a member answers a watch it refuses.
        let (compact_revision, reason) = self.ended.take().unwrap_or_default();
        while let Ok(command) = commands.try_recv() {
            if let Command::Join(watcher, _) = command {
                watcher.outbox.push_for(
                    watcher.reg,
                    watcher.watch_id,
                    WatchResponse {
                        header: self.some_header(),
                        watch_id: -1,
                        created: true,
                        canceled: true,
                        compact_revision,
                        cancel_reason: reason.clone(),
                        ..Default::default()
                    },
                );
            }
        }
        for (_, member) in self.members.drain() {
            if let Some(task) = member.catching_up {
                task.abort();
            }
        }
        metrics.upstream_watchers.dec();
    }

    /// Opens the upstream watch at `start`, retrying while members are
    /// unreachable; `None` (members told why) when it cannot be had.
    pub(super) async fn open(&mut self, start: i64) -> Option<UpstreamWatch> {
        loop {
            match self.hub.open(&self.key, start).await {
                Ok(up) => return Some(up),
                Err(OpenError::Compacted(compact_revision)) => {
                    self.end_all(compact_revision, String::new());
                    return None;
                }
                Err(OpenError::Refused(reason)) => {
                    self.end_all(0, reason);
                    return None;
                }
                Err(OpenError::Failed(status)) if !member_failed(&status) => {
                    self.end_all(0, status.message().to_owned());
                    return None;
                }
                Err(OpenError::Failed(_)) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// A header for responses of our own making: Go's client reads it
    /// unconditionally.
    pub(super) fn some_header(&self) -> Option<ResponseHeader> {
        Some(self.header.unwrap_or_else(|| *self.hub.latest.lock()))
    }

    pub(super) fn end_all(&mut self, compact_revision: i64, reason: String) {
        self.ended = Some((compact_revision, reason.clone()));
        let header = self.some_header();
        for (_, member) in self.members.drain() {
            if let Some(task) = member.catching_up {
                task.abort();
            }
            member
                .watcher
                .cancel(header, compact_revision, reason.clone());
        }
    }

    pub(super) fn command(&mut self, command: Command) {
        match command {
            Command::Join(mut watcher, start) => {
                // The newest revision a member has told of: past `pos` while
                // the broadcast replays for its first watcher, and a watcher
                // from now must not be handed that replay.
                let now = self.pos.max(self.header.map_or(0, |h| h.revision));
                let start = if start <= 0 { now + 1 } else { start };
                let header = ResponseHeader {
                    revision: now,
                    ..self.header.unwrap_or_default()
                };
                watcher.outbox.push(
                    watcher.reg,
                    WatchResponse {
                        header: Some(header),
                        watch_id: watcher.watch_id,
                        created: true,
                        ..Default::default()
                    },
                );
                match JoinPlan::new(start, self.pos, self.history_start) {
                    JoinPlan::Live(next_rev) => {
                        watcher.next_rev = next_rev;
                        self.members.insert(
                            watcher.reg,
                            Member {
                                watcher,
                                catching_up: None,
                            },
                        );
                    }
                    // A past start is checked against compaction first, in
                    // the catch-up task: etcd refuses a compacted start even
                    // if the history here still has it.
                    JoinPlan::Replay(next_rev) => {
                        watcher.next_rev = next_rev;
                        self.catch_up(watcher, next_rev - 1, true);
                    }
                    JoinPlan::CatchUp { next_rev, target } => {
                        watcher.next_rev = next_rev;
                        self.catch_up(watcher, target, true);
                    }
                }
            }
            Command::Leave(reg) => {
                if let Some(Member {
                    catching_up: Some(task),
                    ..
                }) = self.members.remove(&reg)
                {
                    task.abort();
                }
            }
            Command::Gone(reg) => {
                self.members.remove(&reg);
            }
            Command::CaughtUp { reg, next_rev } => {
                let Some(member) = self.members.remove(&reg) else {
                    return;
                };
                let mut watcher = member.watcher;
                watcher.next_rev = next_rev;
                self.resume(watcher);
            }
        }
    }

    /// Brings a watcher that is at or past the history's start up to `pos`
    /// from the history, and makes it live; or sends it catching up again.
    pub(super) fn resume(&mut self, mut watcher: ClientWatcher) {
        if watcher.next_rev < self.history_start {
            let target = self.history_start - 1;
            self.catch_up(watcher, target, false);
            return;
        }
        for response in &self.history {
            if !watcher.offer(response) {
                self.catch_up(watcher, self.history_start - 1, false);
                return;
            }
        }
        self.members.insert(
            watcher.reg,
            Member {
                watcher,
                catching_up: None,
            },
        );
    }

    pub(super) fn catch_up(&mut self, watcher: ClientWatcher, target: i64, check_compaction: bool) {
        let task = tokio::spawn(catch_up(
            self.hub.clone(),
            self.key.clone(),
            watcher.clone(),
            target,
            check_compaction,
            self.commands.clone(),
        ));
        self.members.insert(
            watcher.reg,
            Member {
                watcher,
                catching_up: Some(task),
            },
        );
    }

    /// False when the upstream watch was cancelled and the broadcast ends.
    pub(super) async fn upstream_response(&mut self, response: WatchResponse) -> bool {
        self.hub.saw(&response.header);
        if response.canceled {
            self.end_all(response.compact_revision, response.cancel_reason);
            return false;
        }
        self.header = response.header;
        let Some(last) = response
            .events
            .last()
            .and_then(|e| e.kv.as_ref())
            .map(|kv| kv.mod_revision)
        else {
            return true;
        };
        // The cache learns of a change before any client watcher does.
        self.hub.cache.wait_seen(last).await;
        let response = Arc::new(response);
        self.pos = last;
        self.history.push_back(response.clone());
        while self.history.len() > HISTORY {
            if let Some(old) = self.history.pop_front()
                && let Some(kv) = old.events.last().and_then(|e| e.kv.as_ref())
            {
                self.history_start = kv.mod_revision + 1;
            }
        }
        let mut lagging = Vec::new();
        for (reg, member) in &mut self.members {
            if member.catching_up.is_none() && !member.watcher.offer(&response) {
                lagging.push(*reg);
            }
        }
        for reg in lagging {
            if let Some(member) = self.members.remove(&reg) {
                let target = self.history_start - 1;
                self.catch_up(member.watcher, target, false);
            }
        }
        true
    }

    /// etcd's progress notification for idle watchers that asked for it.
    pub(super) fn progress(&mut self) {
        let header = ResponseHeader {
            revision: self.pos,
            ..self.header.unwrap_or_default()
        };
        for member in self.members.values_mut() {
            let w = &mut member.watcher;
            if member.catching_up.is_none() && w.progress_notify && w.quiet {
                w.outbox.push(
                    w.reg,
                    WatchResponse {
                        header: Some(header),
                        watch_id: w.watch_id,
                        ..Default::default()
                    },
                );
            }
            w.quiet = true;
        }
    }
}
