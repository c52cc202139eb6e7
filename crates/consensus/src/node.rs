//! The raft thread, the apply thread, and the async handle over both.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;
use protobuf::Message as _;
use raft::prelude::{ConfChangeSingle, ConfChangeType, ConfChangeV2, Entry, EntryType, Snapshot};
use raft::{RawNode, SnapshotStatus, StateRole};
use tokio::sync::{oneshot, watch};

use crate::metrics::RaftMetrics;
use crate::storage::LogStore;
use crate::transport::{PeerEvent, Transport, TransportConfig};
use crate::{
    Committed, Error, MembershipChange, NodeConfig, PeerInfo, SnapshotSource, StateMachine, Status,
    StopReason,
};

type Reply<T> = oneshot::Sender<Result<T, Error>>;

/// What an entry's context says about it.
const KIND_STATE_MACHINE: u8 = 0;
/// A change of the member registry that is not a raft conf change
/// (published attributes, new peer URLs): JSON `MembershipChange` as data.
const KIND_MEMBER_UPDATE: u8 = 1;
/// A raft conf change; the context carries the member it is about.
const KIND_CONF_CHANGE: u8 = 2;

/// A learner may be promoted once it has this share of the leader's log,
/// as etcd requires.
const LEARNER_READY_PERCENT: u64 = 90;

enum Command {
    Propose {
        seq: u64,
        data: Vec<u8>,
    },
    ChangeMembership {
        seq: u64,
        change: MembershipChange,
    },
    /// Reads wait in `Shared::reads_waiting`.
    ReadsWaiting,
    TransferLeader {
        to: u64,
        reply: Reply<()>,
    },
    /// The apply thread reached a committed membership entry; `done` is
    /// signalled once it is stored.
    ApplyMembership {
        index: u64,
        entry: Entry,
        done: Sender<()>,
    },
    /// The apply thread has applied up to this index.
    Applied(u64),
    /// The state machine has made this index durable: the log before it can go.
    CompactLog(u64),
    /// Drop the log through this durable index, keeping nothing for slow
    /// followers.
    CompactLogThrough(u64),
    Stop,
}

/// What the apply thread is handed, in log order.
enum ApplyWork {
    Entries(Vec<Entry>),
    /// Install this snapshot file (raft's snapshot at `index`).
    Snapshot {
        index: u64,
        file: PathBuf,
    },
}

/// Entry context: kind, then who proposed it and their sequence number, so
/// only the proposing member wakes a waiter.
fn encode_context(kind: u8, proposer: u64, seq: u64) -> Vec<u8> {
    let mut ctx = Vec::with_capacity(17);
    ctx.push(kind);
    ctx.extend_from_slice(&proposer.to_be_bytes());
    ctx.extend_from_slice(&seq.to_be_bytes());
    ctx
}

fn decode_context(ctx: &[u8]) -> Option<(u8, u64, u64)> {
    let kind = *ctx.first()?;
    let proposer = u64::from_be_bytes(ctx.get(1..9)?.try_into().ok()?);
    let seq = u64::from_be_bytes(ctx.get(9..17)?.try_into().ok()?);
    Some((kind, proposer, seq))
}

/// The context of a bootstrap membership entry: the member it adds, from
/// nobody in particular.
pub(crate) fn membership_context(member: &PeerInfo) -> Result<Vec<u8>, Error> {
    let mut ctx = encode_context(KIND_CONF_CHANGE, 0, 0);
    ctx.extend(serde_json::to_vec(member).map_err(|e| Error::Corrupt(e.to_string()))?);
    Ok(ctx)
}

/// State shared by the handle and both threads.
struct Shared<O> {
    id: u64,
    commands: Sender<Command>,
    /// Proposals of this member waiting for their entry to be applied.
    waiters: Mutex<HashMap<u64, Reply<O>>>,
    /// Membership changes of this member waiting to be applied.
    member_waiters: Mutex<HashMap<u64, Reply<Vec<PeerInfo>>>>,
    /// Linearizable reads not yet taken by the raft thread. Only the read
    /// that finds it empty sends a command: the others ride along, so a read
    /// storm wakes the raft thread once per round instead of once per read.
    reads_waiting: Mutex<Vec<Reply<u64>>>,
    next_seq: AtomicU64,
    applied: watch::Sender<u64>,
    leader: watch::Sender<u64>,
    term: AtomicU64,
    commit: AtomicU64,
    last_index: AtomicU64,
    is_learner: AtomicBool,
    members: Mutex<Vec<PeerInfo>>,
    stopped: AtomicBool,
    /// Why the node stopped, once it has.
    stop_reason: watch::Sender<Option<StopReason>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    tick_interval: Duration,
    election_ticks: usize,
    metrics: RaftMetrics,
}

impl<O> Shared<O> {
    fn stop(&self, reason: StopReason) {
        if self.stopped.swap(true, Ordering::SeqCst) {
            return;
        }
        if let StopReason::Failed(reason) = &reason {
            tracing::error!(%reason, "raft node stopped");
        }
        self.fail_waiters();
        let _ = self.commands.send(Command::Stop);
        self.stop_reason.send_replace(Some(reason));
    }

