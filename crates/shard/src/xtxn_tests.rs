use std::collections::BTreeMap;

use super::*;
use crate::{BatchReady, ShardError};

fn id(seq: u64) -> TxnId {
    TxnId { member: 7, seq }
}

/// `shard`'s vote for txn `seq` over `participants`, its prepare at
/// `index` after `after`.
fn vote(seq: u64, shard: ShardId, participants: &[ShardId], after: u64, index: u64) -> TxnVote {
    TxnVote {
        shard,
        index,
        after,
        id: id(seq),
        participants: participants.to_vec(),
        ..Default::default()
    }
}

fn found(holds: bool) -> CompareVote {
    CompareVote { found: true, holds }
}

const NOT_FOUND_ZERO_HOLDS: CompareVote = CompareVote {
    found: false,
    holds: true,
};

#[test]
fn a_txn_is_decided_when_every_participant_voted_and_takes_one_revision() -> Result<(), ShardError>
{
    let mut sequencer = Sequencer::new(3, 10)?;
    let mut a = vote(1, 0, &[0, 2], 0, 4);
    a.compares = vec![found(true), NOT_FOUND_ZERO_HOLDS];
    a.changes_success = true;
    a.attach_success = vec![(b"k".to_vec(), 5)];
    assert!(sequencer.vote(a, &|_| true).is_empty());
    assert_eq!(sequencer.voted(0), Some(id(1)));
    assert!(sequencer.decisions(0).is_empty());
    // Shard 0 is blocked: its batches wait for the decision.
    let batch = BatchReady {
        shard: 0,
        after: 0,
        through: 3,
        revisions: 1,
        ..Default::default()
    };
    assert!(sequencer.sequence(&[batch], &|_| true).is_empty());

    let mut b = vote(1, 2, &[0, 2], 0, 9);
    // The second compare's key is on shard 2 and holds; the first's is not.
    b.compares = vec![NOT_FOUND_ZERO_HOLDS, found(true)];
    let attach = sequencer.vote(b, &|_| true);
    assert_eq!(attach, vec![(b"k".to_vec(), 5)]);
    assert_eq!(sequencer.revision(), 11);
    assert_eq!(sequencer.undecided(), Vec::<TxnId>::new());
    let d0 = &sequencer.decisions(0)[0];
    assert_eq!(
        (d0.outcome, d0.revision, d0.changes, d0.index),
        (TxnOutcome::Succeeded, 11, true, 4)
    );
    let d2 = &sequencer.decisions(2)[0];
    assert_eq!(
        (d2.outcome, d2.changes, d2.index),
        (TxnOutcome::Succeeded, false, 9)
    );
    // The prepares are sequenced; reads and batches of shard 0 wait for it.
    assert_eq!(sequencer.sequenced_through(0), Some(4));
    assert_eq!(sequencer.sequenced_through(2), Some(9));
    assert_eq!(sequencer.last_revoke(0), 11);
    assert_eq!(sequencer.last_revoke(2), 0);
    // A batch after the prepare, run after the decision, drops it.
    let next = BatchReady {
        shard: 0,
        after: 4,
        through: 5,
        revisions: 1,
        revoked: 11,
        ..Default::default()
    };
    assert_eq!(sequencer.sequence(&[next], &|_| true).len(), 1);
    assert!(sequencer.decisions(0).is_empty());
    Ok(())
}

#[test]
fn a_compare_fails_where_a_shard_with_keys_says_so_and_nothing_changed_takes_no_revision()
-> Result<(), ShardError> {
    let mut sequencer = Sequencer::new(2, 5)?;
    let mut a = vote(1, 0, &[0, 1], 0, 1);
    a.compares = vec![found(true)];
    a.changes_success = true;
    let mut b = vote(1, 1, &[0, 1], 0, 1);
    b.compares = vec![found(false)];
    b.changes_success = true;
    sequencer.vote(a, &|_| true);
    sequencer.vote(b, &|_| true);
    assert_eq!(sequencer.revision(), 5);
    let d = &sequencer.decisions(1)[0];
    assert_eq!(
        (d.outcome, d.revision, d.changes),
        (TxnOutcome::Failed, 5, false)
    );

    // No shard found keys: etcd's comparison with an absent key decides.
    let absent = CompareVote {
        found: false,
        holds: false,
    };
    let mut a = vote(2, 0, &[0, 1], 1, 2);
    a.compares = vec![absent];
    a.changes_failure = true;
    let mut b = vote(2, 1, &[0, 1], 1, 2);
    b.compares = vec![absent];
    sequencer.vote(a, &|_| true);
    sequencer.vote(b, &|_| true);
    assert_eq!(sequencer.revision(), 6);
    // Shard 0's vote after the first txn's prepare dropped its decision.
    assert_eq!(sequencer.decisions(0).len(), 1);
    assert_eq!(sequencer.decisions(0)[0].outcome, TxnOutcome::Failed);
    assert!(sequencer.decisions(0)[0].changes);
    Ok(())
}

