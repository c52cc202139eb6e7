//! A slow disk on one follower: its fdatasync takes 1.2 s (a shim preloaded
//! into that member only). The others keep committing with one leader and
//! one term, every write is acknowledged, and the slow member says so as
//! etcd's does: "slow fdatasync" in its log, fsyncs over a second in
//! etcd_disk_wal_fsync_duration_seconds.

mod common;

use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::http::request;
use common::slow_disk::build_shim;

#[test]
fn a_follower_with_a_slow_disk_stalls_nobody_and_says_so() {
    let shim_dir = tempfile::tempdir().expect("a temp dir");
    let Some(shim) = build_shim(shim_dir.path()) else {
        eprintln!("skipped: no C compiler to build the fdatasync shim");
        return;
    };
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let mut cluster = Cluster::start(3);
    let leader = runtime.block_on(cluster.wait_leader(Duration::from_secs(10)));
    let slow = (leader + 1) % cluster.len();
    cluster.restart_with_env(
        slow,
        vec![
            ("LD_PRELOAD".into(), shim.display().to_string()),
            ("SLOW_FDATASYNC_MS".into(), "1200".into()),
        ],
    );
    let (leader, term) = runtime.block_on(async {
        let leader = cluster.wait_leader(Duration::from_secs(10)).await;
        let term = cluster.status(leader).await.expect("status").raft_term();
        (leader, term)
    });

    // Six seconds of writes through the leader: each is acknowledged by the
    // leader and the healthy follower, whatever the slow one does.
    runtime.block_on(async {
        let mut c = cluster.client(leader).await;
        let until = Instant::now() + Duration::from_secs(6);
        let mut i = 0;
        while Instant::now() < until {
            let started = Instant::now();
            c.put(format!("k{i}"), "v", None).await.expect("a put");
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "a put waited {:?} for the slow disk",
                started.elapsed()
            );
            i += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(i > 50, "only {i} puts in 6 s");
        for m in 0..cluster.len() {
            let status = cluster.status(m).await.expect("status");
            assert_eq!(status.raft_term(), term, "m{m}: an election happened");
            assert_eq!(
                cluster.index_of(status.leader()),
                Some(leader),
                "m{m} follows another leader"
            );
        }
    });

    let log = cluster.log_text(slow);
    assert!(
        log.contains("slow fdatasync"),
        "the slow member did not say so"
    );
    let metrics = request(&cluster.endpoint(slow), "GET", "/metrics", "").body;
    let bucket = |le: &str| -> u64 {
        let prefix = format!("etcd_disk_wal_fsync_duration_seconds_bucket{{le=\"{le}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {prefix} in the metrics"))
    };
    assert!(
        bucket("+Inf") > bucket("1.024"),
        "no fsync over a second in the slow member's metrics"
    );
}
