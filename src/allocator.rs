//! The allocator of both binaries: jemalloc rather than glibc's malloc,
//! because buffers allocated on the gRPC workers are freed on the raft and
//! apply threads, a pattern glibc serves from its slow paths
//! (docs/performance.md measures the difference).

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Lets jemalloc purge freed pages from a background thread. Without it,
/// pages freed after a burst of load are returned only while something
/// keeps allocating, so an idle member kept its peak RSS (121 MB after
/// 100k puts of 1 KiB, against 77 MB 20 s later with the background
/// thread); under load nothing changes, as the decay times stay jemalloc's.
pub fn return_idle_memory() {
    if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
        tracing::debug!(error = %e, "jemalloc background thread not started");
    }
}
