//! Random sequences of requests, batches, commits, index checkpoints and
//! reopens, checked against a plain model that keeps the whole key space at
//! every revision.

use std::collections::BTreeMap;
use std::path::Path;

use bytes::Bytes;
use cairn_api::etcdserverpb::compare::{CompareTarget, TargetUnion};
use cairn_api::etcdserverpb::range_request::{SortOrder, SortTarget};
use cairn_api::etcdserverpb::request_op::Request;
use cairn_api::etcdserverpb::response_op::Response;
use cairn_api::etcdserverpb::{
    CompactionResponse, Compare, DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse,
    RangeRequest, RangeResponse, RequestOp, ResponseHeader, ResponseOp, TxnRequest, TxnResponse,
};
use cairn_api::mvccpb::KeyValue;
use proptest::prelude::*;

use crate::checkpoint_tests::rebuilt;
use crate::{MvccError, Store, StoreOptions, WriteBatch};

/// Checkpoints in the background too, every few revisions.
const OPTIONS: StoreOptions = StoreOptions {
    checkpoint_bytes: u64::MAX,
    checkpoint_revisions: 5,
};

type Map = BTreeMap<Bytes, KeyValue>;

fn hdr(revision: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader {
        revision,
        ..Default::default()
    })
}

fn in_range(key: &[u8], start: &[u8], end: &[u8]) -> bool {
    match end {
        [] => key == start,
        [0] => key >= start,
        _ => key >= start && key < end,
    }
}

/// etcd's rules written the plain way: maps of whole states, no index.
struct Model {
    /// `states[r]` is the key space at revision r (0 and 1 are empty).
    states: Vec<Map>,
    compact: i64,
    committed_current: i64,
    committed_compact: i64,
}

impl Model {
    fn new() -> Model {
        Model {
            states: vec![Map::new(), Map::new()],
            compact: -1,
            committed_current: 1,
            committed_compact: -1,
        }
    }

    fn current(&self) -> i64 {
        self.states.len() as i64 - 1
    }

    fn state(&self, rev: i64) -> &Map {
        &self.states[rev as usize]
    }

    fn commit(&mut self) {
        self.committed_current = self.current();
        self.committed_compact = self.compact;
    }

    /// A Range at `current`, where `latest` is the state at `current`.
    fn range(
        &self,
        req: &RangeRequest,
        current: i64,
        compact: i64,
        latest: &Map,
    ) -> Result<RangeResponse, MvccError> {
        if req.revision > current {
            return Err(MvccError::FutureRevision);
        }
        let rev = if req.revision <= 0 {
            current
        } else {
            req.revision
        };
        if rev < compact {
            return Err(MvccError::Compacted);
        }
        let state = if rev == current {
            latest
        } else {
            self.state(rev)
        };
        let mut kvs: Vec<KeyValue> = state
            .values()
            .filter(|kv| in_range(&kv.key, &req.key, &req.range_end))
            .cloned()
            .collect();
        let count = kvs.len() as i64;
        if req.count_only {
            kvs.clear();
        }
        // etcd applies the limit first unless an order or a filter is given,
        // even when a non-key target then sorts the page.
        let fetch_all = req.sort_order != 0
            || req.min_mod_revision != 0
            || req.max_mod_revision != 0
            || req.min_create_revision != 0
            || req.max_create_revision != 0;
        if !fetch_all && req.limit > 0 {
            kvs.truncate(req.limit as usize + 1);
        }
        kvs.retain(|kv| {
            (req.max_mod_revision == 0 || kv.mod_revision <= req.max_mod_revision)
                && (req.min_mod_revision == 0 || kv.mod_revision >= req.min_mod_revision)
                && (req.max_create_revision == 0 || kv.create_revision <= req.max_create_revision)
                && (req.min_create_revision == 0 || kv.create_revision >= req.min_create_revision)
        });
        let mut order = req.sort_order;
        if req.sort_target != SortTarget::Key as i32 && order == SortOrder::None as i32 {
            order = SortOrder::Ascend as i32;
        }
        let field = |kv: &KeyValue| -> (Bytes, i64) {
            match req.sort_target {
                1 => (Bytes::new(), kv.version),
                2 => (Bytes::new(), kv.create_revision),
                3 => (Bytes::new(), kv.mod_revision),
                4 => (kv.value.clone(), 0),
                _ => (kv.key.clone(), 0),
            }
        };
        if order == SortOrder::Ascend as i32 {
            kvs.sort_by_key(|kv| field(kv));
        } else if order == SortOrder::Descend as i32 {
            kvs.sort_by_key(|kv| std::cmp::Reverse(field(kv)));
        }
        let mut more = false;
        if req.limit > 0 && kvs.len() as i64 > req.limit {
            kvs.truncate(req.limit as usize);
            more = true;
        }
        if req.keys_only {
            for kv in &mut kvs {
                kv.value = Bytes::new();
            }
        }
        Ok(RangeResponse {
            header: hdr(current),
            kvs,
            more,
            count,
        })
    }

