//! A v2 node: how it is stored in the v3 keyspace (the [`Record`] under
//! the key [`PREFIX`]`/path`), and how v2 answers it in JSON.

use std::time::{SystemTime, UNIX_EPOCH};

use cairn_api::mvccpb::KeyValue;
use serde::Serialize;

use super::PREFIX;

const KIND_FILE: u8 = b'f';
const KIND_DIR: u8 = b'd';

/// What wrote a node, as v2 watchers are told.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Action {
    Set,
    Create,
    Update,
    CompareAndSwap,
    /// A parent directory created along with a node: watchers hear of the
    /// node, not of it.
    Implicit,
    /// A TTL refreshed (`refresh=true`): as in etcd, watchers are not told.
    Refresh,
}

impl Action {
    pub(super) fn code(self) -> u8 {
        match self {
            Action::Set => b's',
            Action::Create => b'c',
            Action::Update => b'u',
            Action::CompareAndSwap => b'w',
            Action::Implicit => b'i',
            Action::Refresh => b'r',
        }
    }

    pub(super) fn from_code(code: u8) -> Action {
        match code {
            b'c' => Action::Create,
            b'u' => Action::Update,
            b'w' => Action::CompareAndSwap,
            b'i' => Action::Implicit,
            b'r' => Action::Refresh,
            _ => Action::Set,
        }
    }

    pub(super) fn name(self) -> &'static str {
        match self {
            // Watchers never see the last two: the name is never shown.
            Action::Set | Action::Implicit | Action::Refresh => "set",
            Action::Create => "create",
            Action::Update => "update",
            Action::CompareAndSwap => "compareAndSwap",
        }
    }
}

/// A node's stored value.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Record {
    pub(super) dir: bool,
    pub(super) action: Action,
    /// Milliseconds since the Unix epoch.
    pub(super) expires_ms: Option<i64>,
    /// The createdIndex of a node updated in place (update,
    /// compareAndSwap); None for a node (re)created by this write, whose
    /// createdIndex is its mod revision, as a v2 set replaces the node.
    pub(super) created: Option<i64>,
    pub(super) value: Vec<u8>,
}

impl Record {
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(11 + self.value.len());
        out.push(if self.dir { KIND_DIR } else { KIND_FILE });
        out.push(self.action.code());
        for field in [self.expires_ms, self.created] {
            match field {
                Some(n) => {
                    out.push(1);
                    out.extend_from_slice(&n.to_be_bytes());
                }
                None => out.push(0),
            }
        }
        out.extend_from_slice(&self.value);
        out
    }

    pub(super) fn decode(bytes: &[u8]) -> Option<Record> {
        let (&kind, rest) = bytes.split_first()?;
        let (&action, rest) = rest.split_first()?;
        let (expires_ms, rest) = optional_i64(rest)?;
        let (created, value) = optional_i64(rest)?;
        Some(Record {
            dir: kind == KIND_DIR,
            action: Action::from_code(action),
            expires_ms,
            created,
            value: value.to_vec(),
        })
    }
}

/// A presence byte, then the big-endian number if present.
fn optional_i64(bytes: &[u8]) -> Option<(Option<i64>, &[u8])> {
    let (&present, rest) = bytes.split_first()?;
    if present == 1 {
        let (n, rest) = rest.split_at_checked(8)?;
        Some((Some(i64::from_be_bytes(n.try_into().ok()?)), rest))
    } else {
        Some((None, rest))
    }
}

/// A node as v2 answers it.
#[derive(Serialize, Default, Debug, Clone)]
pub(super) struct Node {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) value: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(super) dir: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) expiration: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) ttl: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) nodes: Option<Vec<Node>>,
    #[serde(rename = "modifiedIndex", skip_serializing_if = "is_zero")]
    pub(super) modified_index: i64,
    #[serde(rename = "createdIndex", skip_serializing_if = "is_zero")]
    pub(super) created_index: i64,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

#[derive(Serialize)]
pub(super) struct Event {
    pub(super) action: &'static str,
    pub(super) node: Node,
    #[serde(rename = "prevNode", skip_serializing_if = "Option::is_none")]
    pub(super) prev_node: Option<Node>,
}

/// A stored node: its path, record and revisions.
#[derive(Clone, Debug)]
pub(super) struct Stored {
    pub(super) path: String,
    pub(super) record: Record,
    pub(super) mod_revision: i64,
}

impl Stored {
    pub(super) fn from_kv(kv: &KeyValue) -> Option<Stored> {
        let path = std::str::from_utf8(kv.key.strip_prefix(PREFIX)?).ok()?;
        Some(Stored {
            path: path.to_string(),
            record: Record::decode(&kv.value)?,
            mod_revision: kv.mod_revision,
        })
    }

    pub(super) fn created_index(&self) -> i64 {
        self.record.created.unwrap_or(self.mod_revision)
    }

