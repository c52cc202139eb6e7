//! The watch benchmarks. Put values carry their send time, so every event
//! received is timed from the put that caused it to its arrival.
//!
//! - `watch`: `--streams` Watch streams with `--watch-per-stream` watchers
//!   each over `--watched-key-total` keys (creation timed to the created
//!   response), then `--put-total` puts to those keys; every watcher must
//!   receive the event of every put to its key.
//! - `watch-latency`: `--clients` watchers of one key, each on its own
//!   stream, and one writer putting `--total` times at `--put-rate`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use cairn_api::etcdserverpb::watch_client::WatchClient;
use cairn_api::etcdserverpb::watch_request::RequestUnion;
use cairn_api::etcdserverpb::{PutRequest, WatchCreateRequest, WatchRequest, WatchResponse};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::Channel;

use crate::conn::{Connections, MAX_MESSAGE};
use crate::driver::{self, Pacer, Worker, error_text, new_shards, shard_of};
use crate::keys::{KeyPicker, stamp_age, stamped_value};
use crate::kv::kv_client;
use crate::progress::{Counter, Progress};
use crate::stats::{Recorder, Summary};

/// A watch stream that receives nothing for this long is given up on, and
/// its missing events are counted as errors.
const STALL: Duration = Duration::from_secs(30);
const MISSING: &str = "watch events never arrived";

/// The `watch` benchmark's settings (etcd's flag names).
#[derive(Clone, Debug)]
pub struct WatchLoad {
    pub streams: usize,
    pub watch_per_stream: usize,
    pub watched_key_total: usize,
    pub put_total: u64,
    pub put_rate: u64,
    pub keys: KeyPicker,
}

/// One open Watch stream.
struct Stream {
    requests: mpsc::Sender<WatchRequest>,
    responses: Streaming<WatchResponse>,
}

impl Stream {
    /// Opens a stream with its first create request already queued (a
    /// server may hold the response headers until it has something to say).
    async fn open(channel: Channel, first: WatchCreateRequest) -> Result<Stream, tonic::Status> {
        let (requests, rx) = mpsc::channel(16);
        requests
            .send(create(first))
            .await
            .map_err(|_| tonic::Status::cancelled("watch stream closed"))?;
        let responses = WatchClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .watch(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(Stream {
            requests,
            responses,
        })
    }

    /// Waits for the answer to a create request.
    async fn created(&mut self) -> Result<(), tonic::Status> {
        loop {
            match self.responses.message().await? {
                Some(r) if r.created && r.canceled => {
                    return Err(tonic::Status::failed_precondition(r.cancel_reason));
                }
                Some(r) if r.created => return Ok(()),
                Some(_) => continue,
                None => return Err(tonic::Status::unavailable("watch stream closed")),
            }
        }
    }

    async fn watch(&mut self, key: Bytes) -> Result<(), tonic::Status> {
        self.requests
            .send(create(WatchCreateRequest {
                key,
                ..Default::default()
            }))
            .await
            .map_err(|_| tonic::Status::unavailable("watch stream closed"))?;
        self.created().await
    }

    /// Receives `expected` events, recording each one's age, until the
    /// stream ends or stalls; what never came is counted as errors.
    async fn receive(
        mut self,
        expected: u64,
        epoch: Instant,
        recorder: &Mutex<Recorder>,
        counter: Option<&Counter>,
    ) {
        let mut got = 0;
        while got < expected {
            let response = match tokio::time::timeout(STALL, self.responses.message()).await {
                Ok(Ok(Some(r))) => r,
                Ok(Ok(None)) | Err(_) => break,
                Ok(Err(status)) => {
                    lock(recorder).record_error(error_text(&status));
                    break;
                }
            };
            if response.canceled {
                lock(recorder).record_error(format!("watch canceled: {}", response.cancel_reason));
                break;
            }
            let n = response.events.len() as u64;
            {
                let mut recorder = lock(recorder);
                for event in &response.events {
                    let value = event.kv.as_ref().map_or(&[][..], |kv| &kv.value[..]);
                    match stamp_age(epoch, value) {
                        Some(age) => recorder.record(age),
                        None => recorder.record_error("event without a send time"),
                    }
                }
            }
            got += n;
            if let Some(counter) = counter {
                counter.add(n);
            }
        }
        lock(recorder).record_errors(MISSING, expected.saturating_sub(got));
    }
}

fn create(request: WatchCreateRequest) -> WatchRequest {
    WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(request)),
    }
}

