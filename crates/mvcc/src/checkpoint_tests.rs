//! Index checkpoints: a store opened from one (and the revisions after it)
//! has the index a rebuild from every revision gives, after a clean stop and
//! after a crash at any point, with compactions, deletes, txns and leases;
//! a checkpoint that does not fit the store is never used.

use std::path::Path;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use cairn_api::etcdserverpb::request_op::Request;
use cairn_api::etcdserverpb::{PutRequest, RangeRequest, RangeResponse, TxnRequest};
use tempfile::TempDir;

use crate::index::Index;
use crate::tests::{Result, b, del_req, op, put_req};
use crate::{MvccError, Rebuild, Store, StoreOptions, codec};

/// Checkpoints only when asked.
const ON_REQUEST: StoreOptions = StoreOptions {
    checkpoint_bytes: u64::MAX,
    checkpoint_revisions: u64::MAX,
};

fn err(e: impl std::fmt::Display) -> MvccError {
    MvccError::Corrupt(e.to_string())
}

fn open(options: StoreOptions) -> Result<(TempDir, Store)> {
    let dir = tempfile::tempdir().map_err(err)?;
    let store = Store::open_with(dir.path(), options)?;
    Ok((dir, store))
}

/// The index a rebuild from every stored revision gives.
pub(crate) fn rebuilt(store: &Store) -> Result<Index> {
    let state = store.inner.state.read();
    let mut rebuild = Rebuild::new();
    for entry in state.revisions.iter() {
        let (key, value) = entry.into_inner()?;
        rebuild.add(&key, &value)?;
    }
    Ok(rebuild.finish(state.index.compact).0)
}

/// The checkpoint file the store's meta names.
fn valid_file(store: &Store) -> String {
    format!(
        "index-{:016x}",
        store.inner.checkpoints.valid.load(Ordering::Acquire)
    )
}

fn opened_from_checkpoint(store: &Store) -> bool {
    store.inner.checkpoints.valid.load(Ordering::Acquire) != 0
}

fn checkpoint_files(dir: &Path) -> Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("index-"))
        .collect();
    names.sort();
    Ok(names)
}

/// A copy of the store's directory as a kill -9 would leave it: fjall's
/// commits are in the OS's buffers, which a copy reads. No checkpoint is
/// written while it is taken.
fn crash_image(store: &Store, from: &Path) -> Result<TempDir> {
    let _no_checkpoint = store.inner.checkpoints.writing.lock();
    let to = tempfile::tempdir().map_err(err)?;
    copy_dir(from, to.path())?;
    Ok(to)
}

