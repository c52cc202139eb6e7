//! The member's leases, with one owner: the lessor as applied (`cairn-lease`,
//! shared with the apply loop, which alone changes records and attachments),
//! the IDs this member picks for grants, keep-alives, and the leader's duties
//! of expiring leases and checkpointing their remaining TTLs. Every change of
//! a lease is a proposal; only keep-alives (expiries) stay local to the
//! leader.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cairn_api::error;
use cairn_api::etcdserverpb::lease_client::LeaseClient;
use cairn_api::etcdserverpb::{
    LeaseCheckpoint, LeaseCheckpointRequest, LeaseKeepAliveRequest, LeaseKeepAliveResponse,
    LeaseRevokeRequest, LeaseTimeToLiveResponse,
};
use cairn_lease::{LeaseError, Lessor};
use parking_lot::Mutex;
use tokio::task::JoinHandle;
use tonic::Status;
use tonic::transport::Channel;

use crate::member::{Member, lease_error};

/// How often the leader looks for expired leases and for leases due for a
/// checkpoint (renewed ones within this tick plus the checkpoint slack).
const EXPIRY_TICK: Duration = Duration::from_millis(100);
/// At most this many revokes per tick, as etcd bounds its revoke rate.
const REVOKES_PER_TICK: usize = 500;
/// How old a lease's checkpoint may grow before the leader records its
/// remaining TTL again, unrenewed. Only members that loaded leases from the
/// store need it: the others resume from the apply instant of the grant or
/// last checkpoint, which renewals refresh.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(5);
/// At most this many leases per checkpoint proposal, as etcd's.
const CHECKPOINTS_PER_PROPOSAL: usize = 1000;

pub struct Leases {
    /// Shared with the apply loop; the leader keeps expiries in it.
    lessor: Arc<Mutex<Lessor>>,
    ids: LeaseIds,
}

/// What the leader proposes on one tick.
struct Duties {
    expired: Vec<i64>,
    checkpoints: Vec<(i64, i64)>,
}

impl Leases {
    pub fn new(lessor: Arc<Mutex<Lessor>>, member_id: u64) -> Leases {
        Leases {
            lessor,
            ids: LeaseIds::new(member_id),
        }
    }

    /// An ID for a grant that leaves it to the server, chosen before
    /// proposing so every member grants the same one.
    pub fn next_id(&self) -> i64 {
        self.ids.next()
    }

    /// Whether lease `id` exists, as applied.
    pub fn exists(&self, id: i64) -> bool {
        self.lessor.lock().contains(id)
    }

    /// The IDs of every lease as applied.
    pub fn ids(&self) -> Vec<i64> {
        self.lessor.lock().ids()
    }

    /// etcd's TimeToLive answer, without its header: TTL -1 for a lease
    /// that does not exist.
    pub fn time_to_live(&self, id: i64, keys: bool) -> LeaseTimeToLiveResponse {
        match self.lessor.lock().info(id, Instant::now()) {
            Some(info) => LeaseTimeToLiveResponse {
                header: None,
                id: info.id,
                ttl: info.ttl,
                granted_ttl: info.granted_ttl,
                keys: if keys {
                    info.keys.into_iter().map(Into::into).collect()
                } else {
                    Vec::new()
                },
            },
            None => LeaseTimeToLiveResponse {
                header: None,
                id,
                ttl: -1,
                granted_ttl: 0,
                keys: Vec::new(),
            },
        }
    }

    /// Renews a lease on the leader, which holds the expiries: its TTL.
    fn renew(&self, id: i64) -> Result<i64, Status> {
        let renewed = {
            let mut lessor = self.lessor.lock();
            let now = Instant::now();
            // The leader task promotes within a tick; a keep-alive that
            // comes first must not be lost.
            if !lessor.is_primary() {
                lessor.promote(now);
            }
            lessor.renew(id, now)
        };
        match renewed {
            Ok(ttl) => Ok(ttl),
            // etcd answers a keep-alive of a missing lease with TTL 0.
            Err(LeaseError::NotFound) => Ok(0),
            Err(e) => Err(lease_error(e).status()),
        }
    }

    /// The leader's duties at `now`; off the leader, none, and no expiries
    /// kept.
    fn duties(&self, leading: bool, now: Instant) -> Option<Duties> {
        let mut lessor = self.lessor.lock();
        if !leading {
            if lessor.is_primary() {
                lessor.demote();
            }
            return None;
        }
        if !lessor.is_primary() {
            lessor.promote(now);
        }
        let checkpoints = lessor.checkpoints(now, CHECKPOINT_INTERVAL, CHECKPOINTS_PER_PROPOSAL);
        Some(Duties {
            expired: lessor.expired(now, REVOKES_PER_TICK),
            checkpoints,
        })
    }
}

/// One client's keep-alive stream: renewed here on the leader, forwarded to
/// the leader from anywhere else.
pub struct KeepAlive {
    member: Arc<Member>,
    /// The leader's Lease client, while it stays the leader.
    leader_client: Option<(u64, LeaseClient<Channel>)>,
}

impl KeepAlive {
    pub fn new(member: Arc<Member>) -> KeepAlive {
        KeepAlive {
            member,
            leader_client: None,
        }
    }

