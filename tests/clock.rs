//! Wall clocks that jump: leases are timed with monotonic clocks and
//! decided by the leader, so a leader whose wall clock jumps ten minutes
//! forward, then back, neither expires a lease early nor keeps it late.
//! The jumping clock is libfaketime's (Debian's `faketime`), preloaded into
//! one member with its monotonic clock left real, as a clock step by NTP
//! or an operator would leave it.

mod common;

use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::faketime::{FakeClock, minute};
use etcd_client::{GetOptions, PutOptions};

#[test]
fn a_leaders_wall_clock_jumping_expires_no_lease_early_or_late() {
    let Some(clock) = FakeClock::new() else {
        eprintln!("skipped: libfaketime is not installed (Debian's faketime)");
        return;
    };
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let mut cluster = Cluster::start(3);
    // m0 restarts with its wall clock ten minutes ahead, so its log shows the
    // jump whatever it does next; then it becomes the leader, the member that
    // decides when leases expire.
    clock.set("+10m");
    let ahead = [minute("+10 min"), minute("+11 min")];
    cluster.restart_with_env(0, clock.env());
    runtime.block_on(async {
        let leader = cluster.wait_leader(Duration::from_secs(10)).await;
        if leader != 0 {
            let id = format!("{:x}", cluster.node(0).id);
            cluster.etcdctl_ok(leader, &["move-leader", &id]);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while cluster.leader().await != Some(0) {
            assert!(Instant::now() < deadline, "m0 did not become the leader");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let log = cluster.log_text(0);
    assert!(
        ahead.iter().any(|m| log.contains(m.as_str())),
        "m0's clock did not jump: no log line at {ahead:?}"
    );

    runtime.block_on(async {
        let mut c = cluster.client(0).await;
        let lease = c.lease_grant(5, None).await.expect("grant").id();
        let granted = Instant::now();
        c.put("held", "v", Some(PutOptions::new().with_lease(lease)))
            .await
            .expect("put");
        // Ten minutes ahead, the leader still counts five seconds.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        for i in 0..cluster.len() {
            let mut member = cluster.client(i).await;
            let got = member
                .get("held", Some(GetOptions::new().with_serializable()))
                .await
                .expect("get");
            assert_eq!(got.kvs().len(), 1, "m{i} lost the key of a live lease");
        }
        let ttl = c.lease_time_to_live(lease, None).await.expect("ttl").ttl();
        assert!((1..=3).contains(&ttl), "2.5 s into a 5 s lease, ttl {ttl}");

        // Ten minutes behind now: the lease still ends on time.
        clock.set("-10m");
        loop {
            let gone = c.get("held", None).await.expect("get").kvs().is_empty();
            let waited = granted.elapsed();
            if gone {
                assert!(
                    waited >= Duration::from_secs(4),
                    "expired early, after {waited:?}"
                );
                break;
            }
            assert!(
                waited < Duration::from_secs(9),
                "not expired after {waited:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}
