//! The in-process transport: raft messages between the members of one
//! process, routed by (group, member), through filters that drop, delay or
//! duplicate them.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use raft::prelude::{Message, MessageType};

use crate::SnapshotSource;
use crate::raft_transport::{EventSender, PeerEvent};
use crate::raft_transport::{GroupEndpoint, GroupId, RaftTransport};

/// What becomes of one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Deliver,
    Drop,
    /// Delivered after this long (later messages may overtake it).
    Delay(Duration),
    /// Delivered twice.
    Duplicate,
}

/// Decides the fate of a message; the first filter that does not say
/// [`Verdict::Deliver`] wins.
pub(crate) type Filter = Box<dyn Fn(&Message) -> Verdict + Send + Sync>;

/// One member's end of a group.
struct Route {
    events: EventSender,
    snapshot_source: Arc<dyn SnapshotSource>,
    members_blob: Arc<dyn Fn() -> Vec<u8> + Send + Sync>,
    snap_dir: PathBuf,
    /// The peers raft last named: messages to others are unreachable.
    peers: HashSet<u64>,
}

/// The network of one test process.
pub(crate) struct Hub {
    /// Delayed messages wait on this runtime's timers.
    runtime: tokio::runtime::Handle,
    routes: Mutex<HashMap<(GroupId, u64), Route>>,
    filters: RwLock<Vec<(u64, Filter)>>,
    next_id: AtomicU64,
}

impl Hub {
    /// Must be called inside a tokio runtime.
    pub(crate) fn new() -> Arc<Hub> {
        Arc::new(Hub {
            runtime: tokio::runtime::Handle::current(),
            routes: Mutex::new(HashMap::new()),
            filters: RwLock::new(Vec::new()),
            next_id: AtomicU64::new(1),
        })
    }

    /// Attaches a member's group; what was attached for it before is gone.
    pub(crate) fn connect(self: &Arc<Self>, endpoint: GroupEndpoint) -> Arc<dyn RaftTransport> {
        let member = endpoint.member;
        let events = endpoint.events.clone();
        self.routes.lock().insert(
            (endpoint.group, member),
            Route {
                events: endpoint.events,
                snapshot_source: endpoint.snapshot_source,
                members_blob: endpoint.members_blob,
                snap_dir: endpoint.snap_dir,
                peers: HashSet::new(),
            },
        );
        Arc::new(InProcess {
            member,
            events,
            hub: self.clone(),
        })
    }

    /// Adds a filter; returns its ID for [`Self::remove_filter`].
    pub(crate) fn add_filter(&self, filter: Filter) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.filters.write().push((id, filter));
        id
    }

    pub(crate) fn remove_filter(&self, id: u64) {
        self.filters.write().retain(|(f, _)| *f != id);
    }

    pub(crate) fn clear_filters(&self) {
        self.filters.write().clear();
    }

    fn verdict(&self, message: &Message) -> Verdict {
        self.filters
            .read()
            .iter()
            .map(|(_, filter)| filter(message))
            .find(|v| *v != Verdict::Deliver)
            .unwrap_or(Verdict::Deliver)
    }

    /// Tells member `to` of `group` something; false when it is not attached
    /// or has stopped.
    pub(crate) fn deliver(&self, group: GroupId, to: u64, event: PeerEvent) -> bool {
        match self.routes.lock().get(&(group, to)) {
            Some(route) => route.events.send(event),
            None => false,
        }
    }

    fn send_one(self: &Arc<Self>, group: GroupId, message: Message) {
        let (from, to) = (message.from, message.to);
        let verdict = self.verdict(&message);
        if message.msg_type == MessageType::MsgSnapshot {
            if verdict == Verdict::Drop {
                self.deliver(group, from, PeerEvent::SnapshotSent { to, ok: false });
            } else {
                self.send_snapshot(group, message);
            }
            return;
        }
        let delivered = match verdict {
            Verdict::Drop => true,
            Verdict::Deliver => self.deliver(group, to, PeerEvent::Message(message)),
            Verdict::Duplicate => {
                self.deliver(group, to, PeerEvent::Message(message.clone()))
                    && self.deliver(group, to, PeerEvent::Message(message))
            }
            Verdict::Delay(delay) => {
                let hub = self.clone();
                self.runtime.spawn(async move {
                    tokio::time::sleep(delay).await;
                    hub.deliver(group, to, PeerEvent::Message(message));
                });
                true
            }
        };
        if !delivered {
            self.deliver(group, from, PeerEvent::Unreachable(to));
        }
    }

    /// Writes the sender's snapshot into the receiver's directory on a
    /// thread of its own, as the gRPC transport streams it.
    fn send_snapshot(self: &Arc<Self>, group: GroupId, message: Message) {
        let (from, to) = (message.from, message.to);
        let hub = self.clone();
        std::thread::spawn(move || {
            let ok = hub.copy_snapshot(group, message).is_ok();
            hub.deliver(group, from, PeerEvent::SnapshotSent { to, ok });
        });
    }

    fn copy_snapshot(&self, group: GroupId, message: Message) -> Result<(), crate::BoxError> {
        let (from, to) = (message.from, message.to);
        let (source, members, dir) = {
            let routes = self.routes.lock();
            let sender = routes.get(&(group, from)).ok_or("sender gone")?;
            let receiver = routes.get(&(group, to)).ok_or("receiver gone")?;
            (
                sender.snapshot_source.clone(),
                (sender.members_blob)(),
                receiver.snap_dir.clone(),
            )
        };
        std::fs::create_dir_all(&dir)?;
        let index = message.get_snapshot().get_metadata().index;
        let file = dir.join(format!(
            "{from}-{index}-{}.snap",
            self.next_id.fetch_add(1, Ordering::Relaxed)
        ));
        let mut out = std::fs::File::create(&file)?;
        source.write_snapshot(&mut out)?;
        let event = PeerEvent::SnapshotReceived {
            message,
            file,
            members,
        };
        if self.deliver(group, to, event) {
            Ok(())
        } else {
            Err("receiver gone".into())
        }
    }
}

