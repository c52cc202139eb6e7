//! Operations: the space quota and the NOSPACE alarm, alarms raised by
//! hand, and online defragmentation under a write load.

mod common;

use std::time::{Duration, Instant};

use common::Member;
use etcd_client::{
    AlarmAction, AlarmOptions, AlarmType, Client, CompactionOptions, Error, PutOptions,
};

const NO_SPACE: &str = "etcdserver: mvcc: database space exceeded";

async fn connect(m: &Member) -> Client {
    Client::connect([m.endpoint()], None)
        .await
        .expect("connect")
}

fn message<T: std::fmt::Debug>(result: Result<T, Error>) -> String {
    match result {
        Err(Error::GRpcStatus(s)) => s.message().to_string(),
        other => panic!("expected a gRPC error, got {other:?}"),
    }
}

async fn alarms(client: &mut Client) -> Vec<(u64, i32)> {
    let response = client
        .alarm(AlarmAction::Get, AlarmType::None, None)
        .await
        .expect("alarm list");
    response
        .alarms()
        .iter()
        .map(|a| (a.member_id(), a.alarm() as i32))
        .collect()
}

/// etcd 3.4 answers Defragment and MoveLeader with no header (a client
/// library's tests assert both), MoveLeader to the member that already
/// leads included.
#[tokio::test]
async fn defragment_and_move_leader_answer_without_a_header() {
    let m = Member::start();
    let mut c = connect(&m).await;
    c.put("k", "v", None).await.expect("put");
    let defragmented = c.defragment().await.expect("defragment");
    assert!(defragmented.header().is_none(), "{defragmented:?}");
    let leader = c.status().await.expect("status").leader();
    let moved = c.move_leader(leader).await.expect("move to the leader");
    assert!(moved.header().is_none(), "{moved:?}");
}

#[tokio::test]
async fn quota_raises_nospace_until_compacted_defragmented_and_disarmed() {
    let m = Member::start_with(&["--quota-backend-bytes", "65536"]);
    let mut c = connect(&m).await;
    c.put("small", "a".repeat(64), None)
        .await
        .expect("small put");
    let member_id = c
        .status()
        .await
        .expect("status")
        .header()
        .expect("header")
        .member_id();

    let big = "b".repeat(4096);
    let mut refused = None;
    for _ in 0..100 {
        if let Err(e) = c.put("big", big.clone(), None).await {
            refused = Some(e);
            break;
        }
    }
    let refused = refused.expect("the quota refuses a put within 100 of 4 KiB");
    assert_eq!(message::<()>(Err(refused)), NO_SPACE);
    assert_eq!(
        alarms(&mut c).await,
        vec![(member_id, AlarmType::Nospace as i32)]
    );

    // Nothing that grows the store runs; reads and deletes do.
    assert_eq!(message(c.put("other", "x", None).await), NO_SPACE);
    assert_eq!(message(c.lease_grant(60, None).await), NO_SPACE);
    assert_eq!(c.get("small", None).await.expect("get").kvs().len(), 1);
    c.delete("small", None).await.expect("delete under NOSPACE");
    let status = c.status().await.expect("status");
    assert!(
        status.errors().iter().any(|e| e.contains("alarm:NOSPACE")),
        "{:?}",
        status.errors()
    );

    let revision = c
        .get("big", None)
        .await
        .expect("get")
        .header()
        .expect("header")
        .revision();
    c.compact(revision, Some(CompactionOptions::new().with_physical()))
        .await
        .expect("compact");
    c.defragment().await.expect("defragment");
    // Still refused: the alarm stays until disarmed.
    assert_eq!(message(c.put("other", "x", None).await), NO_SPACE);
    let mut disarm = AlarmOptions::new();
    disarm.with_member(member_id);
    let cleared = c
        .alarm(AlarmAction::Deactivate, AlarmType::Nospace, Some(disarm))
        .await
        .expect("disarm");
    assert_eq!(cleared.alarms().len(), 1);
    assert!(alarms(&mut c).await.is_empty());
    c.put("after", "a".repeat(64), None)
        .await
        .expect("put after disarming");
}

#[tokio::test]
async fn alarms_raised_by_hand_refuse_writes_and_survive_restart() {
    let mut m = Member::start();
    let mut c = connect(&m).await;
    c.put("k", "v", None).await.expect("put");
    let member_id = c
        .status()
        .await
        .expect("status")
        .header()
        .expect("header")
        .member_id();
    let mut options = AlarmOptions::new();
    options.with_member(member_id);
    let raised = c
        .alarm(
            AlarmAction::Activate,
            AlarmType::Corrupt,
            Some(options.clone()),
        )
        .await
        .expect("activate");
    assert_eq!(raised.alarms().len(), 1);
    assert_eq!(
        message(c.put("k", "w", None).await),
        "etcdserver: corrupt cluster"
    );
    assert_eq!(
        message(c.delete("k", None).await),
        "etcdserver: corrupt cluster"
    );

    drop(c);
    m.kill();
    m.spawn(&[]);
    let mut c = connect(&m).await;
    assert_eq!(
        alarms(&mut c).await,
        vec![(member_id, AlarmType::Corrupt as i32)]
    );
    c.alarm(AlarmAction::Deactivate, AlarmType::Corrupt, Some(options))
        .await
        .expect("deactivate");
    c.put("k", "w", Some(PutOptions::new()))
        .await
        .expect("put after deactivating");
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p) as usize]
}

/// Defragments while 8 writers put, and reports put latencies during the
/// defragmentation against the rest (a benchmark figure, not asserted).
/// Every put must succeed and every acknowledged value be there after.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn defragment_under_a_put_load() {
    let m = Member::start();
    let mut c = connect(&m).await;
    // History to reclaim: 2,000 revisions of 100 keys, then compacted.
    for i in 0..2000 {
        c.put(format!("k{}", i % 100), format!("{i:01000}"), None)
            .await
            .expect("fill");
    }
    let revision = c
        .get("k0", None)
        .await
        .expect("get")
        .header()
        .expect("header")
        .revision();
    c.compact(revision, None).await.expect("compact");

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..8 {
        let mut c = c.clone();
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let start = Instant::now();
                c.put(format!("w{w}"), format!("{n}"), None)
                    .await
                    .expect("put during defrag");
                latencies.push((start, start.elapsed()));
                n += 1;
            }
            (w, n, latencies)
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let defrag_start = Instant::now();
    c.defragment().await.expect("defragment");
    let defrag_end = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);

    let (mut during, mut other) = (Vec::new(), Vec::new());
    for writer in writers {
        let (w, n, latencies) = writer.await.expect("writer");
        assert!(n > 0);
        let last = c.get(format!("w{w}"), None).await.expect("get");
        assert_eq!(last.kvs()[0].value(), format!("{}", n - 1).as_bytes());
        for (start, latency) in latencies {
            if start + latency >= defrag_start && start <= defrag_end {
                during.push(latency);
            } else {
                other.push(latency);
            }
        }
    }
    during.sort();
    other.sort();
    eprintln!(
        "defragment took {:?}; puts during it: {} (p50 {:?}, p99 {:?}, max {:?}); other puts: {} (p50 {:?}, p99 {:?})",
        defrag_end - defrag_start,
        during.len(),
        percentile(&during, 0.5),
        percentile(&during, 0.99),
        during.last().copied().unwrap_or_default(),
        other.len(),
        percentile(&other, 0.5),
        percentile(&other, 0.99),
    );
    assert_eq!(
        c.get("k", Some(etcd_client::GetOptions::new().with_prefix()))
            .await
            .expect("get")
            .kvs()
            .len(),
        100
    );
}
