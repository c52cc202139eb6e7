//! Writes: set, create, update and compare-and-swap (`PUT`), in-order
//! keys (`POST`) and (compare-and-)delete. Each reads the nodes it depends
//! on, then commits a txn that compares their revisions, and tries again if
//! another write came between.

use bytes::Bytes;
use cairn_api::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use cairn_api::etcdserverpb::lease_client::LeaseClient;
use cairn_api::etcdserverpb::request_op::Request as Op;
use cairn_api::etcdserverpb::response_op::Response as OpResponse;
use cairn_api::etcdserverpb::{
    Compare, DeleteRangeRequest, LeaseGrantRequest, LeaseRevokeRequest, PutRequest, RangeRequest,
    RequestOp, TxnRequest, TxnResponse,
};
use http::{Response, StatusCode};

use super::Keys;
use super::error::{V2Error, internal, v2_response};
use super::node::{
    Action, Event, Node, Record, Stored, ancestors, event_json, now_ms, prefix_end, v3_key,
};
use super::params::Params;
use crate::Body;

/// Attempts at a write whose nodes keep changing under it.
const WRITE_ATTEMPTS: usize = 16;

impl Keys {
    pub(super) async fn put(&self, path: &str, params: &Params) -> Result<Response<Body>, V2Error> {
        if path == "/" {
            return Err(V2Error::new(107, "/", 0));
        }
        let dir = params.flag("dir");
        let value = params.get("value").unwrap_or("").to_string();
        let ttl = parse_ttl(params)?;
        // etcd's checks, in its order: a refresh keeps the value and only
        // renews the TTL.
        let refresh = match params.get("refresh") {
            None | Some("" | "false") => false,
            Some("true") => true,
            Some(_) => return Err(V2Error::new(209, "invalid value for refresh", 0)),
        };
        if refresh && !value.is_empty() {
            return Err(V2Error::new(211, "A value was provided on a refresh", 0));
        }
        if refresh && ttl.is_none() {
            return Err(V2Error::new(212, "No TTL value set", 0));
        }
        let prev_exist = match params.get("prevExist") {
            None | Some("") => None,
            Some("true") => Some(true),
            Some("false") => Some(false),
            Some(_) => return Err(V2Error::new(209, "prevExist", 0)),
        };
        let prev_value = params.get("prevValue").filter(|v| !v.is_empty());
        let prev_index = match params.get("prevIndex").filter(|v| !v.is_empty()) {
            Some(index) => Some(
                index
                    .parse::<i64>()
                    .map_err(|_| V2Error::new(203, "CompareAndSwap", 0))?,
            ),
            None => None,
        };
        if params.get("prevValue") == Some("") {
            return Err(V2Error::new(201, "CompareAndSwap", 0));
        }
        let write = Write {
            path: path.to_string(),
            dir,
            value,
            ttl,
            prev_exist,
            prev_value: prev_value.map(str::to_string),
            prev_index,
            refresh,
        };
        self.write(write).await
    }

    /// An in-order key in directory `path`, named after the index it is
    /// created at.
    pub(super) async fn post(
        &self,
        path: &str,
        params: &Params,
    ) -> Result<Response<Body>, V2Error> {
        let value = params.get("value").unwrap_or("").to_string();
        let ttl = parse_ttl(params)?;
        for _ in 0..WRITE_ATTEMPTS {
            let revision = self.current_revision().await?;
            let write = Write {
                path: format!("{}/{:020}", path.trim_end_matches('/'), revision + 1),
                dir: params.flag("dir"),
                value: value.clone(),
                ttl,
                prev_exist: Some(false),
                prev_value: None,
                prev_index: None,
                refresh: false,
            };
            match self.write(write).await {
                // Another write took the name: take the next revision's.
                Err(e) if e.code == 105 => continue,
                other => return other,
            }
        }
        Err(V2Error::new(300, "too many concurrent writes", 0))
    }

