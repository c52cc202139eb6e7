//! Three members on real sockets, each running the cluster group (as the
//! sequencer) and four shard groups over one peer network and one shared
//! raft log, with a sequencing agent each: concurrent writers through any
//! member get dense revisions in real-time order while a member that leads
//! shards stops and starts again; a linearizable read through any member
//! sees every acknowledged write; every replica ends with the same data.
//! And leases: the cluster group's lessor decides the puts naming one, and
//! a revoke sequenced while no agent runs is announced by the agents of
//! the restarted members, deleting the lease's keys on every shard at one
//! revision. And cross-shard txns: from three coordinators at once, and
//! one whose prepare to a shard is lost, aborted at once and run again.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cairn_api::etcdserverpb::{PutRequest, RangeRequest};
use cairn_consensus::{
    BoxError, Committed, GroupId, Node, NodeConfig, PeerInfo, PeerNetwork, SharedRaftLog,
    SnapshotSource, StateMachine,
};
use cairn_mvcc::Store;
use cairn_shard::{BatchReady, Keyspace, Sequenced, Sequencer, ShardId, TxnId, TxnVote};
use parking_lot::Mutex;

use crate::{Agent, LocalShard, ReadPoint, ShardHandle, ShardWrite, WriteResponse, range, write};

const SHARDS: u32 = 4;
const MEMBERS: u64 = 3;

/// The cluster group's state machine in this test: it sequences rounds,
/// and keeps leases and the keys attached to them, as the member's applier
/// does. Its state lives in memory (shared with the member's agent): a
/// restarted member replays the cluster group's log.
struct SequencerMachine {
    sequencer: Arc<Mutex<Sequencer>>,
    leases: Arc<Mutex<Leases>>,
    applied: u64,
}

/// Each lease's keys.
#[derive(Default)]
struct Leases(BTreeMap<i64, BTreeSet<Vec<u8>>>);

/// The cluster group's entries: a round (JSON), or a grant or revoke of a
/// lease (its ID).
const ROUND: u8 = 0;
const GRANT: u8 = 1;
const REVOKE: u8 = 2;

fn lease_entry(kind: u8, id: i64) -> Vec<u8> {
    [&[kind][..], &id.to_be_bytes()].concat()
}

impl SequencerMachine {
    fn apply_entry(&self, data: &[u8]) -> Result<Vec<Sequenced>, std::io::Error> {
        let (kind, body) = data.split_first().ok_or(std::io::ErrorKind::InvalidData)?;
        let id = || -> Result<i64, std::io::Error> {
            let bytes: [u8; 8] = body
                .try_into()
                .map_err(|_| std::io::ErrorKind::InvalidData)?;
            Ok(i64::from_be_bytes(bytes))
        };
        let mut leases = self.leases.lock();
        let mut sequencer = self.sequencer.lock();
        match *kind {
            ROUND => {
                let (round, votes, aborts): (Vec<BatchReady>, Vec<TxnVote>, Vec<TxnId>) =
                    serde_json::from_slice(body)?;
                let accepted = sequencer.sequence(&round, &|id| leases.0.contains_key(&id));
                let mut attach = Vec::new();
                for done in &accepted {
                    let ready = round
                        .iter()
                        .find(|b| b.shard == done.shard && b.after == done.after);
                    attach.extend(ready.map_or(&[][..], |b| &b.attach).iter().cloned());
                }
                for vote in votes {
                    attach.extend(sequencer.vote(vote, &|id| leases.0.contains_key(&id)));
                }
                for id in aborts {
                    sequencer.abort(id);
                }
                for (key, lease) in attach {
                    for keys in leases.0.values_mut() {
                        keys.remove(&key);
                    }
                    if let Some(keys) = leases.0.get_mut(&lease) {
                        keys.insert(key);
                    }
                }
                Ok(accepted)
            }
            GRANT => {
                leases.0.entry(id()?).or_default();
                Ok(Vec::new())
            }
            REVOKE => {
                let keyspace = Keyspace::new(SHARDS).map_err(std::io::Error::other)?;
                let mut by_shard: BTreeMap<ShardId, Vec<Vec<u8>>> = BTreeMap::new();
                for key in leases.0.remove(&id()?).unwrap_or_default() {
                    by_shard
                        .entry(keyspace.shard_of(&key))
                        .or_default()
                        .push(key);
                }
                sequencer.revoke(id()?, by_shard);
                Ok(Vec::new())
            }
            _ => Err(std::io::ErrorKind::InvalidData.into()),
        }
    }
}

struct SequencerSnapshots(Arc<Mutex<Sequencer>>, Arc<Mutex<Leases>>, u64);