    /// The node alone (a directory without its children).
    pub(super) fn node(&self, now_ms: i64) -> Node {
        let (expiration, ttl) = match self.record.expires_ms {
            Some(ms) => {
                let left = ms - now_ms;
                // Whole seconds left, rounded up, as etcd's v2 store.
                let ttl = left.div_euclid(1000) + i64::from(left.rem_euclid(1000) > 0);
                (Some(rfc3339(ms)), Some(ttl))
            }
            None => (None, None),
        };
        Node {
            key: Some(self.path.clone()),
            value: (!self.record.dir)
                .then(|| String::from_utf8_lossy(&self.record.value).into_owned()),
            dir: self.record.dir,
            expiration,
            ttl,
            nodes: None,
            modified_index: self.mod_revision,
            created_index: self.created_index(),
        }
    }
}

/// Milliseconds since the epoch as RFC 3339 in UTC, to the millisecond.
pub(super) fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

pub(super) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// `path.Clean("/" + path)`, as etcd's v2 store names nodes.
pub(super) fn clean_path(raw: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in raw.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            part => parts.push(part),
        }
    }
    format!("/{}", parts.join("/"))
}

pub(super) fn v3_key(path: &str) -> Vec<u8> {
    let mut key = PREFIX.to_vec();
    key.extend_from_slice(path.as_bytes());
    key
}

/// The range end that covers every key starting with `prefix`.
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// `/a/b/c` → `["/a", "/a/b"]`.
pub(super) fn ancestors(path: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(i) = path[at + 1..].find('/') {
        at += i + 1;
        out.push(path[..at].to_string());
    }
    out
}

pub(super) fn is_hidden(name: &str) -> bool {
    name.starts_with('_')
}

/// The children of directory `path` among `descendants` (every node under
/// it), sorted by key, nested when recursive; hidden nodes left out.
pub(super) fn listing(
    path: &str,
    descendants: &[Stored],
    recursive: bool,
    now: i64,
) -> Option<Vec<Node>> {
    let base = if path == "/" { "" } else { path };
    let mut nodes = Vec::new();
    for stored in descendants {
        let Some(rest) = stored
            .path
            .strip_prefix(base)
            .and_then(|r| r.strip_prefix('/'))
        else {
            continue;
        };
        if rest.contains('/') || is_hidden(rest) {
            continue;
        }
        let mut node = stored.node(now);
        if recursive && stored.record.dir {
            node.nodes = listing(&stored.path, descendants, true, now);
        }
        nodes.push(node);
    }
    nodes.sort_by(|a, b| a.key.cmp(&b.key));
    (!nodes.is_empty()).then_some(nodes)
}

pub(super) fn event_json(event: &Event) -> Vec<u8> {
    let mut json = serde_json::to_vec(event).unwrap_or_default();
    json.push(b'\n');
    json
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        for record in [
            Record {
                dir: false,
                action: Action::CompareAndSwap,
                expires_ms: Some(1_700_000_000_123),
                created: Some(42),
                value: b"hello".to_vec(),
            },
            Record {
                dir: true,
                action: Action::Implicit,
                expires_ms: None,
                created: None,
                value: Vec::new(),
            },
        ] {
            assert_eq!(Record::decode(&record.encode()), Some(record));
        }
        assert_eq!(Record::decode(b"f"), None);
    }

    #[test]
    fn paths_are_cleaned_like_go() {
        assert_eq!(clean_path(""), "/");
        assert_eq!(clean_path("/foo/"), "/foo");
        assert_eq!(clean_path("//a/./b/../c"), "/a/c");
        assert_eq!(
            ancestors("/a/b/c"),
            vec!["/a".to_string(), "/a/b".to_string()]
        );
        assert!(ancestors("/a").is_empty());
    }

    #[test]
    fn times_print_as_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_795_690_811_008), "2026-11-26T11:00:11.008Z");
    }

    pub(in crate::v2) fn stored(path: &str, dir: bool, revision: i64) -> Stored {
        Stored {
            path: path.to_string(),
            record: Record {
                dir,
                action: Action::Set,
                expires_ms: None,
                created: None,
                value: if dir { Vec::new() } else { b"v".to_vec() },
            },
            mod_revision: revision,
        }
    }

    #[test]
    fn listings_nest_sort_and_hide() {
        let descendants = vec![
            stored("/dir/c", false, 10),
            stored("/dir/a", true, 9),
            stored("/dir/a/b", false, 9),
            stored("/dir/_hidden", false, 11),
        ];
        let flat = listing("/dir", &descendants, false, 0).expect("children");
        let keys: Vec<_> = flat.iter().filter_map(|n| n.key.clone()).collect();
        assert_eq!(keys, vec!["/dir/a", "/dir/c"]);
        assert!(flat[0].nodes.is_none());
        let nested = listing("/dir", &descendants, true, 0).expect("children");
        let inner = nested[0].nodes.as_ref().expect("nested");
        assert_eq!(inner[0].key.as_deref(), Some("/dir/a/b"));
    }
}
