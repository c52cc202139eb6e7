//! Putting a member together: open and check the log, make the raft node,
//! the shared state and the transport, hand the state machine to the apply
//! thread and the group to its raft thread.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use raft::RawNode;
use tokio::sync::watch;

use super::apply_loop::ApplyLoop;
use super::driver::Mailbox;
use super::raft_loop::RaftLoop;
use super::{Node, RaftThread, Shared, peer_urls};
use crate::metrics::RaftMetrics;
use crate::raft_log::RaftLog;
use crate::raft_transport::{GroupEndpoint, RaftTransport};
use crate::storage::LogStore;
use crate::{Error, NodeConfig, PeerInfo, PeerNetwork, SharedRaftLog, StateMachine, StopReason};

/// Makes the transport of a member's raft group, given what the transport
/// must reach of the group.
pub(crate) type Connect = Box<dyn FnOnce(GroupEndpoint) -> Arc<dyn RaftTransport> + Send>;

impl<O: Send + 'static> Node<O> {
    /// Opens the raft log (bootstrapping a new cluster's when it is new),
    /// replays what the state machine has not applied, and starts the raft
    /// and apply threads and the peer transport. Call inside a tokio runtime.
    pub fn start<S>(mut config: NodeConfig, state_machine: S) -> Result<Self, Error>
    where
        S: StateMachine<Output = O>,
    {
        let log = LogStore::open(&config.data_dir.join("raft"))?;
        let connect = grpc_transport(&mut config);
        Node::start_with(
            config,
            state_machine,
            (log, &RaftThread::one_group()),
            connect,
        )
    }

    /// Starts raft group `config.group` of a member that runs several,
    /// sharing `network`'s peer connections and `log`'s WAL and fsyncs with
    /// the member's other groups (as [`Node::start`] otherwise). The group's
    /// received snapshots go to `config.data_dir`.
    pub fn start_in<S>(
        config: NodeConfig,
        state_machine: S,
        network: &PeerNetwork,
        log: &SharedRaftLog,
    ) -> Result<Self, Error>
    where
        S: StateMachine<Output = O>,
    {
        let thread = log.raft_thread();
        let log = LogStore::open_in(log, config.group)?;
        let transport = network.transport();
        let connect: Connect = Box::new(move |endpoint: GroupEndpoint| {
            transport.attach(&endpoint);
            transport as Arc<dyn RaftTransport>
        });
        Node::start_with(config, state_machine, (log, thread), connect)
    }

    /// [`Node::start`] on any raft log, driven by `thread`, and any
    /// transport.
    pub(crate) fn start_with<S, L>(
        config: NodeConfig,
        state_machine: S,
        (log, thread): (L, &RaftThread),
        connect: Connect,
    ) -> Result<Self, Error>
    where
        S: StateMachine<Output = O>,
        L: RaftLog,
    {
        let mut state_machine = state_machine;
        restore_interrupted_snapshot(&mut state_machine, &log, &config.data_dir.join("snap"))?;
        let applied = state_machine.applied_index();
        let log = prepare_log(log, &config.initial_members, applied)?;
        let raw = RawNode::new(
            &raft_config(&config, applied)?,
            log,
            &crate::logger::raft_logger(),
        )?;
        let members = raw.store().members().to_vec();
        let mailbox = thread.mailbox();
        let (left_tx, left) = crossbeam_channel::bounded(0);
        let (released_tx, released) = crossbeam_channel::bounded(0);
        let shared = Arc::new(new_shared(
            &config,
            &raw,
            applied,
            (mailbox.clone(), left, released),
            members.clone(),
        ));

        let blob_shared = shared.clone();
        let transport = connect(GroupEndpoint {
            group: config.group,
            member: config.id,
            events: mailbox.events(),
            snapshot_source: state_machine.snapshot_source(),
            members_blob: Arc::new(move || {
                serde_json::to_vec(&*blob_shared.members.lock()).unwrap_or_default()
            }),
            snap_dir: config.data_dir.join("snap"),
            stopped: shared.stop_reason.subscribe(),
        });
        // A joining member knows its peers from what they said of
        // themselves until it has replayed the log that registers them.
        let reachable = if members.is_empty() {
            &config.join_members
        } else {
            &members
        };
        transport.set_peers(config.group, &peer_urls(reachable, config.id));

        let apply_loop = ApplyLoop::new(
            state_machine,
            shared.clone(),
            config.snapshot_count,
            released_tx,
        );
        let (apply, apply_thread) = thread
            .apply_thread()
            .attach(mailbox.slot(), Box::new(apply_loop))?;
        if thread.is_one_group() {
            shared.threads.lock().extend(apply_thread);
        }
        let raft_loop = RaftLoop::new(
            raw,
            config.group,
            (apply, left_tx),
            transport,
            shared.clone(),
            &config,
        );
        // A group whose apply thread runs is driven, or stopped: it never
        // leaves callers waiting on a thread that never started.
        match thread.attach(&mailbox, Box::new(raft_loop)) {
            Ok(raft) => shared.threads.lock().extend(raft),
            Err(e) => {
                shared.stop(StopReason::Failed(e.to_string()));
                return Err(e);
            }
        }
        Ok(Node { shared })
    }
}

