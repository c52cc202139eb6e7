//! Tests of the store's etcd semantics through its public API.

use bytes::Bytes;
use cairn_api::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use cairn_api::etcdserverpb::range_request::{SortOrder, SortTarget};
use cairn_api::etcdserverpb::request_op::Request;
use cairn_api::etcdserverpb::response_op::Response;
use cairn_api::etcdserverpb::{
    Compare, DeleteRangeRequest, PutRequest, RangeRequest, RangeResponse, RequestOp, TxnRequest,
    TxnResponse,
};
use cairn_api::mvccpb::KeyValue;
use tempfile::TempDir;

use crate::{MvccError, Store, WriteBatch};

pub(crate) type Result<T = ()> = std::result::Result<T, MvccError>;

pub(crate) fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

pub(crate) fn open() -> Result<(TempDir, Store)> {
    let dir = tempfile::tempdir().map_err(|e| MvccError::Corrupt(e.to_string()))?;
    let store = Store::open(dir.path())?;
    Ok((dir, store))
}

pub(crate) fn put_req(key: &str, value: &str) -> PutRequest {
    PutRequest {
        key: b(key),
        value: b(value),
        ..Default::default()
    }
}

pub(crate) fn range_req(key: &str, end: &str) -> RangeRequest {
    RangeRequest {
        key: b(key),
        range_end: b(end),
        ..Default::default()
    }
}

pub(crate) fn del_req(key: &str, end: &str, prev_kv: bool) -> DeleteRangeRequest {
    DeleteRangeRequest {
        key: b(key),
        range_end: b(end),
        prev_kv,
    }
}

pub(crate) fn op(request: Request) -> RequestOp {
    RequestOp {
        request: Some(request),
    }
}

fn cmp(key: &str, target: CompareTarget, result: CompareResult, union: TargetUnion) -> Compare {
    Compare {
        result: result as i32,
        target: target as i32,
        key: b(key),
        range_end: Bytes::new(),
        target_union: Some(union),
    }
}

/// Puts each (key, value) as its own request and commits.
pub(crate) fn put_all(store: &Store, pairs: &[(&str, &str)]) -> Result {
    let mut batch = store.write();
    for (k, v) in pairs {
        batch.put(&put_req(k, v))?;
    }
    let next = store.applied_index() + 1;
    batch.commit(next).map(drop)
}

fn keys(resp: &RangeResponse) -> Vec<String> {
    resp.kvs
        .iter()
        .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
        .collect()
}

pub(crate) fn values(resp: &RangeResponse) -> Vec<String> {
    resp.kvs
        .iter()
        .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
        .collect()
}

fn get(store: &Store, key: &str) -> Result<Option<KeyValue>> {
    Ok(store.range(&range_req(key, ""))?.kvs.pop())
}

fn header_rev(resp: &Option<cairn_api::etcdserverpb::ResponseHeader>) -> i64 {
    resp.as_ref().map_or(-1, |h| h.revision)
}

fn txn_puts(batch: &mut WriteBatch<'_>, req: TxnRequest) -> Result<TxnResponse> {
    batch.txn(&req)
}

#[test]
fn new_store_starts_at_revision_one() -> Result {
    let (_dir, store) = open()?;
    assert_eq!(store.current_revision(), 1);
    assert_eq!(store.compact_revision(), 0);
    assert_eq!(store.applied_index(), 0);
    let resp = store.range(&range_req("a", ""))?;
    assert_eq!(header_rev(&resp.header), 1);
    assert_eq!(resp.count, 0);
    let mut batch = store.write();
    let put = batch.put(&put_req("a", "1"))?;
    assert_eq!(header_rev(&put.header), 2);
    assert_eq!(batch.current_revision(), 2);
    batch.commit(7)?;
    assert_eq!(store.current_revision(), 2);
    assert_eq!(store.applied_index(), 7);
    let kv = get(&store, "a")?;
    assert_eq!(
        kv,
        Some(KeyValue {
            key: b("a"),
            value: b("1"),
            create_revision: 2,
            mod_revision: 2,
            version: 1,
            lease: 0,
        })
    );
    Ok(())
}

#[test]
fn range_key_forms() -> Result {
    let (_dir, store) = open()?;
    put_all(
        &store,
        &[
            ("a", "1"),
            ("ab", "2"),
            ("abc", "3"),
            ("b", "4"),
            ("c", "5"),
        ],
    )?;
    assert_eq!(keys(&store.range(&range_req("ab", ""))?), ["ab"]);
    assert_eq!(keys(&store.range(&range_req("ab", "ac"))?), ["ab", "abc"]);
    assert_eq!(
        keys(&store.range(&range_req("ab", "\0"))?),
        ["ab", "abc", "b", "c"]
    );
    assert_eq!(keys(&store.range(&range_req("", "\0"))?).len(), 5);
    // An end at or before the key names nothing.
    let empty = store.range(&range_req("b", "a"))?;
    assert!(empty.kvs.is_empty() && empty.count == 0);
    assert!(store.range(&range_req("b", "b"))?.kvs.is_empty());
    assert!(store.range(&range_req("zz", ""))?.kvs.is_empty());
    Ok(())
}

#[test]
fn range_limit_more_and_count() -> Result {
    let (_dir, store) = open()?;
    put_all(&store, &[("a", "1"), ("b", "2"), ("c", "3"), ("d", "4")])?;
    let mut req = range_req("a", "\0");
    req.limit = 2;
    let resp = store.range(&req)?;
    assert_eq!(keys(&resp), ["a", "b"]);
    assert!(resp.more);
    assert_eq!(resp.count, 4);
    req.limit = 4;
    let resp = store.range(&req)?;
    assert_eq!(resp.kvs.len(), 4);
    assert!(!resp.more);
    req.limit = 0;
    assert_eq!(store.range(&req)?.kvs.len(), 4);
    req.limit = -3;
    assert_eq!(store.range(&req)?.kvs.len(), 4);
    Ok(())
}

