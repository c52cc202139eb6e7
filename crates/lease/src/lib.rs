//! The lessor: lease records, the keys attached to each, and the expiry
//! bookkeeping of the leader. Pure state: the member changes it only while
//! applying committed entries (grant, revoke, checkpoint, puts and deletes),
//! so every member holds the same records and attachments; expiries are the
//! leader's alone and never leave memory. Time comes in as arguments.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use cairn_lease::Lessor;
//!
//! let mut lessor = Lessor::new(5); // leases live at least 5 s
//! let start = Instant::now();
//! lessor.grant(7, 10, start)?;
//! lessor.attach(b"job/1", 7);
//! lessor.promote(start); // this member leads: it times the expiries
//!
//! assert!(lessor.expired(start + Duration::from_secs(9), 10).is_empty());
//! assert_eq!(lessor.expired(start + Duration::from_secs(11), 10), vec![7]);
//! // Revoking (once the cluster agreed) hands back the keys to delete.
//! assert_eq!(lessor.revoke(7)?, vec![b"job/1".to_vec()]);
//! # Ok::<(), cairn_lease::LeaseError>(())
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::time::{Duration, Instant};

/// etcd's largest TTL a lease may be granted with, in seconds.
pub const MAX_LEASE_TTL: i64 = 9_000_000_000;

/// How long an expired lease whose revoke was handed out waits before it is
/// handed out again (the revoke may have been lost with a leader change), as
/// etcd's expiredLeaseRetryInterval.
const EXPIRED_RETRY: Duration = Duration::from_secs(3);

/// A checkpoint carries whole seconds, rounded up: the leader proposes one
/// only while the rounding adds at most this much, so a member that resumes
/// from it is at most this late.
pub const CHECKPOINT_SLACK: Duration = Duration::from_millis(250);

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    #[error("lease not found")]
    NotFound,
    #[error("lease already exists")]
    Exists,
    #[error("too large lease TTL")]
    TtlTooLarge,
}

/// What is stored of a lease: its ID, granted TTL and the remaining TTL of
/// the last checkpoint (0: none yet, the whole TTL remains).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseRecord {
    pub id: i64,
    pub ttl: i64,
    pub remaining_ttl: i64,
}

/// A lease as TimeToLive reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseInfo {
    pub id: i64,
    pub granted_ttl: i64,
    /// Seconds left: from the expiry on the leader, from the last
    /// checkpoint elsewhere.
    pub ttl: i64,
    pub keys: Vec<Vec<u8>>,
}

#[derive(Debug)]
struct Lease {
    record: LeaseRecord,
    keys: BTreeSet<Vec<u8>>,
    /// Set on the leader only.
    expiry: Option<Instant>,
    /// When this member applied the grant or the latest checkpoint; None
    /// for a lease loaded from the store (at start or from a snapshot).
    applied_at: Option<Instant>,
    /// Leader only: renewed since its last checkpoint proposal.
    dirty: bool,
}

impl Lease {
    /// The TTL a new leader starts the lease with.
    fn resume_ttl(&self) -> i64 {
        if self.record.remaining_ttl > 0 {
            self.record.remaining_ttl
        } else {
            self.record.ttl
        }
    }
}

/// Every lease of the member, and which lease each key is attached to.
#[derive(Debug)]
pub struct Lessor {
    min_ttl: i64,
    leases: BTreeMap<i64, Lease>,
    key_lease: BTreeMap<Vec<u8>, i64>,
    /// True while this member is the leader: then every lease has an expiry.
    primary: bool,
}

fn seconds(ttl: i64) -> Duration {
    Duration::from_secs(u64::try_from(ttl).unwrap_or(0))
}

impl Lessor {
    /// A lessor that raises granted TTLs below `min_ttl` seconds to it.
    pub fn new(min_ttl: i64) -> Lessor {
        Lessor {
            min_ttl,
            leases: BTreeMap::new(),
            key_lease: BTreeMap::new(),
            primary: false,
        }
    }

    /// Replaces every lease and attachment with stored ones, as at start or
    /// after a snapshot restore. Keys naming a lease not in `records` stay
    /// unattached. Leaves the lessor a follower's.
    pub fn load(
        &mut self,
        records: impl IntoIterator<Item = LeaseRecord>,
        keys: impl IntoIterator<Item = (Vec<u8>, i64)>,
    ) {
        self.leases = records
            .into_iter()
            .map(|record| {
                let lease = Lease {
                    record,
                    keys: BTreeSet::new(),
                    expiry: None,
                    applied_at: None,
                    dirty: false,
                };
                (record.id, lease)
            })
            .collect();
        self.key_lease.clear();
        self.primary = false;
        for (key, id) in keys {
            self.attach(&key, id);
        }
    }