    fn fail_waiters(&self) {
        for (_, waiter) in self.waiters.lock().drain() {
            let _ = waiter.send(Err(Error::Stopped));
        }
        for (_, waiter) in self.member_waiters.lock().drain() {
            let _ = waiter.send(Err(Error::Stopped));
        }
        for waiter in self.reads_waiting.lock().drain(..) {
            let _ = waiter.send(Err(Error::Stopped));
        }
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

impl<O: Send + 'static> Node<O> {
    /// Opens the raft log (bootstrapping a new cluster's when it is new),
    /// replays what the state machine has not applied, and starts the raft
    /// and apply threads and the peer transport. Call inside a tokio runtime.
    pub fn start<S>(config: NodeConfig, state_machine: S) -> Result<Self, Error>
    where
        S: StateMachine<Output = O>,
    {
        let mut store = LogStore::open(&config.data_dir.join("raft"))?;
        if store.is_new() && !config.initial_members.is_empty() {
            store.bootstrap(&config.initial_members)?;
        }
        let applied = state_machine.applied_index();
        if applied > store.last_index() {
            return Err(Error::Corrupt(format!(
                "the state machine has applied index {applied} but the raft log ends at {}",
                store.last_index()
            )));
        }
        if applied + 1 < store.first_index() {
            return Err(Error::Corrupt(format!(
                "the state machine has applied index {applied} but the raft log starts at {}; \
                 remove this member's data and add it to the cluster again",
                store.first_index()
            )));
        }
        if applied > store.hard_state().commit {
            // The commit index is written lazily; what was applied was committed.
            store.set_commit(applied)?;
        }
        store.set_applied(applied);
        let raft_config = raft::Config {
            id: config.id,
            election_tick: config.election_ticks,
            heartbeat_tick: config.heartbeat_ticks,
            applied,
            max_size_per_msg: 1024 * 1024,
            max_inflight_msgs: 256,
            // Proposals stepped between two Readies go to each follower in
            // one append, not one append each.
            batch_append: true,
            check_quorum: true,
            pre_vote: true,
            ..Default::default()
        };
        raft_config.validate()?;
        let members = store.members().to_vec();
        let raw = RawNode::new(&raft_config, store, &crate::logger::raft_logger())?;

        let (commands, command_rx) = crossbeam_channel::unbounded();
        let (apply_tx, apply_rx) = crossbeam_channel::unbounded();
        let (event_tx, event_rx) = crossbeam_channel::unbounded();
        let boot_nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        let shared = Arc::new(Shared {
            id: config.id,
            commands,
            waiters: Mutex::new(HashMap::new()),
            member_waiters: Mutex::new(HashMap::new()),
            reads_waiting: Mutex::new(Vec::new()),
            // Sequence numbers start at the boot time so that a restarted
            // member never reuses one still travelling in the log.
            next_seq: AtomicU64::new(boot_nanos),
            applied: watch::Sender::new(applied),
            leader: watch::Sender::new(0),
            term: AtomicU64::new(raw.raft.term),
            commit: AtomicU64::new(raw.raft.raft_log.committed),
            last_index: AtomicU64::new(raw.raft.raft_log.last_index()),
            is_learner: AtomicBool::new(false),
            members: Mutex::new(members.clone()),
            stopped: AtomicBool::new(false),
            stop_reason: watch::Sender::new(None),
            threads: Mutex::new(Vec::new()),
            tick_interval: config.tick_interval,
            election_ticks: config.election_ticks,
            metrics: RaftMetrics::default(),
        });

        let snapshot_source: Arc<dyn SnapshotSource> = state_machine.snapshot_source();
        let blob_shared = shared.clone();
        let transport = Transport::start(TransportConfig {
            self_id: config.id,
            cluster_id: config.cluster_id,
            tls: config.peer_tls,
            snap_dir: config.data_dir.join("snap"),
            snapshot_source,
            members_blob: Arc::new(move || {
                serde_json::to_vec(&*blob_shared.members.lock()).unwrap_or_default()
            }),
            events: event_tx,
        });
        let reachable = if members.is_empty() {
            &config.join_members
        } else {
            &members
        };
        transport.set_peers(&peer_urls(reachable, config.id));
        for listener in config.peer_listeners {
            let transport = transport.clone();
            let mut stop = shared.stop_reason.subscribe();
            tokio::spawn(async move {
                let shutdown = async move {
                    let _ = stop.wait_for(|r| r.is_some()).await;
                };
                if let Err(e) = transport.serve(listener, shutdown).await {
                    tracing::error!("peer listener failed: {e}");
                }
            });
        }

        let raft_loop = RaftLoop {
            raw,
            commands: command_rx,
            events: event_rx,
            apply: apply_tx,
            transport,
            shared: shared.clone(),
            tick_interval: config.tick_interval,
            // etcd retries an unanswered ReadIndex after 500 ms.
            read_retry: (config.tick_interval * 5).max(Duration::from_millis(500)),
            pending_reads: Vec::new(),
            proposals: Vec::new(),
            proposal_seqs: Vec::new(),
            reads_in_flight: HashMap::new(),
            next_read_ctx: 0,
            received_snapshot: None,
            catch_up_entries: config.snapshot_count.clamp(1, 5000),
        };
        let apply_loop = ApplyLoop {
            state_machine,
            work: apply_rx,
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

    fn next_seq(&self) -> u64 {
        self.shared.next_seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Replicates `data` and returns what the state machine made of it, once
    /// this member has applied it. Dropping the future abandons the wait, not
    /// the proposal.
    pub async fn propose(&self, data: Vec<u8>) -> Result<O, Error> {
        let metrics = &self.shared.metrics;
        metrics.proposal_started();
        let result = self
            .submit(&self.shared.waiters, |seq| Command::Propose { seq, data })
            .await;
        metrics.proposal_ended(result.is_err());
        result
    }

    /// The counters behind the member's consensus metrics.
    pub fn metrics(&self) -> &RaftMetrics {
        &self.shared.metrics
    }

    /// Changes the membership and returns the members once this member has
    /// applied the change.
    pub async fn change_membership(
        &self,
        change: MembershipChange,
    ) -> Result<Vec<PeerInfo>, Error> {
        self.submit(&self.shared.member_waiters, |seq| {
            Command::ChangeMembership { seq, change }
        })
        .await
    }

    /// Registers a waiter under a new sequence number, sends the command
    /// made for it, and waits for the apply that answers it.
    async fn submit<T>(
        &self,
        waiters: &Mutex<HashMap<u64, Reply<T>>>,
        command: impl FnOnce(u64) -> Command,
    ) -> Result<T, Error> {
        let seq = self.next_seq();
        let (tx, rx) = oneshot::channel();
        waiters.lock().insert(seq, tx);
        let _forget = WaiterGuard { waiters, seq };
        self.send_command(command(seq))?;
        rx.await.map_err(|_| Error::Stopped)?
    }

    fn send_command(&self, command: Command) -> Result<(), Error> {
        if self.shared.stopped.load(Ordering::SeqCst) {
            return Err(Error::Stopped);
        }
        self.shared
            .commands
            .send(command)
            .map_err(|_| Error::Stopped)
    }

    /// A linearizable read barrier: returns once this member has applied
    /// everything committed when the read arrived (raft's ReadIndex, batched
    /// with every read that arrives meanwhile).
    pub async fn read_index(&self) -> Result<u64, Error> {
        let (tx, rx) = oneshot::channel();
        let first = {
            let mut waiting = self.shared.reads_waiting.lock();
            waiting.push(tx);
            waiting.len() == 1
        };
        if first && let Err(e) = self.send_command(Command::ReadsWaiting) {
            // Whoever rode along with this read is failed with it.
            self.shared.fail_waiters();
            return Err(e);
        }
        let index = rx.await.map_err(|_| Error::Stopped)??;
        let mut applied = self.shared.applied.subscribe();
        applied
            .wait_for(|applied| *applied >= index)
            .await
            .map_err(|_| Error::Stopped)?;
        Ok(index)
    }

    /// Hands leadership to `to` and waits until it has it (etcd's MoveLeader).
    pub async fn transfer_leader(&self, to: u64) -> Result<(), Error> {
        let (tx, rx) = oneshot::channel();
        self.send_command(Command::TransferLeader { to, reply: tx })?;
        rx.await.map_err(|_| Error::Stopped)??;
        let mut leader = self.shared.leader.subscribe();
        let timeout = self.shared.tick_interval * (self.shared.election_ticks as u32) * 2;
        match tokio::time::timeout(timeout, leader.wait_for(|l| *l == to)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(Error::Stopped),
            Err(_) => Err(Error::LeaderTransferTimeout),
        }
    }

    /// Waits until some leader is known, or `timeout` passes.
    pub async fn wait_leader(&self, timeout: Duration) -> Option<u64> {
        let mut leader = self.shared.leader.subscribe();
        match tokio::time::timeout(timeout, leader.wait_for(|l| *l != 0)).await {
            Ok(Ok(l)) => Some(*l),
            _ => None,
        }
    }

    pub fn id(&self) -> u64 {
        self.shared.id
    }

    /// The current raft term (cheap: read on every response header).
    pub fn term(&self) -> u64 {
        self.shared.term.load(Ordering::Relaxed)
    }

    pub fn is_learner(&self) -> bool {
        self.shared.is_learner.load(Ordering::Relaxed)
    }

    /// The member registry as this member has applied it.
    pub fn members(&self) -> Vec<PeerInfo> {
        self.shared.members.lock().clone()
    }

    pub fn status(&self) -> Status {
        let s = &self.shared;
        Status {
            id: s.id,
            leader: *s.leader.borrow(),
            term: s.term.load(Ordering::Relaxed),
            commit_index: s.commit.load(Ordering::Relaxed),
            applied_index: *s.applied.borrow(),
            last_index: s.last_index.load(Ordering::Relaxed),
            is_learner: s.is_learner.load(Ordering::Relaxed),
        }
    }

    /// Resolves when the node stops, with why.
    pub async fn stopped(&self) -> StopReason {
        let mut rx = self.shared.stop_reason.subscribe();
        match rx.wait_for(|r| r.is_some()).await {
            Ok(reason) => reason.clone().unwrap_or(StopReason::Shutdown),
            Err(_) => StopReason::Shutdown,
        }
    }

    /// Drops the log through `index` (at most the applied index), keeping
    /// no entries for slow followers: a member that needs any of them gets a
    /// snapshot instead. For a log that does not hold the state machine's
    /// history, as after a restore from a backup. The state machine must
    /// have made `index` durable.
    pub fn compact_log_through(&self, index: u64) {
        let _ = self.shared.commands.send(Command::CompactLogThrough(index));
    }

    /// Stops both threads and waits for them; applied work is kept.
    pub fn shutdown(&self) {
        self.shared.stop(StopReason::Shutdown);
        let threads: Vec<_> = self.shared.threads.lock().drain(..).collect();
        for thread in threads {
            let _ = thread.join();
        }
    }
}

fn peer_urls(members: &[PeerInfo], self_id: u64) -> Vec<(u64, Vec<String>)> {
    members
        .iter()
        .filter(|m| m.id != self_id)
        .map(|m| (m.id, m.peer_urls.clone()))
        .collect()
}

/// Forgets a waiter when its caller goes away.
struct WaiterGuard<'a, T> {
    waiters: &'a Mutex<HashMap<u64, Reply<T>>>,
    seq: u64,
}

impl<T> Drop for WaiterGuard<'_, T> {
    fn drop(&mut self) {
        self.waiters.lock().remove(&self.seq);
    }
}

/// Runs a thread's loop; an error or a panic (raft-rs panics on broken
/// invariants) stops the node rather than leave callers waiting on a dead
/// thread.
fn stop_on_failure<O>(shared: &Shared<O>, run: impl FnOnce() -> Result<(), Error>) {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => shared.stop(StopReason::Failed(e.to_string())),
        Err(panic) => shared.stop(StopReason::Failed(panic_message(&*panic))),
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let text = panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into());
    format!("panicked: {text}")
}

struct RaftLoop<O> {
    raw: RawNode<LogStore>,
    commands: Receiver<Command>,
    events: Receiver<PeerEvent>,
    apply: Sender<ApplyWork>,
    transport: Arc<Transport>,
    shared: Arc<Shared<O>>,
    tick_interval: Duration,
    /// A ReadIndex unanswered for this long is asked again (raft drops them
    /// silently when the leader is unknown or has not committed in its term).
    read_retry: Duration,
    pending_reads: Vec<Reply<u64>>,
    /// Proposals taken from the queue since the last Ready, stepped as one
    /// message (one forward to the leader, one append for the log), with
    /// their waiters' sequence numbers.
    proposals: Vec<Entry>,
    proposal_seqs: Vec<u64>,
    reads_in_flight: HashMap<u64, (Instant, Vec<Reply<u64>>)>,
    next_read_ctx: u64,
    /// The last snapshot a peer streamed to us, until raft takes or drops it.
    received_snapshot: Option<(u64, PathBuf, Vec<PeerInfo>)>,
    /// Entries kept behind the compaction point for slow followers.
    catch_up_entries: u64,
}

impl<O> RaftLoop<O> {
    fn run(mut self) {
        let shared = self.shared.clone();
        stop_on_failure(&shared, || self.run_inner());
        for reply in self.pending_reads.drain(..) {
            let _ = reply.send(Err(Error::Stopped));
        }
        for (_, (_, replies)) in self.reads_in_flight.drain() {
            for reply in replies {
                let _ = reply.send(Err(Error::Stopped));
            }
        }
        self.shared.stop(StopReason::Shutdown);
        self.shared.fail_waiters();
    }