    fn compare(c: &Compare, state: &Map) -> bool {
        let kvs: Vec<&KeyValue> = state
            .values()
            .filter(|kv| in_range(&kv.key, &c.key, &c.range_end))
            .collect();
        let zero = KeyValue::default();
        if kvs.is_empty() && c.target == CompareTarget::Value as i32 {
            return false;
        }
        let check = |kv: &KeyValue| {
            let ord = match (c.target, &c.target_union) {
                (3, Some(TargetUnion::Value(v))) => kv.value.cmp(v),
                (3, _) => kv.value.cmp(&Bytes::new()),
                (0, Some(TargetUnion::Version(v))) => kv.version.cmp(v),
                (0, _) => kv.version.cmp(&0),
                (1, Some(TargetUnion::CreateRevision(v))) => kv.create_revision.cmp(v),
                (1, _) => kv.create_revision.cmp(&0),
                (2, Some(TargetUnion::ModRevision(v))) => kv.mod_revision.cmp(v),
                (2, _) => kv.mod_revision.cmp(&0),
                (4, Some(TargetUnion::Lease(v))) => kv.lease.cmp(v),
                (4, _) => kv.lease.cmp(&0),
                _ => std::cmp::Ordering::Equal,
            };
            match c.result {
                0 => ord.is_eq(),
                1 => ord.is_gt(),
                2 => ord.is_lt(),
                3 => ord.is_ne(),
                _ => true,
            }
        };
        if kvs.is_empty() {
            return check(&zero);
        }
        kvs.into_iter().all(check)
    }

    fn put_into(work: &mut Map, req: &PutRequest, main: i64) -> Result<PutResponse, MvccError> {
        let prev = work.get(&req.key).cloned();
        if (req.ignore_value || req.ignore_lease) && prev.is_none() {
            return Err(MvccError::KeyNotFound);
        }
        let kv = KeyValue {
            key: req.key.clone(),
            create_revision: prev.as_ref().map_or(main, |p| p.create_revision),
            mod_revision: main,
            version: prev.as_ref().map_or(0, |p| p.version) + 1,
            value: match &prev {
                Some(p) if req.ignore_value => p.value.clone(),
                _ => req.value.clone(),
            },
            lease: match &prev {
                Some(p) if req.ignore_lease => p.lease,
                _ => req.lease,
            },
        };
        work.insert(kv.key.clone(), kv);
        Ok(PutResponse {
            header: hdr(main),
            prev_kv: if req.prev_kv { prev } else { None },
        })
    }

    fn delete_from(work: &mut Map, req: &DeleteRangeRequest) -> Vec<KeyValue> {
        let gone: Vec<KeyValue> = work
            .values()
            .filter(|kv| in_range(&kv.key, &req.key, &req.range_end))
            .cloned()
            .collect();
        for kv in &gone {
            work.remove(&kv.key);
        }
        gone
    }

    fn push(&mut self, state: Map) {
        self.states.push(state);
    }

    fn put(&mut self, req: &PutRequest) -> Result<PutResponse, MvccError> {
        let mut work = self.state(self.current()).clone();
        let resp = Self::put_into(&mut work, req, self.current() + 1)?;
        self.push(work);
        Ok(resp)
    }

    fn delete(&mut self, req: &DeleteRangeRequest) -> DeleteRangeResponse {
        let mut work = self.state(self.current()).clone();
        let gone = Self::delete_from(&mut work, req);
        if !gone.is_empty() {
            self.push(work);
        }
        DeleteRangeResponse {
            header: hdr(self.current()),
            deleted: gone.len() as i64,
            prev_kvs: if req.prev_kv { gone } else { Vec::new() },
        }
    }

