//! What the key index costs in memory per key, and what opening a store
//! costs in time, with and without an index checkpoint (docs/performance.md).
//!
//! ```text
//! cargo run --release -p cairn-mvcc --example index_cost -- [KEYS] [PUTS] [VALUE BYTES]
//! ```
//!
//! Puts PUTS values over KEYS keys of eight digits (etcdload's keys), in
//! batches of 1,000, flushes everything to tables (so that opening replays no
//! journal), and opens the store twice: from the checkpoint, and rebuilt from
//! every revision. Memory is what jemalloc (the member's allocator) counts
//! as allocated after the open, less before it: the index, and whatever
//! fjall keeps of an opened database.

use std::time::Instant;

use cairn_api::etcdserverpb::{PutRequest, RangeRequest};
use cairn_mvcc::{Store, StoreOptions};

/// The member's allocator, whose size classes are what a key really costs.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Bytes the program holds allocated, size classes included.
fn allocated() -> anyhow::Result<isize> {
    tikv_jemalloc_ctl::epoch::advance().map_err(|e| anyhow::anyhow!("{e}"))?;
    let bytes = tikv_jemalloc_ctl::stats::allocated::read().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(bytes as isize)
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<u64>());
    let keys = args.next().transpose()?.unwrap_or(1_000_000);
    let puts = args.next().transpose()?.unwrap_or(keys);
    let value_bytes = args.next().transpose()?.unwrap_or(100) as usize;
    let dir = tempfile::tempdir()?;
    // Only the checkpoints asked for here.
    let options = StoreOptions {
        checkpoint_bytes: u64::MAX,
        checkpoint_revisions: u64::MAX,
    };

    let store = Store::open_with(dir.path(), options)?;
    let value = vec![b'v'; value_bytes];
    // A fixed multiplier spreads the puts over the keys in no key order.
    let mut next = 0u64;
    for batch_start in (0..puts).step_by(1000) {
        let mut batch = store.write();
        for _ in batch_start..(batch_start + 1000).min(puts) {
            next = next
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let key = format!("{:08}", (next >> 33) % keys);
            batch.put(&PutRequest {
                key: key.into_bytes().into(),
                value: value.clone().into(),
                ..Default::default()
            })?;
        }
        batch.commit(batch_start / 1000 + 1)?;
    }
    let live = store.current_revision() - 1;
    store.defragment()?;
    store.checkpoint()?;
    drop(store);

    for (how, remove_checkpoint) in [("from the checkpoint", false), ("rebuilt", true)] {
        if remove_checkpoint {
            for entry in std::fs::read_dir(dir.path())? {
                let entry = entry?;
                if entry.file_name().to_string_lossy().starts_with("index-") {
                    std::fs::remove_file(entry.path())?;
                }
            }
        }
        let before = allocated()?;
        let started = Instant::now();
        let store = Store::open_with(dir.path(), options)?;
        let elapsed = started.elapsed();
        let bytes = allocated()? - before;
        let count = store
            .range(&RangeRequest {
                key: vec![0].into(),
                range_end: vec![0].into(),
                count_only: true,
                ..Default::default()
            })?
            .count;
        println!(
            "{how}: {count} keys, {live} revisions: open {:.3} s, {bytes} bytes allocated, {:.1} per key (keys of 8 bytes)",
            elapsed.as_secs_f64(),
            bytes as f64 / count as f64,
        );
        drop(store);
    }
    Ok(())
}
