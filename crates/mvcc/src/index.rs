//! The in-memory key index: every key's revisions, in ascending order, so a
//! read at any revision is a lookup here plus point reads of the revisions
//! keyspace.

use std::collections::BTreeMap;
use std::ops::Bound;

use bytes::Bytes;
use cairn_api::mvccpb::KeyValue;

/// etcd's revision before the first write.
pub(crate) const INITIAL_REVISION: i64 = 1;
/// The compact revision of a store never compacted; etcd's too, which makes
/// `compact(0)` valid on a new store.
pub(crate) const NEVER_COMPACTED: i64 = -1;

/// One change of a key: a put or a tombstone, at (main, sub).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Rev {
    pub(crate) main: i64,
    /// u32 keeps `Rev` at 16 bytes; no request changes 2^32 keys.
    pub(crate) sub: u32,
    pub(crate) tombstone: bool,
}

/// A key's revisions in ascending order. Most keys have one revision after a
/// compaction, so that case lives inline instead of in a heap vector.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum KeyHistory {
    One(Rev),
    Many(Vec<Rev>),
}

impl KeyHistory {
    /// The history of `revs`, which must be in ascending order; `None` if
    /// empty.
    pub(crate) fn of(mut revs: Vec<Rev>) -> Option<KeyHistory> {
        match revs[..] {
            [] => None,
            [only] => Some(KeyHistory::One(only)),
            _ => {
                revs.shrink_to_fit();
                Some(KeyHistory::Many(revs))
            }
        }
    }

    pub(crate) fn revs(&self) -> &[Rev] {
        match self {
            KeyHistory::One(rev) => std::slice::from_ref(rev),
            KeyHistory::Many(revs) => revs,
        }
    }

    fn push(&mut self, rev: Rev) {
        match self {
            KeyHistory::One(first) => *self = KeyHistory::Many(vec![*first, rev]),
            KeyHistory::Many(revs) => revs.push(rev),
        }
    }

    /// The revision holding the key's value at `main`, unless the key did
    /// not exist then.
    pub(crate) fn live_at(&self, main: i64) -> Option<Rev> {
        let revs = self.revs();
        let upto = revs.partition_point(|r| r.main <= main);
        upto.checked_sub(1)
            .and_then(|i| revs.get(i))
            .filter(|r| !r.tombstone)
            .copied()
    }

    /// Drops every revision below the newest one at or below `at`, and that
    /// one too if it is a tombstone. Returns whether nothing is left.
    fn compact(&mut self, at: i64, dropped: &mut Vec<Rev>) -> bool {
        let revs = self.revs();
        let upto = revs.partition_point(|r| r.main <= at);
        let Some(newest) = upto.checked_sub(1).and_then(|i| revs.get(i)) else {
            return false;
        };
        let cut = if newest.tombstone { upto } else { upto - 1 };
        if cut == 0 {
            return false;
        }
        dropped.extend_from_slice(&revs[..cut]);
        match self {
            KeyHistory::One(_) => true,
            KeyHistory::Many(revs) => {
                revs.drain(..cut);
                match revs[..] {
                    [] => return true,
                    // Back inline: frees the vector of a key compacted down
                    // to its newest revision, the common case.
                    [only] => *self = KeyHistory::One(only),
                    // A hot key's vector may have grown far past what is left.
                    _ => revs.shrink_to_fit(),
                }
                false
            }
        }
    }
}

/// What a key's newest put stored of its generation, and its lease. A put
/// continues the generation from here instead of reading the stored value
/// back; the lessor finds the keys of its leases here at start instead of
/// reading every value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Generation {
    pub(crate) created: i64,
    pub(crate) version: i64,
    pub(crate) lease: i64,
}

impl Generation {
    pub(crate) fn of(kv: &KeyValue) -> Generation {
        Generation {
            created: kv.create_revision,
            version: kv.version,
            lease: kv.lease,
        }
    }
}

/// One key of the index.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct IndexedKey {
    pub(crate) history: KeyHistory,
    /// Meaningful while the newest revision is a put.
    pub(crate) generation: Generation,
}

impl IndexedKey {
    /// The key's generation at the head, unless its newest change deleted it.
    pub(crate) fn live_generation(&self) -> Option<Generation> {
        let newest = self.history.revs().last()?;
        (!newest.tombstone).then_some(self.generation)
    }
}

/// The committed state readers see: the key index with the revisions it
/// describes.
///
/// Keys are boxed slices rather than `Bytes`: half the size in every slot of
/// the tree, and no shared header allocated the first time a read clones one
/// (docs/performance.md has the cost per key).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Index {
    pub(crate) keys: BTreeMap<Box<[u8]>, IndexedKey>,
    pub(crate) current: i64,
    pub(crate) compact: i64,
}