#[test]
fn range_sort_every_target_and_order() -> Result {
    let (_dir, store) = open()?;
    // a: created 2, version 3, mod 7, value "z"
    // b: created 3, version 1, mod 3, value "x"
    // c: created 4, version 2, mod 6, value "y"
    put_all(
        &store,
        &[
            ("a", "z0"),
            ("b", "x"),
            ("c", "y0"),
            ("a", "z1"),
            ("c", "y"),
            ("a", "z"),
        ],
    )?;
    let sorted = |target: SortTarget, order: SortOrder| -> Result<Vec<String>> {
        let mut req = range_req("a", "\0");
        req.sort_target = target as i32;
        req.sort_order = order as i32;
        Ok(keys(&store.range(&req)?))
    };
    assert_eq!(sorted(SortTarget::Key, SortOrder::None)?, ["a", "b", "c"]);
    assert_eq!(sorted(SortTarget::Key, SortOrder::Ascend)?, ["a", "b", "c"]);
    assert_eq!(
        sorted(SortTarget::Key, SortOrder::Descend)?,
        ["c", "b", "a"]
    );
    assert_eq!(
        sorted(SortTarget::Version, SortOrder::Ascend)?,
        ["b", "c", "a"]
    );
    assert_eq!(
        sorted(SortTarget::Version, SortOrder::Descend)?,
        ["a", "c", "b"]
    );
    // Another target with no order sorts ascending.
    assert_eq!(
        sorted(SortTarget::Version, SortOrder::None)?,
        ["b", "c", "a"]
    );
    assert_eq!(
        sorted(SortTarget::Create, SortOrder::Ascend)?,
        ["a", "b", "c"]
    );
    assert_eq!(
        sorted(SortTarget::Create, SortOrder::Descend)?,
        ["c", "b", "a"]
    );
    assert_eq!(sorted(SortTarget::Mod, SortOrder::Ascend)?, ["b", "c", "a"]);
    assert_eq!(
        sorted(SortTarget::Mod, SortOrder::Descend)?,
        ["a", "c", "b"]
    );
    assert_eq!(
        sorted(SortTarget::Value, SortOrder::Ascend)?,
        ["b", "c", "a"]
    );
    assert_eq!(
        sorted(SortTarget::Value, SortOrder::Descend)?,
        ["a", "c", "b"]
    );

    // Sorting happens before the limit.
    let mut req = range_req("a", "\0");
    req.sort_target = SortTarget::Mod as i32;
    req.sort_order = SortOrder::Descend as i32;
    req.limit = 1;
    let resp = store.range(&req)?;
    assert_eq!(keys(&resp), ["a"]);
    assert!(resp.more);
    assert_eq!(resp.count, 3);
    Ok(())
}

#[test]
fn range_sort_target_without_order_sorts_only_the_page() -> Result {
    // etcd reads limit+1 keys in key order when no order is given, then
    // sorts that page by the target.
    let (_dir, store) = open()?;
    put_all(&store, &[("d", "1"), ("a", "1"), ("ab", "1")])?;
    let mut req = range_req("a", "\0");
    req.sort_target = SortTarget::Create as i32;
    req.limit = 1;
    let resp = store.range(&req)?;
    assert_eq!(keys(&resp), ["a"]);
    assert!(resp.more);
    req.sort_order = SortOrder::Ascend as i32;
    assert_eq!(keys(&store.range(&req)?), ["d"]);
    Ok(())
}

#[test]
fn range_sort_ties_keep_key_order() -> Result {
    let (_dir, store) = open()?;
    put_all(&store, &[("a", "same"), ("b", "same"), ("c", "other")])?;
    for order in [SortOrder::Ascend, SortOrder::Descend] {
        let mut req = range_req("a", "\0");
        req.sort_target = SortTarget::Version as i32;
        req.sort_order = order as i32;
        assert_eq!(keys(&store.range(&req)?), ["a", "b", "c"]);
    }
    Ok(())
}

#[test]
fn range_revision_filters() -> Result {
    let (_dir, store) = open()?;
    // a created 2 mod 5; b created 3 mod 3; c created 4 mod 4.
    put_all(&store, &[("a", "1"), ("b", "1"), ("c", "1"), ("a", "2")])?;
    let filtered = |f: &dyn Fn(&mut RangeRequest)| -> Result<RangeResponse> {
        let mut req = range_req("a", "\0");
        f(&mut req);
        store.range(&req)
    };
    let resp = filtered(&|r| r.max_mod_revision = 4)?;
    assert_eq!(keys(&resp), ["b", "c"]);
    // count is the range's size before filters.
    assert_eq!(resp.count, 3);
    assert_eq!(keys(&filtered(&|r| r.min_mod_revision = 4)?), ["a", "c"]);
    assert_eq!(keys(&filtered(&|r| r.max_create_revision = 3)?), ["a", "b"]);
    assert_eq!(keys(&filtered(&|r| r.min_create_revision = 3)?), ["b", "c"]);
    let resp = filtered(&|r| {
        r.min_create_revision = 3;
        r.limit = 1;
    })?;
    assert_eq!(keys(&resp), ["b"]);
    assert!(resp.more);
    Ok(())
}

#[test]
fn range_keys_only_and_count_only() -> Result {
    let (_dir, store) = open()?;
    put_all(&store, &[("a", "1"), ("b", "2")])?;
    let mut req = range_req("a", "\0");
    req.keys_only = true;
    let resp = store.range(&req)?;
    assert_eq!(keys(&resp), ["a", "b"]);
    assert!(
        resp.kvs
            .iter()
            .all(|kv| kv.value.is_empty() && kv.version == 1)
    );
    let mut req = range_req("a", "\0");
    req.count_only = true;
    req.limit = 1;
    let resp = store.range(&req)?;
    assert!(resp.kvs.is_empty());
    assert_eq!(resp.count, 2);
    assert!(!resp.more);
    Ok(())
}

