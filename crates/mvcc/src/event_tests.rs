//! The events a commit hands out and the catch-up read of stored events.

use cairn_api::etcdserverpb::request_op::Request;
use cairn_api::etcdserverpb::{DeleteRangeRequest, TxnRequest};
use cairn_api::mvccpb::Event;
use cairn_api::mvccpb::event::EventType;

use crate::MvccError;
use crate::tests::{Result, b, op, open, put_req};

fn summary(events: &[Event]) -> Vec<(i32, String, i64)> {
    events
        .iter()
        .map(|e| {
            let kv = e.kv.clone().unwrap_or_default();
            (
                e.r#type,
                String::from_utf8_lossy(&kv.key).into_owned(),
                kv.mod_revision,
            )
        })
        .collect()
}

const PUT: i32 = EventType::Put as i32;
const DELETE: i32 = EventType::Delete as i32;

#[test]
fn commit_returns_events_in_revision_order() -> Result {
    let (_dir, store) = open()?;
    let mut batch = store.write();
    batch.put(&put_req("b", "1"))?;
    batch.txn(&TxnRequest {
        success: vec![
            op(Request::RequestPut(put_req("c", "2"))),
            op(Request::RequestPut(put_req("a", "3"))),
        ],
        ..Default::default()
    })?;
    batch.delete_range(&DeleteRangeRequest {
        key: b("b"),
        ..Default::default()
    })?;
    let events = batch.commit(1)?;
    assert_eq!(
        summary(&events),
        vec![
            (PUT, "b".into(), 2),
            (PUT, "c".into(), 3),
            (PUT, "a".into(), 3),
            (DELETE, "b".into(), 4),
        ]
    );
    assert_eq!(
        events[1].kv.as_ref().map(|kv| kv.value.clone()),
        Some(b("2"))
    );
    Ok(())
}

#[test]
fn events_since_reads_ranges_in_order_and_keeps_revisions_whole() -> Result {
    let (_dir, store) = open()?;
    for (i, key) in ["a", "b", "ab", "c"].iter().enumerate() {
        let mut batch = store.write();
        batch.put(&put_req(key, "v"))?;
        batch.commit(i as u64 + 1)?;
    }
    let mut batch = store.write();
    batch.txn(&TxnRequest {
        success: vec![
            op(Request::RequestPut(put_req("a", "w"))),
            op(Request::RequestPut(put_req("ab", "w"))),
        ],
        ..Default::default()
    })?;
    batch.commit(5)?;
    // Revisions 2..=6: a, b, ab, c, then a+ab in one txn.
    let (events, next) = store.events_since(b"a", b"b", 1, 100)?;
    assert_eq!(
        summary(&events),
        vec![
            (PUT, "a".into(), 2),
            (PUT, "ab".into(), 4),
            (PUT, "a".into(), 6),
            (PUT, "ab".into(), 6)
        ]
    );
    assert_eq!(next, 7);
    let (events, next) = store.events_since(b"a", b"b", 3, 1)?;
    assert_eq!(summary(&events), vec![(PUT, "ab".into(), 4)]);
    assert_eq!(next, 5);
    // A limit reached inside a revision still ends with the whole revision.
    let (events, next) = store.events_since(b"a", b"b", 5, 1)?;
    assert_eq!(events.len(), 2);
    assert_eq!(next, 7);
    let (events, next) = store.events_since(b"c", &[], 9, 10)?;
    assert!(events.is_empty());
    assert_eq!(next, 9);
    Ok(())
}

#[test]
fn events_since_below_the_compact_revision_fails() -> Result {
    let (_dir, store) = open()?;
    for i in 1..=4u64 {
        let mut batch = store.write();
        batch.put(&put_req("k", "v"))?;
        batch.commit(i)?;
    }
    let mut batch = store.write();
    batch.compact(4)?;
    batch.commit(5)?;
    assert!(matches!(
        store.events_since(b"k", &[], 3, 10),
        Err(MvccError::Compacted)
    ));
    let (events, _) = store.events_since(b"k", &[], 4, 10)?;
    assert_eq!(
        summary(&events),
        vec![(PUT, "k".into(), 4), (PUT, "k".into(), 5)]
    );
    Ok(())
}
