//! Tests of writing and restoring snapshots of the whole store.

use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};

use cairn_api::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use cairn_api::etcdserverpb::request_op::Request;
use cairn_api::etcdserverpb::{Compare, PutRequest, RangeRequest, RangeResponse, TxnRequest};
use fjall::KeyspaceCreateOptions;

use crate::tests::{Result, b, del_req, op, open, put_all, put_req, range_req, values};
use crate::{MvccError, Store};

fn snapshot(store: &Store) -> Result<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    let applied = store.write_snapshot(&mut out)?;
    Ok((applied, out))
}

fn restore(store: &Store, bytes: &[u8]) -> Result {
    store.restore_snapshot(&mut &bytes[..])
}

/// Every key at `revision`, or the error's message.
fn view(store: &Store, revision: i64) -> std::result::Result<RangeResponse, String> {
    store
        .range(&RangeRequest {
            revision,
            ..range_req("", "\0")
        })
        .map_err(|e| e.to_string())
}

/// What a reader can tell about a store: its revisions, applied index, and
/// every key at every revision (the compacted ones and one past the current
/// give their errors).
fn views(
    store: &Store,
) -> (
    i64,
    i64,
    u64,
    Vec<std::result::Result<RangeResponse, String>>,
) {
    let current = store.current_revision();
    (
        current,
        store.compact_revision(),
        store.applied_index(),
        (0..=current + 1).map(|rev| view(store, rev)).collect(),
    )
}

/// The stored revisions as raw (key, value) pairs.
fn stored(store: &Store) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let revisions = store.inner.state.read().revisions.clone();
    revisions
        .iter()
        .map(|entry| {
            let (k, v) = entry.into_inner()?;
            Ok((k.to_vec(), v.to_vec()))
        })
        .collect()
}

/// The revisions keyspaces in the store's database.
fn revisions_keyspaces(store: &Store) -> Vec<String> {
    let mut names: Vec<String> = store
        .inner
        .db
        .list_keyspace_names()
        .iter()
        .filter(|n| n.starts_with("revisions"))
        .map(|n| n.to_string())
        .collect();
    names.sort();
    names
}

fn err(e: impl std::fmt::Display) -> MvccError {
    MvccError::Corrupt(e.to_string())
}

/// Puts, deletes, txns (several changes at one revision), a compaction and
/// writes after it: current revision 13, compact revision 5, applied 9.
fn fill_source(store: &Store) -> Result {
    put_all(store, &[("a", "1"), ("b", "1"), ("c", "1")])?;
    let mut batch = store.write();
    batch.delete_range(&del_req("b", "", false))?;
    batch.txn(&TxnRequest {
        success: vec![
            op(Request::RequestPut(put_req("a", "2"))),
            op(Request::RequestDeleteRange(del_req("c", "", false))),
            op(Request::RequestPut(put_req("d", "1"))),
        ],
        ..Default::default()
    })?;
    batch.put(&put_req("e", "1"))?;
    batch.commit(2)?;
    let mut batch = store.write();
    batch.compact(5)?;
    batch.put(&put_req("a", "3"))?;
    batch.commit(3)?;
    let mut batch = store.write();
    batch.delete_range(&del_req("a", "\0", true))?;
    batch.put(&put_req("b", "2"))?;
    batch.put(&PutRequest {
        lease: 7,
        ..put_req("f", "1")
    })?;
    batch.commit(5)?;
    let mut batch = store.write();
    batch.put(&put_req("a", "4"))?;
    batch.txn(&TxnRequest {
        compare: vec![Compare {
            result: CompareResult::Equal as i32,
            target: CompareTarget::Value as i32,
            key: b("a"),
            range_end: b(""),
            target_union: Some(TargetUnion::Value(b("nope"))),
        }],
        success: vec![op(Request::RequestPut(put_req("never", "1")))],
        failure: vec![op(Request::RequestPut(put_req("g", "1")))],
    })?;
    batch.commit(9)?;
    assert_eq!(
        (
            store.current_revision(),
            store.compact_revision(),
            store.applied_index()
        ),
        (13, 5, 9)
    );
    Ok(())
}

/// Other content: more revisions than the source, compacted further.
fn fill_other(store: &Store) -> Result {
    for i in 0..20 {
        put_all(store, &[("x", &i.to_string()), ("y", "1")])?;
    }
    let mut batch = store.write();
    batch.compact(30)?;
    batch.commit(100)?;
    Ok(())
}