#[test]
fn range_at_past_revisions_and_errors() -> Result {
    let (_dir, store) = open()?;
    put_all(&store, &[("a", "1"), ("a", "2"), ("b", "1")])?;
    {
        let mut batch = store.write();
        batch.delete_range(&del_req("a", "", false))?;
        batch.commit(2)?;
    }
    assert_eq!(store.current_revision(), 5);
    let at = |rev: i64| -> Result<RangeResponse> {
        let mut req = range_req("a", "\0");
        req.revision = rev;
        store.range(&req)
    };
    assert_eq!(values(&at(2)?), ["1"]);
    assert_eq!(values(&at(3)?), ["2"]);
    assert_eq!(keys(&at(4)?), ["a", "b"]);
    assert_eq!(keys(&at(5)?), ["b"]);
    assert_eq!(keys(&at(0)?), ["b"]);
    assert_eq!(keys(&at(-1)?), ["b"]);
    assert!(at(1)?.kvs.is_empty());
    // The header carries the current revision, not the one read.
    assert_eq!(header_rev(&at(2)?.header), 5);
    assert!(matches!(at(6), Err(MvccError::FutureRevision)));

    let mut batch = store.write();
    batch.compact(3)?;
    batch.commit(3)?;
    assert_eq!(store.compact_revision(), 3);
    assert!(matches!(at(2), Err(MvccError::Compacted)));
    // Reading at the compact revision itself is allowed.
    assert_eq!(values(&at(3)?), ["2"]);
    assert_eq!(keys(&at(4)?), ["a", "b"]);
    Ok(())
}

#[test]
fn put_revisions_versions_and_prev_kv() -> Result {
    let (_dir, store) = open()?;
    let mut batch = store.write();
    let first = batch.put(&PutRequest {
        key: b("k"),
        value: b("v1"),
        lease: 9,
        prev_kv: true,
        ..Default::default()
    })?;
    assert_eq!(first.prev_kv, None);
    let second = batch.put(&PutRequest {
        key: b("k"),
        value: b("v2"),
        prev_kv: true,
        ..Default::default()
    })?;
    assert_eq!(header_rev(&second.header), 3);
    let prev = second.prev_kv.ok_or(MvccError::KeyNotFound)?;
    assert_eq!((prev.value, prev.lease, prev.version), (b("v1"), 9, 1));
    // No prev_kv unless asked.
    assert_eq!(batch.put(&put_req("k", "v3"))?.prev_kv, None);
    batch.commit(1)?;
    let kv = get(&store, "k")?.ok_or(MvccError::KeyNotFound)?;
    assert_eq!(
        (kv.create_revision, kv.mod_revision, kv.version, kv.lease),
        (2, 4, 3, 0)
    );
    Ok(())
}

#[test]
fn put_ignore_value_and_lease() -> Result {
    let (_dir, store) = open()?;
    let mut batch = store.write();
    batch.put(&PutRequest {
        key: b("k"),
        value: b("v"),
        lease: 5,
        ..Default::default()
    })?;
    batch.put(&PutRequest {
        key: b("k"),
        lease: 6,
        ignore_value: true,
        ..Default::default()
    })?;
    let kv = batch
        .txn(&TxnRequest {
            success: vec![op(Request::RequestRange(range_req("k", "")))],
            ..Default::default()
        })?
        .responses
        .pop()
        .and_then(|r| match r.response {
            Some(Response::ResponseRange(mut rr)) => rr.kvs.pop(),
            _ => None,
        })
        .ok_or(MvccError::KeyNotFound)?;
    assert_eq!((kv.value, kv.lease, kv.version), (b("v"), 6, 2));
    batch.put(&PutRequest {
        key: b("k"),
        value: b("w"),
        ignore_lease: true,
        ..Default::default()
    })?;
    batch.commit(1)?;
    let kv = get(&store, "k")?.ok_or(MvccError::KeyNotFound)?;
    assert_eq!((kv.value, kv.lease, kv.version), (b("w"), 6, 3));
    Ok(())
}

#[test]
fn put_ignore_flags_on_missing_key_write_nothing() -> Result {
    let (_dir, store) = open()?;
    let mut batch = store.write();
    batch.put(&put_req("a", "1"))?;
    for req in [
        PutRequest {
            key: b("missing"),
            ignore_value: true,
            ..Default::default()
        },
        PutRequest {
            key: b("missing"),
            value: b("x"),
            ignore_lease: true,
            ..Default::default()
        },
    ] {
        assert!(matches!(batch.put(&req), Err(MvccError::KeyNotFound)));
    }
    // The failed requests took no revision; the batch goes on.
    assert_eq!(header_rev(&batch.put(&put_req("b", "1"))?.header), 3);
    batch.commit(1)?;
    assert_eq!(store.current_revision(), 3);
    assert_eq!(get(&store, "missing")?, None);
    Ok(())
}

#[test]
fn delete_range_tombstones_and_prev_kvs() -> Result {
    let (_dir, store) = open()?;
    put_all(&store, &[("a", "1"), ("b", "2"), ("c", "3")])?;
    let mut batch = store.write();
    let resp = batch.delete_range(&del_req("a", "c", true))?;
    assert_eq!(resp.deleted, 2);
    assert_eq!(header_rev(&resp.header), 5);
    assert_eq!(
        resp.prev_kvs
            .iter()
            .map(|kv| kv.value.clone())
            .collect::<Vec<_>>(),
        [b("1"), b("2")]
    );
    // Nothing matched: no revision, header at the current one.
    let none = batch.delete_range(&del_req("a", "c", true))?;
    assert_eq!((none.deleted, header_rev(&none.header)), (0, 5));
    let quiet = batch.delete_range(&del_req("c", "", false))?;
    assert_eq!((quiet.deleted, quiet.prev_kvs.len()), (1, 0));
    assert_eq!(header_rev(&quiet.header), 6);
    batch.put(&put_req("a", "again"))?;
    batch.commit(2)?;
    assert_eq!(store.current_revision(), 7);
    // A key put after its deletion starts a new life.
    let kv = get(&store, "a")?.ok_or(MvccError::KeyNotFound)?;
    assert_eq!((kv.create_revision, kv.version), (7, 1));
    assert_eq!(keys(&store.range(&range_req("a", "\0"))?), ["a"]);
    // Both tombstones of revision 5 are stored, at sub 0 and 1.
    let snapshot = store.inner.db.snapshot();
    for sub in 0..2 {
        let rev = crate::index::Rev {
            main: 5,
            sub,
            tombstone: true,
        };
        let value = fjall::Readable::get(
            &snapshot,
            &store.inner.state.read().revisions,
            crate::codec::rev_key(rev),
        )?;
        assert!(value.is_some());
    }
    Ok(())
}

