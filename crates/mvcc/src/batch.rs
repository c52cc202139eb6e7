//! The single writer: runs put, delete-range, txn and compact requests
//! against the committed state plus the batch's own earlier writes, then
//! commits them all at once.

use std::collections::BTreeMap;

use bytes::Bytes;
use cairn_api::etcdserverpb::request_op::Request;
use cairn_api::etcdserverpb::response_op::Response;
use cairn_api::etcdserverpb::{
    CompactionResponse, Compare, DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse,
    RangeRequest, RangeResponse, ResponseHeader, ResponseOp, TxnRequest, TxnResponse,
};
use cairn_api::mvccpb::event::EventType;
use cairn_api::mvccpb::{Event, KeyValue};
use fjall::Keyspace;
use parking_lot::MutexGuard;

use crate::index::{self, Generation, KeyRange, Located, Pending, PendingRev, Rev};
use crate::range::{self, header};
use crate::{Inner, MvccError, codec, delete_revisions, load};

/// Writes of the apply loop, visible to readers only after [`commit`].
///
/// Each request that changes something gets the next main revision; a
/// request that fails leaves no trace and the batch usable.
///
/// [`commit`]: WriteBatch::commit
pub struct WriteBatch<'a> {
    inner: &'a Inner,
    _writer: MutexGuard<'a, ()>,
    /// The keyspace the committed revisions are in; only a restore changes
    /// it, and it waits for the writer lock this batch holds.
    revisions: Keyspace,
    pending: Pending,
    /// The revision including this batch's writes so far.
    current: i64,
    /// The compact revision including this batch's compactions.
    compact: i64,
    compacted: bool,
    /// Keys the running request wrote, to undo them if it fails.
    touched: Vec<Bytes>,
    /// Lease records to store (Some) or delete (None) with the commit.
    leases: BTreeMap<i64, Option<Vec<u8>>>,
    /// State records to store (Some) or delete (None) with the commit.
    state_records: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

/// The events of a batch's writes, in (main, sub) revision order.
fn events(pending: &Pending) -> Vec<Event> {
    let mut revs: Vec<(Rev, &KeyValue)> = pending
        .values()
        .flatten()
        .map(|write| (write.rev, &write.kv))
        .collect();
    revs.sort_unstable_by_key(|(rev, _)| (rev.main, rev.sub));
    revs.into_iter()
        .map(|(rev, kv)| Event {
            r#type: if rev.tombstone {
                EventType::Delete
            } else {
                EventType::Put
            } as i32,
            kv: Some(kv.clone()),
            prev_kv: None,
        })
        .collect()
}

/// Revision bookkeeping of the running request: all its changes share
/// `main`, numbered by `next_sub`.
struct Writes {
    main: i64,
    next_sub: u32,
}

impl Writes {
    /// The revision the request's reads see, which includes its own writes
    /// once it has made any (as etcd's write txn does).
    fn read_revision(&self) -> i64 {
        if self.next_sub > 0 {
            self.main
        } else {
            self.main - 1
        }
    }
}

/// A txn's chosen branch, with the branches of nested txns chosen too.
struct Branch<'r> {
    succeeded: bool,
    steps: Vec<Step<'r>>,
}

