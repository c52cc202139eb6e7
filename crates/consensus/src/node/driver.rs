//! The raft thread: one OS thread drives every raft group of a member that
//! shares a [`crate::SharedRaftLog`] (as TiKV's raftstore batch system),
//! and a group with a log of its own ([`super::Node::start`]) alone.
//!
//! Each group's commands and peer events arrive on the one queue of its
//! thread, tagged with the group's slot, so the thread blocks on one
//! channel. Once woken it drains the queue, ticks the awake groups that
//! are due, and handles the Readies of every group in rounds: each group
//! sends its messages and hands its Ready's records to the log unwritten,
//! then one write and one fsync cover them all, then each group sends what
//! waited for the fsync and advances. Under load one wakeup, one write and
//! one fsync serve many groups' Readies instead of one each, and the
//! messages of all of them to one peer queue up together for its stream.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;

use super::apply_thread::ApplyThread;
use super::{Command, STORAGE_FULL_RETRY, guarded, panic_message};
use crate::raft_transport::{EventSender, PeerEvent};
use crate::{Error, StopReason};

/// A Ready's write and fsync slower than this is logged, as etcd's WAL
/// warns of a sync over a second.
const SLOW_SYNC: Duration = Duration::from_secs(1);

/// Mail taken from the queue before the groups' Readies are handled.
const MAX_MAIL_PER_ROUND: usize = 4096;

/// Tells the groups of all raft threads apart, so that what was queued for
/// a group that has stopped never reaches a newer one with its group ID.
static NEXT_SLOT: AtomicU64 = AtomicU64::new(1);

/// What a raft thread's queue carries.
pub(super) enum Mail {
    Command(u64, Command),
    Event(u64, PeerEvent),
    /// A new group to drive, under its slot.
    Attach(u64, Box<dyn Driven>),
}

/// What the raft thread asks of one raft group (a `RaftLoop`).
pub(super) trait Driven: Send {
    /// Before the group's first round.
    fn start(&mut self) -> Result<(), Error>;
    /// Returns false when the group should stop.
    fn handle(&mut self, command: Command) -> Result<bool, Error>;
    fn handle_event(&mut self, event: PeerEvent) -> Result<(), Error>;
    /// When the group ticks next; None while it sleeps.
    fn next_tick(&self) -> Option<Instant>;
    /// Ticks when due, and steps the proposals and reads queued up.
    fn prepare(&mut self, now: Instant) -> Result<(), Error>;
    fn has_ready(&self) -> bool;
    /// The first half of a Ready: sends what need not wait for the fsync,
    /// hands committed entries on, hands the Ready's records to the log
    /// unwritten. Returns whether the Ready must be synced before its
    /// second half.
    fn write_ready(&mut self) -> Result<bool, Error>;
    /// Writes what the log was handed, and fsyncs when `sync`: on a shared
    /// log, what every group handed over, in one write and one fsync.
    fn flush(&mut self, sync: bool) -> Result<(), Error>;
    /// The second half, once the write is durable: `synced` is how long
    /// the write and fsync took, when the Ready needed one.
    fn finish_ready(&mut self, synced: Option<Duration>) -> Result<(), Error>;
    /// After the round's Readies.
    fn end_round(&mut self);
    /// Whether the group's node was asked to stop.
    fn stopped(&self) -> bool;
    /// Stops the group's node for `reason` (its waiters fail).
    fn fail(&self, reason: StopReason);
    /// The group leaves its raft thread: its transport forgets it and what
    /// still waits on it fails.
    fn finish(self: Box<Self>);
}

/// Where a group's commands go: its raft thread's queue.
#[derive(Clone)]
pub(super) struct Mailbox {
    slot: u64,
    queue: Sender<Mail>,
}

impl Mailbox {
    /// The group's slot, which tells it apart on its threads.
    pub(super) fn slot(&self) -> u64 {
        self.slot
    }

    pub(super) fn send(&self, command: Command) -> Result<(), Error> {
        self.queue
            .send(Mail::Command(self.slot, command))
            .map_err(|_| Error::Stopped)
    }

    /// The group's peer events, for its transport.
    pub(super) fn events(&self) -> EventSender {
        let (slot, queue) = (self.slot, self.queue.clone());
        EventSender::new(move |event| queue.send(Mail::Event(slot, event)).is_ok())
    }
}

/// A raft thread, started when a group is attached and none runs, ending
/// when its last group has left. Its queue outlives it, so nothing sent
/// while one thread ends and the next starts is lost.
#[derive(Clone)]
pub(crate) struct RaftThread {
    inner: Arc<ThreadInner>,
}

struct ThreadInner {
    queue: Sender<Mail>,
    receiver: Receiver<Mail>,
    /// Whether a thread drives the queue. Starting one and ending one
    /// hold this lock, so a group is never attached to a thread on its way
    /// out.
    running: Mutex<bool>,
    /// A thread of one group, which its node joins on shutdown; a shared
    /// one ends on its own when its last group leaves.
    one_group: bool,
    /// The apply thread of the same groups.
    apply: ApplyThread,
}

