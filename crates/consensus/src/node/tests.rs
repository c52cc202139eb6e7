//! Members on the real WAL and gRPC transport.

use std::sync::Arc;
use std::time::Duration;

use crate::{
    BoxError, Committed, Error, Node, NodeConfig, PeerNetwork, SnapshotSource, StateMachine,
};

/// Sums the numbers proposed to it; persists nothing but the sum.
struct Sum {
    applied: u64,
    total: u64,
}

struct NoSnapshots;

impl SnapshotSource for NoSnapshots {
    fn write_snapshot(&self, _out: &mut dyn std::io::Write) -> std::io::Result<u64> {
        Err(std::io::Error::other(
            "a lone test member sends no snapshots",
        ))
    }
}

impl StateMachine for Sum {
    type Output = u64;
    type Error = std::io::Error;
    fn applied_index(&self) -> u64 {
        self.applied
    }
    fn apply(&mut self, entries: &[Committed], applied: u64) -> Result<Vec<u64>, Self::Error> {
        let mut out = Vec::new();
        for e in entries {
            let number = e.data.as_ref().try_into().map_err(std::io::Error::other)?;
            self.total += u64::from_be_bytes(number);
            out.push(self.total);
        }
        self.applied = applied;
        Ok(out)
    }
    fn sync(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
    fn snapshot_source(&self) -> Arc<dyn SnapshotSource> {
        Arc::new(NoSnapshots)
    }
    fn restore(&mut self, _file: &std::path::Path) -> Result<(), Self::Error> {
        Err(std::io::Error::other("a lone member is sent no snapshots"))
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

/// A state machine that holds entries past `hold` without applying them
/// (as a shard replica holds entries until they are sequenced): it reports
/// nothing past `hold` as applied, so the log must keep those entries.
struct Holding {
    sum: Sum,
    hold: u64,
}

impl StateMachine for Holding {
    type Output = u64;
    type Error = std::io::Error;
    fn applied_index(&self) -> u64 {
        self.sum.applied.min(self.hold)
    }
    fn apply(&mut self, entries: &[Committed], applied: u64) -> Result<Vec<u64>, Self::Error> {
        self.sum.apply(entries, applied)
    }
    fn sync(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
    fn snapshot_source(&self) -> Arc<dyn SnapshotSource> {
        Arc::new(NoSnapshots)
    }
    fn restore(&mut self, _file: &std::path::Path) -> Result<(), Self::Error> {
        Err(std::io::Error::other("a lone member is sent no snapshots"))
    }
}

#[tokio::test]
async fn the_log_keeps_what_the_state_machine_has_not_applied() -> Result<(), BoxError> {
    let dir = tempfile::tempdir()?;
    let config = || {
        let mut config = NodeConfig::single(1, dir.path().to_path_buf());
        config.snapshot_count = 10;
        config
    };
    let start = |hold, total| {
        Node::start(
            config(),
            Holding {
                sum: Sum {
                    applied: hold,
                    total,
                },
                hold,
            },
        )
    };
    let node = start(0, 0)?;
    node.wait_leader(Duration::from_secs(5)).await;
    node.propose(1u64.to_be_bytes().to_vec()).await?;
    let hold = node.status().applied_index;
    node.shutdown();
    // Held at `hold`: a hundred more entries, many compactions' worth.
    let node = start(hold, 1)?;
    node.wait_leader(Duration::from_secs(5)).await;
    for _ in 0..100 {
        node.propose(1u64.to_be_bytes().to_vec()).await?;
    }
    node.shutdown();
    // Restarted from `hold`, it gets every entry after it again.
    let node = start(hold, 1)?;
    node.wait_leader(Duration::from_secs(5)).await;
    assert_eq!(node.propose(1u64.to_be_bytes().to_vec()).await?, 102);
    node.shutdown();
    Ok(())
}

/// Three members, each running raft groups 0, 5 and 9 over one
/// [`PeerNetwork`] on real sockets and one [`crate::SharedRaftLog`]: every
/// group elects and commits on its own, and a member's groups share its one
/// connection per peer and its WAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_share_a_peer_network() -> Result<(), BoxError> {
    const GROUPS: [crate::GroupId; 3] = [crate::CLUSTER_GROUP, 5, 9];
    let dir = tempfile::tempdir()?;
    let mut listeners = Vec::new();
    let mut members = Vec::new();
    for id in 1..=3u64 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        members.push(crate::PeerInfo {
            id,
            name: format!("m{id}"),
            peer_urls: vec![format!("http://{}", listener.local_addr()?)],
            client_urls: Vec::new(),
            is_learner: false,
        });
        listeners.push(listener);
    }
    let mut networks = Vec::new();
    let mut nodes = Vec::new();
    let mut logs = Vec::new();
    for (listener, member) in listeners.into_iter().zip(&members) {
        let network = PeerNetwork::start(member.id, 77, None, vec![listener]);
        let log = crate::SharedRaftLog::open(&dir.path().join(format!("m{}-raft", member.id)))?;
        for group in GROUPS {
            let config = NodeConfig {
                cluster_id: 77,
                group,
                initial_members: members.clone(),
                tick_interval: Duration::from_millis(20),
                ..NodeConfig::single(
                    member.id,
                    dir.path().join(format!("m{}-g{group}", member.id)),
                )
            };
            let sum = Sum {
                applied: 0,
                total: 0,
            };
            nodes.push((group, Node::start_in(config, sum, &network, &log)?));
        }
        networks.push(network);
        logs.push(log);
    }
    for (group, node) in &nodes {
        let leader = node.wait_leader(Duration::from_secs(10)).await;
        assert!(
            leader.is_some_and(|l| (1..=3).contains(&l)),
            "group {group} has a leader: {leader:?}"
        );
    }
    // Each group's running total counts its own proposals only.
    for (i, group) in GROUPS.iter().enumerate() {
        let (_, node) = nodes
            .iter()
            .find(|(g, _)| g == group)
            .ok_or("every group has nodes")?;
        let value = 1000 * (i as u64 + 1);
        assert_eq!(node.propose(value.to_be_bytes().to_vec()).await?, value);
        assert_eq!(node.propose(1u64.to_be_bytes().to_vec()).await?, value + 1);
    }
    for (_, node) in &nodes {
        node.read_index().await?;
    }
    for log in &logs {
        assert!(log.fsyncs()? > 0, "the groups write through the shared log");
    }
    for (_, node) in &nodes {
        node.shutdown();
    }
    drop(networks);
    Ok(())
}

/// The threads of this process named `name`, once there are `expected`
/// of them or a few seconds have passed (a thread names itself once it
/// runs, and ends a little after its last work).
async fn threads_named(name: &str, expected: usize) -> Result<usize, BoxError> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let mut count = 0;
        for task in std::fs::read_dir("/proc/self/task")? {
            // A thread may end between the listing and the read.
            if let Ok(comm) = std::fs::read_to_string(task?.path().join("comm")) {
                count += usize::from(comm.trim_end() == name);
            }
        }
        if count == expected || std::time::Instant::now() > deadline {
            return Ok(count);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sixteen groups of a member on one [`crate::SharedRaftLog`] run on one
/// raft thread: each commits its own proposals, the Readies of groups
/// busy at once share fsyncs, a group shut down leaves the others running,
/// and the raft and apply threads end with the last group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_on_one_shared_log_share_one_raft_thread() -> Result<(), BoxError> {
    const GROUPS: u64 = 16;
    const PROPOSALS: u64 = 20;
    let dir = tempfile::tempdir()?;
    let network = PeerNetwork::start(1, 77, None, Vec::<tokio::net::TcpListener>::new());
    let log = crate::SharedRaftLog::open(&dir.path().join("raft"))?;
    let mut nodes = Vec::new();
    for group in 0..GROUPS {
        let config = NodeConfig {
            group,
            tick_interval: Duration::from_millis(20),
            ..NodeConfig::single(1, dir.path().join(format!("g{group}")))
        };
        let sum = Sum {
            applied: 0,
            total: 0,
        };
        nodes.push(Node::start_in(config, sum, &network, &log)?);
    }
    assert_eq!(
        threads_named("raft", 1).await?,
        1,
        "one raft thread for all groups"
    );
    assert_eq!(
        threads_named("apply", 1).await?,
        1,
        "one apply thread for all groups"
    );
    for node in &nodes {
        assert_eq!(node.wait_leader(Duration::from_secs(10)).await, Some(1));
    }
    let fsyncs_before = log.fsyncs()?;
    let mut tasks = Vec::new();
    for (group, node) in nodes.iter().enumerate() {
        let node = node.clone();
        tasks.push(tokio::spawn(async move {
            let mut outputs = Vec::new();
            for i in 1..=PROPOSALS {
                let value = (group as u64 + 1) * 1000 + i;
                outputs.push(node.propose(value.to_be_bytes().to_vec()).await?);
            }
            Ok::<_, Error>(outputs)
        }));
    }
    for (group, task) in tasks.into_iter().enumerate() {
        let outputs = task.await??;
        let base = (group as u64 + 1) * 1000;
        let expected: Vec<u64> = (1..=PROPOSALS)
            .scan(0, |total, i| {
                *total += base + i;
                Some(*total)
            })
            .collect();
        assert_eq!(
            outputs, expected,
            "group {group} applied its own proposals in order"
        );
    }
    let fsyncs = log.fsyncs()? - fsyncs_before;
    assert!(
        fsyncs < GROUPS * PROPOSALS,
        "{fsyncs} fsyncs for {} proposals each waiting for its own Ready",
        GROUPS * PROPOSALS
    );

    // One group stops; the others still commit on the same thread.
    let (stopped, running) = nodes.split_at(1);
    stopped[0].shutdown();
    assert_eq!(stopped[0].stopped().await, crate::StopReason::Shutdown);
    assert!(matches!(
        stopped[0].propose(1u64.to_be_bytes().to_vec()).await,
        Err(Error::Stopped)
    ));
    for node in running {
        node.propose(1u64.to_be_bytes().to_vec()).await?;
        node.read_index().await?;
    }
    assert_eq!(threads_named("raft", 1).await?, 1);
    for node in running {
        node.shutdown();
    }
    assert_eq!(
        threads_named("raft", 0).await?,
        0,
        "the raft thread ends with its last group"
    );
    assert_eq!(threads_named("apply", 0).await?, 0);

    // A group started again gets a new raft thread, and its log back.
    let config = NodeConfig {
        group: 3,
        tick_interval: Duration::from_millis(20),
        ..NodeConfig::single(1, dir.path().join("g3"))
    };
    let sum = Sum {
        applied: 0,
        total: 0,
    };
    drop(nodes);
    drop(log);
    let log = crate::SharedRaftLog::open(&dir.path().join("raft"))?;
    let node = Node::start_in(config, sum, &network, &log)?;
    assert_eq!(node.wait_leader(Duration::from_secs(10)).await, Some(1));
    assert_eq!(threads_named("raft", 1).await?, 1);
    node.read_index().await?;
    assert!(
        node.status().applied_index > PROPOSALS,
        "the group replayed its log"
    );
    node.shutdown();
    Ok(())
}

/// A `Sum` whose disk is full while `full` is set: it applies nothing and
/// says StorageFull, as the server's applier does short of room.
struct FullDisk {
    sum: Sum,
    full: Arc<std::sync::atomic::AtomicBool>,
}

impl StateMachine for FullDisk {
    type Output = u64;
    type Error = std::io::Error;
    fn applied_index(&self) -> u64 {
        self.sum.applied_index()
    }
    fn apply(&mut self, entries: &[Committed], applied: u64) -> Result<Vec<u64>, Self::Error> {
        if self.full.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(std::io::ErrorKind::StorageFull.into());
        }
        self.sum.apply(entries, applied)
    }
    fn sync(&mut self) -> Result<(), Self::Error> {
        self.sum.sync()
    }
    fn snapshot_source(&self) -> Arc<dyn SnapshotSource> {
        self.sum.snapshot_source()
    }
    fn restore(&mut self, file: &std::path::Path) -> Result<(), Self::Error> {
        self.sum.restore(file)
    }
}

#[tokio::test]
async fn a_full_disk_pauses_applying_until_space_returns() -> Result<(), BoxError> {
    let dir = tempfile::tempdir()?;
    let full = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let node = Node::start(
        NodeConfig::single(1, dir.path().to_path_buf()),
        FullDisk {
            sum: Sum {
                applied: 0,
                total: 0,
            },
            full: full.clone(),
        },
    )?;
    node.wait_leader(Duration::from_secs(5)).await;
    assert_eq!(node.propose(1u64.to_be_bytes().to_vec()).await?, 1);
    full.store(true, std::sync::atomic::Ordering::SeqCst);
    let waiting = tokio::spawn({
        let node = node.clone();
        async move { node.propose(2u64.to_be_bytes().to_vec()).await }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!waiting.is_finished(), "applied on a full disk");
    assert_eq!(node.status().leader, 1, "the node stopped on a full disk");
    full.store(false, std::sync::atomic::Ordering::SeqCst);
    let total = tokio::time::timeout(Duration::from_secs(5), waiting).await???;
    assert_eq!(total, 3, "applied once space came back, and once only");
    node.shutdown();
    Ok(())
}

#[test]
fn storage_full_is_found_through_the_state_machine_error() {
    /// A state machine's error with the io error as its source.
    #[derive(Debug, thiserror::Error)]
    #[error("applying paused")]
    struct NoRoom(#[source] std::io::Error);

    let full = Error::StateMachine {
        during: crate::StateMachineStep::Apply(7),
        source: Box::new(NoRoom(std::io::ErrorKind::StorageFull.into())),
    };
    assert!(full.is_storage_full());
    let other = Error::StateMachine {
        during: crate::StateMachineStep::Apply(7),
        source: Box::new(NoRoom(std::io::ErrorKind::PermissionDenied.into())),
    };
    assert!(!other.is_storage_full());
    assert!(Error::Io(std::io::ErrorKind::StorageFull.into()).is_storage_full());
    assert!(!Error::Stopped.is_storage_full());
}

/// A `Sum` whose snapshots are files holding "index total".
struct Restorable(Sum);

impl StateMachine for Restorable {
    type Output = u64;
    type Error = std::io::Error;
    fn applied_index(&self) -> u64 {
        self.0.applied_index()
    }
    fn apply(&mut self, entries: &[Committed], applied: u64) -> Result<Vec<u64>, Self::Error> {
        self.0.apply(entries, applied)
    }
    fn sync(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
    fn snapshot_source(&self) -> Arc<dyn SnapshotSource> {
        Arc::new(NoSnapshots)
    }
    fn restore(&mut self, file: &std::path::Path) -> Result<(), Self::Error> {
        let text = std::fs::read_to_string(file)?;
        let mut numbers = text.split_whitespace().map(str::parse::<u64>);
        match (numbers.next(), numbers.next()) {
            (Some(Ok(applied)), Some(Ok(total))) => {
                self.0 = Sum { applied, total };
                Ok(())
            }
            _ => Err(std::io::Error::other("not a snapshot")),
        }
    }
}

/// The data directory of a member that died restoring snapshot 10 from
/// its leader: raft had reset the log to it, the state machine had not
/// restored it. With the received file there (holding a total of 42) if
/// `with_file`.
fn died_restoring_snapshot_10(dir: &std::path::Path, with_file: bool) -> Result<(), BoxError> {
    use crate::raft_log::RaftLog as _;
    let members = NodeConfig::single(1, dir.to_path_buf()).initial_members;
    let mut log = crate::storage::LogStore::open(&dir.join("raft"))?;
    log.bootstrap(&members)?;
    let mut meta = raft::prelude::SnapshotMetadata {
        index: 10,
        term: 2,
        ..Default::default()
    };
    meta.mut_conf_state().voters = vec![1];
    log.apply_snapshot(&meta, members)?;
    let hard_state = raft::prelude::HardState {
        term: 2,
        vote: 1,
        commit: 10,
        ..Default::default()
    };
    log.persist_ready(&[], Some(&hard_state), true)?;
    if with_file {
        let snap = dir.join("snap");
        std::fs::create_dir(&snap)?;
        std::fs::write(
            snap.join(format!("{:016x}-{:016x}-0-0.snap", 2, 10)),
            "10 42",
        )?;
    }
    Ok(())
}

#[tokio::test]
async fn a_snapshot_restore_cut_short_is_finished_at_start() -> Result<(), BoxError> {
    let dir = tempfile::tempdir()?;
    died_restoring_snapshot_10(dir.path(), true)?;
    let node = Node::start(
        NodeConfig::single(1, dir.path().to_path_buf()),
        Restorable(Sum {
            applied: 0,
            total: 0,
        }),
    )?;
    node.wait_leader(Duration::from_secs(5)).await;
    // Sums on from the snapshot's 42.
    assert_eq!(node.propose(5u64.to_be_bytes().to_vec()).await?, 47);
    assert!(
        std::fs::read_dir(dir.path().join("snap"))?.next().is_none(),
        "the restored snapshot's file is left"
    );
    node.shutdown();

    // Without the file, or with one that fails the restore, there is
    // nothing to restore from: refused, saying what to do.
    for with_file in [false, true] {
        let dir = tempfile::tempdir()?;
        died_restoring_snapshot_10(dir.path(), with_file)?;
        if with_file {
            let snap = dir.path().join("snap");
            for file in std::fs::read_dir(&snap)? {
                std::fs::write(file?.path(), "damaged")?;
            }
        }
        match Node::start(
            NodeConfig::single(1, dir.path().to_path_buf()),
            Restorable(Sum {
                applied: 0,
                total: 0,
            }),
        ) {
            Err(Error::Corrupt(why)) => {
                assert!(why.contains("add it to the cluster again"), "{why}")
            }
            Err(e) => panic!("refused otherwise: {e}"),
            Ok(_) => panic!("started behind its log with no snapshot restored"),
        }
    }
    Ok(())
}

/// Applies anything, counting how often it is asked to make its state
/// durable.
struct CountsSyncs {
    applied: u64,
    syncs: Arc<std::sync::atomic::AtomicU64>,
}

impl StateMachine for CountsSyncs {
    type Output = ();
    type Error = std::io::Error;
    fn applied_index(&self) -> u64 {
        self.applied
    }
    fn apply(&mut self, entries: &[Committed], applied: u64) -> Result<Vec<()>, Self::Error> {
        self.applied = applied;
        Ok(vec![(); entries.len()])
    }
    fn sync(&mut self) -> Result<(), Self::Error> {
        self.syncs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
    fn snapshot_source(&self) -> Arc<dyn SnapshotSource> {
        Arc::new(NoSnapshots)
    }
    fn restore(&mut self, _file: &std::path::Path) -> Result<(), Self::Error> {
        Err(std::io::Error::other("a lone member is sent no snapshots"))
    }
}

/// Large entries make the state durable (and the log compactable, which
/// frees the memory holding them) long before `snapshot_count` entries.
#[tokio::test]
async fn large_entries_make_the_log_compactable_before_snapshot_count() -> Result<(), BoxError> {
    let dir = tempfile::tempdir()?;
    let syncs = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let node = Node::start(
        NodeConfig::single(1, dir.path().to_path_buf()),
        CountsSyncs {
            applied: 0,
            syncs: syncs.clone(),
        },
    )?;
    node.wait_leader(Duration::from_secs(5)).await;
    let value = vec![7u8; 512 << 10];
    // 20 MiB, then 20 more: the first half alone is under the threshold.
    for _ in 0..40 {
        node.propose(value.clone()).await?;
    }
    assert_eq!(syncs.load(std::sync::atomic::Ordering::SeqCst), 0);
    for _ in 0..40 {
        node.propose(value.clone()).await?;
    }
    assert_eq!(
        syncs.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "80 entries of 512 KiB, under the default snapshot_count of 100,000"
    );
    node.shutdown();
    Ok(())
}
