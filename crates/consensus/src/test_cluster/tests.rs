//! Elections, partitions, catch-up, snapshots and membership on the
//! in-process cluster.

use std::time::Duration;

use raft::prelude::MessageType;

use super::*;
use crate::Error;
use crate::raft_transport::PeerEvent;

fn settings() -> Settings {
    Settings::default()
}

/// For tests that assert that no election happens: longer election
/// timeouts, so that a starved machine does not cause one.
fn steady() -> Settings {
    Settings {
        election_ticks: 20,
        ..settings()
    }
}

#[tokio::test]
async fn a_leader_is_elected_and_every_member_applies_its_writes() -> TestResult {
    let cluster = Cluster::new(3, settings())?;
    let leader = cluster.leader().await?;
    assert_eq!(cluster.propose(leader, 7).await?, 1);
    // A follower forwards its proposal to the leader.
    let follower = cluster.others(leader)[0];
    assert_eq!(cluster.propose(follower, 8).await?, 2);
    cluster.wait_values(&cluster.ids(), &[7, 8]).await
}

#[tokio::test]
async fn a_leader_cut_off_both_ways_is_replaced_and_catches_up() -> TestResult {
    let cluster = Cluster::new(3, settings())?;
    let old = cluster.leader().await?;
    cluster.propose(old, 1).await?;
    let term = cluster.status(old).term;
    let rest = cluster.others(old);
    let cut = cluster.hub.add_filter(partition(&[old], &rest));
    let new = cluster.leader_among(&rest).await?;
    assert_ne!(new, old);
    assert!(cluster.status(new).term > term);
    cluster.propose(new, 2).await?;
    cluster.hub.remove_filter(cut);
    cluster.wait_values(&cluster.ids(), &[1, 2]).await?;
    assert_eq!(cluster.leader().await?, new, "the old leader follows");
    Ok(())
}

#[tokio::test]
async fn a_leader_that_hears_nobody_steps_down_and_the_rest_go_on() -> TestResult {
    let cluster = Cluster::new(3, settings())?;
    let old = cluster.leader().await?;
    let rest = cluster.others(old);
    // The leader's heartbeats still arrive; the answers do not. With
    // check_quorum it steps down, and the others elect one of themselves.
    let deaf = cluster.hub.add_filter(one_way(&rest, &[old]));
    let new = cluster.leader_among(&rest).await?;
    assert_ne!(new, old);
    cluster.propose(new, 1).await?;
    cluster.wait_values(&rest, &[1]).await?;
    assert!(cluster.ledger(old).values.is_empty());
    cluster.hub.remove_filter(deaf);
    cluster.wait_values(&cluster.ids(), &[1]).await
}

#[tokio::test]
async fn a_leader_nobody_hears_is_replaced() -> TestResult {
    let cluster = Cluster::new(3, settings())?;
    let old = cluster.leader().await?;
    let rest = cluster.others(old);
    let mute = cluster.hub.add_filter(one_way(&[old], &rest));
    let new = cluster.leader_among(&rest).await?;
    assert_ne!(new, old);
    cluster.propose(new, 1).await?;
    // The old leader hears the new term and follows, though nobody hears it.
    cluster
        .wait_until("the old leader to follow", || {
            cluster.status(old).leader == new
        })
        .await?;
    cluster.hub.remove_filter(mute);
    cluster.wait_values(&cluster.ids(), &[1]).await
}

#[tokio::test]
async fn a_follower_cut_off_does_not_disrupt_the_leader_when_it_returns() -> TestResult {
    let cluster = Cluster::new(3, steady())?;
    let leader = cluster.leader().await?;
    let term = cluster.status(leader).term;
    let follower = cluster.others(leader)[0];
    let cut = cluster
        .hub
        .add_filter(partition(&[follower], &cluster.others(follower)));
    // Cut off, the follower gives up on the leader and pre-votes in vain;
    // pre-vote keeps it from raising its term.
    cluster
        .wait_until("the follower to lose its leader", || {
            cluster.status(follower).leader == 0
        })
        .await?;
    cluster.propose(leader, 1).await?;
    cluster.hub.remove_filter(cut);
    cluster.wait_values(&cluster.ids(), &[1]).await?;
    assert_eq!(cluster.leader().await?, leader);
    assert_eq!(cluster.status(leader).term, term, "no election happened");
    Ok(())
}

