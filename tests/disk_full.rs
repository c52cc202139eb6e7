//! A member whose disk fills: each member's data dir on a small tmpfs,
//! filled with puts until they are refused. The member stays up and serves
//! reads; writes are refused with etcd's NOSPACE error and the NOSPACE alarm
//! is raised through the log; once the tmpfs grows the member clears its
//! alarm by itself and takes writes again, with every acknowledged key
//! there. On one member, and on the leader and on a follower of three.
//!
//! Needs root (to mount tmpfs); skipped with a message otherwise.

mod common;

use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::tmpfs::{self, Tmpfs};
use etcd_client::{Client, GetOptions};

/// Small enough to fill in a few hundred puts, large enough for a member to
/// start on.
const SMALL: &str = "48m";
const LARGE: &str = "512m";
/// --disk-reserve-bytes: refuse writes with 8 MiB left.
const RESERVE: &str = "8388608";
const VALUE_BYTES: usize = 60_000;
/// More puts than SMALL can hold: the fill must be refused before.
const MAX_PUTS: usize = 2_000;
const NO_SPACE: &str = "etcdserver: mvcc: database space exceeded";

fn skip_without_tmpfs() -> bool {
    match tmpfs::unavailable() {
        Some(why) => {
            eprintln!("skipping the disk-full tests: {why}");
            true
        }
        None => false,
    }
}

/// A value of VALUE_BYTES that compresses poorly (the store compresses its
/// tables), distinct per key.
fn value(i: usize) -> String {
    let mut x = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut v = format!("{i:08}");
    while v.len() < VALUE_BYTES {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.push(char::from(b'a' + (x % 26) as u8));
    }
    v
}

/// Starts `n` members, each with its data dir on a SMALL tmpfs of its own,
/// keeping `reserve` bytes free.
fn start_on_tmpfs(n: usize, reserve: &str) -> (Cluster, Vec<Tmpfs>) {
    let mut mounts = Vec::new();
    let flag = format!("--disk-reserve-bytes={reserve}");
    let cluster = Cluster::start_prepared(n, &[&flag], |data_dir| {
        let mount = Tmpfs::mount(SMALL).unwrap_or_else(|e| panic!("{e}"));
        mount.link_from(data_dir);
        mounts.push(mount);
    });
    (cluster, mounts)
}

/// Puts new keys through `client` until one fails: the acknowledged keys'
/// numbers, and the failure.
async fn fill(client: &mut Client) -> (Vec<usize>, etcd_client::Error) {
    let mut acked = Vec::new();
    for i in 0..MAX_PUTS {
        match client.put(format!("k{i:05}"), value(i), None).await {
            Ok(_) => acked.push(i),
            Err(e) => return (acked, e),
        }
    }
    panic!("{MAX_PUTS} puts of {VALUE_BYTES} bytes fit on a {SMALL} tmpfs");
}

fn assert_no_space(e: &etcd_client::Error) {
    match e {
        etcd_client::Error::GRpcStatus(status) => {
            // etcd-client's tonic is not the workspace's: compare by name.
            assert_eq!(
                format!("{:?}", status.code()),
                "ResourceExhausted",
                "{status:?}"
            );
            assert_eq!(status.message(), NO_SPACE, "{status:?}");
        }
        other => panic!("expected etcd's NOSPACE error, got {other:?}"),
    }
}

/// No member exited by itself, and none panicked.
fn assert_all_running(cluster: &mut Cluster) {
    for i in 0..cluster.len() {
        assert_eq!(cluster.exit_status(i), None, "member {i} exited");
        assert!(
            !cluster.log_text(i).contains("panicked"),
            "member {i} panicked:\n{}",
            cluster.log_text(i)
        );
    }
}

fn nospace_alarm(id: u64) -> String {
    format!("memberID:{id} alarm:NOSPACE")
}

/// Every member serves key `k{i}` with its value, by a linearizable and by
/// a serializable read.
async fn assert_reads(cluster: &Cluster, i: usize) {
    let key = format!("k{i:05}");
    for m in 0..cluster.len() {
        let mut c = cluster.client(m).await;
        for options in [None, Some(GetOptions::new().with_serializable())] {
            let resp = c
                .get(key.as_str(), options)
                .await
                .unwrap_or_else(|e| panic!("read {key} on member {m}: {e}"));
            assert_eq!(
                resp.kvs().first().and_then(|kv| kv.value_str().ok()),
                Some(value(i).as_str()),
                "{key} on member {m}"
            );
        }
    }
}

/// Waits (up to 30 s) until `alarm list` on member 0 shows no alarm.
fn wait_alarm_cleared(cluster: &Cluster) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let alarms = cluster.etcdctl_ok(0, &["alarm", "list"]);
        if alarms.trim().is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "alarms still raised: {alarms}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Every acknowledged key, with its value, on every member (one get each:
