//! Cross-shard txns on replicas of two shards, against one store that runs
//! the same txns: the votes, the decisions and the merged responses.

use bytes::Bytes;
use cairn_api::cairnpb::{self, CrossTxn};
use cairn_api::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use cairn_api::etcdserverpb::request_op::Request;
use cairn_api::etcdserverpb::response_op::Response;
use cairn_api::etcdserverpb::{
    Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest, TxnResponse,
};
use cairn_mvcc::Store;
use cairn_shard::{Keyspace, Sequencer, ShardId, TxnId, TxnOutcome};
use tempfile::TempDir;

use super::*;

const SHARDS: u32 = 2;

struct Fixture {
    keyspace: Keyspace,
    replicas: Vec<ShardReplica>,
    sequencer: Sequencer,
    /// One store fed the same requests, for what etcd answers.
    reference: Store,
    /// The next log index of each shard.
    next: Vec<u64>,
    _dirs: Vec<TempDir>,
}

fn no_leases(_: i64) -> bool {
    false
}

impl Fixture {
    fn new() -> Result<Fixture, Box<dyn std::error::Error>> {
        let mut dirs = Vec::new();
        let mut replicas = Vec::new();
        for shard in 0..SHARDS {
            let dir = tempfile::tempdir()?;
            replicas.push(ShardReplica::new(shard, Store::open(dir.path())?));
            dirs.push(dir);
        }
        let dir = tempfile::tempdir()?;
        let reference = Store::open(dir.path())?;
        dirs.push(dir);
        Ok(Fixture {
            keyspace: Keyspace::new(SHARDS)?,
            replicas,
            sequencer: Sequencer::new(SHARDS, 1)?,
            reference,
            next: vec![1; SHARDS as usize],
            _dirs: dirs,
        })
    }

    /// A key of `shard`.
    fn key_of(&self, shard: ShardId, name: &str) -> Bytes {
        (0..)
            .map(|i| Bytes::from(format!("{name}{i}")))
            .find(|k| self.keyspace.shard_of(k) == shard)
            .unwrap_or_default()
    }

    fn stage(&mut self, shard: ShardId, write: ShardWrite) -> Result<u64, ReplicaError> {
        let index = self.next[shard as usize];
        self.next[shard as usize] += 1;
        self.replicas[shard as usize].stage([(index, write)], index)?;
        Ok(index)
    }

    /// Sequences and applies what each shard has before its next prepare.
    fn settle(&mut self) -> Result<(), ReplicaError> {
        for shard in 0..SHARDS as usize {
            let through = self.sequencer.sequenced_through(shard as u32).unwrap_or(0);
            if let Some(ready) = self.replicas[shard].ready(through, &no_leases)? {
                for batch in self.sequencer.sequence(&[ready], &no_leases) {
                    self.replicas[shard].apply(&batch)?;
                }
            }
        }
        Ok(())
    }

    /// Runs `txn` as a cross-shard txn on every shard (shard 1's prepare
    /// after `before_on_1`, a put staged ahead of it), and the same on the
    /// reference store; returns the merged response and etcd's.
    fn cross(
        &mut self,
        seq: u64,
        txn: TxnRequest,
    ) -> Result<(TxnResponse, TxnResponse), Box<dyn std::error::Error>> {
        let participants = participants(&self.keyspace, &txn)?;
        let prepare = |shard| {
            ShardWrite::CrossTxn(CrossTxn {
                id: Some(cairnpb::TxnId { member: 1, seq }),
                participants: participants.clone(),
                shards: SHARDS,
                txn: Some(txn.clone()),
                shard,
            })
        };
        for &shard in &participants {
            self.stage(shard, prepare(shard))?;
        }
        self.settle()?;
        for &shard in &participants {
            let through = self.sequencer.sequenced_through(shard).unwrap_or(0);
            let vote = self.replicas[shard as usize]
                .vote(through, &no_leases)?
                .ok_or("no vote")?;
            // Nothing before the prepare stays unapplied.
            assert!(
                self.replicas[shard as usize]
                    .ready(through, &no_leases)?
                    .is_none()
            );
            self.sequencer.vote(vote, &no_leases);
        }
        let mut partials = Vec::new();
        let mut revision = 0;
        for &shard in &participants {
            let decision = self.sequencer.decisions(shard)[0].clone();
            assert_ne!(decision.outcome, TxnOutcome::Aborted);
            revision = decision.revision;
            let decided = self.replicas[shard as usize]
                .decide(&decision)?
                .ok_or("applied already")?;
            // Applied once.
            assert!(self.replicas[shard as usize].decide(&decision)?.is_none());
            match decided.outcome? {
                WriteResponse::Txn(response) => partials.push((shard, response)),
                other => return Err(format!("answered {other:?}").into()),
            }
        }
        let merged = merge_txn(&self.keyspace, &txn, &partials, revision);
        let mut write = self.reference.write();
        let expected = write.txn(&txn)?;
        write.commit(0)?;
        Ok((merged, expected))
    }

