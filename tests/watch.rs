//! etcd's Watch service on a real member, through the etcd-client crate and
//! etcdctl.

mod common;

use std::io::Read as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::Member;
use etcd_client::{
    Client, Compare, CompareOp, EventType, PutOptions, Txn, TxnOp, WatchFilterType, WatchOptions,
    WatchResponse, WatchStream,
};

async fn connect(m: &Member) -> Client {
    Client::connect([m.endpoint()], None)
        .await
        .expect("connect")
}

/// The next response of a watch stream, within 10 s.
async fn next(stream: &mut WatchStream) -> WatchResponse {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("a watch response within 10 s")
        .expect("the watch stream works")
        .expect("the watch stream is open")
}

/// (type, key, value, mod revision) of each event of a response.
fn events(resp: &WatchResponse) -> Vec<(EventType, String, String, i64)> {
    resp.events()
        .iter()
        .map(|e| {
            let kv = e.kv().expect("an event carries a key-value");
            (
                e.event_type(),
                String::from_utf8_lossy(kv.key()).into_owned(),
                String::from_utf8_lossy(kv.value()).into_owned(),
                kv.mod_revision(),
            )
        })
        .collect()
}

#[tokio::test]
async fn an_old_start_sees_every_event_once_in_order_while_writes_go_on() {
    let m = Member::start();
    let mut c = connect(&m).await;
    for i in 0..50 {
        c.put(format!("k{i}"), "old", None).await.expect("put");
    }
    // Revisions 2..=51 are stored; 52..=251 come while the watcher catches up.
    let mut writer = c.clone();
    let writes = tokio::spawn(async move {
        for i in 0..200 {
            writer.put(format!("k{}", i % 7), "new", None).await?;
        }
        Ok::<_, etcd_client::Error>(())
    });
    let (_watcher, mut stream) = c
        .watch(
            "k",
            Some(WatchOptions::new().with_prefix().with_start_revision(2)),
        )
        .await
        .expect("watch");
    let mut seen = Vec::new();
    while seen.last().copied().unwrap_or(0) < 251 {
        let resp = next(&mut stream).await;
        assert!(!resp.canceled(), "{resp:?}");
        seen.extend(events(&resp).into_iter().map(|e| e.3));
    }
    writes.await.expect("writer").expect("writes");
    assert_eq!(seen, (2..=251).collect::<Vec<i64>>());
}

#[tokio::test]
async fn prefix_range_filters_and_prev_kv() {
    let m = Member::start();
    let mut c = connect(&m).await;
    let (_w1, mut prefix) = c
        .watch("a", Some(WatchOptions::new().with_prefix()))
        .await
        .expect("watch");
    let (_w2, mut range) = c
        .watch("b", Some(WatchOptions::new().with_range("d")))
        .await
        .expect("watch");
    let (_w3, mut no_put) = c
        .watch(
            "a",
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_filters([WatchFilterType::NoPut])
                    .with_prev_key(),
            ),
        )
        .await
        .expect("watch");
    let (_w4, mut no_delete) = c
        .watch(
            "a1",
            Some(
                WatchOptions::new()
                    .with_filters([WatchFilterType::NoDelete])
                    .with_prev_key(),
            ),
        )
        .await
        .expect("watch");
    c.put("a1", "v1", None).await.expect("put"); // 2
    c.put("b", "v2", None).await.expect("put"); // 3
    c.put("c9", "v3", None).await.expect("put"); // 4
    c.put("d", "v4", None).await.expect("put"); // 5
    c.put("a1", "v5", None).await.expect("put"); // 6
    c.delete("a1", None).await.expect("delete"); // 7

    let put = EventType::Put;
    let r = next(&mut prefix).await;
    assert_eq!(events(&r), vec![(put, "a1".into(), "v1".into(), 2)]);
    assert_eq!(r.header().map(|h| h.revision()), Some(2));
    assert_eq!(
        events(&next(&mut prefix).await),
        vec![(put, "a1".into(), "v5".into(), 6)]
    );
    assert_eq!(
        events(&next(&mut prefix).await),
        vec![(EventType::Delete, "a1".into(), String::new(), 7)]
    );
    assert_eq!(
        events(&next(&mut range).await),
        vec![(put, "b".into(), "v2".into(), 3)]
    );
    assert_eq!(
        events(&next(&mut range).await),
        vec![(put, "c9".into(), "v3".into(), 4)]
    );

    let deleted = next(&mut no_put).await;
    assert_eq!(
        events(&deleted),
        vec![(EventType::Delete, "a1".into(), String::new(), 7)]
    );
    let prev = deleted.events()[0].prev_kv().expect("prev_kv");
    assert_eq!((prev.value(), prev.mod_revision()), (&b"v5"[..], 6));

    let first = next(&mut no_delete).await;
    assert_eq!(events(&first), vec![(put, "a1".into(), "v1".into(), 2)]);
    assert!(first.events()[0].prev_kv().is_none());
    let second = next(&mut no_delete).await;
    assert_eq!(events(&second), vec![(put, "a1".into(), "v5".into(), 6)]);
    let prev = second.events()[0].prev_kv().expect("prev_kv");
    assert_eq!(prev.value(), b"v1");
}

