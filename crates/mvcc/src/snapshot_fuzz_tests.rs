//! Untrusted bytes through [`Store::restore_snapshot`]: random bytes, a
//! real snapshot mutated (bytes flipped, cut, lengths made huge) with its
//! checksum put right or not, and streams of well-framed records of random
//! content with a right checksum, so the checks past the checksum are
//! reached. The restore returns an error and leaves the store as it was,
//! or succeeds; either way nothing panics, a length of 4 GiB allocates
//! nothing like it, and the store then reads, hashes, snapshots and writes
//! without a panic. `make fuzz` runs many more cases.

use std::sync::LazyLock;

use cairn_api::etcdserverpb::{RangeRequest, RangeResponse};
use cairn_api::mvccpb::KeyValue;
use proptest::prelude::*;
use prost::Message as _;
use tempfile::TempDir;

use crate::tests::{op, put_req, range_req};
use crate::{MvccError, Store};
use cairn_api::etcdserverpb::request_op::Request;
use cairn_api::etcdserverpb::{DeleteRangeRequest, TxnRequest};

/// A store with a little of everything (revisions, a compaction, a
/// deletion, a lease and a state record), in a directory removed with it:
/// a fresh one per case, so that nothing accumulates over a long run.
struct Fixture {
    // Dropped in this order: the store before its directory.
    store: Store,
    _dir: TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        // Each restore syncs: in memory, where there is one, they cost little.
        let dir = tempfile::tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .expect("a temp dir");
        let store = Store::open(dir.path()).expect("a store");
        let mut batch = store.write();
        for (key, value) in [("a", "1"), ("b", "2"), ("c", "3")] {
            batch.put(&put_req(key, value)).expect("put");
        }
        batch.commit(1).expect("commit");
        let mut batch = store.write();
        batch
            .txn(&TxnRequest {
                success: vec![
                    op(Request::RequestPut(put_req("a", "4"))),
                    op(Request::RequestDeleteRange(DeleteRangeRequest {
                        key: "b".into(),
                        ..Default::default()
                    })),
                ],
                ..Default::default()
            })
            .expect("txn");
        batch.put_lease(7, b"lease record".to_vec());
        batch.put_state_record(b"state/x".to_vec(), b"y".to_vec());
        batch.commit(2).expect("commit");
        let mut batch = store.write();
        batch.compact(2).expect("compact");
        batch.put(&put_req("d", "5")).expect("put");
        batch.commit(3).expect("commit");
        Fixture { store, _dir: dir }
    }
}

/// The snapshot of a fixture's content, taken once.
static BASE: LazyLock<Vec<u8>> = LazyLock::new(|| {
    let mut base = Vec::new();
    Fixture::new()
        .store
        .write_snapshot(&mut base)
        .expect("a snapshot");
    base
});

/// What a reader can tell of a store, or the error's text.
fn view(store: &Store) -> (i64, i64, u64, Result<RangeResponse, String>) {
    (
        store.current_revision(),
        store.compact_revision(),
        store.applied_index(),
        store.range(&range_req("", "\0")).map_err(|e| e.to_string()),
    )
}

/// Restores `input` into a fresh fixture; a failure must leave the store
/// as it was, a success must leave one that answers without panicking.
fn restore(input: &[u8]) -> Result<(), TestCaseError> {
    let fixture = Fixture::new();
    let store = &fixture.store;
    let before = view(store);
    match store.restore_snapshot(&mut &input[..]) {
        Ok(()) => use_restored(store),
        Err(MvccError::InvalidSnapshot(_) | MvccError::Corrupt(_)) => {
            prop_assert_eq!(view(store), before, "a failed restore changed the store");
        }
        Err(e) => return Err(TestCaseError::fail(format!("not a refusal: {e}"))),
    }
    Ok(())
}

/// Everything a member does with a store, on a restored one: errors are
/// fine, panics are not.
fn use_restored(store: &Store) {
    let current = store.current_revision();
    let compact = store.compact_revision();
    for revision in [
        0,
        1,
        compact,
        compact.saturating_add(1),
        current,
        current.saturating_sub(1),
    ] {
        let _ = store.range(&RangeRequest {
            revision,
            ..range_req("", "\0")
        });
        let _ = store.range(&RangeRequest {
            revision,
            count_only: true,
            ..range_req("a", "")
        });
    }
    let _ = store.events_since(b"", b"\0", compact.saturating_add(1).max(1), 100);
    let _ = store.hash_kv(0);
    let _ = store.leases();
    let _ = store.leased_keys();
    let _ = store.state_records(b"");
    let mut out = Vec::new();
    let _ = store.write_snapshot(&mut out);
    let mut batch = store.write();
    if batch.put(&put_req("a", "after")).is_ok() {
        let _ = batch.commit(store.applied_index().saturating_add(1));
    }
}

/// Sets the last four bytes to the CRC-32 of everything before them.
fn fix_crc(bytes: &mut [u8]) {
    if bytes.len() >= 4 {
        let (body, crc) = bytes.split_at_mut(bytes.len() - 4);
        crc.copy_from_slice(&crc32fast::hash(body).to_be_bytes());
    }
}