#[test]
fn restore_replaces_other_content_with_the_snapshot() -> Result {
    let (_a, source) = open()?;
    fill_source(&source)?;
    let (applied, bytes) = snapshot(&source)?;
    assert_eq!(applied, 9);

    let (dir, target) = open()?;
    fill_other(&target)?;
    restore(&target, &bytes)?;
    assert_eq!(views(&target), views(&source));
    assert_eq!(
        (target.current_revision(), target.compact_revision()),
        (13, 5)
    );
    assert_eq!(target.applied_index(), 9);
    // Every stored revision, tombstones too, byte for byte.
    assert_eq!(stored(&target)?, stored(&source)?);
    assert_eq!(snapshot(&target)?, (applied, bytes.clone()));
    assert_eq!(target.size().in_use, source.size().in_use);
    assert_eq!(revisions_keyspaces(&target), ["revisions-1"]);

    // Both go on alike.
    for store in [&source, &target] {
        let mut batch = store.write();
        batch.put(&put_req("a", "5"))?;
        batch.delete_range(&del_req("f", "", false))?;
        batch.compact(12)?;
        batch.commit(10)?;
    }
    assert_eq!(views(&target), views(&source));

    drop(target);
    let target = Store::open(dir.path())?;
    assert_eq!(views(&target), views(&source));
    assert_eq!(stored(&target)?, stored(&source)?);
    assert_eq!(revisions_keyspaces(&target), ["revisions-1"]);

    // A second restore, onto a restored store, then a reopen.
    let (_c, other) = open()?;
    fill_other(&other)?;
    restore(&target, &snapshot(&other)?.1)?;
    assert_eq!(views(&target), views(&other));
    drop(target);
    let target = Store::open(dir.path())?;
    assert_eq!(views(&target), views(&other));
    assert_eq!(revisions_keyspaces(&target), ["revisions-2"]);
    Ok(())
}

#[test]
fn empty_and_fully_compacted_stores_round_trip() -> Result {
    let (_a, empty) = open()?;
    let (_b, target) = open()?;
    fill_source(&target)?;
    restore(&target, &snapshot(&empty)?.1)?;
    assert_eq!(views(&target), views(&empty));
    assert_eq!(
        (target.current_revision(), target.compact_revision()),
        (1, 0)
    );

    // Every key deleted and compacted away: nothing is stored, and the
    // current revision comes from the compact revision.
    let (_c, gone) = open()?;
    put_all(&gone, &[("a", "1"), ("b", "1")])?;
    let mut batch = gone.write();
    batch.delete_range(&del_req("a", "\0", false))?;
    batch.compact(4)?;
    batch.commit(3)?;
    assert!(stored(&gone)?.is_empty());
    restore(&target, &snapshot(&gone)?.1)?;
    assert_eq!(views(&target), views(&gone));
    assert_eq!(
        (target.current_revision(), target.compact_revision()),
        (4, 4)
    );
    Ok(())
}

#[test]
fn a_snapshot_between_a_compaction_and_its_deletes_restores_compacted() -> Result {
    let (_a, source) = open()?;
    put_all(&source, &[("a", "1"), ("a", "2"), ("b", "1")])?;
    // As if the snapshot came after a compaction's commit, before its
    // revisions were deleted: a@2 is still stored.
    source
        .inner
        .meta
        .insert(crate::codec::COMPACT_REVISION, 3i64.to_be_bytes())?;
    let (_b, target) = open()?;
    restore(&target, &snapshot(&source)?.1)?;
    assert_eq!(
        (target.current_revision(), target.compact_revision()),
        (4, 3)
    );
    assert_eq!(stored(&target)?.len(), 2);
    assert_eq!(values(&target.range(&range_req("a", "\0"))?), ["2", "1"]);
    assert!(matches!(
        target.range(&RangeRequest {
            revision: 2,
            ..range_req("a", "")
        }),
        Err(MvccError::Compacted)
    ));
    Ok(())
}

#[test]
fn restore_reads_the_snapshot_and_nothing_after_it() -> Result {
    let (_a, source) = open()?;
    fill_source(&source)?;
    let (_, mut bytes) = snapshot(&source)?;
    bytes.extend_from_slice(b"next part");
    let (_b, target) = open()?;
    let mut input = &bytes[..];
    target.restore_snapshot(&mut input)?;
    assert_eq!(input, b"next part");
    assert_eq!(views(&target), views(&source));
    Ok(())
}

