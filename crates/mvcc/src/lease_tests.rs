//! The leases keyspace and the lease checks of puts.

use cairn_api::etcdserverpb::request_op::Request;
use cairn_api::etcdserverpb::{PutRequest, TxnRequest};

use crate::MvccError;
use crate::Store;
use crate::tests::{Result, b, op, open, put_req};

fn leased(key: &str, lease: i64) -> PutRequest {
    PutRequest {
        lease,
        ..put_req(key, "v")
    }
}

#[test]
fn leases_commit_with_the_batch_and_survive_reopen() -> Result {
    let (dir, store) = open()?;
    let mut batch = store.write();
    batch.put_lease(7, b"seven".to_vec());
    batch.put_lease(9, b"nine".to_vec());
    batch.put(&leased("a", 7))?;
    batch.put(&put_req("b", "v"))?;
    batch.commit(1)?;
    let mut batch = store.write();
    batch.delete_lease(9);
    batch.commit(2)?;
    drop(store);
    let store = Store::open(dir.path())?;
    assert_eq!(store.leases()?, vec![(7, b"seven".to_vec())]);
    assert_eq!(store.leased_keys()?, vec![(b("a"), 7)]);
    Ok(())
}

#[test]
fn puts_with_a_missing_lease_write_nothing() -> Result {
    let (_dir, store) = open()?;
    let mut batch = store.write();
    let only_7 = |id| id == 7;
    assert!(matches!(
        batch.put_checked(&leased("a", 8), &only_7),
        Err(MvccError::LeaseNotFound)
    ));
    batch.put_checked(&leased("a", 7), &only_7)?;
    let txn = TxnRequest {
        compare: vec![],
        success: vec![
            op(Request::RequestPut(put_req("b", "v"))),
            op(Request::RequestPut(leased("c", 8))),
        ],
        failure: vec![op(Request::RequestPut(leased("d", 9)))],
    };
    assert!(matches!(
        batch.txn_checked(&txn, &only_7),
        Err(MvccError::LeaseNotFound)
    ));
    assert_eq!(batch.current_revision(), 2, "only the first put wrote");
    Ok(())
}

#[test]
fn snapshots_carry_leases() -> Result {
    let (_dir, source) = open()?;
    let mut batch = source.write();
    batch.put_lease(3, b"three".to_vec());
    batch.commit(5)?;
    let mut bytes = Vec::new();
    source.write_snapshot(&mut bytes)?;
    let (_dir2, target) = open()?;
    let mut batch = target.write();
    batch.put_lease(4, b"four".to_vec());
    batch.commit(1)?;
    target.restore_snapshot(&mut &bytes[..])?;
    assert_eq!(target.leases()?, vec![(3, b"three".to_vec())]);
    Ok(())
}

#[test]
fn lease_changes_name_the_keys_whose_lease_the_batch_changed() -> Result {
    let (_dir, store) = open()?;
    let mut batch = store.write();
    batch.put(&leased("a", 7))?;
    batch.put(&leased("b", 7))?;
    batch.put(&put_req("c", "v"))?;
    batch.commit(1)?;
    let mut batch = store.write();
    // Same lease: no change; another lease, none, deleted: changes.
    batch.put(&leased("a", 7))?;
    batch.put(&leased("c", 9))?;
    batch.put(&put_req("b", "w"))?;
    batch.put(&leased("d", 7))?;
    batch.delete_range(&cairn_api::etcdserverpb::DeleteRangeRequest {
        key: b("d"),
        ..Default::default()
    })?;
    batch.put(&leased("e", 7))?;
    batch.delete_range(&cairn_api::etcdserverpb::DeleteRangeRequest {
        key: b("a"),
        ..Default::default()
    })?;
    assert_eq!(
        batch.lease_changes(),
        vec![(b("a"), 0), (b("b"), 0), (b("c"), 9), (b("e"), 7)]
    );
    Ok(())
}
