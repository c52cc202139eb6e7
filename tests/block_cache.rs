//! What grows in a member's memory over the soak (docs/reliability.md):
//! fjall's block cache, which keeps the blocks of tables that compaction
//! or defragmentation replaced (a table's blocks are not evicted when the
//! table is deleted) until it is full. With the soak's store, whose live
//! data stays small, each defragmentation writes the live revisions to a
//! new table, the next reads put its blocks in the cache beside the old
//! ones, and the cache grows by the live data once a minute, up to its 32
//! MiB, though the files on disk do not grow. That is what the soak's
//! memory check allows for. The member exposes no cache metric
//! (`cairn_mvcc::Store` does not hand out fjall's `Database::cache_size`),
//! so this test shows the cache's behaviour on a store opened as mvcc
//! opens one (fjall's default cache): if fjall starts evicting a deleted
//! table's blocks, or stops bounding the cache, it fails, and the soak's
//! allowance has to be looked at again.

use fjall::{Database, KeyspaceCreateOptions};

/// Revisions kept by compaction at any time, and the bytes of each.
const LIVE: u64 = 4000;
const VALUE_BYTES: usize = 1000;

#[test]
fn fjalls_block_cache_keeps_replaced_tables_blocks_up_to_its_capacity() {
    let dir = tempfile::tempdir().expect("a temp dir");
    // As cairn_mvcc::Store::open opens it.
    let db = Database::builder(dir.path())
        .max_journaling_size(64 << 20)
        .open()
        .expect("open a store");
    let revisions = db
        .keyspace("revisions", KeyspaceCreateOptions::default)
        .expect("a keyspace");
    let capacity = db.cache_capacity();
    let (mut newest, mut oldest) = (0u64, 1u64);
    let mut after_each = Vec::new();
    let mut disk = Vec::new();
    for _ in 0..16 {
        // A minute of the soak: new revisions, the old ones compacted away.
        for _ in 0..LIVE {
            newest += 1;
            let value: Vec<u8> = (0..VALUE_BYTES)
                .map(|i| (newest.wrapping_mul(31).wrapping_add(i as u64 * 7) % 251) as u8)
                .collect();
            revisions
                .insert(newest.to_be_bytes(), value)
                .expect("insert a revision");
            if newest >= oldest + LIVE {
                revisions
                    .remove(oldest.to_be_bytes())
                    .expect("remove a compacted revision");
                oldest += 1;
            }
        }
        // The defragmentation, then reads of every live revision (a
        // watcher catching up, say).
        revisions
            .rotate_memtable_and_wait()
            .expect("flush the memtable");
        revisions.major_compact().expect("rewrite the tables");
        for r in oldest..=newest {
            assert!(
                revisions.get(r.to_be_bytes()).expect("a read").is_some(),
                "revision {r} lost"
            );
        }
        after_each.push(db.cache_size());
        disk.push(revisions.disk_space());
    }
    eprintln!(
        "cache after each defragmentation (KiB): {:?}; tables on disk (KiB): {:?}; capacity {} KiB",
        after_each.iter().map(|b| b >> 10).collect::<Vec<_>>(),
        disk.iter().map(|b| b >> 10).collect::<Vec<_>>(),
        capacity >> 10
    );
    let live_bytes = LIVE * VALUE_BYTES as u64;
    assert!(
        disk.iter().all(|&d| d < 2 * live_bytes),
        "the tables grew: {disk:?}"
    );
    // The blocks of the replaced tables stay: after four defragmentations
    // the cache holds about four copies of the live data.
    assert!(
        after_each[3] > 3 * live_bytes,
        "the cache let the replaced tables' blocks go: {after_each:?}"
    );
    // And it stops at its capacity.
    assert!(
        after_each.iter().all(|&c| c <= capacity),
        "the cache outgrew its {capacity} bytes: {after_each:?}"
    );
    assert!(
        *after_each.last().expect("sizes") > capacity * 9 / 10,
        "the cache did not fill: {after_each:?}"
    );
}