impl Index {
    pub(crate) fn new() -> Index {
        Index {
            keys: BTreeMap::new(),
            current: INITIAL_REVISION,
            compact: NEVER_COMPACTED,
        }
    }

    /// Appends a revision newer than any the key has; `generation` is what
    /// it stored (anything for a tombstone).
    pub(crate) fn push(&mut self, key: &[u8], rev: Rev, generation: Generation) {
        match self.keys.get_mut(key) {
            Some(indexed) => {
                indexed.history.push(rev);
                indexed.generation = generation;
            }
            // A copy, so the index never pins a larger buffer the key was
            // sliced from (a request, a decoded entry).
            None => {
                let indexed = IndexedKey {
                    history: KeyHistory::One(rev),
                    generation,
                };
                self.keys.insert(key.into(), indexed);
            }
        }
    }

    /// As [`push`](Index::push), unless the key already has `rev` or a newer
    /// one: a checkpoint's keys were read at or after the revision its tail
    /// starts from, so the tail repeats some of their revisions.
    pub(crate) fn push_newer(&mut self, key: &[u8], rev: Rev, generation: Generation) {
        let known = self
            .keys
            .get(key)
            .and_then(|k| k.history.revs().last())
            .is_some_and(|last| (last.main, last.sub) >= (rev.main, rev.sub));
        if !known {
            self.push(key, rev, generation);
        }
    }

    /// Applies a compaction at `at`; returns the revisions to delete from
    /// storage.
    pub(crate) fn compact(&mut self, at: i64) -> Vec<Rev> {
        let mut dropped = Vec::new();
        self.keys
            .retain(|_, indexed| !indexed.history.compact(at, &mut dropped));
        dropped
    }
}

/// Which keys a request names, decoded from etcd's `key`/`range_end` pair.
#[derive(Clone, Copy, Debug)]
pub(crate) enum KeyRange<'a> {
    /// Empty `range_end`: the key alone.
    Single(&'a [u8]),
    /// `range_end` of one zero byte: every key from `key` on.
    From(&'a [u8]),
    /// `[key, range_end)`, with `key < range_end`.
    Between(&'a [u8], &'a [u8]),
    /// `range_end <= key`: nothing.
    Empty,
}

impl<'a> KeyRange<'a> {
    pub(crate) fn new(key: &'a [u8], range_end: &'a [u8]) -> KeyRange<'a> {
        match range_end {
            [] => KeyRange::Single(key),
            [0] => KeyRange::From(key),
            end if key < end => KeyRange::Between(key, end),
            _ => KeyRange::Empty,
        }
    }

    /// Whether `key` is one the range names.
    pub(crate) fn contains(&self, key: &[u8]) -> bool {
        match *self {
            KeyRange::Single(k) => key == k,
            KeyRange::From(start) => key >= start,
            KeyRange::Between(start, end) => key >= start && key < end,
            KeyRange::Empty => false,
        }
    }
}

/// A write of the open batch, not yet in the index or storage.
#[derive(Clone, Debug)]
pub(crate) struct PendingRev {
    pub(crate) rev: Rev,
    pub(crate) kv: KeyValue,
}

/// The open batch's writes by key, each key's in ascending revision order.
pub(crate) type Pending = BTreeMap<Bytes, Vec<PendingRev>>;

/// A key live at the read revision, and where its value is.
#[derive(Debug)]
pub(crate) struct Located {
    pub(crate) key: Bytes,
    pub(crate) at: At,
}

#[derive(Debug)]
pub(crate) enum At {
    Stored(Rev),
    Pending(KeyValue),
}