    fn put_both(&mut self, key: &Bytes, value: &str) -> Result<(), Box<dyn std::error::Error>> {
        let put = PutRequest {
            key: key.clone(),
            value: Bytes::from(value.to_string()),
            ..Default::default()
        };
        self.stage(self.keyspace.shard_of(key), ShardWrite::Put(put.clone()))?;
        self.settle()?;
        let mut write = self.reference.write();
        write.put(&put)?;
        write.commit(0)?;
        Ok(())
    }
}

fn op(request: Request) -> RequestOp {
    RequestOp {
        request: Some(request),
    }
}

fn put_op(key: &Bytes, value: &str) -> RequestOp {
    op(Request::RequestPut(PutRequest {
        key: key.clone(),
        value: Bytes::from(value.to_string()),
        prev_kv: true,
        ..Default::default()
    }))
}

fn everything() -> RequestOp {
    op(Request::RequestRange(RangeRequest {
        key: Bytes::from_static(b"\0"),
        range_end: Bytes::from_static(b"\0"),
        ..Default::default()
    }))
}

fn created_at(key: &Bytes, revision: i64) -> Compare {
    Compare {
        key: key.clone(),
        target: CompareTarget::Create as i32,
        result: CompareResult::Equal as i32,
        target_union: Some(TargetUnion::CreateRevision(revision)),
        ..Default::default()
    }
}

#[test]
fn a_txn_over_two_shards_answers_as_one_store_at_one_revision()
-> Result<(), Box<dyn std::error::Error>> {
    let mut f = Fixture::new()?;
    let (a, b) = (f.key_of(0, "a"), f.key_of(1, "b"));
    f.put_both(&a, "1")?;
    // The lock's txn: b is not there yet (created at 0), so put it and
    // read every key; the second time, b exists: read it and every key.
    let lock = TxnRequest {
        compare: vec![created_at(&b, 0)],
        success: vec![put_op(&b, "mine"), put_op(&a, "2"), everything()],
        failure: vec![everything()],
    };
    let (merged, expected) = f.cross(1, lock.clone())?;
    assert_eq!(merged, expected);
    assert!(merged.succeeded);
    assert_eq!(merged.header.as_ref().map(|h| h.revision), Some(3));
    for replica in &f.replicas {
        assert_eq!(replica.store().current_revision(), 3);
    }
    let (merged, expected) = f.cross(2, lock)?;
    assert_eq!(merged, expected);
    assert!(!merged.succeeded);
    // Changing nothing takes no revision.
    assert_eq!(merged.header.as_ref().map(|h| h.revision), Some(3));

    // A delete over every key: both shards' keys go at one revision.
    let delete_all = TxnRequest {
        success: vec![op(Request::RequestDeleteRange(DeleteRangeRequest {
            key: Bytes::from_static(b"\0"),
            range_end: Bytes::from_static(b"\0"),
            prev_kv: true,
        }))],
        ..Default::default()
    };
    let (merged, expected) = f.cross(3, delete_all)?;
    assert_eq!(merged, expected);
    match merged.responses[0].response.as_ref() {
        Some(Response::ResponseDeleteRange(d)) => assert_eq!(d.deleted, 2),
        other => return Err(format!("answered {other:?}").into()),
    }
    // A batch after the txn follows it.
    f.put_both(&a, "3")?;
    assert_eq!(f.replicas[0].store().current_revision(), 5);
    Ok(())
}

