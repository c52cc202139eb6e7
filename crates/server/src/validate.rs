//! etcd's checks of a request before it is proposed: a refused request never
//! reaches the log.

use cairn_api::error::{self, EtcdError};
use cairn_api::etcdserverpb::request_op::Request;
use cairn_api::etcdserverpb::{
    DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use std::collections::HashSet;

pub fn check_range(r: &RangeRequest) -> Result<(), EtcdError> {
    if r.key.is_empty() {
        return Err(error::EMPTY_KEY);
    }
    Ok(())
}

pub fn check_put(r: &PutRequest) -> Result<(), EtcdError> {
    if r.key.is_empty() {
        return Err(error::EMPTY_KEY);
    }
    if r.ignore_value && !r.value.is_empty() {
        return Err(error::VALUE_PROVIDED);
    }
    if r.ignore_lease && r.lease != 0 {
        return Err(error::LEASE_PROVIDED);
    }
    Ok(())
}

pub fn check_delete(r: &DeleteRangeRequest) -> Result<(), EtcdError> {
    if r.key.is_empty() {
        return Err(error::EMPTY_KEY);
    }
    Ok(())
}

/// The whole txn: operation counts, every op, and no key written twice.
pub fn check_txn(r: &TxnRequest, max_txn_ops: usize) -> Result<(), EtcdError> {
    check_txn_ops(r, max_txn_ops)?;
    // Overlaps are checked after the cheap checks, as etcd does, so a huge
    // request is refused before any quadratic work.
    check_intervals(&r.success)?;
    check_intervals(&r.failure)?;
    Ok(())
}

fn check_txn_ops(r: &TxnRequest, max_txn_ops: usize) -> Result<(), EtcdError> {
    let ops = r.compare.len().max(r.success.len()).max(r.failure.len());
    if ops > max_txn_ops {
        return Err(error::TOO_MANY_OPS);
    }
    if r.compare.iter().any(|c| c.key.is_empty()) {
        return Err(error::EMPTY_KEY);
    }
    for op in r.success.iter().chain(&r.failure) {
        check_op(op, max_txn_ops - ops)?;
    }
    Ok(())
}

fn check_op(op: &RequestOp, max_txn_ops: usize) -> Result<(), EtcdError> {
    match &op.request {
        Some(Request::RequestRange(r)) => check_range(r),
        Some(Request::RequestPut(r)) => check_put(r),
        Some(Request::RequestDeleteRange(r)) => check_delete(r),
        Some(Request::RequestTxn(r)) => check_txn_ops(r, max_txn_ops),
        None => Ok(()),
    }
}

/// A deleted range [start, end); `end` empty means a single key.
struct Deleted {
    start: Vec<u8>,
    end: Vec<u8>,
}

impl Deleted {
    fn contains(&self, key: &[u8]) -> bool {
        if self.end.is_empty() {
            return self.start == key;
        }
        self.start.as_slice() <= key && key < self.end.as_slice()
    }
}

fn deleted_contains(dels: &[Deleted], key: &[u8]) -> bool {
    dels.iter().any(|d| d.contains(key))
}

/// etcd's rule: within one branch (nested txns included) a key may not be
/// put twice, nor put and deleted; the two branches of a nested txn are
/// exclusive, so they may put the same key.
fn check_intervals(ops: &[RequestOp]) -> Result<(HashSet<Vec<u8>>, Vec<Deleted>), EtcdError> {
    let mut dels: Vec<Deleted> = ops
        .iter()
        .filter_map(|op| match &op.request {
            Some(Request::RequestDeleteRange(d)) => Some(Deleted {
                start: d.key.to_vec(),
                end: d.range_end.to_vec(),
            }),
            _ => None,
        })
        .collect();
    let mut puts: HashSet<Vec<u8>> = HashSet::new();
    for op in ops {
        let Some(Request::RequestTxn(txn)) = &op.request else {
            continue;
        };
        let (puts_then, dels_then) = check_intervals(&txn.success)?;
        let (puts_else, dels_else) = check_intervals(&txn.failure)?;
        for key in &puts_then {
            if puts.contains(key) || deleted_contains(&dels, key) {
                return Err(error::DUPLICATE_KEY);
            }
            puts.insert(key.clone());
        }
        for key in puts_else {
            if (puts.contains(&key) && !puts_then.contains(&key)) || deleted_contains(&dels, &key) {
                return Err(error::DUPLICATE_KEY);
            }
            puts.insert(key);
        }
        dels.extend(dels_then);
        dels.extend(dels_else);
    }
    for op in ops {
        let Some(Request::RequestPut(put)) = &op.request else {
            continue;
        };
        let key = put.key.to_vec();
        if puts.contains(&key) || deleted_contains(&dels, &key) {
            return Err(error::DUPLICATE_KEY);
        }
        puts.insert(key);
    }
    Ok((puts, dels))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn put(k: &str) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestPut(PutRequest {
                key: Bytes::from(k.to_string()),
                ..Default::default()
            })),
        }
    }
    fn del(k: &str, end: &str) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
                key: Bytes::from(k.to_string()),
                range_end: Bytes::from(end.to_string()),
                ..Default::default()
            })),
        }
    }
    fn txn(success: Vec<RequestOp>, failure: Vec<RequestOp>) -> TxnRequest {
        TxnRequest {
            compare: vec![],
            success,
            failure,
        }
    }

    #[test]
    fn duplicate_puts_and_put_over_delete_are_refused() {
        assert_eq!(
            check_txn(&txn(vec![put("a"), put("a")], vec![]), 128),
            Err(error::DUPLICATE_KEY)
        );
        assert_eq!(
            check_txn(&txn(vec![put("b"), del("a", "c")], vec![]), 128),
            Err(error::DUPLICATE_KEY)
        );
        assert_eq!(
            check_txn(&txn(vec![put("c"), del("a", "c")], vec![]), 128),
            Ok(())
        );
        assert_eq!(
            check_txn(&txn(vec![put("a")], vec![put("a")]), 128),
            Ok(()),
            "branches are exclusive"
        );
    }

    #[test]
    fn nested_branches_may_share_keys_but_not_with_the_parent() {
        let nested = |s, f| RequestOp {
            request: Some(Request::RequestTxn(txn(s, f))),
        };
        assert_eq!(
            check_txn(
                &txn(vec![nested(vec![put("a")], vec![put("a")])], vec![]),
                128
            ),
            Ok(())
        );
        assert_eq!(
            check_txn(
                &txn(vec![nested(vec![put("a")], vec![]), put("a")], vec![]),
                128
            ),
            Err(error::DUPLICATE_KEY)
        );
    }

    #[test]
    fn op_limits_and_empty_keys() {
        let many: Vec<RequestOp> = (0..129).map(|i| put(&format!("k{i}"))).collect();
        assert_eq!(check_txn(&txn(many, vec![]), 128), Err(error::TOO_MANY_OPS));
        assert_eq!(
            check_txn(&txn(vec![put("")], vec![]), 128),
            Err(error::EMPTY_KEY)
        );
        let p = PutRequest {
            key: Bytes::from_static(b"k"),
            value: Bytes::from_static(b"v"),
            ignore_value: true,
            ..Default::default()
        };
        assert_eq!(check_put(&p), Err(error::VALUE_PROVIDED));
    }
}
