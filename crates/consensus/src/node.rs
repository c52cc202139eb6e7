//! The raft thread, the apply thread, and the async handle over both.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use parking_lot::Mutex;
use raft::prelude::{Entry, EntryType, Message};
use raft::{RawNode, StateRole};
use tokio::sync::{oneshot, watch};

use crate::storage::LogStore;
use crate::{Committed, Error, NodeConfig, StateMachine, Status};

type Reply<T> = oneshot::Sender<Result<T, Error>>;

enum Command {
    Propose {
        seq: u64,
        data: Vec<u8>,
    },
    ReadIndex(Reply<u64>),
    /// The apply thread has applied up to this index.
    Applied(u64),
    /// The state machine has made this index durable: the log before it can go.
    CompactLog(u64),
    Stop,
}

/// State shared by the handle and both threads.
struct Shared<O> {
    id: u64,
    commands: Sender<Command>,
    /// Proposals of this member waiting for their entry to be applied.
    waiters: Mutex<HashMap<u64, Reply<O>>>,
    next_seq: AtomicU64,
    applied: watch::Sender<u64>,
    leader: AtomicU64,
    term: AtomicU64,
    commit: AtomicU64,
    last_index: AtomicU64,
    stopped: AtomicBool,
    /// Why the node stopped, once it has: None for a requested shutdown.
    stop_reason: watch::Sender<Option<Option<String>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl<O> Shared<O> {
    fn stop(&self, reason: Option<String>) {
        if self.stopped.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Some(reason) = &reason {
            tracing::error!(%reason, "raft node stopped");
        }
        for (_, waiter) in self.waiters.lock().drain() {
            let _ = waiter.send(Err(Error::Stopped));
        }
        let _ = self.commands.send(Command::Stop);
        self.stop_reason.send_replace(Some(reason));
    }
}

/// The handle to a running raft member. Cheap to clone.
pub struct Node<O> {
    shared: Arc<Shared<O>>,
}

impl<O> Clone for Node<O> {
    fn clone(&self) -> Self {
        Node {
            shared: self.shared.clone(),
        }
    }
}

/// Entry context: who proposed it, and their sequence number, so only the
/// proposing member wakes a waiter.
fn encode_context(proposer: u64, seq: u64) -> Vec<u8> {
    let mut ctx = Vec::with_capacity(16);
    ctx.extend_from_slice(&proposer.to_be_bytes());
    ctx.extend_from_slice(&seq.to_be_bytes());
    ctx
}

fn decode_context(ctx: &[u8]) -> Option<(u64, u64)> {
    let proposer = u64::from_be_bytes(ctx.get(..8)?.try_into().ok()?);
    let seq = u64::from_be_bytes(ctx.get(8..16)?.try_into().ok()?);
    Some((proposer, seq))
}

impl<O: Send + 'static> Node<O> {
    /// Opens the raft log, replays what the state machine has not applied,
    /// and starts the raft and apply threads.
    pub fn start<S>(config: NodeConfig, state_machine: S) -> Result<Self, Error>
    where
        S: StateMachine<Output = O>,
    {
        let mut store = LogStore::open(&config.log_dir, &config.initial_voters)?;
        let applied = state_machine.applied_index();
        if applied > store.last_index() {
            return Err(Error::Corrupt(format!(
                "the state machine has applied index {applied} but the raft log ends at {}",
                store.last_index()
            )));
        }
        if applied > store.hard_state().commit {
            // The commit index is written lazily; what was applied was committed.
            store.set_commit(applied)?;
        }
        let raft_config = raft::Config {
            id: config.id,
            election_tick: config.election_ticks,
            heartbeat_tick: config.heartbeat_ticks,
            applied,
            max_size_per_msg: 1024 * 1024,
            max_inflight_msgs: 256,
            check_quorum: true,
            pre_vote: true,
            ..Default::default()
        };
        raft_config.validate()?;
        let mut raw = RawNode::new(&raft_config, store, &crate::logger::raft_logger())?;
        if raw.raft.prs().is_singleton() && raw.raft.promotable() {
            // A lone voter need not wait out an election timeout.
            raw.campaign()?;
        }

        let (commands, command_rx) = crossbeam_channel::unbounded();
        let (apply_tx, apply_rx) = crossbeam_channel::unbounded();
        let boot_nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        let shared = Arc::new(Shared {
            id: config.id,
            commands,
            waiters: Mutex::new(HashMap::new()),
            // Sequence numbers start at the boot time so that a restarted
            // member never reuses one still travelling in the log.
            next_seq: AtomicU64::new(boot_nanos),
            applied: watch::Sender::new(applied),
            leader: AtomicU64::new(0),
            term: AtomicU64::new(raw.raft.term),
            commit: AtomicU64::new(raw.raft.raft_log.committed),
            last_index: AtomicU64::new(raw.raft.raft_log.last_index()),
            stopped: AtomicBool::new(false),
            stop_reason: watch::Sender::new(None),
            threads: Mutex::new(Vec::new()),
        });

        let raft_loop = RaftLoop {
            raw,
            commands: command_rx,
            apply: apply_tx,
            shared: shared.clone(),
            tick_interval: config.tick_interval,
            read_retry: config.tick_interval * config.election_ticks as u32,
            pending_reads: Vec::new(),
            reads_in_flight: HashMap::new(),
            next_read_ctx: 0,
        };
        let apply_loop = ApplyLoop {
            state_machine,
            entries: apply_rx,
            shared: shared.clone(),
            snapshot_count: config.snapshot_count.max(1),
            durable_index: applied,
        };
        let raft_thread = std::thread::Builder::new()
            .name("raft".into())
            .spawn(move || raft_loop.run())
            .map_err(|e| Error::Corrupt(format!("cannot start the raft thread: {e}")))?;
        let apply_thread = std::thread::Builder::new()
            .name("apply".into())
            .spawn(move || apply_loop.run())
            .map_err(|e| Error::Corrupt(format!("cannot start the apply thread: {e}")))?;
        shared.threads.lock().extend([raft_thread, apply_thread]);
        Ok(Node { shared })
    }

