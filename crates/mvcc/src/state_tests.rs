//! The state records keyspace: committed with the batch, read by prefix,
//! carried by snapshots.

use crate::Store;
use crate::tests::{Result, open};

#[test]
fn state_records_commit_with_the_batch_and_survive_reopen() -> Result {
    let (dir, store) = open()?;
    let mut batch = store.write();
    batch.put_state_record(b"alarm/1".to_vec(), b"one".to_vec());
    batch.put_state_record(b"alarm/2".to_vec(), b"two".to_vec());
    batch.put_state_record(b"other/1".to_vec(), b"x".to_vec());
    batch.commit(1)?;
    let mut batch = store.write();
    batch.delete_state_record(b"alarm/1".to_vec());
    batch.commit(2)?;
    drop(store);
    let store = Store::open(dir.path())?;
    assert_eq!(
        store.state_records(b"alarm/")?,
        vec![(b"alarm/2".to_vec(), b"two".to_vec())]
    );
    assert_eq!(store.state_records(b"")?.len(), 2);
    Ok(())
}

#[test]
fn snapshots_carry_state_records() -> Result {
    let (_dir, source) = open()?;
    let mut batch = source.write();
    batch.put_state_record(b"a".to_vec(), b"kept".to_vec());
    batch.put_lease(3, b"three".to_vec());
    batch.commit(5)?;
    let mut bytes = Vec::new();
    source.write_snapshot(&mut bytes)?;
    let (_dir2, target) = open()?;
    let mut batch = target.write();
    batch.put_state_record(b"b".to_vec(), b"replaced".to_vec());
    batch.commit(1)?;
    target.restore_snapshot(&mut &bytes[..])?;
    assert_eq!(
        target.state_records(b"")?,
        vec![(b"a".to_vec(), b"kept".to_vec())]
    );
    assert_eq!(target.leases()?, vec![(3, b"three".to_vec())]);
    Ok(())
}

#[test]
fn defragment_keeps_every_revision_and_reclaims_compacted_ones() -> Result {
    use crate::tests::{put_req, range_req};
    use cairn_api::etcdserverpb::RangeRequest;

    let (dir, store) = open()?;
    // Incompressible values, so the files' size tells how many are stored.
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut value = || -> String {
        (0..4096)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                char::from(b'!' + (seed % 90) as u8)
            })
            .collect()
    };
    for i in 0..200 {
        let mut batch = store.write();
        batch.put(&put_req(&format!("k{}", i % 10), &value()))?;
        batch.commit(i + 1)?;
    }
    // The journal (a bounded, preallocated log) is left out: tables hold
    // the store once flushed, which the first defragment does.
    let tables = dir.path().join("keyspaces");
    store.defragment()?;
    let before = allocated_bytes(&tables);
    let mut batch = store.write();
    batch.compact(190)?;
    batch.commit(201)?;
    store.defragment()?;
    let after = allocated_bytes(&tables);
    let all = store.range(&range_req("", "\0"))?;
    assert_eq!(all.kvs.len(), 10);
    assert_eq!(store.current_revision(), 201);
    let old = store.range(&RangeRequest {
        revision: 195,
        ..range_req("k4", "")
    })?;
    assert_eq!(old.kvs.len(), 1);
    // Ten live keys and the last 11 revisions remain, not 200 values.
    assert!(before > 200 * 4096, "{before} bytes before");
    // About 20 values remain, and each keyspace's small version files.
    assert!(after < before / 3, "{after} bytes after, {before} before");
    Ok(())
}

/// Bytes the files under `dir` take on disk (journals are sparse).
fn allocated_bytes(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => allocated_bytes(&entry.path()),
            Ok(meta) => meta.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}