    pub fn contains(&self, id: i64) -> bool {
        self.leases.contains_key(&id)
    }

    /// The lease `key` is attached to, if any.
    pub fn lease_of(&self, key: &[u8]) -> Option<i64> {
        self.key_lease.get(key).copied()
    }

    pub fn record(&self, id: i64) -> Option<LeaseRecord> {
        self.leases.get(&id).map(|l| l.record)
    }

    /// IDs of every lease, in order.
    pub fn ids(&self) -> Vec<i64> {
        self.leases.keys().copied().collect()
    }

    pub fn is_primary(&self) -> bool {
        self.primary
    }

    /// Grants lease `id` for `ttl` seconds (raised to the minimum).
    pub fn grant(&mut self, id: i64, ttl: i64, now: Instant) -> Result<LeaseRecord, LeaseError> {
        if id == 0 {
            return Err(LeaseError::NotFound);
        }
        if ttl > MAX_LEASE_TTL {
            return Err(LeaseError::TtlTooLarge);
        }
        if self.leases.contains_key(&id) {
            return Err(LeaseError::Exists);
        }
        let record = LeaseRecord {
            id,
            ttl: ttl.max(self.min_ttl),
            remaining_ttl: 0,
        };
        let expiry = self.primary.then(|| now + seconds(record.ttl));
        self.leases.insert(
            id,
            Lease {
                record,
                keys: BTreeSet::new(),
                expiry,
                applied_at: Some(now),
                dirty: false,
            },
        );
        Ok(record)
    }

    /// Removes lease `id`; returns the keys that were attached to it, which
    /// the caller deletes.
    pub fn revoke(&mut self, id: i64) -> Result<Vec<Vec<u8>>, LeaseError> {
        let lease = self.leases.remove(&id).ok_or(LeaseError::NotFound)?;
        for key in &lease.keys {
            self.key_lease.remove(key);
        }
        Ok(lease.keys.into_iter().collect())
    }

    /// Attaches `key` to lease `id` (0: to none), detaching it from the
    /// lease it had. A lease that does not exist attaches nothing.
    pub fn attach(&mut self, key: &[u8], id: i64) {
        if self.key_lease.get(key) == Some(&id) {
            return;
        }
        self.detach(key);
        if let Some(lease) = self.leases.get_mut(&id) {
            lease.keys.insert(key.to_vec());
            self.key_lease.insert(key.to_vec(), id);
        }
    }

    /// Detaches a deleted key from its lease.
    pub fn detach(&mut self, key: &[u8]) {
        if let Some(id) = self.key_lease.remove(key)
            && let Some(lease) = self.leases.get_mut(&id)
        {
            lease.keys.remove(key);
        }
    }

