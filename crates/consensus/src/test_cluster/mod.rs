//! An in-process raft cluster for tests, after TiKV's `test_raftstore`: N
//! members in one process, each a real [`Node`] on a real WAL in a temp
//! dir, with a [`Ledger`] as state machine, talking through an in-process
//! [`Hub`] whose filters drop, delay, duplicate or partition messages.

mod tests;
mod transport;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::node::RaftThread;
use crate::storage::LogStore;
use crate::{
    BoxError, CLUSTER_GROUP, Committed, GroupId, MembershipChange, Node, NodeConfig, PeerInfo,
    SnapshotSource, StateMachine, Status,
};
pub(crate) use transport::{Hub, Verdict, chaos, drop_types, one_way, partition};

/// How long a test waits for a condition before it fails. Long, so that a
/// loaded machine slows the tests down rather than fail them.
const WAIT: Duration = Duration::from_secs(10);

/// What a [`Ledger`] holds; shared with the test, which reads it.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct LedgerState {
    pub applied: u64,
    /// Every proposed number, in log order.
    pub values: Vec<u64>,
    /// Snapshots restored (not part of a snapshot).
    #[serde(skip)]
    pub restores: u32,
}

/// A state machine that records the numbers proposed to it. Its state
/// lives in memory, shared with whoever made it, so a member restarted on
/// the same state resumes as if it had been durable.
pub(crate) struct Ledger(Arc<Mutex<LedgerState>>);

impl SnapshotSource for Ledger {
    fn write_snapshot(&self, out: &mut dyn std::io::Write) -> std::io::Result<u64> {
        let state = self.0.lock().clone();
        serde_json::to_writer(out, &state)?;
        Ok(state.applied)
    }
}

impl StateMachine for Ledger {
    /// How many numbers the ledger holds after this one.
    type Output = u64;
    type Error = std::io::Error;

    fn applied_index(&self) -> u64 {
        self.0.lock().applied
    }

    fn apply(
        &mut self,
        entries: &[Committed],
        applied_index: u64,
    ) -> Result<Vec<u64>, Self::Error> {
        let mut state = self.0.lock();
        let mut outputs = Vec::with_capacity(entries.len());
        for entry in entries {
            let number = entry
                .data
                .as_ref()
                .try_into()
                .map_err(std::io::Error::other)?;
            state.values.push(u64::from_be_bytes(number));
            outputs.push(state.values.len() as u64);
        }
        state.applied = applied_index;
        Ok(outputs)
    }

    fn sync(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }

    fn snapshot_source(&self) -> Arc<dyn SnapshotSource> {
        Arc::new(Ledger(self.0.clone()))
    }

    fn restore(&mut self, file: &Path) -> Result<(), Self::Error> {
        let restored: LedgerState = serde_json::from_slice(&std::fs::read(file)?)?;
        let mut state = self.0.lock();
        let restores = state.restores + 1;
        *state = LedgerState {
            restores,
            ..restored
        };
        Ok(())
    }
}

/// Timings and sizes of a test cluster.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    pub tick: Duration,
    pub election_ticks: usize,
    pub snapshot_count: u64,
    pub hibernate: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            tick: Duration::from_millis(10),
            election_ticks: 10,
            snapshot_count: 10_000,
            hibernate: false,
        }
    }
}

/// One member of a test cluster.
pub(crate) struct Member {
    pub node: Node<u64>,
    pub ledger: Arc<Mutex<LedgerState>>,
}

pub(crate) struct Cluster {
    pub hub: Arc<Hub>,
    /// The raft group this cluster's nodes are; clusters of other groups
    /// can share the hub, as the groups of a member share its transport.
    group: GroupId,
    pub members: BTreeMap<u64, Member>,
    settings: Settings,
    dir: tempfile::TempDir,
}

pub(crate) fn peer(id: u64) -> PeerInfo {
    PeerInfo {
        id,
        name: format!("m{id}"),
        peer_urls: vec![format!("inproc://{id}")],
        client_urls: Vec::new(),
        is_learner: false,
    }
}

/// A test's result; errors say what went wrong.
pub(crate) type TestResult<T = ()> = Result<T, BoxError>;

impl Cluster {
    /// Starts voters 1..=n of a new cluster. Must be called inside a tokio
    /// runtime.
    pub(crate) fn new(n: u64, settings: Settings) -> TestResult<Cluster> {
        Cluster::on_hub(Hub::new(), CLUSTER_GROUP, n, settings)
    }

    /// Starts voters 1..=n of raft group `group` on `hub`.
    pub(crate) fn on_hub(
        hub: Arc<Hub>,
        group: GroupId,
        n: u64,
        settings: Settings,
    ) -> TestResult<Cluster> {
        let mut cluster = Cluster {
            hub,
            group,
            members: BTreeMap::new(),
            settings,
            dir: tempfile::tempdir()?,
        };
        let initial: Vec<PeerInfo> = (1..=n).map(peer).collect();
        for id in 1..=n {
            cluster.start(id, initial.clone(), Vec::new())?;
        }
        Ok(cluster)
    }

