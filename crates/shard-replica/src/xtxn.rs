//! A replica's part in transactions over keys of several shards (the
//! sequencer's side is `cairn_shard`'s): its vote on the prepare its log
//! holds, its part of the decided branch applied at the txn's revision,
//! and the coordinator's merge of the participants' partial responses.

use std::cell::RefCell;
use std::collections::BTreeMap;

use cairn_api::cairnpb::CrossTxn;
use cairn_api::etcdserverpb::request_op::Request;
use cairn_api::etcdserverpb::response_op::Response;
use cairn_api::etcdserverpb::{
    DeleteRangeResponse, PutResponse, RequestOp, ResponseHeader, ResponseOp, TxnRequest,
    TxnResponse,
};
use cairn_api::mvccpb::Event;
use cairn_shard::{CompareVote, Keyspace, ShardId, TxnDecision, TxnId, TxnOutcome, TxnVote};

use crate::{Outcome, REVOKED_RECORD, ReplicaError, ShardReplica, ShardWrite, WriteResponse};

/// Why a txn cannot run across shards.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cairn: a txn with nested txns over keys of several shards is not supported")]
pub struct NestedTxn;

/// The shards `txn` can touch, in either branch: a compare, a range or a
/// delete over a key range touches every shard.
pub fn participants(keyspace: &Keyspace, txn: &TxnRequest) -> Result<Vec<ShardId>, NestedTxn> {
    let mut shards = std::collections::BTreeSet::new();
    for c in &txn.compare {
        shards.extend(keyspace.shards_of_range(&c.key, &c.range_end));
    }
    for op in txn.success.iter().chain(&txn.failure) {
        match &op.request {
            Some(Request::RequestRange(r)) => {
                shards.extend(keyspace.shards_of_range(&r.key, &r.range_end))
            }
            Some(Request::RequestPut(p)) => {
                shards.insert(keyspace.shard_of(&p.key));
            }
            Some(Request::RequestDeleteRange(d)) => {
                shards.extend(keyspace.shards_of_range(&d.key, &d.range_end))
            }
            Some(Request::RequestTxn(_)) => return Err(NestedTxn),
            None => {}
        }
    }
    Ok(shards.into_iter().collect())
}

/// A txn's decision applied on a replica: the prepare's log index, its
/// outcome for the waiting proposal, and the events of its part when it
/// changed anything (at the txn's revision).
#[derive(Debug)]
pub struct Decided {
    pub index: u64,
    pub outcome: Outcome,
    pub changed: Option<Changed>,
}

/// A txn's revision and the events of a shard's part at it.
pub type Changed = (i64, Vec<Event>);

fn id_of(txn: &CrossTxn) -> TxnId {
    let id = txn.id.unwrap_or_default();
    TxnId {
        member: id.member,
        seq: id.seq,
    }
}

/// This shard's part of `ops`: the puts of other shards' keys are left out
/// (ranges and deletes find only this shard's keys here). With the
/// positions of those left out, whose responses the owners give.
fn own_part(
    ops: &[RequestOp],
    keyspace: &Keyspace,
    shard: ShardId,
) -> (Vec<RequestOp>, Vec<usize>) {
    let mut own = Vec::new();
    let mut skipped = Vec::new();
    for (at, op) in ops.iter().enumerate() {
        match &op.request {
            Some(Request::RequestPut(p)) if keyspace.shard_of(&p.key) != shard => skipped.push(at),
            _ => own.push(op.clone()),
        }
    }
    (own, skipped)
}

fn as_txn(ops: Vec<RequestOp>) -> TxnRequest {
    TxnRequest {
        compare: Vec::new(),
        success: ops,
        failure: Vec::new(),
    }
}

/// What a branch's dry run on one shard found.
struct DryRun {
    changes: bool,
    fails: bool,
    attach: Vec<(Vec<u8>, i64)>,
}