#[test]
fn a_branch_that_fails_somewhere_changes_nothing_anywhere() -> Result<(), ShardError> {
    let mut sequencer = Sequencer::new(2, 5)?;
    let mut a = vote(1, 0, &[0, 1], 0, 1);
    a.changes_success = true;
    let mut b = vote(1, 1, &[0, 1], 0, 1);
    b.fails_success = true;
    b.missing = vec![3];
    sequencer.vote(a, &|_| true);
    // Lease 3 was found missing and still is.
    sequencer.vote(b, &|id| id != 3);
    assert_eq!(sequencer.revision(), 5);
    assert!(!sequencer.decisions(0)[0].changes);
    assert_eq!(sequencer.decisions(0)[0].outcome, TxnOutcome::Succeeded);
    Ok(())
}

#[test]
fn a_vote_on_leases_that_changed_since_aborts_the_txn() -> Result<(), ShardError> {
    let mut sequencer = Sequencer::new(2, 5)?;
    let mut a = vote(1, 0, &[0, 1], 0, 1);
    a.leases = vec![3];
    a.changes_success = true;
    sequencer.vote(a, &|_| true);
    sequencer.vote(vote(1, 1, &[0, 1], 0, 1), &|_| false);
    assert_eq!(sequencer.decisions(0)[0].outcome, TxnOutcome::Aborted);
    assert_eq!(sequencer.decisions(1)[0].outcome, TxnOutcome::Aborted);
    assert_eq!(sequencer.revision(), 5);
    Ok(())
}

#[test]
fn a_cycle_of_blocked_shards_aborts_its_youngest_txn() -> Result<(), ShardError> {
    let mut sequencer = Sequencer::new(3, 1)?;
    // Shard 0 staged txn 1 first, shard 1 txn 2 first; both need both.
    sequencer.vote(vote(1, 0, &[0, 1], 0, 1), &|_| true);
    sequencer.vote(vote(2, 1, &[0, 1], 0, 1), &|_| true);
    assert_eq!(sequencer.undecided(), vec![id(1)]);
    // Txn 2 (heard of last) was aborted: shard 1 passes its prepare.
    assert_eq!(sequencer.decisions(1)[0].outcome, TxnOutcome::Aborted);
    assert_eq!(sequencer.decisions(1)[0].id, id(2));
    assert!(sequencer.decisions(0).is_empty());
    // ...then votes for txn 1, which is decided.
    sequencer.vote(vote(1, 1, &[0, 1], 1, 2), &|_| true);
    assert_eq!(sequencer.decisions(0)[0].outcome, TxnOutcome::Succeeded);
    // Shard 0 reaches txn 2's prepare: aborted already, it passes it.
    sequencer.vote(vote(2, 0, &[0, 1], 1, 2), &|_| true);
    assert_eq!(sequencer.decisions(0)[0].outcome, TxnOutcome::Aborted);
    assert_eq!(sequencer.decisions(0)[0].index, 2);
    assert_eq!(sequencer.undecided(), Vec::<TxnId>::new());
    Ok(())
}

#[test]
fn a_txn_left_undecided_is_aborted_on_request() -> Result<(), ShardError> {
    let mut sequencer = Sequencer::new(2, 1)?;
    sequencer.vote(vote(1, 0, &[0, 1], 0, 3), &|_| true);
    assert_eq!(sequencer.undecided(), vec![id(1)]);
    assert!(sequencer.abort(id(1)));
    assert!(!sequencer.abort(id(1)));
    assert_eq!(sequencer.voted(0), None);
    assert_eq!(sequencer.sequenced_through(0), Some(3));
    assert_eq!(sequencer.decisions(0)[0].outcome, TxnOutcome::Aborted);
    Ok(())
}

#[test]
fn a_txn_aborted_before_any_vote_stays_aborted_when_its_prepares_commit_late()
-> Result<(), ShardError> {
    let mut sequencer = Sequencer::new(2, 1)?;
    // Its coordinator saw a prepare fail before any shard voted.
    assert!(!sequencer.abort(id(1)));
    // Both prepares commit after all: each shard passes its own, and the
    // txn takes no revision.
    sequencer.vote(vote(1, 0, &[0, 1], 0, 3), &|_| true);
    assert_eq!(sequencer.voted(0), None);
    sequencer.vote(vote(1, 1, &[0, 1], 0, 5), &|_| true);
    for shard in 0..2 {
        let decided = &sequencer.decisions(shard)[0];
        assert_eq!((decided.id, decided.outcome), (id(1), TxnOutcome::Aborted));
    }
    assert_eq!(sequencer.sequenced_through(0), Some(3));
    assert_eq!(sequencer.sequenced_through(1), Some(5));
    assert_eq!(sequencer.revision(), 1);
    assert_eq!(sequencer.undecided(), Vec::<TxnId>::new());
    Ok(())
}

