//! `--shards N`: the keyspace split into N raft groups whose writes the
//! cluster group sequences (docs/sharding.md), served through etcd's API as
//! one store: dense revisions in real-time order, ranges over every shard
//! merged at one revision, history, txns, restarts, keys attached to
//! leases on every shard and revoked at one revision, txns over keys of
//! several shards at one revision (etcdctl's lock among them), watches over
//! every shard on every member; HashKV, `snapshot save` (and its restore
//! into one store), defragmentation and the quota over every shard; and
//! what is not built yet refused with a clear error rather than answered
//! wrong.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::cluster::{Cluster, connect};
use etcd_client::{
    Client, Compare, CompareOp, DeleteOptions, Error, Event, EventType, GetOptions, PutOptions,
    SortOrder, SortTarget, Txn, TxnOp, WatchOptions, WatchStream,
};
use tokio::task::JoinSet;

/// Events of `stream` until one at `last` or later: (revision, key, put),
/// in the order they came.
async fn watch_until(stream: &mut WatchStream, last: i64) -> Vec<(i64, String, bool)> {
    watch_until_with(stream, last, |event| event.event_type() == EventType::Put).await
}

/// Events of `stream` until one at `last` or later: (revision, key, what
/// `about` says of the event), in the order they came.
async fn watch_until_with<T: std::fmt::Debug>(
    stream: &mut WatchStream,
    last: i64,
    about: impl Fn(&Event) -> T,
) -> Vec<(i64, String, T)> {
    let mut seen: Vec<(i64, String, T)> = Vec::new();
    while seen.last().is_none_or(|e| e.0 < last) {
        let Ok(message) = tokio::time::timeout(Duration::from_secs(20), stream.message()).await
        else {
            panic!("no event within 20 s after {:?}", seen.last());
        };
        let resp = message.expect("watch stream").expect("watch stream open");
        assert!(!resp.canceled(), "{resp:?}");
        for event in resp.events() {
            let kv = event.kv().expect("an event's key");
            seen.push((
                kv.mod_revision(),
                String::from_utf8_lossy(kv.key()).into_owned(),
                about(event),
            ));
        }
    }
    seen
}

/// A watch over every key from `from`.
async fn watch_all(client: &mut Client, from: i64) -> WatchStream {
    let options = WatchOptions::new()
        .with_all_keys()
        .with_start_revision(from);
    client.watch("", Some(options)).await.expect("watch").1
}

