//! Where shards live: the shard map, and plans that move it towards an even
//! spread of replicas and leaderships over the members.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use crate::{MemberId, ShardError, ShardId};

/// The replicas of one shard, and the member that should lead it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardReplicas {
    /// Members holding a replica, in the order they got it.
    pub replicas: Vec<MemberId>,
    /// The preferred leader: one of `replicas`.
    pub leader: MemberId,
}

/// One step of a rebalancing plan. Each changes one replica or one
/// leadership, so a cluster carries them out one at a time under load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Move {
    /// A new replica of `shard` on `to`: added as a learner, caught up,
    /// then promoted.
    AddReplica { shard: ShardId, to: MemberId },
    /// `shard`'s replica on `from` goes away (its leadership, if it had it,
    /// first goes to another replica).
    RemoveReplica { shard: ShardId, from: MemberId },
    /// `shard`'s replica moves from `from` to `to`: added on `to`, then
    /// removed from `from`; a leadership on `from` goes to `to`.
    MoveReplica {
        shard: ShardId,
        from: MemberId,
        to: MemberId,
    },
    /// `shard`'s leadership goes from `from` to `to`, which holds a replica.
    TransferLeader {
        shard: ShardId,
        from: MemberId,
        to: MemberId,
    },
}

/// Every shard's replicas and preferred leader: the placement a cluster
/// keeps in its cluster group, indexed by shard number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardMap {
    shards: Vec<ShardReplicas>,
}

impl ShardMap {
    /// The placement of a new cluster: `shards` shards of
    /// min(`replicas`, members) replicas each, spread so that every member
    /// holds a number of replicas and of leaderships within one of every
    /// other's. The same members give the same map on every member.
    pub fn place(
        shards: u32,
        replicas: usize,
        members: &[MemberId],
    ) -> Result<ShardMap, ShardError> {
        crate::Keyspace::new(shards)?;
        if replicas == 0 {
            return Err(ShardError::NoReplicas);
        }
        if members.is_empty() {
            return Err(ShardError::NoMembers);
        }
        let mut map = ShardMap {
            shards: vec![
                ShardReplicas {
                    replicas: Vec::new(),
                    leader: 0,
                };
                shards as usize
            ],
        };
        for step in map.plan(members, replicas) {
            map.apply(&step)?;
        }
        Ok(map)
    }

    pub fn shard_count(&self) -> u32 {
        self.shards.len() as u32
    }

    pub fn shard(&self, shard: ShardId) -> Option<&ShardReplicas> {
        self.shards.get(shard as usize)
    }

    /// Every shard with its number.
    pub fn shards(&self) -> impl Iterator<Item = (ShardId, &ShardReplicas)> {
        self.shards
            .iter()
            .enumerate()
            .map(|(id, replicas)| (id as ShardId, replicas))
    }

    /// How many replicas each member that holds any holds.
    pub fn replica_counts(&self) -> BTreeMap<MemberId, usize> {
        let mut counts = BTreeMap::new();
        for shard in &self.shards {
            for member in &shard.replicas {
                *counts.entry(*member).or_default() += 1;
            }
        }
        counts
    }

    /// How many shards each member that leads any leads.
    pub fn leader_counts(&self) -> BTreeMap<MemberId, usize> {
        let mut counts = BTreeMap::new();
        for shard in self.shards.iter().filter(|s| s.leader != 0) {
            *counts.entry(shard.leader).or_default() += 1;
        }
        counts
    }

    /// Whether the map is what [`Self::plan`] aims at for `members`: every
    /// shard has min(`replicas`, members) replicas, all on `members`, and a
    /// leader among them; replicas and leaderships per member are each
    /// within one of even.
    pub fn is_balanced(&self, members: &[MemberId], replicas: usize) -> bool {
        let members: BTreeSet<MemberId> = members.iter().copied().collect();
        let target = replicas.min(members.len());
        let placed = self.shards.iter().all(|s| {
            s.replicas.len() == target
                && s.replicas.iter().all(|m| members.contains(m))
                && s.replicas.contains(&s.leader)
        });
        let spread = |counts: BTreeMap<MemberId, usize>| {
            let per_member: Vec<usize> = members
                .iter()
                .map(|m| counts.get(m).copied().unwrap_or(0))
                .collect();
            per_member.iter().max().unwrap_or(&0) - per_member.iter().min().unwrap_or(&0) <= 1
        };
        placed && spread(self.replica_counts()) && spread(self.leader_counts())
    }

