//! The queues of the raft and apply threads: a receiver that finds its
//! queue empty sleeps on a condition variable at once. crossbeam's
//! channels spin and then `sched_yield` several times before they sleep,
//! and on a member with many raft groups, whose threads are woken for one
//! small batch at a time, those yields were a good part of the CPU and of
//! the context switches.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

/// A queue of many senders and one receiver.
pub(super) fn queue<T>() -> (QueueSender<T>, QueueReceiver<T>) {
    let inner = Arc::new(Inner {
        state: Mutex::new(State {
            items: VecDeque::new(),
            senders: 1,
            receiving: true,
            waiting: false,
        }),
        ready: Condvar::new(),
    });
    (
        QueueSender {
            inner: inner.clone(),
        },
        QueueReceiver { inner },
    )
}

struct Inner<T> {
    state: Mutex<State<T>>,
    ready: Condvar,
}

struct State<T> {
    items: VecDeque<T>,
    senders: usize,
    /// False once the receiver is gone: sends fail.
    receiving: bool,
    /// The receiver sleeps: a send must wake it.
    waiting: bool,
}

pub(super) struct QueueSender<T> {
    inner: Arc<Inner<T>>,
}

impl<T> QueueSender<T> {
    /// Queues `item`; gives it back when the receiver is gone.
    pub(super) fn send(&self, item: T) -> Result<(), T> {
        let mut state = self.inner.state.lock();
        if !state.receiving {
            return Err(item);
        }
        state.items.push_back(item);
        if state.waiting {
            state.waiting = false;
            self.inner.ready.notify_one();
        }
        Ok(())
    }
}

impl<T> Clone for QueueSender<T> {
    fn clone(&self) -> Self {
        self.inner.state.lock().senders += 1;
        QueueSender {
            inner: self.inner.clone(),
        }
    }
}

impl<T> Drop for QueueSender<T> {
    fn drop(&mut self) {
        let mut state = self.inner.state.lock();
        state.senders -= 1;
        if state.senders == 0 && state.waiting {
            state.waiting = false;
            self.inner.ready.notify_one();
        }
    }
}

pub(super) struct QueueReceiver<T> {
    inner: Arc<Inner<T>>,
}

impl<T> QueueReceiver<T> {
    /// Everything queued, once something is, or until `deadline`; empty
    /// at the deadline, or once the queue is empty and every sender gone.
    pub(super) fn recv_all(&self, deadline: Option<Instant>) -> VecDeque<T> {
        let mut state = self.inner.state.lock();
        while state.items.is_empty() && state.senders > 0 {
            state.waiting = true;
            match deadline {
                Some(at) => {
                    if self.inner.ready.wait_until(&mut state, at).timed_out() {
                        state.waiting = false;
                        break;
                    }
                }
                None => self.inner.ready.wait(&mut state),
            }
        }
        std::mem::take(&mut state.items)
    }

    /// Everything queued now.
    pub(super) fn try_recv_all(&self) -> VecDeque<T> {
        std::mem::take(&mut self.inner.state.lock().items)
    }
}

impl<T> Drop for QueueReceiver<T> {
    fn drop(&mut self) {
        let items = {
            let mut state = self.inner.state.lock();
            state.receiving = false;
            std::mem::take(&mut state.items)
        };
        // Dropped outside the lock: an item's drop may send to this queue.
        drop(items);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn items_arrive_in_order_and_the_end_of_the_senders_is_seen() {
        let (tx, rx) = queue();
        let other = tx.clone();
        let sender = std::thread::spawn(move || {
            for i in 0..1000 {
                assert!(other.send(i).is_ok());
            }
        });
        let mut got = Vec::new();
        while got.len() < 1000 {
            got.extend(rx.recv_all(None));
        }
        sender.join().expect("the sender ran");
        assert_eq!(got, (0..1000).collect::<Vec<_>>());
        let waited = Instant::now();
        assert!(
            rx.recv_all(Some(waited + Duration::from_millis(50)))
                .is_empty()
        );
        assert!(waited.elapsed() >= Duration::from_millis(50));
        drop(tx);
        assert!(rx.recv_all(None).is_empty(), "no senders: no wait");
    }

    #[test]
    fn a_send_after_the_receiver_is_gone_fails() {
        let (tx, rx) = queue();
        drop(rx);
        assert_eq!(tx.send(7), Err(7));
    }
}
