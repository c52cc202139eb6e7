//! The apply thread: one OS thread applies the committed work of every
//! group on a raft thread ([`super::driver`]), each group's in its log
//! order, so that a member with many groups does not wake one thread per
//! group for each round of Readies.
//!
//! The raft thread queues each group's work without waking anyone and
//! wakes the apply thread once a round's Readies have handed theirs on
//! (before the round's fsync, so applying overlaps it): one wakeup applies
//! what every group committed in the round, and a group's consecutive
//! batches go to its state machine as one.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use super::ApplyWork;
use crate::Error;

/// What the apply thread asks of one group (an `ApplyLoop`).
pub(super) trait Applying: Send {
    /// Applies `work` in order; false once the group is done (stopped, or
    /// failed and stopped), when the thread lets it go.
    fn apply(&mut self, work: Vec<ApplyWork>) -> bool;
}

enum Mail {
    Attach(u64, Box<dyn Applying>),
    Work(u64, ApplyWork),
    /// The group's raft side has gone: nothing more will come.
    Detach(u64),
}

/// An apply thread, started when a group is attached and none runs,
/// ending when its last group has gone.
#[derive(Clone)]
pub(super) struct ApplyThread {
    inner: Arc<Inner>,
}

struct Inner {
    queue: Mutex<Queue>,
    /// Signalled when mail waits.
    mail: Condvar,
}

struct Queue {
    mail: Vec<Mail>,
    running: bool,
}

impl ApplyThread {
    pub(super) fn new() -> ApplyThread {
        ApplyThread {
            inner: Arc::new(Inner {
                queue: Mutex::new(Queue {
                    mail: Vec::new(),
                    running: false,
                }),
                mail: Condvar::new(),
            }),
        }
    }

    /// Hands group `slot`'s state machine to the thread, starting one when
    /// none runs (returned, for a caller that joins it). The group's raft
    /// side sends its work with the returned sender, whose drop lets the
    /// group go.
    pub(super) fn attach(
        &self,
        slot: u64,
        group: Box<dyn Applying>,
    ) -> Result<(ApplySender, Option<std::thread::JoinHandle<()>>), Error> {
        let mut queue = self.inner.queue.lock();
        queue.mail.push(Mail::Attach(slot, group));
        let started = if queue.running {
            None
        } else {
            let thread = self.clone();
            let handle = std::thread::Builder::new()
                .name("apply".into())
                .spawn(move || thread.run())
                .map_err(|e| Error::Corrupt(format!("cannot start the apply thread: {e}")))?;
            queue.running = true;
            Some(handle)
        };
        self.inner.mail.notify_one();
        let sender = ApplySender {
            slot,
            thread: self.clone(),
        };
        Ok((sender, started))
    }

    /// Lets the thread apply what was queued since it last looked.
    pub(super) fn wake(&self) {
        if !self.inner.queue.lock().mail.is_empty() {
            self.inner.mail.notify_one();
        }
    }

    fn push(&self, mail: Mail) {
        self.inner.queue.lock().mail.push(mail);
    }

    fn run(self) {
        let mut groups: HashMap<u64, Box<dyn Applying>> = HashMap::new();
        loop {
            let mail = {
                let mut queue = self.inner.queue.lock();
                loop {
                    if !queue.mail.is_empty() {
                        break std::mem::take(&mut queue.mail);
                    }
                    if groups.is_empty() {
                        // Under the lock: an attach either came before and
                        // is in the mail, or sees the thread gone.
                        queue.running = false;
                        return;
                    }
                    self.inner.mail.wait(&mut queue);
                }
            };
            let mut work: Vec<(u64, Vec<ApplyWork>)> = Vec::new();
            let mut detached = Vec::new();
            for mail in mail {
                match mail {
                    Mail::Attach(slot, group) => {
                        groups.insert(slot, group);
                    }
                    Mail::Work(slot, item) => queue_work(&mut work, slot, item),
                    Mail::Detach(slot) => detached.push(slot),
                }
            }
            for (slot, items) in work {
                match groups.get_mut(&slot) {
                    Some(group) => {
                        if !group.apply(items) {
                            groups.remove(&slot);
                        }
                    }
                    None => discard(items),
                }
            }
            for slot in detached {
                groups.remove(&slot);
            }
        }
    }
}

/// Adds `item` to its group's work, merging consecutive entries into one
/// batch.
fn queue_work(work: &mut Vec<(u64, Vec<ApplyWork>)>, slot: u64, item: ApplyWork) {
    let items = match work.iter_mut().find(|(s, _)| *s == slot) {
        Some((_, items)) => items,
        None => {
            work.push((slot, Vec::new()));
            &mut work.last_mut().expect("just pushed").1
        }
    };
    match (items.last_mut(), item) {
        (Some(ApplyWork::Entries(batch)), ApplyWork::Entries(more)) => batch.extend(more),
        (_, item) => items.push(item),
    }
}

/// Work for a group that has gone; received snapshot files are deleted by
/// whoever takes them.
fn discard(items: Vec<ApplyWork>) {
    for item in items {
        if let ApplyWork::Snapshot { file, .. } = item {
            let _ = std::fs::remove_file(file);
        }
    }
}

/// Where a group's raft side queues its committed work.
pub(super) struct ApplySender {
    slot: u64,
    thread: ApplyThread,
}

impl ApplySender {
    /// Queues `work`; the raft thread wakes the apply thread when its
    /// round has handed everything on.
    pub(super) fn send(&self, work: ApplyWork) {
        self.thread.push(Mail::Work(self.slot, work));
    }
}

impl Drop for ApplySender {
    fn drop(&mut self) {
        self.thread.push(Mail::Detach(self.slot));
        self.thread.wake();
    }
}