fn lock(recorder: &Mutex<Recorder>) -> std::sync::MutexGuard<'_, Recorder> {
    recorder.lock().expect("recorder lock")
}

/// Puts stamped values to the watched keys in turn.
struct StampedPutWorker {
    kv: cairn_api::etcdserverpb::kv_client::KvClient<Channel>,
    keys: Arc<Vec<Bytes>>,
    epoch: Instant,
    value_size: usize,
}

impl Worker for StampedPutWorker {
    async fn request(&mut self, n: u64) -> Result<(), tonic::Status> {
        let key = self.keys[(n % self.keys.len() as u64) as usize].clone();
        let request = PutRequest {
            key,
            value: stamped_value(self.epoch, self.value_size),
            ..Default::default()
        };
        self.kv.put(request).await.map(drop)
    }
}

/// Runs `watch`: returns the creation summary and the events summary.
pub async fn watch(
    conns: &Connections,
    clients: usize,
    load: &WatchLoad,
) -> Result<(Summary, Summary)> {
    if load.streams == 0 || load.watch_per_stream == 0 || load.watched_key_total == 0 {
        bail!("--streams, --watch-per-stream and --watched-key-total must be at least 1");
    }
    let watched: Arc<Vec<Bytes>> = Arc::new(
        (0..load.watched_key_total as u64)
            .map(|i| load.keys.key(i))
            .collect(),
    );
    // Watcher g (stream g / per-stream) watches watched key g mod their
    // number; put n goes to watched key n mod their number. Watched keys
    // may repeat (a key space smaller than --watched-key-total), so a
    // watcher expects the puts to every slot holding its key.
    let mut puts_to_key: HashMap<Bytes, u64> = HashMap::new();
    for (slot, key) in watched.iter().enumerate() {
        *puts_to_key.entry(key.clone()).or_default() +=
            count_congruent(load.put_total, slot as u64, watched.len() as u64);
    }
    let per_slot_events: Arc<Vec<u64>> = Arc::new(watched.iter().map(|k| puts_to_key[k]).collect());
    let total_watchers = load.streams * load.watch_per_stream;
    let events_total: u64 = (0..total_watchers)
        .map(|g| per_slot_events[g % watched.len()])
        .sum();

    // Creation.
    let creation = new_shards();
    let progress = Progress::start(total_watchers as u64);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for s in 0..load.streams {
        let channel = conns.get(s % clients.max(1));
        let watched = watched.clone();
        let creation = creation.clone();
        let counter = progress.counter();
        let per_stream = load.watch_per_stream;
        let per_slot_events = per_slot_events.clone();
        tasks.spawn(async move {
            let key_of = |j: usize| watched[(s * per_stream + j) % watched.len()].clone();
            let recorder = &creation[shard_of(s)];
            let sent = Instant::now();
            let first = WatchCreateRequest {
                key: key_of(0),
                ..Default::default()
            };
            let opened = match Stream::open(channel, first).await {
                Ok(mut stream) => stream.created().await.map(|()| stream),
                Err(status) => Err(status),
            };
            let mut stream = match opened {
                Ok(stream) => stream,
                Err(status) => {
                    lock(recorder).record_errors(error_text(&status), per_stream as u64);
                    return None;
                }
            };
            lock(recorder).record(sent.elapsed());
            counter.add(1);
            for j in 1..per_stream {
                let sent = Instant::now();
                let outcome = stream.watch(key_of(j)).await;
                match outcome {
                    Ok(()) => lock(recorder).record(sent.elapsed()),
                    Err(status) => {
                        lock(recorder).record_error(error_text(&status));
                        return None;
                    }
                }
                counter.add(1);
            }
            let expected: u64 = (0..per_stream)
                .map(|j| per_slot_events[(s * per_stream + j) % per_slot_events.len()])
                .sum();
            Some((stream, expected))
        });
    }
    let mut streams = Vec::new();
    while let Some(stream) = tasks.join_next().await {
        streams.extend(stream.context("watch creation task")?);
    }
    let creation_elapsed = started.elapsed();
    progress.finish();
    let creation = driver::merge(&creation).summarize(creation_elapsed);

    // Events.
    let epoch = Instant::now();
    let received = new_shards();
    let expected_here: u64 = streams.iter().map(|(_, e)| e).sum();
    let progress = Progress::start(events_total);
    let mut receivers = tokio::task::JoinSet::new();
    for (i, (stream, expected)) in streams.into_iter().enumerate() {
        let received = received.clone();
        let counter = progress.counter();
        receivers.spawn(async move {
            stream
                .receive(expected, epoch, &received[shard_of(i)], Some(&counter))
                .await;
        });
    }
    let putters = (0..clients.max(1))
        .map(|i| StampedPutWorker {
            kv: kv_client(conns.get(i)),
            keys: watched.clone(),
            epoch,
            value_size: crate::keys::STAMP_LEN,
        })
        .collect();
    let puts = driver::run(putters, load.put_total, load.put_rate, false).await;
    while receivers.join_next().await.is_some() {}
    let events_elapsed = epoch.elapsed();
    progress.finish();
    let mut events = driver::merge(&received);
    // Streams that failed to open never receive their share.
    events.record_errors(MISSING, events_total - expected_here);
    for (message, n) in puts.recorder.summarize(puts.elapsed).errors {
        events.record_errors(format!("put: {message}"), n);
    }
    Ok((creation, events.summarize(events_elapsed)))
}

