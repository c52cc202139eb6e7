//! A real member driven by the `etcd-client` crate (Rust's etcd client).

mod common;

use common::Member;
use etcd_client::{
    Client, CompactionOptions, Compare, CompareOp, DeleteOptions, Error, GetOptions, PutOptions,
    SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse,
};

async fn connect(m: &Member) -> Client {
    Client::connect([m.endpoint()], None)
        .await
        .expect("connect")
}

/// gRPC codes by number: etcd-client's tonic is not the one Cairn uses.
const INVALID_ARGUMENT: i32 = 3;
const OUT_OF_RANGE: i32 = 11;

/// The gRPC code and message an etcd error came back as.
fn status_of<T: std::fmt::Debug>(result: Result<T, Error>) -> (i32, String) {
    match result {
        Err(Error::GRpcStatus(s)) => (s.code() as i32, s.message().to_string()),
        other => panic!("expected a gRPC error, got {other:?}"),
    }
}

#[tokio::test]
async fn kv_roundtrip_with_revisions() {
    let m = Member::start();
    let mut c = connect(&m).await;
    let put = c.put("a", "1", None).await.expect("put");
    let first = put.header().expect("header").revision();
    assert_eq!(first, 2, "a fresh store is at revision 1");
    let put = c
        .put("a", "2", Some(PutOptions::new().with_prev_key()))
        .await
        .expect("put");
    assert_eq!(put.prev_key().map(|kv| kv.value()), Some(&b"1"[..]));
    c.put("b", "3", None).await.expect("put");
    c.put("c", "4", None).await.expect("put");

    let got = c
        .get("a", Some(GetOptions::new().with_revision(first)))
        .await
        .expect("get");
    assert_eq!(got.kvs()[0].value(), b"1");
    let got = c.get("a", None).await.expect("get");
    let kv = &got.kvs()[0];
    assert_eq!(
        (kv.create_revision(), kv.mod_revision(), kv.version()),
        (2, 3, 2)
    );

    let all = c
        .get(
            "",
            Some(
                GetOptions::new()
                    .with_all_keys()
                    .with_limit(2)
                    .with_sort(SortTarget::Value, SortOrder::Descend),
            ),
        )
        .await
        .expect("get");
    assert_eq!(all.count(), 3);
    assert!(all.more());
    let values: Vec<&[u8]> = all.kvs().iter().map(|kv| kv.value()).collect();
    assert_eq!(values, vec![&b"4"[..], b"3"]);

    let deleted = c
        .delete(
            "a",
            Some(DeleteOptions::new().with_range("c").with_prev_key()),
        )
        .await
        .expect("del");
    assert_eq!(deleted.deleted(), 2);
    assert_eq!(deleted.prev_kvs().len(), 2);
    let after = c
        .get(
            "",
            Some(GetOptions::new().with_all_keys().with_count_only()),
        )
        .await
        .expect("count");
    assert_eq!(after.count(), 1);
}

#[tokio::test]
async fn txn_compares_and_one_revision() {
    let m = Member::start();
    let mut c = connect(&m).await;
    c.put("x", "0", None).await.expect("put");
    let txn = Txn::new()
        .when([
            Compare::value("x", CompareOp::Equal, "0"),
            Compare::version("x", CompareOp::Greater, 0),
        ])
        .and_then([
            TxnOp::put("x", "1", None),
            TxnOp::put("y", "1", None),
            TxnOp::get("x", None),
        ])
        .or_else([TxnOp::put("z", "1", None)]);
    let resp = c.txn(txn).await.expect("txn");
    assert!(resp.succeeded());
    let rev = resp.header().expect("header").revision();
    let x = c.get("x", None).await.expect("get");
    let y = c.get("y", None).await.expect("get");
    assert_eq!(x.kvs()[0].mod_revision(), rev);
    assert_eq!(
        y.kvs()[0].mod_revision(),
        rev,
        "one revision for the whole txn"
    );
    match &resp.op_responses()[2] {
        TxnOpResponse::Get(g) => {
            assert_eq!(g.kvs()[0].value(), b"1", "reads see the txn's own writes")
        }
        other => panic!("unexpected {other:?}"),
    }
    let failed = c
        .txn(
            Txn::new()
                .when([Compare::mod_revision("x", CompareOp::Less, rev)])
                .or_else([TxnOp::get("z", None)]),
        )
        .await
        .expect("txn");
    assert!(!failed.succeeded());
}

#[tokio::test]
async fn etcd_errors_with_exact_messages() {
    let m = Member::start();
    let mut c = connect(&m).await;
    assert_eq!(
        status_of(c.put("", "v", None).await),
        (INVALID_ARGUMENT, "etcdserver: key is not provided".into())
    );
    let many: Vec<TxnOp> = (0..129)
        .map(|i| TxnOp::put(format!("k{i}"), "v", None))
        .collect();
    assert_eq!(
        status_of(c.txn(Txn::new().and_then(many)).await),
        (
            INVALID_ARGUMENT,
            "etcdserver: too many operations in txn request".into()
        )
    );
    assert_eq!(
        status_of(
            c.txn(Txn::new().and_then([TxnOp::put("d", "1", None), TxnOp::put("d", "2", None)]))
                .await
        ),
        (
            INVALID_ARGUMENT,
            "etcdserver: duplicate key given in txn request".into()
        )
    );
    let big = vec![b'x'; 1024 * 1024 + 600 * 1024];
    assert_eq!(
        status_of(c.put("big", big, None).await),
        (INVALID_ARGUMENT, "etcdserver: request is too large".into())
    );
    assert_eq!(
        status_of(
            c.put("missing", "", Some(PutOptions::new().with_ignore_value()))
                .await
        ),
        (INVALID_ARGUMENT, "etcdserver: key not found".into())
    );
    c.put("k", "v1", None).await.expect("put");
    let rev = c
        .put("k", "v2", None)
        .await
        .expect("put")
        .header()
        .expect("header")
        .revision();
    assert_eq!(
        status_of(
            c.get("k", Some(GetOptions::new().with_revision(rev + 1)))
                .await
        ),
        (
            OUT_OF_RANGE,
            "etcdserver: mvcc: required revision is a future revision".into()
        )
    );
    c.compact(rev, Some(CompactionOptions::new().with_physical()))
        .await
        .expect("compact");
    assert_eq!(
        status_of(
            c.get("k", Some(GetOptions::new().with_revision(rev - 1)))
                .await
        ),
        (
            OUT_OF_RANGE,
            "etcdserver: mvcc: required revision has been compacted".into()
        )
    );
    assert_eq!(
        status_of(c.compact(rev, None).await),
        (
            OUT_OF_RANGE,
            "etcdserver: mvcc: required revision has been compacted".into()
        )
    );
    // Nothing refused was written: only the two puts of "k" bumped the revision.
    let now = c
        .get("k", None)
        .await
        .expect("get")
        .header()
        .expect("header")
        .revision();
    assert_eq!(now, rev);
}