impl SnapshotSource for SequencerSnapshots {
    fn write_snapshot(&self, out: &mut dyn std::io::Write) -> std::io::Result<u64> {
        serde_json::to_writer(out, &(&*self.0.lock(), &self.1.lock().0))?;
        Ok(self.2)
    }
}

impl StateMachine for SequencerMachine {
    type Output = Vec<Sequenced>;
    type Error = std::io::Error;

    fn applied_index(&self) -> u64 {
        self.applied
    }

    fn apply(
        &mut self,
        entries: &[Committed],
        applied_index: u64,
    ) -> Result<Vec<Vec<Sequenced>>, std::io::Error> {
        let mut outputs = Vec::new();
        for entry in entries {
            outputs.push(self.apply_entry(&entry.data)?);
        }
        self.applied = applied_index;
        Ok(outputs)
    }

    fn sync(&mut self) -> Result<(), std::io::Error> {
        Ok(())
    }

    fn snapshot_source(&self) -> Arc<dyn SnapshotSource> {
        Arc::new(SequencerSnapshots(
            self.sequencer.clone(),
            self.leases.clone(),
            self.applied,
        ))
    }

    fn restore(&mut self, file: &std::path::Path) -> Result<(), std::io::Error> {
        let (sequencer, leases) = serde_json::from_slice(&std::fs::read(file)?)?;
        *self.sequencer.lock() = sequencer;
        self.leases.lock().0 = leases;
        Ok(())
    }
}

struct Member {
    id: u64,
    cluster: Node<Vec<Sequenced>>,
    sequencer: Arc<Mutex<Sequencer>>,
    leases: Arc<Mutex<Leases>>,
    shards: Vec<LocalShard>,
    agent: tokio::task::JoinHandle<()>,
    _network: PeerNetwork,
}

impl Member {
    fn shard(&self, shard: ShardId) -> &LocalShard {
        &self.shards[shard as usize]
    }

    fn stop(&self) {
        self.agent.abort();
        for shard in &self.shards {
            shard.node.shutdown();
        }
        self.cluster.shutdown();
    }
}

/// Peer addresses for every member, and a listener bound to each.
async fn bind_peers() -> Result<(Vec<PeerInfo>, Vec<tokio::net::TcpListener>), BoxError> {
    let mut listeners = Vec::new();
    let mut peers = Vec::new();
    for id in 1..=MEMBERS {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        peers.push(PeerInfo {
            id,
            name: format!("m{id}"),
            peer_urls: vec![format!("http://{}", listener.local_addr()?)],
            client_urls: Vec::new(),
            is_learner: false,
        });
        listeners.push(listener);
    }
    Ok((peers, listeners))
}

/// Starts (or restarts, on what it stored) member `peer` of `peers`. Its
/// sequencer state is not stored: the cluster group's log replays it.
fn start_member(
    dir: &std::path::Path,
    peer: &PeerInfo,
    peers: &[PeerInfo],
    listener: tokio::net::TcpListener,
) -> Result<Member, BoxError> {
    let id = peer.id;
    let network = PeerNetwork::start(id, 7, None, vec![listener]);
    let log = SharedRaftLog::open(&dir.join(format!("m{id}-raft")))?;
    let config = |group: GroupId| NodeConfig {
        cluster_id: 7,
        group,
        initial_members: peers.to_vec(),
        tick_interval: Duration::from_millis(20),
        ..NodeConfig::single(id, dir.join(format!("m{id}-g{group}")))
    };
    let sequencer = Arc::new(Mutex::new(Sequencer::new(SHARDS, 1)?));
    let leases = Arc::new(Mutex::new(Leases::default()));
    let cluster = Node::start_in(
        config(cairn_consensus::CLUSTER_GROUP),
        SequencerMachine {
            sequencer: sequencer.clone(),
            leases: leases.clone(),
            applied: 0,
        },
        &network,
        &log,
    )?;
    let mut shards = Vec::new();
    for shard in 0..SHARDS {
        let store = Store::open(&dir.join(format!("m{id}-s{shard}")))?;
        let handle = ShardHandle::new(shard, store);
        let node = Node::start_in(
            config(GroupId::from(shard) + 1),
            handle.machine(),
            &network,
            &log,
        )?;
        shards.push(LocalShard { handle, node });
    }
    let agent = Agent::new(
        id,
        shards.clone(),
        sequencer.clone(),
        {
            let leases = leases.clone();
            Arc::new(move |id| leases.lock().0.contains_key(&id))
        },
        Duration::from_millis(2),
        Duration::from_secs(1),
    );
    let proposer = cluster.clone();
    let agent = tokio::spawn(
        agent.run(move |round: Vec<BatchReady>, votes: Vec<TxnVote>| {
            let proposer = proposer.clone();
            async move {
                let aborts: Vec<TxnId> = Vec::new();
                let round =
                    serde_json::to_vec(&(round, votes, aborts)).map_err(|e| e.to_string())?;
                let entry = [&[ROUND][..], &round].concat();
                proposer.propose(entry).await.map_err(|e| e.to_string())
            }
        }),
    );
    Ok(Member {
        id,
        cluster,
        sequencer,
        leases,
        shards,
        agent,
        _network: network,
    })
}