    /// Replicates `data` and returns what the state machine made of it, once
    /// this member has applied it. Dropping the future abandons the wait, not
    /// the proposal.
    pub async fn propose(&self, data: Vec<u8>) -> Result<O, Error> {
        if self.shared.stopped.load(Ordering::SeqCst) {
            return Err(Error::Stopped);
        }
        let seq = self.shared.next_seq.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.shared.waiters.lock().insert(seq, tx);
        if self.shared.stopped.load(Ordering::SeqCst) {
            self.shared.waiters.lock().remove(&seq);
            return Err(Error::Stopped);
        }
        let _forget = WaiterGuard {
            shared: &self.shared,
            seq,
        };
        self.shared
            .commands
            .send(Command::Propose { seq, data })
            .map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)?
    }

    /// A linearizable read barrier: returns once this member has applied
    /// everything committed when the read arrived (raft's ReadIndex, batched
    /// with every read that arrives meanwhile).
    pub async fn read_index(&self) -> Result<u64, Error> {
        let (tx, rx) = oneshot::channel();
        self.shared
            .commands
            .send(Command::ReadIndex(tx))
            .map_err(|_| Error::Stopped)?;
        let index = rx.await.map_err(|_| Error::Stopped)??;
        let mut applied = self.shared.applied.subscribe();
        applied
            .wait_for(|applied| *applied >= index)
            .await
            .map_err(|_| Error::Stopped)?;
        Ok(index)
    }

    pub fn id(&self) -> u64 {
        self.shared.id
    }

    /// The current raft term (cheap: read on every response header).
    pub fn term(&self) -> u64 {
        self.shared.term.load(Ordering::Relaxed)
    }

    pub fn status(&self) -> Status {
        let s = &self.shared;
        Status {
            id: s.id,
            leader: s.leader.load(Ordering::Relaxed),
            term: s.term.load(Ordering::Relaxed),
            commit_index: s.commit.load(Ordering::Relaxed),
            applied_index: *s.applied.borrow(),
            last_index: s.last_index.load(Ordering::Relaxed),
        }
    }

    /// Resolves when the node stops; `Some(reason)` when it died of an error.
    pub async fn stopped(&self) -> Option<String> {
        let mut rx = self.shared.stop_reason.subscribe();
        match rx.wait_for(|r| r.is_some()).await {
            Ok(reason) => reason.clone().flatten(),
            Err(_) => None,
        }
    }

    /// Stops both threads and waits for them; applied work is kept.
    pub fn shutdown(&self) {
        self.shared.stop(None);
        let threads: Vec<_> = self.shared.threads.lock().drain(..).collect();
        for thread in threads {
            let _ = thread.join();
        }
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    let text = panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into());
    format!("panicked: {text}")
}