    /// A set, create, update or compare-and-swap.
    pub(super) async fn write(&self, write: Write) -> Result<Response<Body>, V2Error> {
        let parents = ancestors(&write.path);
        for _ in 0..WRITE_ATTEMPTS {
            // The node and its parents, at one revision.
            let mut ops = vec![range_op(v3_key(&write.path), Vec::new())];
            ops.extend(parents.iter().map(|p| range_op(v3_key(p), Vec::new())));
            let reply = self
                .kv()
                .txn(TxnRequest {
                    compare: Vec::new(),
                    success: ops,
                    failure: Vec::new(),
                })
                .await
                .map_err(internal)?
                .into_inner();
            let revision = reply.header.as_ref().map_or(0, |h| h.revision);
            let found: Vec<Option<Stored>> = reply
                .responses
                .iter()
                .map(|r| match &r.response {
                    Some(OpResponse::ResponseRange(range)) => {
                        range.kvs.first().and_then(Stored::from_kv)
                    }
                    _ => None,
                })
                .collect();
            let current = found.first().cloned().flatten();
            let mut compare = Vec::new();
            let mut success = Vec::new();
            for (parent, stored) in parents.iter().zip(found.iter().skip(1)) {
                match stored {
                    Some(s) if !s.record.dir => return Err(V2Error::new(104, parent, revision)),
                    Some(s) => compare.push(mod_revision_is(v3_key(parent), s.mod_revision)),
                    None => {
                        compare.push(mod_revision_is(v3_key(parent), 0));
                        success.push(put_op(
                            v3_key(parent),
                            Record {
                                dir: true,
                                action: Action::Implicit,
                                expires_ms: None,
                                created: None,
                                value: Vec::new(),
                            },
                            0,
                        ));
                    }
                }
            }
            let action = check_write(&write, current.as_ref(), revision)?;
            // A refresh renews what is there: it needs a node, keeps its
            // value, and is not an event for watchers.
            let (dir, value, stored_action) = match (&current, write.refresh) {
                (None, true) => return Err(V2Error::new(100, &write.path, revision)),
                (Some(c), true) => (c.record.dir, c.record.value.clone(), Action::Refresh),
                (_, false) => (write.dir, write.value.clone().into_bytes(), action),
            };
            compare.push(mod_revision_is(
                v3_key(&write.path),
                current.as_ref().map_or(0, |c| c.mod_revision),
            ));
            let lease = match write.ttl {
                Some(ttl) => self.grant(ttl).await?,
                None => 0,
            };
            let record = Record {
                dir,
                action: stored_action,
                expires_ms: write.ttl.map(|ttl| now_ms() + ttl * 1000),
                created: match action {
                    Action::Update | Action::CompareAndSwap => {
                        current.as_ref().map(Stored::created_index)
                    }
                    _ => None,
                },
                value: if dir { Vec::new() } else { value },
            };
            success.push(put_op(v3_key(&write.path), record, lease));
            success.push(range_op(v3_key(&write.path), Vec::new()));
            let reply = self.txn(compare, success).await;
            let reply = match reply {
                Ok(reply) if reply.succeeded => reply,
                other => {
                    if lease != 0 {
                        self.revoke(lease).await;
                    }
                    other?;
                    continue;
                }
            };
            let index = reply.header.as_ref().map_or(0, |h| h.revision);
            let written = reply
                .responses
                .last()
                .and_then(|r| match &r.response {
                    Some(OpResponse::ResponseRange(range)) => {
                        range.kvs.first().and_then(Stored::from_kv)
                    }
                    _ => None,
                })
                .ok_or_else(|| V2Error::new(300, "the written node is missing", index))?;
            let now = now_ms();
            let created = current.is_none();
            let event = Event {
                action: action.name(),
                node: written.node(now),
                prev_node: current.map(|c| c.node(now)),
            };
            let status = if created && matches!(action, Action::Set | Action::Create) {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            return Ok(v2_response(status, event_json(&event), index));
        }
        Err(V2Error::new(300, "too many concurrent writes", 0))
    }

    pub(super) async fn txn(
        &self,
        compare: Vec<Compare>,
        success: Vec<RequestOp>,
    ) -> Result<TxnResponse, V2Error> {
        Ok(self
            .kv()
            .txn(TxnRequest {
                compare,
                success,
                failure: Vec::new(),
            })
            .await
            .map_err(internal)?
            .into_inner())
    }

    pub(super) async fn grant(&self, ttl: i64) -> Result<i64, V2Error> {
        let mut lease = LeaseClient::new(self.grpc.clone());
        let reply = lease
            .lease_grant(LeaseGrantRequest { ttl, id: 0 })
            .await
            .map_err(internal)?;
        Ok(reply.get_ref().id)
    }

    pub(super) async fn revoke(&self, id: i64) {
        let mut lease = LeaseClient::new(self.grpc.clone());
        if let Err(e) = lease.lease_revoke(LeaseRevokeRequest { id }).await {
            tracing::debug!("v2: revoking unused lease {id:x}: {e}");
        }
    }

    pub(super) async fn delete(
        &self,
        path: &str,
        params: &Params,
    ) -> Result<Response<Body>, V2Error> {
        if path == "/" {
            return Err(V2Error::new(107, "/", 0));
        }
        let recursive = params.flag("recursive");
        let dir = params.flag("dir") || recursive;
        let prev_value = params.get("prevValue").filter(|v| !v.is_empty());
        let prev_index = match params.get("prevIndex").filter(|v| !v.is_empty()) {
            Some(index) => Some(
                index
                    .parse::<i64>()
                    .map_err(|_| V2Error::new(203, "CompareAndDelete", 0))?,
            ),
            None => None,
        };
        for _ in 0..WRITE_ATTEMPTS {
            let (revision, node, children) = self.read_tree(path).await?;
            let Some(current) = node else {
                return Err(V2Error::new(100, path, revision));
            };
            if current.record.dir {
                if !dir {
                    return Err(V2Error::new(102, path, revision));
                }
                if !recursive && !children.is_empty() {
                    return Err(V2Error::new(108, path, revision));
                }
            }
            let compare_and_delete = prev_value.is_some() || prev_index.is_some();
            if compare_and_delete {
                if current.record.dir {
                    return Err(V2Error::new(102, path, revision));
                }
                if let Some(cause) = compare_fail_cause(&current, prev_value, prev_index) {
                    return Err(V2Error::new(101, cause, revision));
                }
            }
            let key = v3_key(path);
            let mut success = vec![RequestOp {
                request: Some(Op::RequestDeleteRange(DeleteRangeRequest {
                    key: key.clone().into(),
                    ..Default::default()
                })),
            }];
            if current.record.dir {
                let mut children_prefix = key.clone();
                children_prefix.push(b'/');
                success.push(RequestOp {
                    request: Some(Op::RequestDeleteRange(DeleteRangeRequest {
                        key: children_prefix.clone().into(),
                        range_end: prefix_end(&children_prefix).into(),
                        ..Default::default()
                    })),
                });
            }
            let reply = self
                .txn(vec![mod_revision_is(key, current.mod_revision)], success)
                .await?;
            if !reply.succeeded {
                continue;
            }
            let index = reply.header.as_ref().map_or(0, |h| h.revision);
            let now = now_ms();
            let event = Event {
                action: if compare_and_delete {
                    "compareAndDelete"
                } else {
                    "delete"
                },
                node: Node {
                    key: Some(path.to_string()),
                    dir: current.record.dir,
                    modified_index: index,
                    created_index: current.created_index(),
                    ..Node::default()
                },
                prev_node: Some(current.node(now)),
            };
            return Ok(v2_response(StatusCode::OK, event_json(&event), index));
        }
        Err(V2Error::new(300, "too many concurrent writes", 0))
    }
}

/// What a PUT asks for.
pub(super) struct Write {
    path: String,
    dir: bool,
    value: String,
    ttl: Option<i64>,
    prev_exist: Option<bool>,
    prev_value: Option<String>,
    prev_index: Option<i64>,
    /// Renew the TTL, keep the value, tell no watcher.
    refresh: bool,
}

/// The action a write is, or the v2 error its conditions give against the
/// current node.
pub(super) fn check_write(
    write: &Write,
    current: Option<&Stored>,
    revision: i64,
) -> Result<Action, V2Error> {
    let path = &write.path;
    if write.prev_value.is_some() || write.prev_index.is_some() {
        let Some(current) = current else {
            return Err(V2Error::new(100, path, revision));
        };
        if current.record.dir {
            return Err(V2Error::new(102, path, revision));
        }
        if let Some(cause) =
            compare_fail_cause(current, write.prev_value.as_deref(), write.prev_index)
        {
            return Err(V2Error::new(101, cause, revision));
        }
        return Ok(Action::CompareAndSwap);
    }
    match (write.prev_exist, current) {
        (Some(false), Some(_)) => Err(V2Error::new(105, path, revision)),
        (Some(false), None) => Ok(Action::Create),
        (Some(true), None) => Err(V2Error::new(100, path, revision)),
        (Some(true), Some(c)) if c.record.dir && !write.dir => {
            Err(V2Error::new(102, path, revision))
        }
        (Some(true), Some(_)) => Ok(Action::Update),
        (None, Some(c)) if c.record.dir => Err(V2Error::new(102, path, revision)),
        (None, _) => Ok(Action::Set),
    }
}

/// etcd's cause for a failed compare, or None when it holds.
pub(super) fn compare_fail_cause(
    current: &Stored,
    prev_value: Option<&str>,
    prev_index: Option<i64>,
) -> Option<String> {
    let value = String::from_utf8_lossy(&current.record.value);
    let value_fails = prev_value.is_some_and(|v| v != value);
    let index_fails = prev_index.is_some_and(|i| i != current.mod_revision);
    match (value_fails, index_fails) {
        (false, false) => None,
        (true, false) => Some(format!("[{} != {value}]", prev_value.unwrap_or(""))),
        (false, true) => Some(format!(
            "[{} != {}]",
            prev_index.unwrap_or(0),
            current.mod_revision
        )),
        (true, true) => Some(format!(
            "[{} != {value}] [{} != {}]",
            prev_value.unwrap_or(""),
            prev_index.unwrap_or(0),
            current.mod_revision
        )),
    }
}

pub(super) fn parse_ttl(params: &Params) -> Result<Option<i64>, V2Error> {
    match params.get("ttl").filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(ttl) => match ttl.parse::<i64>() {
            Ok(ttl) if ttl > 0 => Ok(Some(ttl)),
            _ => Err(V2Error::new(202, "Update", 0)),
        },
    }
}