    /// Starts member `id` on a fresh ledger: one of a new cluster's
    /// `initial` members, or, with `initial` empty, joining the cluster of
    /// `join`.
    pub(crate) fn start(
        &mut self,
        id: u64,
        initial: Vec<PeerInfo>,
        join: Vec<PeerInfo>,
    ) -> TestResult<()> {
        let data_dir = self.dir.path().join(format!("m{id}"));
        let config = NodeConfig {
            id,
            cluster_id: 1,
            group: self.group,
            initial_members: initial,
            join_members: join,
            peer_listeners: Vec::new(),
            peer_tls: None,
            tick_interval: self.settings.tick,
            election_ticks: self.settings.election_ticks,
            heartbeat_ticks: 1,
            snapshot_count: self.settings.snapshot_count,
            hibernate: self.settings.hibernate,
            data_dir,
        };
        let ledger = Arc::new(Mutex::new(LedgerState::default()));
        let log = LogStore::open(&config.data_dir.join("raft"))?;
        let hub = self.hub.clone();
        let node = Node::start_with(
            config,
            Ledger(ledger.clone()),
            (log, &RaftThread::one_group()),
            Box::new(move |endpoint| hub.connect(endpoint)),
        )?;
        self.members.insert(id, Member { node, ledger });
        Ok(())
    }

    /// Adds member `id` to the cluster through `via`, and starts it.
    pub(crate) async fn add(&mut self, via: u64, id: u64, learner: bool) -> TestResult<()> {
        let member = PeerInfo {
            is_learner: learner,
            ..peer(id)
        };
        let members = self
            .node(via)
            .change_membership(MembershipChange::Add(member))
            .await?;
        self.start(id, Vec::new(), members)
    }

    pub(crate) fn node(&self, id: u64) -> &Node<u64> {
        &self.members[&id].node
    }

    pub(crate) fn status(&self, id: u64) -> Status {
        self.node(id).status()
    }

    pub(crate) fn ledger(&self, id: u64) -> LedgerState {
        self.members[&id].ledger.lock().clone()
    }

    pub(crate) fn ids(&self) -> Vec<u64> {
        self.members.keys().copied().collect()
    }

    /// Every member but `id`.
    pub(crate) fn others(&self, id: u64) -> Vec<u64> {
        self.ids().into_iter().filter(|m| *m != id).collect()
    }

    /// Waits until the members `among` agree on a leader that is one of
    /// them and knows it, and returns it.
    pub(crate) async fn leader_among(&self, among: &[u64]) -> TestResult<u64> {
        let mut found = 0;
        self.wait_until("a leader", || {
            let leaders: Vec<u64> = among.iter().map(|id| self.status(*id).leader).collect();
            found = leaders[0];
            leaders.iter().all(|l| *l == found)
                && among.contains(&found)
                && self.status(found).leader == found
        })
        .await?;
        Ok(found)
    }

    pub(crate) async fn leader(&self) -> TestResult<u64> {
        self.leader_among(&self.ids()).await
    }

    /// Proposes `value` through member `via`; fails when it is not applied
    /// within the test's patience.
    pub(crate) async fn propose(&self, via: u64, value: u64) -> TestResult<u64> {
        let proposal = self.node(via).propose(value.to_be_bytes().to_vec());
        Ok(within(proposal, "a proposal").await??)
    }

    /// Waits until the members `ids` hold exactly `values`.
    pub(crate) async fn wait_values(&self, ids: &[u64], values: &[u64]) -> TestResult<()> {
        let what = format!("members {ids:?} to hold {values:?}");
        self.wait_until(&what, || {
            ids.iter().all(|id| self.ledger(*id).values == values)
        })
        .await
    }

    /// Polls `condition` until it holds, failing after [`WAIT`].
    pub(crate) async fn wait_until(
        &self,
        what: &str,
        mut condition: impl FnMut() -> bool,
    ) -> TestResult<()> {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !condition() {
            if tokio::time::Instant::now() > deadline {
                return Err(format!("timed out waiting for {what}").into());
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok(())
    }

    /// The election timeout: how long a leaderless follower waits at most.
    pub(crate) fn election_timeout(&self) -> Duration {
        self.settings.tick * (2 * self.settings.election_ticks as u32)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for member in self.members.values() {
            member.node.shutdown();
        }
    }
}

/// `future`, failing after [`WAIT`].
pub(crate) async fn within<T>(future: impl Future<Output = T>, what: &str) -> TestResult<T> {
    tokio::time::timeout(WAIT, future)
        .await
        .map_err(|_| format!("timed out waiting for {what}").into())
}