#[tokio::test]
async fn a_follower_that_hears_nobody_does_not_disrupt_the_leader() -> TestResult {
    let cluster = Cluster::new(3, steady())?;
    let leader = cluster.leader().await?;
    let term = cluster.status(leader).term;
    let follower = cluster.others(leader)[0];
    // Its pre-votes still arrive, but the others have a live leader:
    // check_quorum makes them refuse, and the term stays.
    let deaf = cluster
        .hub
        .add_filter(one_way(&cluster.others(follower), &[follower]));
    cluster
        .wait_until("the follower to lose its leader", || {
            cluster.status(follower).leader == 0
        })
        .await?;
    cluster.propose(leader, 1).await?;
    assert_eq!(cluster.status(leader).term, term, "an election happened");
    cluster.hub.remove_filter(deaf);
    cluster.wait_values(&cluster.ids(), &[1]).await?;
    assert_eq!(cluster.leader().await?, leader);
    assert_eq!(cluster.status(leader).term, term, "an election happened");
    Ok(())
}

#[tokio::test]
async fn a_minority_does_not_commit_while_the_majority_does() -> TestResult {
    let cluster = Cluster::new(5, settings())?;
    let old = cluster.leader().await?;
    let minority = vec![old, cluster.others(old)[0]];
    let majority: Vec<u64> = cluster
        .ids()
        .into_iter()
        .filter(|id| !minority.contains(id))
        .collect();
    let cut = cluster.hub.add_filter(partition(&minority, &majority));
    let lost = {
        let node = cluster.node(old).clone();
        tokio::spawn(async move { node.propose(100u64.to_be_bytes().to_vec()).await })
    };
    let new = cluster.leader_among(&majority).await?;
    cluster.propose(new, 1).await?;
    cluster.wait_values(&majority, &[1]).await?;
    for id in &minority {
        assert!(
            cluster.ledger(*id).values.is_empty(),
            "member {id} committed"
        );
    }
    assert!(!lost.is_finished(), "the minority's proposal was answered");
    cluster.hub.remove_filter(cut);
    // The minority's entry gives way to the majority's log.
    cluster.wait_values(&cluster.ids(), &[1]).await?;
    lost.abort();
    Ok(())
}

#[tokio::test]
async fn a_lagging_follower_catches_up_from_the_log() -> TestResult {
    let cluster = Cluster::new(3, settings())?;
    let leader = cluster.leader().await?;
    let follower = cluster.others(leader)[0];
    let cut = cluster
        .hub
        .add_filter(partition(&[follower], &cluster.others(follower)));
    let values: Vec<u64> = (1..=30).collect();
    for v in &values {
        cluster.propose(leader, *v).await?;
    }
    assert!(cluster.ledger(follower).values.is_empty());
    cluster.hub.remove_filter(cut);
    cluster.wait_values(&cluster.ids(), &values).await?;
    assert_eq!(
        cluster.ledger(follower).restores,
        0,
        "no snapshot was needed"
    );
    Ok(())
}

#[tokio::test]
async fn a_follower_behind_the_compacted_log_gets_a_snapshot() -> TestResult {
    let cluster = Cluster::new(
        3,
        Settings {
            snapshot_count: 5,
            ..settings()
        },
    )?;
    let leader = cluster.leader().await?;
    let follower = cluster.others(leader)[0];
    let cut = cluster
        .hub
        .add_filter(partition(&[follower], &cluster.others(follower)));
    let values: Vec<u64> = (1..=40).collect();
    for v in &values {
        cluster.propose(leader, *v).await?;
    }
    cluster.hub.remove_filter(cut);
    cluster.wait_values(&cluster.ids(), &values).await?;
    assert!(
        cluster.ledger(follower).restores >= 1,
        "no snapshot installed"
    );
    // The follower goes on from the snapshot's point with the log.
    cluster.propose(leader, 41).await?;
    cluster
        .wait_until("the follower to apply past the snapshot", || {
            cluster.ledger(follower).values.last() == Some(&41)
        })
        .await
}