    /// Detaches every key in [start, end), or from `start` on when `end` is
    /// None: the keys a delete-range removed.
    pub fn detach_range(&mut self, start: &[u8], end: Option<&[u8]>) {
        let upper = end.map_or(Bound::Unbounded, |e| Bound::Excluded(e.to_vec()));
        if matches!(&upper, Bound::Excluded(e) if e.as_slice() <= start) {
            return;
        }
        let keys: Vec<Vec<u8>> = self
            .key_lease
            .range((Bound::Included(start.to_vec()), upper))
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            self.detach(&key);
        }
    }

    /// Records a checkpointed remaining TTL, applied at `now`; a missing
    /// lease is ignored (it was revoked after the checkpoint was proposed).
    pub fn checkpoint(&mut self, id: i64, remaining_ttl: i64, now: Instant) -> Option<LeaseRecord> {
        let lease = self.leases.get_mut(&id)?;
        lease.record.remaining_ttl = remaining_ttl;
        lease.applied_at = Some(now);
        Some(lease.record)
    }

    /// This member became the leader: every lease expires its checkpointed
    /// remaining TTL after this member applied that checkpoint (or the
    /// grant), as the old leader counted it; a lease loaded from the store
    /// since then, its remaining TTL from now.
    pub fn promote(&mut self, now: Instant) {
        self.primary = true;
        for lease in self.leases.values_mut() {
            let from = lease.applied_at.unwrap_or(now);
            lease.expiry = Some(from + seconds(lease.resume_ttl()));
            lease.dirty = false;
        }
    }

    /// This member is no longer the leader: it expires nothing.
    pub fn demote(&mut self) {
        self.primary = false;
        for lease in self.leases.values_mut() {
            lease.expiry = None;
            lease.dirty = false;
        }
    }

    /// A keep-alive on the leader: the lease expires its granted TTL from
    /// now, and is due for a checkpoint (`checkpoints`) so that a next
    /// leader knows. Returns that TTL.
    pub fn renew(&mut self, id: i64, now: Instant) -> Result<i64, LeaseError> {
        let primary = self.primary;
        let lease = self.leases.get_mut(&id).ok_or(LeaseError::NotFound)?;
        if primary {
            lease.expiry = Some(now + seconds(lease.record.ttl));
            lease.dirty = true;
        }
        Ok(lease.record.ttl)
    }

    /// Up to `limit` leases expired at `now`, soonest first, for the leader
    /// to revoke. Each is handed out again only after a retry interval.
    pub fn expired(&mut self, now: Instant, limit: usize) -> Vec<i64> {
        let mut due: Vec<(Instant, i64)> = self
            .leases
            .values()
            .filter_map(|l| l.expiry.filter(|e| *e <= now).map(|e| (e, l.record.id)))
            .collect();
        due.sort_unstable();
        due.truncate(limit);
        for (_, id) in &due {
            if let Some(lease) = self.leases.get_mut(id) {
                lease.expiry = Some(now + EXPIRED_RETRY);
            }
        }
        due.into_iter().map(|(_, id)| id).collect()
    }

    /// Remaining TTLs (seconds) to propose as a checkpoint, at most
    /// `limit`: of the leases renewed since their last one, and of those
    /// whose checkpoint is out of date and was applied at least `refresh`
    /// ago (or never here). Only while rounding up to whole seconds adds at
    /// most `CHECKPOINT_SLACK`; a lease not due now is due within a second.
    /// The renewed ones count as checkpointed from here on.
    pub fn checkpoints(
        &mut self,
        now: Instant,
        refresh: Duration,
        limit: usize,
    ) -> Vec<(i64, i64)> {
        let mut due = Vec::new();
        for l in self.leases.values_mut() {
            if due.len() >= limit {
                break;
            }
            let Some(expiry) = l.expiry else { continue };
            let left = expiry.saturating_duration_since(now);
            let remaining = remaining_secs(expiry, now);
            if remaining <= 0 || seconds(remaining) - left > CHECKPOINT_SLACK {
                continue;
            }
            let stale = remaining != l.record.remaining_ttl
                && l.applied_at
                    .is_none_or(|at| now.saturating_duration_since(at) >= refresh);
            if l.dirty || stale {
                l.dirty = false;
                due.push((l.record.id, remaining));
            }
        }
        due
    }

    /// Lease `id` as TimeToLive reports it.
    pub fn info(&self, id: i64, now: Instant) -> Option<LeaseInfo> {
        let lease = self.leases.get(&id)?;
        let ttl = match lease.expiry {
            Some(expiry) => remaining_secs(expiry, now),
            None => lease.resume_ttl(),
        };
        Some(LeaseInfo {
            id,
            granted_ttl: lease.record.ttl,
            ttl,
            keys: lease.keys.iter().cloned().collect(),
        })
    }
}

