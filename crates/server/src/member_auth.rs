//! With --shards: members' credentials on each other's `Forwarding`
//! service. That service is on the client port, where a call is a client's
//! and carries its token; a member's own calls (the feeds its watches
//! follow, and the reads it makes for a watcher whose permission it
//! checked) have no token to carry. They are signed instead, with HMAC-SHA256
//! under the cluster secret: random bytes the cluster group's leader
//! proposes once, kept as a state record of the cluster group's store
//! (every member holds that group, raft snapshots carry the record to a
//! member that falls behind, the etcd-format backups given to clients hold
//! only the auth and alarm records) and answered by no API.
//!
//! A signature covers the cluster ID, the signing and the receiving
//! members' IDs, the time, a random nonce and the call (a feed's shard and
//! revision), so it is good for that call to that member only, within
//! `MAX_SKEW` of its time, once: a member remembers the signatures it
//! accepted until they are too old anyway.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cairn_api::cairnpb::ClusterSecret as ProposedSecret;
use cairn_mvcc::{MvccError, Store, WriteBatch};
use hmac::{Hmac, Mac as _};
use parking_lot::{Mutex, RwLock};
use sha2::Sha256;
use tokio::task::JoinHandle;

use crate::member::Member;

/// The gRPC metadata a member's signed call carries:
/// `<member hex>.<unix millis>.<nonce hex>.<signature hex>`.
pub const METADATA: &str = "cairn-member";

/// The cluster group's state record holding the secret.
const SECRET_RECORD: &[u8] = b"cluster-secret";
/// Bytes of a secret the leader makes.
const SECRET_BYTES: usize = 32;
/// How far a signature's time may be from the verifying member's clock
/// (Kerberos' default).
const MAX_SKEW: Duration = Duration::from_secs(300);
/// How often a member without the secret looks whether it leads the
/// cluster group and should propose one.
const SECRET_CHECK: Duration = Duration::from_millis(500);
/// How long a member without the secret waits for it to check a member's
/// credentials, and how often it looks.
const SECRET_WAIT: Duration = Duration::from_secs(2);
const SECRET_POLL: Duration = Duration::from_millis(10);

type HmacSha256 = Hmac<Sha256>;

/// The member credentials `request` presents, if any (unreadable ones as
/// they are, to be refused as malformed).
pub fn presented<T>(request: &tonic::Request<T>) -> Option<String> {
    let value = request.metadata().get(METADATA)?;
    Some(value.to_str().unwrap_or_default().to_string())
}

/// The cluster secret as applied here; `None` until its entry is.
#[derive(Default)]
pub struct ClusterSecret(RwLock<Option<Vec<u8>>>);

impl ClusterSecret {
    /// The secret `store` (the cluster group's) holds, if any.
    pub fn load(store: &Store) -> Result<ClusterSecret, MvccError> {
        let secret = ClusterSecret::default();
        secret.reload(store)?;
        Ok(secret)
    }

    /// Reads the secret again, after a snapshot replaced the store.
    pub fn reload(&self, store: &Store) -> Result<(), MvccError> {
        let records = store.state_records(SECRET_RECORD)?;
        *self.0.write() = records
            .into_iter()
            .find(|(key, _)| key == SECRET_RECORD)
            .map(|(_, value)| value);
        Ok(())
    }

    /// Applies a proposed secret: the first one applied is kept (every
    /// member proposing while none is applied races harmlessly).
    pub fn apply(&self, batch: &mut WriteBatch<'_>, proposed: &ProposedSecret) {
        let mut secret = self.0.write();
        if secret.is_none() && proposed.secret.len() >= SECRET_BYTES {
            batch.put_state_record(SECRET_RECORD.to_vec(), proposed.secret.to_vec());
            *secret = Some(proposed.secret.to_vec());
        }
    }

    pub fn is_known(&self) -> bool {
        self.0.read().is_some()
    }

    fn mac(&self) -> Option<HmacSha256> {
        let secret = self.0.read();
        // HMAC takes a key of any length.
        secret
            .as_deref()
            .and_then(|key| HmacSha256::new_from_slice(key).ok())
    }
}

/// A member's call to another's `Forwarding` service, as signed.
#[derive(Debug, Clone, Copy)]
pub enum Call {
    /// A `Forward` stream: its requests without a token are the member's
    /// own reads.
    Forward,
    /// A `Follow` of `shard` from `revision`.
    Follow { shard: u32, revision: i64 },
}