/// together they exceed a client's message limit).
async fn assert_all_acked(cluster: &Cluster, acked: &[usize]) {
    for m in 0..cluster.len() {
        let mut c = cluster.client(m).await;
        for &i in acked {
            let key = format!("k{i:05}");
            let resp = c
                .get(key.as_str(), None)
                .await
                .unwrap_or_else(|e| panic!("get {key} on member {m}: {e}"));
            assert_eq!(
                resp.kvs().first().and_then(|kv| kv.value_str().ok()),
                Some(value(i).as_str()),
                "acknowledged {key} on member {m}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_member_full_disk_refuses_writes_serves_reads_and_recovers() {
    if skip_without_tmpfs() {
        return;
    }
    let (mut cluster, mounts) = start_on_tmpfs(1, RESERVE);
    let mut client = cluster.client(0).await;
    let (acked, refusal) = fill(&mut client).await;
    assert!(acked.len() > 100, "only {} puts fit", acked.len());
    assert_no_space(&refusal);
    assert_all_running(&mut cluster);

    let alarms = cluster.etcdctl_ok(0, &["alarm", "list"]);
    assert!(
        alarms.contains(&nospace_alarm(cluster.node(0).id)),
        "{alarms}"
    );
    // Refused again, without a new attempt filling the disk.
    let again = client
        .put("one-more", value(0), None)
        .await
        .expect_err("a put on a full disk");
    assert_no_space(&again);
    assert_reads(&cluster, acked[0]).await;
    assert_reads(&cluster, *acked.last().expect("puts were acknowledged")).await;

    mounts[0].resize(LARGE);
    wait_alarm_cleared(&cluster);
    client
        .put("after", "space came back", None)
        .await
        .expect("a put once space came back");
    assert_all_acked(&cluster, &acked).await;
    assert_all_running(&mut cluster);
}

/// Which member of three gets the small disk.
#[derive(Debug, Clone, Copy)]
enum Full {
    Leader,
    Follower,
}

async fn member_of_three_fills(full: Full) {
    let (mut cluster, mounts) = start_on_tmpfs(3, RESERVE);
    let leader = cluster.wait_leader(Duration::from_secs(10)).await;
    let target = match full {
        Full::Leader => leader,
        Full::Follower => (leader + 1) % 3,
    };
    for (i, mount) in mounts.iter().enumerate() {
        if i != target {
            mount.resize(LARGE);
        }
    }
    let mut through_leader = cluster.client(leader).await;
    through_leader
        .put("scratch", "to delete while full", None)
        .await
        .expect("put scratch");
    let (acked, refusal) = fill(&mut through_leader).await;
    assert!(acked.len() > 100, "only {} puts fit", acked.len());
    assert_no_space(&refusal);
    assert_all_running(&mut cluster);

    let alarms = cluster.etcdctl_ok(leader, &["alarm", "list"]);
    assert!(
        alarms.contains(&nospace_alarm(cluster.node(target).id)),
        "{alarms}"
    );
    // Every member refuses what would grow the store...
    for m in 0..3 {
        let e = cluster
            .client(m)
            .await
            .put("one-more", value(0), None)
            .await
            .expect_err("a put while NOSPACE is raised");
        assert_no_space(&e);
    }
    // ... while the cluster still commits what makes room, as etcd does.
    let deleted = cluster
        .client((target + 1) % 3)
        .await
        .delete("scratch", None)
        .await
        .expect("a delete while NOSPACE is raised");
    assert_eq!(deleted.deleted(), 1);
    assert_reads(&cluster, acked[0]).await;
    assert_reads(&cluster, *acked.last().expect("puts were acknowledged")).await;

    mounts[target].resize(LARGE);
    wait_alarm_cleared(&cluster);
    for m in 0..3 {
        cluster
            .client(m)
            .await
            .put(format!("after-{m}"), "space came back", None)
            .await
            .unwrap_or_else(|e| panic!("a put through member {m} once space came back: {e}"));
    }
    assert_all_acked(&cluster, &acked).await;
    assert_all_running(&mut cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_of_three_full_disk_loses_nothing() {
    if skip_without_tmpfs() {
        return;
    }
    member_of_three_fills(Full::Leader).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_of_three_full_disk_loses_nothing() {
    if skip_without_tmpfs() {
        return;
    }
    member_of_three_fills(Full::Follower).await;
}

/// Without a reserve the disk really fills: the member must not stop, but
/// pause (the applier refuses a batch it has no room for, the raft log
/// retries its writes) and go on by itself once space returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_reserve_a_full_disk_pauses_the_member_until_space_returns() {
    if skip_without_tmpfs() {
        return;
    }
    let (mut cluster, mounts) = start_on_tmpfs(1, "1");
    let mut client = cluster.client(0).await;
    let (acked, failure) = fill(&mut client).await;
    assert!(acked.len() > 100, "only {} puts fit", acked.len());
    assert_all_running(&mut cluster);
    let log = cluster.log_text(0);
    assert!(
        log.contains("applying paused until space returns")
            || log.contains("raft log write failed, retrying until space returns"),
        "the last put failed ({failure}) with neither apply nor the raft log waiting for space:\n{log}"
    );
    let first = format!("k{:05}", acked[0]);
    let read = client
        .get(first.as_str(), Some(GetOptions::new().with_serializable()))
        .await
        .expect("a serializable read on a full disk");
    assert_eq!(
        read.kvs().first().and_then(|kv| kv.value_str().ok()),
        Some(value(acked[0]).as_str())
    );

    mounts[0].resize(LARGE);
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(e) = client.put("after", "space came back", None).await {
        assert!(Instant::now() < deadline, "writes did not come back: {e}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_all_acked(&cluster, &acked).await;
    assert_all_running(&mut cluster);
}