#[tokio::test]
async fn a_learner_catches_up_and_is_promoted() -> TestResult {
    let mut cluster = Cluster::new(3, settings())?;
    let leader = cluster.leader().await?;
    for v in 1..=5 {
        cluster.propose(leader, v).await?;
    }
    cluster.add(leader, 4, true).await?;
    cluster.wait_values(&[4], &[1, 2, 3, 4, 5]).await?;
    cluster
        .wait_until("the learner to apply its own addition", || {
            cluster.node(4).is_learner()
        })
        .await?;
    // etcd allows one learner at a time.
    let second = cluster
        .node(leader)
        .change_membership(MembershipChange::Add(PeerInfo {
            is_learner: true,
            ..peer(5)
        }))
        .await;
    assert!(matches!(second, Err(Error::TooManyLearners)), "{second:?}");
    let members = cluster
        .node(leader)
        .change_membership(MembershipChange::Promote(4))
        .await?;
    assert!(members.iter().all(|m| !m.is_learner));
    cluster
        .wait_until("the learner to know it votes", || {
            !cluster.node(4).is_learner()
        })
        .await?;
    // Four voters now: the leader and one follower, cut off from the other
    // two, are no quorum; healed, they are.
    let pair = vec![leader, cluster.others(leader)[0]];
    let others: Vec<u64> = cluster
        .others(leader)
        .into_iter()
        .filter(|id| !pair.contains(id))
        .collect();
    let cut = cluster.hub.add_filter(partition(&pair, &others));
    let waiting = {
        let node = cluster.node(leader).clone();
        tokio::spawn(async move { node.propose(6u64.to_be_bytes().to_vec()).await })
    };
    tokio::time::sleep(cluster.election_timeout()).await;
    assert!(!waiting.is_finished(), "two of four voters committed");
    cluster.hub.remove_filter(cut);
    within(waiting, "the proposal after healing").await???;
    cluster
        .wait_values(&cluster.ids(), &[1, 2, 3, 4, 5, 6])
        .await
}

#[tokio::test]
async fn members_are_added_and_removed() -> TestResult {
    let mut cluster = Cluster::new(3, settings())?;
    let leader = cluster.leader().await?;
    cluster.propose(leader, 1).await?;
    let exists = cluster
        .node(leader)
        .change_membership(MembershipChange::Add(peer(2)))
        .await;
    assert!(matches!(exists, Err(Error::MemberExists)), "{exists:?}");
    cluster.add(leader, 4, false).await?;
    cluster.wait_values(&[4], &[1]).await?;
    let removed = cluster.others(leader)[0];
    let members = cluster
        .node(leader)
        .change_membership(MembershipChange::Remove(removed))
        .await?;
    assert_eq!(members.len(), 3);
    assert!(members.iter().all(|m| m.id != removed));
    let missing = cluster
        .node(leader)
        .change_membership(MembershipChange::Remove(removed))
        .await;
    assert!(matches!(missing, Err(Error::MemberNotFound)), "{missing:?}");
    // Three voters remain; the removed member's silence costs nothing.
    let cut = cluster
        .hub
        .add_filter(partition(&[removed], &cluster.others(removed)));
    cluster.propose(leader, 2).await?;
    let remaining = cluster.others(removed);
    cluster.wait_values(&remaining, &[1, 2]).await?;
    for id in &remaining {
        assert_eq!(cluster.node(*id).members().len(), 3);
    }
    cluster.hub.remove_filter(cut);
    Ok(())
}

#[tokio::test]
async fn leadership_is_transferred() -> TestResult {
    let cluster = Cluster::new(3, settings())?;
    let leader = cluster.leader().await?;
    let to = cluster.others(leader)[0];
    let refused = cluster.node(to).transfer_leader(leader).await;
    assert!(matches!(refused, Err(Error::NotLeader)), "{refused:?}");
    let bad = cluster.node(leader).transfer_leader(9).await;
    assert!(matches!(bad, Err(Error::BadLeaderTransferee)), "{bad:?}");
    cluster.node(leader).transfer_leader(to).await?;
    assert_eq!(cluster.leader().await?, to);
    cluster.propose(to, 1).await?;
    cluster.wait_values(&cluster.ids(), &[1]).await
}