#[test]
fn txn_compare_targets_and_results() -> Result {
    let (_dir, store) = open()?;
    // k: create 2, mod 3, version 2, lease 4, value "m"
    {
        let mut batch = store.write();
        batch.put(&put_req("k", "a"))?;
        batch.put(&PutRequest {
            key: b("k"),
            value: b("m"),
            lease: 4,
            ..Default::default()
        })?;
        batch.commit(1)?;
    }
    use CompareResult::{Equal, Greater, Less, NotEqual};
    use CompareTarget::{Create, Lease, Mod, Value, Version};
    let cases = [
        (cmp("k", Value, Equal, TargetUnion::Value(b("m"))), true),
        (cmp("k", Value, Greater, TargetUnion::Value(b("a"))), true),
        (cmp("k", Value, Less, TargetUnion::Value(b("a"))), false),
        (cmp("k", Value, NotEqual, TargetUnion::Value(b("m"))), false),
        (cmp("k", Version, Equal, TargetUnion::Version(2)), true),
        (cmp("k", Version, Less, TargetUnion::Version(3)), true),
        (
            cmp("k", Create, Equal, TargetUnion::CreateRevision(2)),
            true,
        ),
        (
            cmp("k", Create, Greater, TargetUnion::CreateRevision(2)),
            false,
        ),
        (cmp("k", Mod, Equal, TargetUnion::ModRevision(3)), true),
        (cmp("k", Mod, NotEqual, TargetUnion::ModRevision(3)), false),
        (cmp("k", Lease, Equal, TargetUnion::Lease(4)), true),
        (cmp("k", Lease, Greater, TargetUnion::Lease(3)), true),
        // A union of another kind than the target counts as zero.
        (cmp("k", Mod, Greater, TargetUnion::Version(100)), true),
        // A missing key: VALUE is always false, the rest compare with zero.
        (
            cmp("none", Value, NotEqual, TargetUnion::Value(b("x"))),
            false,
        ),
        (
            cmp("none", Value, Equal, TargetUnion::Value(Bytes::new())),
            false,
        ),
        (cmp("none", Version, Equal, TargetUnion::Version(0)), true),
        (
            cmp("none", Create, Equal, TargetUnion::CreateRevision(0)),
            true,
        ),
        (cmp("none", Mod, Less, TargetUnion::ModRevision(1)), true),
    ];
    let mut batch = store.write();
    for (compare, expected) in cases {
        let resp = batch.txn(&TxnRequest {
            compare: vec![compare.clone()],
            ..Default::default()
        })?;
        assert_eq!(resp.succeeded, expected, "{compare:?}");
        // A txn that writes nothing leaves the revision alone.
        assert_eq!(header_rev(&resp.header), 3);
    }
    // A missing union counts as empty / zero.
    let mut no_union = cmp("k", Version, Greater, TargetUnion::Version(0));
    no_union.target_union = None;
    assert!(
        batch
            .txn(&TxnRequest {
                compare: vec![no_union],
                ..Default::default()
            })?
            .succeeded
    );
    // Every compare must hold.
    let resp = batch.txn(&TxnRequest {
        compare: vec![
            cmp("k", Version, Equal, TargetUnion::Version(2)),
            cmp("k", Lease, Equal, TargetUnion::Lease(5)),
        ],
        ..Default::default()
    })?;
    assert!(!resp.succeeded);
    Ok(())
}

#[test]
fn txn_range_compare_applies_to_every_key() -> Result {
    let (_dir, store) = open()?;
    put_all(&store, &[("p/a", "1"), ("p/b", "1"), ("q", "2")])?;
    let mut batch = store.write();
    let mut all_one = cmp(
        "p/",
        CompareTarget::Value,
        CompareResult::Equal,
        TargetUnion::Value(b("1")),
    );
    all_one.range_end = b("p0");
    assert!(
        batch
            .txn(&TxnRequest {
                compare: vec![all_one.clone()],
                ..Default::default()
            })?
            .succeeded
    );
    all_one.range_end = b("\0");
    assert!(
        !batch
            .txn(&TxnRequest {
                compare: vec![all_one],
                ..Default::default()
            })?
            .succeeded
    );
    // An empty range compares against zero.
    let mut none = cmp(
        "x",
        CompareTarget::Create,
        CompareResult::Equal,
        TargetUnion::CreateRevision(0),
    );
    none.range_end = b("y");
    assert!(
        batch
            .txn(&TxnRequest {
                compare: vec![none],
                ..Default::default()
            })?
            .succeeded
    );
    Ok(())
}