/// Whole seconds until `expiry`, rounded up, as etcd checkpoints them.
fn remaining_secs(expiry: Instant, now: Instant) -> i64 {
    let left = expiry.saturating_duration_since(now);
    let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
    i64::try_from(secs).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn grant_raises_short_ttls_and_refuses_duplicates_and_huge_ones() {
        let now = Instant::now();
        let mut l = Lessor::new(2);
        assert_eq!(l.grant(1, 1, now).map(|r| r.ttl), Ok(2));
        assert_eq!(l.grant(1, 10, now), Err(LeaseError::Exists));
        assert_eq!(
            l.grant(2, MAX_LEASE_TTL + 1, now),
            Err(LeaseError::TtlTooLarge)
        );
        assert_eq!(l.grant(0, 10, now), Err(LeaseError::NotFound));
        assert_eq!(
            l.grant(3, MAX_LEASE_TTL, now).map(|r| r.ttl),
            Ok(MAX_LEASE_TTL)
        );
    }

    #[test]
    fn keys_move_between_leases_and_revoke_returns_them() {
        let now = Instant::now();
        let mut l = Lessor::new(1);
        l.grant(1, 10, now).expect("test value");
        l.grant(2, 10, now).expect("test value");
        l.attach(b"a", 1);
        l.attach(b"b", 1);
        l.attach(b"c", 2);
        l.attach(b"b", 2);
        l.attach(b"x", 99);
        assert_eq!(
            l.info(1, now).expect("test value").keys,
            vec![b"a".to_vec()]
        );
        l.detach_range(b"c", None);
        assert_eq!(
            l.info(2, now).expect("test value").keys,
            vec![b"b".to_vec()]
        );
        assert_eq!(l.revoke(2), Ok(vec![b"b".to_vec()]));
        assert_eq!(l.revoke(2), Err(LeaseError::NotFound));
        l.attach(b"a", 0);
        assert_eq!(l.revoke(1), Ok(vec![]));
    }

    #[test]
    fn only_the_leader_expires_and_resumes_from_the_checkpoint() {
        let t0 = Instant::now();
        let mut l = Lessor::new(1);
        l.grant(1, 10, t0).expect("test value");
        l.grant(2, 100, t0).expect("test value");
        assert!(l.expired(t0 + seconds(1000), 10).is_empty(), "a follower");
        assert_eq!(l.info(2, t0).expect("test value").ttl, 100);
        l.checkpoint(2, 5, t0);
        l.promote(t0);
        assert_eq!(
            l.info(2, t0).expect("test value").ttl,
            5,
            "from the checkpoint"
        );
        assert_eq!(l.expired(t0 + seconds(5), 10), vec![2]);
        assert!(l.expired(t0 + seconds(6), 10).is_empty(), "retried later");
        assert_eq!(l.expired(t0 + seconds(8), 10), vec![2]);
        l.revoke(2).expect("test value");
        assert_eq!(l.renew(1, t0 + seconds(9)), Ok(10));
        assert!(l.expired(t0 + seconds(18), 10).is_empty());
        assert_eq!(l.expired(t0 + seconds(19), 10), vec![1]);
        assert_eq!(l.renew(7, t0), Err(LeaseError::NotFound));
        l.demote();
        assert!(l.expired(t0 + seconds(1000), 10).is_empty());
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    const REFRESH: Duration = Duration::from_secs(5);

    #[test]
    fn checkpoints_report_stale_remaining_ttls_near_whole_seconds() {
        let t0 = Instant::now();
        let mut l = Lessor::new(1);
        l.promote(t0);
        l.grant(1, 10, t0).expect("test value");
        assert!(
            l.checkpoints(t0 + ms(2500), REFRESH, 10).is_empty(),
            "fresh"
        );
        assert!(
            l.checkpoints(t0 + ms(5500), REFRESH, 10).is_empty(),
            "5 s rounded up would be 500 ms late"
        );
        assert_eq!(l.checkpoints(t0 + ms(6100), REFRESH, 10), vec![(1, 4)]);
        l.checkpoint(1, 4, t0 + ms(6100));
        assert!(l.checkpoints(t0 + ms(7000), REFRESH, 10).is_empty());
        assert!(
            l.checkpoints(t0 + ms(10_000), REFRESH, 10).is_empty(),
            "expired"
        );
        let mut follower = Lessor::new(1);
        follower.grant(1, 10, t0).expect("test value");
        assert!(follower.checkpoints(t0 + ms(9000), REFRESH, 10).is_empty());
    }

    #[test]
    fn a_renewal_is_checkpointed_once_within_the_slack() {
        let t0 = Instant::now();
        let mut l = Lessor::new(1);
        l.promote(t0);
        l.grant(1, 10, t0).expect("test value");
        l.grant(2, 10, t0).expect("test value");
        let r = t0 + ms(3400);
        assert_eq!(l.renew(1, r), Ok(10));
        assert!(
            l.checkpoints(r + CHECKPOINT_SLACK + ms(1), REFRESH, 10)
                .is_empty(),
            "rounding would add more than the slack"
        );
        assert_eq!(l.checkpoints(r + ms(1100), REFRESH, 10), vec![(1, 9)]);
        assert!(l.checkpoints(r + ms(1200), REFRESH, 10).is_empty(), "once");
        l.renew(1, r + ms(2000)).expect("test value");
        assert_eq!(l.checkpoints(r + ms(2000), REFRESH, 10), vec![(1, 10)]);
        let mut follower = Lessor::new(1);
        follower.grant(1, 10, t0).expect("test value");
        follower.renew(1, r).expect("test value");
        assert!(follower.checkpoints(r, REFRESH, 10).is_empty());
    }

    #[test]
    fn a_new_leader_counts_from_when_it_applied_the_checkpoint() {
        let t0 = Instant::now();
        let mut l = Lessor::new(1);
        l.grant(1, 8, t0).expect("test value");
        l.grant(2, 10, t0).expect("test value");
        l.checkpoint(2, 6, t0 + ms(4000));
        l.promote(t0 + ms(3000));
        assert_eq!(l.info(1, t0 + ms(3000)).expect("test value").ttl, 5);
        assert!(l.expired(t0 + ms(7999), 10).is_empty());
        assert_eq!(l.expired(t0 + ms(8000), 10), vec![1]);
        assert!(l.expired(t0 + ms(9999), 10).is_empty());
        assert_eq!(l.expired(t0 + ms(10_000), 10), vec![2]);
        // Loaded from the store: no apply instant, the whole remaining TTL
        // from the promotion.
        let mut loaded = Lessor::new(1);
        loaded.load(
            [LeaseRecord {
                id: 3,
                ttl: 10,
                remaining_ttl: 4,
            }],
            [],
        );
        loaded.promote(t0 + ms(500));
        assert!(loaded.expired(t0 + ms(4499), 10).is_empty());
        assert_eq!(loaded.expired(t0 + ms(4500), 10), vec![3]);
    }

    #[test]
    fn a_lease_past_its_expiry_at_promotion_expires_at_once() {
        let t0 = Instant::now();
        let mut l = Lessor::new(1);
        l.grant(1, 2, t0).expect("test value");
        l.promote(t0 + ms(5000));
        assert_eq!(l.expired(t0 + ms(5000), 10), vec![1]);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Grant(i64),
        Revoke(i64),
        Attach(u8, i64),
        Detach(u8),
        DetachRange(u8, Option<u8>),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1..5i64).prop_map(Op::Grant),
            (1..5i64).prop_map(Op::Revoke),
            (0..8u8, 0..5i64).prop_map(|(k, l)| Op::Attach(k, l)),
            (0..8u8).prop_map(Op::Detach),
            (0..8u8, proptest::option::of(0..9u8)).prop_map(|(s, e)| Op::DetachRange(s, e)),
        ]
    }

    proptest! {
        /// The lessor agrees with a plain map of key → lease.
        #[test]
        fn attachments_match_a_model(ops in proptest::collection::vec(op(), 0..64)) {
            let now = Instant::now();
            let mut l = Lessor::new(1);
            let mut leases = BTreeSet::new();
            let mut model: BTreeMap<u8, i64> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Grant(id) => {
                        prop_assert_eq!(l.grant(id, 5, now).is_ok(), leases.insert(id));
                    }
                    Op::Revoke(id) => {
                        let mut expect: Vec<Vec<u8>> = model
                            .iter().filter(|(_, l)| **l == id).map(|(k, _)| vec![*k]).collect();
                        expect.sort();
                        let got = l.revoke(id);
                        if leases.remove(&id) {
                            prop_assert_eq!(got, Ok(expect));
                            model.retain(|_, l| *l != id);
                        } else {
                            prop_assert_eq!(got, Err(LeaseError::NotFound));
                        }
                    }
                    Op::Attach(k, id) => {
                        l.attach(&[k], id);
                        model.remove(&k);
                        if leases.contains(&id) {
                            model.insert(k, id);
                        }
                    }
                    Op::Detach(k) => {
                        l.detach(&[k]);
                        model.remove(&k);
                    }
                    Op::DetachRange(s, e) => {
                        l.detach_range(&[s], e.as_ref().map(std::slice::from_ref));
                        model.retain(|k, _| *k < s || e.is_some_and(|e| *k >= e));
                    }
                }
            }
            for id in &leases {
                let expect: Vec<Vec<u8>> = model
                    .iter().filter(|(_, l)| *l == id).map(|(k, _)| vec![*k]).collect();
                prop_assert_eq!(l.info(*id, now).map(|i| i.keys), Some(expect));
            }
        }
    }
}