/// Finds the keys of `range` live at revision `rev`, in key order, over the
/// committed index overlaid with `pending` (whose revisions are all newer).
/// Returns how many there are and the first `keep` of them.
pub(crate) fn collect(
    index: &Index,
    pending: &Pending,
    range: KeyRange<'_>,
    rev: i64,
    keep: usize,
) -> (usize, Vec<Located>) {
    let mut count = 0;
    let mut kept = Vec::new();
    let mut visit = |key: &[u8], indexed: Option<&IndexedKey>, writes: Option<&Vec<PendingRev>>| {
        let newest_pending = writes.and_then(|w| w.iter().rev().find(|p| p.rev.main <= rev));
        let at = match newest_pending {
            Some(p) if p.rev.tombstone => None,
            Some(p) => Some(Located {
                key: p.kv.key.clone(),
                at: At::Pending(p.kv.clone()),
            }),
            None => indexed
                .and_then(|i| i.history.live_at(rev))
                .map(|r| Located {
                    key: Bytes::copy_from_slice(key),
                    at: At::Stored(r),
                }),
        };
        if let Some(found) = at {
            if count < keep {
                kept.push(found);
            }
            count += 1;
        }
    };
    let bounds: (Bound<&[u8]>, Bound<&[u8]>) = match range {
        KeyRange::Empty => return (0, kept),
        KeyRange::Single(key) => {
            let committed = index.keys.get_key_value(key);
            let written = pending.get_key_value(key);
            if let Some(k) = committed
                .map(|(k, _)| &k[..])
                .or(written.map(|(k, _)| &k[..]))
            {
                visit(k, committed.map(|(_, h)| h), written.map(|(_, w)| w));
            }
            return (count, kept);
        }
        KeyRange::From(key) => (Bound::Included(key), Bound::Unbounded),
        KeyRange::Between(key, end) => (Bound::Included(key), Bound::Excluded(end)),
    };
    let mut committed = index.keys.range::<[u8], _>(bounds).peekable();
    let mut written = pending.range::<[u8], _>(bounds).peekable();
    loop {
        let order = match (committed.peek(), written.peek()) {
            (None, None) => break,
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some((a, _)), Some((b, _))) => a[..].cmp(&b[..]),
        };
        match order {
            std::cmp::Ordering::Less => {
                if let Some((k, h)) = committed.next() {
                    visit(k, Some(h), None);
                }
            }
            std::cmp::Ordering::Greater => {
                if let Some((k, w)) = written.next() {
                    visit(k, None, Some(w));
                }
            }
            std::cmp::Ordering::Equal => {
                if let (Some((k, h)), Some((_, w))) = (committed.next(), written.next()) {
                    visit(k, Some(h), Some(w));
                }
            }
        }
    }
    (count, kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(main: i64, sub: u32) -> Rev {
        Rev {
            main,
            sub,
            tombstone: false,
        }
    }

    fn tomb(main: i64, sub: u32) -> Rev {
        Rev {
            main,
            sub,
            tombstone: true,
        }
    }

    fn history(revs: &[Rev]) -> KeyHistory {
        let mut h = KeyHistory::One(revs[0]);
        for &r in &revs[1..] {
            h.push(r);
        }
        h
    }

    #[test]
    fn live_at_follows_puts_and_tombstones() {
        let h = history(&[put(2, 0), tomb(4, 0), put(4, 1), tomb(6, 0), put(8, 0)]);
        assert_eq!(h.live_at(1), None);
        assert_eq!(h.live_at(3), Some(put(2, 0)));
        // A delete and a put of one txn: the put (higher sub) wins.
        assert_eq!(h.live_at(4), Some(put(4, 1)));
        assert_eq!(h.live_at(6), None);
        assert_eq!(h.live_at(7), None);
        assert_eq!(h.live_at(100), Some(put(8, 0)));
    }

    #[test]
    fn compaction_keeps_the_newest_revision_unless_deleted() {
        let mut dropped = Vec::new();
        let mut h = history(&[put(2, 0), put(3, 0), tomb(5, 0), put(7, 0)]);
        assert!(!h.compact(1, &mut dropped));
        assert!(dropped.is_empty());
        assert!(!h.compact(3, &mut dropped));
        assert_eq!(dropped, [put(2, 0)]);
        assert!(!h.compact(6, &mut dropped));
        assert_eq!(dropped, [put(2, 0), put(3, 0), tomb(5, 0)]);
        assert!(matches!(h, KeyHistory::One(r) if r == put(7, 0)));

        let mut h = history(&[put(2, 0), tomb(3, 0)]);
        assert!(h.compact(3, &mut dropped));
        let mut h = KeyHistory::One(tomb(3, 0));
        assert!(h.compact(4, &mut dropped));
        let mut h = KeyHistory::One(put(3, 0));
        assert!(!h.compact(4, &mut dropped));
    }

    #[test]
    fn key_range_forms() {
        assert!(matches!(KeyRange::new(b"a", b""), KeyRange::Single(b"a")));
        assert!(matches!(KeyRange::new(b"a", b"\0"), KeyRange::From(b"a")));
        assert!(matches!(
            KeyRange::new(b"a", b"b"),
            KeyRange::Between(b"a", b"b")
        ));
        assert!(matches!(KeyRange::new(b"b", b"b"), KeyRange::Empty));
        assert!(matches!(KeyRange::new(b"b", b"a"), KeyRange::Empty));
    }
}
