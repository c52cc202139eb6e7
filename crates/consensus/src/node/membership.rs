//! Membership and leadership on the raft thread: etcd's checks before a
//! change is proposed, applying committed changes to raft and the member
//! registry in log order, and leader transfer.

use protobuf::Message as _;
use raft::StateRole;
use raft::prelude::{ConfChangeSingle, ConfChangeType, ConfChangeV2, Entry};

use super::raft_loop::RaftLoop;
use super::{
    KIND_CONF_CHANGE, KIND_MEMBER_UPDATE, Reply, decode_context, encode_context, peer_urls,
};
use crate::raft_log::RaftLog;
use crate::{Error, MembershipChange, PeerInfo, StopReason};

/// A learner may be promoted once it has this share of the leader's log,
/// as etcd requires.
const LEARNER_READY_PERCENT: u64 = 90;

impl<O, L: RaftLog> RaftLoop<O, L> {
    pub(super) fn propose_membership(
        &mut self,
        seq: u64,
        change: MembershipChange,
    ) -> Result<(), Error> {
        let members = self.raw.store().members().to_vec();
        let find = |id: u64| members.iter().find(|m| m.id == id).cloned();
        let (change_type, member) = match change {
            MembershipChange::Add(member) => {
                if find(member.id).is_some() {
                    return Err(Error::MemberExists);
                }
                if members
                    .iter()
                    .any(|m| m.peer_urls.iter().any(|u| member.peer_urls.contains(u)))
                {
                    return Err(Error::PeerUrlExists);
                }
                if member.is_learner && members.iter().any(|m| m.is_learner) {
                    return Err(Error::TooManyLearners);
                }
                let kind = if member.is_learner {
                    ConfChangeType::AddLearnerNode
                } else {
                    ConfChangeType::AddNode
                };
                (kind, member)
            }
            MembershipChange::Remove(id) => (
                ConfChangeType::RemoveNode,
                find(id).ok_or(Error::MemberNotFound)?,
            ),
            MembershipChange::Promote(id) => {
                let mut member = find(id).ok_or(Error::MemberNotFound)?;
                if !member.is_learner {
                    return Err(Error::MemberNotLearner);
                }
                self.check_learner_ready(id)?;
                member.is_learner = false;
                (ConfChangeType::AddNode, member)
            }
            MembershipChange::UpdatePeerUrls { id, peer_urls } => {
                find(id).ok_or(Error::MemberNotFound)?;
                if members
                    .iter()
                    .any(|m| m.id != id && m.peer_urls.iter().any(|u| peer_urls.contains(u)))
                {
                    return Err(Error::PeerUrlExists);
                }
                return self
                    .propose_update(seq, MembershipChange::UpdatePeerUrls { id, peer_urls });
            }
            publish @ MembershipChange::Publish { .. } => {
                return self.propose_update(seq, publish);
            }
        };
        let cc = ConfChangeV2 {
            changes: vec![ConfChangeSingle {
                change_type,
                node_id: member.id,
                ..Default::default()
            }]
            .into(),
            ..Default::default()
        };
        let mut context = encode_context(KIND_CONF_CHANGE, self.shared.id, seq);
        context.extend(serde_json::to_vec(&member).map_err(|e| Error::Corrupt(e.to_string()))?);
        self.raw
            .propose_conf_change(context, cc)
            .map_err(proposal_error)
    }

    /// Registry changes that are not raft conf changes travel as normal
    /// entries marked as the consensus layer's.
    fn propose_update(&mut self, seq: u64, update: MembershipChange) -> Result<(), Error> {
        let context = encode_context(KIND_MEMBER_UPDATE, self.shared.id, seq);
        let data = serde_json::to_vec(&update).map_err(|e| Error::Corrupt(e.to_string()))?;
        self.raw.propose(context, data).map_err(proposal_error)
    }

