//! Reads: a node or a directory listing (`GET`), and the long-poll
//! `wait=true`, a v3 watch from waitIndex.

use cairn_api::etcdserverpb::response_op::Response as OpResponse;
use cairn_api::etcdserverpb::watch_client::WatchClient;
use cairn_api::etcdserverpb::watch_request::RequestUnion;
use cairn_api::etcdserverpb::{TxnRequest, WatchCreateRequest, WatchRequest};
use cairn_api::mvccpb::KeyValue;
use cairn_api::mvccpb::event::EventType;
use http::{Response, StatusCode};
use tokio_stream::StreamExt as _;

use super::error::{V2Error, internal, v2_response};
use super::node::{
    Action, Event, Node, Stored, event_json, is_hidden, listing, now_ms, prefix_end, v3_key,
};
use super::params::Params;
use super::write::range_op;
use super::{Keys, PREFIX};
use crate::Body;

/// How many events etcd's v2 store keeps for watchers.
const EVENT_HISTORY: i64 = 1000;

impl Keys {
    /// The node at `path` and, for a directory, every node under it, at one
    /// revision.
    pub(super) async fn read_tree(
        &self,
        path: &str,
    ) -> Result<(i64, Option<Stored>, Vec<Stored>), V2Error> {
        let key = v3_key(path);
        let mut children_prefix = key.clone();
        if path != "/" {
            children_prefix.push(b'/');
        }
        let txn = TxnRequest {
            compare: Vec::new(),
            success: vec![
                range_op(key, Vec::new()),
                range_op(children_prefix.clone(), prefix_end(&children_prefix)),
            ],
            failure: Vec::new(),
        };
        let reply = self.kv().txn(txn).await.map_err(internal)?.into_inner();
        let revision = reply.header.as_ref().map_or(0, |h| h.revision);
        let mut ranges = reply
            .responses
            .into_iter()
            .filter_map(|r| match r.response {
                Some(OpResponse::ResponseRange(range)) => Some(range),
                _ => None,
            });
        let node = ranges
            .next()
            .and_then(|r| r.kvs.first().and_then(Stored::from_kv));
        let children = ranges
            .next()
            .map(|r| r.kvs.iter().filter_map(Stored::from_kv).collect())
            .unwrap_or_default();
        Ok((revision, node, children))
    }

    pub(super) async fn get(&self, path: &str, params: &Params) -> Result<Response<Body>, V2Error> {
        let (revision, node, children) = self.read_tree(path).await?;
        let now = now_ms();
        let node = match node {
            Some(stored) if !stored.record.dir => stored.node(now),
            Some(stored) => {
                let mut node = stored.node(now);
                node.nodes = listing(path, &children, params.flag("recursive"), now);
                node
            }
            None if path == "/" => Node {
                dir: true,
                nodes: listing(path, &children, params.flag("recursive"), now),
                ..Node::default()
            },
            None => return Err(V2Error::new(100, path, revision)),
        };
        let event = Event {
            action: "get",
            node,
            prev_node: None,
        };
        Ok(v2_response(StatusCode::OK, event_json(&event), revision))
    }

    /// A long poll: the first change to `path` (or under it, if recursive)
    /// at or after waitIndex.
    pub(super) async fn wait(
        &self,
        path: &str,
        params: &Params,
    ) -> Result<Response<Body>, V2Error> {
        let recursive = params.flag("recursive");
        let current = self.current_revision().await?;
        let start = match params.get("waitIndex").filter(|v| !v.is_empty()) {
            Some(index) => index
                .parse::<i64>()
                .map_err(|_| V2Error::new(203, "Watch", current))?,
            None => 0,
        };
        // waitIndex 0 (what etcdctl sends without --after-index) means the
        // next change, as in etcd's v2 store.
        let start = if start == 0 { current + 1 } else { start };
        let oldest = (current - EVENT_HISTORY + 1).max(1);
        if start < oldest {
            return Err(V2Error::new(
                401,
                format!("the requested history has been cleared [{oldest}/{start}]"),
                current,
            ));
        }
        let key = v3_key(path);
        let mut watch_prefix = key.clone();
        if path != "/" {
            watch_prefix.push(b'/');
        }
        // One range covers the node and everything under it; events for
        // neighbours that merely share the prefix (/foo2 for /foo) are
        // dropped below.
        let create = WatchCreateRequest {
            key: key.clone().into(),
            range_end: prefix_end(&key).into(),
            start_revision: start.max(1),
            prev_kv: true,
            ..Default::default()
        };
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let _ = tx
            .send(WatchRequest {
                request_union: Some(RequestUnion::CreateRequest(create)),
            })
            .await;
        let mut watch = WatchClient::new(self.grpc.clone());
        // `tx` lives as long as this poll, so the stream stays open.
        let mut responses = watch
            .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map_err(internal)?
            .into_inner();
        if params.flag("stream") {
            return Ok(stream_events(
                path.to_string(),
                recursive,
                responses,
                tx,
                current,
            ));
        }
        while let Some(reply) = responses.next().await {
            let reply = reply.map_err(internal)?;
            if reply.compact_revision > 0 {
                return Err(V2Error::new(
                    401,
                    format!(
                        "the requested history has been cleared [{}/{start}]",
                        reply.compact_revision
                    ),
                    current,
                ));
            }
            if reply.canceled {
                return Err(V2Error::new(300, reply.cancel_reason, current));
            }
            if let Some(v2_event) = reply
                .events
                .iter()
                .find_map(|event| matching_event(event, path, recursive))
            {
                drop(tx);
                return Ok(v2_response(StatusCode::OK, event_json(&v2_event), current));
            }
        }
        Err(V2Error::new(300, "the watch ended", current))
    }
}