/// A refusal of what --shards does not do yet: gRPC's Unimplemented.
fn unimplemented(e: Option<Error>) -> Option<String> {
    match e {
        Some(Error::GRpcStatus(s)) if format!("{:?}", s.code()) == "Unimplemented" => {
            Some(s.message().to_string())
        }
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_sharded_member_serves_the_keyspace_as_one_store() {
    let mut c = Cluster::start_with(1, &["--shards", "8"]);
    let mut client = c.client(0).await;
    let (_watcher, mut live) = client
        .watch("/registry/", Some(WatchOptions::new().with_prefix()))
        .await
        .expect("watch");

    // Forty keys land on all eight shards; each put takes the next
    // revision of the whole keyspace.
    let keys: Vec<String> = (0..40).map(|i| format!("/registry/k{i:02}")).collect();
    for (i, key) in keys.iter().enumerate() {
        let put = client
            .put(key.as_str(), format!("v{i}"), None)
            .await
            .unwrap_or_else(|e| panic!("put {key}: {e}"));
        assert_eq!(put.header().map(|h| h.revision()), Some(i as i64 + 2));
    }

    // A prefix range merges every shard's keys in order, at one revision,
    // with etcd's limit, count and sort.
    let all = client
        .get("/registry/", Some(GetOptions::new().with_prefix()))
        .await
        .expect("prefix range");
    let got: Vec<String> = all
        .kvs()
        .iter()
        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
        .collect();
    assert_eq!(got, keys, "every key, sorted");
    assert_eq!(all.header().map(|h| h.revision()), Some(41));
    let limited = client
        .get(
            "/registry/",
            Some(GetOptions::new().with_prefix().with_limit(5)),
        )
        .await
        .expect("limited range");
    assert_eq!(limited.kvs().len(), 5);
    assert!(limited.more());
    assert_eq!(limited.count(), 40);
    assert_eq!(limited.kvs()[4].key(), keys[4].as_bytes());
    let newest = client
        .get(
            "/registry/",
            Some(
                GetOptions::new()
                    .with_prefix()
                    .with_sort(SortTarget::Mod, SortOrder::Descend)
                    .with_limit(1),
            ),
        )
        .await
        .expect("sorted range");
    assert_eq!(newest.kvs()[0].key(), keys[39].as_bytes());

    // A txn on one shard: its compare sees the key's revision, and the
    // write takes the next revision.
    let key = keys[7].as_str();
    let txn = Txn::new()
        .when([Compare::mod_revision(key, CompareOp::Equal, 9)])
        .and_then([TxnOp::put(key, "changed", None)]);
    let done = client.txn(txn).await.expect("txn");
    assert!(done.succeeded());
    assert_eq!(done.header().map(|h| h.revision()), Some(42));

    // History at an older revision, and a serializable read.
    let old = client
        .get(key, Some(GetOptions::new().with_revision(20)))
        .await
        .expect("historical get");
    assert_eq!(old.kvs()[0].value(), b"v7");
    let local = client
        .get(key, Some(GetOptions::new().with_serializable()))
        .await
        .expect("serializable get");
    assert_eq!(local.kvs()[0].value(), b"changed");

    // A delete over a prefix touches every shard: one that finds nothing
    // takes no revision.
    let none = client
        .delete("/nothing/", Some(DeleteOptions::new().with_prefix()))
        .await
        .expect("delete over every shard");
    assert_eq!(none.deleted(), 0);
    assert_eq!(none.header().map(|h| h.revision()), Some(42));
    // What is not built yet is refused, and changes nothing: nested txns
    // over keys of several shards.
    let nested = Txn::new().and_then([TxnOp::txn(
        Txn::new().and_then([TxnOp::put("/registry/", "x", None), TxnOp::get(key, None)]),
    )]);
    let spanning = client.txn(nested).await.err();
    assert_eq!(
        unimplemented(spanning).as_deref(),
        Some("cairn: a txn with nested txns over keys of several shards is not supported")
    );
    // A put naming a lease that does not exist is refused as etcd refuses
    // it, and takes no revision.
    let unknown = client
        .put("leased", "v", Some(PutOptions::new().with_lease(0x1234)))
        .await
        .err()
        .map(|e| e.to_string());
    assert!(
        unknown
            .as_deref()
            .is_some_and(|e| e.contains("etcdserver: requested lease not found")),
        "{unknown:?}"
    );
    let one = client.delete(keys[0].as_str(), None).await.expect("delete");
    assert_eq!(one.deleted(), 1);
    assert_eq!(one.header().map(|h| h.revision()), Some(43));

    // Watchers see every write of every shard once, in revision order: the
    // one that watched all along, and one reading the history.
    let expected: Vec<(i64, String, bool)> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| (i as i64 + 2, k.clone(), true))
        .chain([(42, keys[7].clone(), true), (43, keys[0].clone(), false)])
        .collect();
    assert_eq!(watch_until(&mut live, 43).await, expected);
    let mut history = watch_all(&mut client, 2).await;
    assert_eq!(watch_until(&mut history, 43).await, expected);

    // Compaction: the keyspace's older revisions are gone for reads and
    // watches, from every shard.
    client.compact(30, None).await.expect("compact at 30");
    let compacted = client
        .get(key, Some(GetOptions::new().with_revision(20)))
        .await
        .err()
        .map(|e| e.to_string());
    assert!(
        compacted
            .as_deref()
            .is_some_and(|e| e.contains("required revision has been compacted")),
        "{compacted:?}"
    );
    let at_compaction = client
        .get(
            "/registry/",
            Some(GetOptions::new().with_prefix().with_revision(30)),
        )
        .await
        .expect("a range at the compact revision");
    assert_eq!(at_compaction.count(), 29);
    let again = client.compact(25, None).await.err().map(|e| e.to_string());
    assert!(
        again.as_deref().is_some_and(|e| e.contains("compacted")),
        "{again:?}"
    );
    let future = client
        .compact(1000, None)
        .await
        .err()
        .map(|e| e.to_string());
    assert!(
        future
            .as_deref()
            .is_some_and(|e| e.contains("future revision")),
        "{future:?}"
    );
    let (_w, mut too_old) = client
        .watch(
            "",
            Some(WatchOptions::new().with_all_keys().with_start_revision(10)),
        )
        .await
        .expect("watch");
    let cancelled = tokio::time::timeout(Duration::from_secs(10), too_old.message())
        .await
        .expect("an answer to a compacted watch")
        .expect("watch stream")
        .expect("watch stream open");
    assert!(cancelled.canceled());
    assert_eq!(cancelled.compact_revision(), 30);

    // A restart keeps the keys and the revision; the next write follows.
    c.kill(0);
    c.restart(0);
    let mut client = c.client(0).await;
    let after = client
        .get("/registry/", Some(GetOptions::new().with_prefix()))
        .await
        .expect("range after restart");
    assert_eq!(after.count(), 39);
    assert_eq!(after.header().map(|h| h.revision()), Some(43));
    let mut after_restart = watch_all(&mut client, 0).await;
    let next = client.put("after", "restart", None).await.expect("put");
    assert_eq!(next.header().map(|h| h.revision()), Some(44));
    assert_eq!(
        watch_until(&mut after_restart, 44).await,
        [(44, "after".to_string(), true)]
    );
    let mut history = watch_all(&mut client, 40).await;
    assert_eq!(watch_until(&mut history, 44).await.len(), 5);
    let still_compacted = client
        .get(key, Some(GetOptions::new().with_revision(29)))
        .await
        .err()
        .map(|e| e.to_string());
    assert!(
        still_compacted
            .as_deref()
            .is_some_and(|e| e.contains("compacted")),
        "{still_compacted:?}"
    );
}

/// Writes through every member of a three-member cluster with four shards
/// while a member is killed and started again: every acknowledged put is
/// read back through another member, no revision is given twice, and the
/// revisions are dense; the members end with the same data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sharded_members_give_dense_revisions_through_a_restart() {
    let mut c = Cluster::start_with(3, &["--shards", "4"]);
    c.wait_leader(Duration::from_secs(10)).await;
    let mut watching = c.client(0).await;
    let mut live = watch_all(&mut watching, 0).await;
    let endpoints = c.endpoints();
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<BTreeMap<i64, String>>> = Arc::default();
    let mut writers = JoinSet::new();
    for w in 0..6 {
        let endpoints = endpoints.clone();
        let (stop, acked) = (stop.clone(), acked.clone());
        writers.spawn(async move {
            let mut clients = Vec::new();
            for e in &endpoints {
                clients.push(connect(e, Duration::from_secs(2)).await);
            }
            let mut current = w % clients.len();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("w{w}/{i:05}");
                i += 1;
                let put = clients[current].put(key.as_str(), "v", None);
                match tokio::time::timeout(Duration::from_secs(10), put).await {
                    Ok(Ok(put)) => {
                        let revision = put.header().map_or(0, |h| h.revision());
                        // Read back through another member: a linearizable
                        // read sees the acknowledged write.
                        let reader = (current + 1) % clients.len();
                        let get = clients[reader].get(key.as_str(), None);
                        if let Ok(Ok(got)) =
                            tokio::time::timeout(Duration::from_secs(10), get).await
                        {
                            assert_eq!(
                                got.kvs().first().map(|kv| kv.mod_revision()),
                                Some(revision),
                                "{key} read through m{reader} after its put at {revision}"
                            );
                        }
                        let earlier = acked.lock().expect("acked").insert(revision, key);
                        assert_eq!(earlier, None, "revision {revision} given twice");
                    }
                    // Each key is written once, so a put that failed here
                    // but was applied keeps its own revision.
                    _ => {
                        current = (current + 1) % clients.len();
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = acked.lock().expect("acked").len();
    assert!(before > 0, "the writers write");
    c.kill(1);
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.restart(1);
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);
    while let Some(done) = writers.join_next().await {
        done.expect("a writer panicked");
    }
    let acked = acked.lock().expect("acked").clone();
    assert!(acked.len() > before, "writes go on through the restart");

    let dump = c.wait_converged(&[0, 1, 2], Duration::from_secs(30)).await;
    // Every acknowledged put is there at its revision, and revisions are
    // dense: each of 2..=last belongs to exactly one key.
    let by_revision: BTreeMap<i64, &String> =
        dump.kvs.iter().map(|(k, (_, _, m, _))| (*m, k)).collect();
    for (revision, key) in &acked {
        assert_eq!(by_revision.get(revision), Some(&key), "{key} at {revision}");
    }
    let revisions: BTreeSet<i64> = by_revision.keys().copied().collect();
    let dense: BTreeSet<i64> = (2..=dump.revision).collect();
    assert_eq!(revisions, dense, "one key per revision, no gaps");

    // A watcher through a member that never stopped saw every revision
    // once, in order; so does one reading the history through the member
    // that restarted.
    let in_order: Vec<(i64, String, bool)> = by_revision
        .iter()
        .map(|(r, k)| (*r, k.to_string(), true))
        .collect();
    assert_eq!(watch_until(&mut live, dump.revision).await, in_order);
    let mut restarted = c.client(1).await;
    let mut history = watch_all(&mut restarted, 2).await;
    assert_eq!(watch_until(&mut history, dump.revision).await, in_order);
}

/// `--shard-replicas 3` on five members: each shard on three of them (the
/// placement recorded in every member's data dir), and every member serving
/// the whole keyspace, reading and writing the shards it does not hold
/// through members that hold them; watches only over what a member holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_members_hold_three_replicas_of_each_shard_and_serve_every_key() {
    const SHARDS: usize = 8;
    let mut c = Cluster::start_with(5, &["--shards", "8", "--shard-replicas", "3"]);
    c.wait_leader(Duration::from_secs(10)).await;

    // The placement: the same on every member, three replicas per shard,
    // each member holding 4 or 5 of the 24; and a member keeps a store
    // only for the shards it holds.
    let map_of = |i: usize| {
        let text = std::fs::read_to_string(c.node(i).data_dir.join("member/shard-map"))
            .expect("the shard map");
        serde_json::from_str::<serde_json::Value>(&text).expect("the shard map is JSON")
    };
    let map = map_of(0);
    let shards = map["shards"].as_array().expect("shards").clone();
    assert_eq!(shards.len(), SHARDS);
    for i in 1..5 {
        assert_eq!(map_of(i), map, "m{i}'s shard map");
    }
    let held_dirs = |i: usize| {
        std::fs::read_dir(c.node(i).data_dir.join("member/shards"))
            .map(|dir| dir.count())
            .unwrap_or(0)
    };
    let mut held_total = 0;
    for i in 0..5 {
        let held = held_dirs(i);
        assert!((4..=5).contains(&held), "m{i} holds {held} shards");
        held_total += held;
    }
    assert_eq!(held_total, SHARDS * 3);
    for shard in &shards {
        assert_eq!(shard["replicas"].as_array().map(Vec::len), Some(3));
    }

    // Writes through every member get dense revisions in order.
    let mut clients = Vec::new();
    for i in 0..5 {
        clients.push(c.client(i).await);
    }
    let mut last = 0;
    for i in 0..60 {
        let key = format!("k{i:02}");
        let put = clients[i % 5]
            .put(key.as_str(), format!("v{i}"), None)
            .await
            .unwrap_or_else(|e| panic!("put {key} through m{}: {e}", i % 5));
        let revision = put.header().map_or(0, |h| h.revision());
        assert_eq!(revision, i as i64 + 2, "{key}'s revision");
        last = revision;
    }
    // Every member reads every key, linearizable and serializable, at its
    // revision.
    for (m, client) in clients.iter_mut().enumerate() {
        for i in (0..60).step_by(7) {
            let key = format!("k{i:02}");
            for options in [None, Some(GetOptions::new().with_serializable())] {
                let got = client.get(key.as_str(), options).await.expect("get");
                let kv = got.kvs().first().unwrap_or_else(|| panic!("{key} on m{m}"));
                assert_eq!(kv.value(), format!("v{i}").as_bytes());
                assert_eq!(kv.mod_revision(), i as i64 + 2, "{key} on m{m}");
            }
        }
        // A range over every shard, merged at one revision.
        let all = client
            .get("k", Some(GetOptions::new().with_prefix()))
            .await
            .expect("prefix range");
        assert_eq!(all.count(), 60, "m{m}");
        assert_eq!(all.header().map(|h| h.revision()), Some(last));
        let keys: Vec<String> = all
            .kvs()
            .iter()
            .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
            .collect();
        let sorted: Vec<String> = (0..60).map(|i| format!("k{i:02}")).collect();
        assert_eq!(keys, sorted, "m{m}");
        let page = client
            .get(
                "k",
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_limit(10)
                        .with_revision(31),
                ),
            )
            .await
            .expect("a page of history");
        let page_keys: Vec<String> = page
            .kvs()
            .iter()
            .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
            .collect();
        assert_eq!(page_keys, sorted[..10], "m{m}");
        assert_eq!(page.count(), 30, "keys at revision 31 on m{m}");
        assert!(page.more());
    }

    // The listing: each member's /shards tells where every shard is and
    // its own replicas' state; `cairn shards` puts the members' together.
    let listed = common::http::request(&c.endpoint(0), "GET", "/shards", "").json();
    assert_eq!(listed["shard_count"], SHARDS);
    let listed = listed["shards"].as_array().expect("shards").clone();
    assert_eq!(listed.len(), SHARDS);
    let held_here = listed.iter().filter(|s| !s["replica"].is_null()).count();
    assert_eq!(held_here, held_dirs(0), "m0's replicas in /shards");
    for (shard, placed) in listed.iter().zip(&shards) {
        let replicas: Vec<u64> = shard["replicas"]
            .as_array()
            .expect("replicas")
            .iter()
            .map(|id| u64::from_str_radix(id.as_str().expect("hex ID"), 16).expect("hex ID"))
            .collect();
        let placed: Vec<u64> = placed["replicas"]
            .as_array()
            .expect("placed replicas")
            .iter()
            .map(|id| id.as_u64().expect("an ID"))
            .collect();
        assert_eq!(replicas, placed, "shard {}'s replicas", shard["shard"]);
    }
    let metrics = common::http::request(&c.endpoint(0), "GET", "/metrics", "").body;
    let shard_keys = metrics
        .lines()
        .filter(|l| l.starts_with("cairn_shard_keys_total{shard="))
        .count();
    assert_eq!(shard_keys, held_dirs(0), "m0's per-shard metrics");
    let endpoints: Vec<String> = (0..5).map(|i| c.node(i).client_url()).collect();
    let out = std::process::Command::new(common::cluster::server_binary())
        .args(["shards", "--endpoints", &endpoints.join(",")])
        .output()
        .expect("cairn shards");
    assert!(
        out.status.success(),
        "cairn shards: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    let rows: Vec<Vec<&str>> = table
        .lines()
        .skip(1)
        .map(|line| line.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), SHARDS, "{table}");
    // Columns: shard, the keys' rule (5 words), replicas, leader, term,
    // applied, revision, key count, bytes.
    let mut keys = 0;
    for row in &rows {
        assert_eq!(row.len(), 13, "{table}");
        assert_eq!(row[6].split(',').count(), 3, "{table}");
        assert_ne!(row[7], "0", "a shard without a leader: {table}");
        keys += row[11].parse::<u64>().expect("a key count");
    }
    assert_eq!(keys, 60, "{table}");

    // A compare-and-put through each member, whether it holds the key or not.
    for (m, client) in clients.iter_mut().enumerate() {
        let key = "k00";
        let current = client.get(key, None).await.expect("get");
        let revision = current.kvs()[0].mod_revision();
        let swap = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, revision)])
            .and_then([TxnOp::put(key, format!("m{m}"), None)]);
        let done = client.txn(swap).await.expect("txn");
        assert!(done.succeeded(), "compare-and-put through m{m}");
        let stale = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, revision)])
            .and_then([TxnOp::put(key, "stale", None)]);
        assert!(!client.txn(stale).await.expect("txn").succeeded());
    }

    // A watch of one key is taken by every member, whether it holds the
    // key's shard or follows it, and sees the next put whichever member
    // takes it.
    let mut watching = Vec::new();
    for (m, client) in clients.iter_mut().enumerate() {
        let (watcher, stream) = client.watch("k05", None).await.expect("watch");
        assert_ne!(watcher.watch_id(), -1, "a watch of k05 on m{m}");
        watching.push((m, stream));
    }
    let put = clients[4].put("k05", "watched", None).await.expect("put");
    let revision = put.header().map_or(0, |h| h.revision());
    for (m, stream) in &mut watching {
        let seen = watch_until(stream, revision).await;
        assert_eq!(seen, [(revision, "k05".to_string(), true)], "m{m}");
    }

    // A member killed: the others keep reading and writing every key
    // through the replicas left; restarted, it serves them all again.
    // A write whose shard's leader was the killed member may time out
    // while the shard elects another: it is retried, as clients do, and
    // writes the same value.
    c.kill(2);
    for i in 0..20 {
        let key = format!("after/{i}");
        let client = &mut clients[[0, 1, 3, 4][i % 4]];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while let Err(e) = client.put(key.as_str(), "v", None).await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "put {key} with m2 down: {e}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let through_m0 = clients[0]
        .get(
            "after/",
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .expect("count");
    assert_eq!(through_m0.count(), 20);
    c.restart(2);
    let dump = c
        .wait_converged(&[0, 1, 2, 3, 4], Duration::from_secs(30))
        .await;
    assert_eq!(dump.kvs.len(), 80);
    assert_eq!(dump.kvs["k00"].0, "m4");
}

/// (revision, key, put) of each of `events`, for comparing watches.
fn revisions(events: &[(i64, String, bool)]) -> Vec<i64> {
    events.iter().map(|e| e.0).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_over_every_shard_on_every_member_see_each_revision_once_through_a_kill() {
    let mut c = Cluster::start_with(5, &["--shards", "8", "--shard-replicas", "3"]);
    c.wait_leader(Duration::from_secs(10)).await;
    let mut clients = Vec::new();
    for i in 0..5 {
        clients.push(c.client(i).await);
    }
    // Live watchers on every member before the writes; no member holds
    // every shard, so each follows some through the others.
    let mut live = Vec::new();
    for client in &mut clients {
        let options = WatchOptions::new().with_all_keys();
        let (watcher, stream) = client.watch("", Some(options)).await.expect("watch");
        assert_ne!(watcher.watch_id(), -1);
        live.push(stream);
    }
    // Puts and deletes of keys of every shard through every member: one
    // revision each, 2 to 81.
    let mut written = Vec::new();
    for i in 0..80 {
        let key = format!("k{:02}", i % 50);
        let client = &mut clients[i % 5];
        let revision = if i < 50 || i % 3 != 0 {
            let put = client.put(key.as_str(), format!("v{i}"), None).await;
            put.expect("put").header().map_or(0, |h| h.revision())
        } else {
            let delete = client.delete(key.as_str(), None).await.expect("delete");
            assert_eq!(delete.deleted(), 1, "{key}");
            delete.header().map_or(0, |h| h.revision())
        };
        assert_eq!(revision, i as i64 + 2);
        written.push((revision, key, i < 50 || i % 3 != 0));
    }
    let last = written.last().map_or(0, |w| w.0);
    for (m, stream) in live.iter_mut().enumerate() {
        assert_eq!(watch_until(stream, last).await, written, "live on m{m}");
    }
    // From revision 1 on every member: history read from the members
    // holding each shard, merged, each revision once and in order.
    for (m, client) in clients.iter_mut().enumerate() {
        let mut stream = watch_all(client, 1).await;
        assert_eq!(
            watch_until(&mut stream, last).await,
            written,
            "from 1 on m{m}"
        );
    }
    // A member holding some shards killed: the other members' watchers
    // go on (feeds from it move to another replica), and a watcher of
    // the killed member reconnects to another from where it was, as a
    // client does.
    c.kill(2);
    let mut more = Vec::new();
    for i in 0..20 {
        let key = format!("after/{i}");
        let client = &mut clients[[0, 1, 3, 4][i % 4]];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let revision = loop {
            match client.put(key.as_str(), "v", None).await {
                Ok(put) => break put.header().map_or(0, |h| h.revision()),
                Err(e) => assert!(
                    tokio::time::Instant::now() < deadline,
                    "put {key} with m2 down: {e}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        more.push((revision, key, true));
    }
    // A put retried after a timeout may have been applied twice.
    let end = more.last().map_or(0, |w| w.0);
    for m in [0, 1, 3, 4] {
        let seen = watch_until(&mut live[m], end).await;
        let revs = revisions(&seen);
        assert_eq!(
            revs,
            ((last + 1)..=end).collect::<Vec<_>>(),
            "m{m} after the kill"
        );
        for put in &more {
            assert!(seen.contains(put), "m{m} missed {put:?}");
        }
    }
    // m2's watcher had everything through `last`: it resumes on m0.
    let mut resumed = watch_all(&mut clients[0], last + 1).await;
    let seen = watch_until(&mut resumed, end).await;
    assert_eq!(revisions(&seen), ((last + 1)..=end).collect::<Vec<_>>());
}

/// The shards of m`member` that hold keys, from its `/shards` listing.
fn shards_with_keys(c: &Cluster, member: usize) -> usize {
    let listed = common::http::request(&c.endpoint(member), "GET", "/shards", "").json();
    listed["shards"]
        .as_array()
        .expect("shards")
        .iter()
        .filter(|s| s["replica"]["key_count"].as_u64().unwrap_or(0) > 0)
        .count()
}

/// The keys of lease `id` as TimeToLive lists them, sorted.
async fn lease_keys(client: &mut Client, id: i64) -> Vec<String> {
    let options = etcd_client::LeaseTimeToLiveOptions::new().with_keys();
    let ttl = client
        .lease_time_to_live(id, Some(options))
        .await
        .expect("lease time to live");
    let mut keys: Vec<String> = ttl
        .keys()
        .iter()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect();
    keys.sort();
    keys
}

/// Leases over shards, on three members with four shards (every member
/// holding every shard): keys of one lease put on several shards through
/// different members, listed by TimeToLive, revoked at one revision that
/// watchers see each delete at once; a lease that expires takes its keys on
/// every shard the same way; a put with a lease that does not exist is
/// refused as etcd refuses it; and a member killed while a revoke is
/// applied comes back with the revoke applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_attach_keys_on_every_shard_and_revoke_them_at_one_revision() {
    let mut c = Cluster::start_with(3, &["--shards", "4"]);
    c.wait_leader(Duration::from_secs(10)).await;
    let mut clients = Vec::new();
    for i in 0..3 {
        clients.push(c.client(i).await);
    }
    let lease = clients[0]
        .lease_grant(600, None)
        .await
        .expect("lease grant")
        .id();
    let start = clients[1]
        .put("plain", "v", None)
        .await
        .expect("put")
        .header()
        .map_or(0, |h| h.revision());
    let mut live = watch_all(&mut clients[1], start + 1).await;

    // Twelve keys of the lease, through every member, land on several
    // shards.
    let keys: Vec<String> = (0..12).map(|i| format!("leased/{i:02}")).collect();
    let mut put_revisions = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        let put = clients[i % 3]
            .put(key.as_str(), "v", Some(PutOptions::new().with_lease(lease)))
            .await
            .unwrap_or_else(|e| panic!("put {key} with its lease: {e}"));
        put_revisions.push(put.header().map_or(0, |h| h.revision()));
    }
    assert_eq!(put_revisions, (start + 1..=start + 12).collect::<Vec<_>>());
    assert!(
        shards_with_keys(&c, 0) >= 2,
        "the keys are on several shards"
    );
    for client in &mut clients {
        assert_eq!(lease_keys(client, lease).await, keys);
        let got = client
            .get("leased/00", None)
            .await
            .expect("get a leased key");
        assert_eq!(got.kvs()[0].lease(), lease);
    }
    let leases = clients[2].leases().await.expect("lease leases");
    assert!(leases.leases().iter().any(|l| l.id() == lease));
    // A put with a lease that does not exist, on any shard: refused.
    for (i, client) in clients.iter_mut().enumerate() {
        let refused = client
            .put(
                format!("nolease/{i}"),
                "v",
                Some(PutOptions::new().with_lease(lease + 1)),
            )
            .await
            .err()
            .map(|e| e.to_string());
        assert!(
            refused
                .as_deref()
                .is_some_and(|e| e.contains("etcdserver: requested lease not found")),
            "{refused:?}"
        );
    }

    // Revoked through another member: every key, on every shard, deleted
    // at one revision, the next one.
    let revoked = clients[2]
        .lease_revoke(lease)
        .await
        .expect("revoke")
        .header()
        .map_or(0, |h| h.revision());
    assert_eq!(revoked, start + 13, "the revoke takes one revision");
    for (m, client) in clients.iter_mut().enumerate() {
        let left = client
            .get("leased/", Some(GetOptions::new().with_prefix()))
            .await
            .expect("range");
        assert_eq!(left.count(), 0, "m{m} after the revoke");
        assert!(left.header().map_or(0, |h| h.revision()) >= revoked);
        let gone = client
            .lease_time_to_live(lease, None)
            .await
            .expect("time to live");
        assert_eq!(gone.ttl(), -1, "m{m}");
    }
    let mut expected: Vec<(i64, String, bool)> = keys
        .iter()
        .zip(&put_revisions)
        .map(|(k, r)| (*r, k.clone(), true))
        .collect();
    let mut deletes: Vec<(i64, String, bool)> =
        keys.iter().map(|k| (revoked, k.clone(), false)).collect();
    let mut seen = watch_until(&mut live, revoked).await;
    // Every delete at the revoke's revision, once: in whichever order the
    // shards' parts come.
    seen[12..].sort();
    deletes.sort();
    expected.extend(deletes);
    assert_eq!(seen, expected);
    let mut history = watch_all(&mut clients[0], start + 1).await;
    let mut replayed = watch_until(&mut history, revoked).await;
    replayed[12..].sort();
    assert_eq!(replayed, expected);

    // Revoking a lease without keys takes no revision, as etcd's.
    let empty = clients[0].lease_grant(600, None).await.expect("grant").id();
    let no_keys = clients[1]
        .lease_revoke(empty)
        .await
        .expect("revoke")
        .header()
        .map_or(0, |h| h.revision());
    assert_eq!(no_keys, revoked);

    // A lease that expires takes its keys on every shard at one revision.
    let short = clients[0].lease_grant(5, None).await.expect("grant").id();
    let mut last = revoked;
    for i in 0..8 {
        let put = clients[i % 3]
            .put(
                format!("expiring/{i}"),
                "v",
                Some(PutOptions::new().with_lease(short)),
            )
            .await
            .expect("put with a short lease");
        last = put.header().map_or(0, |h| h.revision());
    }
    assert_eq!(last, revoked + 8);
    let expired = watch_until(&mut live, last + 1).await;
    let expiry: BTreeSet<i64> = expired[8..].iter().map(|e| e.0).collect();
    assert_eq!(expiry, BTreeSet::from([last + 1]), "{expired:?}");
    assert_eq!(expired.len(), 16, "each key's put and delete once");
    assert!(expired[8..].iter().all(|e| !e.2));
    for client in &mut clients {
        let left = client
            .get("expiring/", Some(GetOptions::new().with_prefix()))
            .await
            .expect("range");
        assert_eq!(left.count(), 0);
    }

    // A member killed right after a revoke it took part in, and started
    // again: it applies what it missed, and the next write follows.
    let third = clients[0].lease_grant(600, None).await.expect("grant").id();
    for i in 0..6 {
        clients[1]
            .put(
                format!("third/{i}"),
                "v",
                Some(PutOptions::new().with_lease(third)),
            )
            .await
            .expect("put");
    }
    clients[0].lease_revoke(third).await.expect("revoke");
    c.kill(2);
    c.restart(2);
    let dump = c.wait_converged(&[0, 1, 2], Duration::from_secs(30)).await;
    assert_eq!(dump.revision, last + 8);
    assert!(
        dump.kvs.keys().all(|k| k == "plain"),
        "{:?}",
        dump.kvs.keys()
    );
    let mut restarted = c.client(2).await;
    let next = restarted.put("after", "v", None).await.expect("put");
    assert_eq!(next.header().map(|h| h.revision()), Some(last + 9));
    assert_eq!(
        lease_keys(&mut restarted, third).await,
        Vec::<String>::new()
    );
}

/// Runs `etcdctl txn` against `endpoint` with `script` on its stdin (its
/// interactive format), answering with the JSON response.
fn etcdctl_txn(endpoint: &str, script: &str) -> serde_json::Value {
    let out = common::etcdctl(endpoint, &["txn", "-w", "json"], Some(script));
    assert!(
        out.status.success(),
        "etcdctl txn: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("etcdctl txn's JSON")
}

/// The accounts' values by key, and the sum of them, as of one read.
async fn balances(client: &mut Client) -> (BTreeMap<String, i64>, i64, i64) {
    let got = client
        .get("acct/", Some(GetOptions::new().with_prefix()))
        .await
        .expect("read the accounts");
    let values: BTreeMap<String, i64> = got
        .kvs()
        .iter()
        .map(|kv| {
            let value = String::from_utf8_lossy(kv.value()).parse().unwrap_or(-1000);
            (String::from_utf8_lossy(kv.key()).into_owned(), value)
        })
        .collect();
    let sum = values.values().sum();
    (values, sum, got.header().map_or(0, |h| h.revision()))
}

/// Txns over keys of several shards, on three members with four shards:
/// etcdctl's interactive txn through each member (success and failure
/// branches), each at one revision that readers and watchers see whole;
/// transfers between accounts on different shards, from every member at
/// once, never seen half done; `etcdctl lock` taken in turn and by two
/// lockers at once; and a member killed and restarted meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txns_over_several_shards_take_one_revision_all_or_nothing() {
    let mut c = Cluster::start_with(3, &["--shards", "4"]);
    c.wait_leader(Duration::from_secs(10)).await;
    let mut clients = Vec::new();
    for i in 0..3 {
        clients.push(c.client(i).await);
    }
    let accounts: Vec<String> = (0..8).map(|i| format!("acct/{i}")).collect();
    let mut last = 0;
    for account in &accounts {
        let put = clients[0]
            .put(account.as_str(), "100", None)
            .await
            .expect("put");
        last = put.header().map_or(0, |h| h.revision());
    }
    assert!(
        shards_with_keys(&c, 0) >= 2,
        "the accounts are on several shards"
    );
    let mut live = watch_all(&mut clients[1], last + 1).await;

    // Through each member: a txn whose compare holds, putting keys of
    // several shards and reading them all, at the next revision.
    let mut expected = Vec::new();
    for m in 0..3 {
        let script = format!(
            "value(\"acct/0\") = \"{}\"\n\nput acct/0 \"{}\"\nput acct/5 \"{}\"\nget acct/ --prefix\n\nget acct/0\n\n",
            100 + m,
            101 + m,
            100 - m - 1,
        );
        let done = etcdctl_txn(&c.endpoint(m), &script);
        assert_eq!(done["succeeded"], true, "m{m}: {done}");
        let revision = done["header"]["revision"].as_i64().expect("revision");
        assert_eq!(revision, last + 1, "m{m}: one revision");
        last = revision;
        let read = &done["responses"][2]["Response"]["ResponseRange"];
        assert_eq!(
            read["count"], 8,
            "m{m}: the txn's range over every shard: {done}"
        );
        expected.push((revision, "acct/0".to_string(), true));
        expected.push((revision, "acct/5".to_string(), true));
    }
    // A compare that fails runs the failure branch: it reads, and changes
    // nothing, so takes no revision.
    let failed = etcdctl_txn(
        &c.endpoint(1),
        "value(\"acct/0\") = \"7\"\n\nput acct/0 \"0\"\n\nget acct/0\n\n",
    );
    assert_eq!(failed["succeeded"], serde_json::Value::Null, "{failed}");
    assert_eq!(failed["header"]["revision"].as_i64(), Some(last));
    let kvs = &failed["responses"][0]["Response"]["ResponseRange"]["kvs"];
    assert_eq!(kvs[0]["mod_revision"].as_i64(), Some(last));
    let mut seen = watch_until(&mut live, last).await;
    seen.sort();
    assert_eq!(seen, expected);
    let (values, sum, _) = balances(&mut clients[2]).await;
    assert_eq!(values["acct/0"], 103);
    assert_eq!(sum, 800);

    // Transfers between accounts of different shards from every member at
    // once, while readers check that none is ever seen half done and a
    // watcher sees each whole at its revision.
    let stop = Arc::new(AtomicBool::new(false));
    let mut readers = JoinSet::new();
    for m in 0..3 {
        let mut reader = c.client(m).await;
        let stop = stop.clone();
        readers.spawn(async move {
            let mut reads = 0;
            while !stop.load(Ordering::Relaxed) {
                let (values, sum, revision) = balances(&mut reader).await;
                assert_eq!(sum, 800, "a half-done transfer at {revision}: {values:?}");
                reads += 1;
            }
            reads
        });
    }
    let from = last + 1;
    let mut watcher = watch_all(&mut clients[0], from).await;
    let mut transfers = JoinSet::new();
    for m in 0..3 {
        let mut client = c.client(m).await;
        transfers.spawn(async move {
            let mut revisions = Vec::new();
            for i in 0..6 {
                let (from, to) = (
                    format!("acct/{}", (m + i) % 8),
                    format!("acct/{}", (m + i + 3) % 8),
                );
                loop {
                    let got = client.get(from.as_str(), None).await.expect("get");
                    let kv = &got.kvs()[0];
                    let balance: i64 = String::from_utf8_lossy(kv.value())
                        .parse()
                        .expect("a number");
                    let other = client.get(to.as_str(), None).await.expect("get");
                    let okv = &other.kvs()[0];
                    let other_balance: i64 = String::from_utf8_lossy(okv.value())
                        .parse()
                        .expect("a number");
                    let txn = Txn::new()
                        .when([
                            Compare::mod_revision(
                                from.as_str(),
                                CompareOp::Equal,
                                kv.mod_revision(),
                            ),
                            Compare::mod_revision(
                                to.as_str(),
                                CompareOp::Equal,
                                okv.mod_revision(),
                            ),
                        ])
                        .and_then([
                            TxnOp::put(from.as_str(), (balance - 1).to_string(), None),
                            TxnOp::put(to.as_str(), (other_balance + 1).to_string(), None),
                        ]);
                    let done = client.txn(txn).await.expect("transfer");
                    if done.succeeded() {
                        revisions.push(done.header().map_or(0, |h| h.revision()));
                        break;
                    }
                }
            }
            revisions
        });
    }
    let mut revisions: Vec<i64> = transfers.join_all().await.into_iter().flatten().collect();
    stop.store(true, Ordering::Relaxed);
    let reads: Vec<i32> = readers.join_all().await;
    assert!(reads.iter().all(|&r| r > 0), "{reads:?}");
    revisions.sort();
    let until = *revisions.last().expect("transfers");
    let events = watch_until(&mut watcher, until).await;
    let mut by_revision: BTreeMap<i64, usize> = BTreeMap::new();
    for (revision, _, put) in &events {
        assert!(*put);
        *by_revision.entry(*revision).or_default() += 1;
    }
    // Each transfer at its own revision with both of its puts; none else.
    assert_eq!(by_revision.keys().copied().collect::<Vec<_>>(), revisions);
    assert!(by_revision.values().all(|&n| n == 2), "{by_revision:?}");
    let (_, sum, _) = balances(&mut clients[0]).await;
    assert_eq!(sum, 800);

    // etcdctl lock: taken and released twice in a row, then by two lockers
    // at once, one after the other.
    for m in 0..2 {
        let out = c.etcdctl(m, &["lock", "mutex", "echo", "held"]);
        assert!(
            out.status.success(),
            "lock: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(text.trim(), "held");
    }
    let started = std::time::Instant::now();
    let lockers: Vec<_> = (0..2)
        .map(|m| {
            std::process::Command::new("etcdctl")
                .env("ETCDCTL_API", "3")
                .args(["--endpoints", &c.endpoint(m), "--command-timeout=30s"])
                .args([
                    "lock",
                    "mutex",
                    "--",
                    "sh",
                    "-c",
                    "echo in; sleep 1; echo out",
                ])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("etcdctl lock")
        })
        .collect();
    for locker in lockers {
        let out = locker.wait_with_output().expect("etcdctl lock ends");
        assert!(
            out.status.success(),
            "lock: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("out"));
    }
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "the two lockers held the lock one after the other"
    );
    let left = clients[0]
        .get("mutex/", Some(GetOptions::new().with_prefix()))
        .await
        .expect("range");
    assert_eq!(left.count(), 0, "every locker released its key");

    // A member killed: txns over every shard go on through the others, and
    // the member comes back with them applied. A txn whose prepare went to
    // a shard leader that died waits until it is aborted and runs again,
    // which may outlast the client's timeout: it is retried, as clients
    // do, and writes the same values.
    c.kill(2);
    let mut after_kill = 0;
    for i in 0..4 {
        let txn = Txn::new().and_then([
            TxnOp::put(format!("acct/{i}").as_str(), "50", None),
            TxnOp::put(format!("acct/{}", i + 4).as_str(), "150", None),
        ]);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            match clients[i % 2].txn(txn.clone()).await {
                Ok(done) => {
                    after_kill = done.header().map_or(0, |h| h.revision());
                    break;
                }
                Err(e) => assert!(
                    tokio::time::Instant::now() < deadline,
                    "txn with a member down: {e}"
                ),
            }
        }
    }
    c.restart(2);
    let dump = c.wait_converged(&[0, 1, 2], Duration::from_secs(30)).await;
    assert!(dump.revision >= after_kill);
    let total: i64 = dump
        .kvs
        .iter()
        .filter(|(k, _)| k.starts_with("acct/"))
        .map(|(_, v)| v.0.parse::<i64>().unwrap_or(0))
        .sum();
    assert_eq!(total, 800);
    let mut restarted = c.client(2).await;
    let (_, sum, revision) = balances(&mut restarted).await;
    assert_eq!((sum, revision), (800, dump.revision));
}

// ---- Auth: watches over shards held elsewhere (issue 18) ----
//
// With auth enabled a member follows the shards it holds no replica of
// through feeds signed with the cluster secret, and reads them for its
// watchers (catch-up, prev_kv) the same way, having checked each
// watcher's own permission; a caller without member credentials gets no
// feed it could not read as itself.

/// Sets up root and alice (who may read `/app/` only) through member 0,
/// and enables auth.
fn enable_auth_with_an_app_reader(c: &Cluster) {
    for user in ["root", "alice"] {
        let out = common::etcdctl(
            &c.endpoint(0),
            &["user", "add", user, "--interactive=false"],
            Some(&format!("{user}\n")),
        );
        assert!(out.status.success(), "{out:?}");
    }
    c.etcdctl_ok(0, &["user", "grant-role", "root", "root"]);
    c.etcdctl_ok(0, &["role", "add", "app-reader"]);
    c.etcdctl_ok(
        0,
        &[
            "role",
            "grant-permission",
            "app-reader",
            "read",
            "/app/",
            "--prefix=true",
        ],
    );
    c.etcdctl_ok(0, &["user", "grant-role", "alice", "app-reader"]);
    assert_eq!(
        c.etcdctl_ok(0, &["auth", "enable"]),
        "Authentication Enabled\n"
    );
}

/// A client of member `i` authenticated as `user` (password = name),
/// retried while the member starts.
async fn client_as(c: &Cluster, i: usize, user: &str) -> Client {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let options = etcd_client::ConnectOptions::new()
            .with_user(user, user)
            .with_timeout(Duration::from_secs(10))
            .with_connect_timeout(Duration::from_secs(1));
        match Client::connect([c.endpoint(i)], Some(options)).await {
            Ok(client) => return client,
            Err(e) => assert!(
                tokio::time::Instant::now() < deadline,
                "{user} connects to m{i}: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `user`'s token from member `i`.
async fn token_of(c: &Cluster, i: usize, user: &str) -> String {
    use cairn_api::etcdserverpb::AuthenticateRequest;
    use cairn_api::etcdserverpb::auth_client::AuthClient;
    AuthClient::connect(format!("http://{}", c.endpoint(i)))
        .await
        .expect("connect")
        .authenticate(AuthenticateRequest {
            name: user.into(),
            password: user.into(),
        })
        .await
        .expect("authenticates")
        .into_inner()
        .token
}

/// Events of `stream` until one at `last` or later, with each one's
/// previous value: (revision, key, previous value).
async fn watch_with_prev_until(
    stream: &mut WatchStream,
    last: i64,
) -> Vec<(i64, String, Option<String>)> {
    watch_until_with(stream, last, |event| {
        event
            .prev_kv()
            .map(|p| String::from_utf8_lossy(p.value()).into_owned())
    })
    .await
}

/// A watch over every key from `from` with previous key-values, through a
/// member that may still be reconnecting its feeds after a start (a watch
/// over a shard whose feed was refused is refused).
async fn watch_all_with_prev(client: &mut Client, from: i64) -> WatchStream {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let options = WatchOptions::new()
            .with_all_keys()
            .with_prev_key()
            .with_start_revision(from);
        let (watcher, stream) = client.watch("", Some(options)).await.expect("watch");
        if watcher.watch_id() != -1 {
            return stream;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the watch was refused for 20 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The shards member `i` holds a replica of, from its `/shards` listing.
fn held_shards(c: &Cluster, i: usize) -> BTreeSet<u32> {
    let listed = common::http::request(&c.endpoint(i), "GET", "/shards", "").json();
    listed["shards"]
        .as_array()
        .expect("shards")
        .iter()
        .filter(|s| !s["replica"].is_null())
        .map(|s| s["shard"].as_u64().expect("shard") as u32)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auth_watches_over_shards_held_elsewhere_see_every_permitted_event() {
    let mut c = Cluster::start_with(5, &["--shards", "8", "--shard-replicas", "3"]);
    c.wait_leader(Duration::from_secs(10)).await;
    enable_auth_with_an_app_reader(&c);
    // Every member started again under auth: each feed, and each stream
    // that reads for watchers, is opened now, with the members' own
    // credentials (a feed opened before auth was enabled would go on).
    for i in 0..5 {
        c.kill(i);
    }
    c.restart_all(&[0, 1, 2, 3, 4]);
    c.wait_leader(Duration::from_secs(10)).await;
    let mut roots = Vec::new();
    for i in 0..5 {
        roots.push(client_as(&c, i, "root").await);
    }
    let mut live = Vec::new();
    for root in &mut roots {
        live.push(watch_all_with_prev(root, 0).await);
    }
    // Puts of keys of every shard through every member, each key twice:
    // the second put's event carries the first's value.
    let mut written = Vec::new();
    for i in 0..48 {
        let key = if i % 24 < 12 {
            format!("k{:02}", i % 24)
        } else {
            format!("/app/{:02}", i % 24)
        };
        let put = roots[i % 5]
            .put(key.as_str(), format!("v{i}"), None)
            .await
            .expect("root puts");
        let revision = put.header().map_or(0, |h| h.revision());
        let prev = (i >= 24).then(|| format!("v{}", i - 24));
        written.push((revision, key, prev));
    }
    let last = written.last().map_or(0, |w| w.0);
    let keyspace = cairn_shard::Keyspace::new(8).expect("8 shards");
    for (m, stream) in live.iter_mut().enumerate() {
        // The watch covers keys this member holds no replica of.
        let held = held_shards(&c, m);
        assert!(
            written
                .iter()
                .any(|w| !held.contains(&keyspace.shard_of(w.1.as_bytes()))),
            "m{m} holds every key's shard"
        );
        assert_eq!(
            watch_with_prev_until(stream, last).await,
            written,
            "live on m{m}"
        );
    }
    // From revision 1: the history of the shards held elsewhere read from
    // their holders for root's watcher.
    for (m, root) in roots.iter_mut().enumerate() {
        let mut stream = watch_all_with_prev(root, 1).await;
        assert_eq!(
            watch_with_prev_until(&mut stream, last).await,
            written,
            "from 1 on m{m}"
        );
    }

    // alice may watch `/app/` (every shard's keys under it, from history
    // and live) but not every key: etcd's answer, created and canceled.
    let app: Vec<(i64, String)> = written
        .iter()
        .filter(|w| w.1.starts_with("/app/"))
        .map(|w| (w.0, w.1.clone()))
        .collect();
    for m in 0..5 {
        use cairn_api::etcdserverpb::watch_client::WatchClient;
        use cairn_api::etcdserverpb::watch_request::RequestUnion;
        use cairn_api::etcdserverpb::{WatchCreateRequest, WatchRequest};
        let create = |key: &str, range_end: &str| WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key: key.as_bytes().to_vec().into(),
                range_end: range_end.as_bytes().to_vec().into(),
                start_revision: 1,
                ..Default::default()
            })),
        };
        let requests = tokio_stream::iter([create("\0", "\0"), create("/app/", "/app0")]);
        let mut request = tonic::Request::new(requests);
        let token = token_of(&c, m, "alice").await;
        request
            .metadata_mut()
            .insert("token", token.parse().expect("ascii token"));
        let mut responses = WatchClient::connect(format!("http://{}", c.endpoint(m)))
            .await
            .expect("connect")
            .watch(request)
            .await
            .expect("watch stream")
            .into_inner();
        let refused = responses.message().await.expect("response").expect("open");
        assert!(refused.created && refused.canceled, "m{m}: {refused:?}");
        assert_eq!(refused.cancel_reason, "etcdserver: permission denied");
        let allowed = responses.message().await.expect("response").expect("open");
        assert!(allowed.created && !allowed.canceled, "m{m}: {allowed:?}");
        let mut seen = Vec::new();
        while seen.len() < app.len() {
            let message = tokio::time::timeout(Duration::from_secs(20), responses.message())
                .await
                .unwrap_or_else(|_| panic!("m{m}: alice saw only {seen:?}"));
            let resp = message.expect("watch stream").expect("open");
            assert!(!resp.canceled, "m{m}: {resp:?}");
            for event in resp.events {
                let kv = event.kv.expect("an event's key");
                seen.push((
                    kv.mod_revision,
                    String::from_utf8_lossy(&kv.key).into_owned(),
                ));
            }
        }
        assert_eq!(seen, app, "alice on m{m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auth_a_caller_without_member_credentials_gets_no_feed() {
    use cairn_api::cairnpb::forwarded::Request as ForwardedRequest;
    use cairn_api::cairnpb::forwarding_client::ForwardingClient;
    use cairn_api::cairnpb::{FollowShard, Forwarded, ForwardedBatch, ShardHistory};

    let c = Cluster::start_with(5, &["--shards", "8", "--shard-replicas", "3"]);
    c.wait_leader(Duration::from_secs(10)).await;
    enable_auth_with_an_app_reader(&c);
    let mut root = client_as(&c, 0, "root").await;
    root.put("/app/x", "1", None).await.expect("root puts");
    let held = *held_shards(&c, 0).first().expect("m0 holds a shard");
    let url = format!("http://{}", c.endpoint(0));
    let mut forwarding = ForwardingClient::connect(url).await.expect("connect");
    let follow = |metadata: Option<(&'static str, String)>| {
        let mut request = tonic::Request::new(FollowShard {
            shard: held,
            revision: 0,
        });
        if let Some((key, value)) = metadata {
            request
                .metadata_mut()
                .insert(key, value.parse().expect("ascii"));
        }
        request
    };
    let denied = |result: Result<_, tonic::Status>, what: &str| match result {
        Err(status) => assert_eq!(status.code(), tonic::Code::PermissionDenied, "{what}"),
        Ok(_) => panic!("{what}: the feed was served"),
    };
    denied(forwarding.follow(follow(None)).await, "no credentials");
    let alice = token_of(&c, 0, "alice").await;
    denied(
        forwarding
            .follow(follow(Some(("token", alice.clone()))))
            .await,
        "alice's token",
    );
    // Member credentials that are not signed with the cluster secret: a
    // member's ID, the time, a nonce, and a made-up signature.
    let member = *c.member_ids(0).values().next().expect("a member");
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis();
    let forged = format!(
        "{member:x}.{millis}.{}.{}",
        "ab".repeat(16),
        "cd".repeat(32)
    );
    denied(
        forwarding
            .follow(follow(Some(("cairn-member", forged.clone()))))
            .await,
        "forged member credentials",
    );
    denied(
        forwarding
            .follow(follow(Some(("cairn-member", "garbage".into()))))
            .await,
        "malformed member credentials",
    );
    // A forwarding stream with forged member credentials, or none, reads
    // only as its caller: history without a token is refused, alice's
    // outside `/app/` too.
    let history = |token: &str, key: &str, range_end: &str| ForwardedBatch {
        requests: vec![Forwarded {
            id: 1,
            token: token.to_string(),
            request: Some(ForwardedRequest::History(ShardHistory {
                shard: held,
                key: key.as_bytes().to_vec().into(),
                range_end: range_end.as_bytes().to_vec().into(),
                from: 1,
                limit: 100,
                applied: 0,
                revoked: 0,
            })),
        }],
    };
    let cases = [
        ("", Some(forged.as_str())),
        ("", None),
        (alice.as_str(), None),
        (alice.as_str(), Some(forged.as_str())),
    ];
    for (token, credentials) in cases {
        let mut stream = tonic::Request::new(tokio_stream::iter([history(token, "\0", "\0")]));
        if let Some(credentials) = credentials {
            stream
                .metadata_mut()
                .insert("cairn-member", credentials.parse().expect("ascii"));
        }
        let mut answers = forwarding
            .forward(stream)
            .await
            .expect("a client's forwarding stream")
            .into_inner();
        let batch = answers.message().await.expect("answers").expect("a batch");
        let answered = &batch.answers[0];
        assert!(
            answered.code != 0 && answered.response.is_none(),
            "history with token {token:?}, member credentials {credentials:?}: {answered:?}"
        );
    }
    // Root may read every key, so it may follow the shard as itself.
    let rooted = token_of(&c, 0, "root").await;
    let mut feed = forwarding
        .follow(follow(Some(("token", rooted))))
        .await
        .expect("root follows")
        .into_inner();
    assert!(feed.message().await.expect("feed").is_some());
}

// ---------------------------------------------------------------------------
// Whole-store maintenance on a sharded keyspace (issue 18): HashKV and Hash,
// `snapshot save` and its restore, defragmentation, Status and the quota
// over every shard's store.
// ---------------------------------------------------------------------------

/// Every member's HashKV at `revision`: (hash, compact revision, header
/// revision).
async fn hash_kvs(c: &Cluster, revision: i64) -> Vec<(u32, i64, i64)> {
    let mut hashes = Vec::new();
    for i in 0..c.len() {
        let mut client = c.client(i).await;
        let answer = client
            .hash_kv(revision)
            .await
            .unwrap_or_else(|e| panic!("HashKV({revision}) on m{i}: {e}"));
        hashes.push((
            answer.hash(),
            answer.compact_version(),
            answer.header().map_or(0, |h| h.revision()),
        ));
    }
    hashes
}

/// HashKV at `revision` on every member once each has applied through it
/// (a member's HashKV of a revision it has not reached yet is refused, as
/// etcd refuses it): the same on all, the hash returned.
async fn same_hash_everywhere(c: &Cluster, revision: i64) -> u32 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut hashes = Vec::new();
        for i in 0..c.len() {
            let mut client = c.client(i).await;
            match client.hash_kv(revision).await {
                Ok(answer) => hashes.push((answer.hash(), answer.compact_version())),
                Err(e) => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "HashKV({revision}) on m{i}: {e}"
                    );
                }
            }
        }
        if hashes.len() == c.len() {
            assert!(
                hashes.iter().all(|h| *h == hashes[0]),
                "HashKV({revision}) differs between members: {hashes:?}"
            );
            return hashes[0].0;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every key at `revision`: key, value, create and mod revisions, version
/// and lease.
async fn every_key(
    client: &mut Client,
    revision: i64,
) -> Vec<(String, String, i64, i64, i64, i64)> {
    let options = GetOptions::new().with_all_keys().with_revision(revision);
    let got = client.get("", Some(options)).await.expect("range");
    got.kvs()
        .iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(kv.key()).into_owned(),
                String::from_utf8_lossy(kv.value()).into_owned(),
                kv.create_revision(),
                kv.mod_revision(),
                kv.version(),
                kv.lease(),
            )
        })
        .collect()
}

/// Three members holding every shard: HashKV and Hash are the same on
/// every member, change with a write and not for an older revision, and
/// the quota counts the shards' stores (before, it counted the cluster
/// group's, which holds no keys, and never refused a write).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_kv_is_equal_on_every_member_and_the_quota_counts_the_shards() {
    let c = Cluster::start_with(3, &["--shards", "4", "--quota-backend-bytes", "262144"]);
    c.wait_leader(Duration::from_secs(10)).await;
    let mut client = c.client(0).await;
    for i in 0..20 {
        client
            .put(format!("h{i:02}"), format!("v{i}"), None)
            .await
            .expect("put");
    }
    let deleted = client.delete("h03", None).await.expect("delete");
    let at = deleted.header().map_or(0, |h| h.revision());
    let before = same_hash_everywhere(&c, at).await;
    // The latest revision (HashKV 0) and Hash agree once the members have
    // caught up.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let latest = hash_kvs(&c, 0).await;
        if latest.iter().all(|h| h.2 == at) {
            assert!(latest.iter().all(|h| h.0 == before), "{latest:?}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{latest:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for i in 0..3 {
        let hash = c.client(i).await.hash().await.expect("hash");
        assert_eq!(hash.hash(), before, "Hash on m{i}");
    }

    // A write changes the hash of its revision, not that of the earlier one.
    let put = client.put("h05", "changed", None).await.expect("put");
    let after = same_hash_everywhere(&c, put.header().map_or(0, |h| h.revision())).await;
    assert_ne!(after, before, "a write changes the hash");
    assert_eq!(same_hash_everywhere(&c, at).await, before);

    // A future revision is refused, as etcd refuses it.
    let future = client.hash_kv(at + 1000).await;
    assert!(future.is_err(), "{future:?}");

    // The quota: values that do not compress, on keys of every shard, until
    // a put is refused with NOSPACE and the alarm is raised.
    let mut rng = common::rng::Rng(18);
    let mut refused = None;
    for i in 0..200 {
        let value: Vec<u8> = (0..4096).map(|_| rng.next() as u8).collect();
        if let Err(e) = client.put(format!("big{i:03}"), value, None).await {
            refused = Some(e.to_string());
            break;
        }
    }
    let refused = refused.expect("the quota refuses a put within 200 of 4 KiB");
    assert!(refused.contains("database space exceeded"), "{refused}");
    let alarms = client
        .alarm(
            etcd_client::AlarmAction::Get,
            etcd_client::AlarmType::None,
            None,
        )
        .await
        .expect("alarms");
    assert!(
        alarms
            .alarms()
            .iter()
            .any(|a| a.alarm() == etcd_client::AlarmType::Nospace),
        "{alarms:?}"
    );
    let status = client.status().await.expect("status");
    assert!(
        status.raft_used_db_size() > 200_000,
        "Status counts the shards' stores in use: {status:?}"
    );
}

/// Five members, each holding some of the eight shards: HashKV is the same
/// on every member (the shards held elsewhere hashed on a member holding
/// them); `snapshot save` through a member writes every key of every shard
/// at one revision with its history, the compaction and a lease, and
/// `etcdctl snapshot restore` of it gives a one-shard member holding the
/// same keys at the same revisions; defragmentation runs over every store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_save_through_a_member_holds_every_shard_and_restores_into_one_store() {
    let c = Cluster::start_with(5, &["--shards", "8", "--shard-replicas", "3"]);
    c.wait_leader(Duration::from_secs(10)).await;
    let mut clients = Vec::new();
    for i in 0..5 {
        clients.push(c.client(i).await);
    }
    for i in 0..40 {
        clients[i % 5]
            .put(format!("k{i:02}"), format!("v{i}"), None)
            .await
            .expect("put");
    }
    for i in (0..40).step_by(3) {
        clients[(i + 1) % 5]
            .put(format!("k{i:02}"), format!("again{i}"), None)
            .await
            .expect("overwrite");
    }
    clients[2].delete("k07", None).await.expect("delete");
    let lease = clients[1].lease_grant(600, None).await.expect("grant").id();
    clients[3]
        .put("leased", "x", Some(PutOptions::new().with_lease(lease)))
        .await
        .expect("leased put");
    // One revision over keys of two shards (their parts both numbered from
    // sub-revision 0 in their stores).
    let txn = Txn::new().and_then([
        TxnOp::put("pair/a", "1", None),
        TxnOp::put("pair/b", "2", None),
        TxnOp::put("pair/c", "3", None),
    ]);
    clients[4].txn(txn).await.expect("txn over shards");
    clients[0].compact(12, None).await.expect("compact");
    let last = clients[0]
        .put("k03", "after-compaction", None)
        .await
        .expect("put")
        .header()
        .map_or(0, |h| h.revision());
    let middle = last - 10;

    // The keyspace's hash is the same on every member, and moves with it.
    let hash = same_hash_everywhere(&c, last).await;
    assert_ne!(same_hash_everywhere(&c, middle).await, hash);

    let head = every_key(&mut clients[0], last).await;
    let at_middle = every_key(&mut clients[0], middle).await;
    assert!(head.len() > 40, "{head:?}");

    // m0 holds no replica of some shards: their keys come from others.
    let held = std::fs::read_dir(c.node(0).data_dir.join("member/shards"))
        .map(|dir| dir.count())
        .unwrap_or(0);
    assert!(held < 8, "m0 holds {held} shards");
    let file = c.dir().join("sharded.snapshot");
    let saved = c.etcdctl_ok(0, &["snapshot", "save", &file.to_string_lossy()]);
    assert!(saved.contains("Snapshot saved at"), "{saved}");
    let status = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["snapshot", "status", &file.to_string_lossy(), "-w", "json"])
        .output()
        .expect("etcdctl snapshot status");
    let status: serde_json::Value =
        serde_json::from_slice(&status.stdout).expect("snapshot status JSON");
    assert_eq!(status["revision"], last, "{status}");

    // Defragmentation runs over every store of every member; the keys stay.
    for (i, client) in clients.iter_mut().enumerate() {
        client
            .defragment()
            .await
            .unwrap_or_else(|e| panic!("defragment m{i}: {e}"));
        let status = client.status().await.expect("status");
        assert!(status.raft_used_db_size() > 0, "m{i}: {status:?}");
    }
    assert_eq!(every_key(&mut clients[3], last).await, head);

    // etcdctl's restore, then a one-shard member on it: the same keys at
    // the head and in history, the compaction, the lease and its key.
    let plan = common::etcd::Plan::new("restored");
    let data = c.dir().join("restored");
    common::etcd::etcdctl_local(&plan.restore_args(&file, &data));
    let restored = plan.start(common::etcd::Binary::Cairn, &data);
    let mut one = connect(&restored.endpoint(), Duration::from_secs(10)).await;
    assert_eq!(every_key(&mut one, last).await, head);
    assert_eq!(every_key(&mut one, middle).await, at_middle);
    let header = one
        .get("k00", None)
        .await
        .expect("get")
        .header()
        .map_or(0, |h| h.revision());
    assert_eq!(header, last);
    let compacted = one
        .get("k00", Some(GetOptions::new().with_revision(11)))
        .await;
    assert!(
        compacted
            .err()
            .is_some_and(|e| e.to_string().contains("compacted")),
        "a read below the compaction is refused"
    );
    let ttl = one
        .lease_time_to_live(
            lease,
            Some(etcd_client::LeaseTimeToLiveOptions::new().with_keys()),
        )
        .await
        .expect("lease time to live");
    assert_eq!(ttl.keys(), [b"leased".to_vec()]);
    let put = one.put("new", "value", None).await.expect("put");
    assert_eq!(put.header().map_or(0, |h| h.revision()), last + 1);

    // A restored data dir (etcdctl's, or cairn's own restore) holds one
    // store: started with --shards it is refused, not served with its keys
    // out of the shards' sight.
    for (tool, dir) in [("etcdctl", "restored-etcdctl"), ("cairn", "restored-cairn")] {
        let data = c.dir().join(dir);
        let args = plan.restore_args(&file, &data);
        if tool == "etcdctl" {
            common::etcd::etcdctl_local(&args);
        } else {
            common::etcd::cairn_ok(&args);
        }
        let mut sharded = std::process::Command::new(env!("CARGO_BIN_EXE_cairn"))
            .args(["--name", &plan.name, "--shards", "8"])
            .arg("--data-dir")
            .arg(&data)
            .args(["--initial-cluster", &plan.initial_cluster()])
            .args(["--initial-advertise-peer-urls", &plan.peer_url()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("cairn starts");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while sharded.try_wait().expect("wait").is_none() {
            if std::time::Instant::now() > deadline {
                let _ = sharded.kill();
                panic!("cairn --shards 8 on {tool}'s restore kept running");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let out = sharded.wait_with_output().expect("cairn's output");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{tool}: {stderr}");
        assert!(
            stderr.contains("this data dir was created with --shards 1"),
            "{tool}: {stderr}"
        );
    }
}

/// With auth enabled, on three members each holding one replica of some of
/// the four shards: `etcdctl endpoint hashkv --cluster` and `snapshot save`
/// read the shards held elsewhere with the caller's token (an admin's), and
/// are refused without one; the saved snapshot holds every key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auth_hashkv_and_snapshot_read_the_shards_held_elsewhere_as_the_caller() {
    let c = Cluster::start_with(3, &["--shards", "4", "--shard-replicas", "1"]);
    c.wait_leader(Duration::from_secs(10)).await;
    let held = std::fs::read_dir(c.node(0).data_dir.join("member/shards"))
        .map(|dir| dir.count())
        .unwrap_or(0);
    assert!(held < 4, "m0 holds {held} shards");
    let added = common::etcdctl(
        &c.endpoint(0),
        &["user", "add", "root", "--interactive=false"],
        Some("root\n"),
    );
    assert!(added.status.success(), "{added:?}");
    c.etcdctl_ok(0, &["user", "grant-role", "root", "root"]);
    c.etcdctl_ok(0, &["auth", "enable"]);
    for i in 0..12 {
        c.etcdctl_ok(
            i % 3,
            &["--user=root:root", "put", &format!("a{i:02}"), "v"],
        );
    }
    let got = c.etcdctl_ok(0, &["--user=root:root", "get", "a11", "-w", "json"]);
    let got: serde_json::Value = serde_json::from_str(&got).expect("get JSON");
    let last = got["header"]["revision"].as_i64().expect("revision");
    let rev = format!("--rev={last}");

    // Every member's hash of the keyspace at `last`, once each has it.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let hashes = loop {
        let out = c.etcdctl(
            0,
            &[
                "--user=root:root",
                "endpoint",
                "hashkv",
                "--cluster",
                &rev,
                "-w",
                "json",
            ],
        );
        if out.status.success() {
            let listed: serde_json::Value =
                serde_json::from_slice(&out.stdout).expect("hashkv JSON");
            let hashes: Vec<u64> = listed
                .as_array()
                .expect("one entry per member")
                .iter()
                .map(|e| e["HashKV"]["hash"].as_u64().unwrap_or(0))
                .collect();
            if hashes.len() == 3 {
                break hashes;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "endpoint hashkv: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(hashes.iter().all(|h| *h == hashes[0]), "{hashes:?}");
    let refused = c.etcdctl(0, &["endpoint", "hashkv", &rev]);
    assert!(!refused.status.success(), "hashkv without a user");

    let file = c.dir().join("auth.snapshot");
    let file = file.to_string_lossy();
    let refused = c.etcdctl(0, &["snapshot", "save", &file]);
    assert!(!refused.status.success(), "snapshot save without a user");
    c.etcdctl_ok(0, &["--user=root:root", "snapshot", "save", &file]);
    // Its keys, as the restore imports them (a member started on it would
    // answer only a client with a user, which the harness' readiness probe
    // is not): each put's revision, of every shard.
    let plan = common::etcd::Plan::new("restored");
    let data = c.dir().join("restored");
    let log =
        common::etcd::cairn_ok(&plan.restore_args(std::path::Path::new(file.as_ref()), &data));
    // Without the log's colours.
    let mut plain = String::new();
    let mut in_escape = false;
    for ch in log.chars() {
        match ch {
            '\u{1b}' => in_escape = true,
            'm' if in_escape => in_escape = false,
            _ if !in_escape => plain.push(ch),
            _ => {}
        }
    }
    assert!(plain.contains("revisions=12 "), "{plain}");
    let status = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["snapshot", "status", &file, "-w", "json"])
        .output()
        .expect("etcdctl snapshot status");
    let status: serde_json::Value =
        serde_json::from_slice(&status.stdout).expect("snapshot status JSON");
    assert_eq!(status["revision"], last, "{status}");
}

/// A /metrics gauge of the member at `endpoint`.
fn gauge(endpoint: &str, name: &str) -> u64 {
    let page = common::http::request(endpoint, "GET", "/metrics", "").body;
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no {name} in {page}")) as u64
}

/// /metrics' DB sizes count every store a sharded member holds, as Status
/// does (before, they counted the cluster group's, which holds no keys).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_db_sizes_count_every_shard_as_status_does() {
    let c = Cluster::start_with(3, &["--shards", "4"]);
    c.wait_leader(Duration::from_secs(10)).await;
    let mut client = c.client(0).await;
    // Values that do not compress, on keys of every shard.
    let mut rng = common::rng::Rng(27);
    let written = 40 * 4096;
    for i in 0..40 {
        let value: Vec<u8> = (0..4096).map(|_| rng.next() as u8).collect();
        client
            .put(format!("size{i:02}"), value, None)
            .await
            .expect("put");
    }
    for i in 0..3 {
        let endpoint = c.endpoint(i);
        let mut member = c.client(i).await;
        // Every member holds a replica of every shard; it may still be
        // applying the last writes.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let in_use = gauge(&endpoint, "etcd_mvcc_db_total_size_in_use_in_bytes");
            let status = member.status().await.expect("status");
            if in_use >= written && in_use == status.raft_used_db_size() as u64 {
                let total = gauge(&endpoint, "etcd_mvcc_db_total_size_in_bytes");
                assert!(total >= in_use, "m{i}: total {total}, in use {in_use}");
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "m{i}: /metrics in use {in_use}, Status {status:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
