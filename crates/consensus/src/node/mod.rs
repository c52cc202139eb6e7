//! A raft member: the async [`Node`] handle ([`handle`]), how it is put
//! together ([`start`]), the raft thread that drives it and the member's
//! other groups on the same log ([`driver`]), the group's part of it
//! ([`raft_loop`], with the membership part in [`membership`]), the apply
//! thread of the same groups ([`apply_thread`]) and a group's part of it
//! ([`apply_loop`]).

mod apply_loop;
mod apply_thread;
mod driver;
mod handle;
mod hibernation;
mod membership;
mod raft_loop;
mod start;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;
use raft::prelude::Entry;
use tokio::sync::{oneshot, watch};

use crate::metrics::RaftMetrics;
use crate::{Error, MembershipChange, PeerInfo, StopReason};

type Reply<T> = oneshot::Sender<Result<T, Error>>;

/// What an entry's context says about it.
const KIND_STATE_MACHINE: u8 = 0;
/// A change of the member registry that is not a raft conf change
/// (published attributes, new peer URLs): JSON `MembershipChange` as data.
const KIND_MEMBER_UPDATE: u8 = 1;
/// A raft conf change; the context carries the member it is about.
const KIND_CONF_CHANGE: u8 = 2;

pub(crate) use driver::RaftThread;

/// What the handle and the apply thread ask of the raft thread.
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

/// State shared by the handle, the raft thread and the apply thread.
struct Shared<O> {
    id: u64,
    commands: driver::Mailbox,
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
    /// The raft and apply threads when they serve this group alone.
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Disconnected once the group has left its raft thread.
    left: Receiver<()>,
    /// Disconnected once the apply thread has let the group's state
    /// machine go.
    released: Receiver<()>,
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

/// The peers of `self_id` in `members`, as the transport wants them.
fn peer_urls(members: &[PeerInfo], self_id: u64) -> Vec<(u64, Vec<String>)> {
    members
        .iter()
        .filter(|m| m.id != self_id)
        .map(|m| (m.id, m.peer_urls.clone()))
        .collect()
}

/// How long the raft and apply threads wait before writing again to a full
/// disk.
const STORAGE_FULL_RETRY: Duration = Duration::from_secs(1);

/// Runs `run`, turning its error or panic into why it failed.
fn guarded<T>(run: impl FnOnce() -> Result<T, Error>) -> Result<T, String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(e.to_string()),
        Err(panic) => Err(panic_message(&*panic)),
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
