//! What the consensus layer counts for the member's /metrics: one atomic
//! add on each hot path, read when metrics are scraped.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the fsync histogram's buckets: etcd's
/// etcd_disk_wal_fsync_duration_seconds, 1 ms doubling up to about 8 s.
pub const FSYNC_BUCKETS: [f64; 14] = [
    0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048, 4.096,
    8.192,
];

/// The raft member's counters.
#[derive(Default)]
pub struct RaftMetrics {
    leader_changes: AtomicU64,
    proposals_pending: AtomicI64,
    proposals_failed: AtomicU64,
    /// Per bucket (not cumulative), then the overflow.
    fsync_buckets: [AtomicU64; FSYNC_BUCKETS.len() + 1],
    fsync_nanos: AtomicU64,
    fsync_count: AtomicU64,
}

/// A read of the counters.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RaftMetricsSnapshot {
    pub leader_changes: u64,
    pub proposals_pending: i64,
    pub proposals_failed: u64,
    /// Cumulative counts, one per bucket of [`FSYNC_BUCKETS`].
    pub fsync_cumulative: Vec<u64>,
    pub fsync_seconds_sum: f64,
    pub fsync_count: u64,
}

impl RaftMetrics {
    pub(crate) fn leader_changed(&self) {
        self.leader_changes.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn proposal_started(&self) {
        self.proposals_pending.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn proposal_ended(&self, failed: bool) {
        self.proposals_pending.fetch_sub(1, Ordering::Relaxed);
        if failed {
            self.proposals_failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn fsynced(&self, took: Duration) {
        let seconds = took.as_secs_f64();
        let bucket = FSYNC_BUCKETS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(FSYNC_BUCKETS.len());
        self.fsync_buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.fsync_nanos
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
        self.fsync_count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> RaftMetricsSnapshot {
        let mut cumulative = Vec::with_capacity(FSYNC_BUCKETS.len());
        let mut total = 0;
        for bucket in &self.fsync_buckets[..FSYNC_BUCKETS.len()] {
            total += bucket.load(Ordering::Relaxed);
            cumulative.push(total);
        }
        RaftMetricsSnapshot {
            leader_changes: self.leader_changes.load(Ordering::Relaxed),
            proposals_pending: self.proposals_pending.load(Ordering::Relaxed),
            proposals_failed: self.proposals_failed.load(Ordering::Relaxed),
            fsync_cumulative: cumulative,
            fsync_seconds_sum: self.fsync_nanos.load(Ordering::Relaxed) as f64 / 1e9,
            fsync_count: self.fsync_count.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fsyncs_fall_in_cumulative_buckets() {
        let metrics = RaftMetrics::default();
        metrics.fsynced(Duration::from_micros(500));
        metrics.fsynced(Duration::from_millis(3));
        metrics.fsynced(Duration::from_secs(20));
        let s = metrics.snapshot();
        assert_eq!(s.fsync_cumulative[0], 1);
        assert_eq!(s.fsync_cumulative[2], 2);
        assert_eq!(s.fsync_cumulative[FSYNC_BUCKETS.len() - 1], 2);
        assert_eq!(s.fsync_count, 3);
        assert!((s.fsync_seconds_sum - 20.0035).abs() < 1e-6);
    }

    #[test]
    fn proposals_pend_until_they_end() {
        let metrics = RaftMetrics::default();
        metrics.proposal_started();
        metrics.proposal_started();
        metrics.proposal_ended(false);
        metrics.proposal_ended(true);
        metrics.leader_changed();
        let s = metrics.snapshot();
        assert_eq!(
            (s.proposals_pending, s.proposals_failed, s.leader_changes),
            (0, 1, 1)
        );
    }
}
