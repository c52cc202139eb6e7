//! A lease keeps its remaining TTL across a leader failover: killed with -9
//! while keys hold the lease, the leader is replaced and the new one revokes
//! the lease on time (±1 s of grant + TTL), deleting every key in one
//! revision. Without a failover the lease expires on time too.
//!
//! Real processes, 3 members, 50 ms heartbeat, 500 ms election timeout.

mod common;

use std::time::{Duration, Instant};

use common::cluster::Cluster;
use etcd_client::{Client, EventType, GetOptions, PutOptions, WatchOptions, WatchStream, Watcher};

const TTL: u64 = 8;
const KEYS: usize = 5;
const PREFIX: &str = "failover/";
/// How far from grant + TTL the keys may vanish.
const TOLERANCE: Duration = Duration::from_secs(1);

/// Linearizable count of the keys under PREFIX, with the header revision;
/// None while the member cannot answer (during the election).
async fn count(c: &mut Client) -> Option<(i64, i64)> {
    let r = c
        .get(
            PREFIX,
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .ok()?;
    Some((r.count(), r.header()?.revision()))
}

/// Every event of the first watch response that carries any.
async fn first_events(stream: &mut WatchStream) -> Vec<(EventType, i64)> {
    loop {
        let resp = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("a watch response within 10 s")
            .expect("the watch stream works")
            .expect("the watch stream is open");
        assert!(!resp.canceled(), "{resp:?}");
        if !resp.events().is_empty() {
            return resp
                .events()
                .iter()
                .map(|e| (e.event_type(), e.kv().expect("a kv").mod_revision()))
                .collect();
        }
    }
}

/// Grants the lease and puts the keys through member `at`; returns the
/// instants just before and after the grant, and the revision of the last
/// put.
async fn grant_and_put(cluster: &Cluster, at: usize) -> (Instant, Instant, i64) {
    let mut c = cluster.client(at).await;
    let before = Instant::now();
    let lease = c.lease_grant(TTL as i64, None).await.expect("grant");
    let after = Instant::now();
    assert_eq!(lease.ttl(), TTL as i64);
    let mut revision = 0;
    for i in 0..KEYS {
        let put = c
            .put(
                format!("{PREFIX}{i}"),
                "v",
                Some(PutOptions::new().with_lease(lease.id())),
            )
            .await
            .expect("put");
        revision = put.header().expect("a header").revision();
    }
    (before, after, revision)
}

/// Polls member `at` every 100 ms until the keys are gone; checks the time
/// against the grant's and that they went in one revision, and returns the
/// error against grant + TTL (seconds, from the grant's midpoint).
async fn expect_expiry(
    cluster: &Cluster,
    at: usize,
    stream: &mut WatchStream,
    (before, after, revision): (Instant, Instant, i64),
) -> f64 {
    let mut c = cluster.client(at).await;
    let ttl = Duration::from_secs(TTL);
    let limit = after + ttl + TOLERANCE + Duration::from_secs(2);
    let (gone_at, gone_revision) = loop {
        let polled = Instant::now();
        match count(&mut c).await {
            Some((0, rev)) => break (polled, rev),
            Some((n, rev)) => {
                assert_eq!(n, KEYS as i64, "the keys go all at once");
                assert_eq!(rev, revision, "nothing else changed yet");
            }
            None => {}
        }
        assert!(Instant::now() < limit, "the keys did not vanish in time");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let early = gone_at.saturating_duration_since(before);
    let late = gone_at.saturating_duration_since(after);
    let error = (early + late).as_secs_f64() / 2.0 - ttl.as_secs_f64();
    eprintln!(
        "keys vanished {:.3}..{:.3} s after the grant (TTL {TTL} s): error {error:+.3} s",
        late.as_secs_f64(),
        early.as_secs_f64()
    );
    assert!(
        early + TOLERANCE >= ttl,
        "vanished too early: {early:?} after the grant was sent"
    );
    assert!(
        late <= ttl + TOLERANCE,
        "vanished too late: {late:?} after the grant was answered"
    );
    assert_eq!(gone_revision, revision + 1, "one revision for the revoke");
    let events = first_events(stream).await;
    assert_eq!(
        events,
        vec![(EventType::Delete, revision + 1); KEYS],
        "one response, one revision, every key deleted"
    );
    error
}

async fn watch(cluster: &Cluster, at: usize, from: i64) -> (Client, Watcher, WatchStream) {
    let mut c = cluster.client(at).await;
    let (watcher, stream) = c
        .watch(
            PREFIX,
            Some(WatchOptions::new().with_prefix().with_start_revision(from)),
        )
        .await
        .expect("watch");
    (c, watcher, stream)
}

#[tokio::test]
async fn a_lease_keeps_its_remaining_ttl_when_the_leader_is_killed() {
    let mut cluster = Cluster::start(3);
    let leader = cluster.wait_leader(Duration::from_secs(10)).await;
    let survivor = (leader + 1) % cluster.len();
    let granted = grant_and_put(&cluster, survivor).await;
    let (_c, _watcher, mut stream) = watch(&cluster, survivor, granted.2 + 1).await;
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(granted.1.elapsed())).await;
    let killed = granted.1.elapsed();
    cluster.kill(leader);
    let new_leader = cluster.wait_leader(Duration::from_secs(10)).await;
    assert_ne!(new_leader, leader);
    eprintln!(
        "leader killed {:.3} s after the grant, new leader seen at {:.3} s",
        killed.as_secs_f64(),
        granted.1.elapsed().as_secs_f64()
    );
    expect_expiry(&cluster, survivor, &mut stream, granted).await;
}

#[tokio::test]
async fn a_lease_expires_on_time_without_a_failover() {
    let cluster = Cluster::start(3);
    let leader = cluster.wait_leader(Duration::from_secs(10)).await;
    let follower = (leader + 1) % cluster.len();
    let granted = grant_and_put(&cluster, follower).await;
    let (_c, _watcher, mut stream) = watch(&cluster, follower, granted.2 + 1).await;
    expect_expiry(&cluster, follower, &mut stream, granted).await;
}