/// The members, each in its slot while it runs.
type Slots = [Mutex<Option<Arc<Member>>>];

fn live(slots: &Slots, attempt: u64) -> Option<Arc<Member>> {
    slots[(attempt % MEMBERS) as usize].lock().clone()
}

/// A linearizable read of `req` through `member`: a barrier on the cluster
/// group, then every shard it touches read at the sequencer's revision.
async fn read(
    member: &Member,
    req: &RangeRequest,
) -> Result<cairn_api::etcdserverpb::RangeResponse, BoxError> {
    member.cluster.read_index().await?;
    let point = ReadPoint::latest(&member.sequencer.lock(), SHARDS);
    let replicas: Vec<Arc<ShardHandle>> = member.shards.iter().map(|s| s.handle.clone()).collect();
    Ok(range(&Keyspace::new(SHARDS)?, &replicas, req, &point).await?)
}

/// Reads `key` through the live members in turn until one answers.
async fn read_key(slots: &Slots, key: &Bytes) -> cairn_api::etcdserverpb::RangeResponse {
    let began = Instant::now();
    let req = RangeRequest {
        key: key.clone(),
        ..Default::default()
    };
    for attempt in 0.. {
        assert!(
            began.elapsed() < Duration::from_secs(30),
            "a read was answered within 30 s"
        );
        let Some(member) = live(slots, attempt) else {
            continue;
        };
        if let Ok(Ok(answer)) =
            tokio::time::timeout(Duration::from_secs(2), read(&member, &req)).await
        {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    unreachable!("attempts go on until one answers")
}

/// An acknowledged put: when it began and ended, and its revision.
struct Acked {
    began: Instant,
    ended: Instant,
    revision: i64,
}

async fn put_until_acked(
    slots: &Slots,
    shard: ShardId,
    key: Bytes,
    value: u64,
    attempt: &mut u64,
) -> Acked {
    let began = Instant::now();
    loop {
        assert!(
            began.elapsed() < Duration::from_secs(30),
            "a put to shard {shard} was acknowledged within 30 s"
        );
        *attempt += 1;
        let Some(member) = live(slots, *attempt) else {
            continue;
        };
        let put = PutRequest {
            key: key.clone(),
            value: Bytes::from(value.to_string()),
            ..Default::default()
        };
        let attempt = write(&member.shard(shard).node, ShardWrite::Put(put));
        match tokio::time::timeout(Duration::from_secs(2), attempt).await {
            Ok(Ok(Ok(WriteResponse::Put(response)))) => {
                return Acked {
                    began,
                    ended: Instant::now(),
                    revision: response.header.map_or(0, |h| h.revision),
                };
            }
            Ok(Ok(other)) => panic!("a put answered {other:?}"),
            // No leader yet, or the member is gone: retry elsewhere.
            Ok(Err(_)) | Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_get_dense_revisions_in_real_time_order_and_reads_anywhere_see_them()
-> Result<(), BoxError> {
    let dir = tempfile::tempdir()?;
    let (peers, listeners) = bind_peers().await?;
    let mut members = Vec::new();
    for (peer, listener) in peers.iter().zip(listeners) {
        members.push(Mutex::new(Some(Arc::new(start_member(
            dir.path(),
            peer,
            &peers,
            listener,
        )?))));
    }
    let slots: Arc<Vec<Mutex<Option<Arc<Member>>>>> = Arc::new(members);
    for slot in slots.iter() {
        let member = slot.lock().clone().ok_or("every member runs")?;
        member.cluster.wait_leader(Duration::from_secs(10)).await;
        for shard in &member.shards {
            shard.node.wait_leader(Duration::from_secs(10)).await;
        }
    }
    let keyspace = Keyspace::new(SHARDS)?;
    // Each writer puts 25 times, and goes on until it has put 5 times more
    // after the restart below.
    let restarted = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for writer in 0..6u64 {
        let slots = slots.clone();
        let restarted = restarted.clone();
        writers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut attempt = writer;
            let mut after_restart = 0;
            for i in 0u64.. {
                if i >= 25 && after_restart >= 5 {
                    break;
                }
                if restarted.load(std::sync::atomic::Ordering::SeqCst) {
                    after_restart += 1;
                }
                let key = Bytes::from(format!("w{writer}-k{}", i % 7));
                let shard = keyspace.shard_of(&key);
                let put = put_until_acked(&slots, shard, key.clone(), i, &mut attempt).await;
                // Read back through any member: the acknowledged put is
                // there, at its revision (only this writer writes its keys).
                let got = read_key(&slots, &key).await;
                let kv = got.kvs.first().expect("an acknowledged put is read back");
                assert_eq!(
                    (kv.value.as_ref(), kv.mod_revision),
                    (i.to_string().as_bytes(), put.revision)
                );
                assert!(got.header.map_or(0, |h| h.revision) >= put.revision);
                acked.push(put);
            }
            acked
        }));
    }
    // A member that leads shards stops while the writers run, and starts
    // again on what it stored: it stages its shards' logs again after
    // their applied indexes and replays its sequencer from the cluster
    // group's log.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let index = slots
        .iter()
        .position(|slot| {
            slot.lock()
                .as_ref()
                .is_some_and(|m| m.shards.iter().any(|s| s.node.status().leader == m.id))
        })
        .ok_or("some member leads a shard")?;
    let victim = slots[index].lock().take().ok_or("the victim runs")?;
    victim.stop();
    // Dropped once no request holds it: its network lets go of its port.
    drop(victim);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let address = peers[index].peer_urls[0]
        .trim_start_matches("http://")
        .to_string();
    let began = Instant::now();
    let listener = loop {
        match tokio::net::TcpListener::bind(&address).await {
            Ok(listener) => break listener,
            Err(e) => {
                assert!(began.elapsed() < Duration::from_secs(10), "{address}: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    *slots[index].lock() = Some(Arc::new(start_member(
        dir.path(),
        &peers[index],
        &peers,
        listener,
    )?));
    restarted.store(true, std::sync::atomic::Ordering::SeqCst);

    let mut acked = Vec::new();
    for writer in writers {
        acked.extend(writer.await?);
    }
    // Every acknowledged put has its own revision, and one that began after
    // another was acknowledged has a greater one.
    let revisions: BTreeSet<i64> = acked.iter().map(|a| a.revision).collect();
    assert_eq!(revisions.len(), acked.len(), "no revision given twice");
    for a in &acked {
        for b in &acked {
            if a.ended < b.began {
                assert!(a.revision < b.revision, "real-time order");
            }
        }
    }

    // Every member, the restarted one too, ends with the same data, and
    // the revisions are dense: every put took one, and the last is the
    // number of puts applied.
    let members: Vec<Arc<Member>> = slots
        .iter()
        .filter_map(|slot| slot.lock().clone())
        .collect();
    assert_eq!(members.len() as u64, MEMBERS);
    let deadline = Instant::now() + Duration::from_secs(10);
    for shard in 0..SHARDS {
        loop {
            let applied: Vec<u64> = members
                .iter()
                .map(|m| m.shard(shard).handle.applied_index())
                .collect();
            if applied.windows(2).all(|w| w[0] == w[1]) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "replicas of shard {shard} converge"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let final_revision = members[0].sequencer.lock().revision();
    let everything = RangeRequest {
        key: Bytes::from_static(b"\0"),
        range_end: Bytes::from_static(b"\0"),
        ..Default::default()
    };
    let mut versions = 0;
    for shard in 0..SHARDS {
        let stores: Vec<Store> = members
            .iter()
            .map(|m| m.shard(shard).handle.store())
            .collect();
        let first = stores[0].range_at(&everything, final_revision)?.kvs;
        for other in &stores[1..] {
            assert_eq!(other.range_at(&everything, final_revision)?.kvs, first);
        }
        versions += first.iter().map(|kv| kv.version).sum::<i64>();
    }
    // One read over every shard: each writer's seven keys, in key order.
    let all = read(&members[0], &everything).await?;
    assert_eq!(all.count, 6 * 7);
    assert!(all.kvs.windows(2).all(|w| w[0].key < w[1].key));
    assert_eq!(all.header.map(|h| h.revision), Some(final_revision));
    assert_eq!(final_revision, 1 + versions, "dense revisions");
    assert!(revisions.iter().all(|r| *r > 1 && *r <= final_revision));
    for member in members {
        member.stop();
    }
    Ok(())
}

/// Puts `key` with `lease` through the live members in turn until one
/// gives the put an outcome.
async fn put_leased(slots: &Slots, key: &str, lease: i64, attempt: &mut u64) -> crate::Outcome {
    let keyspace = Keyspace::new(SHARDS).expect("a valid shard count");
    let began = Instant::now();
    loop {
        assert!(
            began.elapsed() < Duration::from_secs(30),
            "a put of {key} had an outcome within 30 s"
        );
        *attempt += 1;
        let Some(member) = live(slots, *attempt) else {
            continue;
        };
        let put = PutRequest {
            key: Bytes::copy_from_slice(key.as_bytes()),
            value: Bytes::from_static(b"v"),
            lease,
            ..Default::default()
        };
        let shard = keyspace.shard_of(key.as_bytes());
        let attempt = write(&member.shard(shard).node, ShardWrite::Put(put));
        match tokio::time::timeout(Duration::from_secs(2), attempt).await {
            Ok(Ok(outcome)) => return outcome,
            Ok(Err(_)) | Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Proposes a cluster-group entry through the live members in turn.
async fn propose(slots: &Slots, entry: Vec<u8>) {
    let began = Instant::now();
    for attempt in 0.. {
        assert!(began.elapsed() < Duration::from_secs(30), "proposed");
        if let Some(member) = live(slots, attempt) {
            let proposed = member.cluster.propose(entry.clone());
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), proposed).await {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn start_all(
    dir: &std::path::Path,
    peers: &[PeerInfo],
    listeners: Vec<tokio::net::TcpListener>,
) -> Result<Vec<Mutex<Option<Arc<Member>>>>, BoxError> {
    let mut members = Vec::new();
    for (peer, listener) in peers.iter().zip(listeners) {
        members.push(Mutex::new(Some(Arc::new(start_member(
            dir, peer, peers, listener,
        )?))));
    }
    for slot in &members {
        let member = slot.lock().clone().ok_or("every member runs")?;
        member.cluster.wait_leader(Duration::from_secs(10)).await;
        for shard in &member.shards {
            shard.node.wait_leader(Duration::from_secs(10)).await;
        }
    }
    Ok(members)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_deletes_the_lease_keys_of_every_shard_at_one_revision_after_a_restart()
-> Result<(), BoxError> {
    let dir = tempfile::tempdir()?;
    let (peers, listeners) = bind_peers().await?;
    let slots = start_all(dir.path(), &peers, listeners).await?;
    let mut attempt = 0;
    propose(&slots, lease_entry(GRANT, 7)).await;

    // Twelve keys of lease 7 through every member, on several shards; a
    // put naming a lease that does not exist fails and takes no revision.
    let keyspace = Keyspace::new(SHARDS)?;
    let keys: Vec<String> = (0..12).map(|i| format!("leased/{i:02}")).collect();
    for key in &keys {
        let put = put_leased(&slots, key, 7, &mut attempt).await;
        assert!(put.is_ok(), "{key}: {put:?}");
    }
    let held: BTreeSet<ShardId> = keys
        .iter()
        .map(|k| keyspace.shard_of(k.as_bytes()))
        .collect();
    assert!(held.len() > 1, "the keys are on several shards");
    let missing = put_leased(&slots, "nolease", 8, &mut attempt).await;
    assert!(matches!(missing, Err(cairn_mvcc::MvccError::LeaseNotFound)));
    let member = live(&slots, 0).ok_or("m1 runs")?;
    // Its replica of the cluster group has applied every round before.
    member.cluster.read_index().await?;
    let attached: BTreeSet<Vec<u8>> = keys.iter().map(|k| k.as_bytes().to_vec()).collect();
    assert_eq!(member.leases.lock().0.get(&7), Some(&attached));

    // No agent runs when the cluster group revokes the lease: the revoke is
    // sequenced (one revision) and announced in no shard's log.
    for slot in &slots {
        if let Some(member) = slot.lock().as_ref() {
            member.agent.abort();
        }
    }
    propose(&slots, lease_entry(REVOKE, 7)).await;
    member.cluster.read_index().await?;
    let revoked = member.sequencer.lock().revision();
    assert_eq!(revoked, 1 + 12 + 1, "twelve puts and one revoke");
    for shard in &held {
        assert_eq!(member.sequencer.lock().last_revoke(*shard), revoked);
    }

    // Every member stopped and started again: the new agents announce it.
    for slot in &slots {
        if let Some(member) = slot.lock().take() {
            member.stop();
        }
    }
    drop(member);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut listeners = Vec::new();
    for peer in &peers {
        let address = peer.peer_urls[0].trim_start_matches("http://").to_string();
        let began = Instant::now();
        listeners.push(loop {
            match tokio::net::TcpListener::bind(&address).await {
                Ok(listener) => break listener,
                Err(e) => {
                    assert!(began.elapsed() < Duration::from_secs(10), "{address}: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        });
    }
    let slots = start_all(dir.path(), &peers, listeners).await?;

    // A read through any member waits for the revoke on every shard: the
    // keys are gone at its revision, and were there just before.
    let prefix = RangeRequest {
        key: Bytes::from_static(b"leased/"),
        range_end: Bytes::from_static(b"leased0"),
        ..Default::default()
    };
    for m in 0..MEMBERS {
        let member = live(&slots, m).ok_or("every member runs")?;
        let now = tokio::time::timeout(Duration::from_secs(20), read(&member, &prefix)).await??;
        assert_eq!(now.count, 0, "m{} after the revoke", member.id);
        let before = RangeRequest {
            revision: revoked - 1,
            ..prefix.clone()
        };
        assert_eq!(read(&member, &before).await?.count, 12);
        for shard in &held {
            let handle = &member.shard(*shard).handle;
            assert_eq!(handle.revoked(), revoked, "m{} shard {shard}", member.id);
        }
    }
    // The next write follows the revoke; the lease is gone.
    let next = put_leased(&slots, "after", 0, &mut attempt).await?;
    assert_eq!(next.revision(), revoked + 1);
    let gone = put_leased(&slots, "again", 7, &mut attempt).await;
    assert!(matches!(gone, Err(cairn_mvcc::MvccError::LeaseNotFound)));
    for slot in slots.iter() {
        if let Some(member) = slot.lock().take() {
            member.stop();
        }
    }
    Ok(())
}

/// Runs `txn` over every shard as coordinator `coordinator` (through its
/// member), proposing its prepares in `order`, again under a new ID each
/// time it is aborted: its merged response.
async fn cross_until_done(
    member: &Member,
    coordinator: u64,
    seq: &mut u64,
    txn: &cairn_api::etcdserverpb::TxnRequest,
    order: &[ShardId],
) -> Result<cairn_api::etcdserverpb::TxnResponse, BoxError> {
    let keyspace = Keyspace::new(SHARDS)?;
    let participants = crate::participants(&keyspace, txn)?;
    let began = Instant::now();
    loop {
        assert!(
            began.elapsed() < Duration::from_secs(30),
            "a cross-shard txn was decided within 30 s"
        );
        *seq += 1;
        let mut proposals = tokio::task::JoinSet::new();
        for &shard in order {
            let node = member.shard(shard).node.clone();
            let write = ShardWrite::CrossTxn(cairn_api::cairnpb::CrossTxn {
                id: Some(cairn_api::cairnpb::TxnId {
                    member: coordinator,
                    seq: *seq,
                }),
                participants: participants.clone(),
                shards: SHARDS,
                txn: Some(txn.clone()),
                shard,
            });
            proposals.spawn(async move { (shard, write_cross(node, write).await) });
            // Coordinators propose in different orders: some shards stage
            // two txns one way, others the other way.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let mut partials = Vec::new();
        let mut aborted = false;
        for (shard, answer) in proposals.join_all().await {
            match answer? {
                WriteResponse::Txn(partial) => partials.push((shard, partial)),
                WriteResponse::Aborted => aborted = true,
                other => return Err(format!("a txn answered {other:?}").into()),
            }
        }
        if !aborted {
            let revision = partials[0].1.header.as_ref().map_or(0, |h| h.revision);
            return Ok(crate::merge_txn(&keyspace, txn, &partials, revision));
        }
    }
}

async fn write_cross(
    node: Node<crate::ShardOutput>,
    write: ShardWrite,
) -> Result<WriteResponse, BoxError> {
    Ok(tokio::time::timeout(Duration::from_secs(10), crate::write(&node, write)).await???)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txns_over_every_shard_from_three_coordinators_take_one_revision_each()
-> Result<(), BoxError> {
    use cairn_api::etcdserverpb::request_op::Request;
    use cairn_api::etcdserverpb::{RequestOp, TxnRequest};

    let dir = tempfile::tempdir()?;
    let (peers, listeners) = bind_peers().await?;
    let slots: Arc<Vec<Mutex<Option<Arc<Member>>>>> =
        Arc::new(start_all(dir.path(), &peers, listeners).await?);
    let keyspace = Keyspace::new(SHARDS)?;
    // A key of each shard.
    let keys: Vec<Bytes> = (0..SHARDS)
        .map(|shard| {
            (0..)
                .map(|i| Bytes::from(format!("k{i}")))
                .find(|k| keyspace.shard_of(k) == shard)
                .unwrap_or_default()
        })
        .collect();
    let mut coordinators = tokio::task::JoinSet::new();
    for c in 0..MEMBERS {
        let member = live(&slots, c).ok_or("every member runs")?;
        let keys = keys.clone();
        coordinators.spawn(async move {
            let mut order: Vec<ShardId> = (0..SHARDS).collect();
            order.rotate_left(c as usize);
            if c % 2 == 1 {
                order.reverse();
            }
            let mut seq = 0;
            let mut done = Vec::new();
            for i in 0..8 {
                let value = format!("c{c}-{i}");
                let txn = TxnRequest {
                    compare: Vec::new(),
                    success: keys
                        .iter()
                        .map(|key| RequestOp {
                            request: Some(Request::RequestPut(PutRequest {
                                key: key.clone(),
                                value: Bytes::from(value.clone()),
                                ..Default::default()
                            })),
                        })
                        .collect(),
                    failure: Vec::new(),
                };
                let response = cross_until_done(&member, c + 1, &mut seq, &txn, &order)
                    .await
                    .map_err(|e| e.to_string())?;
                assert!(response.succeeded);
                done.push((response.header.map_or(0, |h| h.revision), value));
            }
            Ok::<_, String>(done)
        });
    }
    let mut done = Vec::new();
    for finished in coordinators.join_all().await {
        done.extend(finished?);
    }
    // One revision each, dense after the first (no other write runs).
    done.sort();
    let revisions: Vec<i64> = done.iter().map(|(r, _)| *r).collect();
    assert_eq!(revisions, (2..2 + done.len() as i64).collect::<Vec<_>>());
    // Every member reads each txn whole at its revision: every shard's key
    // has its value there.
    let all = RangeRequest {
        key: Bytes::from_static(b"\0"),
        range_end: Bytes::from_static(b"\0"),
        ..Default::default()
    };
    for m in 0..MEMBERS {
        let member = live(&slots, m).ok_or("every member runs")?;
        for (revision, value) in &done {
            let at = RangeRequest {
                revision: *revision,
                ..all.clone()
            };
            let got = read(&member, &at).await?;
            assert_eq!(got.kvs.len(), SHARDS as usize);
            for kv in &got.kvs {
                assert_eq!(
                    (kv.value.as_ref(), kv.mod_revision),
                    (value.as_bytes(), *revision)
                );
            }
        }
    }
    for slot in slots.iter() {
        if let Some(member) = slot.lock().take() {
            member.stop();
        }
    }
    Ok(())
}

/// A txn putting `value` at each of `keys`.
fn puts(keys: &[Bytes], value: &str) -> cairn_api::etcdserverpb::TxnRequest {
    use cairn_api::etcdserverpb::RequestOp;
    use cairn_api::etcdserverpb::request_op::Request;

    cairn_api::etcdserverpb::TxnRequest {
        compare: Vec::new(),
        success: keys
            .iter()
            .map(|key| RequestOp {
                request: Some(Request::RequestPut(PutRequest {
                    key: key.clone(),
                    value: Bytes::from(value.to_string()),
                    ..Default::default()
                })),
            })
            .collect(),
        failure: Vec::new(),
    }
}

/// `txn`'s prepare for `shard`, as coordinator 9's txn `seq`.
fn prepare_of(
    txn: &cairn_api::etcdserverpb::TxnRequest,
    seq: u64,
    participants: &[ShardId],
    shard: ShardId,
) -> ShardWrite {
    ShardWrite::CrossTxn(cairn_api::cairnpb::CrossTxn {
        id: Some(cairn_api::cairnpb::TxnId { member: 9, seq }),
        participants: participants.to_vec(),
        shards: SHARDS,
        txn: Some(txn.clone()),
        shard,
    })
}

/// One attempt of `txn` as coordinator 9's txn `seq` through `member`,
/// with `crate::attempt`: each participant's prepare proposed and its part
/// awaited, but for the shard in `dropped`, whose prepare the filter drops
/// (never proposed: its proposal failing after the prepare timeout, as
/// one lost with its shard's leader); an abort goes to the cluster group.
async fn attempt_through(
    member: &Member,
    txn: &cairn_api::etcdserverpb::TxnRequest,
    seq: u64,
    participants: &[ShardId],
    dropped: Option<ShardId>,
) -> crate::Attempt<String> {
    // Short for the dropped prepare, long enough for the others on a
    // loaded machine.
    const DROPPED_AFTER: Duration = Duration::from_millis(300);
    const PREPARE_TIMEOUT: Duration = Duration::from_secs(5);
    let prepare = |shard: ShardId| {
        let node = member.shard(shard).node.clone();
        let write = prepare_of(txn, seq, participants, shard);
        async move {
            if dropped == Some(shard) {
                tokio::time::sleep(DROPPED_AFTER).await;
                return Err("the prepare was not committed in time".to_string());
            }
            let staged = tokio::time::timeout(PREPARE_TIMEOUT, crate::stage(&node, write))
                .await
                .map_err(|_| "the prepare was not committed in time".to_string())?
                .map_err(|e| e.to_string())?;
            match staged.outcome().await {
                Ok(Ok(WriteResponse::Txn(part))) => Ok(Some(part)),
                Ok(Ok(WriteResponse::Aborted)) => Ok(None),
                other => Err(format!("a prepare answered {other:?}")),
            }
        }
    };
    let abort = |id: TxnId| {
        let cluster = member.cluster.clone();
        async move {
            let round = (Vec::<BatchReady>::new(), Vec::<TxnVote>::new(), vec![id]);
            let round = serde_json::to_vec(&round).map_err(|e| e.to_string())?;
            let entry = [&[ROUND][..], &round].concat();
            cluster
                .propose(entry)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    };
    let id = TxnId { member: 9, seq };
    crate::attempt(id, participants, prepare, abort).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_prepare_is_aborted_at_once_and_the_txn_run_again_applies_once_everywhere()
-> Result<(), BoxError> {
    let dir = tempfile::tempdir()?;
    let (peers, listeners) = bind_peers().await?;
    let slots = start_all(dir.path(), &peers, listeners).await?;
    let keyspace = Keyspace::new(SHARDS)?;
    let key_of = |shard: ShardId| {
        (0..)
            .map(|i| Bytes::from(format!("x{i}")))
            .find(|k| keyspace.shard_of(k) == shard)
            .unwrap_or_default()
    };
    let keys = [key_of(0), key_of(1)];
    let txn = puts(&keys, "once");
    let participants = crate::participants(&keyspace, &txn)?;
    assert_eq!(participants, vec![0, 1]);
    let member = live(&slots, 0).ok_or("m1 runs")?;
    let revision = member.sequencer.lock().revision();

    // The prepare to shard 1 is dropped: shard 0 votes and waits, the
    // coordinator aborts the txn as soon as the prepare times out, and
    // shard 0 passes its prepare then, far from the 5 s after which the
    // cluster group's leader aborts a txn left undecided.
    let began = Instant::now();
    let first = attempt_through(&member, &txn, 1, &participants, Some(1)).await;
    let unblocked = began.elapsed();
    assert!(
        matches!(first, crate::Attempt::Aborted(Some(_))),
        "{first:?}"
    );
    assert!(
        unblocked < Duration::from_millis(2500),
        "aborted after {unblocked:?}"
    );
    let mut attempt = 0;
    let next = put_until_acked(&slots, 0, key_of(0), 7, &mut attempt).await;
    assert!(
        next.ended.duration_since(began) < Duration::from_millis(3500),
        "shard 0 took a write {:?} after the txn began",
        next.ended.duration_since(began)
    );
    assert_eq!(
        next.revision,
        revision + 1,
        "the aborted txn took no revision"
    );

    // The dropped prepare commits after all: shard 1 votes for it, the
    // cluster group keeps the txn aborted, and shard 1 passes it.
    let late = prepare_of(&txn, 1, &participants, 1);
    let answer = write_cross(member.shard(1).node.clone(), late).await?;
    assert!(matches!(answer, WriteResponse::Aborted), "{answer:?}");

    // Run again under a new ID, it applies once on every shard.
    let second = attempt_through(&member, &txn, 2, &participants, None).await;
    let crate::Attempt::Done(parts) = second else {
        return Err(format!("the txn run again ended {second:?}").into());
    };
    let done = parts[0].1.header.as_ref().map_or(0, |h| h.revision);
    assert_eq!(done, revision + 2);
    assert!(parts.iter().all(|(_, p)| p.succeeded));
    for m in 0..MEMBERS {
        let member = live(&slots, m).ok_or("every member runs")?;
        for key in &keys {
            let got = read(
                &member,
                &RangeRequest {
                    key: key.clone(),
                    ..Default::default()
                },
            )
            .await?;
            let kv = got.kvs.first().ok_or("the key was put")?;
            assert_eq!(
                (kv.value.as_ref(), kv.mod_revision),
                (&b"once"[..], done),
                "m{}",
                member.id
            );
        }
        // Put once by the txn: shard 1's key has one version, shard 0's
        // the txn's after the put between.
        let got = read(
            &member,
            &RangeRequest {
                key: keys[1].clone(),
                ..Default::default()
            },
        )
        .await?;
        assert_eq!(got.kvs.first().map(|kv| kv.version), Some(1));
        assert!(member.sequencer.lock().undecided().is_empty());
    }
    for slot in slots.iter() {
        if let Some(member) = slot.lock().take() {
            member.stop();
        }
    }
    Ok(())
}