/// `stream=true`: every matching event, one JSON line each, as it comes,
/// until the client goes away or the watch ends (etcd's v2 streams the
/// same way, and its headers go out before the first event).
fn stream_events(
    path: String,
    recursive: bool,
    mut responses: tonic::Streaming<cairn_api::etcdserverpb::WatchResponse>,
    watch_requests: tokio::sync::mpsc::Sender<WatchRequest>,
    current: i64,
) -> Response<Body> {
    let (lines, body) = tokio::sync::mpsc::channel::<bytes::Bytes>(16);
    tokio::spawn(async move {
        // The watch stays open while this task holds its request side.
        let _watch_requests = watch_requests;
        loop {
            let reply = tokio::select! {
                reply = responses.next() => reply,
                () = lines.closed() => return,
            };
            let Some(Ok(reply)) = reply else { return };
            if reply.canceled || reply.compact_revision > 0 {
                return;
            }
            for event in &reply.events {
                if let Some(v2_event) = matching_event(event, &path, recursive)
                    && lines.send(event_json(&v2_event).into()).await.is_err()
                {
                    return;
                }
            }
        }
    });
    let frames = tokio_stream::wrappers::ReceiverStream::new(body)
        .map(|line| Ok::<_, std::convert::Infallible>(http_body::Frame::data(line)));
    let mut response = Response::new(Body::new(http_body_util::StreamBody::new(frames)));
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    headers.insert("X-Etcd-Index", http::HeaderValue::from(current.max(0)));
    response
}

/// The v2 event a v3 watch event is for a wait on `path`: None when it
/// concerns another node (a neighbour sharing the prefix, a hidden node
/// under a recursive wait, a node below a non-recursive one) or is no
/// event for watchers (a parent created along with a node, a refresh).
fn matching_event(event: &cairn_api::mvccpb::Event, path: &str, recursive: bool) -> Option<Event> {
    let kv = event.kv.as_ref()?;
    let event_path = kv
        .key
        .strip_prefix(PREFIX)
        .and_then(|k| std::str::from_utf8(k).ok())?;
    let under = path == "/"
        || event_path
            .strip_prefix(path)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'));
    let matches = event_path == path
        || (recursive && under && !event_path[path.len()..].split('/').any(is_hidden));
    if !matches || !under {
        return None;
    }
    watch_event(event, kv, event_path)
}

/// A v3 watch event as a v2 one; None for parent directories created along
/// with a node.
pub(super) fn watch_event(
    event: &cairn_api::mvccpb::Event,
    kv: &KeyValue,
    path: &str,
) -> Option<Event> {
    let now = now_ms();
    let prev = event.prev_kv.as_ref().and_then(Stored::from_kv);
    if event.r#type == EventType::Delete as i32 {
        let expired = prev
            .as_ref()
            .and_then(|p| p.record.expires_ms)
            .is_some_and(|ms| ms <= now + 1000);
        return Some(Event {
            action: if expired { "expire" } else { "delete" },
            node: Node {
                key: Some(path.to_string()),
                dir: prev.as_ref().is_some_and(|p| p.record.dir),
                modified_index: kv.mod_revision,
                created_index: prev.as_ref().map_or(0, Stored::created_index),
                ..Node::default()
            },
            prev_node: prev.map(|p| p.node(now)),
        });
    }
    let stored = Stored::from_kv(kv)?;
    if matches!(stored.record.action, Action::Implicit | Action::Refresh) {
        return None;
    }
    Some(Event {
        action: stored.record.action.name(),
        node: stored.node(now),
        prev_node: prev.map(|p| p.node(now)),
    })
}