#[test]
fn an_aborted_txn_passes_its_prepare_and_changes_nothing() -> Result<(), Box<dyn std::error::Error>>
{
    let mut f = Fixture::new()?;
    let (a, b) = (f.key_of(0, "a"), f.key_of(1, "b"));
    let txn = TxnRequest {
        success: vec![put_op(&a, "1"), put_op(&b, "1")],
        ..Default::default()
    };
    let prepare = ShardWrite::CrossTxn(CrossTxn {
        id: Some(cairnpb::TxnId { member: 1, seq: 1 }),
        participants: vec![0, 1],
        shards: SHARDS,
        txn: Some(txn),
        shard: 0,
    });
    let index = f.stage(0, prepare)?;
    let vote = f.replicas[0].vote(0, &no_leases)?.ok_or("no vote")?;
    assert!(vote.changes_success);
    f.sequencer.vote(vote.clone(), &no_leases);
    // Its coordinator never reached shard 1: aborted after a while.
    assert!(f.sequencer.abort(vote.id));
    let decision = f.sequencer.decisions(0)[0].clone();
    let decided = f.replicas[0].decide(&decision)?.ok_or("applied already")?;
    assert!(matches!(decided.outcome, Ok(WriteResponse::Aborted)));
    assert_eq!(f.replicas[0].applied_index(), index);
    assert_eq!(f.replicas[0].store().current_revision(), 1);
    assert_eq!(f.sequencer.revision(), 1);
    Ok(())
}

/// A coordinator's attempt over shards 0 and 1 where shard 0's prepare
/// fails and shard 1 answers `late` after the abort: how it ends, and how
/// many aborts it asked for.
async fn attempt_with_failed_prepare(late: Option<TxnResponse>) -> (Attempt<String>, usize) {
    let aborts = std::sync::atomic::AtomicUsize::new(0);
    let (aborted, answered) = tokio::sync::oneshot::channel::<()>();
    let answered = std::sync::Mutex::new(Some(answered));
    let aborted = std::sync::Mutex::new(Some(aborted));
    let prepare = |shard: ShardId| {
        let answered = (shard == 1)
            .then(|| answered.lock().ok().and_then(|mut a| a.take()))
            .flatten();
        let late = late.clone();
        async move {
            if shard == 0 {
                return Err("lost with its leader".to_string());
            }
            // Shard 1 voted and waits for the decision the abort brings.
            if let Some(answered) = answered {
                let _ = answered.await;
            }
            Ok(late)
        }
    };
    let abort = |_id: TxnId| {
        aborts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(aborted) = aborted.lock().ok().and_then(|mut a| a.take()) {
            let _ = aborted.send(());
        }
        async { Ok(()) }
    };
    let id = TxnId { member: 1, seq: 1 };
    let ended = attempt(id, &[0, 1], prepare, abort).await;
    (ended, aborts.into_inner())
}

#[tokio::test]
async fn a_failed_prepare_has_the_txn_aborted_at_once_and_run_again() {
    let (ended, aborts) = attempt_with_failed_prepare(None).await;
    assert!(
        matches!(&ended, Attempt::Aborted(Some(e)) if e == "lost with its leader"),
        "{ended:?}"
    );
    assert_eq!(aborts, 1);
}

#[tokio::test]
async fn a_txn_decided_before_its_abort_ends_with_the_failure_not_run_again() {
    let part = TxnResponse {
        succeeded: true,
        ..Default::default()
    };
    let (ended, aborts) = attempt_with_failed_prepare(Some(part)).await;
    assert!(
        matches!(&ended, Attempt::Failed(e) if e == "lost with its leader"),
        "{ended:?}"
    );
    assert_eq!(aborts, 1);
}

#[tokio::test]
async fn an_attempt_whose_prepares_all_answer_asks_no_abort() {
    let aborts = std::sync::atomic::AtomicUsize::new(0);
    let prepare = |shard: ShardId| async move {
        Ok::<_, String>(Some(TxnResponse {
            header: Some(cairn_api::etcdserverpb::ResponseHeader {
                revision: i64::from(shard),
                ..Default::default()
            }),
            ..Default::default()
        }))
    };
    let abort = |_id: TxnId| {
        aborts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        async { Ok(()) }
    };
    let ended = attempt(TxnId::default(), &[0, 1, 2], prepare, abort).await;
    let Attempt::Done(mut parts) = ended else {
        panic!("{ended:?}");
    };
    parts.sort_by_key(|(shard, _)| *shard);
    let shards: Vec<ShardId> = parts.iter().map(|(shard, _)| *shard).collect();
    assert_eq!(shards, vec![0, 1, 2]);
    assert_eq!(aborts.into_inner(), 0);
}