/// Forgets a proposal's waiter when its caller goes away.
struct WaiterGuard<'a, O> {
    shared: &'a Shared<O>,
    seq: u64,
}

impl<O> Drop for WaiterGuard<'_, O> {
    fn drop(&mut self) {
        self.shared.waiters.lock().remove(&self.seq);
    }
}

struct RaftLoop<O> {
    raw: RawNode<LogStore>,
    commands: Receiver<Command>,
    apply: Sender<Vec<Entry>>,
    shared: Arc<Shared<O>>,
    tick_interval: Duration,
    /// A ReadIndex unanswered for this long is asked again (raft drops them
    /// silently when the leader is unknown or has not committed in its term).
    read_retry: Duration,
    pending_reads: Vec<Reply<u64>>,
    reads_in_flight: HashMap<u64, (Instant, Vec<Reply<u64>>)>,
    next_read_ctx: u64,
}

impl<O> RaftLoop<O> {
    fn run(mut self) {
        // raft-rs panics on broken invariants; stop the node rather than
        // leave callers waiting on a dead thread.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run_inner()));
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) => self.shared.stop(Some(e.to_string())),
            Err(panic) => self.shared.stop(Some(panic_message(&panic))),
        }
        for reply in self.pending_reads.drain(..) {
            let _ = reply.send(Err(Error::Stopped));
        }
        for (_, (_, replies)) in self.reads_in_flight.drain() {
            for reply in replies {
                let _ = reply.send(Err(Error::Stopped));
            }
        }
        self.shared.stop(None);
        for (_, waiter) in self.shared.waiters.lock().drain() {
            let _ = waiter.send(Err(Error::Stopped));
        }
    }

    fn run_inner(&mut self) -> Result<(), Error> {
        let mut next_tick = Instant::now() + self.tick_interval;
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            match self.commands.recv_timeout(wait) {
                Ok(command) => {
                    if !self.handle(command)? {
                        return Ok(());
                    }
                    // Everything that queued up meanwhile joins this Ready.
                    while let Ok(command) = self.commands.try_recv() {
                        if !self.handle(command)? {
                            return Ok(());
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            }
            let now = Instant::now();
            if now >= next_tick {
                self.raw.tick();
                next_tick = now + self.tick_interval;
                self.retry_stale_reads(now);
            }
            self.issue_reads();
            while self.raw.has_ready() {
                self.handle_ready()?;
            }
        }
    }

    /// Returns false when the loop should end.
    fn handle(&mut self, command: Command) -> Result<bool, Error> {
        match command {
            Command::Propose { seq, data } => {
                let context = encode_context(self.shared.id, seq);
                if let Err(e) = self.raw.propose(context, data) {
                    let error = match e {
                        raft::Error::ProposalDropped => Error::NoLeader,
                        other => Error::Raft(other),
                    };
                    if let Some(waiter) = self.shared.waiters.lock().remove(&seq) {
                        let _ = waiter.send(Err(error));
                    }
                }
            }
            Command::ReadIndex(reply) => self.pending_reads.push(reply),
            Command::Applied(index) => self.raw.advance_apply_to(index),
            Command::CompactLog(index) => {
                self.raw.mut_store().compact(index)?;
            }
            Command::Stop => return Ok(false),
        }
        Ok(true)
    }

    fn issue_reads(&mut self) {
        if self.pending_reads.is_empty() {
            return;
        }
        let raft = &self.raw.raft;
        let can_read = match raft.state {
            StateRole::Leader => raft.commit_to_current_term(),
            _ => raft.leader_id != raft::INVALID_ID,
        };
        if !can_read {
            return;
        }
        self.next_read_ctx += 1;
        let ctx = self.next_read_ctx;
        let replies = std::mem::take(&mut self.pending_reads);
        self.reads_in_flight.insert(ctx, (Instant::now(), replies));
        self.raw.read_index(ctx.to_be_bytes().to_vec());
    }

    fn retry_stale_reads(&mut self, now: Instant) {
        let stale: Vec<u64> = self
            .reads_in_flight
            .iter()
            .filter(|(_, (asked, _))| now.duration_since(*asked) >= self.read_retry)
            .map(|(ctx, _)| *ctx)
            .collect();
        for ctx in stale {
            if let Some((_, replies)) = self.reads_in_flight.remove(&ctx) {
                self.pending_reads.extend(replies);
            }
        }
    }

    fn handle_ready(&mut self) -> Result<(), Error> {
        let mut ready = self.raw.ready();
        self.send(ready.take_messages());
        let committed = ready.take_committed_entries();
        self.hand_to_apply(committed)?;
        for read in ready.take_read_states() {
            let ctx = read
                .request_ctx
                .as_slice()
                .try_into()
                .map(u64::from_be_bytes)
                .unwrap_or(0);
            if let Some((_, replies)) = self.reads_in_flight.remove(&ctx) {
                for reply in replies {
                    let _ = reply.send(Ok(read.index));
                }
            }
        }
        let sync = ready.must_sync();
        self.raw
            .mut_store()
            .persist_ready(ready.entries(), ready.hs(), sync)?;
        self.send(ready.take_persisted_messages());
        // advance_append, not advance: entries are applied on the apply
        // thread, which reports its progress with Command::Applied.
        let mut light = self.raw.advance_append(ready);
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().set_commit(commit)?;
        }
        self.send(light.take_messages());
        self.hand_to_apply(light.take_committed_entries())?;
        self.publish_status();
        Ok(())
    }

    fn hand_to_apply(&self, entries: Vec<Entry>) -> Result<(), Error> {
        if entries.is_empty() {
            return Ok(());
        }
        self.apply.send(entries).map_err(|_| Error::Stopped)
    }

    fn send(&self, messages: Vec<Message>) {
        // Peers and their transport come with multi-member clusters; a lone
        // voter has no one to talk to.
        for message in messages {
            tracing::warn!(to = message.to, kind = ?message.msg_type, "no transport to raft peer; message dropped");
        }
    }

    fn publish_status(&self) {
        let raft = &self.raw.raft;
        let s = &self.shared;
        s.leader.store(raft.leader_id, Ordering::Relaxed);
        s.term.store(raft.term, Ordering::Relaxed);
        s.commit.store(raft.raft_log.committed, Ordering::Relaxed);
        s.last_index
            .store(raft.raft_log.last_index(), Ordering::Relaxed);
    }
}