#[tokio::test]
async fn a_txn_arrives_in_one_response() {
    let m = Member::start();
    let mut c = connect(&m).await;
    c.put("t0", "x", None).await.expect("put"); // 2
    let (_w, mut stream) = c
        .watch("t", Some(WatchOptions::new().with_prefix()))
        .await
        .expect("watch");
    let txn = Txn::new()
        .when([Compare::version("t0", CompareOp::Equal, 1)])
        .and_then([
            TxnOp::put("t1", "a", None),
            TxnOp::put("t2", "b", Some(PutOptions::new())),
            TxnOp::delete("t0", None),
        ]);
    assert!(c.txn(txn).await.expect("txn").succeeded());
    let resp = next(&mut stream).await;
    assert_eq!(
        events(&resp),
        vec![
            (EventType::Put, "t1".into(), "a".into(), 3),
            (EventType::Put, "t2".into(), "b".into(), 3),
            (EventType::Delete, "t0".into(), String::new(), 3),
        ]
    );
}

#[tokio::test]
async fn a_compacted_start_cancels_with_the_compact_revision() {
    let m = Member::start();
    let mut c = connect(&m).await;
    for i in 0..5 {
        c.put("k", format!("v{i}"), None).await.expect("put"); // 2..=6
    }
    c.compact(5, None).await.expect("compact");
    let (_w, mut stream) = c
        .watch("k", Some(WatchOptions::new().with_start_revision(3)))
        .await
        .expect("watch");
    let resp = next(&mut stream).await;
    assert!(resp.canceled(), "{resp:?}");
    assert_eq!(resp.compact_revision(), 5);
    // At the compact revision itself the history is still there.
    let (_w, mut stream) = c
        .watch("k", Some(WatchOptions::new().with_start_revision(5)))
        .await
        .expect("watch");
    let resp = next(&mut stream).await;
    assert_eq!(
        events(&resp).into_iter().map(|e| e.3).collect::<Vec<i64>>(),
        vec![5, 6]
    );
}

#[tokio::test]
async fn ids_cancel_and_progress_as_etcd_3_4() {
    let m = Member::start();
    let mut c = connect(&m).await;
    let (mut watcher, mut stream) = c
        .watch("x", Some(WatchOptions::new().with_watch_id(7)))
        .await
        .expect("watch");
    assert_eq!(watcher.watch_id(), 7);
    // Server-chosen IDs start at 0 on each stream.
    watcher.watch("y", None).await.expect("watch");
    let created = next(&mut stream).await;
    assert!(created.created() && created.watch_id() == 0, "{created:?}");
    // A client-chosen ID in use is refused: created, canceled, ID -1.
    watcher
        .watch("z", Some(WatchOptions::new().with_watch_id(7)))
        .await
        .expect("watch");
    let refused = next(&mut stream).await;
    assert!(refused.created() && refused.canceled(), "{refused:?}");
    assert_eq!(refused.watch_id(), -1);
    assert_eq!(
        refused.cancel_reason(),
        "mvcc: duplicate watch ID provided on the WatchStream"
    );

    c.put("q", "1", None).await.expect("put"); // 2
    watcher.request_progress().await.expect("progress");
    let progress = next(&mut stream).await;
    assert_eq!(progress.watch_id(), -1);
    assert!(progress.events().is_empty());
    assert_eq!(progress.header().map(|h| h.revision()), Some(2));

    watcher.cancel().await.expect("cancel");
    let cancelled = next(&mut stream).await;
    assert!(
        cancelled.canceled() && cancelled.watch_id() == 7,
        "{cancelled:?}"
    );
    c.put("x", "after", None).await.expect("put");
    c.put("y", "1", None).await.expect("put");
    let resp = next(&mut stream).await;
    assert_eq!(resp.watch_id(), 0, "no events for a cancelled watcher");
}