impl ShardReplica {
    /// The prepare this replica votes on next: the first staged entry, when
    /// it is a cross-shard txn's and everything the sequencer has for the
    /// shard (`sequenced`) is applied. Changes nothing: the compares and
    /// both branches run on the store and are dropped. Puts naming a lease
    /// take `lease_exists` for whether it exists.
    pub fn vote(
        &self,
        sequenced: u64,
        lease_exists: &dyn Fn(i64) -> bool,
    ) -> Result<Option<TxnVote>, ReplicaError> {
        let after = self.applied_index();
        let Some((index, ShardWrite::CrossTxn(txn))) = self.staged.front() else {
            return Ok(None);
        };
        if sequenced != after {
            return Ok(None);
        }
        let keyspace = Keyspace::new(txn.shards).map_err(|_| ReplicaError::NotPrepared {
            shard: self.shard,
            index: *index,
        })?;
        let request = txn.txn.clone().unwrap_or_default();
        let found = RefCell::new(BTreeMap::new());
        let exists = |id: i64| {
            *found
                .borrow_mut()
                .entry(id)
                .or_insert_with(|| lease_exists(id))
        };
        let compares = {
            let batch = self.store.write();
            request
                .compare
                .iter()
                .map(|c| {
                    batch
                        .compare_here(c)
                        .map(|(found, holds)| CompareVote { found, holds })
                })
                .collect::<Result<Vec<_>, _>>()?
        };
        let success = self.dry_run(&request.success, &keyspace, &exists);
        let failure = self.dry_run(&request.failure, &keyspace, &exists);
        let (leases, missing): (Vec<_>, Vec<_>) = found
            .into_inner()
            .into_iter()
            .partition(|(_, found)| *found);
        Ok(Some(TxnVote {
            shard: self.shard,
            index: *index,
            after,
            revoked: self.revoked,
            id: id_of(txn),
            participants: txn.participants.clone(),
            compares,
            changes_success: success.changes,
            changes_failure: failure.changes,
            fails_success: success.fails,
            fails_failure: failure.fails,
            leases: leases.into_iter().map(|(id, _)| id).collect(),
            missing: missing.into_iter().map(|(id, _)| id).collect(),
            attach_success: success.attach,
            attach_failure: failure.attach,
        }))
    }

    fn dry_run(
        &self,
        ops: &[RequestOp],
        keyspace: &Keyspace,
        lease_exists: &dyn Fn(i64) -> bool,
    ) -> DryRun {
        let (own, _) = own_part(ops, keyspace, self.shard);
        let mut batch = self.store.write();
        let before = batch.current_revision();
        let fails = batch.txn_checked(&as_txn(own), lease_exists).is_err();
        DryRun {
            changes: batch.current_revision() != before,
            fails,
            attach: batch
                .lease_changes()
                .into_iter()
                .map(|(key, lease)| (key.to_vec(), lease))
                .collect(),
        }
    }

    /// Applies a txn's decision to the prepare it names, which must be the
    /// first staged entry: its part of the chosen branch at the txn's
    /// revision when it changes this shard, else only the response. None
    /// when it was applied already (an announcement made twice, or a log
    /// replayed after a restart).
    pub fn decide(&mut self, decision: &TxnDecision) -> Result<Option<Decided>, ReplicaError> {
        let applied = self.applied_index();
        if decision.index <= applied {
            return Ok(None);
        }
        let not_prepared = || ReplicaError::NotPrepared {
            shard: self.shard,
            index: decision.index,
        };
        let txn = match self.staged.front() {
            Some((index, ShardWrite::CrossTxn(txn)))
                if *index == decision.index && id_of(txn) == decision.id =>
            {
                txn.clone()
            }
            _ => return Err(not_prepared()),
        };
        let (outcome, changed) = match decision.outcome {
            TxnOutcome::Aborted => {
                self.store.write().commit(decision.index)?;
                (Ok(WriteResponse::Aborted), None)
            }
            TxnOutcome::Succeeded | TxnOutcome::Failed => self.run_decided(&txn, decision)?,
        };
        self.staged.pop_front();
        Ok(Some(Decided {
            index: decision.index,
            outcome,
            changed,
        }))
    }