    fn run_inner(&mut self) -> Result<(), Error> {
        self.campaign_if_alone()?;
        let mut next_tick = Instant::now() + self.tick_interval;
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            crossbeam_channel::select! {
                recv(self.commands) -> command => {
                    let Ok(command) = command else { return Ok(()) };
                    if !self.handle(command)? {
                        return Ok(());
                    }
                }
                recv(self.events) -> event => {
                    if let Ok(event) = event {
                        self.handle_event(event)?;
                    }
                }
                default(wait) => {}
            }
            // Everything that queued up meanwhile joins this Ready.
            while let Ok(command) = self.commands.try_recv() {
                if !self.handle(command)? {
                    return Ok(());
                }
            }
            while let Ok(event) = self.events.try_recv() {
                self.handle_event(event)?;
            }
            let now = Instant::now();
            if now >= next_tick {
                self.raw.tick();
                // A fixed schedule, as etcd's ticker: counting from `now`
                // would let every late tick push the next one back, and a
                // busy loop would stretch the election timeout.
                next_tick += self.tick_interval;
                if next_tick <= now {
                    // Behind by more than a tick (a stall): drop the missed
                    // ones, as a Go ticker does, rather than fire a burst.
                    next_tick = now + self.tick_interval;
                }
                self.retry_stale_reads(now);
            }
            self.propose_queued();
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
                self.proposals.push(Entry {
                    data: data.into(),
                    context: encode_context(KIND_STATE_MACHINE, self.shared.id, seq).into(),
                    ..Default::default()
                });
                self.proposal_seqs.push(seq);
            }
            Command::ChangeMembership { seq, change } => {
                self.propose_queued();
                if let Err(e) = self.propose_membership(seq, change)
                    && let Some(waiter) = self.shared.member_waiters.lock().remove(&seq)
                {
                    let _ = waiter.send(Err(e));
                }
            }
            Command::ReadsWaiting => self
                .pending_reads
                .extend(self.shared.reads_waiting.lock().drain(..)),
            Command::TransferLeader { to, reply } => {
                self.propose_queued();
                self.transfer_leader(to, reply);
            }
            Command::ApplyMembership { index, entry, done } => {
                self.apply_membership(index, entry)?;
                let _ = done.send(());
            }
            Command::Applied(index) => {
                self.raw.advance_apply_to(index);
                self.raw.mut_store().set_applied(index);
                self.campaign_if_alone()?;
            }
            Command::CompactLog(durable) => {
                let index = durable.saturating_sub(self.catch_up_entries);
                if index > 0 {
                    self.raw.mut_store().compact(index)?;
                }
            }
            Command::CompactLogThrough(index) => {
                let index = index.min(self.raw.raft.raft_log.applied);
                if index > 0 {
                    self.raw.mut_store().compact(index)?;
                    tracing::info!(index, "compacted the raft log");
                }
            }
            Command::Stop => return Ok(false),
        }
        Ok(true)
    }

    fn handle_event(&mut self, event: PeerEvent) -> Result<(), Error> {
        match event {
            PeerEvent::Message(message) => {
                if let Err(e) = self.raw.step(message) {
                    tracing::debug!("raft refused a peer message: {e}");
                }
            }
            PeerEvent::Unreachable(id) => self.raw.report_unreachable(id),
            PeerEvent::SnapshotSent { to, ok } => {
                let status = if ok {
                    SnapshotStatus::Finish
                } else {
                    SnapshotStatus::Failure
                };
                self.raw.report_snapshot(to, status);
            }
            PeerEvent::SnapshotReceived {
                message,
                file,
                members,
            } => {
                let members: Vec<PeerInfo> = match serde_json::from_slice(&members) {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!("dropping a snapshot with an unreadable member list: {e}");
                        let _ = std::fs::remove_file(&file);
                        return Ok(());
                    }
                };
                let index = message.get_snapshot().get_metadata().index;
                if let Some((_, old, _)) = self.received_snapshot.replace((index, file, members)) {
                    let _ = std::fs::remove_file(old);
                }
                if let Err(e) = self.raw.step(message) {
                    tracing::debug!("raft refused a snapshot: {e}");
                }
            }
        }
        Ok(())
    }

    /// Steps the queued proposals as one MsgPropose, as RawNode::propose
    /// does for a single one.
    fn propose_queued(&mut self) {
        if self.proposals.is_empty() {
            return;
        }
        let message = raft::prelude::Message {
            msg_type: raft::prelude::MessageType::MsgPropose,
            from: self.shared.id,
            entries: std::mem::take(&mut self.proposals).into(),
            ..Default::default()
        };
        if let Err(e) = self.raw.raft.step(message) {
            // raft::Error is not Clone: each waiter gets its own.
            let dropped = e == raft::Error::ProposalDropped;
            let reason = e.to_string();
            let mut waiters = self.shared.waiters.lock();
            for seq in &self.proposal_seqs {
                if let Some(waiter) = waiters.remove(seq) {
                    let error = if dropped {
                        Error::NoLeader
                    } else {
                        Error::ProposalRefused(reason.clone())
                    };
                    let _ = waiter.send(Err(error));
                }
            }
        }
        self.proposal_seqs.clear();
    }

    fn propose_membership(&mut self, seq: u64, change: MembershipChange) -> Result<(), Error> {
        let members = self.raw.store().members().to_vec();
        let find = |id: u64| members.iter().find(|m| m.id == id).cloned();
        let (change_type, member) = match change {
            MembershipChange::Add(member) => {
                if find(member.id).is_some() {
                    return Err(Error::MemberExists);
                }
                if members
                    .iter()
                    .any(|m| m.peer_urls.iter().any(|u| member.peer_urls.contains(u)))
                {
                    return Err(Error::PeerUrlExists);
                }
                if member.is_learner && members.iter().any(|m| m.is_learner) {
                    return Err(Error::TooManyLearners);
                }
                let kind = if member.is_learner {
                    ConfChangeType::AddLearnerNode
                } else {
                    ConfChangeType::AddNode
                };
                (kind, member)
            }
            MembershipChange::Remove(id) => (
                ConfChangeType::RemoveNode,
                find(id).ok_or(Error::MemberNotFound)?,
            ),
            MembershipChange::Promote(id) => {
                let mut member = find(id).ok_or(Error::MemberNotFound)?;
                if !member.is_learner {
                    return Err(Error::MemberNotLearner);
                }
                self.check_learner_ready(id)?;
                member.is_learner = false;
                (ConfChangeType::AddNode, member)
            }
            MembershipChange::UpdatePeerUrls { id, peer_urls } => {
                find(id).ok_or(Error::MemberNotFound)?;
                if members
                    .iter()
                    .any(|m| m.id != id && m.peer_urls.iter().any(|u| peer_urls.contains(u)))
                {
                    return Err(Error::PeerUrlExists);
                }
                return self
                    .propose_update(seq, MembershipChange::UpdatePeerUrls { id, peer_urls });
            }
            publish @ MembershipChange::Publish { .. } => {
                return self.propose_update(seq, publish);
            }
        };
        let cc = ConfChangeV2 {
            changes: vec![ConfChangeSingle {
                change_type,
                node_id: member.id,
                ..Default::default()
            }]
            .into(),
            ..Default::default()
        };
        let mut context = encode_context(KIND_CONF_CHANGE, self.shared.id, seq);
        context.extend(serde_json::to_vec(&member).map_err(|e| Error::Corrupt(e.to_string()))?);
        self.raw
            .propose_conf_change(context, cc)
            .map_err(proposal_error)
    }

    /// Registry changes that are not raft conf changes travel as normal
    /// entries marked as the consensus layer's.
    fn propose_update(&mut self, seq: u64, update: MembershipChange) -> Result<(), Error> {
        let context = encode_context(KIND_MEMBER_UPDATE, self.shared.id, seq);
        let data = serde_json::to_vec(&update).map_err(|e| Error::Corrupt(e.to_string()))?;
        self.raw.propose(context, data).map_err(proposal_error)
    }

    /// etcd promotes a learner only when it holds most of the leader's log;
    /// only the leader knows, so a follower lets the promotion through.
    fn check_learner_ready(&self, id: u64) -> Result<(), Error> {
        let raft = &self.raw.raft;
        if raft.state != StateRole::Leader {
            return Ok(());
        }
        let matched = raft.prs().get(id).map_or(0, |p| p.matched);
        let committed = raft.raft_log.committed;
        if matched * 100 < committed * LEARNER_READY_PERCENT {
            return Err(Error::LearnerNotReady);
        }
        Ok(())
    }

    /// Applies a committed membership entry to raft and the registry, in log
    /// order (the apply thread sends it before reporting the index applied).
    fn apply_membership(&mut self, index: u64, entry: Entry) -> Result<(), Error> {
        let Some((kind, proposer, seq)) = decode_context(&entry.context) else {
            return Err(Error::Corrupt(format!(
                "membership entry {index} has no context"
            )));
        };
        let mut members = self.raw.store().members().to_vec();
        let mut conf_state = None;
        let mut removed_self = false;
        match kind {
            KIND_CONF_CHANGE => {
                let cc = ConfChangeV2::parse_from_bytes(&entry.data)?;
                let member: PeerInfo = serde_json::from_slice(&entry.context[17..])
                    .map_err(|e| Error::Corrupt(format!("membership entry {index}: {e}")))?;
                conf_state = Some(self.raw.apply_conf_change(&cc)?);
                for change in cc.changes.iter() {
                    members.retain(|m| m.id != change.node_id);
                    match change.change_type {
                        ConfChangeType::RemoveNode => {
                            removed_self |= change.node_id == self.shared.id
                        }
                        ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                            let mut m = member.clone();
                            m.is_learner = change.change_type == ConfChangeType::AddLearnerNode;
                            members.push(m);
                        }
                    }
                }
            }
            KIND_MEMBER_UPDATE => {
                let update: MembershipChange = serde_json::from_slice(&entry.data)
                    .map_err(|e| Error::Corrupt(format!("membership entry {index}: {e}")))?;
                match update {
                    MembershipChange::UpdatePeerUrls { id, peer_urls } => {
                        if let Some(m) = members.iter_mut().find(|m| m.id == id) {
                            m.peer_urls = peer_urls;
                        }
                    }
                    MembershipChange::Publish {
                        id,
                        name,
                        client_urls,
                    } => {
                        if let Some(m) = members.iter_mut().find(|m| m.id == id) {
                            m.name = name;
                            m.client_urls = client_urls;
                        }
                    }
                    other => {
                        return Err(Error::Corrupt(format!(
                            "membership entry {index} carries {other:?} as a normal entry"
                        )));
                    }
                }
            }
            other => {
                return Err(Error::Corrupt(format!(
                    "entry {index} has unknown kind {other}"
                )));
            }
        }
        members.sort_by_key(|m| m.id);
        self.raw
            .mut_store()
            .set_membership(members.clone(), conf_state)?;
        self.transport
            .set_peers(&peer_urls(&members, self.shared.id));
        *self.shared.members.lock() = members.clone();
        self.publish_status();
        if proposer == self.shared.id
            && let Some(waiter) = self.shared.member_waiters.lock().remove(&seq)
        {
            let _ = waiter.send(Ok(members));
        }
        if removed_self {
            self.shared.stop(StopReason::Removed);
        }
        Ok(())
    }

    fn transfer_leader(&mut self, to: u64, reply: Reply<()>) {
        let raft = &self.raw.raft;
        if raft.state != StateRole::Leader {
            let _ = reply.send(Err(Error::NotLeader));
            return;
        }
        if to == self.shared.id {
            let _ = reply.send(Ok(()));
            return;
        }
        if !raft.prs().conf().voters().contains(to) {
            let _ = reply.send(Err(Error::BadLeaderTransferee));
            return;
        }
        self.raw.transfer_leader(to);
        let _ = reply.send(Ok(()));
    }

    /// A lone voter need not wait out an election timeout; raft lets it
    /// campaign once its membership entries are applied.
    fn campaign_if_alone(&mut self) -> Result<(), Error> {
        let raft = &self.raw.raft;
        if raft.state != StateRole::Leader
            && raft.prs().is_singleton()
            && raft.promotable()
            && raft.raft_log.applied >= raft.raft_log.committed
        {
            self.raw.campaign()?;
        }
        Ok(())
    }

    fn issue_reads(&mut self) {
        // One ReadIndex round at a time, as etcd's read loop: reads that
        // arrive meanwhile share the next round, so a read storm costs a few
        // heartbeat rounds instead of one per batch.
        if self.pending_reads.is_empty() || !self.reads_in_flight.is_empty() {
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
        // The leader keys pending reads by context: it must be unique across
        // the cluster, or one member's read would swallow another's.
        let mut request_ctx = Vec::with_capacity(16);
        request_ctx.extend_from_slice(&self.shared.id.to_be_bytes());
        request_ctx.extend_from_slice(&ctx.to_be_bytes());
        self.raw.read_index(request_ctx);
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
        self.transport.send(ready.take_messages());
        if !ready.snapshot().is_empty() {
            self.install_snapshot(ready.snapshot())?;
        }
        let committed = ready.take_committed_entries();
        self.hand_to_apply(committed)?;
        for read in ready.take_read_states() {
            let ctx = read
                .request_ctx
                .get(8..16)
                .and_then(|c| c.try_into().ok())
                .map(u64::from_be_bytes)
                .unwrap_or(0);
            if let Some((_, replies)) = self.reads_in_flight.remove(&ctx) {
                for reply in replies {
                    let _ = reply.send(Ok(read.index));
                }
            }
        }
        let sync = ready.must_sync();
        let persisting = Instant::now();
        self.raw
            .mut_store()
            .persist_ready(ready.entries(), ready.hs(), sync)?;
        if sync {
            self.shared.metrics.fsynced(persisting.elapsed());
        }
        self.transport.send(ready.take_persisted_messages());
        // advance_append, not advance: entries are applied on the apply
        // thread, which reports its progress with Command::Applied.
        let mut light = self.raw.advance_append(ready);
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().note_commit(commit);
        }
        self.transport.send(light.take_messages());
        self.hand_to_apply(light.take_committed_entries())?;
        self.publish_status();
        Ok(())
    }

    /// raft accepted a snapshot a peer streamed: reset the log to it and
    /// have the apply thread load the state machine from its file.
    fn install_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), Error> {
        let meta = snapshot.get_metadata();
        let Some((index, file, members)) = self.received_snapshot.take() else {
            return Err(Error::Corrupt(format!(
                "raft applies snapshot {} that never arrived",
                meta.index
            )));
        };
        if index != meta.index {
            let _ = std::fs::remove_file(&file);
            return Err(Error::Corrupt(format!(
                "raft applies snapshot {} but {index} arrived",
                meta.index
            )));
        }
        tracing::info!(index, "installing a snapshot from the leader");
        self.raw.mut_store().apply_snapshot(meta, members.clone())?;
        self.transport
            .set_peers(&peer_urls(&members, self.shared.id));
        *self.shared.members.lock() = members;
        self.apply
            .send(ApplyWork::Snapshot { index, file })
            .map_err(|_| Error::Stopped)
    }

    fn hand_to_apply(&self, entries: Vec<Entry>) -> Result<(), Error> {
        if entries.is_empty() {
            return Ok(());
        }
        self.apply
            .send(ApplyWork::Entries(entries))
            .map_err(|_| Error::Stopped)
    }

    fn publish_status(&self) {
        let raft = &self.raw.raft;
        let s = &self.shared;
        let leader_changed = s.leader.send_if_modified(|l| {
            let changed = *l != raft.leader_id;
            *l = raft.leader_id;
            changed
        });
        if leader_changed && raft.leader_id != raft::INVALID_ID {
            s.metrics.leader_changed();
        }
        s.term.store(raft.term, Ordering::Relaxed);
        s.commit.store(raft.raft_log.committed, Ordering::Relaxed);
        s.last_index
            .store(raft.raft_log.last_index(), Ordering::Relaxed);
        s.is_learner.store(
            raft.prs().conf().learners().contains(&s.id),
            Ordering::Relaxed,
        );
    }
}