struct ApplyLoop<S: StateMachine> {
    state_machine: S,
    entries: Receiver<Vec<Entry>>,
    shared: Arc<Shared<S::Output>>,
    snapshot_count: u64,
    /// The last index the state machine has made durable.
    durable_index: u64,
}

impl<S: StateMachine> ApplyLoop<S> {
    fn run(mut self) {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run_inner()));
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) => self.shared.stop(Some(e.to_string())),
            Err(panic) => self.shared.stop(Some(panic_message(&panic))),
        }
    }

    fn run_inner(&mut self) -> Result<(), Error> {
        let mut committed = Vec::new();
        let mut proposals = Vec::new();
        while let Ok(mut batch) = self.entries.recv() {
            // Whatever else is committed already goes into the same apply.
            while let Ok(more) = self.entries.try_recv() {
                batch.extend(more);
            }
            if self.shared.stopped.load(Ordering::SeqCst) {
                return Ok(());
            }
            let Some(last) = batch.last().map(|e| e.index) else {
                continue;
            };
            let already_applied = self.state_machine.applied_index();
            committed.clear();
            proposals.clear();
            for entry in batch {
                if entry.index <= already_applied {
                    continue;
                }
                match entry.entry_type {
                    EntryType::EntryNormal if !entry.data.is_empty() => {
                        proposals.push(decode_context(&entry.context));
                        committed.push(Committed {
                            index: entry.index,
                            term: entry.term,
                            data: entry.data,
                        });
                    }
                    EntryType::EntryNormal => {}
                    EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                        return Err(Error::Corrupt(format!(
                            "entry {} is a membership change, which this member cannot apply yet",
                            entry.index
                        )));
                    }
                }
            }
            if last <= already_applied {
                continue;
            }
            let outputs = self
                .state_machine
                .apply(&committed, last)
                .map_err(|e| Error::StateMachine(e.to_string()))?;
            {
                let mut waiters = self.shared.waiters.lock();
                for (proposal, output) in proposals.iter().zip(outputs) {
                    let Some((proposer, seq)) = proposal else {
                        continue;
                    };
                    if *proposer != self.shared.id {
                        continue;
                    }
                    if let Some(waiter) = waiters.remove(seq) {
                        let _ = waiter.send(Ok(output));
                    }
                }
            }
            self.shared.applied.send_replace(last);
            let _ = self.shared.commands.send(Command::Applied(last));
            if last - self.durable_index >= self.snapshot_count {
                self.state_machine
                    .sync()
                    .map_err(|e| Error::StateMachine(e.to_string()))?;
                self.durable_index = last;
                let _ = self.shared.commands.send(Command::CompactLog(last));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BoxError;

    /// Sums the numbers proposed to it; persists nothing but the sum.
    struct Sum {
        applied: u64,
        total: u64,
    }

    impl StateMachine for Sum {
        type Output = u64;
        fn applied_index(&self) -> u64 {
            self.applied
        }
        fn apply(&mut self, entries: &[Committed], applied: u64) -> Result<Vec<u64>, BoxError> {
            let mut out = Vec::new();
            for e in entries {
                self.total += u64::from_be_bytes(e.data.as_ref().try_into()?);
                out.push(self.total);
            }
            self.applied = applied;
            Ok(out)
        }
        fn sync(&mut self) -> Result<(), BoxError> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn proposals_are_applied_in_order_and_reads_wait_for_them() -> Result<(), BoxError> {
        let dir = tempfile::tempdir()?;
        let mut config = NodeConfig::single(1, dir.path().to_path_buf());
        config.snapshot_count = 10;
        let node = Node::start(
            config,
            Sum {
                applied: 0,
                total: 0,
            },
        )?;
        let mut tasks = Vec::new();
        for i in 1..=50u64 {
            let node = node.clone();
            tasks.push(tokio::spawn(async move {
                node.propose(i.to_be_bytes().to_vec()).await
            }));
        }
        let mut outputs = Vec::new();
        for t in tasks {
            outputs.push(t.await??);
        }
        outputs.sort();
        assert_eq!(outputs.last().copied(), Some(50 * 51 / 2));
        outputs.dedup();
        assert_eq!(
            outputs.len(),
            50,
            "every proposal saw a distinct running total"
        );
        let index = node.read_index().await?;
        assert!(node.status().applied_index >= index);
        assert_eq!(node.status().leader, 1);
        node.shutdown();
        assert!(matches!(
            node.propose(vec![0; 8]).await,
            Err(Error::Stopped)
        ));
        Ok(())
    }

    #[tokio::test]
    async fn restart_replays_what_was_not_applied() -> Result<(), BoxError> {
        let dir = tempfile::tempdir()?;
        let node = Node::start(
            NodeConfig::single(1, dir.path().to_path_buf()),
            Sum {
                applied: 0,
                total: 0,
            },
        )?;
        for i in 1..=5u64 {
            node.propose(i.to_be_bytes().to_vec()).await?;
        }
        let applied = node.status().applied_index;
        node.shutdown();
        // A state machine that lost everything gets the whole log again.
        let node = Node::start(
            NodeConfig::single(1, dir.path().to_path_buf()),
            Sum {
                applied: 0,
                total: 0,
            },
        )?;
        node.read_index().await?;
        assert!(
            node.status().applied_index > applied,
            "a new term's entry follows the replay"
        );
        assert_eq!(node.propose(100u64.to_be_bytes().to_vec()).await?, 115);
        node.shutdown();
        Ok(())
    }
}
