use proptest::prelude::*;

use super::*;

fn ready(shard: ShardId, after: u64, through: u64, revisions: u64) -> BatchReady {
    BatchReady {
        shard,
        after,
        through,
        revisions,
        ..Default::default()
    }
}

#[test]
fn batches_get_the_next_revisions_in_order() -> Result<(), ShardError> {
    let mut sequencer = Sequencer::new(4, 1)?;
    let done = sequencer.sequence(
        &[ready(2, 0, 3, 3), ready(0, 0, 1, 1), ready(2, 3, 4, 0)],
        &|_| true,
    );
    let firsts: Vec<(ShardId, i64, u64)> = done
        .iter()
        .map(|b| (b.shard, b.first_revision, b.revisions))
        .collect();
    assert_eq!(firsts, vec![(2, 2, 3), (0, 5, 1), (2, 6, 0)]);
    assert_eq!(sequencer.revision(), 5);
    assert_eq!(sequencer.sequenced_through(2), Some(4));
    assert_eq!(sequencer.sequenced_through(9), None);
    assert_eq!(sequencer.last(2), Some(&done[2]));
    assert_eq!(sequencer.last(0), Some(&done[1]));
    assert_eq!(sequencer.last(1), None);
    Ok(())
}

#[test]
fn resent_overlapping_and_unknown_batches_get_nothing() -> Result<(), ShardError> {
    let mut sequencer = Sequencer::new(2, 1)?;
    assert_eq!(sequencer.sequence(&[ready(1, 0, 5, 5)], &|_| true).len(), 1);
    // A new leader re-sends what the old one sent, or starts too early or
    // too late; a shard that does not exist; an empty batch.
    let refused = [
        ready(1, 0, 5, 5),
        ready(1, 2, 7, 5),
        ready(1, 6, 7, 1),
        ready(7, 0, 1, 1),
        ready(0, 0, 0, 0),
    ];
    assert!(sequencer.sequence(&refused, &|_| true).is_empty());
    assert_eq!(sequencer.revision(), 6);
    Ok(())
}

#[test]
fn the_ledger_knows_who_owns_a_revision_and_what_a_read_needs() {
    let mut ledger = RevisionLedger::new(1);
    let batch = |shard, after, through, first_revision, revisions| Sequenced {
        shard,
        after,
        through,
        first_revision,
        revisions,
        leases: Vec::new(),
    };
    ledger.record([batch(0, 0, 2, 2, 2), batch(1, 0, 1, 4, 1)], 4);
    ledger.record([batch(0, 2, 3, 5, 0), batch(0, 3, 6, 5, 3)], 7);
    assert_eq!(ledger.known(), 7);
    assert_eq!(ledger.owner(3).map(|b| b.shard), Some(0));
    assert_eq!(ledger.owner(4).map(|b| b.shard), Some(1));
    assert_eq!(ledger.owner(7).map(|b| b.through), Some(6));
    assert!(ledger.owner(1).is_none() && ledger.owner(8).is_none());
    assert_eq!(ledger.applied_needed(0, 1), Some(0));
    assert_eq!(ledger.applied_needed(0, 4), Some(2));
    assert_eq!(ledger.applied_needed(1, 7), Some(1));
    assert_eq!(ledger.applied_needed(0, 6), Some(6));
    assert_eq!(ledger.applied_needed(0, 8), None, "not known yet");
    ledger.forget_through(4);
    assert!(ledger.owner(3).is_none());
    assert_eq!(ledger.owner(5).map(|b| b.through), Some(6));
}

/// Each shard's log: how many revisions each of its entries takes.
fn shard_logs() -> impl Strategy<Value = Vec<Vec<u64>>> {
    prop::collection::vec(prop::collection::vec(0u64..3, 0..20), 1..6)
}

