use std::sync::atomic::Ordering;

use cairn_api::mvccpb::event::EventType;
use cairn_api::mvccpb::{Event, KeyValue};
use proptest::prelude::*;

use super::client::{JoinPlan, Outgoing};
use super::*;

fn event(revision: i64, delete: bool) -> Event {
    Event {
        r#type: if delete {
            EventType::Delete as i32
        } else {
            EventType::Put as i32
        },
        kv: Some(KeyValue {
            key: Bytes::from_static(b"k"),
            mod_revision: revision,
            ..Default::default()
        }),
        prev_kv: Some(KeyValue::default()),
    }
}

fn response(events: Vec<Event>) -> WatchResponse {
    WatchResponse {
        events,
        ..Default::default()
    }
}

fn watcher() -> (ClientWatcher, mpsc::UnboundedReceiver<Outgoing>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let w = ClientWatcher {
        reg: 1,
        watch_id: 7,
        outbox: Outbox {
            tx,
            queued: Arc::new(AtomicUsize::new(0)),
        },
        no_put: false,
        no_delete: false,
        prev_kv: false,
        progress_notify: false,
        fragment_bytes: None,
        next_rev: 0,
        quiet: true,
        namespace: Namespace::default(),
    };
    (w, rx)
}

fn delivered(rx: &mut mpsc::UnboundedReceiver<Outgoing>) -> Vec<i64> {
    let mut seen = Vec::new();
    while let Ok(o) = rx.try_recv() {
        for e in o.response.events {
            seen.push(e.kv.map_or(0, |kv| kv.mod_revision));
        }
    }
    seen
}

#[test]
fn join_plans() {
    assert_eq!(JoinPlan::new(0, 10, 5), JoinPlan::Live(11));
    assert_eq!(JoinPlan::new(15, 10, 5), JoinPlan::Live(15));
    assert_eq!(JoinPlan::new(11, 10, 5), JoinPlan::Live(11));
    assert_eq!(JoinPlan::new(7, 10, 5), JoinPlan::Replay(7));
    assert_eq!(
        JoinPlan::new(3, 10, 5),
        JoinPlan::CatchUp {
            next_rev: 3,
            target: 4
        }
    );
}

#[test]
fn a_watcher_that_asked_for_fragments_gets_large_responses_in_parts() {
    let big = |revision: i64| {
        let mut e = event(revision, false);
        if let Some(kv) = &mut e.kv {
            kv.value = Bytes::from(vec![b'x'; 100]);
        }
        e
    };
    let large = response((1..=5).map(big).collect());
    let (mut whole, mut rx) = watcher();
    assert!(whole.offer(&large));
    let parts: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
    assert_eq!(parts.len(), 1);

    let (mut fragmented, mut rx) = watcher();
    fragmented.fragment_bytes = Some(250);
    assert!(fragmented.offer(&large));
    let parts: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
    assert_eq!(
        parts
            .iter()
            .map(|p| p.response.fragment)
            .collect::<Vec<_>>(),
        vec![true, true, false]
    );
    assert!(parts.iter().all(|p| p.response.watch_id == 7));
    assert_eq!(delivered_of(parts), vec![1, 2, 3, 4, 5]);
}

fn delivered_of(parts: Vec<Outgoing>) -> Vec<i64> {
    parts
        .into_iter()
        .flat_map(|o| o.response.events)
        .map(|e| e.kv.map_or(0, |kv| kv.mod_revision))
        .collect()
}

#[test]
fn shape_applies_filters_and_prev_kv() {
    let (mut w, _rx) = watcher();
    w.no_delete = true;
    w.next_rev = 2;
    let shaped = w
        .shape(&response(vec![
            event(1, false),
            event(2, false),
            event(3, true),
        ]))
        .expect("events");
    assert_eq!(shaped.watch_id, 7);
    assert_eq!(shaped.events.len(), 1);
    assert!(shaped.events[0].prev_kv.is_none());
    assert_eq!(w.next_rev, 4);
    // Everything filtered: nothing sent, but the position moves.
    assert!(w.shape(&response(vec![event(4, true)])).is_none());
    assert_eq!(w.next_rev, 5);
}

#[test]
fn a_full_client_is_not_handed_more() {
    let (mut w, _rx) = watcher();
    w.outbox.queued.store(CLIENT_QUEUE, Ordering::Release);
    assert!(!w.offer(&response(vec![event(1, false)])));
    assert_eq!(w.next_rev, 0);
}

proptest! {
    /// The join rule, run against a store of events: however the
    /// broadcast's history is cut, the responses grouped and the client
    /// started, the client gets exactly the events from its start, once,
    /// in order.
    #[test]
    fn joins_are_gap_and_duplicate_free(
        revisions in proptest::collection::btree_set(1i64..200, 1..60),
        created in 0i64..200,
        kept in 1usize..20,
        start in 0i64..220,
        group in 1usize..4,
    ) {
        let store: Vec<i64> = revisions.into_iter().collect();
        let after = |from: i64| -> Vec<WatchResponse> {
            store.iter().copied().filter(|r| *r >= from).collect::<Vec<_>>()
                .chunks(group).map(|c| response(c.iter().map(|r| event(*r, false)).collect()))
                .collect()
        };
        // The broadcast started at `created` and received the rest; it
        // keeps the last `kept` responses.
        let received = after(created + 1);
        let pos = received.last().and_then(|r| r.events.last())
            .and_then(|e| e.kv.as_ref()).map_or(created, |kv| kv.mod_revision);
        let cut = received.len().saturating_sub(kept);
        let history_start = if cut == 0 {
            created + 1
        } else {
            received[cut - 1].events.last().and_then(|e| e.kv.as_ref())
                .map_or(created, |kv| kv.mod_revision) + 1
        };
        let history = &received[cut..];
        let (mut w, mut rx) = watcher();
        match JoinPlan::new(start, pos, history_start) {
            JoinPlan::Live(next) => w.next_rev = next,
            JoinPlan::Replay(next) => {
                w.next_rev = next;
                for r in history { prop_assert!(w.offer(r)); }
            }
            JoinPlan::CatchUp { next_rev, target } => {
                w.next_rev = next_rev;
                for r in after(next_rev) {
                    if w.next_rev > target { break; }
                    prop_assert!(w.offer(&r));
                }
                for r in history { prop_assert!(w.offer(r)); }
            }
        }
        // Then live events after the join.
        let live: Vec<i64> = (pos + 1..pos + 4).collect();
        for r in &live { prop_assert!(w.offer(&response(vec![event(*r, false)]))); }
        let from = if start <= 0 { pos + 1 } else { start };
        let expected: Vec<i64> = store.iter().copied().chain(live.iter().copied())
            .filter(|r| *r >= from).collect();
        prop_assert_eq!(delivered(&mut rx), expected);
    }
}