#[test]
fn a_damaged_snapshot_fails_and_leaves_the_store_intact() -> Result {
    let (_a, source) = open()?;
    fill_source(&source)?;
    let (_, good) = snapshot(&source)?;
    let (dir, target) = open()?;
    fill_other(&target)?;
    let before = views(&target);

    // Every cut and flip in the header, and a few through the first entry,
    // the middle and the end record (each restore that gets past the header
    // creates and deletes a keyspace, which takes a while).
    let n = good.len();
    let header = 28;
    let body = [
        header,
        header + 1,
        header + 5,
        header + 17,
        header + 21,
        header + 30,
    ];
    let tail = [n / 2, n - 13, n - 12, n - 5, n - 4, n - 1];
    let positions: Vec<usize> = (0..header).chain(body).chain(tail).collect();
    let mut damaged: Vec<(String, Vec<u8>)> = Vec::new();
    for &at in &positions {
        damaged.push((format!("cut to {at} bytes"), good[..at].to_vec()));
        let mut bytes = good.clone();
        bytes[at] ^= 0x20;
        damaged.push((format!("byte {at} flipped"), bytes));
    }
    let mut newer = good.clone();
    newer[11] = 2;
    damaged.push(("format version 2".into(), newer));

    for (what, bytes) in &damaged {
        match restore(&target, bytes) {
            Err(MvccError::InvalidSnapshot(_)) => {}
            other => panic!("{what}: {other:?}"),
        }
        assert_eq!(views(&target), before, "{what}");
    }
    assert_eq!(revisions_keyspaces(&target), ["revisions"]);
    match restore(&target, &damaged[damaged.len() - 1].1) {
        Err(e) => assert!(e.to_string().contains("version 2"), "{e}"),
        Ok(()) => panic!("format version 2 restored"),
    }

    // Still a working store, and still itself after a reopen.
    put_all(&target, &[("z", "1")])?;
    let after = views(&target);
    drop(target);
    let target = Store::open(dir.path())?;
    assert_eq!(views(&target), after);
    // And the good snapshot still restores.
    restore(&target, &good)?;
    assert_eq!(views(&target), views(&source));
    Ok(())
}

/// An input that fails with an I/O error after some bytes.
struct Failing<'a> {
    bytes: &'a [u8],
}

impl Read for Failing<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.bytes.is_empty() {
            return Err(std::io::Error::other("link down"));
        }
        self.bytes.read(buf)
    }
}

#[test]
fn an_input_error_fails_the_restore_and_leaves_the_store_intact() -> Result {
    let (_a, source) = open()?;
    fill_source(&source)?;
    let (_, good) = snapshot(&source)?;
    let (_b, target) = open()?;
    fill_other(&target)?;
    let before = views(&target);
    let mut input = Failing {
        bytes: &good[..good.len() / 2],
    };
    assert!(matches!(
        target.restore_snapshot(&mut input),
        Err(MvccError::Io(_))
    ));
    assert_eq!(views(&target), before);
    assert_eq!(revisions_keyspaces(&target), ["revisions"]);
    Ok(())
}

/// The compact revision after batch `applied - 1` of the writer below.
fn expected_compact(applied: u64) -> i64 {
    (0..applied)
        .rev()
        .find(|i| i % 5 == 4)
        .map_or(0, |i| 2 * i as i64 + 2)
}

#[test]
fn a_snapshot_taken_while_writes_commit_has_whole_batches() -> Result {
    const BATCHES: u64 = 200;
    let (_a, store) = open()?;
    let writer = {
        let store = store.clone();
        std::thread::spawn(move || -> Result {
            for i in 0..BATCHES {
                // Batch i writes revisions 2i+2 and 2i+3, both with value i,
                // and every fifth compacts at its first revision.
                let mut batch = store.write();
                batch.put(&put_req("a", &i.to_string()))?;
                batch.put(&put_req("b", &i.to_string()))?;
                if i % 5 == 4 {
                    batch.compact(batch.current_revision() - 1)?;
                }
                batch.commit(i + 1)?;
            }
            Ok(())
        })
    };
    let mut snapshots = Vec::new();
    while !writer.is_finished() {
        snapshots.push(snapshot(&store)?);
    }
    writer.join().map_err(|_| err("writer panicked"))??;
    snapshots.push(snapshot(&store)?);

    let (_b, target) = open()?;
    for (applied, bytes) in &snapshots {
        restore(&target, bytes)?;
        let applied = *applied;
        assert_eq!(target.applied_index(), applied);
        assert_eq!(target.current_revision(), 1 + 2 * applied as i64);
        assert_eq!(target.compact_revision(), expected_compact(applied));
        let all = target.range(&range_req("", "\0"))?;
        if applied == 0 {
            assert!(all.kvs.is_empty());
        } else {
            let last = (applied - 1).to_string();
            assert_eq!(values(&all), [last.clone(), last]);
        }
        // Every revision kept is readable.
        for rev in target.compact_revision().max(1)..=target.current_revision() {
            view(&target, rev).map_err(err)?;
        }
    }
    assert_eq!(views(&target), views(&store));
    Ok(())
}