impl Call {
    fn bytes(&self) -> Vec<u8> {
        match *self {
            Call::Forward => b"forward".to_vec(),
            Call::Follow { shard, revision } => [
                &b"follow"[..],
                &shard.to_be_bytes(),
                &revision.to_be_bytes(),
            ]
            .concat(),
        }
    }
}

/// Why a member's signed call was refused.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("this member has no cluster secret yet")]
    NoSecret,
    #[error("the member credentials do not parse")]
    Malformed,
    #[error("member {0:x} is not a member of this cluster")]
    UnknownMember(u64),
    #[error("the member credentials are too old or from the future")]
    Stale,
    #[error("the member credentials' signature is wrong")]
    BadSignature,
    #[error("the member credentials were used already")]
    Replayed,
}

/// This member's signing and checking of members' calls.
pub struct MemberCredentials {
    id: u64,
    cluster_id: u64,
    secret: Arc<ClusterSecret>,
    /// Signatures accepted within the skew window, with when: a call
    /// presenting one again is a replay.
    accepted: Mutex<HashMap<Vec<u8>, Instant>>,
}

impl MemberCredentials {
    pub fn new(id: u64, cluster_id: u64, secret: Arc<ClusterSecret>) -> MemberCredentials {
        MemberCredentials {
            id,
            cluster_id,
            secret,
            accepted: Mutex::new(HashMap::new()),
        }
    }

    pub fn secret(&self) -> &ClusterSecret {
        &self.secret
    }

    /// Signs `call` to member `to` in `request`'s metadata; leaves it
    /// unsigned while the cluster secret is not applied here (the call
    /// then goes as a client's, without a token).
    pub fn sign<T>(&self, request: &mut tonic::Request<T>, to: u64, call: Call) {
        let Some(signed) = self.signature(to, call) else {
            return;
        };
        if let Ok(value) = signed.parse() {
            request.metadata_mut().insert(METADATA, value);
        }
    }

    fn signature(&self, to: u64, call: Call) -> Option<String> {
        let mut mac = self.secret.mac()?;
        let millis = unix_millis(SystemTime::now());
        let mut nonce = [0u8; 16];
        getrandom::getrandom(&mut nonce).ok()?;
        self.feed(&mut mac, (self.id, to), millis, &nonce, call);
        let signature = mac.finalize().into_bytes();
        Some(format!(
            "{:x}.{millis}.{}.{}",
            self.id,
            hex(&nonce),
            hex(&signature)
        ))
    }

    /// The member whose credentials `presented` are, if they are good for
    /// `call` from one of `members`. Without the secret yet, waits up to
    /// `SECRET_WAIT` for it: a member signs only once it applied the
    /// secret's entry, so the entry is committed and comes here soon.
    pub async fn check(
        &self,
        presented: &str,
        call: Call,
        members: &[u64],
    ) -> Result<u64, Refused> {
        let deadline = Instant::now() + SECRET_WAIT;
        loop {
            match self.verify(presented, call, members, SystemTime::now()) {
                Err(Refused::NoSecret) if Instant::now() < deadline => {
                    tokio::time::sleep(SECRET_POLL).await;
                }
                checked => return checked,
            }
        }
    }

    fn verify(
        &self,
        presented: &str,
        call: Call,
        members: &[u64],
        now: SystemTime,
    ) -> Result<u64, Refused> {
        let mut parts = presented.split('.');
        let (Some(member), Some(millis), Some(nonce), Some(signature), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(Refused::Malformed);
        };
        let member = u64::from_str_radix(member, 16).map_err(|_| Refused::Malformed)?;
        let millis: u64 = millis.parse().map_err(|_| Refused::Malformed)?;
        let nonce = unhex(nonce).ok_or(Refused::Malformed)?;
        let signature = unhex(signature).ok_or(Refused::Malformed)?;
        let mut mac = self.secret.mac().ok_or(Refused::NoSecret)?;
        if !members.contains(&member) {
            return Err(Refused::UnknownMember(member));
        }
        let now = unix_millis(now);
        if now.abs_diff(millis) > MAX_SKEW.as_millis() as u64 {
            return Err(Refused::Stale);
        }
        self.feed(&mut mac, (member, self.id), millis, &nonce, call);
        // Compares in constant time.
        mac.verify_slice(&signature)
            .map_err(|_| Refused::BadSignature)?;
        let mut accepted = self.accepted.lock();
        let fresh = Instant::now();
        accepted.retain(|_, at| fresh.duration_since(*at) <= 2 * MAX_SKEW);
        if accepted.insert(signature, fresh).is_some() {
            return Err(Refused::Replayed);
        }
        Ok(member)
    }