    fn compact(&mut self, rev: i64) -> Result<CompactionResponse, MvccError> {
        if rev <= self.compact {
            return Err(MvccError::Compacted);
        }
        if rev > self.current() {
            return Err(MvccError::FutureRevision);
        }
        self.compact = rev;
        Ok(CompactionResponse {
            header: hdr(self.current()),
        })
    }

    fn branch<'r>(req: &'r TxnRequest, pre: &Map) -> (bool, &'r [RequestOp]) {
        let ok = req.compare.iter().all(|c| Self::compare(c, pre));
        (ok, if ok { &req.success } else { &req.failure })
    }

    fn precheck(&self, req: &TxnRequest, pre: &Map, puts: bool) -> Result<(), MvccError> {
        for op in Self::branch(req, pre).1 {
            match &op.request {
                Some(Request::RequestPut(p))
                    if puts && (p.ignore_value || p.ignore_lease) && !pre.contains_key(&p.key) =>
                {
                    return Err(MvccError::KeyNotFound);
                }
                Some(Request::RequestRange(r)) if !puts && r.revision != 0 => {
                    if r.revision > self.current() {
                        return Err(MvccError::FutureRevision);
                    }
                    if r.revision < self.compact {
                        return Err(MvccError::Compacted);
                    }
                }
                Some(Request::RequestTxn(t)) => self.precheck(t, pre, puts)?,
                _ => {}
            }
        }
        Ok(())
    }

    fn exec(
        &self,
        req: &TxnRequest,
        pre: &Map,
        work: &mut Map,
        wrote: &mut bool,
    ) -> Result<TxnResponse, MvccError> {
        let begin = self.current();
        let main = begin + 1;
        let (succeeded, ops) = Self::branch(req, pre);
        let mut responses = Vec::new();
        for op in ops {
            let response = match &op.request {
                Some(Request::RequestRange(r)) => {
                    let cur = if *wrote { main } else { begin };
                    Some(Response::ResponseRange(self.range(
                        r,
                        cur,
                        self.compact,
                        work,
                    )?))
                }
                Some(Request::RequestPut(p)) => {
                    let resp = Self::put_into(work, p, main)?;
                    *wrote = true;
                    Some(Response::ResponsePut(resp))
                }
                Some(Request::RequestDeleteRange(d)) => {
                    let gone = Self::delete_from(work, d);
                    *wrote |= !gone.is_empty();
                    Some(Response::ResponseDeleteRange(DeleteRangeResponse {
                        header: hdr(if *wrote { main } else { begin }),
                        deleted: gone.len() as i64,
                        prev_kvs: if d.prev_kv { gone } else { Vec::new() },
                    }))
                }
                Some(Request::RequestTxn(t)) => {
                    Some(Response::ResponseTxn(self.exec(t, pre, work, wrote)?))
                }
                None => None,
            };
            responses.push(ResponseOp { response });
        }
        Ok(TxnResponse {
            header: Some(ResponseHeader::default()),
            succeeded,
            responses,
        })
    }

    fn txn(&mut self, req: &TxnRequest) -> Result<TxnResponse, MvccError> {
        let pre = self.state(self.current()).clone();
        self.precheck(req, &pre, true)?;
        self.precheck(req, &pre, false)?;
        let mut work = pre.clone();
        let mut wrote = false;
        let mut resp = self.exec(req, &pre, &mut work, &mut wrote)?;
        if wrote {
            self.push(work);
        }
        resp.header = hdr(self.current());
        Ok(resp)
    }

    fn read(&self, req: &RangeRequest) -> Result<RangeResponse, MvccError> {
        let current = self.committed_current;
        self.range(req, current, self.committed_compact, self.state(current))
    }
}

#[derive(Clone, Debug)]
enum Action {
    Put(PutRequest),
    Delete(DeleteRangeRequest),
    Txn(TxnRequest),
    Compact(i64),
    Range(RangeRequest),
    Commit,
    Checkpoint,
    Reopen,
}

const KEYS: [&str; 5] = ["a", "ab", "b", "c", "d"];

fn key() -> impl Strategy<Value = Bytes> {
    prop::sample::select(&KEYS[..]).prop_map(|k| Bytes::from_static(k.as_bytes()))
}

fn range_end() -> impl Strategy<Value = Bytes> {
    prop_oneof![
        3 => Just(Bytes::new()),
        1 => Just(Bytes::from_static(b"\0")),
        2 => key(),
        1 => Just(Bytes::from_static(b"zz")),
    ]
}