fn proposal_error(e: raft::Error) -> Error {
    match e {
        raft::Error::ProposalDropped => Error::NoLeader,
        other => Error::Raft(other),
    }
}

struct ApplyLoop<S: StateMachine> {
    state_machine: S,
    work: Receiver<ApplyWork>,
    shared: Arc<Shared<S::Output>>,
    snapshot_count: u64,
    /// The last index the state machine has made durable.
    durable_index: u64,
}

impl<S: StateMachine> ApplyLoop<S> {
    fn run(mut self) {
        let shared = self.shared.clone();
        stop_on_failure(&shared, || self.run_inner());
    }

    fn run_inner(&mut self) -> Result<(), Error> {
        let mut next: Option<ApplyWork> = None;
        loop {
            let work = match next.take() {
                Some(work) => work,
                None => match self.work.recv() {
                    Ok(work) => work,
                    Err(_) => return Ok(()),
                },
            };
            if self.shared.stopped.load(Ordering::SeqCst) {
                return Ok(());
            }
            match work {
                ApplyWork::Snapshot { index, file } => {
                    let restored = self.state_machine.restore(&file);
                    let _ = std::fs::remove_file(&file);
                    restored.map_err(|e| {
                        Error::StateMachine(format!("restoring snapshot {index}: {e}"))
                    })?;
                    self.durable_index = self.state_machine.applied_index();
                    self.report_applied(index);
                }
                ApplyWork::Entries(mut batch) => {
                    // Whatever else is committed already goes into the same
                    // apply, up to a snapshot.
                    while let Ok(more) = self.work.try_recv() {
                        match more {
                            ApplyWork::Entries(entries) => batch.extend(entries),
                            snapshot => {
                                next = Some(snapshot);
                                break;
                            }
                        }
                    }
                    self.apply_entries(batch)?;
                }
            }
        }
    }