#[tokio::test]
async fn lost_duplicated_and_delayed_messages_still_converge() -> TestResult {
    let cluster = Cluster::new(3, settings())?;
    cluster.leader().await?;
    cluster
        .hub
        .add_filter(chaos(17, 10, 10, 10, Duration::from_millis(20)));
    let mut acknowledged = Vec::new();
    for v in 1..=30u64 {
        // Lost messages can cost the leader its term; ask whoever leads now.
        let leader = cluster.leader().await?;
        let proposal = cluster.node(leader).propose(v.to_be_bytes().to_vec());
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(1), proposal).await {
            acknowledged.push(v);
        }
    }
    assert!(
        acknowledged.len() >= 20,
        "only {acknowledged:?} went through"
    );
    cluster.hub.clear_filters();
    let leader = cluster.leader().await?;
    cluster.propose(leader, 0).await?;
    let ids = cluster.ids();
    cluster
        .wait_until("every member to hold the same values", || {
            let first = cluster.ledger(ids[0]).values;
            first.last() == Some(&0) && ids.iter().all(|id| cluster.ledger(*id).values == first)
        })
        .await?;
    let values = cluster.ledger(ids[0]).values;
    for v in &acknowledged {
        assert_eq!(
            values.iter().filter(|x| *x == v).count(),
            1,
            "{v} in {values:?}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn read_index_is_linearizable_under_a_partition() -> TestResult {
    let cluster = Cluster::new(3, settings())?;
    let old = cluster.leader().await?;
    cluster.propose(old, 1).await?;
    let rest = cluster.others(old);
    let cut = cluster.hub.add_filter(partition(&[old], &rest));
    let new = cluster.leader_among(&rest).await?;
    cluster.propose(new, 2).await?;
    // The majority reads what it wrote.
    let index = within(cluster.node(rest[0]).read_index(), "a majority read").await??;
    assert!(cluster.status(rest[0]).applied_index >= index);
    assert_eq!(cluster.ledger(rest[0]).values, [1, 2]);
    // The old leader cannot confirm it still leads: its read waits, and
    // never answers with the stale state.
    let stale = {
        let node = cluster.node(old).clone();
        tokio::spawn(async move { node.read_index().await })
    };
    tokio::time::sleep(cluster.election_timeout()).await;
    assert!(!stale.is_finished(), "a cut-off member answered a read");
    cluster.hub.remove_filter(cut);
    within(stale, "the read after healing").await???;
    assert_eq!(
        cluster.ledger(old).values,
        [1, 2],
        "the read saw the write before it"
    );
    Ok(())
}

#[tokio::test]
async fn a_dropped_message_type_blocks_only_what_needs_it() -> TestResult {
    let cluster = Cluster::new(3, steady())?;
    let leader = cluster.leader().await?;
    // Without appends nothing new commits, but heartbeats keep the leader.
    let no_appends = cluster
        .hub
        .add_filter(drop_types(&[MessageType::MsgAppend]));
    let term = cluster.status(leader).term;
    let blocked = {
        let node = cluster.node(leader).clone();
        tokio::spawn(async move { node.propose(1u64.to_be_bytes().to_vec()).await })
    };
    tokio::time::sleep(cluster.election_timeout()).await;
    assert!(!blocked.is_finished(), "committed without appends");
    cluster.hub.remove_filter(no_appends);
    within(blocked, "the proposal once appends flow").await???;
    cluster.wait_values(&cluster.ids(), &[1]).await?;
    assert_eq!(cluster.status(leader).term, term);
    Ok(())
}

#[tokio::test]
async fn groups_on_one_network_elect_commit_and_fail_over_apart() -> TestResult {
    // Four raft groups over the same three members and one hub, as the
    // shards of a member share its transport.
    let hub = Hub::new();
    let groups = (0..4)
        .map(|group| Cluster::on_hub(hub.clone(), group, 3, settings()))
        .collect::<TestResult<Vec<_>>>()?;
    for (i, cluster) in groups.iter().enumerate() {
        let leader = cluster.leader().await?;
        cluster.propose(leader, 100 + i as u64).await?;
    }
    for (i, cluster) in groups.iter().enumerate() {
        cluster
            .wait_values(&cluster.ids(), &[100 + i as u64])
            .await?;
    }

    // Cutting member 1 off cuts it off in every group: each group that it
    // led elects another leader, and every group commits without it.
    let cut = hub.add_filter(partition(&[1], &[2, 3]));
    for (i, cluster) in groups.iter().enumerate() {
        let leader = cluster.leader_among(&[2, 3]).await?;
        cluster.propose(leader, 200 + i as u64).await?;
    }
    hub.remove_filter(cut);
    for (i, cluster) in groups.iter().enumerate() {
        let values = [100 + i as u64, 200 + i as u64];
        cluster.wait_values(&cluster.ids(), &values).await?;
    }
    Ok(())
}

fn sleepy() -> Settings {
    Settings {
        hibernate: true,
        ..settings()
    }
}

/// Counts the messages the hub carries from now on.
fn count_messages(cluster: &Cluster) -> Arc<std::sync::atomic::AtomicU64> {
    let count = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = count.clone();
    cluster.hub.add_filter(Box::new(move |_| {
        counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Verdict::Deliver
    }));
    count
}

#[tokio::test]
async fn an_idle_group_sleeps_and_a_request_wakes_it() -> TestResult {
    let cluster = Cluster::new(3, sleepy())?;
    let leader = cluster.leader().await?;
    cluster.propose(leader, 1).await?;
    cluster.wait_values(&cluster.ids(), &[1]).await?;
    let count = count_messages(&cluster);
    // Idle for an election timeout, the group goes quiet: 10 ms ticks would
    // otherwise carry about 100 heartbeats and responses in 500 ms.
    tokio::time::sleep(cluster.election_timeout() * 3).await;
    let before = count.load(std::sync::atomic::Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let quiet = count.load(std::sync::atomic::Ordering::Relaxed) - before;
    assert_eq!(quiet, 0, "an idle group still sent {quiet} messages");
    assert_eq!(cluster.leader().await?, leader, "sleeping kept the leader");

    // A proposal through a follower wakes the group and commits.
    let follower = cluster.others(leader)[0];
    cluster.propose(follower, 2).await?;
    cluster.wait_values(&cluster.ids(), &[1, 2]).await?;
    // So does a linearizable read, after the group fell asleep again.
    tokio::time::sleep(cluster.election_timeout() * 3).await;
    within(cluster.node(follower).read_index(), "a read").await??;
    Ok(())
}

#[tokio::test]
async fn sleeping_followers_replace_a_leader_whose_connection_broke() -> TestResult {
    let mut cluster = Cluster::new(3, sleepy())?;
    let old = cluster.leader().await?;
    cluster.propose(old, 1).await?;
    tokio::time::sleep(cluster.election_timeout() * 3).await;
    // The leader dies; the transport tells the others its connection broke.
    if let Some(member) = cluster.members.remove(&old) {
        member.node.shutdown();
    }
    let rest = cluster.ids();
    for id in &rest {
        cluster
            .hub
            .deliver(crate::CLUSTER_GROUP, *id, PeerEvent::Unreachable(old));
    }
    let new = cluster.leader_among(&rest).await?;
    assert_ne!(new, old);
    cluster.propose(new, 2).await?;
    cluster.wait_values(&rest, &[1, 2]).await
}

/// A leader answers the ReadIndex requests its followers sent while a
/// round was under way with one heartbeat round, not one each: every read
/// is answered, at an index covering the write before it. A round's
/// heartbeats carry its context (ticks repeat the last one), so the
/// distinct contexts count the rounds.
#[tokio::test]
async fn a_leader_answers_followers_reads_in_shared_heartbeat_rounds() -> TestResult {
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    let cluster = Cluster::new(5, steady())?;
    let leader = cluster.leader().await?;
    cluster.propose(leader, 1).await?;
    let written = cluster.status(leader).applied_index;
    let requests = Arc::new(AtomicUsize::new(0));
    let rounds: Arc<Mutex<HashSet<Vec<u8>>>> = Arc::default();
    let counted = (requests.clone(), rounds.clone());
    // Slow acks keep each round open while the other followers ask.
    cluster
        .hub
        .add_filter(Box::new(move |m| match m.get_msg_type() {
            MessageType::MsgReadIndex => {
                counted.0.fetch_add(1, Ordering::Relaxed);
                Verdict::Deliver
            }
            MessageType::MsgHeartbeat if !m.context.is_empty() => {
                counted
                    .1
                    .lock()
                    .expect("the rounds' lock")
                    .insert(m.context.to_vec());
                Verdict::Deliver
            }
            MessageType::MsgHeartbeatResponse => Verdict::Delay(Duration::from_millis(30)),
            _ => Verdict::Deliver,
        }));
    let mut reads = Vec::new();
    for follower in cluster.others(leader) {
        let node = cluster.node(follower).clone();
        reads.push(tokio::spawn(async move {
            let mut indexes = Vec::new();
            for _ in 0..10 {
                indexes.push(node.read_index().await?);
            }
            Ok::<_, Error>(indexes)
        }));
    }
    for read in reads {
        let indexes = within(read, "the followers' reads").await???;
        assert!(
            indexes.iter().all(|&i| i >= written),
            "{indexes:?} < {written}"
        );
    }
    let requests = requests.load(Ordering::Relaxed);
    let rounds = rounds.lock().expect("the rounds' lock").len();
    assert!(requests >= 40, "{requests} requests for 40 reads");
    assert!(
        rounds < requests,
        "{rounds} heartbeat rounds for {requests} follower requests"
    );
    Ok(())
}