    fn run_decided(
        &mut self,
        txn: &CrossTxn,
        decision: &TxnDecision,
    ) -> Result<(Outcome, Option<Changed>), ReplicaError> {
        let keyspace = Keyspace::new(txn.shards).map_err(|_| ReplicaError::NotPrepared {
            shard: self.shard,
            index: decision.index,
        })?;
        let request = txn.txn.clone().unwrap_or_default();
        let succeeded = decision.outcome == TxnOutcome::Succeeded;
        let ops = if succeeded {
            &request.success
        } else {
            &request.failure
        };
        let (own, skipped) = own_part(ops, &keyspace, self.shard);
        let exists = |id: i64| decision.leases.contains(&id);
        let mut write = self.store.write();
        if decision.changes {
            write.skip_to(decision.revision)?;
        }
        let before = write.current_revision();
        let done = write.txn_checked(&as_txn(own), &exists);
        let outcome = done.map(|mut response| {
            response.succeeded = succeeded;
            response.header = Some(ResponseHeader {
                revision: decision.revision,
                ..Default::default()
            });
            for at in skipped {
                // The owner's response takes this place in the merge.
                response.responses.insert(
                    at,
                    ResponseOp {
                        response: Some(Response::ResponsePut(PutResponse::default())),
                    },
                );
            }
            WriteResponse::Txn(response)
        });
        let taken = (write.current_revision() - before) as u64;
        if !decision.changes {
            // Nothing of it changes this shard: only its answer counts.
            drop(write);
            self.store.write().commit(decision.index)?;
            return Ok((outcome, None));
        }
        if taken != 1 {
            return Err(ReplicaError::Diverged {
                shard: self.shard,
                after: self.applied_index(),
                through: decision.index,
                taken,
                given: 1,
            });
        }
        write.put_state_record(
            REVOKED_RECORD.to_vec(),
            decision.revision.to_be_bytes().to_vec(),
        );
        let events = write.commit(decision.index)?;
        self.revoked = decision.revision;
        Ok((outcome, Some((decision.revision, events))))
    }
}

/// How one attempt of a cross-shard txn ended, for its coordinator.
#[derive(Debug)]
pub enum Attempt<E> {
    /// Decided: every participant's part, by shard.
    Done(Vec<(ShardId, TxnResponse)>),
    /// Aborted: nothing of it took effect on any shard; it runs again under
    /// a new ID. With the failure of a participant's prepare that led to
    /// the abort, if one did (a refusal the caller may answer rather than
    /// run it again).
    Aborted(Option<E>),
    /// A participant's prepare failed or was not committed in time, and no
    /// other participant answered that the txn was aborted: it may have
    /// been decided before the abort this asked for, so whether it took
    /// effect is unknown (the caller answers as for a lost proposal).
    Failed(E),
}

/// One attempt of cross-shard txn `id` over `participants`, coordinated:
/// `prepare` proposes a participant's prepare and waits for its part
/// (`None`: the txn was aborted), failing when the prepare is not committed
/// in time; all of them at once. When one fails, its prepare may be lost
/// (with a shard's leader), and the participants that voted wait on the
/// txn: `abort` asks the cluster group to abort it at once. An abort is the
/// whole txn's, and one is final even if the lost prepare commits later
/// (the sequencer keeps it aborted), so the first participant answering it
/// ends the attempt; one answering its part after the failure shows the
/// txn was decided first.
pub async fn attempt<E, P, PF, A, AF>(
    id: TxnId,
    participants: &[ShardId],
    prepare: P,
    abort: A,
) -> Attempt<E>
where
    E: std::fmt::Display,
    P: Fn(ShardId) -> PF,
    PF: std::future::Future<Output = Result<Option<TxnResponse>, E>>,
    A: FnOnce(TxnId) -> AF,
    AF: std::future::Future<Output = Result<(), E>>,
{
    use futures_util::StreamExt;

    let mut parts: futures_util::stream::FuturesUnordered<_> = participants
        .iter()
        .map(|&shard| {
            let part = prepare(shard);
            async move { (shard, part.await) }
        })
        .collect();
    let mut partials = Vec::new();
    let mut failed = None;
    let mut abort = Some(abort);
    while let Some((shard, answer)) = parts.next().await {
        match answer {
            Ok(Some(partial)) => partials.push((shard, partial)),
            Ok(None) => return Attempt::Aborted(failed),
            Err(e) => {
                tracing::debug!(
                    shard,
                    seq = id.seq,
                    "a cross-shard txn's prepare failed: {e}"
                );
                if let Some(abort) = abort.take()
                    && let Err(e) = abort(id).await
                {
                    // The cluster group's leader aborts it later.
                    tracing::debug!(seq = id.seq, "aborting a cross-shard txn: {e}");
                }
                failed.get_or_insert(e);
            }
        }
    }
    match failed {
        Some(e) => Attempt::Failed(e),
        None => Attempt::Done(partials),
    }
}

