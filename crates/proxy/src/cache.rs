//! The read cache for serializable Range requests: keyed by the caller's
//! identity and the whole request, bounded (least recently used goes first),
//! and kept honest by a watch on the whole keyspace.
//!
//! Why it is never stale (every step below happens under one lock):
//! - Every change the proxy learns of — an event of the cache's watch, or
//!   a write that went through the proxy — is recorded with its revision in
//!   `recent` and drops the cached ranges it touches.
//! - A response read at revision R is only stored if no recorded change
//!   after R touches its range, and `recent` still reaches back to R
//!   (`forgotten < R`). Changes after R that the proxy has not learned of
//!   yet arrive later and drop it then.
//! - Nothing is served while the cache's watch is down (`healthy` false):
//!   changes made meanwhile would go unnoticed. It restarts empty.
//! - A coalesced client watch hands events of revision r to clients only
//!   after the cache's watch has reached r ([`ReadCache::wait_seen`]): so a
//!   client that saw a write's event never reads the old value from here.
//!
//! Every hit is only served after a member confirms that the caller may
//! read that range now (`KvProxy::confirm`), callers without a token too:
//! auth may have been turned on through another endpoint, which nothing the
//! proxy sees tells it. A revoked permission, an expired token, another
//! user's token or a missing one gets the member's error, never a cached
//! answer (etcd's grpc-proxy once served one user's cached reads to
//! another). Under auth the cache's watch runs as the `--cache-user` (it
//! needs to read every key).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cairn_api::etcdserverpb::request_op::Request as Op;
use cairn_api::etcdserverpb::{RangeRequest, RangeResponse, TxnRequest};
use parking_lot::Mutex;
use prost::Message as _;

use crate::metrics::Metrics;

/// How many recent changes are kept to vet responses read just before them.
const RECENT_CHANGES: usize = 16 * 1024;

/// How long a client watch waits for the cache's watch to catch up before
/// the cache gives up on it and empties itself.
const SEEN_WAIT: Duration = Duration::from_secs(1);

pub struct ReadCache {
    state: Mutex<State>,
    /// The revision up to which the cache's watch has delivered every change.
    seen: tokio::sync::watch::Sender<i64>,
    metrics: Arc<Metrics>,
}

struct State {
    healthy: bool,
    capacity: usize,
    entries: HashMap<Vec<u8>, Entry>,
    /// Use order: tick → cache key.
    lru: BTreeMap<u64, Vec<u8>>,
    tick: u64,
    recent: VecDeque<Change>,
    /// The newest revision of a change no longer in `recent`.
    forgotten: i64,
}

struct Entry {
    range: KeyRange,
    revision: i64,
    response: RangeResponse,
    tick: u64,
}

struct Change {
    revision: i64,
    range: KeyRange,
}

/// A key range in etcd's encoding: `end` empty for the key alone, `\0` for
/// every key from `key`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRange {
    pub key: Bytes,
    pub end: Bytes,
}

impl KeyRange {
    pub fn new(key: Bytes, end: Bytes) -> KeyRange {
        KeyRange { key, end }
    }

    pub fn everything() -> KeyRange {
        KeyRange::new(Bytes::from_static(&[0]), Bytes::from_static(&[0]))
    }

    /// `[start, end)`, `None` meaning no upper bound.
    fn bounds(&self) -> (&[u8], Option<Vec<u8>>) {
        match &self.end[..] {
            [] => {
                let mut end = self.key.to_vec();
                end.push(0);
                (&self.key, Some(end))
            }
            [0] => (&self.key, None),
            end => (&self.key, Some(end.to_vec())),
        }
    }

    pub fn overlaps(&self, other: &KeyRange) -> bool {
        let (a_start, a_end) = self.bounds();
        let (b_start, b_end) = other.bounds();
        let a_before_b_ends = b_end.is_none_or(|e| a_start < &e[..]);
        let b_before_a_ends = a_end.is_none_or(|e| b_start < &e[..]);
        a_before_b_ends && b_before_a_ends
    }
}

impl ReadCache {
    pub fn new(capacity: usize, metrics: Arc<Metrics>) -> ReadCache {
        ReadCache {
            state: Mutex::new(State {
                healthy: false,
                capacity,
                entries: HashMap::new(),
                lru: BTreeMap::new(),
                tick: 0,
                recent: VecDeque::new(),
                forgotten: 0,
            }),
            seen: tokio::sync::watch::channel(0).0,
            metrics,
        }
    }

    fn cache_key(identity: Option<&[u8]>, request: &RangeRequest) -> Vec<u8> {
        let mut key = Vec::with_capacity(request.encoded_len() + 16);
        match identity {
            Some(id) => {
                key.push(1);
                key.extend_from_slice(&(id.len() as u64).to_be_bytes());
                key.extend_from_slice(id);
            }
            None => key.push(0),
        }
        request.encode_raw(&mut key);
        key
    }

    /// Whether a request may be answered from (and stored in) the cache.
    pub fn cacheable(request: &RangeRequest) -> bool {
        request.serializable && request.revision <= 0
    }