    fn apply_entries(&mut self, batch: Vec<Entry>) -> Result<(), Error> {
        let Some(last) = batch.last().map(|e| e.index) else {
            return Ok(());
        };
        let already_applied = self.state_machine.applied_index();
        let mut committed = Vec::new();
        let mut proposals = Vec::new();
        for entry in batch {
            if entry.index <= already_applied {
                // Replayed, or covered by a snapshot. Membership entries are
                // raft's own and are applied to raft regardless.
                if entry.entry_type != EntryType::EntryNormal || is_member_update(&entry) {
                    self.flush(&mut committed, &mut proposals, None)?;
                    self.apply_membership(entry)?;
                }
                continue;
            }
            match entry.entry_type {
                EntryType::EntryNormal if is_member_update(&entry) => {
                    self.flush(&mut committed, &mut proposals, Some(entry.index - 1))?;
                    self.apply_membership(entry)?;
                }
                EntryType::EntryNormal if !entry.data.is_empty() => {
                    proposals.push(decode_context(&entry.context));
                    committed.push(Committed {
                        index: entry.index,
                        term: entry.term,
                        data: entry.data,
                    });
                }
                EntryType::EntryNormal => {}
                EntryType::EntryConfChange => {
                    return Err(Error::Corrupt(format!(
                        "entry {} is a v1 conf change, which Cairn never proposes",
                        entry.index
                    )));
                }
                EntryType::EntryConfChangeV2 => {
                    self.flush(&mut committed, &mut proposals, Some(entry.index - 1))?;
                    self.apply_membership(entry)?;
                }
            }
        }
        self.flush(&mut committed, &mut proposals, Some(last))?;
        self.report_applied(last);
        if last.saturating_sub(self.durable_index) >= self.snapshot_count {
            self.state_machine
                .sync()
                .map_err(|e| Error::StateMachine(e.to_string()))?;
            self.durable_index = last;
            let _ = self.shared.commands.send(Command::CompactLog(last));
        }
        Ok(())
    }

