//! The sharded write path against one store: writes spread over shards,
//! staged, sequenced in rounds (with resent and stale batches, replicas
//! that lag and restart), give every client the answer one store fed the
//! same writes in sequenced order gives, and every revision reads the
//! same there.

use std::collections::BTreeMap;

use bytes::Bytes;
use cairn_api::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use cairn_api::etcdserverpb::request_op::Request;
use cairn_api::etcdserverpb::{
    Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use cairn_mvcc::Store;
use cairn_shard::{BatchReady, Keyspace, Sequenced, Sequencer, ShardId};
use proptest::prelude::*;
use tempfile::TempDir;

use crate::{Outcome, ReplicaError, ShardReplica, ShardWrite};

/// A small deterministic generator, so one proptest seed is one schedule.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

fn key(i: u64) -> Bytes {
    Bytes::from(format!("k{i}"))
}

fn put(key: Bytes, value: u64) -> PutRequest {
    PutRequest {
        key,
        value: Bytes::from(value.to_string()),
        ..Default::default()
    }
}

/// A random single-key write: puts (some with prev_kv, some keeping the
/// old value, which fails on a missing key), deletes, and txns that
/// compare and then put, delete or read the same key.
fn random_write(rng: &mut Rng) -> ShardWrite {
    let key = key(rng.below(12));
    let value = rng.below(1000);
    match rng.below(6) {
        0 | 1 => ShardWrite::Put(PutRequest {
            prev_kv: rng.chance(50),
            ..put(key, value)
        }),
        2 => ShardWrite::Put(PutRequest {
            ignore_value: true,
            ..put(key, 0)
        }),
        3 => ShardWrite::DeleteRange(DeleteRangeRequest {
            key,
            prev_kv: rng.chance(50),
            ..Default::default()
        }),
        _ => {
            let compare = Compare {
                key: key.clone(),
                result: CompareResult::Greater as i32,
                target: CompareTarget::Version as i32,
                target_union: Some(TargetUnion::Version(rng.below(3) as i64)),
                ..Default::default()
            };
            let op = |request| RequestOp {
                request: Some(request),
            };
            TxnRequest {
                compare: vec![compare],
                success: vec![op(Request::RequestPut(put(key.clone(), value)))],
                failure: if rng.chance(50) {
                    vec![op(Request::RequestDeleteRange(DeleteRangeRequest {
                        key: key.clone(),
                        ..Default::default()
                    }))]
                } else {
                    vec![op(Request::RequestRange(RangeRequest {
                        key: key.clone(),
                        ..Default::default()
                    }))]
                },
            }
            .into()
        }
    }
}

impl From<TxnRequest> for ShardWrite {
    fn from(txn: TxnRequest) -> ShardWrite {
        ShardWrite::Txn(txn)
    }
}

fn shard_of(keyspace: &Keyspace, write: &ShardWrite) -> ShardId {
    let key = match write {
        ShardWrite::Put(p) => &p.key,
        ShardWrite::DeleteRange(d) => &d.key,
        ShardWrite::Txn(t) => &t.compare[0].key,
        ShardWrite::CrossTxn(t) => return t.shard,
    };
    keyspace.shard_of(key)
}

/// Outcomes compared as a client sees them: responses, or etcd's message.
fn seen(outcome: &Outcome) -> Result<crate::WriteResponse, String> {
    outcome.as_ref().cloned().map_err(ToString::to_string)
}

fn everything(revision: i64) -> RangeRequest {
    RangeRequest {
        key: Bytes::from_static(b"\0"),
        range_end: Bytes::from_static(b"\0"),
        revision,
        ..Default::default()
    }
}

struct Shard {
    dir: TempDir,
    replica: ShardReplica,
    /// The shard's committed log: index and write.
    log: Vec<(u64, ShardWrite)>,
    next_index: u64,
}

impl Shard {
    /// Restarts the replica on its store: it stages again what follows its
    /// applied index.
    fn restart(self, shard: ShardId) -> Result<Shard, ReplicaError> {
        let Shard {
            dir,
            replica,
            log,
            next_index,
        } = self;
        drop(replica);
        let mut replica = ShardReplica::new(shard, Store::open(dir.path())?);
        replica.stage(log.iter().cloned(), next_index - 1)?;
        Ok(Shard {
            dir,
            replica,
            log,
            next_index,
        })
    }
}

fn run_schedule(seed: u64, shards: u32, writes: usize) -> Result<(), ReplicaError> {
    let mut rng = Rng(seed | 1);
    let keyspace = Keyspace::new(shards).expect("a shard count in bounds");
    let mut state: Vec<Shard> = (0..shards)
        .map(|shard| {
            let dir = tempfile::tempdir().expect("a temp dir");
            let store = Store::open(dir.path())?;
            Ok(Shard {
                dir,
                replica: ShardReplica::new(shard, store),
                log: Vec::new(),
                next_index: 1,
            })
        })
        .collect::<Result<_, ReplicaError>>()?;
    let mut sequencer = Sequencer::new(shards, 1).expect("a shard count in bounds");
    // The cluster group's log: each shard's sequenced batches, in order.
    let mut sequenced: Vec<Sequenced> = Vec::new();
    let mut applied_batches = vec![0usize; shards as usize];
    let mut outcomes: BTreeMap<(ShardId, u64), Outcome> = BTreeMap::new();
    let mut resent: Vec<BatchReady> = Vec::new();
    let mut left = writes;

    while left > 0 || applied_batches.iter().sum::<usize>() < sequenced.len() {
        // Writes commit in their shards' logs; some indexes carry no write.
        for _ in 0..rng.below(4) {
            if left == 0 {
                break;
            }
            left -= 1;
            let write = random_write(&mut rng);
            let shard = &mut state[shard_of(&keyspace, &write) as usize];
            shard.next_index += rng.below(2);
            let index = shard.next_index;
            shard.next_index += 1;
            shard.log.push((index, write.clone()));
            shard.replica.stage([(index, write)], index)?;
        }
        // A round of the cluster group: some shard leaders ask, and old
        // requests arrive again (a leader resending, or a deposed one).
        let mut round = Vec::new();
        for (shard, s) in state.iter().enumerate() {
            if rng.chance(60) {
                let through = sequencer.sequenced_through(shard as ShardId).unwrap_or(0);
                if let Some(ready) = s.replica.ready(through, &|_| false)? {
                    round.push(ready);
                }
            }
        }
        if !resent.is_empty() && rng.chance(30) {
            round.push(resent[rng.below(resent.len() as u64) as usize].clone());
        }
        resent.extend(round.iter().cloned());
        let before = sequencer.revision();
        let accepted = sequencer.sequence(&round, &|_| false);
        let given: u64 = accepted.iter().map(|b| b.revisions).sum();
        assert_eq!(
            sequencer.revision(),
            before + given as i64,
            "dense revisions"
        );
        sequenced.extend(accepted);
        // Replicas apply what was sequenced for them, each at its own pace,
        // and now and then restart.
        for shard in 0..state.len() {
            if rng.chance(10) {
                let restarted = state.remove(shard).restart(shard as ShardId)?;
                state.insert(shard, restarted);
            }
            let s = &mut state[shard];
            if rng.chance(30) && left > 0 {
                continue;
            }
            let mine = sequenced.iter().filter(|b| b.shard == shard as ShardId);
            for batch in mine.skip(applied_batches[shard]) {
                let applied = s
                    .replica
                    .apply(batch)?
                    .expect("sequenced entries are staged");
                for (index, outcome) in applied.outcomes {
                    outcomes.insert((shard as ShardId, index), outcome);
                }
                applied_batches[shard] += 1;
            }
        }
    }

    // One store fed every write in sequenced order answers the same.
    let reference_dir = tempfile::tempdir().expect("a temp dir");
    let reference = Store::open(reference_dir.path())?;
    for batch in &sequenced {
        let mut write = reference.write();
        let log = &state[batch.shard as usize].log;
        for (index, entry) in log
            .iter()
            .filter(|(i, _)| *i > batch.after && *i <= batch.through)
        {
            let expected = seen(&crate::run(&mut write, entry, &|_| false));
            let got = outcomes
                .get(&(batch.shard, *index))
                .map(seen)
                .expect("every applied write has an outcome");
            assert_eq!(got, expected, "shard {} entry {index}", batch.shard);
        }
        assert_eq!(write.current_revision(), batch.end_revision() - 1);
        write.commit(0)?;
    }
    let last = sequencer.revision();
    assert_eq!(reference.current_revision(), last);
    for revision in 1..=last {
        let mut merged = Vec::new();
        for s in &state {
            merged.extend(s.replica.store().range_at(&everything(revision), last)?.kvs);
        }
        merged.sort_by(|a, b| a.key.cmp(&b.key));
        let expected = reference.range(&everything(revision))?.kvs;
        assert_eq!(merged, expected, "the keyspace at revision {revision}");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn sharded_writes_read_as_one_store_fed_in_sequenced_order(
        seed in any::<u64>(),
        shards in 1u32..5,
    ) {
        run_schedule(seed, shards, 120).map_err(|e| TestCaseError::fail(e.to_string()))?;
    }
}

#[test]
fn a_batch_out_of_order_or_of_another_shard_is_refused() -> Result<(), ReplicaError> {
    let dir = tempfile::tempdir().expect("a temp dir");
    let mut replica = ShardReplica::new(1, Store::open(dir.path())?);
    replica.stage([(1, ShardWrite::Put(put(key(1), 1)))], 1)?;
    let batch = |shard, after, through| Sequenced {
        shard,
        after,
        through,
        first_revision: 2,
        revisions: 1,
        leases: Vec::new(),
    };
    assert!(matches!(
        replica.apply(&batch(0, 0, 1)),
        Err(ReplicaError::WrongShard { shard: 1, other: 0 })
    ));
    assert!(matches!(
        replica.apply(&batch(1, 1, 2)),
        Err(ReplicaError::Gap { applied: 0, .. })
    ));
    // Not all delivered yet: wait.
    assert!(replica.apply(&batch(1, 0, 3))?.is_none());
    assert!(matches!(
        replica.stage([(1, ShardWrite::Put(put(key(2), 2)))], 1),
        Err(ReplicaError::OutOfOrder {
            index: 1,
            last: 1,
            ..
        })
    ));
    // Given two revisions for a batch that takes one: refused, nothing written.
    let wrong = Sequenced {
        revisions: 2,
        ..batch(1, 0, 1)
    };
    assert!(matches!(
        replica.apply(&wrong),
        Err(ReplicaError::Diverged {
            taken: 1,
            given: 2,
            ..
        })
    ));
    Ok(())
}

#[test]
fn a_compaction_drops_the_shards_older_revisions_once() -> Result<(), Box<dyn std::error::Error>> {
    let dir = TempDir::new()?;
    let mut replica = ShardReplica::new(0, Store::open(dir.path())?);
    let mut sequencer = Sequencer::new(1, 1)?;
    // Three puts of one key at revisions 2, 3 and 4.
    for (index, value) in (1..=3).zip(1..) {
        replica.stage([(index, ShardWrite::Put(put(key(0), value)))], index)?;
        let ready = replica.ready(index - 1, &|_| false)?.ok_or("a batch")?;
        let sequenced = sequencer.sequence(&[ready], &|_| false);
        replica.apply(&sequenced[0])?.ok_or("staged")?;
    }
    let at = |revision| RangeRequest {
        key: key(0),
        revision,
        ..Default::default()
    };
    assert!(replica.store().range(&at(2)).is_ok());
    // The keyspace is compacted past this shard's last revision: the shard
    // keeps each key's newest, and reads below it are refused.
    replica.compact(10)?;
    assert_eq!(replica.store().compact_revision(), 4);
    assert!(matches!(
        replica.store().range(&at(3)),
        Err(cairn_mvcc::MvccError::Compacted)
    ));
    assert_eq!(replica.store().range(&at(4))?.kvs.len(), 1);
    // Again, as a log replayed after a restart delivers it: nothing to do.
    replica.compact(10)?;
    replica.compact(3)?;
    assert_eq!(replica.applied_index(), 3, "a compaction applies no write");
    Ok(())
}

#[test]
fn puts_rely_on_the_leases_their_batch_found_and_revokes_apply_once()
-> Result<(), Box<dyn std::error::Error>> {
    let dir = TempDir::new()?;
    let mut replica = ShardReplica::new(0, Store::open(dir.path())?);
    let mut sequencer = Sequencer::new(1, 1)?;
    let leased = |k, lease| PutRequest {
        lease,
        ..put(key(k), 1)
    };
    replica.stage(
        [
            (1, ShardWrite::Put(leased(1, 7))),
            (2, ShardWrite::Put(leased(2, 8))),
            (3, ShardWrite::Put(leased(3, 7))),
        ],
        3,
    )?;
    let only_7 = |id| id == 7;
    let ready = replica.ready(0, &only_7)?.ok_or("a batch")?;
    assert_eq!(
        (ready.leases.clone(), ready.missing.clone()),
        (vec![7], vec![8])
    );
    assert_eq!(ready.attach, vec![(b"k1".to_vec(), 7), (b"k3".to_vec(), 7)]);
    assert_eq!(ready.revisions, 2, "the put naming a missing lease fails");
    // Applied on the batch's own lease list, whatever lessor a replica has.
    let sequenced = sequencer.sequence(&[ready], &only_7);
    let applied = replica.apply(&sequenced[0])?.ok_or("staged")?;
    assert!(matches!(
        applied.outcomes[1].1,
        Err(cairn_mvcc::MvccError::LeaseNotFound)
    ));
    assert_eq!(replica.store().leased_keys()?.len(), 2);

    // Lease 7 revoked at revision 4: its keys here go at that revision.
    let revoke = cairn_shard::Revoke {
        revision: 4,
        lease: 7,
        keys: vec![b"k1".to_vec(), b"k3".to_vec()],
    };
    let events = replica.revoke(&revoke)?.ok_or("not applied before")?;
    let deleted: Vec<(i64, Bytes)> = events
        .iter()
        .filter_map(|e| e.kv.as_ref())
        .map(|kv| (kv.mod_revision, kv.key.clone()))
        .collect();
    assert_eq!(deleted, vec![(4, key(1)), (4, key(3))]);
    assert_eq!(replica.revoked(), 4);
    // Announced twice, or replayed after a restart: applied once.
    assert!(replica.revoke(&revoke)?.is_none());
    let store = replica.store().clone();
    drop(replica);
    let replica = ShardReplica::new(0, store);
    assert_eq!(replica.revoked(), 4);
    assert!(replica.store().leased_keys()?.is_empty());
    assert_eq!(replica.store().current_revision(), 4);
    Ok(())
}