    /// The cached answer to `request` for `identity`, which a member must
    /// confirm before it is served (then [`ReadCache::served`]); a miss is
    /// counted here.
    pub fn get(&self, identity: Option<&[u8]>, request: &RangeRequest) -> Option<RangeResponse> {
        let key = Self::cache_key(identity, request);
        let mut state = self.state.lock();
        let response = if state.healthy {
            state.touch(&key)
        } else {
            None
        };
        drop(state);
        if response.is_none() {
            self.metrics.cache_misses.inc();
        }
        response
    }

    /// A hit was served: counted as one (a hit a member refused is not).
    pub fn served(&self) {
        self.metrics.cache_hits.inc();
    }

    pub fn insert(
        &self,
        identity: Option<&[u8]>,
        request: &RangeRequest,
        response: &RangeResponse,
    ) {
        let Some(revision) = response.header.as_ref().map(|h| h.revision) else {
            return;
        };
        let range = KeyRange::new(request.key.clone(), request.range_end.clone());
        let key = Self::cache_key(identity, request);
        let mut state = self.state.lock();
        if !state.healthy || state.capacity == 0 || state.forgotten > revision {
            return;
        }
        let changed_since = state
            .recent
            .iter()
            .rev()
            .take_while(|c| c.revision > revision)
            .any(|c| c.range.overlaps(&range));
        if changed_since {
            return;
        }
        state.tick += 1;
        let tick = state.tick;
        if let Some(old) = state.entries.insert(
            key.clone(),
            Entry {
                range,
                revision,
                response: response.clone(),
                tick,
            },
        ) {
            state.lru.remove(&old.tick);
        }
        state.lru.insert(tick, key);
        while state.entries.len() > state.capacity {
            let Some((_, oldest)) = state.lru.pop_first() else {
                break;
            };
            state.entries.remove(&oldest);
        }
        self.metrics.cache_keys.set(state.entries.len() as i64);
    }

    /// A change at `revision` touched `range`: drop what it made stale.
    pub fn changed(&self, revision: i64, range: KeyRange) {
        let mut state = self.state.lock();
        let stale: Vec<Vec<u8>> = state
            .entries
            .iter()
            .filter(|(_, e)| e.revision < revision && e.range.overlaps(&range))
            .map(|(k, _)| k.clone())
            .collect();
        for key in &stale {
            if let Some(entry) = state.entries.remove(key) {
                state.lru.remove(&entry.tick);
            }
        }
        // Keep `recent` in revision order even if a write's response comes
        // back after the watch has shown newer changes.
        let at = state
            .recent
            .iter()
            .rposition(|c| c.revision <= revision)
            .map_or(0, |i| i + 1);
        state.recent.insert(at, Change { revision, range });
        while state.recent.len() > RECENT_CHANGES {
            if let Some(old) = state.recent.pop_front() {
                state.forgotten = state.forgotten.max(old.revision);
            }
        }
        self.metrics.cache_invalidations.inc_by(stale.len() as u64);
        self.metrics.cache_keys.set(state.entries.len() as i64);
    }

    /// The ranges a txn may write, each recorded as changed at `revision`.
    pub fn txn_changed(&self, revision: i64, txn: &TxnRequest) {
        for op in txn.success.iter().chain(&txn.failure) {
            match &op.request {
                Some(Op::RequestPut(p)) => {
                    self.changed(revision, KeyRange::new(p.key.clone(), Bytes::new()))
                }
                Some(Op::RequestDeleteRange(d)) => {
                    self.changed(revision, KeyRange::new(d.key.clone(), d.range_end.clone()))
                }
                Some(Op::RequestTxn(t)) => self.txn_changed(revision, t),
                Some(Op::RequestRange(_)) | None => {}
            }
        }
    }

    /// The cache's watch has delivered everything up to `revision`.
    pub fn advance(&self, revision: i64) {
        self.seen.send_if_modified(|seen| {
            let newer = revision > *seen;
            if newer {
                *seen = revision;
            }
            newer
        });
    }

    /// The newest revision the cache's watch has delivered (0 before any,
    /// or with the cache off).
    pub fn seen(&self) -> i64 {
        *self.seen.borrow()
    }

    /// Waits until the cache's watch has delivered `revision`; if it does not
    /// in time, the cache empties and stops serving until its watch is back.
    pub async fn wait_seen(&self, revision: i64) {
        if !self.state.lock().healthy {
            return;
        }
        let mut seen = self.seen.subscribe();
        let reached = tokio::time::timeout(SEEN_WAIT, seen.wait_for(|s| *s >= revision)).await;
        if !matches!(reached, Ok(Ok(_))) {
            tracing::warn!(revision, "grpc-proxy: cache watch is behind; cache emptied");
            self.suspend();
        }
    }

    /// The cache's watch is down: serve nothing, keep nothing.
    pub fn suspend(&self) {
        let mut state = self.state.lock();
        state.healthy = false;
        state.entries.clear();
        state.lru.clear();
        state.recent.clear();
        self.metrics.cache_keys.set(0);
    }