#[tokio::test]
async fn progress_notifications_come_at_the_interval() {
    let mut m = Member::start();
    m.kill();
    m.spawn(&["--experimental-watch-progress-notify-interval", "200ms"]);
    let mut c = connect(&m).await;
    let (watcher, mut stream) = c
        .watch("p", Some(WatchOptions::new().with_progress_notify()))
        .await
        .expect("watch");
    let resp = next(&mut stream).await;
    assert_eq!(resp.watch_id(), watcher.watch_id());
    assert!(resp.events().is_empty() && !resp.canceled(), "{resp:?}");
    assert_eq!(resp.header().map(|h| h.revision()), Some(1));
}

/// A client that closes its side of the stream (drops its request sender)
/// still gets its watchers' events, as from etcd, whose Watch ends only
/// when the client goes away; the member counts that end as Canceled.
#[tokio::test]
async fn a_half_closed_stream_still_delivers() {
    let m = Member::start();
    let mut c = connect(&m).await;
    let (watcher, mut stream) = c.watch("h", None).await.expect("watch");
    drop(watcher);
    c.put("h", "after", None).await.expect("put");
    let resp = next(&mut stream).await;
    assert_eq!(events(&resp)[0].2, "after");
    drop(stream);
    let canceled = "grpc_server_handled_total{grpc_code=\"Canceled\",grpc_method=\"Watch\",grpc_service=\"etcdserverpb.Watch\",grpc_type=\"bidi_stream\"} 1";
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !common::http::request(&m.endpoint(), "GET", "/metrics", "")
        .body
        .contains(canceled)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the watch not counted as Canceled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn etcdctl_watch_prints_as_etcd() {
    let m = Member::start();
    m.etcdctl_ok(&["put", "key", "value1"]);
    m.etcdctl_ok(&["put", "key", "value2"]);
    let mut child = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &m.endpoint(), "watch", "key", "--rev=1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcdctl is installed");
    m.etcdctl_ok(&["del", "key"]);
    let expected = "PUT\nkey\nvalue1\nPUT\nkey\nvalue2\nDELETE\nkey\n\n";
    let mut stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut text = Vec::new();
        let mut buf = [0u8; 256];
        while text.len() < expected.len() {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => text.extend_from_slice(&buf[..n]),
            }
        }
        String::from_utf8_lossy(&text).into_owned()
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !reader.is_finished() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    let text = reader.join().expect("reader");
    assert_eq!(text, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_watchers_all_receive_every_event() {
    const STREAMS: usize = 20;
    const PER_STREAM: usize = 500;
    const WRITES: i64 = 10;
    let m = Member::start();
    let mut c = connect(&m).await;
    let first = c
        .put("before", "x", None)
        .await
        .expect("put")
        .header()
        .expect("header")
        .revision()
        + 1;
    let expected: Vec<i64> = (first..first + WRITES).collect();
    let mut streams = Vec::new();
    for _ in 0..STREAMS {
        let mut client = c.clone();
        streams.push(tokio::spawn(async move {
            // All watchers start at the same revision, so a watcher created
            // after some writes catches up from the store: none is missed.
            let options = || WatchOptions::new().with_prefix().with_start_revision(first);
            let (mut watcher, mut stream) = client.watch("w/", Some(options())).await?;
            for _ in 1..PER_STREAM {
                watcher.watch("w/", Some(options())).await?;
            }
            let mut seen: std::collections::HashMap<i64, Vec<i64>> = Default::default();
            let mut events_seen = 0;
            while events_seen < PER_STREAM * WRITES as usize {
                let resp = tokio::time::timeout(Duration::from_secs(60), stream.message())
                    .await
                    .map_err(|_| etcd_client::Error::WatchError("no event within 60 s".into()))??
                    .ok_or_else(|| etcd_client::Error::WatchError("stream closed".into()))?;
                for e in resp.events() {
                    let rev = e.kv().map_or(0, |kv| kv.mod_revision());
                    seen.entry(resp.watch_id()).or_default().push(rev);
                    events_seen += 1;
                }
            }
            drop(watcher);
            Ok::<_, etcd_client::Error>(seen)
        }));
    }
    for i in 0..WRITES {
        c.put(format!("w/{i}"), "v", None).await.expect("put");
    }
    let mut watchers = 0;
    for stream in streams {
        let seen = stream.await.expect("task").expect("watch stream");
        assert_eq!(
            seen.len(),
            PER_STREAM,
            "every watcher of the stream got events"
        );
        for revisions in seen.values() {
            assert_eq!(revisions, &expected, "every event, once, in order");
        }
        watchers += seen.len();
    }
    assert_eq!(watchers, STREAMS * PER_STREAM);
}