pub(super) fn range_op(key: Vec<u8>, range_end: Vec<u8>) -> RequestOp {
    RequestOp {
        request: Some(Op::RequestRange(RangeRequest {
            key: key.into(),
            range_end: range_end.into(),
            ..Default::default()
        })),
    }
}

pub(super) fn put_op(key: Vec<u8>, record: Record, lease: i64) -> RequestOp {
    RequestOp {
        request: Some(Op::RequestPut(PutRequest {
            key: key.into(),
            value: record.encode().into(),
            lease,
            ..Default::default()
        })),
    }
}

/// The key's mod revision is `revision` (0: the key does not exist).
pub(super) fn mod_revision_is(key: Vec<u8>, revision: i64) -> Compare {
    Compare {
        result: CompareResult::Equal as i32,
        target: CompareTarget::Mod as i32,
        key: key.into(),
        range_end: Bytes::new(),
        target_union: Some(TargetUnion::ModRevision(revision)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v2::node::tests::stored;

    #[test]
    fn writes_check_their_conditions() {
        let file = stored("/k", false, 7);
        let create = Write {
            path: "/k".to_string(),
            dir: false,
            value: "x".to_string(),
            ttl: None,
            prev_exist: Some(false),
            prev_value: None,
            prev_index: None,
            refresh: false,
        };
        assert_eq!(
            check_write(&create, Some(&file), 7)
                .map_err(|e| e.code)
                .err(),
            Some(105)
        );
        assert_eq!(check_write(&create, None, 7).ok(), Some(Action::Create));
        let cas = Write {
            prev_exist: None,
            prev_value: Some("w".to_string()),
            prev_index: Some(7),
            ..create
        };
        let error = check_write(&cas, Some(&file), 7).expect_err("compare fails");
        assert_eq!((error.code, error.cause.as_str()), (101, "[w != v]"));
        assert_eq!(check_write(&cas, None, 7).err().map(|e| e.code), Some(100));
    }
}