proptest! {
    /// Leaders send batches of random sizes, some twice, some from a stale
    /// view (as after a leader change); whatever arrives in whatever
    /// order, each write gets exactly one revision, revisions are dense
    /// from the start, and each shard's entries keep their log order.
    #[test]
    fn revisions_are_dense_and_each_entry_is_sequenced_once(
        logs in shard_logs(),
        cuts in prop::collection::vec(1u64..5, 64),
        stale in prop::collection::vec(any::<bool>(), 64),
        order_seed in any::<u64>(),
    ) {
        let shards = logs.len() as u32;
        let mut sequencer = Sequencer::new(shards, 1).expect("valid");
        let mut ledger = RevisionLedger::new(1);
        let mut all = Vec::new();
        let mut round = 0usize;
        let mut seed = order_seed | 1;
        while (0..shards).any(|s| sequencer.sequenced_through(s) < Some(logs[s as usize].len() as u64)) {
            prop_assert!(round < 10_000, "no progress");
            let mut batches = Vec::new();
            for shard in 0..shards {
                let log = &logs[shard as usize];
                let known = sequencer.sequenced_through(shard).unwrap_or(0);
                // A stale leader believes less was sequenced than was.
                let after = if stale[round % stale.len()] { known.saturating_sub(1) } else { known };
                let through = (after + cuts[(round + shard as usize) % cuts.len()]).min(log.len() as u64);
                if through > after {
                    let revisions = log[after as usize..through as usize].iter().sum();
                    batches.push(ready(shard, after, through, revisions));
                }
            }
            // Shuffle deterministically (xorshift), and repeat one batch.
            for i in (1..batches.len()).rev() {
                seed ^= seed << 13; seed ^= seed >> 7; seed ^= seed << 17;
                batches.swap(i, (seed % (i as u64 + 1)) as usize);
            }
            if let Some(first) = batches.first().cloned() {
                batches.push(first);
            }
            let done = sequencer.sequence(&batches, &|_| true);
            ledger.record(done.iter().cloned(), sequencer.revision());
            all.extend(done);
            round += 1;
        }
        // Dense: batches that take revisions tile 2..=revision exactly.
        let mut next = 2i64;
        let mut taking: Vec<&Sequenced> = all.iter().filter(|b| b.revisions > 0).collect();
        taking.sort_by_key(|b| b.first_revision);
        for batch in &taking {
            prop_assert_eq!(batch.first_revision, next);
            next = batch.end_revision();
        }
        let total: u64 = logs.iter().flatten().sum();
        prop_assert_eq!(sequencer.revision(), 1 + total as i64);
        // Per shard: batches are contiguous, in order, cover the log once,
        // and each takes what its entries take.
        for (shard, log) in logs.iter().enumerate() {
            let mut at = 0;
            for batch in all.iter().filter(|b| b.shard as usize == shard) {
                prop_assert_eq!(batch.after, at);
                let want: u64 = log[batch.after as usize..batch.through as usize].iter().sum();
                prop_assert_eq!(batch.revisions, want);
                at = batch.through;
            }
            prop_assert_eq!(at, log.len() as u64);
        }
        // The ledger names the owner of every revision.
        for batch in &taking {
            for revision in batch.first_revision..batch.end_revision() {
                prop_assert_eq!(ledger.owner(revision), Some(*batch));
            }
        }
    }
}

#[test]
fn a_batch_is_sequenced_only_where_its_view_of_the_leases_holds() -> Result<(), ShardError> {
    let mut sequencer = Sequencer::new(2, 1)?;
    let leased = |leases: Vec<i64>, missing: Vec<i64>| BatchReady {
        leases,
        missing,
        ..ready(0, 0, 1, 1)
    };
    let only_7 = |id| id == 7;
    assert!(
        sequencer
            .sequence(&[leased(vec![8], vec![])], &only_7)
            .is_empty()
    );
    assert!(
        sequencer
            .sequence(&[leased(vec![], vec![7])], &only_7)
            .is_empty()
    );
    let done = sequencer.sequence(&[leased(vec![7], vec![8])], &only_7);
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].leases, vec![7]);
    Ok(())
}

#[test]
fn a_revoke_takes_one_revision_and_holds_its_shards_until_they_applied_it() -> Result<(), ShardError>
{
    let mut sequencer = Sequencer::new(3, 1)?;
    assert_eq!(sequencer.sequence(&[ready(0, 0, 1, 1)], &|_| true).len(), 1);
    // No keys: no revision.
    assert_eq!(sequencer.revoke(7, BTreeMap::new()), None);
    let keys = BTreeMap::from([(0, vec![b"a".to_vec()]), (2, vec![b"b".to_vec()])]);
    assert_eq!(sequencer.revoke(7, keys), Some(3));
    assert_eq!(sequencer.revision(), 3);
    assert_eq!((sequencer.last_revoke(0), sequencer.last_revoke(1)), (3, 0));
    assert_eq!(sequencer.revokes(2)[0].keys, vec![b"b".to_vec()]);
    assert!(sequencer.revokes_pending());
    // Shard 0's next batch run before it applied the revoke is refused;
    // run after, it is sequenced, and the revoke is no longer pending there.
    assert!(
        sequencer
            .sequence(&[ready(0, 1, 2, 1)], &|_| true)
            .is_empty()
    );
    let after = BatchReady {
        revoked: 3,
        ..ready(0, 1, 2, 1)
    };
    let done = sequencer.sequence(&[after, ready(1, 0, 1, 1)], &|_| true);
    assert_eq!(
        done.iter().map(|b| b.first_revision).collect::<Vec<_>>(),
        vec![4, 5]
    );
    assert!(sequencer.revokes(0).is_empty());
    assert_eq!(sequencer.revokes(2).len(), 1);
    // The state survives its record.
    let record = serde_json::to_vec(&sequencer).map_err(|_| ShardError::NoMembers)?;
    let back: Sequencer = serde_json::from_slice(&record).map_err(|_| ShardError::NoMembers)?;
    assert_eq!(back, sequencer);
    Ok(())
}