#[test]
fn txn_writes_share_one_revision() -> Result {
    let (_dir, store) = open()?;
    put_all(&store, &[("old", "1")])?;
    let mut batch = store.write();
    let resp = txn_puts(
        &mut batch,
        TxnRequest {
            success: vec![
                op(Request::RequestRange(range_req("a", ""))),
                op(Request::RequestPut(put_req("a", "1"))),
                op(Request::RequestRange(range_req("a", ""))),
                op(Request::RequestPut(put_req("a", "2"))),
                op(Request::RequestDeleteRange(del_req("old", "", true))),
                op(Request::RequestPut(put_req("b", "1"))),
            ],
            ..Default::default()
        },
    )?;
    assert!(resp.succeeded);
    assert_eq!(header_rev(&resp.header), 3);
    let revs: Vec<i64> = resp
        .responses
        .iter()
        .map(|r| match &r.response {
            Some(Response::ResponseRange(x)) => header_rev(&x.header),
            Some(Response::ResponsePut(x)) => header_rev(&x.header),
            Some(Response::ResponseDeleteRange(x)) => header_rev(&x.header),
            _ => -1,
        })
        .collect();
    // Reads before the first write see the revision before the txn.
    assert_eq!(revs, [2, 3, 3, 3, 3, 3]);
    match &resp.responses[2].response {
        // The range sees the txn's earlier put.
        Some(Response::ResponseRange(r)) => assert_eq!(values(r), ["1"]),
        other => panic!("unexpected {other:?}"),
    }
    batch.commit(2)?;
    assert_eq!(store.current_revision(), 3);
    let a = get(&store, "a")?.ok_or(MvccError::KeyNotFound)?;
    // Two puts of one txn: version counts both, create is the txn's.
    assert_eq!(
        (a.value, a.create_revision, a.mod_revision, a.version),
        (b("2"), 3, 3, 2)
    );
    assert_eq!(get(&store, "old")?, None);
    // Subs 0..4 at main 3.
    let state = store.inner.state.read();
    let history = state
        .index
        .keys
        .get(&b"a"[..])
        .map(|k| k.history.live_at(3));
    assert_eq!(
        history,
        Some(Some(crate::index::Rev {
            main: 3,
            sub: 1,
            tombstone: false
        }))
    );
    Ok(())
}