    /// Answers one keep-alive of lease `id`.
    pub async fn renew(&mut self, id: i64) -> Result<LeaseKeepAliveResponse, Status> {
        let member = &self.member;
        member.refuse_on_learner()?;
        let leader = member.node.status().leader;
        if leader == member.id {
            let ttl = member.leases().renew(id)?;
            return Ok(LeaseKeepAliveResponse {
                header: member.current_header(),
                id,
                ttl,
            });
        }
        if leader == 0 {
            return Err(error::NO_LEADER.status());
        }
        let client = match &mut self.leader_client {
            Some((known, client)) if *known == leader => client,
            leader_client => {
                let url = member
                    .node
                    .members()
                    .into_iter()
                    .find(|m| m.id == leader)
                    .and_then(|m| m.client_urls.into_iter().next())
                    .ok_or_else(|| error::NO_LEADER.status())?;
                let channel = Channel::from_shared(url)
                    .map_err(|e| Status::unavailable(format!("leader client URL: {e}")))?
                    .connect_lazy();
                &mut leader_client.insert((leader, LeaseClient::new(channel))).1
            }
        };
        let forwarded = client
            .lease_keep_alive(tokio_stream::once(LeaseKeepAliveRequest { id }))
            .await;
        let mut responses = match forwarded {
            Ok(responses) => responses.into_inner(),
            Err(e) => {
                // Reconnect next time: the leader may have moved or restarted.
                self.leader_client = None;
                return Err(e);
            }
        };
        match responses.message().await {
            Ok(Some(response)) => Ok(response),
            Ok(None) => Err(error::NO_LEADER.status()),
            Err(e) => {
                self.leader_client = None;
                Err(e)
            }
        }
    }
}

/// Runs the leader's lease duties for as long as the member runs: while
/// this member leads, revoke expired leases and checkpoint remaining TTLs,
/// each by a proposal; otherwise keep no expiries.
pub fn spawn_leader_task(member: Arc<Member>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(EXPIRY_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(duties) = member.leases().duties(member.is_leader(), Instant::now()) else {
                continue;
            };
            for id in duties.expired {
                // Each on its own: a slow proposal does not hold up the
                // next tick; a lost one is retried by the lessor.
                let member = member.clone();
                tokio::spawn(async move {
                    match member.propose(LeaseRevokeRequest { id }).await {
                        Ok(_) => tracing::debug!("revoked expired lease {id:x}"),
                        Err(e) if e.code() == tonic::Code::NotFound => {}
                        Err(e) => tracing::warn!("revoking expired lease {id:x}: {e}"),
                    }
                });
            }
            if !duties.checkpoints.is_empty() {
                let member = member.clone();
                tokio::spawn(async move {
                    let checkpoint = LeaseCheckpointRequest {
                        checkpoints: duties
                            .checkpoints
                            .into_iter()
                            .map(|(id, remaining_ttl)| LeaseCheckpoint { id, remaining_ttl })
                            .collect(),
                    };
                    if let Err(e) = member.propose(checkpoint).await {
                        tracing::warn!("checkpointing lease TTLs: {e}");
                    }
                });
            }
        }
    })
}

/// Picks lease IDs for grants that leave it to the server, unique across
/// members as etcd's: the member ID's low 16 bits, then a counter started
/// from the clock in milliseconds, kept positive.
struct LeaseIds {
    prefix: u64,
    suffix: AtomicU64,
}

impl LeaseIds {
    const SUFFIX_BITS: u32 = 48;

    fn new(member_id: u64) -> LeaseIds {
        let millis = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        LeaseIds {
            prefix: (member_id & 0xffff) << Self::SUFFIX_BITS,
            suffix: AtomicU64::new((millis & ((1 << 40) - 1)) << 8),
        }
    }

    fn next(&self) -> i64 {
        loop {
            let suffix = self.suffix.fetch_add(1, Ordering::Relaxed) + 1;
            let id = (self.prefix | (suffix & ((1 << Self::SUFFIX_BITS) - 1))) & (i64::MAX as u64);
            // 0 means "no lease"; only a wrapped counter of member 0 gets it.
            if id != 0 {
                return id as i64;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leases_with_one(ttl: i64) -> Result<(Leases, i64), LeaseError> {
        let mut lessor = Lessor::new(1);
        let record = lessor.grant(7, ttl, Instant::now())?;
        Ok((Leases::new(Arc::new(Mutex::new(lessor)), 1), record.id))
    }

    #[test]
    fn renewals_and_lookups_answer_as_etcd() -> Result<(), LeaseError> {
        let (leases, id) = leases_with_one(10)?;
        assert_eq!(leases.renew(id).ok(), Some(10));
        // A keep-alive or TimeToLive of a missing lease is not an error.
        assert_eq!(leases.renew(99).ok(), Some(0));
        assert_eq!(leases.time_to_live(99, true).ttl, -1);
        let info = leases.time_to_live(id, false);
        assert_eq!((info.id, info.granted_ttl), (id, 10));
        assert_eq!(leases.ids(), vec![id]);
        Ok(())
    }

    #[test]
    fn only_the_leader_expires_leases() -> Result<(), LeaseError> {
        let (leases, id) = leases_with_one(1)?;
        let later = Instant::now() + Duration::from_secs(2);
        assert!(leases.duties(false, later).is_none());
        // Promoted now, the lease expires its whole TTL from now.
        let now = leases.duties(true, Instant::now()).map(|d| d.expired);
        assert_eq!(now, Some(Vec::new()));
        let expired = leases.duties(true, later).map(|d| d.expired);
        assert_eq!(expired, Some(vec![id]));
        // Demoted: no expiries kept.
        assert!(leases.duties(false, later).is_none());
        assert!(!leases.lessor.lock().is_primary());
        Ok(())
    }

    #[test]
    fn lease_ids_are_positive_and_carry_the_member() {
        let ids = LeaseIds::new(0x1234);
        let (a, b) = (ids.next(), ids.next());
        assert!(a > 0 && b > a);
        assert_eq!((a as u64) >> LeaseIds::SUFFIX_BITS, 0x1234);
    }
}