#[test]
fn a_late_vote_after_an_abort_finds_it_aborted_and_a_decided_txn_keeps_its_outcome()
-> Result<(), ShardError> {
    let mut sequencer = Sequencer::new(3, 1)?;
    // Shard 0 voted; the prepare to shard 2 was lost with its leader.
    sequencer.vote(vote(1, 0, &[0, 2], 0, 3), &|_| true);
    assert!(sequencer.abort(id(1)));
    assert_eq!(sequencer.decisions(0)[0].outcome, TxnOutcome::Aborted);
    // The prepare commits on shard 2 after all, and it votes.
    let mut late = vote(1, 2, &[0, 2], 0, 4);
    late.changes_success = true;
    sequencer.vote(late, &|_| true);
    assert_eq!(sequencer.decisions(2)[0].outcome, TxnOutcome::Aborted);
    assert_eq!(sequencer.voted(2), None);
    assert_eq!(sequencer.revision(), 1);

    // Its retry under a new ID is decided; an abort asked for it later
    // (a coordinator that saw an answer lost) changes nothing.
    let mut a = vote(2, 0, &[0, 2], 3, 6);
    a.changes_success = true;
    sequencer.vote(a, &|_| true);
    sequencer.vote(vote(2, 2, &[0, 2], 4, 7), &|_| true);
    assert_eq!(sequencer.revision(), 2);
    assert!(!sequencer.abort(id(2)));
    let decided = &sequencer.decisions(0)[0];
    assert_eq!(
        (decided.id, decided.outcome),
        (id(2), TxnOutcome::Succeeded)
    );
    assert_eq!(sequencer.revision(), 2);
    Ok(())
}

#[test]
fn the_aborted_ids_kept_are_bounded_and_a_forgotten_abort_stays_an_abort()
-> Result<(), Box<dyn std::error::Error>> {
    let mut sequencer = Sequencer::new(2, 1)?;
    // Txn 1 is under way (shard 0 voted) when many txns of its
    // coordinator are aborted.
    sequencer.vote(vote(1, 0, &[0, 1], 0, 3), &|_| true);
    let other = TxnId { member: 8, seq: 1 };
    sequencer.abort(other);
    for seq in 2..2 + 4 * ABORTED_KEPT as u64 {
        sequencer.abort(id(seq));
    }
    assert_eq!(sequencer.txns.aborted.len(), ABORTED_KEPT);
    assert_eq!(sequencer.txns.floors.len(), 2, "one floor per coordinator");
    let json = serde_json::to_vec(&sequencer)?;
    assert!(
        json.len() < 16 * 1024,
        "the record stays small: {}",
        json.len()
    );

    // Txn 2's abort is no longer listed: a late vote still finds it
    // aborted, by its coordinator's floor.
    assert!(!sequencer.txns.aborted.contains(&id(2)));
    sequencer.vote(vote(2, 1, &[0, 1], 0, 2), &|_| true);
    assert_eq!(sequencer.decisions(1)[0].outcome, TxnOutcome::Aborted);
    assert_eq!(sequencer.decisions(1)[0].id, id(2));
    // Txn 1, undecided below the floor, is decided as usual.
    sequencer.vote(vote(1, 1, &[0, 1], 2, 4), &|_| true);
    assert_eq!(sequencer.decisions(0)[0].outcome, TxnOutcome::Succeeded);
    // A txn of another coordinator above its floor is not touched.
    let fresh = TxnId { member: 8, seq: 2 };
    let mut v = vote(0, 0, &[0, 1], 3, 5);
    v.id = fresh;
    sequencer.vote(v, &|_| true);
    assert_eq!(sequencer.voted(0), Some(fresh));
    Ok(())
}

#[test]
fn a_revoke_on_a_voted_shard_has_it_vote_again_after_applying_it() -> Result<(), ShardError> {
    let mut sequencer = Sequencer::new(2, 1)?;
    sequencer.vote(vote(1, 0, &[0, 1], 0, 3), &|_| true);
    let keys = BTreeMap::from([(0, vec![b"leased".to_vec()])]);
    assert_eq!(sequencer.revoke(9, keys), Some(2));
    assert_eq!(sequencer.voted(0), None);
    // A vote from before the revoke is ignored; one after it counts.
    sequencer.vote(vote(1, 0, &[0, 1], 0, 3), &|_| true);
    assert_eq!(sequencer.voted(0), None);
    let mut again = vote(1, 0, &[0, 1], 0, 3);
    again.revoked = 2;
    sequencer.vote(again, &|_| true);
    assert_eq!(sequencer.voted(0), Some(id(1)));
    Ok(())
}

#[test]
fn the_txns_state_survives_the_record() -> Result<(), Box<dyn std::error::Error>> {
    let mut sequencer = Sequencer::new(2, 1)?;
    sequencer.vote(vote(1, 0, &[0, 1], 0, 3), &|_| true);
    let json = serde_json::to_vec(&sequencer)?;
    let back: Sequencer = serde_json::from_slice(&json)?;
    assert_eq!(back, sequencer);
    Ok(())
}