/// A change to a byte string.
#[derive(Debug, Clone)]
enum Mutation {
    Flip {
        at: usize,
        bit: u8,
    },
    Set {
        at: usize,
        byte: u8,
    },
    /// Four bytes at `at` become a huge big-endian length.
    HugeLength {
        at: usize,
        len: u32,
    },
    Cut {
        at: usize,
    },
    Insert {
        at: usize,
        bytes: Vec<u8>,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Set { at, byte }),
        (
            any::<usize>(),
            prop_oneof![Just(u32::MAX), Just(1 << 31), Just(1 << 30), any::<u32>()]
        )
            .prop_map(|(at, len)| Mutation::HugeLength { at, len }),
        any::<usize>().prop_map(|at| Mutation::Cut { at }),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
    ]
}

fn mutate(bytes: &mut Vec<u8>, mutation: &Mutation) {
    if bytes.is_empty() {
        return;
    }
    let len = bytes.len();
    match mutation {
        Mutation::Flip { at, bit } => bytes[at % len] ^= 1 << bit,
        Mutation::Set { at, byte } => bytes[at % len] = *byte,
        Mutation::HugeLength { at, len: huge } => {
            let at = at % len;
            let end = (at + 4).min(len);
            bytes[at..end].copy_from_slice(&huge.to_be_bytes()[..end - at]);
        }
        Mutation::Cut { at } => bytes.truncate(at % len),
        Mutation::Insert { at, bytes: more } => {
            let at = at % (len + 1);
            bytes.splice(at..at, more.iter().copied());
        }
    }
}

/// A revision key: main revisions around the edges a store can meet.
fn rev_key() -> impl Strategy<Value = [u8; 16]> {
    (
        prop_oneof![
            0i64..12,
            Just(-1i64),
            Just(i64::MIN),
            Just(i64::MAX),
            Just(i64::MAX - 1)
        ],
        prop_oneof![0u64..3, Just(u64::from(u32::MAX)), Just(u64::MAX)],
    )
        .prop_map(|(main, sub)| {
            let mut key = [0; 16];
            key[..8].copy_from_slice(&main.to_be_bytes());
            key[8..].copy_from_slice(&sub.to_be_bytes());
            key
        })
}

fn small_or_edge() -> impl Strategy<Value = i64> {
    prop_oneof![
        0i64..12,
        Just(-1i64),
        Just(i64::MIN),
        Just(i64::MAX),
        any::<i64>()
    ]
}

/// A stored value: a flag byte and a KeyValue of fields near the edges,
/// or random bytes.
fn stored_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => (
            0u8..3,
            prop::collection::vec(prop_oneof![Just(b'a'), Just(b'b'), Just(0u8), Just(0xff)], 0..3),
            small_or_edge(),
            small_or_edge(),
            small_or_edge(),
            small_or_edge(),
            prop::collection::vec(any::<u8>(), 0..8),
        )
            .prop_map(|(flag, key, create, modified, version, lease, value)| {
                let kv = KeyValue {
                    key: key.into(),
                    create_revision: create,
                    mod_revision: modified,
                    version,
                    value: value.into(),
                    lease,
                };
                let mut out = vec![flag];
                out.extend(kv.encode_to_vec());
                out
            }),
        1 => prop::collection::vec(any::<u8>(), 0..24),
    ]
}

/// One record of a snapshot, framed as `write_snapshot` frames them.
fn record() -> impl Strategy<Value = Vec<u8>> {
    let entry = (rev_key(), stored_value()).prop_map(|(key, value)| {
        let mut out = vec![1];
        out.extend(key);
        out.extend((value.len() as u32).to_be_bytes());
        out.extend(value);
        out
    });
    let lease =
        (small_or_edge(), prop::collection::vec(any::<u8>(), 0..16)).prop_map(|(id, record)| {
            let mut out = vec![2];
            out.extend(id.to_be_bytes());
            out.extend((record.len() as u32).to_be_bytes());
            out.extend(record);
            out
        });
    let state = (
        prop::collection::vec(any::<u8>(), 0..8),
        prop::collection::vec(any::<u8>(), 0..8),
    )
        .prop_map(|(key, value)| {
            let mut out = vec![3];
            out.extend((key.len() as u32).to_be_bytes());
            out.extend(key);
            out.extend((value.len() as u32).to_be_bytes());
            out.extend(value);
            out
        });
    prop_oneof![6 => entry, 1 => lease, 1 => state]
}