    /// Applies the collected state-machine entries, recording `applied_index`
    /// (when given) with them, and wakes their proposers.
    fn flush(
        &mut self,
        committed: &mut Vec<Committed>,
        proposals: &mut Vec<Option<(u8, u64, u64)>>,
        applied_index: Option<u64>,
    ) -> Result<(), Error> {
        let Some(applied_index) = applied_index else {
            return Ok(());
        };
        if committed.is_empty() && applied_index <= self.state_machine.applied_index() {
            return Ok(());
        }
        let outputs = self
            .state_machine
            .apply(committed, applied_index)
            .map_err(|e| Error::StateMachine(e.to_string()))?;
        {
            let mut waiters = self.shared.waiters.lock();
            for (proposal, output) in proposals.iter().zip(outputs) {
                let Some((_, proposer, seq)) = proposal else {
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
        committed.clear();
        proposals.clear();
        Ok(())
    }

    /// Has the raft thread apply a membership entry, and waits: the registry
    /// and conf state must be stored before the state machine records an
    /// applied index past the entry, since raft never replays below it.
    fn apply_membership(&self, entry: Entry) -> Result<(), Error> {
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        self.shared
            .commands
            .send(Command::ApplyMembership {
                index: entry.index,
                entry,
                done: done_tx,
            })
            .map_err(|_| Error::Stopped)?;
        done_rx.recv().map_err(|_| Error::Stopped)
    }

    fn report_applied(&self, index: u64) {
        self.shared.applied.send_if_modified(|a| {
            let changed = *a < index;
            *a = (*a).max(index);
            changed
        });
        let _ = self.shared.commands.send(Command::Applied(index));
    }
}

fn is_member_update(entry: &Entry) -> bool {
    entry.entry_type == EntryType::EntryNormal && entry.context.first() == Some(&KIND_MEMBER_UPDATE)
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

    struct NoSnapshots;

    impl SnapshotSource for NoSnapshots {
        fn write_snapshot(&self, _out: &mut dyn std::io::Write) -> Result<u64, BoxError> {
            Err("a lone test member sends no snapshots".into())
        }
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
        fn snapshot_source(&self) -> Arc<dyn SnapshotSource> {
            Arc::new(NoSnapshots)
        }
        fn restore(&mut self, _file: &std::path::Path) -> Result<(), BoxError> {
            Err("not used".into())
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
        assert_eq!(node.wait_leader(Duration::from_secs(5)).await, Some(1));
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
        assert_eq!(
            node.members().len(),
            1,
            "the bootstrap entry registered the member"
        );
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
        node.wait_leader(Duration::from_secs(5)).await;
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
        node.wait_leader(Duration::from_secs(5)).await;
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