#[test]
fn nested_txn_compares_see_the_state_before_the_txn() -> Result {
    let (_dir, store) = open()?;
    put_all(&store, &[("k", "1")])?;
    let nested = TxnRequest {
        compare: vec![cmp(
            "k",
            CompareTarget::Value,
            CompareResult::Equal,
            TargetUnion::Value(b("1")),
        )],
        success: vec![op(Request::RequestPut(put_req("seen", "old")))],
        failure: vec![op(Request::RequestPut(put_req("seen", "new")))],
    };
    let mut batch = store.write();
    let resp = batch.txn(&TxnRequest {
        success: vec![
            op(Request::RequestPut(put_req("k", "2"))),
            op(Request::RequestTxn(nested)),
            RequestOp { request: None },
        ],
        ..Default::default()
    })?;
    assert_eq!(header_rev(&resp.header), 3);
    match &resp.responses[1].response {
        Some(Response::ResponseTxn(inner)) => {
            assert!(inner.succeeded);
            // etcd leaves nested txn headers at revision 0.
            assert_eq!(header_rev(&inner.header), 0);
            match &inner.responses[0].response {
                Some(Response::ResponsePut(p)) => assert_eq!(header_rev(&p.header), 3),
                other => panic!("unexpected {other:?}"),
            }
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(resp.responses[2].response, None);
    batch.commit(2)?;
    let seen = get(&store, "seen")?.ok_or(MvccError::KeyNotFound)?;
    assert_eq!((seen.value, seen.mod_revision), (b("old"), 3));
    Ok(())
}

#[test]
fn failed_txn_writes_nothing() -> Result {
    let (_dir, store) = open()?;
    put_all(&store, &[("k", "1")])?;
    let mut batch = store.write();
    let ignore = |key: &str| PutRequest {
        key: b(key),
        ignore_value: true,
        ..Default::default()
    };
    let future = {
        let mut r = range_req("k", "");
        r.revision = 99;
        r
    };
    let cases = [
        // ignore_value on a key missing before the txn, even if the txn
        // creates it first (etcd checks against the state before the txn).
        (
            vec![
                op(Request::RequestPut(put_req("n", "1"))),
                op(Request::RequestPut(ignore("n"))),
            ],
            "key not found",
        ),
        // A key the txn deleted earlier.
        (
            vec![
                op(Request::RequestDeleteRange(del_req("k", "", false))),
                op(Request::RequestPut(ignore("k"))),
            ],
            "key not found",
        ),
        (
            vec![
                op(Request::RequestPut(put_req("x", "1"))),
                op(Request::RequestRange(future.clone())),
            ],
            "future",
        ),
        // A put error wins over a range error, whatever the order.
        (
            vec![
                op(Request::RequestRange(future)),
                op(Request::RequestPut(ignore("n"))),
            ],
            "key not found",
        ),
        // In a nested txn too.
        (
            vec![
                op(Request::RequestPut(put_req("x", "1"))),
                op(Request::RequestTxn(TxnRequest {
                    success: vec![op(Request::RequestPut(ignore("n")))],
                    ..Default::default()
                })),
            ],
            "key not found",
        ),
    ];
    for (success, expected) in cases {
        let err = batch
            .txn(&TxnRequest {
                success,
                ..Default::default()
            })
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains(expected), "{err} / {expected}");
    }
    let resp = batch.put(&put_req("after", "1"))?;
    assert_eq!(header_rev(&resp.header), 3);
    batch.commit(2)?;
    assert_eq!(get(&store, "n")?, None);
    assert_eq!(get(&store, "x")?, None);
    assert_eq!(get(&store, "k")?.map(|kv| kv.value), Some(b("1")));
    Ok(())
}

#[test]
fn txn_range_revision_checks() -> Result {
    let (_dir, store) = open()?;
    put_all(&store, &[("k", "1"), ("k", "2"), ("k", "3")])?;
    let mut batch = store.write();
    batch.compact(3)?;
    let at = |rev: i64| TxnRequest {
        success: vec![
            op(Request::RequestPut(put_req("w", "1"))),
            op(Request::RequestRange(RangeRequest {
                revision: rev,
                ..range_req("k", "")
            })),
        ],
        ..Default::default()
    };
    // The txn's own revision counts as future, as in etcd.
    assert!(matches!(batch.txn(&at(5)), Err(MvccError::FutureRevision)));
    assert!(matches!(batch.txn(&at(2)), Err(MvccError::Compacted)));
    let resp = batch.txn(&at(3))?;
    match &resp.responses[1].response {
        Some(Response::ResponseRange(r)) => {
            assert_eq!(values(r), ["2"]);
            assert_eq!(header_rev(&r.header), 5);
        }
        other => panic!("unexpected {other:?}"),
    }
    batch.commit(2)?;
    Ok(())
}

#[test]
fn batch_requests_see_each_other_but_readers_do_not() -> Result {
    let (_dir, store) = open()?;
    let mut batch = store.write();
    batch.put(&put_req("a", "1"))?;
    batch.put(&put_req("b", "1"))?;
    let resp = batch.delete_range(&del_req("a", "\0", true))?;
    assert_eq!(resp.deleted, 2);
    batch.put(&put_req("a", "2"))?;
    let resp = batch.txn(&TxnRequest {
        compare: vec![cmp(
            "a",
            CompareTarget::Create,
            CompareResult::Equal,
            TargetUnion::CreateRevision(5),
        )],
        success: vec![op(Request::RequestRange(RangeRequest {
            revision: 3,
            ..range_req("a", "\0")
        }))],
        ..Default::default()
    })?;
    assert!(resp.succeeded);
    match &resp.responses[0].response {
        Some(Response::ResponseRange(r)) => assert_eq!(keys(r), ["a", "b"]),
        other => panic!("unexpected {other:?}"),
    }
    // Nothing is visible before commit.
    assert_eq!(store.current_revision(), 1);
    assert!(store.range(&range_req("a", "\0"))?.kvs.is_empty());
    assert!(matches!(
        store.range(&RangeRequest {
            revision: 2,
            ..range_req("a", "")
        }),
        Err(MvccError::FutureRevision)
    ));
    batch.commit(1)?;
    assert_eq!(store.current_revision(), 5);
    assert_eq!(keys(&store.range(&range_req("a", "\0"))?), ["a"]);
    Ok(())
}

#[test]
fn dropped_batch_writes_nothing() -> Result {
    let (_dir, store) = open()?;
    {
        let mut batch = store.write();
        batch.put(&put_req("a", "1"))?;
    }
    assert_eq!(store.current_revision(), 1);
    put_all(&store, &[("b", "1")])?;
    assert_eq!(store.current_revision(), 2);
    assert_eq!(get(&store, "a")?, None);
    Ok(())
}

#[test]
fn compaction_keeps_the_newest_live_version() -> Result {
    let (_dir, store) = open()?;
    // a@2 a@3 b@4 del b@5 c@6 a@7
    put_all(&store, &[("a", "1"), ("a", "2"), ("b", "1")])?;
    {
        let mut batch = store.write();
        batch.delete_range(&del_req("b", "", false))?;
        batch.put(&put_req("c", "1"))?;
        batch.put(&put_req("a", "3"))?;
        batch.commit(2)?;
    }
    let stored = store.inner.state.read().revisions.len()?;
    assert_eq!(stored, 6);
    let in_use = store.size().in_use;
    let mut batch = store.write();
    assert!(matches!(batch.compact(8), Err(MvccError::FutureRevision)));
    let resp = batch.compact(6)?;
    // Compaction does not take a revision.
    assert_eq!(header_rev(&resp.header), 7);
    assert!(matches!(batch.compact(6), Err(MvccError::Compacted)));
    assert!(matches!(batch.compact(5), Err(MvccError::Compacted)));
    batch.commit(3)?;
    assert_eq!(store.current_revision(), 7);
    assert_eq!(store.compact_revision(), 6);
    // Left: a@3 (newest at 6), c@6, a@7.
    assert_eq!(store.inner.state.read().revisions.len()?, 3);
    assert!(store.size().in_use < in_use);
    let at6 = store.range(&RangeRequest {
        revision: 6,
        ..range_req("a", "\0")
    })?;
    assert_eq!(keys(&at6), ["a", "c"]);
    assert_eq!(values(&at6), ["2", "1"]);
    assert!(matches!(
        store.range(&RangeRequest {
            revision: 5,
            ..range_req("a", "\0")
        }),
        Err(MvccError::Compacted)
    ));
    assert_eq!(values(&store.range(&range_req("a", "\0"))?), ["3", "1"]);
    // A key whose newest revision is a tombstone leaves the index.
    assert!(!store.inner.state.read().index.keys.contains_key(&b"b"[..]));
    Ok(())
}

#[test]
fn compaction_in_a_batch_with_writes() -> Result {
    let (_dir, store) = open()?;
    let mut batch = store.write();
    batch.put(&put_req("a", "1"))?;
    batch.put(&put_req("a", "2"))?;
    batch.compact(3)?;
    batch.put(&put_req("a", "3"))?;
    let resp = batch.txn(&TxnRequest {
        success: vec![op(Request::RequestRange(RangeRequest {
            revision: 2,
            ..range_req("a", "")
        }))],
        ..Default::default()
    });
    assert!(matches!(resp, Err(MvccError::Compacted)));
    batch.commit(1)?;
    assert_eq!(store.inner.state.read().revisions.len()?, 2);
    assert_eq!(
        values(&store.range(&RangeRequest {
            revision: 3,
            ..range_req("a", "")
        })?),
        ["2"]
    );
    Ok(())
}

#[test]
fn compact_zero_on_a_new_store_is_allowed() -> Result {
    // etcd's compact revision starts below zero.
    let (_dir, store) = open()?;
    let mut batch = store.write();
    batch.compact(0)?;
    assert!(matches!(batch.compact(0), Err(MvccError::Compacted)));
    assert!(matches!(batch.compact(-1), Err(MvccError::Compacted)));
    batch.commit(1)?;
    assert_eq!(store.compact_revision(), 0);
    Ok(())
}

#[test]
fn reopen_rebuilds_the_index_and_continues() -> Result {
    let (dir, store) = open()?;
    put_all(&store, &[("a", "1"), ("b", "1"), ("a", "2")])?;
    {
        let mut batch = store.write();
        batch.delete_range(&del_req("b", "", false))?;
        batch.compact(3)?;
        batch.commit(9)?;
    }
    store.sync()?;
    drop(store);
    let store = Store::open(dir.path())?;
    assert_eq!(store.current_revision(), 5);
    assert_eq!(store.compact_revision(), 3);
    assert_eq!(store.applied_index(), 9);
    assert_eq!(
        values(&store.range(&RangeRequest {
            revision: 3,
            ..range_req("a", "\0")
        })?),
        ["1", "1"]
    );
    assert!(matches!(
        store.range(&RangeRequest {
            revision: 2,
            ..range_req("a", "")
        }),
        Err(MvccError::Compacted)
    ));
    let mut batch = store.write();
    assert_eq!(header_rev(&batch.put(&put_req("c", "1"))?.header), 6);
    batch.commit(10)?;
    let a = get(&store, "a")?.ok_or(MvccError::KeyNotFound)?;
    assert_eq!((a.create_revision, a.version, a.mod_revision), (2, 2, 4));
    // A put continues the generation the rebuilt index holds, though the
    // revision that created it is compacted away; a deleted key starts anew.
    put_all(&store, &[("a", "3"), ("b", "2")])?;
    let a = get(&store, "a")?.ok_or(MvccError::KeyNotFound)?;
    assert_eq!((a.create_revision, a.version, a.mod_revision), (2, 3, 7));
    let b = get(&store, "b")?.ok_or(MvccError::KeyNotFound)?;
    assert_eq!((b.create_revision, b.version, b.mod_revision), (8, 1, 8));
    Ok(())
}

#[test]
fn reopen_after_compacting_everything_keeps_the_revision() -> Result {
    let (dir, store) = open()?;
    put_all(&store, &[("a", "1")])?;
    {
        let mut batch = store.write();
        batch.delete_range(&del_req("a", "", false))?;
        batch.compact(3)?;
        batch.commit(2)?;
    }
    assert_eq!(store.inner.state.read().revisions.len()?, 0);
    drop(store);
    let store = Store::open(dir.path())?;
    assert_eq!(store.current_revision(), 3);
    let mut batch = store.write();
    assert_eq!(header_rev(&batch.put(&put_req("a", "2"))?.header), 4);
    batch.commit(3)?;
    Ok(())
}

#[test]
fn reopen_finishes_an_interrupted_compaction() -> Result {
    let (dir, store) = open()?;
    put_all(&store, &[("a", "1"), ("a", "2"), ("b", "1")])?;
    // As if a crash came after the compaction's commit but before its
    // revisions were deleted.
    store
        .inner
        .meta
        .insert(crate::codec::COMPACT_REVISION, 3i64.to_be_bytes())?;
    drop(store);
    let store = Store::open(dir.path())?;
    assert_eq!(store.compact_revision(), 3);
    assert_eq!(store.inner.state.read().revisions.len()?, 2);
    assert_eq!(values(&store.range(&range_req("a", "\0"))?), ["2", "1"]);
    Ok(())
}

#[test]
fn size_and_sync() -> Result {
    let (_dir, store) = open()?;
    put_all(&store, &[("a", "1"), ("b", "2")])?;
    store.sync()?;
    let size = store.size();
    assert!(size.total > 0);
    assert!(size.in_use > 0 && size.in_use <= size.total);
    Ok(())
}

/// Makes a writer and a racing reader overlap for sure: now and then the
/// writer waits until the reader has read the state it left, so the reader
/// sees states from the middle of the writes, not only before or after them.
struct Overlap {
    reads: std::sync::atomic::AtomicU64,
    done: std::sync::atomic::AtomicBool,
}

impl Overlap {
    fn new() -> std::sync::Arc<Overlap> {
        std::sync::Arc::new(Overlap {
            reads: 0.into(),
            done: false.into(),
        })
    }

    fn read_done(&self) {
        self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// Waits for two more reads: the second began after this call. A reader
    /// that stopped (its assertion failed) fails the writer too.
    fn wait_for_a_read(&self) {
        let seen = self.reads.load(std::sync::atomic::Ordering::SeqCst);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while self.reads.load(std::sync::atomic::Ordering::SeqCst) < seen + 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "the reader stopped reading"
            );
            std::thread::yield_now();
        }
    }

    fn finish(&self) {
        self.done.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn finished(&self) -> bool {
        self.done.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[test]
fn readers_never_see_half_a_batch() -> Result {
    let (_dir, store) = open()?;
    let overlap = Overlap::new();
    let reader = {
        let (store, overlap) = (store.clone(), overlap.clone());
        std::thread::spawn(move || -> Result<std::collections::BTreeSet<i64>> {
            let mut seen = std::collections::BTreeSet::new();
            while !overlap.finished() {
                let resp = store.range(&range_req("a", "\0"))?;
                let revision = header_rev(&resp.header);
                // Batch i puts a=i at revision 2i+2 and b=i at 2i+3: a whole
                // batch leaves an odd revision and both keys at its value.
                let vals = values(&resp);
                if revision == 1 {
                    assert!(vals.is_empty(), "{vals:?} at revision 1");
                } else {
                    assert_eq!(revision % 2, 1, "half a batch: revision {revision}");
                    let batch = ((revision - 3) / 2).to_string();
                    assert_eq!(vals, [batch.clone(), batch], "at revision {revision}");
                }
                assert!(resp.kvs.iter().all(|kv| kv.mod_revision <= revision));
                seen.insert(revision);
                overlap.read_done();
            }
            Ok(seen)
        })
    };
    for i in 0..100u64 {
        let value = i.to_string();
        let mut batch = store.write();
        batch.put(&put_req("a", &value))?;
        if i % 10 == 0 {
            // Reads while the batch is half written, and between batches.
            overlap.wait_for_a_read();
        }
        batch.put(&put_req("b", &value))?;
        batch.commit(i + 1)?;
    }
    overlap.finish();
    let seen = reader
        .join()
        .map_err(|_| MvccError::Corrupt("reader panicked".into()))??;
    // The reads overlapped the writes: they saw states between the first
    // and the last batch.
    let between = seen.iter().filter(|&&r| r > 1 && r < 201).count();
    assert!(between >= 9, "reads saw only {seen:?}");
    assert_eq!(store.current_revision(), 201);
    Ok(())
}

#[test]
fn readers_racing_compaction_see_data_or_compacted() -> Result {
    let (_dir, store) = open()?;
    let overlap = Overlap::new();
    let reader = {
        let (store, overlap) = (store.clone(), overlap.clone());
        std::thread::spawn(move || -> Result<(u32, u32)> {
            let (mut data, mut compacted) = (0, 0);
            while !overlap.finished() {
                let revision = (store.current_revision() - 2).max(1);
                let req = RangeRequest {
                    revision,
                    ..range_req("a", "\0")
                };
                // The index forgets a revision before storage deletes it, so
                // a reader gets its data or Compacted, never a missing one.
                match store.range(&req) {
                    Ok(resp) => {
                        // Batch i puts a=i at revision 2i+2 and b=i at 2i+3:
                        // at revision r, a holds the last batch with 2i+2 <= r
                        // and b the last with 2i+3 <= r.
                        let a = (revision >= 2).then(|| ((revision - 2) / 2).to_string());
                        let b = (revision >= 3).then(|| ((revision - 3) / 2).to_string());
                        let expected: Vec<String> = a.into_iter().chain(b).collect();
                        assert_eq!(values(&resp), expected, "at revision {revision}");
                        if revision > 1 {
                            data += 1;
                        }
                    }
                    Err(MvccError::Compacted) => compacted += 1,
                    Err(e) => return Err(e),
                }
                overlap.read_done();
            }
            Ok((data, compacted))
        })
    };
    for i in 0..150u64 {
        // After a compacting batch (i % 5 == 0) the reader's revision is
        // compacted; two batches later it is not.
        if i % 5 == 0 || i % 5 == 2 {
            overlap.wait_for_a_read();
        }
        let mut batch = store.write();
        batch.put(&put_req("a", &i.to_string()))?;
        batch.put(&put_req("b", &i.to_string()))?;
        if i % 5 == 4 {
            batch.compact(batch.current_revision() - 1)?;
        }
        batch.commit(i + 1)?;
    }
    overlap.finish();
    let (data, compacted) = reader
        .join()
        .map_err(|_| MvccError::Corrupt("reader panicked".into()))??;
    // The reads overlapped the compactions: some still found their data,
    // some were too old.
    assert!(
        data > 0 && compacted > 0,
        "{data} reads with data, {compacted} compacted"
    );
    Ok(())
}

#[test]
fn index_entries_stay_compact() {
    assert_eq!(std::mem::size_of::<crate::index::Rev>(), 16);
    assert!(std::mem::size_of::<crate::index::KeyHistory>() <= 24);
    // The generation a put continues and the lease: three more words per
    // key, which save every put a read of the previous value and a start
    // a read of every value. With the boxed key, a slot of the tree is
    // 64 bytes (docs/performance.md).
    assert!(std::mem::size_of::<crate::index::IndexedKey>() <= 48);
    assert!(
        std::mem::size_of::<Box<[u8]>>() + std::mem::size_of::<crate::index::IndexedKey>() <= 64
    );
    fn shared<T: Send + Sync + Clone>() {}
    shared::<Store>();
}

/// A shard's store: its writes take the revisions the sequencer gave, with
/// gaps for other shards' writes, and it reads as of the whole keyspace's
/// revision.
#[test]
fn a_shard_store_writes_at_given_revisions_and_reads_at_the_keyspace_revision() -> Result {
    let (dir, store) = open()?;
    let mut batch = store.write();
    batch.skip_to(5)?;
    let put = batch.put(&put_req("a", "1"))?;
    assert_eq!(header_rev(&put.header), 5);
    batch.skip_to(9)?;
    batch.put(&put_req("a", "2"))?;
    assert!(matches!(
        batch.skip_to(9),
        Err(MvccError::RevisionTaken {
            revision: 9,
            current: 9
        })
    ));
    batch.commit(3)?;

    let a = get(&store, "a")?.expect("a");
    assert_eq!((a.create_revision, a.mod_revision, a.version), (5, 9, 2));
    // Revision 7 is another shard's: this one's answer there is its state
    // after 5.
    let at = |rev: i64, current: i64| {
        store.range_at(
            &RangeRequest {
                revision: rev,
                ..range_req("a", "")
            },
            current,
        )
    };
    let seven = at(7, 12)?;
    assert_eq!(seven.kvs[0].value, b("1"));
    assert_eq!(header_rev(&seven.header), 12);
    assert_eq!(header_rev(&at(0, 12)?.header), 12);
    assert!(matches!(at(13, 12), Err(MvccError::FutureRevision)));
    assert!(matches!(
        store.range(&RangeRequest {
            revision: 10,
            ..range_req("a", "")
        }),
        Err(MvccError::FutureRevision)
    ));

    drop(store);
    let store = Store::open(dir.path())?;
    assert_eq!(store.current_revision(), 9);
    assert_eq!(get(&store, "a")?.expect("a").mod_revision, 9);
    Ok(())
}

/// Values alike take less disk than their bytes from the first table
/// flushed (the first levels are compressed too, not only the last).
#[test]
fn alike_values_are_compressed_in_the_first_tables() -> Result {
    let (_dir, store) = open()?;
    // One pseudo-random KiB (incompressible alone), put under 2,000 keys.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let value: Vec<u8> = (0..1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let mut batch = store.write();
    for i in 0..2000 {
        batch.put(&PutRequest {
            key: Bytes::from(format!("key-{i:05}")),
            value: Bytes::from(value.clone()),
            ..Default::default()
        })?;
    }
    batch.commit(1)?;
    let revisions = store.inner.state.read().revisions.clone();
    revisions.rotate_memtable_and_wait()?;
    let on_disk = revisions.disk_space();
    assert!(
        on_disk < store.stored_bytes() / 2,
        "{on_disk} bytes of tables for {} bytes of revisions",
        store.stored_bytes()
    );
    Ok(())
}