#[test]
fn readers_during_a_restore_see_the_old_or_the_new_store() -> Result {
    let (_a, one) = open()?;
    fill_source(&one)?;
    let (_b, two) = open()?;
    fill_other(&two)?;
    let (one_applied, one_bytes) = snapshot(&one)?;
    let (two_applied, two_bytes) = snapshot(&two)?;
    let one_all = view(&one, 0).map_err(err)?;
    let two_all = view(&two, 0).map_err(err)?;

    let (_c, target) = open()?;
    restore(&target, &one_bytes)?;
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| -> Result {
        let mut readers = Vec::new();
        for _ in 0..2 {
            readers.push(s.spawn(|| -> Result<usize> {
                let mut reads = 0;
                while !stop.load(Ordering::Relaxed) {
                    let all = view(&target, 0).map_err(err)?;
                    assert!(all == one_all || all == two_all, "{all:?}");
                    reads += 1;
                }
                Ok(reads)
            }));
        }
        // A snapshot taken during a restore is of one store or the other.
        let snapshots = s.spawn(|| -> Result<usize> {
            let mut taken = 0;
            while !stop.load(Ordering::Relaxed) {
                let (applied, bytes) = snapshot(&target)?;
                if applied == one_applied {
                    assert!(bytes == one_bytes);
                } else {
                    assert_eq!(applied, two_applied);
                    assert!(bytes == two_bytes);
                }
                taken += 1;
            }
            Ok(taken)
        });
        let restored = (|| -> Result {
            for _ in 0..10 {
                restore(&target, &two_bytes)?;
                restore(&target, &one_bytes)?;
            }
            Ok(())
        })();
        stop.store(true, Ordering::Relaxed);
        restored?;
        for reader in readers {
            assert!(reader.join().map_err(|_| err("reader panicked"))?? > 0);
        }
        assert!(snapshots.join().map_err(|_| err("snapshots panicked"))?? > 0);
        Ok(())
    })?;
    assert_eq!(views(&target), views(&one));
    Ok(())
}

#[test]
fn open_deletes_keyspaces_a_crashed_restore_left() -> Result {
    let (dir, store) = open()?;
    fill_source(&store)?;
    let before = views(&store);
    // As if a crash came while a restore was filling its fresh keyspace.
    let fresh = store
        .inner
        .db
        .keyspace("revisions-1", KeyspaceCreateOptions::default)?;
    fresh.insert([0u8; 16], b"partial".to_vec())?;
    drop(fresh);
    drop(store);
    let store = Store::open(dir.path())?;
    assert_eq!(views(&store), before);
    assert_eq!(revisions_keyspaces(&store), ["revisions"]);

    // As if a crash came after a restore switched, before it deleted the
    // keyspace it replaced.
    let (_b, other) = open()?;
    fill_other(&other)?;
    restore(&store, &snapshot(&other)?.1)?;
    let replaced = store
        .inner
        .db
        .keyspace("revisions", KeyspaceCreateOptions::default)?;
    replaced.insert([0u8; 16], b"old".to_vec())?;
    drop(replaced);
    drop(store);
    let store = Store::open(dir.path())?;
    assert_eq!(views(&store), views(&other));
    assert_eq!(revisions_keyspaces(&store), ["revisions-1"]);
    Ok(())
}

#[test]
fn open_refuses_a_missing_revisions_keyspace() -> Result {
    let (dir, store) = open()?;
    store
        .inner
        .meta
        .insert(crate::codec::REVISIONS_KEYSPACE, b"revisions-7".to_vec())?;
    drop(store);
    match Store::open(dir.path()) {
        Err(MvccError::Corrupt(msg)) => assert!(msg.contains("revisions-7"), "{msg}"),
        other => panic!("{:?}", other.map(|s| s.current_revision())),
    }
    Ok(())
}