/// Bootstraps a new cluster's log, and checks that the log holds what
/// comes after what the state machine has applied.
/// Finishes a snapshot restore a crash cut short. raft resets the log to a
/// snapshot from the leader before the state machine restores it, and the
/// file is deleted only once the restore is done: a state machine behind
/// the log's start, with that snapshot's file still there, restores it now
/// (as etcd restores its backend from its last snapshot file). Without the
/// file, or if it fails the restore (which leaves the state machine as it
/// was, and deletes the file as the apply thread would), `prepare_log`
/// refuses the start, saying what to do.
fn restore_interrupted_snapshot<S: StateMachine, L: RaftLog>(
    state_machine: &mut S,
    log: &L,
    snap_dir: &std::path::Path,
) -> Result<(), Error> {
    let first = log.first_index()?;
    if state_machine.applied_index() + 1 >= first {
        return Ok(());
    }
    let index = first - 1;
    let Some(file) = crate::transport::received_snapshot(snap_dir, index) else {
        return Ok(());
    };
    tracing::info!(index, file = %file.display(), "restoring the snapshot whose restore was cut short");
    if let Err(e) = state_machine.restore(&file) {
        tracing::error!(index, error = %e, "the snapshot whose restore was cut short fails it");
    }
    let _ = std::fs::remove_file(&file);
    Ok(())
}

fn prepare_log<L: RaftLog>(
    mut log: L,
    initial_members: &[PeerInfo],
    applied: u64,
) -> Result<L, Error> {
    if log.is_new() && !initial_members.is_empty() {
        log.bootstrap(initial_members)?;
    }
    let (first, last) = (log.first_index()?, log.last_index()?);
    if applied > last {
        return Err(Error::Corrupt(format!(
            "the state machine has applied index {applied} but the raft log ends at {last}"
        )));
    }
    if applied + 1 < first {
        return Err(Error::Corrupt(format!(
            "the state machine has applied index {applied} but the raft log starts at {first}; \
             remove this member's data and add it to the cluster again"
        )));
    }
    if applied > log.hard_state().commit {
        // The commit index is written lazily; what was applied was committed.
        log.set_commit(applied)?;
    }
    log.set_applied(applied);
    Ok(log)
}

fn raft_config(config: &NodeConfig, applied: u64) -> Result<raft::Config, Error> {
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
    Ok(raft_config)
}

fn new_shared<O, L: RaftLog>(
    config: &NodeConfig,
    raw: &RawNode<L>,
    applied: u64,
    (commands, left, released): (
        Mailbox,
        crossbeam_channel::Receiver<()>,
        crossbeam_channel::Receiver<()>,
    ),
    members: Vec<PeerInfo>,
) -> Shared<O> {
    let boot_nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    Shared {
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
        members: Mutex::new(members),
        stopped: AtomicBool::new(false),
        stop_reason: watch::Sender::new(None),
        threads: Mutex::new(Vec::new()),
        left,
        released,
        tick_interval: config.tick_interval,
        election_ticks: config.election_ticks,
        metrics: RaftMetrics::default(),
    }
}

/// The gRPC transport on the configured peer listeners and TLS, serving
/// until the node stops.
fn grpc_transport(config: &mut NodeConfig) -> Connect {
    let cluster_id = config.cluster_id;
    let tls = config.peer_tls.take();
    let listeners = std::mem::take(&mut config.peer_listeners);
    Box::new(move |endpoint: GroupEndpoint| {
        let network = PeerNetwork::start(endpoint.member, cluster_id, tls, listeners);
        let transport = network.transport();
        transport.attach(&endpoint);
        let mut stopped = endpoint.stopped.clone();
        tokio::spawn(async move {
            let _ = stopped.wait_for(|r| r.is_some()).await;
            drop(network);
        });
        transport
    })
}