    /// etcd promotes a learner only when it holds most of the leader's log;
    /// only the leader knows, so a follower lets the promotion through.
    fn check_learner_ready(&self, id: u64) -> Result<(), Error> {
        let raft = &self.raw.raft;
        if raft.state != StateRole::Leader {
            return Ok(());
        }
        let matched = raft.prs().get(id).map_or(0, |p| p.matched);
        let committed = raft.raft_log.committed;
        if matched * 100 < committed * LEARNER_READY_PERCENT {
            return Err(Error::LearnerNotReady);
        }
        Ok(())
    }

    /// Applies a committed membership entry to raft and the registry, in log
    /// order (the apply thread sends it before reporting the index applied).
    pub(super) fn apply_membership(&mut self, index: u64, entry: Entry) -> Result<(), Error> {
        let Some((kind, proposer, seq)) = decode_context(&entry.context) else {
            return Err(Error::Corrupt(format!(
                "membership entry {index} has no context"
            )));
        };
        let mut members = self.raw.store().members().to_vec();
        let mut conf_state = None;
        let mut removed_self = false;
        match kind {
            KIND_CONF_CHANGE => {
                let cc = ConfChangeV2::parse_from_bytes(&entry.data)?;
                let member: PeerInfo = serde_json::from_slice(&entry.context[17..])
                    .map_err(|e| Error::Corrupt(format!("membership entry {index}: {e}")))?;
                conf_state = Some(self.raw.apply_conf_change(&cc)?);
                for change in cc.changes.iter() {
                    members.retain(|m| m.id != change.node_id);
                    match change.change_type {
                        ConfChangeType::RemoveNode => {
                            removed_self |= change.node_id == self.shared.id
                        }
                        ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                            let mut m = member.clone();
                            m.is_learner = change.change_type == ConfChangeType::AddLearnerNode;
                            members.push(m);
                        }
                    }
                }
            }
            KIND_MEMBER_UPDATE => {
                let update: MembershipChange = serde_json::from_slice(&entry.data)
                    .map_err(|e| Error::Corrupt(format!("membership entry {index}: {e}")))?;
                match update {
                    MembershipChange::UpdatePeerUrls { id, peer_urls } => {
                        if let Some(m) = members.iter_mut().find(|m| m.id == id) {
                            m.peer_urls = peer_urls;
                        }
                    }
                    MembershipChange::Publish {
                        id,
                        name,
                        client_urls,
                    } => {
                        if let Some(m) = members.iter_mut().find(|m| m.id == id) {
                            m.name = name;
                            m.client_urls = client_urls;
                        }
                    }
                    other => {
                        return Err(Error::Corrupt(format!(
                            "membership entry {index} carries {other:?} as a normal entry"
                        )));
                    }
                }
            }
            other => {
                return Err(Error::Corrupt(format!(
                    "entry {index} has unknown kind {other}"
                )));
            }
        }
        members.sort_by_key(|m| m.id);
        self.raw
            .mut_store()
            .set_membership(members.clone(), conf_state)?;
        self.transport
            .set_peers(self.group, &peer_urls(&members, self.shared.id));
        *self.shared.members.lock() = members.clone();
        self.publish_status();
        if proposer == self.shared.id
            && let Some(waiter) = self.shared.member_waiters.lock().remove(&seq)
        {
            let _ = waiter.send(Ok(members));
        }
        if removed_self {
            self.shared.stop(StopReason::Removed);
        }
        Ok(())
    }

    pub(super) fn transfer_leader(&mut self, to: u64, reply: Reply<()>) {
        let raft = &self.raw.raft;
        if raft.state != StateRole::Leader {
            let _ = reply.send(Err(Error::NotLeader));
            return;
        }
        if to == self.shared.id {
            let _ = reply.send(Ok(()));
            return;
        }
        if !raft.prs().conf().voters().contains(to) {
            let _ = reply.send(Err(Error::BadLeaderTransferee));
            return;
        }
        self.raw.transfer_leader(to);
        let _ = reply.send(Ok(()));
    }
}

fn proposal_error(e: raft::Error) -> Error {
    match e {
        raft::Error::ProposalDropped => Error::NoLeader,
        other => Error::Raft(other),
    }
}