    /// The moves that take this map to a balanced one for `members` (see
    /// [`Self::is_balanced`]), replica moves first, then leaderships. Moves
    /// only what it must: replicas off members that are gone, replicas a
    /// shard lacks or has too many of, then from the most to the least
    /// loaded member. Deterministic.
    pub fn plan(&self, members: &[MemberId], replicas: usize) -> Vec<Move> {
        let members: Vec<MemberId> = members
            .iter()
            .copied()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut planner = Planner {
            map: self.clone(),
            members,
            moves: Vec::new(),
        };
        if planner.members.is_empty() {
            return Vec::new();
        }
        let target = replicas.max(1).min(planner.members.len());
        planner.evacuate();
        planner.fill_and_trim(target);
        planner.spread_replicas();
        planner.spread_leaders();
        planner.moves
    }

    /// Carries out one move on the map.
    pub fn apply(&mut self, step: &Move) -> Result<(), ShardError> {
        match *step {
            Move::AddReplica { shard, to } => {
                let s = self.shard_mut(shard)?;
                if s.replicas.contains(&to) {
                    return Err(ShardError::AlreadyAReplica { shard, member: to });
                }
                s.replicas.push(to);
                if s.leader == 0 {
                    s.leader = to;
                }
            }
            Move::RemoveReplica { shard, from } => {
                let s = self.shard_mut(shard)?;
                let at = position(s, shard, from)?;
                if s.replicas.len() == 1 {
                    return Err(ShardError::LastReplica(shard));
                }
                s.replicas.remove(at);
                if s.leader == from {
                    s.leader = s.replicas[0];
                }
            }
            Move::MoveReplica { shard, from, to } => {
                let s = self.shard_mut(shard)?;
                let at = position(s, shard, from)?;
                if s.replicas.contains(&to) {
                    return Err(ShardError::AlreadyAReplica { shard, member: to });
                }
                s.replicas[at] = to;
                if s.leader == from {
                    s.leader = to;
                }
            }
            Move::TransferLeader { shard, to, .. } => {
                let s = self.shard_mut(shard)?;
                position(s, shard, to)?;
                s.leader = to;
            }
        }
        Ok(())
    }

    fn shard_mut(&mut self, shard: ShardId) -> Result<&mut ShardReplicas, ShardError> {
        self.shards
            .get_mut(shard as usize)
            .ok_or(ShardError::NoSuchShard(shard))
    }
}

fn position(s: &ShardReplicas, shard: ShardId, member: MemberId) -> Result<usize, ShardError> {
    s.replicas
        .iter()
        .position(|m| *m == member)
        .ok_or(ShardError::NotAReplica { shard, member })
}

/// A plan being made: the map as it will be after `moves`.
struct Planner {
    map: ShardMap,
    /// Sorted, without duplicates, not empty.
    members: Vec<MemberId>,
    moves: Vec<Move>,
}

impl Planner {
    fn push(&mut self, step: Move) {
        // Every move is made from the map as planned, so it applies.
        if self.map.apply(&step).is_ok() {
            self.moves.push(step);
        }
    }

    fn counts(&self, counts: BTreeMap<MemberId, usize>) -> Vec<(MemberId, usize)> {
        self.members
            .iter()
            .map(|m| (*m, counts.get(m).copied().unwrap_or(0)))
            .collect()
    }

    /// The member holding the fewest replicas among those without one of
    /// `shard` (the lowest ID among equals).
    fn least_loaded_outside(&self, shard: ShardId) -> Option<MemberId> {
        let holders = &self.map.shards[shard as usize].replicas;
        self.counts(self.map.replica_counts())
            .into_iter()
            .filter(|(m, _)| !holders.contains(m))
            .min_by_key(|&(m, count)| (count, m))
            .map(|(m, _)| m)
    }