/// The coordinator's answer to a cross-shard `txn` from each participant's
/// partial response (by shard), at `revision`: op by op, a put answered by
/// its key's shard, a range merged from every shard's as the request asks,
/// a delete's counts summed and its previous key-values merged by key.
pub fn merge_txn(
    keyspace: &Keyspace,
    txn: &TxnRequest,
    partials: &[(ShardId, TxnResponse)],
    revision: i64,
) -> TxnResponse {
    let succeeded = partials.first().is_some_and(|(_, p)| p.succeeded);
    let ops = if succeeded {
        &txn.success
    } else {
        &txn.failure
    };
    let at = |at: usize| {
        partials.iter().filter_map(move |(shard, p)| {
            p.responses
                .get(at)
                .and_then(|r| r.response.clone())
                .map(|r| (*shard, r))
        })
    };
    let responses = ops
        .iter()
        .enumerate()
        .map(|(i, op)| {
            let response = match &op.request {
                Some(Request::RequestPut(put)) => {
                    let owner = keyspace.shard_of(&put.key);
                    at(i).find(|(shard, _)| *shard == owner).map(|(_, r)| r)
                }
                Some(Request::RequestRange(range)) => {
                    let answers = at(i).filter_map(|(_, r)| match r {
                        Response::ResponseRange(r) => Some(r),
                        _ => None,
                    });
                    Some(Response::ResponseRange(crate::merge(
                        range, revision, answers,
                    )))
                }
                Some(Request::RequestDeleteRange(_)) => {
                    let mut merged = DeleteRangeResponse {
                        header: Some(ResponseHeader {
                            revision,
                            ..Default::default()
                        }),
                        ..Default::default()
                    };
                    for (_, r) in at(i) {
                        if let Response::ResponseDeleteRange(r) = r {
                            merged.deleted += r.deleted;
                            merged.prev_kvs.extend(r.prev_kvs);
                        }
                    }
                    merged.prev_kvs.sort_by(|a, b| a.key.cmp(&b.key));
                    Some(Response::ResponseDeleteRange(merged))
                }
                Some(Request::RequestTxn(_)) | None => at(i).next().map(|(_, r)| r),
            };
            ResponseOp {
                response: response.map(|r| with_revision(r, revision)),
            }
        })
        .collect();
    TxnResponse {
        header: Some(ResponseHeader {
            revision,
            ..Default::default()
        }),
        succeeded,
        responses,
    }
}

fn with_revision(response: Response, revision: i64) -> Response {
    let header = Some(ResponseHeader {
        revision,
        ..Default::default()
    });
    match response {
        Response::ResponsePut(r) => Response::ResponsePut(PutResponse { header, ..r }),
        Response::ResponseRange(mut r) => {
            r.header = header;
            Response::ResponseRange(r)
        }
        Response::ResponseDeleteRange(r) => {
            Response::ResponseDeleteRange(DeleteRangeResponse { header, ..r })
        }
        other => other,
    }
}