impl RaftThread {
    /// The raft thread of the groups on one shared log.
    pub(crate) fn shared() -> RaftThread {
        RaftThread::new(false)
    }

    /// The raft thread of one group with a log of its own.
    pub(crate) fn one_group() -> RaftThread {
        RaftThread::new(true)
    }

    fn new(one_group: bool) -> RaftThread {
        let (queue, receiver) = crossbeam_channel::unbounded();
        RaftThread {
            inner: Arc::new(ThreadInner {
                queue,
                receiver,
                running: Mutex::new(false),
                one_group,
                apply: ApplyThread::new(),
            }),
        }
    }

    /// The apply thread of this thread's groups.
    pub(super) fn apply_thread(&self) -> &ApplyThread {
        &self.inner.apply
    }

    /// Whether the thread serves one group, which joins it on shutdown.
    pub(super) fn is_one_group(&self) -> bool {
        self.inner.one_group
    }

    /// A new group's mailbox on this thread's queue.
    pub(super) fn mailbox(&self) -> Mailbox {
        Mailbox {
            slot: NEXT_SLOT.fetch_add(1, Ordering::Relaxed),
            queue: self.inner.queue.clone(),
        }
    }

    /// Hands `group` (whose mailbox is `mailbox`) to the thread, starting
    /// one when none runs; returns the thread to join when it is the
    /// group's own.
    pub(super) fn attach(
        &self,
        mailbox: &Mailbox,
        group: Box<dyn Driven>,
    ) -> Result<Option<std::thread::JoinHandle<()>>, Error> {
        let mut running = self.inner.running.lock();
        let attached = self.inner.queue.send(Mail::Attach(mailbox.slot, group));
        if attached.is_err() || *running {
            return attached.map(|_| None).map_err(|_| Error::Stopped);
        }
        let driver = Driver {
            thread: self.clone(),
            groups: HashMap::new(),
        };
        let handle = std::thread::Builder::new()
            .name("raft".into())
            .spawn(move || driver.run())
            .map_err(|e| Error::Corrupt(format!("cannot start the raft thread: {e}")))?;
        *running = true;
        Ok(self.inner.one_group.then_some(handle))
    }
}

/// Why a group left in the middle of a write.
enum Left {
    /// Asked to stop.
    Stopped,
    /// Its write failed, for this reason.
    Failed(String),
}

struct Driver {
    thread: RaftThread,
    groups: HashMap<u64, Box<dyn Driven>>,
}

impl Driver {
    fn run(mut self) {
        // The loop guards every call into a group; a panic of its own
        // would otherwise leave the groups' callers waiting forever.
        if let Err(reason) = guarded(|| {
            self.run_inner();
            Ok(())
        }) {
            let slots: Vec<u64> = self.groups.keys().copied().collect();
            for slot in slots {
                self.drop_group(slot, Some(reason.clone()));
            }
            *self.thread.inner.running.lock() = false;
        }
    }

    fn run_inner(&mut self) {
        let receiver = self.thread.inner.receiver.clone();
        loop {
            if self.groups.is_empty() {
                let mut running = self.thread.inner.running.lock();
                match receiver.try_recv() {
                    Ok(mail) => {
                        drop(running);
                        self.deliver(mail);
                    }
                    Err(_) => {
                        *running = false;
                        return;
                    }
                }
            } else {
                // Asleep, a group is timed by nothing: wait for what wakes it.
                let next_tick = self.groups.values().filter_map(|g| g.next_tick()).min();
                // The queue never disconnects: the thread holds a sender.
                let mail = match next_tick {
                    Some(at) => receiver.recv_deadline(at).ok(),
                    None => receiver.recv().ok(),
                };
                if let Some(mail) = mail {
                    self.deliver(mail);
                }
            }
            // Everything that queued up meanwhile joins this round, up to a
            // bound: a flood must not hold back the Readies.
            for mail in receiver.try_iter().take(MAX_MAIL_PER_ROUND) {
                self.deliver(mail);
            }
            let now = Instant::now();
            let slots: Vec<u64> = self.groups.keys().copied().collect();
            for &slot in &slots {
                self.call(slot, |g| g.prepare(now));
            }
            self.handle_readies();
            for slot in slots {
                if let Some(group) = self.groups.get_mut(&slot) {
                    group.end_round();
                }
            }
        }
    }

    fn deliver(&mut self, mail: Mail) {
        match mail {
            Mail::Attach(slot, group) => {
                self.groups.insert(slot, group);
                self.call(slot, |g| g.start());
            }
            Mail::Command(slot, command) => {
                let Some(group) = self.groups.get_mut(&slot) else {
                    return;
                };
                match guarded(|| group.handle(command)) {
                    Ok(true) => {}
                    Ok(false) => self.drop_group(slot, None),
                    Err(reason) => self.drop_group(slot, Some(reason)),
                }
            }
            Mail::Event(slot, event) => {
                if self.groups.contains_key(&slot) {
                    self.call(slot, |g| g.handle_event(event));
                } else if let PeerEvent::SnapshotReceived { file, .. } = event {
                    // Whoever takes a received snapshot deletes its file.
                    let _ = std::fs::remove_file(file);
                }
            }
        }
    }