enum Step<'r> {
    Range(&'r RangeRequest),
    Put(&'r PutRequest),
    Delete(&'r DeleteRangeRequest),
    Txn(Branch<'r>),
    Empty,
}

impl<'a> WriteBatch<'a> {
    pub(crate) fn new(inner: &'a Inner, writer: MutexGuard<'a, ()>) -> WriteBatch<'a> {
        let (current, compact, revisions) = {
            let state = inner.state.read();
            (
                state.index.current,
                state.index.compact,
                state.revisions.clone(),
            )
        };
        WriteBatch {
            inner,
            _writer: writer,
            revisions,
            pending: Pending::new(),
            current,
            compact,
            compacted: false,
            touched: Vec::new(),
            leases: BTreeMap::new(),
            state_records: BTreeMap::new(),
        }
    }

    /// The revision after the requests run so far.
    pub fn current_revision(&self) -> i64 {
        self.current
    }

    /// Makes the batch's next write take `revision`, leaving a gap after
    /// the current one: a shard's store holds only the revisions the
    /// sequencer gave to its shard. The requests run as they would at
    /// `revision` in a store of every shard, since a key's revisions are
    /// all in its own shard.
    pub fn skip_to(&mut self, revision: i64) -> Result<(), MvccError> {
        if revision <= self.current {
            return Err(MvccError::RevisionTaken {
                revision,
                current: self.current,
            });
        }
        self.current = revision - 1;
        Ok(())
    }

    /// Puts a key at a new revision.
    pub fn put(&mut self, req: &PutRequest) -> Result<PutResponse, MvccError> {
        self.put_checked(req, &|_| true)
    }

    /// Puts a key at a new revision if its lease (when not 0) passes
    /// `lease_exists`; fails with [`MvccError::LeaseNotFound`] otherwise.
    pub fn put_checked(
        &mut self,
        req: &PutRequest,
        lease_exists: &dyn Fn(i64) -> bool,
    ) -> Result<PutResponse, MvccError> {
        self.run(|batch, writes| {
            batch.check_put(req, writes.read_revision(), lease_exists)?;
            batch.put_op(req, writes)
        })
    }

    /// Deletes every live key of a range at one new revision; nothing
    /// deleted, no new revision.
    pub fn delete_range(
        &mut self,
        req: &DeleteRangeRequest,
    ) -> Result<DeleteRangeResponse, MvccError> {
        self.run(|batch, writes| batch.delete_op(req, writes))
    }

    /// Runs a txn: every compare (nested ones of the chosen branches too) is
    /// evaluated against the state before it, and all its writes share one
    /// main revision.
    pub fn txn(&mut self, req: &TxnRequest) -> Result<TxnResponse, MvccError> {
        self.txn_checked(req, &|_| true)
    }

    /// A txn whose puts in the chosen branches must name leases that pass
    /// `lease_exists` (or none); checked before anything is written.
    pub fn txn_checked(
        &mut self,
        req: &TxnRequest,
        lease_exists: &dyn Fn(i64) -> bool,
    ) -> Result<TxnResponse, MvccError> {
        self.run(|batch, writes| batch.txn_op(req, writes, lease_exists))
    }

    /// The keys whose lease the batch's writes changed, each with the lease
    /// it has at the head of the batch (0: none, or deleted): what a lessor
    /// kept elsewhere must attach and detach once the batch commits. Keys
    /// written with their lease unchanged are left out.
    pub fn lease_changes(&self) -> Vec<(Bytes, i64)> {
        let state = self.inner.state.read();
        self.pending
            .iter()
            .filter_map(|(key, writes)| {
                let newest = writes.last()?;
                let now = if newest.rev.tombstone {
                    0
                } else {
                    newest.kv.lease
                };
                let before = state
                    .index
                    .keys
                    .get(key.as_ref())
                    .and_then(|k| k.live_generation())
                    .map_or(0, |g| g.lease);
                (now != before).then(|| (key.clone(), now))
            })
            .collect()
    }

    /// Stores lease `id` as `record` with the commit.
    pub fn put_lease(&mut self, id: i64, record: Vec<u8>) {
        self.leases.insert(id, Some(record));
    }

    /// Stores a state record with the commit.
    pub fn put_state_record(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.state_records.insert(key, Some(value));
    }

    /// Deletes a state record with the commit.
    pub fn delete_state_record(&mut self, key: Vec<u8>) {
        self.state_records.insert(key, None);
    }

    /// Deletes lease `id` with the commit.
    pub fn delete_lease(&mut self, id: i64) {
        self.leases.insert(id, None);
    }

    /// Compacts at `revision`: reads below it fail from then on. Does not
    /// change the current revision.
    pub fn compact(&mut self, revision: i64) -> Result<CompactionResponse, MvccError> {
        if revision <= self.compact {
            return Err(MvccError::Compacted);
        }
        if revision > self.current {
            return Err(MvccError::FutureRevision);
        }
        self.compact = revision;
        self.compacted = true;
        Ok(CompactionResponse {
            header: header(self.current),
        })
    }

    /// Commits every write of the batch and the applied index in one fjall
    /// batch (not fsynced: the raft log is the durable record), then
    /// publishes them to readers and deletes what a compaction dropped.
    ///
    /// On error nothing is published if the commit itself failed; an error
    /// deleting compacted revisions comes after publishing and leaves
    /// leftovers that the next open removes. Either way the caller should
    /// treat it as fatal.
    ///
    /// Returns the batch's events, one per changed key, in revision order,
    /// for watchers: a put carries the new key-value, a delete a tombstone
    /// with only the key and its mod revision (prev_kv is left to whoever
    /// wants it, since most watchers do not).
    pub fn commit(self, applied_index: u64) -> Result<Vec<Event>, MvccError> {
        let inner = self.inner;
        let mut batch = inner.db.batch();
        let mut added = 0u64;
        for writes in self.pending.values() {
            for write in writes {
                let key = codec::rev_key(write.rev);
                let value = codec::encode_entry(&write.kv, write.rev.tombstone);
                added += (key.len() + value.len()) as u64;
                batch.insert(&self.revisions, key, value);
            }
        }
        for (id, record) in self.leases {
            match record {
                Some(record) => batch.insert(&inner.leases, codec::lease_key(id), record),
                None => batch.remove(&inner.leases, codec::lease_key(id)),
            }
        }
        for (key, value) in self.state_records {
            match value {
                Some(value) => batch.insert(&inner.state_records, key, value),
                None => batch.remove(&inner.state_records, key),
            }
        }
        batch.insert(
            &inner.meta,
            codec::APPLIED_INDEX,
            applied_index.to_be_bytes(),
        );
        if self.compacted {
            batch.insert(
                &inner.meta,
                codec::COMPACT_REVISION,
                self.compact.to_be_bytes(),
            );
            batch.insert(&inner.meta, codec::COMPACTING, []);
            // The compaction deletes tombstones an index checkpoint's tail
            // would need: the checkpoint no longer fits the store.
            batch.remove(&inner.meta, codec::INDEX_CHECKPOINT);
        }
        batch.commit().inspect_err(|e| {
            tracing::error!(error = %e, applied_index, "mvcc commit failed");
        })?;

        let dropped = {
            let mut state = inner.state.write();
            let index = &mut state.index;
            for (key, writes) in &self.pending {
                for write in writes {
                    index.push(key, write.rev, Generation::of(&write.kv));
                }
            }
            index.current = self.current;
            let revisions = self.pending.values().map(|w| w.len() as u64).sum::<u64>();
            inner
                .checkpoints
                .committed(added, revisions + u64::from(self.compacted));
            if self.compacted {
                inner.checkpoints.invalidate();
                index.compact = self.compact;
                index.compact(self.compact)
            } else {
                Vec::new()
            }
        };
        inner
            .applied
            .store(applied_index, std::sync::atomic::Ordering::Release);
        let events = events(&self.pending);
        inner
            .in_use
            .fetch_add(added, std::sync::atomic::Ordering::Relaxed);
        if self.compacted {
            tracing::info!(
                compact_revision = self.compact,
                dropped = dropped.len(),
                "compacted mvcc store"
            );
        }
        // Still holding the writer lock: the next batch starts after this.
        if self.compacted {
            delete_revisions(&inner.db, &self.revisions, &dropped, &inner.in_use)?;
            inner.meta.remove(codec::COMPACTING)?;
            inner.request_checkpoint();
        } else {
            inner.maybe_checkpoint();
        }
        Ok(events)
    }

    /// Runs one request; undoes its writes if it fails.
    fn run<T>(
        &mut self,
        op: impl FnOnce(&mut Self, &mut Writes) -> Result<T, MvccError>,
    ) -> Result<T, MvccError> {
        let mut writes = Writes {
            main: self.current + 1,
            next_sub: 0,
        };
        let result = op(self, &mut writes);
        if result.is_ok() {
            if writes.next_sub > 0 {
                self.current = writes.main;
            }
            self.touched.clear();
        } else {
            for key in self.touched.drain(..) {
                if let Some(revs) = self.pending.get_mut(&key) {
                    while revs.last().is_some_and(|p| p.rev.main == writes.main) {
                        revs.pop();
                    }
                    if revs.is_empty() {
                        self.pending.remove(&key);
                    }
                }
            }
        }
        result
    }

    fn record(&mut self, kv: KeyValue, tombstone: bool, writes: &mut Writes) {
        let rev = Rev {
            main: writes.main,
            sub: writes.next_sub,
            tombstone,
        };
        writes.next_sub += 1;
        self.touched.push(kv.key.clone());
        self.pending
            .entry(kv.key.clone())
            .or_default()
            .push(PendingRev { rev, kv });
    }

    fn collect(&self, range: KeyRange<'_>, rev: i64, keep: usize) -> (usize, Vec<Located>) {
        let state = self.inner.state.read();
        index::collect(&state.index, &self.pending, range, rev, keep)
    }

    fn load(&self, located: Vec<Located>) -> Result<Vec<KeyValue>, MvccError> {
        // No other writer runs, so the stored revisions cannot change under
        // us; the snapshot is only the way to read them.
        load(&self.inner.db.snapshot(), &self.revisions, located)
    }

    fn exists(&self, key: &[u8], rev: i64) -> bool {
        self.collect(KeyRange::Single(key), rev, 0).0 > 0
    }

    /// The generation `key` has at the head of the batch, unless it is not
    /// live there; the batch's own writes are all visible to its requests.
    fn live_generation(&self, key: &[u8]) -> Option<Generation> {
        if let Some(newest) = self.pending.get(key).and_then(|w| w.last()) {
            return (!newest.rev.tombstone).then(|| Generation::of(&newest.kv));
        }
        let state = self.inner.state.read();
        state.index.keys.get(key)?.live_generation()
    }

    fn put_op(&mut self, req: &PutRequest, writes: &mut Writes) -> Result<PutResponse, MvccError> {
        let ignoring = req.ignore_value || req.ignore_lease;
        // The stored value is read only when the request needs it: a plain
        // put continues the generation the index keeps.
        let read_back = ignoring || req.prev_kv;
        let prev = if read_back {
            let (_, located) = self.collect(KeyRange::Single(&req.key), writes.read_revision(), 1);
            self.load(located)?.pop()
        } else {
            None
        };
        if ignoring && prev.is_none() {
            return Err(MvccError::KeyNotFound);
        }
        let generation = if read_back {
            prev.as_ref().map(Generation::of)
        } else {
            self.live_generation(&req.key)
        };
        let (value, lease) = match &prev {
            Some(p) => (
                if req.ignore_value {
                    p.value.clone()
                } else {
                    req.value.clone()
                },
                if req.ignore_lease { p.lease } else { req.lease },
            ),
            None => (req.value.clone(), req.lease),
        };
        let kv = KeyValue {
            key: req.key.clone(),
            create_revision: generation.map_or(writes.main, |g| g.created),
            mod_revision: writes.main,
            version: generation.map_or(1, |g| g.version + 1),
            value,
            lease,
        };
        self.record(kv, false, writes);
        Ok(PutResponse {
            header: header(writes.main),
            prev_kv: prev.filter(|_| req.prev_kv),
        })
    }

    fn delete_op(
        &mut self,
        req: &DeleteRangeRequest,
        writes: &mut Writes,
    ) -> Result<DeleteRangeResponse, MvccError> {
        let range = KeyRange::new(&req.key, &req.range_end);
        let (count, located) = self.collect(range, writes.read_revision(), usize::MAX);
        let keys: Vec<Bytes> = located.iter().map(|l| l.key.clone()).collect();
        let prev_kvs = if req.prev_kv {
            self.load(located)?
        } else {
            Vec::new()
        };
        for key in keys {
            let tombstone = KeyValue {
                key,
                mod_revision: writes.main,
                ..Default::default()
            };
            self.record(tombstone, true, writes);
        }
        Ok(DeleteRangeResponse {
            header: header(writes.read_revision()),
            deleted: i64::try_from(count).unwrap_or(i64::MAX),
            prev_kvs,
        })
    }

    fn range_op(&self, req: &RangeRequest, current: i64) -> Result<RangeResponse, MvccError> {
        let rev = range::read_revision(req.revision, current, self.compact)?;
        let range = KeyRange::new(&req.key, &req.range_end);
        let (count, located) = self.collect(range, rev, range::fetch_limit(req));
        let kvs = self.load(located)?;
        Ok(range::shape(req, count, kvs, current))
    }

    fn txn_op(
        &mut self,
        req: &TxnRequest,
        writes: &mut Writes,
        lease_exists: &dyn Fn(i64) -> bool,
    ) -> Result<TxnResponse, MvccError> {
        let before = writes.read_revision();
        let branch = self.choose(req, before)?;
        // etcd checks these against the state before the txn, puts first,
        // so a txn that would fail halfway writes nothing.
        self.check_puts(&branch, before, lease_exists)?;
        self.check_ranges(&branch, before)?;
        let mut resp = self.execute(&branch, writes)?;
        resp.header = header(writes.read_revision());
        Ok(resp)
    }

    fn choose<'r>(&self, req: &'r TxnRequest, rev: i64) -> Result<Branch<'r>, MvccError> {
        let mut succeeded = true;
        for c in &req.compare {
            if !self.compare(c, rev)? {
                succeeded = false;
                break;
            }
        }
        let ops = if succeeded {
            &req.success
        } else {
            &req.failure
        };
        let steps = ops
            .iter()
            .map(|op| {
                Ok(match &op.request {
                    Some(Request::RequestRange(r)) => Step::Range(r),
                    Some(Request::RequestPut(p)) => Step::Put(p),
                    Some(Request::RequestDeleteRange(d)) => Step::Delete(d),
                    Some(Request::RequestTxn(t)) => Step::Txn(self.choose(t, rev)?),
                    None => Step::Empty,
                })
            })
            .collect::<Result<_, MvccError>>()?;
        Ok(Branch { succeeded, steps })
    }

    /// `c` over the batch's state: whether its range holds any key here,
    /// and whether it holds (with no key, as etcd compares an absent one).
    pub fn compare_here(&self, c: &Compare) -> Result<(bool, bool), MvccError> {
        let (_, located) = self.collect(
            KeyRange::new(&c.key, &c.range_end),
            self.current,
            usize::MAX,
        );
        let kvs = self.load(located)?;
        Ok((!kvs.is_empty(), range::compare(c, &kvs)))
    }

    fn compare(&self, c: &Compare, rev: i64) -> Result<bool, MvccError> {
        let (_, located) = self.collect(KeyRange::new(&c.key, &c.range_end), rev, usize::MAX);
        Ok(range::compare(c, &self.load(located)?))
    }

    fn check_puts(
        &self,
        branch: &Branch<'_>,
        rev: i64,
        lease_exists: &dyn Fn(i64) -> bool,
    ) -> Result<(), MvccError> {
        for step in &branch.steps {
            match step {
                Step::Put(p) => self.check_put(p, rev, lease_exists)?,
                Step::Txn(nested) => self.check_puts(nested, rev, lease_exists)?,
                _ => {}
            }
        }
        Ok(())
    }

    /// etcd's checks of a put before it runs: the key it keeps the value or
    /// lease of exists, then its lease does.
    fn check_put(
        &self,
        p: &PutRequest,
        rev: i64,
        lease_exists: &dyn Fn(i64) -> bool,
    ) -> Result<(), MvccError> {
        if (p.ignore_value || p.ignore_lease) && !self.exists(&p.key, rev) {
            return Err(MvccError::KeyNotFound);
        }
        if p.lease != 0 && !lease_exists(p.lease) {
            return Err(MvccError::LeaseNotFound);
        }
        Ok(())
    }

    fn check_ranges(&self, branch: &Branch<'_>, rev: i64) -> Result<(), MvccError> {
        for step in &branch.steps {
            match step {
                // etcd compares any non-zero revision, negative ones too.
                Step::Range(r) if r.revision != 0 && r.revision > rev => {
                    return Err(MvccError::FutureRevision);
                }
                Step::Range(r) if r.revision != 0 && r.revision < self.compact => {
                    return Err(MvccError::Compacted);
                }
                Step::Txn(nested) => self.check_ranges(nested, rev)?,
                _ => {}
            }
        }
        Ok(())
    }

    fn execute(
        &mut self,
        branch: &Branch<'_>,
        writes: &mut Writes,
    ) -> Result<TxnResponse, MvccError> {
        let mut responses = Vec::with_capacity(branch.steps.len());
        for step in &branch.steps {
            let response = match step {
                Step::Range(r) => Some(Response::ResponseRange(
                    self.range_op(r, writes.read_revision())?,
                )),
                Step::Put(p) => Some(Response::ResponsePut(self.put_op(p, writes)?)),
                Step::Delete(d) => Some(Response::ResponseDeleteRange(self.delete_op(d, writes)?)),
                Step::Txn(nested) => Some(Response::ResponseTxn(self.execute(nested, writes)?)),
                Step::Empty => None,
            };
            responses.push(ResponseOp { response });
        }
        Ok(TxnResponse {
            // etcd fills only the outermost txn header; nested ones stay at
            // revision 0 (the caller overwrites the outermost).
            header: Some(ResponseHeader::default()),
            succeeded: branch.succeeded,
            responses,
        })
    }
}
