//! The closed loop every request/response benchmark runs: `--clients`
//! workers take request numbers from one counter until `--total` are sent,
//! optionally paced to a rate, and record each latency.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::progress::Progress;
use crate::stats::Recorder;

/// Workers record into this many shards, so recording neither contends on
/// one lock nor costs a histogram per client (there may be thousands).
const SHARDS: usize = 16;

/// One client of a benchmark: sends request number `n` and waits for it.
pub trait Worker: Send + 'static {
    fn request(&mut self, n: u64) -> impl Future<Output = Result<(), tonic::Status>> + Send;
}

/// The text etcd's Go client gives a failed call.
pub fn error_text(status: &tonic::Status) -> String {
    format!(
        "rpc error: code = {:?} desc = {}",
        status.code(),
        status.message()
    )
}

/// Spreads request `n` to start no earlier than `n / rate` seconds in.
#[derive(Debug)]
pub struct Pacer {
    start: Instant,
    rate: f64,
}

impl Pacer {
    /// None when `rate` is 0 (no limit).
    pub fn new(rate: u64) -> Option<Pacer> {
        (rate > 0).then(|| Pacer {
            start: Instant::now(),
            rate: rate as f64,
        })
    }

    pub async fn wait(&self, n: u64) {
        let at = self.start + Duration::from_secs_f64(n as f64 / self.rate);
        tokio::time::sleep_until(at.into()).await;
    }
}

/// What a closed-loop run gives back.
pub struct Run<W> {
    pub recorder: Recorder,
    /// From the first request to the last response.
    pub elapsed: Duration,
    /// The workers, for clean-up.
    pub workers: Vec<W>,
}

/// Runs `total` requests over `workers`, paced to `rate` per second if not
/// 0; draws a progress bar if `show_progress` (and stderr is a terminal).
pub async fn run<W: Worker>(workers: Vec<W>, total: u64, rate: u64, show_progress: bool) -> Run<W> {
    let shards = new_shards();
    let next = Arc::new(AtomicU64::new(0));
    let pacer = Arc::new(Pacer::new(rate));
    let progress = show_progress.then(|| Progress::start(total));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, mut worker) in workers.into_iter().enumerate() {
        let shards = shards.clone();
        let next = next.clone();
        let pacer = pacer.clone();
        let counter = progress.as_ref().map(Progress::counter);
        tasks.spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    break;
                }
                if let Some(pacer) = pacer.as_ref() {
                    pacer.wait(n).await;
                }
                let sent = Instant::now();
                let outcome = worker.request(n).await;
                let latency = sent.elapsed();
                {
                    let mut shard = shards[shard_of(i)].lock().expect("recorder lock");
                    match outcome {
                        Ok(()) => shard.record(latency),
                        Err(status) => shard.record_error(error_text(&status)),
                    }
                }
                if let Some(counter) = &counter {
                    counter.add(1);
                }
            }
            worker
        });
    }
    let mut workers = Vec::new();
    while let Some(worker) = tasks.join_next().await {
        workers.push(worker.expect("benchmark worker panicked"));
    }
    let elapsed = start.elapsed();
    if let Some(progress) = progress {
        progress.finish();
    }
    Run {
        recorder: merge(&shards),
        elapsed,
        workers,
    }
}

/// Adds up shards.
pub fn merge(shards: &[Mutex<Recorder>]) -> Recorder {
    let mut all = Recorder::new();
    for shard in shards {
        all.merge(&shard.lock().expect("recorder lock"));
    }
    all
}

/// A set of recording shards for benchmarks that record from their own
/// tasks (watches).
pub fn new_shards() -> Arc<Vec<Mutex<Recorder>>> {
    Arc::new((0..SHARDS).map(|_| Mutex::new(Recorder::new())).collect())
}

pub fn shard_of(i: usize) -> usize {
    i % SHARDS
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo {
        fail_every: u64,
    }

    impl Worker for Echo {
        async fn request(&mut self, n: u64) -> Result<(), tonic::Status> {
            tokio::time::sleep(Duration::from_millis(1)).await;
            if n.is_multiple_of(self.fail_every) {
                Err(tonic::Status::unavailable("down"))
            } else {
                Ok(())
            }
        }
    }

    #[tokio::test]
    async fn every_request_is_recorded_once() {
        let workers = (0..7).map(|_| Echo { fail_every: 10 }).collect();
        let Run {
            recorder: rec,
            elapsed,
            workers,
        } = run(workers, 100, 0, false).await;
        assert_eq!(workers.len(), 7);
        assert_eq!(rec.successes(), 90);
        assert_eq!(rec.error_count(), 10);
        let s = rec.summarize(elapsed);
        assert_eq!(
            s.errors.get("rpc error: code = Unavailable desc = down"),
            Some(&10)
        );
        assert!(s.fastest >= 0.001);
    }

    #[tokio::test]
    async fn a_rate_spreads_requests_out() {
        let workers = (0..4).map(|_| Echo { fail_every: 1000 }).collect();
        let Run {
            recorder: rec,
            elapsed,
            ..
        } = run(workers, 20, 200, false).await;
        assert_eq!(rec.successes() + rec.error_count(), 20);
        // Request 19 may not start before 19/200 s.
        assert!(elapsed >= Duration::from_millis(95), "{elapsed:?}");
    }
}