    /// Feeds `mac` what a signature covers; `(from, to)` are the signing
    /// and the receiving members.
    fn feed(
        &self,
        mac: &mut HmacSha256,
        (from, to): (u64, u64),
        millis: u64,
        nonce: &[u8],
        call: Call,
    ) {
        mac.update(b"cairn-member-v1\0");
        mac.update(&self.cluster_id.to_be_bytes());
        mac.update(&from.to_be_bytes());
        mac.update(&to.to_be_bytes());
        mac.update(&millis.to_be_bytes());
        mac.update(&(nonce.len() as u64).to_be_bytes());
        mac.update(nonce);
        mac.update(&call.bytes());
    }
}

/// Proposes a cluster secret whenever this member leads the cluster group
/// and none is applied yet; ends once one is.
pub fn spawn_secret_keeper(member: Arc<Member>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(SECRET_CHECK);
        while !member.credentials().secret().is_known() {
            ticker.tick().await;
            if !member.is_leader() {
                continue;
            }
            let mut secret = vec![0u8; SECRET_BYTES];
            if let Err(e) = getrandom::getrandom(&mut secret) {
                tracing::warn!("making the cluster secret: {e}");
                continue;
            }
            let proposed = ProposedSecret {
                secret: secret.into(),
            };
            if let Err(e) = member.propose(proposed).await {
                tracing::debug!("proposing the cluster secret: {}", e.message());
            }
        }
    })
}

fn unix_millis(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credentials(id: u64, secret: &[u8]) -> MemberCredentials {
        let known = ClusterSecret(RwLock::new(Some(secret.to_vec())));
        MemberCredentials::new(id, 7, Arc::new(known))
    }

    #[test]
    fn a_signature_is_good_for_its_call_once_within_the_skew() {
        let a = credentials(1, &[1; 32]);
        let b = credentials(2, &[1; 32]);
        let call = Call::Follow {
            shard: 3,
            revision: 10,
        };
        let now = SystemTime::now();
        let signed = a.signature(2, call).expect("signed");
        assert_eq!(b.verify(&signed, call, &[1, 2], now).ok(), Some(1));
        assert!(matches!(
            b.verify(&signed, call, &[1, 2], now),
            Err(Refused::Replayed)
        ));
        // Another call, another member list, another time, another secret,
        // another receiver.
        let signed = a.signature(2, call).expect("signed");
        let other = Call::Follow {
            shard: 3,
            revision: 0,
        };
        assert!(matches!(
            b.verify(&signed, other, &[1, 2], now),
            Err(Refused::BadSignature)
        ));
        assert!(matches!(
            b.verify(&signed, call, &[2], now),
            Err(Refused::UnknownMember(1))
        ));
        assert!(matches!(
            b.verify(&signed, call, &[1, 2], now + 2 * MAX_SKEW),
            Err(Refused::Stale)
        ));
        let stranger = credentials(2, &[2; 32]);
        assert!(matches!(
            stranger.verify(&signed, call, &[1, 2], now),
            Err(Refused::BadSignature)
        ));
        let c = credentials(3, &[1; 32]);
        assert!(matches!(
            c.verify(&signed, call, &[1, 2, 3], now),
            Err(Refused::BadSignature)
        ));
        assert!(matches!(
            b.verify("1.2.3", call, &[1, 2], now),
            Err(Refused::Malformed)
        ));
        // Without a secret there is nothing to sign or check with.
        let unknown = MemberCredentials::new(2, 7, Arc::default());
        assert!(unknown.signature(1, call).is_none());
        assert!(matches!(
            unknown.verify(&signed, call, &[1, 2], now),
            Err(Refused::NoSecret)
        ));
    }

    #[tokio::test]
    async fn a_member_without_the_secret_yet_waits_for_it_to_check() {
        let a = credentials(1, &[1; 32]);
        let secret = Arc::new(ClusterSecret::default());
        let b = MemberCredentials::new(2, 7, secret.clone());
        let signed = a.signature(2, Call::Forward).expect("signed");
        let applied = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            *secret.0.write() = Some(vec![1; 32]);
        });
        let checked = b.check(&signed, Call::Forward, &[1, 2]).await;
        assert_eq!(checked.ok(), Some(1));
        applied.await.expect("applied");
    }
}