    /// The cache's watch (re)started at `revision`: changes before it are
    /// unknown, so nothing read before it may be stored.
    pub fn resume(&self, revision: i64) {
        let mut state = self.state.lock();
        state.entries.clear();
        state.lru.clear();
        state.recent.clear();
        state.forgotten = revision;
        state.healthy = state.capacity > 0;
        drop(state);
        self.advance(revision);
    }
}

impl State {
    fn touch(&mut self, key: &[u8]) -> Option<RangeResponse> {
        self.tick += 1;
        let tick = self.tick;
        let entry = self.entries.get_mut(key)?;
        let old = std::mem::replace(&mut entry.tick, tick);
        let response = entry.response.clone();
        self.lru.remove(&old);
        self.lru.insert(tick, key.to_vec());
        Some(response)
    }
}

#[cfg(test)]
mod tests {
    use cairn_api::etcdserverpb::ResponseHeader;

    use super::*;

    fn get(key: &str) -> RangeRequest {
        RangeRequest {
            key: Bytes::copy_from_slice(key.as_bytes()),
            serializable: true,
            ..Default::default()
        }
    }

    fn at(revision: i64) -> RangeResponse {
        RangeResponse {
            header: Some(ResponseHeader {
                revision,
                ..Default::default()
            }),
            count: revision,
            ..Default::default()
        }
    }

    fn key(k: &str) -> KeyRange {
        KeyRange::new(Bytes::copy_from_slice(k.as_bytes()), Bytes::new())
    }

    fn cache(capacity: usize) -> ReadCache {
        let cache = ReadCache::new(
            capacity,
            Arc::new(Metrics::new().expect("the proxy's metrics")),
        );
        cache.resume(1);
        cache
    }

    #[test]
    fn overlaps_in_etcd_encoding() {
        let from = |k: &str| KeyRange::new(Bytes::from(k.to_owned()), Bytes::from_static(&[0]));
        let span =
            |a: &str, b: &str| KeyRange::new(Bytes::from(a.to_owned()), Bytes::from(b.to_owned()));
        assert!(key("a").overlaps(&key("a")));
        assert!(!key("a").overlaps(&key("b")));
        assert!(from("b").overlaps(&key("z")));
        assert!(!from("b").overlaps(&key("a")));
        assert!(span("a", "c").overlaps(&key("b")));
        assert!(!span("a", "c").overlaps(&key("c")));
        assert!(KeyRange::everything().overlaps(&key("\u{1}")));
    }

    #[test]
    fn a_change_drops_what_it_touches() {
        let c = cache(10);
        c.insert(None, &get("a"), &at(5));
        c.insert(None, &get("b"), &at(5));
        c.changed(6, key("a"));
        assert!(c.get(None, &get("a")).is_none());
        assert_eq!(c.get(None, &get("b")).map(|r| r.count), Some(5));
    }

    #[test]
    fn a_response_older_than_a_known_change_is_not_stored() {
        let c = cache(10);
        c.changed(7, key("a"));
        c.insert(None, &get("a"), &at(6));
        assert!(c.get(None, &get("a")).is_none());
        c.insert(None, &get("a"), &at(7));
        assert!(c.get(None, &get("a")).is_some());
    }

    #[test]
    fn identities_do_not_share_entries() {
        let c = cache(10);
        c.insert(Some(b"alice"), &get("a"), &at(5));
        assert!(c.get(Some(b"bob"), &get("a")).is_none());
        assert!(c.get(None, &get("a")).is_none());
        assert!(c.get(Some(b"alice"), &get("a")).is_some());
    }

    #[test]
    fn least_recently_used_goes_first() {
        let c = cache(2);
        c.insert(None, &get("a"), &at(5));
        c.insert(None, &get("b"), &at(5));
        assert!(c.get(None, &get("a")).is_some());
        c.insert(None, &get("c"), &at(5));
        assert!(c.get(None, &get("b")).is_none());
        assert!(c.get(None, &get("a")).is_some());
        assert!(c.get(None, &get("c")).is_some());
    }

    #[test]
    fn nothing_is_served_while_suspended_or_from_before_a_resume() {
        let c = cache(10);
        c.insert(None, &get("a"), &at(5));
        c.suspend();
        assert!(c.get(None, &get("a")).is_none());
        c.insert(None, &get("a"), &at(6));
        c.resume(8);
        c.insert(None, &get("a"), &at(7));
        assert!(c.get(None, &get("a")).is_none());
        c.insert(None, &get("a"), &at(8));
        assert!(c.get(None, &get("a")).is_some());
    }

    #[tokio::test]
    async fn waiting_for_an_unseen_revision_times_out_into_suspension() {
        let c = cache(10);
        c.insert(None, &get("a"), &at(1));
        c.advance(3);
        c.wait_seen(3).await;
        assert!(c.get(None, &get("a")).is_some());
        tokio::time::pause();
        c.wait_seen(4).await;
        assert!(c.get(None, &get("a")).is_none());
    }
}