fn value() -> impl Strategy<Value = Bytes> {
    prop::sample::select(&["", "x", "y", "zz"][..]).prop_map(|v| Bytes::from_static(v.as_bytes()))
}

fn revision() -> impl Strategy<Value = i64> {
    prop_oneof![2 => Just(0i64), 3 => -1i64..25]
}

fn put() -> impl Strategy<Value = PutRequest> {
    (
        key(),
        value(),
        0i64..3,
        any::<bool>(),
        prop::bool::weighted(0.15),
        prop::bool::weighted(0.15),
    )
        .prop_map(
            |(key, value, lease, prev_kv, ignore_value, ignore_lease)| PutRequest {
                key,
                // The server refuses a value with ignore_value.
                value: if ignore_value { Bytes::new() } else { value },
                lease,
                prev_kv,
                ignore_value,
                ignore_lease,
            },
        )
}

fn delete() -> impl Strategy<Value = DeleteRangeRequest> {
    (key(), range_end(), any::<bool>()).prop_map(|(key, range_end, prev_kv)| DeleteRangeRequest {
        key,
        range_end,
        prev_kv,
    })
}

fn filter() -> impl Strategy<Value = i64> {
    prop_oneof![4 => Just(0i64), 1 => 1i64..20]
}

fn range() -> impl Strategy<Value = RangeRequest> {
    (
        (key(), range_end(), 0i64..4, revision()),
        (0i32..3, 0i32..5, any::<bool>(), prop::bool::weighted(0.1)),
        (filter(), filter(), filter(), filter()),
    )
        .prop_map(
            |(
                (key, range_end, limit, revision),
                (sort_order, sort_target, keys_only, count_only),
                (a, b, c, d),
            )| {
                RangeRequest {
                    key,
                    range_end,
                    limit,
                    revision,
                    sort_order,
                    sort_target,
                    keys_only,
                    count_only,
                    min_mod_revision: a,
                    max_mod_revision: b,
                    min_create_revision: c,
                    max_create_revision: d,
                    ..Default::default()
                }
            },
        )
}

fn compare() -> impl Strategy<Value = Compare> {
    (
        key(),
        prop_oneof![4 => Just(Bytes::new()), 1 => range_end()],
        0i32..5,
        0i32..4,
        value(),
        0i64..8,
        prop::bool::weighted(0.1),
    )
        .prop_map(
            |(key, range_end, target, result, value, number, missing)| Compare {
                result,
                target,
                key,
                range_end,
                target_union: if missing {
                    None
                } else {
                    Some(match target {
                        0 => TargetUnion::Version(number),
                        1 => TargetUnion::CreateRevision(number),
                        2 => TargetUnion::ModRevision(number),
                        3 => TargetUnion::Value(value),
                        _ => TargetUnion::Lease(number % 3),
                    })
                },
            },
        )
}

fn txn() -> impl Strategy<Value = TxnRequest> {
    let leaf = prop_oneof![
        3 => put().prop_map(Request::RequestPut),
        2 => delete().prop_map(Request::RequestDeleteRange),
        2 => range().prop_map(Request::RequestRange),
    ];
    let op = leaf.prop_recursive(2, 12, 4, |inner| {
        (
            prop::collection::vec(compare(), 0..3),
            prop::collection::vec(inner.clone(), 0..3),
            prop::collection::vec(inner, 0..3),
        )
            .prop_map(|(compare, success, failure)| {
                Request::RequestTxn(TxnRequest {
                    compare,
                    success: success
                        .into_iter()
                        .map(|r| RequestOp { request: Some(r) })
                        .collect(),
                    failure: failure
                        .into_iter()
                        .map(|r| RequestOp { request: Some(r) })
                        .collect(),
                })
            })
    });
    let ops = || {
        prop::collection::vec(
            op.clone().prop_map(|r| RequestOp { request: Some(r) }),
            0..4,
        )
    };
    (prop::collection::vec(compare(), 0..3), ops(), ops()).prop_map(
        |(compare, success, failure)| TxnRequest {
            compare,
            success,
            failure,
        },
    )
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        30 => put().prop_map(Action::Put),
        10 => delete().prop_map(Action::Delete),
        20 => txn().prop_map(Action::Txn),
        5 => (0i64..25).prop_map(Action::Compact),
        15 => range().prop_map(Action::Range),
        10 => Just(Action::Commit),
        3 => Just(Action::Checkpoint),
        3 => Just(Action::Reopen),
    ]
}