/// One member's transport on a [`Hub`].
struct InProcess {
    member: u64,
    /// The group's event channel: tells this node's route from a newer one.
    events: EventSender,
    hub: Arc<Hub>,
}

impl RaftTransport for InProcess {
    fn send(&self, group: GroupId, messages: Vec<Message>) {
        for message in messages {
            let known = self
                .hub
                .routes
                .lock()
                .get(&(group, self.member))
                .is_some_and(|r| r.peers.contains(&message.to));
            if known {
                self.hub.send_one(group, message);
            } else {
                let to = message.to;
                self.hub
                    .deliver(group, self.member, PeerEvent::Unreachable(to));
            }
        }
    }

    fn set_peers(&self, group: GroupId, peers: &[(u64, Vec<String>)]) {
        if let Some(route) = self.hub.routes.lock().get_mut(&(group, self.member)) {
            route.peers = peers.iter().map(|(id, _)| *id).collect();
        }
    }

    fn detach(&self, group: GroupId) {
        let mut routes = self.hub.routes.lock();
        // A member restarted meanwhile attached a route of its own: keep it.
        if routes
            .get(&(group, self.member))
            .is_some_and(|route| route.events.same(&self.events))
        {
            routes.remove(&(group, self.member));
        }
    }
}

/// Drops what `from` members send to `to` members: a one-way partition.
pub(crate) fn one_way(from: &[u64], to: &[u64]) -> Filter {
    let (from, to): (HashSet<u64>, HashSet<u64>) =
        (from.iter().copied().collect(), to.iter().copied().collect());
    Box::new(move |m| {
        if from.contains(&m.from) && to.contains(&m.to) {
            Verdict::Drop
        } else {
            Verdict::Deliver
        }
    })
}

/// Drops everything between the two sides, both ways.
pub(crate) fn partition(a: &[u64], b: &[u64]) -> Filter {
    let (there, back) = (one_way(a, b), one_way(b, a));
    Box::new(move |m| match there(m) {
        Verdict::Deliver => back(m),
        verdict => verdict,
    })
}

/// Drops every message of these types.
pub(crate) fn drop_types(types: &[MessageType]) -> Filter {
    let types = types.to_vec();
    Box::new(move |m| {
        if types.contains(&m.msg_type) {
            Verdict::Drop
        } else {
            Verdict::Deliver
        }
    })
}

/// Drops, duplicates and delays (by up to `max_delay`) each a share of all
/// messages, in percent, chosen by a generator seeded with `seed`.
pub(crate) fn chaos(
    seed: u64,
    drop: u64,
    duplicate: u64,
    delay: u64,
    max_delay: Duration,
) -> Filter {
    let state = Mutex::new(seed.max(1));
    Box::new(move |_| {
        let roll = {
            // xorshift64: deterministic for a seed, good enough for a dice.
            let mut x = state.lock();
            *x ^= *x << 13;
            *x ^= *x >> 7;
            *x ^= *x << 17;
            *x
        };
        let percent = roll % 100;
        if percent < drop {
            Verdict::Drop
        } else if percent < drop + duplicate {
            Verdict::Duplicate
        } else if percent < drop + duplicate + delay {
            let micros = (roll >> 8) % (max_delay.as_micros() as u64).max(1);
            Verdict::Delay(Duration::from_micros(micros))
        } else {
            Verdict::Deliver
        }
    })
}