/// How many of 0..total are congruent to `k` modulo `m`.
fn count_congruent(total: u64, k: u64, m: u64) -> u64 {
    total / m + u64::from(k < total % m)
}

/// The `watch-latency` benchmark's settings.
#[derive(Clone, Debug)]
pub struct WatchLatencyLoad {
    pub total: u64,
    pub put_rate: u64,
    pub key: Bytes,
    pub value_size: usize,
}

/// Runs `watch-latency`: one summary of every event every watcher received.
pub async fn watch_latency(
    conns: &Connections,
    clients: usize,
    load: &WatchLatencyLoad,
) -> Result<Summary> {
    if clients == 0 {
        bail!("--clients must be at least 1");
    }
    let mut streams = Vec::with_capacity(clients);
    for i in 0..clients {
        let first = WatchCreateRequest {
            key: load.key.clone(),
            ..Default::default()
        };
        let mut stream = Stream::open(conns.get(i), first)
            .await
            .context("opening a watch stream")?;
        stream.created().await.context("creating a watch")?;
        streams.push(stream);
    }
    let epoch = Instant::now();
    let received = new_shards();
    let progress = Progress::start(load.total * clients as u64);
    let mut receivers = tokio::task::JoinSet::new();
    for (i, stream) in streams.into_iter().enumerate() {
        let received = received.clone();
        let counter = progress.counter();
        let expected = load.total;
        receivers.spawn(async move {
            stream
                .receive(expected, epoch, &received[shard_of(i)], Some(&counter))
                .await;
        });
    }
    let mut kv = kv_client(conns.get(0));
    let pacer = Pacer::new(load.put_rate);
    let mut put_errors = Recorder::new();
    for n in 0..load.total {
        if let Some(pacer) = &pacer {
            pacer.wait(n).await;
        }
        let request = PutRequest {
            key: load.key.clone(),
            value: stamped_value(epoch, load.value_size),
            ..Default::default()
        };
        if let Err(status) = kv.put(request).await {
            put_errors.record_error(format!("put: {}", error_text(&status)));
        }
    }
    while receivers.join_next().await.is_some() {}
    let elapsed = epoch.elapsed();
    progress.finish();
    let mut events = driver::merge(&received);
    events.merge(&put_errors);
    Ok(events.summarize(elapsed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn puts_spread_over_keys_like_modulo() {
        assert_eq!(count_congruent(10, 0, 3), 4);
        assert_eq!(count_congruent(10, 1, 3), 3);
        assert_eq!(count_congruent(10, 2, 3), 3);
        assert_eq!(count_congruent(2, 2, 3), 0);
        assert_eq!(
            (0..7).map(|k| count_congruent(1000, k, 7)).sum::<u64>(),
            1000
        );
    }
}