    /// Runs `f` on the group in `slot`, if it is still here; a group that
    /// fails stops, alone.
    fn call<T>(
        &mut self,
        slot: u64,
        f: impl FnOnce(&mut dyn Driven) -> Result<T, Error>,
    ) -> Option<T> {
        let group = self.groups.get_mut(&slot)?;
        match guarded(|| f(group.as_mut())) {
            Ok(value) => Some(value),
            Err(reason) => {
                self.drop_group(slot, Some(reason));
                None
            }
        }
    }

    fn drop_group(&mut self, slot: u64, failure: Option<String>) {
        let Some(group) = self.groups.remove(&slot) else {
            return;
        };
        if let Some(reason) = failure {
            group.fail(StopReason::Failed(reason));
        }
        let _ = guarded(|| {
            group.finish();
            Ok(())
        });
    }

    /// Rounds of Readies until no group has one: each round hands every
    /// group's Ready to the log, writes and fsyncs once, then finishes each.
    /// The apply thread is woken once the groups have handed on what they
    /// committed, so that it applies while the log syncs.
    fn handle_readies(&mut self) {
        let apply = self.thread.inner.apply.clone();
        loop {
            let ready: Vec<u64> = self
                .groups
                .iter()
                .filter(|(_, g)| g.has_ready())
                .map(|(slot, _)| *slot)
                .collect();
            if ready.is_empty() {
                apply.wake();
                return;
            }
            let round: Vec<(u64, bool)> = ready
                .into_iter()
                .filter_map(|slot| Some((slot, self.call(slot, |g| g.write_ready())?)))
                .collect();
            apply.wake();
            let synced = self.persist(&round);
            for (slot, must_sync) in round {
                let took = synced.filter(|_| must_sync);
                self.call(slot, |g| g.finish_ready(took));
            }
        }
    }

    /// Writes the round's Readies, with one fsync when some needs one;
    /// returns how long the write and fsync took. The groups of the round
    /// are gone when the write fails.
    fn persist(&mut self, round: &[(u64, bool)]) -> Option<Duration> {
        let sync = round.iter().any(|(_, must_sync)| *must_sync);
        let persisting = Instant::now();
        // Any group's flush writes what all of them handed over; a group
        // stopped while the disk is full leaves, and another writes.
        while let Some(&(by, _)) = round
            .iter()
            .rev()
            .filter(|(slot, _)| self.groups.contains_key(slot))
            .max_by_key(|(_, must_sync)| *must_sync)
        {
            match self.until_written(by, sync) {
                Ok(()) => {}
                Err(Left::Stopped) => continue,
                Err(Left::Failed(reason)) => {
                    // What the failed write held may be lost: none of these
                    // Readies' promises may go out.
                    for &(slot, _) in round {
                        self.drop_group(slot, Some(reason.clone()));
                    }
                    return None;
                }
            }
            if !sync {
                return None;
            }
            let took = persisting.elapsed();
            if took > SLOW_SYNC {
                // etcd's words, which its operators grep for.
                tracing::warn!(
                    groups = round.iter().filter(|(_, must_sync)| *must_sync).count(),
                    took = ?took,
                    expected = ?SLOW_SYNC,
                    "slow fdatasync"
                );
            }
            return Some(took);
        }
        None
    }

    /// Flushes the log of the group in `slot` (see [`Driven::flush`]). On a full disk the thread waits and
    /// tries again, as a very slow fsync would: nothing a Ready's persisted
    /// messages promise goes out before it is durable, a leader's followers
    /// stop hearing from it and elect another, and it steps down when it
    /// hears of the new term. Groups asked to stop meanwhile leave at once,
    /// so that their shutdown does not wait for space.
    fn until_written(&mut self, slot: u64, sync: bool) -> Result<(), Left> {
        let mut warned = false;
        loop {
            let Some(group) = self.groups.get_mut(&slot) else {
                return Err(Left::Stopped);
            };
            let result =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| group.flush(sync)));
            match result {
                Ok(Ok(())) => {
                    if warned {
                        tracing::info!("raft log written again: space came back");
                    }
                    return Ok(());
                }
                Ok(Err(e)) if e.is_storage_full() => {
                    if !warned {
                        tracing::error!("raft log write failed, retrying until space returns: {e}");
                        warned = true;
                    }
                    let stopped: Vec<u64> = self
                        .groups
                        .iter()
                        .filter(|(_, g)| g.stopped())
                        .map(|(slot, _)| *slot)
                        .collect();
                    for slot in stopped {
                        self.drop_group(slot, None);
                    }
                    if self.groups.contains_key(&slot) {
                        std::thread::sleep(STORAGE_FULL_RETRY);
                    }
                }
                Ok(Err(e)) => {
                    let reason = e.to_string();
                    self.drop_group(slot, Some(reason.clone()));
                    return Err(Left::Failed(reason));
                }
                Err(panic) => {
                    let reason = panic_message(&*panic);
                    self.drop_group(slot, Some(reason.clone()));
                    return Err(Left::Failed(reason));
                }
            }
        }
    }
}
