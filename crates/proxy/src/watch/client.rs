//! One client watcher as broadcasts serve it ([`ClientWatcher`]), the
//! queue of its client stream ([`Outbox`]), and how a joining watcher is
//! brought up to a broadcast ([`JoinPlan`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cairn_api::etcdserverpb::{ResponseHeader, WatchResponse};
use cairn_api::mvccpb::event::EventType;
use tokio::sync::mpsc;

use crate::namespace::Namespace;

use super::CLIENT_QUEUE;

/// A response for the client stream, tagged with the watcher registration
/// it belongs to (a cancelled watcher's stragglers are dropped by it).
pub(super) struct Outgoing {
    pub(super) reg: u64,
    /// The client's ID of the watcher (a refused create answers as -1).
    pub(super) watch_id: i64,
    pub(super) response: WatchResponse,
}

#[derive(Clone)]
pub(super) struct Outbox {
    pub(super) tx: mpsc::UnboundedSender<Outgoing>,
    pub(super) queued: Arc<AtomicUsize>,
}

impl Outbox {
    pub(super) fn push(&self, reg: u64, response: WatchResponse) {
        self.push_for(reg, response.watch_id, response);
    }

    pub(super) fn push_for(&self, reg: u64, watch_id: i64, response: WatchResponse) {
        self.queued.fetch_add(1, Ordering::AcqRel);
        let outgoing = Outgoing {
            reg,
            watch_id,
            response,
        };
        if self.tx.send(outgoing).is_err() {
            self.queued.fetch_sub(1, Ordering::AcqRel);
        }
    }

    pub(super) fn full(&self) -> bool {
        self.queued.load(Ordering::Acquire) >= CLIENT_QUEUE
    }

    pub(super) fn closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Waits until the client has room again (or has gone).
    pub(super) async fn drained(&self) {
        while self.queued.load(Ordering::Acquire) > CLIENT_QUEUE / 2 && !self.closed() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// One client watcher as the broadcast serves it.
#[derive(Clone)]
pub(super) struct ClientWatcher {
    pub(super) reg: u64,
    pub(super) watch_id: i64,
    pub(super) outbox: Outbox,
    pub(super) no_put: bool,
    pub(super) no_delete: bool,
    pub(super) prev_kv: bool,
    pub(super) progress_notify: bool,
    /// The client asked for fragments: responses larger than this go out
    /// in parts (etcd's `fragment`).
    pub(super) fragment_bytes: Option<usize>,
    /// The first revision this watcher has not been given.
    pub(super) next_rev: i64,
    /// No events since the last progress tick.
    pub(super) quiet: bool,
    pub(super) namespace: Namespace,
}

impl ClientWatcher {
    /// The part of an upstream response this watcher is owed, shaped as it
    /// asked; moves `next_rev` past the response's revisions. `None` when
    /// nothing in it is for this watcher.
    pub(super) fn shape(&mut self, response: &WatchResponse) -> Option<WatchResponse> {
        let from = self.next_rev;
        let last = response.events.last()?.kv.as_ref()?.mod_revision;
        if last < from {
            return None;
        }
        self.next_rev = last + 1;
        let events: Vec<_> = response
            .events
            .iter()
            .filter(|e| e.kv.as_ref().is_some_and(|kv| kv.mod_revision >= from))
            .filter(|e| {
                if e.r#type == EventType::Delete as i32 {
                    !self.no_delete
                } else {
                    !self.no_put
                }
            })
            .map(|e| {
                let mut e = e.clone();
                if !self.prev_kv {
                    e.prev_kv = None;
                }
                if let Some(kv) = &mut e.kv {
                    self.namespace.strip_kv(kv);
                }
                if let Some(kv) = &mut e.prev_kv {
                    self.namespace.strip_kv(kv);
                }
                e
            })
            .collect();
        if events.is_empty() {
            return None;
        }
        self.quiet = false;
        Some(WatchResponse {
            header: response.header,
            watch_id: self.watch_id,
            events,
            ..Default::default()
        })
    }

    /// Hands the watcher its part of `response`; false (and nothing moved)
    /// when the client is too far behind to take more now.
    pub(super) fn offer(&mut self, response: &WatchResponse) -> bool {
        if self.outbox.full() {
            return false;
        }
        if let Some(shaped) = self.shape(response) {
            self.push_events(shaped);
        }
        true
    }

    /// Queues a response of events shaped for this watcher, in fragments
    /// if it asked for them.
    pub(super) fn push_events(&self, response: WatchResponse) {
        match self.fragment_bytes {
            Some(max_bytes) => {
                for part in cairn_api::watch::fragments(response, max_bytes) {
                    self.outbox.push(self.reg, part);
                }
            }
            None => self.outbox.push(self.reg, response),
        }
    }

    pub(super) fn cancel(
        &self,
        header: Option<ResponseHeader>,
        compact_revision: i64,
        reason: String,
    ) {
        self.outbox.push(
            self.reg,
            WatchResponse {
                header,
                watch_id: self.watch_id,
                canceled: true,
                compact_revision,
                cancel_reason: reason,
                ..Default::default()
            },
        );
    }
}

/// How a joining watcher is brought up to the broadcast's position.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum JoinPlan {
    /// Nothing to catch up: it starts at `next_rev`.
    Live(i64),
    /// Replay the history from `next_rev`.
    Replay(i64),
    /// Catch up privately from `next_rev` through `target`, then replay.
    CatchUp { next_rev: i64, target: i64 },
}

impl JoinPlan {
    pub(super) fn new(start: i64, pos: i64, history_start: i64) -> JoinPlan {
        if start <= 0 || start > pos {
            JoinPlan::Live(start.max(pos + 1))
        } else if start >= history_start {
            JoinPlan::Replay(start)
        } else {
            JoinPlan::CatchUp {
                next_rev: start,
                target: history_start - 1,
            }
        }
    }
}
