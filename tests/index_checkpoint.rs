//! A member restarts from its key index checkpoint: after a clean stop
//! (which writes one) and after a kill -9 with revisions stored since, the
//! keys, their revisions and versions, deletes, leases and the compaction
//! are as before, at the head and at past revisions.

mod common;

use std::time::Duration;

use common::Member;
use etcd_client::{Client, Compare, CompareOp, DeleteOptions, GetOptions, PutOptions, Txn, TxnOp};

/// Every key at `revision` (0: the head) with what etcd reports of it.
async fn dump(c: &mut Client, revision: i64) -> Result<Vec<String>, String> {
    let resp = c
        .get(
            "",
            Some(GetOptions::new().with_from_key().with_revision(revision)),
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(resp
        .kvs()
        .iter()
        .map(|kv| {
            format!(
                "{}={} create {} mod {} version {} lease {}",
                String::from_utf8_lossy(kv.key()),
                String::from_utf8_lossy(kv.value()),
                kv.create_revision(),
                kv.mod_revision(),
                kv.version(),
                kv.lease()
            )
        })
        .collect())
}

/// What a client sees of the store: the head revision, and every key at
/// every revision from `from` on (the errors of those compacted or in the
/// future).
type History = (i64, Vec<(i64, Result<Vec<String>, String>)>);

async fn history(c: &mut Client, from: i64) -> History {
    let head = c
        .get("x", None)
        .await
        .expect("get")
        .header()
        .expect("header")
        .revision();
    let mut all = Vec::new();
    for revision in from..=head + 1 {
        // The error's metadata carries the time: compare the message.
        let found = dump(c, revision)
            .await
            .map_err(|e| e.split(", details").next().unwrap_or_default().to_owned());
        all.push((revision, found));
    }
    (head, all)
}

fn same(got: &History, want: &History) {
    assert_eq!(got.0, want.0, "head revision");
    for (g, w) in got.1.iter().zip(&want.1) {
        assert_eq!(g, w, "at revision {}", w.0);
    }
    assert_eq!(got.1.len(), want.1.len());
}

/// Puts, deletes and a txn over a few keys, numbered by `round`.
async fn changes(c: &mut Client, round: u32, lease: i64) {
    for i in 0..6 {
        let key = format!("k{}", (round + i) % 10);
        c.put(key, format!("{round}.{i}"), None).await.expect("put");
    }
    c.put(
        format!("leased{}", round % 3),
        "v",
        Some(PutOptions::new().with_lease(lease)),
    )
    .await
    .expect("put with a lease");
    c.txn(
        Txn::new()
            .when([Compare::version("k1", CompareOp::Greater, 0)])
            .and_then([
                TxnOp::put("t1", round.to_string(), None),
                TxnOp::delete("k2", None),
                TxnOp::put("t2", round.to_string(), None),
            ]),
    )
    .await
    .expect("txn");
    c.delete(format!("k{}", round % 10), None)
        .await
        .expect("delete");
    if round % 4 == 3 {
        c.delete("t", Some(DeleteOptions::new().with_prefix()))
            .await
            .expect("delete a prefix");
    }
}

fn opened_lines(m: &Member) -> Vec<String> {
    m.log_text()
        .lines()
        .filter(|l| l.contains("opened mvcc store"))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_from_the_checkpoint_after_a_stop_and_after_kill_9() {
    let mut m = Member::start();
    let mut c = Client::connect([m.endpoint()], None)
        .await
        .expect("connect");
    let lease = c.lease_grant(3600, None).await.expect("grant").id();
    for round in 0..8 {
        changes(&mut c, round, lease).await;
    }
    let compact_at = c
        .get("x", None)
        .await
        .expect("get")
        .header()
        .expect("header")
        .revision()
        - 10;
    c.compact(compact_at, None).await.expect("compact");
    for round in 8..12 {
        changes(&mut c, round, lease).await;
    }
    let before_stop = history(&mut c, compact_at - 1).await;
    drop(c);

    // A clean stop writes a checkpoint; the start reads it back.
    assert!(
        m.interrupt(Duration::from_secs(20)).is_some(),
        "the member stopped"
    );
    m.spawn(&[]);
    let opened = opened_lines(&m);
    assert!(
        opened
            .last()
            .is_some_and(|l| l.contains("from_checkpoint=true") && l.contains("revisions_read=0")),
        "{opened:?}"
    );
    let mut c = Client::connect([m.endpoint()], None)
        .await
        .expect("connect");
    same(&history(&mut c, compact_at - 1).await, &before_stop);

    // Revisions after the checkpoint, then kill -9: the start reads the
    // checkpoint and those revisions.
    for round in 12..16 {
        changes(&mut c, round, lease).await;
    }
    let before_kill = history(&mut c, compact_at - 1).await;
    drop(c);
    m.kill();
    m.spawn(&[]);
    let opened = opened_lines(&m);
    let last = opened.last().cloned().unwrap_or_default();
    assert!(
        last.contains("from_checkpoint=true") && !last.contains("revisions_read=0"),
        "{opened:?}"
    );
    let mut c = Client::connect([m.endpoint()], None)
        .await
        .expect("connect");
    same(&history(&mut c, compact_at - 1).await, &before_kill);
    // Below the compaction: refused as before.
    assert!(dump(&mut c, compact_at - 1).await.is_err());
    // The lease still holds its keys: revoking it deletes them.
    c.lease_revoke(lease).await.expect("revoke");
    let leased = c
        .get("leased", Some(GetOptions::new().with_prefix()))
        .await
        .expect("get");
    assert_eq!(leased.count(), 0);
}
