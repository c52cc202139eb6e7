//! etcd's rules for shaping a Range response (filters, sort, limit) and for
//! evaluating a txn compare, independent of where the key-values come from.

use std::cmp::Ordering;

use bytes::Bytes;
use cairn_api::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use cairn_api::etcdserverpb::range_request::{SortOrder, SortTarget};
use cairn_api::etcdserverpb::{Compare, RangeRequest, RangeResponse, ResponseHeader};
use cairn_api::mvccpb::KeyValue;

use crate::MvccError;

pub(crate) fn header(revision: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader {
        revision,
        ..Default::default()
    })
}

/// The revision a read of `requested` runs at: 0 or less is `current`.
/// Reading at the compact revision itself is allowed, as in etcd.
pub(crate) fn read_revision(requested: i64, current: i64, compact: i64) -> Result<i64, MvccError> {
    if requested > current {
        return Err(MvccError::FutureRevision);
    }
    let rev = if requested <= 0 { current } else { requested };
    if rev < compact {
        return Err(MvccError::Compacted);
    }
    Ok(rev)
}

/// Sorting or filtering needs every key-value of the range before the limit
/// applies.
fn fetch_all(req: &RangeRequest) -> bool {
    req.sort_order != SortOrder::None as i32
        || req.min_mod_revision != 0
        || req.max_mod_revision != 0
        || req.min_create_revision != 0
        || req.max_create_revision != 0
}

/// How many of the range's key-values to load: all when sorting or
/// filtering, else one past the limit so `more` can be told.
pub(crate) fn fetch_limit(req: &RangeRequest) -> usize {
    if req.count_only {
        return 0;
    }
    if fetch_all(req) || req.limit <= 0 {
        return usize::MAX;
    }
    usize::try_from(req.limit).map_or(usize::MAX, |l| l.saturating_add(1))
}

/// Builds the response from the range's key count (at the read revision,
/// before filters and limit) and the key-values loaded per `fetch_limit`.
pub(crate) fn shape(
    req: &RangeRequest,
    count: usize,
    mut kvs: Vec<KeyValue>,
    header_revision: i64,
) -> RangeResponse {
    if req.max_mod_revision != 0 {
        kvs.retain(|kv| kv.mod_revision <= req.max_mod_revision);
    }
    if req.min_mod_revision != 0 {
        kvs.retain(|kv| kv.mod_revision >= req.min_mod_revision);
    }
    if req.max_create_revision != 0 {
        kvs.retain(|kv| kv.create_revision <= req.max_create_revision);
    }
    if req.min_create_revision != 0 {
        kvs.retain(|kv| kv.create_revision >= req.min_create_revision);
    }
    sort(req, &mut kvs);
    let mut more = false;
    // A negative limit means none, like zero.
    let limit = usize::try_from(req.limit).unwrap_or(0);
    if limit > 0 && kvs.len() > limit {
        kvs.truncate(limit);
        more = true;
    }
    if req.keys_only {
        for kv in &mut kvs {
            kv.value = Bytes::new();
        }
    }
    RangeResponse {
        header: header(header_revision),
        kvs,
        more,
        count: i64::try_from(count).unwrap_or(i64::MAX),
    }
}

/// Orders key-values in key order as the index yields them, as a Range
/// asks: by its sort target and order, ties in key order. Public for
/// merging the answers of several stores (shards).
pub fn sort(req: &RangeRequest, kvs: &mut [KeyValue]) {
    // The index yields key order already; any other target with no order
    // given sorts ascending, as etcd does.
    let order =
        if req.sort_target != SortTarget::Key as i32 && req.sort_order == SortOrder::None as i32 {
            SortOrder::Ascend
        } else {
            match SortOrder::try_from(req.sort_order) {
                Ok(order) => order,
                Err(_) => return,
            }
        };
    let key: fn(&KeyValue, &KeyValue) -> Ordering = match SortTarget::try_from(req.sort_target) {
        Ok(SortTarget::Key) => |a, b| a.key.cmp(&b.key),
        Ok(SortTarget::Version) => |a, b| a.version.cmp(&b.version),
        Ok(SortTarget::Create) => |a, b| a.create_revision.cmp(&b.create_revision),
        Ok(SortTarget::Mod) => |a, b| a.mod_revision.cmp(&b.mod_revision),
        Ok(SortTarget::Value) => |a, b| a.value.cmp(&b.value),
        Err(_) => return,
    };
    // Stable, so ties stay in key order either way.
    match order {
        SortOrder::None => {}
        SortOrder::Ascend => kvs.sort_by(key),
        SortOrder::Descend => kvs.sort_by(|a, b| key(b, a)),
    }
}

/// Whether a compare holds over the key-values its range names (every one
/// must satisfy it). With no key, a VALUE compare fails and the others
/// compare against zero.
pub(crate) fn compare(c: &Compare, kvs: &[KeyValue]) -> bool {
    if kvs.is_empty() {
        return c.target != CompareTarget::Value as i32 && compare_kv(c, &KeyValue::default());
    }
    kvs.iter().all(|kv| compare_kv(c, kv))
}

fn compare_kv(c: &Compare, kv: &KeyValue) -> bool {
    // A target union of another kind than the target counts as zero (or
    // empty), as etcd reads it.
    let number = |field: i64, pick: fn(&TargetUnion) -> Option<i64>| {
        field.cmp(&c.target_union.as_ref().and_then(pick).unwrap_or(0))
    };
    let ordering = match CompareTarget::try_from(c.target) {
        Ok(CompareTarget::Value) => {
            let target: &[u8] = match &c.target_union {
                Some(TargetUnion::Value(v)) => v,
                _ => &[],
            };
            kv.value[..].cmp(target)
        }
        Ok(CompareTarget::Version) => number(kv.version, |t| match t {
            TargetUnion::Version(v) => Some(*v),
            _ => None,
        }),
        Ok(CompareTarget::Create) => number(kv.create_revision, |t| match t {
            TargetUnion::CreateRevision(v) => Some(*v),
            _ => None,
        }),
        Ok(CompareTarget::Mod) => number(kv.mod_revision, |t| match t {
            TargetUnion::ModRevision(v) => Some(*v),
            _ => None,
        }),
        Ok(CompareTarget::Lease) => number(kv.lease, |t| match t {
            TargetUnion::Lease(v) => Some(*v),
            _ => None,
        }),
        Err(_) => Ordering::Equal,
    };
    match CompareResult::try_from(c.result) {
        Ok(CompareResult::Equal) => ordering == Ordering::Equal,
        Ok(CompareResult::NotEqual) => ordering != Ordering::Equal,
        Ok(CompareResult::Greater) => ordering == Ordering::Greater,
        Ok(CompareResult::Less) => ordering == Ordering::Less,
        Err(_) => true,
    }
}