fn copy_dir(from: &Path, to: &Path) -> Result {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

/// Whole scans at every revision, for comparing two stores.
fn scans(store: &Store) -> Vec<std::result::Result<RangeResponse, String>> {
    (0..=store.current_revision() + 1)
        .map(|revision| {
            store
                .range(&RangeRequest {
                    key: Bytes::new(),
                    range_end: Bytes::from_static(b"\0"),
                    revision,
                    ..Default::default()
                })
                .map_err(|e| e.to_string())
        })
        .collect()
}

fn leased(key: &str, lease: i64) -> PutRequest {
    PutRequest {
        key: b(key),
        value: b("v"),
        lease,
        ..Default::default()
    }
}

/// One commit of every kind of change, numbered by `round` so that rounds
/// differ: puts (one with a lease), a txn of several subs, a delete, and
/// every third round a compaction.
fn round(store: &Store, round: u32) -> Result {
    changes(store, round, round % 3 == 2)
}

fn changes(store: &Store, round: u32, compact: bool) -> Result {
    let mut batch = store.write();
    batch.put_lease(7, b"seven".to_vec());
    for i in 0..5 {
        batch.put(&put_req(
            &format!("k{}", (round + i) % 9),
            &format!("{round}.{i}"),
        ))?;
    }
    batch.put(&leased(&format!("l{}", round % 3), 7))?;
    batch.txn(&TxnRequest {
        compare: Vec::new(),
        success: vec![
            op(Request::RequestPut(put_req("t1", &round.to_string()))),
            op(Request::RequestDeleteRange(del_req("k3", "", false))),
            op(Request::RequestPut(put_req("t2", &round.to_string()))),
        ],
        failure: Vec::new(),
    })?;
    batch.delete_range(&del_req(&format!("k{}", round % 9), "", false))?;
    if compact {
        let at = batch.current_revision() - 4;
        batch.compact(at)?;
    }
    let next = store.applied_index() + 1;
    batch.commit(next)?;
    Ok(())
}

#[test]
fn a_store_opens_from_its_checkpoint_and_the_revisions_after_it() -> Result {
    let (dir, store) = open(ON_REQUEST)?;
    for r in 0..10 {
        round(&store, r)?;
    }
    store.checkpoint()?;
    assert!(checkpoint_files(dir.path())?.contains(&valid_file(&store)));
    // The tail: puts, txns and deletes after the checkpoint (a compaction
    // retires it: the next test).
    for r in 10..15 {
        changes(&store, r, false)?;
    }
    let before = scans(&store);
    let leased = store.leased_keys()?;
    let (revision, compact) = (store.current_revision(), store.compact_revision());
    let size = store.size().in_use;
    drop(store);

    let store = Store::open_with(dir.path(), ON_REQUEST)?;
    assert!(opened_from_checkpoint(&store));
    assert_eq!(store.inner.state.read().index, rebuilt(&store)?);
    assert_eq!(store.current_revision(), revision);
    assert_eq!(store.compact_revision(), compact);
    assert_eq!(store.size().in_use, size);
    assert_eq!(scans(&store), before);
    assert_eq!(store.leased_keys()?, leased);
    assert!(!leased.is_empty());
    // And it goes on from there: a put continues the key's generation.
    round(&store, 15)?;
    assert_eq!(store.inner.state.read().index, rebuilt(&store)?);
    Ok(())
}

#[test]
fn a_checkpoint_at_stop_leaves_no_tail_and_at_most_two_files() -> Result {
    let (dir, store) = open(ON_REQUEST)?;
    for r in 0..6 {
        changes(&store, r, false)?;
    }
    store.checkpoint()?;
    let first = checkpoint_files(dir.path())?;
    assert_eq!(first.len(), 1);
    // Nothing changed: nothing written.
    store.checkpoint()?;
    assert_eq!(checkpoint_files(dir.path())?, first);
    // Each new one keeps the one before (a power loss may take the meta
    // record naming the new one) and deletes any older.
    for r in 6..9 {
        changes(&store, r, false)?;
        let before = checkpoint_files(dir.path())?;
        store.checkpoint()?;
        let after = checkpoint_files(dir.path())?;
        assert_eq!(after.len(), 2);
        assert!(before.iter().all(|f| after.contains(f)) || before.len() == 2);
    }
    let before = scans(&store);
    drop(store);
    let store = Store::open_with(dir.path(), ON_REQUEST)?;
    assert!(opened_from_checkpoint(&store));
    assert_eq!(
        store
            .inner
            .checkpoints
            .tail_revisions
            .load(Ordering::Relaxed),
        0
    );
    assert_eq!(scans(&store), before);
    Ok(())
}

/// A crash after every commit, with a checkpoint written in the middle:
/// each image opens to the store as it was at that commit.
#[test]
fn after_a_crash_the_index_and_the_store_agree() -> Result {
    let (dir, store) = open(ON_REQUEST)?;
    let mut images = Vec::new();
    for r in 0..12 {
        round(&store, r)?;
        if r == 4 || r == 8 {
            store.checkpoint()?;
        }
        images.push((
            crash_image(&store, dir.path())?,
            scans(&store),
            store.applied_index(),
        ));
    }
    drop(store);
    for (n, (image, before, applied)) in images.iter().enumerate() {
        let store = Store::open_with(image.path(), ON_REQUEST)?;
        // Compactions (rounds 2, 5, 8, 11) retire the checkpoint before
        // them and ask for one in the background, which may or may not
        // have been written.
        if n < 2 || [4, 9, 10].contains(&n) {
            assert_eq!(opened_from_checkpoint(&store), n >= 4, "image {n}");
        }
        assert_eq!(
            store.inner.state.read().index,
            rebuilt(&store)?,
            "image {n}"
        );
        assert_eq!(&scans(&store), before, "image {n}");
        assert_eq!(store.applied_index(), *applied, "image {n}");
    }
    Ok(())
}

#[test]
fn a_crash_before_a_compaction_deleted_everything_rebuilds_and_deletes_the_rest() -> Result {
    let (dir, store) = open(ON_REQUEST)?;
    for r in 0..4 {
        round(&store, r)?;
    }
    store.checkpoint()?;
    // A compaction whose deletes a crash cut short: its commit marks it,
    // and one revision it dropped is still stored.
    let stored_before: Vec<(Vec<u8>, Vec<u8>)> = {
        let state = store.inner.state.read();
        state
            .revisions
            .iter()
            .map(|e| e.into_inner().map(|(k, v)| (k.to_vec(), v.to_vec())))
            .collect::<std::result::Result<_, _>>()?
    };
    let mut batch = store.write();
    let at = batch.current_revision();
    batch.compact(at)?;
    let next = store.applied_index() + 1;
    batch.commit(next)?;
    let after = scans(&store);
    let revisions = store.inner.state.read().revisions.clone();
    let (key, value) = stored_before
        .iter()
        .find(|(k, _)| revisions.get(k).ok().flatten().is_none())
        .ok_or_else(|| err("the compaction deleted nothing"))?;
    revisions.insert(key, value)?;
    store.inner.meta.insert(codec::COMPACTING, [])?;
    let image = crash_image(&store, dir.path())?;
    drop(store);

    let store = Store::open_with(image.path(), ON_REQUEST)?;
    assert!(!opened_from_checkpoint(&store));
    assert!(store.inner.state.read().revisions.get(key)?.is_none());
    assert!(store.inner.meta.get(codec::COMPACTING)?.is_none());
    assert_eq!(scans(&store), after);
    drop(store);
    // The leftover deleted, a checkpoint serves again.
    let store = Store::open_with(image.path(), ON_REQUEST)?;
    store.checkpoint()?;
    drop(store);
    let store = Store::open_with(image.path(), ON_REQUEST)?;
    assert!(opened_from_checkpoint(&store));
    assert_eq!(scans(&store), after);
    Ok(())
}

#[test]
fn a_damaged_or_foreign_checkpoint_is_not_used() -> Result {
    let (dir, store) = open(ON_REQUEST)?;
    for r in 0..5 {
        round(&store, r)?;
    }
    store.checkpoint()?;
    let before = scans(&store);
    let name = valid_file(&store);
    drop(store);
    let good = std::fs::read(dir.path().join(&name))?;
    let (other_dir, other) = open(ON_REQUEST)?;
    round(&other, 0)?;
    other.checkpoint()?;
    let other_name = valid_file(&other);
    drop(other);
    let foreign = std::fs::read(other_dir.path().join(&other_name))?;

    // A flipped byte in a key record, a file cut short, a file of another
    // store, and no file at all: each opens by a rebuild, to the same data.
    let mut flipped = good.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x40;
    for (what, bytes) in [
        ("flipped", Some(flipped)),
        ("cut short", Some(good[..good.len() - 3].to_vec())),
        ("foreign", Some(foreign)),
        ("missing", None),
    ] {
        let image = tempfile::tempdir().map_err(err)?;
        copy_dir(dir.path(), image.path())?;
        let file = image.path().join(&name);
        match bytes {
            Some(bytes) => std::fs::write(&file, bytes)?,
            None => std::fs::remove_file(&file)?,
        }
        let store = Store::open_with(image.path(), ON_REQUEST)?;
        assert!(!opened_from_checkpoint(&store), "{what}");
        assert_eq!(scans(&store), before, "{what}");
        assert!(!checkpoint_files(image.path())?.contains(&name), "{what}");
    }
    let store = Store::open_with(dir.path(), ON_REQUEST)?;
    assert!(opened_from_checkpoint(&store));
    assert_eq!(scans(&store), before);
    Ok(())
}

/// Until the background thread has taken a request made now, and so has
/// finished any checkpoint it was writing for an earlier one.
fn background_turn(store: &Store) -> Result {
    store.inner.request_checkpoint();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while store.inner.checkpoints.requested.load(Ordering::Acquire) {
        if std::time::Instant::now() > deadline {
            return Err(err("the checkpoint thread took no request"));
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    Ok(())
}

#[test]
fn a_request_served_meanwhile_writes_no_other_checkpoint() -> Result {
    let (dir, store) = open(ON_REQUEST)?;
    for r in 0..3 {
        round(&store, r)?;
    }
    // A compaction's request, still pending or not, then one at stop: the
    // background thread's turn finds nothing changed since. (It used to
    // write anyway, so the file a test read as valid before the store was
    // dropped could be an old one by then.)
    store.checkpoint()?;
    let name = valid_file(&store);
    let files = checkpoint_files(dir.path())?;
    background_turn(&store)?;
    background_turn(&store)?;
    assert_eq!(valid_file(&store), name);
    assert_eq!(checkpoint_files(dir.path())?, files);
    // A change since: the background thread writes one.
    changes(&store, 3, false)?;
    background_turn(&store)?;
    background_turn(&store)?;
    assert_ne!(valid_file(&store), name);
    Ok(())
}

#[test]
fn a_snapshot_restore_retires_the_checkpoint() -> Result {
    let (dir, store) = open(ON_REQUEST)?;
    for r in 0..5 {
        round(&store, r)?;
    }
    store.checkpoint()?;
    let (_other_dir, other) = open(ON_REQUEST)?;
    for r in 20..23 {
        round(&other, r)?;
    }
    let mut snapshot = Vec::new();
    other.write_snapshot(&mut snapshot)?;
    let restored = scans(&other);
    store.restore_snapshot(&mut &snapshot[..])?;
    let image = crash_image(&store, dir.path())?;
    drop(store);
    // Whether or not the checkpoint the restore asked for was written
    // before the crash, the store opens to the snapshot's content.
    let store = Store::open_with(image.path(), ON_REQUEST)?;
    assert_eq!(scans(&store), restored);
    assert_eq!(store.inner.state.read().index, rebuilt(&store)?);
    Ok(())
}

#[test]
fn the_store_checkpoints_by_itself_once_the_tail_is_long() -> Result {
    let options = StoreOptions {
        checkpoint_bytes: u64::MAX,
        checkpoint_revisions: 40,
    };
    let (dir, store) = open(options)?;
    for r in 0..10 {
        round(&store, r)?;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while checkpoint_files(dir.path())?.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint written"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    for r in 10..12 {
        changes(&store, r, false)?;
    }
    let before = scans(&store);
    drop(store);
    let store = Store::open_with(dir.path(), options)?;
    assert!(opened_from_checkpoint(&store));
    assert_eq!(store.inner.state.read().index, rebuilt(&store)?);
    assert_eq!(scans(&store), before);
    Ok(())
}

#[test]
fn open_deletes_checkpoint_files_it_does_not_use() -> Result {
    let (dir, store) = open(ON_REQUEST)?;
    round(&store, 0)?;
    store.checkpoint()?;
    let before = scans(&store);
    drop(store);
    let valid = checkpoint_files(dir.path())?;
    // What a crash while writing one leaves, and an old one.
    std::fs::write(dir.path().join("index-00000000000000aa.partial"), b"half")?;
    std::fs::write(dir.path().join("index-00000000000000bb"), b"old")?;
    let store = Store::open_with(dir.path(), ON_REQUEST)?;
    assert!(opened_from_checkpoint(&store));
    assert_eq!(checkpoint_files(dir.path())?, valid);
    assert_eq!(scans(&store), before);
    Ok(())
}
