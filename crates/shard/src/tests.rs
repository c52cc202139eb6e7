use std::collections::BTreeSet;

use proptest::prelude::*;

use super::*;

#[test]
fn shard_counts_out_of_bounds_are_refused() {
    assert_eq!(Keyspace::new(0), Err(ShardError::ShardCount(0)));
    assert_eq!(
        Keyspace::new(MAX_SHARDS + 1),
        Err(ShardError::ShardCount(MAX_SHARDS + 1))
    );
    assert!(Keyspace::new(1).is_ok() && Keyspace::new(MAX_SHARDS).is_ok());
}

#[test]
fn the_shard_of_a_key_never_changes() {
    // Pinned: a key's shard is part of the data dir's meaning, so the hash
    // must not change between versions.
    let keyspace = Keyspace::new(128).expect("valid");
    let shards: Vec<ShardId> = [&b"foo"[..], b"/registry/pods/default/web-0", b""]
        .iter()
        .map(|k| keyspace.shard_of(k))
        .collect();
    assert_eq!(shards, vec![10, 26, 66]);
    assert_eq!(Keyspace::new(1).expect("valid").shard_of(b"anything"), 0);
}

#[test]
fn keys_with_one_prefix_spread_over_the_shards() {
    let keyspace = Keyspace::new(16).expect("valid");
    let mut per_shard = [0u32; 16];
    for i in 0..16_000 {
        per_shard[keyspace.shard_of(format!("/registry/pods/ns/pod-{i}").as_bytes()) as usize] += 1;
    }
    // 1,000 each on average; a fair hash stays well within a quarter.
    assert!(
        per_shard.iter().all(|&n| (750..=1250).contains(&n)),
        "{per_shard:?}"
    );
}

#[test]
fn a_key_touches_its_shard_and_a_range_touches_all() {
    let keyspace = Keyspace::new(8).expect("valid");
    let shard = keyspace.shard_of(b"k");
    assert_eq!(keyspace.shards_of_range(b"k", b""), shard..shard + 1);
    assert_eq!(keyspace.shards_of_range(b"a", b"b"), 0..8);
    assert_eq!(keyspace.shards_of_range(b"\0", b"\0"), 0..8);
}

#[test]
fn placement_refuses_what_cannot_be_placed() {
    assert_eq!(ShardMap::place(4, 0, &[1]), Err(ShardError::NoReplicas));
    assert_eq!(ShardMap::place(4, 3, &[]), Err(ShardError::NoMembers));
    assert_eq!(ShardMap::place(0, 3, &[1]), Err(ShardError::ShardCount(0)));
}

#[test]
fn fewer_members_than_replicas_put_a_replica_on_each() {
    let map = ShardMap::place(5, 3, &[7, 9]).expect("placed");
    for (_, shard) in map.shards() {
        let replicas: BTreeSet<_> = shard.replicas.iter().copied().collect();
        assert_eq!(replicas, BTreeSet::from([7, 9]));
    }
    assert!(map.is_balanced(&[7, 9], 3));
}

#[test]
fn moves_that_do_not_fit_the_map_are_refused() {
    let mut map = ShardMap::place(2, 2, &[1, 2]).expect("placed");
    assert_eq!(
        map.apply(&Move::AddReplica { shard: 0, to: 1 }),
        Err(ShardError::AlreadyAReplica {
            shard: 0,
            member: 1
        })
    );
    assert_eq!(
        map.apply(&Move::TransferLeader {
            shard: 1,
            from: 1,
            to: 3
        }),
        Err(ShardError::NotAReplica {
            shard: 1,
            member: 3
        })
    );
    assert_eq!(
        map.apply(&Move::RemoveReplica { shard: 9, from: 1 }),
        Err(ShardError::NoSuchShard(9))
    );
    map.apply(&Move::RemoveReplica { shard: 0, from: 1 })
        .expect("one of two goes");
    assert_eq!(
        map.apply(&Move::RemoveReplica { shard: 0, from: 2 }),
        Err(ShardError::LastReplica(0))
    );
    assert_eq!(map.shard(0).map(|s| s.leader), Some(2), "the leader moved");
}

#[test]
fn a_shard_map_survives_serialization() {
    let map = ShardMap::place(16, 3, &[1, 2, 3, 4]).expect("placed");
    let json = serde_json::to_string(&map).expect("serializes");
    let back: ShardMap = serde_json::from_str(&json).expect("parses");
    assert_eq!(back, map);
}

fn members(n: u64) -> Vec<MemberId> {
    // IDs as raft makes them: large and unordered.
    (1..=n)
        .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
        .collect()
}

fn carry_out(map: &mut ShardMap, moves: &[Move]) {
    for step in moves {
        map.apply(step).expect("a planned move applies");
    }
}

proptest! {
    #[test]
    fn a_new_cluster_is_placed_evenly(shards in 1u32..300, replicas in 1usize..6, n in 1u64..13) {
        let members = members(n);
        let map = ShardMap::place(shards, replicas, &members).expect("placed");
        prop_assert_eq!(map.shard_count(), shards);
        prop_assert!(map.is_balanced(&members, replicas), "{:?}", map);
        prop_assert_eq!(&ShardMap::place(shards, replicas, &members).expect("placed"), &map);
        prop_assert!(map.plan(&members, replicas).is_empty(), "a balanced map needs no moves");
    }

    #[test]
    fn members_added_and_removed_are_rebalanced(
        shards in 1u32..200,
        replicas in 1usize..5,
        before in 1u64..10,
        added in 0u64..4,
        removed in 0usize..3,
    ) {
        let all = members(before + added);
        let mut now: Vec<MemberId> = all[..before as usize].to_vec();
        let mut map = ShardMap::place(shards, replicas, &now).expect("placed");
        now.extend_from_slice(&all[before as usize..]);
        let removed = removed.min(now.len() - 1);
        now.drain(..removed);
        let moves = map.plan(&now, replicas);
        carry_out(&mut map, &moves);
        prop_assert!(map.is_balanced(&now, replicas), "{:?} after {:?}", map, moves);
        // Nothing moves twice: each replica, before or after, moves once at most.
        let replica_moves = moves.iter().filter(|m| !matches!(m, Move::TransferLeader { .. })).count();
        let placed = shards as usize * replicas.min(before as usize).max(replicas.min(now.len()));
        prop_assert!(replica_moves <= placed, "{} moves for {} replicas", replica_moves, placed);
    }

    #[test]
    fn one_member_added_takes_about_its_share(shards in 8u32..200, n in 3u64..9) {
        let all = members(n + 1);
        let mut map = ShardMap::place(shards, 3, &all[..n as usize]).expect("placed");
        let moves = map.plan(&all, 3);
        let replica_moves = moves.iter().filter(|m| matches!(m, Move::MoveReplica { .. })).count();
        // The newcomer ends with about shards*3/(n+1) replicas, and only
        // those move.
        let share = (shards as usize * 3).div_ceil(n as usize + 1);
        prop_assert!(replica_moves <= share, "{} moves, share {}", replica_moves, share);
        carry_out(&mut map, &moves);
        prop_assert!(map.is_balanced(&all, 3));
    }
}