fn same<T: PartialEq + std::fmt::Debug>(
    what: &str,
    got: Result<T, MvccError>,
    want: Result<T, MvccError>,
) -> Result<(), TestCaseError> {
    match (got, want) {
        (Ok(g), Ok(w)) => prop_assert_eq!(g, w, "{}", what),
        (Err(g), Err(w)) => prop_assert_eq!(g.to_string(), w.to_string(), "{}", what),
        (g, w) => prop_assert!(false, "{}: store {:?}, model {:?}", what, g, w),
    }
    Ok(())
}

fn storage(e: MvccError) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}

/// Every revision, read whole, agrees with the model (or fails alike).
fn check_all_revisions(store: &Store, model: &Model) -> Result<(), TestCaseError> {
    prop_assert_eq!(store.current_revision(), model.committed_current);
    prop_assert_eq!(store.compact_revision(), model.committed_compact.max(0));
    for revision in 0..=model.committed_current + 1 {
        let req = RangeRequest {
            key: Bytes::new(),
            range_end: Bytes::from_static(b"\0"),
            revision,
            ..Default::default()
        };
        same(
            &format!("scan at {revision}"),
            store.range(&req),
            model.read(&req),
        )?;
    }
    Ok(())
}

fn apply(
    batch: &mut WriteBatch<'_>,
    model: &mut Model,
    action: &Action,
) -> Result<(), TestCaseError> {
    match action {
        Action::Put(req) => same(&format!("{req:?}"), batch.put(req), model.put(req)),
        Action::Delete(req) => same(
            &format!("{req:?}"),
            batch.delete_range(req),
            Ok(model.delete(req)),
        ),
        Action::Txn(req) => same(&format!("{req:?}"), batch.txn(req), model.txn(req)),
        Action::Compact(rev) => same(
            &format!("compact {rev}"),
            batch.compact(*rev),
            model.compact(*rev),
        ),
        Action::Range(_) | Action::Commit | Action::Checkpoint | Action::Reopen => Ok(()),
    }
}

fn run(dir: &Path, actions: &[Action]) -> Result<(), TestCaseError> {
    let mut model = Model::new();
    let mut applied = 0u64;
    let mut store = Store::open_with(dir, OPTIONS).map_err(storage)?;
    let mut rest = actions;
    loop {
        let (chunk, after) = match rest.iter().position(|a| matches!(a, Action::Reopen)) {
            Some(i) => (&rest[..i], Some(&rest[i + 1..])),
            None => (rest, None),
        };
        {
            let mut batch: Option<WriteBatch<'_>> = None;
            for action in chunk {
                match action {
                    Action::Range(req) => {
                        // Readers see only what is committed, even while a
                        // batch is open.
                        same(&format!("{req:?}"), store.range(req), model.read(req))?;
                    }
                    // Between batches, as it waits for the writer; other
                    // checkpoints run in the background meanwhile.
                    Action::Checkpoint => {
                        if batch.is_none() {
                            store.checkpoint().map_err(storage)?;
                        }
                    }
                    Action::Commit => {
                        if let Some(open) = batch.take() {
                            applied += 1;
                            open.commit(applied).map_err(storage)?;
                            model.commit();
                            prop_assert_eq!(store.applied_index(), applied);
                        }
                    }
                    _ => {
                        let open = batch.get_or_insert_with(|| store.write());
                        apply(open, &mut model, action)?;
                    }
                }
            }
            if let Some(open) = batch.take() {
                applied += 1;
                open.commit(applied).map_err(storage)?;
                model.commit();
            }
        }
        check_all_revisions(&store, &model)?;
        let Some(after) = after else { break };
        drop(store);
        store = Store::open_with(dir, OPTIONS).map_err(storage)?;
        prop_assert_eq!(store.applied_index(), applied);
        // Read back from a checkpoint or rebuilt, the index is the same.
        let index = rebuilt(&store).map_err(storage)?;
        prop_assert_eq!(&store.inner.state.read().index, &index);
        check_all_revisions(&store, &model)?;
        rest = after;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_model(actions in prop::collection::vec(action(), 1..80)) {
        let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
        run(dir.path(), &actions)?;
    }
}