    /// Replicas on members that are gone move to members that are here.
    fn evacuate(&mut self) {
        for shard in 0..self.map.shard_count() {
            let gone: Vec<MemberId> = self.map.shards[shard as usize]
                .replicas
                .iter()
                .copied()
                .filter(|m| self.members.binary_search(m).is_err())
                .collect();
            for from in gone {
                match self.least_loaded_outside(shard) {
                    Some(to) => self.push(Move::MoveReplica { shard, from, to }),
                    None => self.push(Move::RemoveReplica { shard, from }),
                }
            }
        }
    }

    /// Every shard gets exactly `target` replicas.
    fn fill_and_trim(&mut self, target: usize) {
        for shard in 0..self.map.shard_count() {
            while self.map.shards[shard as usize].replicas.len() < target {
                let Some(to) = self.least_loaded_outside(shard) else {
                    break;
                };
                self.push(Move::AddReplica { shard, to });
            }
            while self.map.shards[shard as usize].replicas.len() > target {
                let counts = self.map.replica_counts();
                let s = &self.map.shards[shard as usize];
                // The busiest holder goes, a follower before the leader.
                let Some(from) = s
                    .replicas
                    .iter()
                    .copied()
                    .max_by_key(|m| (counts.get(m).copied(), *m != s.leader, *m))
                else {
                    break;
                };
                self.push(Move::RemoveReplica { shard, from });
            }
        }
    }

    /// Replicas move from the busiest member to the idlest until every
    /// member holds within one of every other.
    fn spread_replicas(&mut self) {
        loop {
            let counts = self.counts(self.map.replica_counts());
            let Some(&(busiest, most)) = counts.iter().max_by_key(|&&(m, c)| (c, m)) else {
                return;
            };
            let Some(&(idlest, least)) = counts.iter().min_by_key(|&&(m, c)| (c, m)) else {
                return;
            };
            if most <= least + 1 {
                return;
            }
            // The busiest holds more shards than the idlest, so some shard
            // is on the first and not the second; a follower moves first.
            let candidate = self
                .map
                .shards()
                .filter(|(_, s)| s.replicas.contains(&busiest) && !s.replicas.contains(&idlest))
                .min_by_key(|(id, s)| (s.leader == busiest, *id))
                .map(|(id, _)| id);
            let Some(shard) = candidate else {
                return;
            };
            self.push(Move::MoveReplica {
                shard,
                from: busiest,
                to: idlest,
            });
        }
    }

    /// Leaderships move along chains of replicas (A leads a shard that B
    /// holds, B leads one that C holds, ...) from the busiest leaders to
    /// members leading at least two fewer, until no such chain is left:
    /// then no transfer can even the counts further.
    fn spread_leaders(&mut self) {
        while let Some(chain) = self.leader_chain() {
            for step in chain {
                self.push(step);
            }
        }
    }

    /// A shortest chain of transfers from a member leading the most shards
    /// to one leading at least two fewer, if there is one.
    fn leader_chain(&self) -> Option<Vec<Move>> {
        let counts: BTreeMap<MemberId, usize> =
            self.counts(self.map.leader_counts()).into_iter().collect();
        let most = counts.values().copied().max()?;
        // Breadth first from every busiest member; `via` says how each
        // member was reached: from whom, by leading which shard.
        let mut via: BTreeMap<MemberId, Option<(MemberId, ShardId)>> = BTreeMap::new();
        let mut queue = VecDeque::new();
        for (&member, &count) in &counts {
            if count == most {
                via.insert(member, None);
                queue.push_back(member);
            }
        }
        while let Some(member) = queue.pop_front() {
            if counts[&member] + 2 <= most {
                let mut chain = Vec::new();
                let mut at = member;
                while let Some(Some((from, shard))) = via.get(&at).copied() {
                    chain.push(Move::TransferLeader {
                        shard,
                        from,
                        to: at,
                    });
                    at = from;
                }
                chain.reverse();
                return Some(chain);
            }
            for (shard, s) in self.map.shards().filter(|(_, s)| s.leader == member) {
                for &next in &s.replicas {
                    if counts.contains_key(&next) && !via.contains_key(&next) {
                        via.insert(next, Some((member, shard)));
                        queue.push_back(next);
                    }
                }
            }
        }
        None
    }
}