/// A whole snapshot of random records, sorted by revision key or not, with
/// the right count and checksum, or the count off by one.
fn snapshot() -> impl Strategy<Value = Vec<u8>> {
    (
        any::<u64>(),
        prop_oneof![Just(-1i64), 0i64..12, Just(i64::MAX), Just(-2i64)],
        prop::collection::vec(record(), 0..12),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(applied, compact, mut records, sorted, count_right)| {
            if sorted {
                // Entries by their revision key, the others where they fall.
                records.sort_by(|a, b| (a[0] != 1, a.get(1..17)).cmp(&(b[0] != 1, b.get(1..17))));
            }
            let mut out = b"CAIRNMVC".to_vec();
            out.extend(1u32.to_be_bytes());
            out.extend(applied.to_be_bytes());
            out.extend(compact.to_be_bytes());
            let count = records.len() as u64 + u64::from(!count_right);
            for record in records {
                out.extend(record);
            }
            out.push(0);
            out.extend(count.to_be_bytes());
            out.extend([0; 4]);
            fix_crc(&mut out);
            out
        })
}

proptest! {
    #[test]
    fn random_bytes_restore_never_panic(
        magic in any::<bool>(),
        tail in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        let mut input = if magic { b"CAIRNMVC\0\0\0\x01".to_vec() } else { Vec::new() };
        input.extend(tail);
        restore(&input)?;
    }

    #[test]
    fn a_mutated_snapshot_restore_never_panic(
        mutations in prop::collection::vec(mutation(), 1..4),
        crc_right in any::<bool>(),
    ) {
        let mut input = BASE.clone();
        for mutation in &mutations {
            mutate(&mut input, mutation);
        }
        if crc_right {
            fix_crc(&mut input);
        }
        restore(&input)?;
    }

    #[test]
    fn random_records_restore_never_panic(input in snapshot()) {
        restore(&input)?;
    }
}

#[test]
fn the_base_snapshot_restores() -> crate::tests::Result {
    let fixture = Fixture::new();
    fixture.store.restore_snapshot(&mut &BASE[..])?;
    let values: Vec<_> = fixture
        .store
        .range(&range_req("", "\0"))?
        .kvs
        .into_iter()
        .map(|kv| (kv.key, kv.value))
        .collect();
    assert_eq!(
        values,
        vec![
            ("a".into(), "4".into()),
            ("c".into(), "3".into()),
            ("d".into(), "5".into())
        ]
    );
    Ok(())
}

/// A snapshot of one put of `a` at revision `main`, compacted at
/// `compact`, with a right checksum.
fn one_entry(main: i64, compact: i64) -> Vec<u8> {
    let kv = KeyValue {
        key: "a".into(),
        create_revision: main,
        mod_revision: main,
        version: 1,
        value: "v".into(),
        lease: 0,
    };
    let mut value = vec![0];
    value.extend(kv.encode_to_vec());
    let mut out = b"CAIRNMVC".to_vec();
    out.extend(1u32.to_be_bytes());
    out.extend(9u64.to_be_bytes());
    out.extend(compact.to_be_bytes());
    out.push(1);
    out.extend(main.to_be_bytes());
    out.extend(0u64.to_be_bytes());
    out.extend((value.len() as u32).to_be_bytes());
    out.extend(value);
    out.push(0);
    out.extend(1u64.to_be_bytes());
    out.extend([0; 4]);
    fix_crc(&mut out);
    out
}

/// Found by the harness above: a snapshot whose revision left no room
/// for the next restored, and a watch catching up then overflowed.
#[test]
fn revisions_a_store_cannot_continue_from_are_refused() -> crate::tests::Result {
    let fixture = Fixture::new();
    let store = &fixture.store;
    store.restore_snapshot(&mut &one_entry(5, -1)[..])?;
    assert_eq!(store.current_revision(), 5);
    for (main, compact) in [(i64::MAX, -1), (0, -1), (-3, -1), (5, i64::MAX)] {
        match store.restore_snapshot(&mut &one_entry(main, compact)[..]) {
            Err(MvccError::InvalidSnapshot(_)) => {}
            other => panic!("revision {main}, compacted at {compact}: {other:?}"),
        }
        assert_eq!(store.current_revision(), 5);
    }
    Ok(())
}

/// Found by the random-records harness (`make fuzz`, 20,000 cases): a state
/// record with an empty key, checksum right, made fjall panic when the
/// restore switched to it; one over 64 KiB would have too.
#[test]
fn state_records_with_keys_fjall_cannot_hold_are_refused() -> crate::tests::Result {
    let fixture = Fixture::new();
    let store = &fixture.store;
    store.restore_snapshot(&mut &one_entry(5, -1)[..])?;
    for key_len in [0usize, usize::from(u16::MAX) + 1] {
        let mut out = b"CAIRNMVC".to_vec();
        out.extend(1u32.to_be_bytes());
        out.extend(9u64.to_be_bytes());
        out.extend((-1i64).to_be_bytes());
        out.push(3);
        out.extend((key_len as u32).to_be_bytes());
        out.extend(vec![b'k'; key_len]);
        out.extend(1u32.to_be_bytes());
        out.push(b'v');
        out.push(0);
        out.extend(1u64.to_be_bytes());
        out.extend([0; 4]);
        fix_crc(&mut out);
        match store.restore_snapshot(&mut &out[..]) {
            Err(MvccError::InvalidSnapshot(_)) => {}
            other => panic!("a state key of {key_len} bytes: {other:?}"),
        }
        assert_eq!(store.current_revision(), 5);
    }
    Ok(())
}
