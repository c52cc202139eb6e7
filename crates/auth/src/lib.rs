//! etcd's authentication and authorisation for Cairn: the replicated auth
//! store (users, roles, key permissions, on/off, revision), simple and JWT
//! tokens, and the checks every service makes.
//!
//! Every change of the store is a proposal applied by the member's apply
//! loop ([`Auth::apply`]), stored as one record among mvcc's state records
//! ([`RECORD`]) in the batch of its applied index, so snapshots carry it. A
//! service resolves who calls ([`Auth::caller`], from the plain
//! [`Credentials`] its transport found: a token, else with
//! --client-cert-auth the client certificate's common name, else the v2
//! API's guest), checks reads itself and sends writes through the log with a
//! [`RequestHeader`] naming the caller; the apply loop checks those against
//! the store as it is when they apply ([`Auth::check_applied`]), so a
//! permission revoked meanwhile counts.
//!
//! Failures are etcd's own errors ([`EtcdError`], exact messages and gRPC
//! codes) where etcd has one, else an [`AuthError`]. The crate knows no
//! transport: the member turns gRPC metadata into [`Credentials`] and errors
//! into statuses.
//!
//! # Example
//!
//! The store on its own: a root user, a reader of `/app/`, and the checks.
//!
//! ```
//! use cairn_api::authpb::{Permission, permission::Type};
//! use cairn_api::error;
//! use cairn_auth::{Access, AuthStore, ROOT_ROLE, ROOT_USER};
//!
//! # fn main() -> Result<(), cairn_api::error::EtcdError> {
//! let mut store = AuthStore::default();
//! store.user_add(ROOT_USER, Vec::new(), None)?;
//! store.user_grant_role(ROOT_USER, ROOT_ROLE)?;
//! store.user_add("alice", Vec::new(), None)?;
//! store.role_add("reader")?;
//! let app = Permission {
//!     perm_type: Type::Read as i32,
//!     key: b"/app/".to_vec().into(),
//!     range_end: b"/app0".to_vec().into(),
//! };
//! store.role_grant_permission("reader", Some(app))?;
//! store.user_grant_role("alice", "reader")?;
//!
//! // Off, everyone may do anything; on, only what roles grant.
//! assert_eq!(store.permitted("", Access::Write, b"/app/x", b""), Ok(()));
//! store.enable()?;
//! assert_eq!(store.permitted("alice", Access::Read, b"/app/x", b""), Ok(()));
//! assert_eq!(
//!     store.permitted("alice", Access::Write, b"/app/x", b""),
//!     Err(error::PERMISSION_DENIED)
//! );
//! assert_eq!(store.admin_permitted("alice"), Err(error::PERMISSION_DENIED));
//! assert_eq!(store.admin_permitted(ROOT_USER), Ok(()));
//! # Ok(())
//! # }
//! ```

mod error;
mod perms;
mod store;
#[cfg(test)]
mod tests;
mod tokens;

use std::time::{Duration, Instant};

use cairn_api::cairnpb::auth_request::Request as AuthOp;
use cairn_api::cairnpb::internal_request::Request as Internal;
use cairn_api::cairnpb::{AuthRequest, RequestHeader};
use cairn_api::error::{self as etcd, EtcdError};
use cairn_api::etcdserverpb::request_op::Request as Op;
use cairn_api::etcdserverpb::{Compare, RequestOp, TxnRequest};
use cairn_mvcc::{Store, WriteBatch};
use parking_lot::{RwLock, RwLockReadGuard};

pub use error::{AuthError, KeyError, TokenFlagError};
pub use perms::Access;
pub use store::{AuthStore, ROOT_ROLE, ROOT_USER};
use tokens::{SimpleTokens, Tokens};

/// The mvcc state record holding the auth store.
pub const RECORD: &[u8] = b"auth";
/// How long a request with a simple token from another member waits for
/// this member to apply the authentication that made it.
const TOKEN_WAIT: Duration = Duration::from_secs(5);

pub use cairn_api::v2_guest::{V2_GUEST_ROLE, V2_GUEST_USER, V2Guest};

/// The auth flags: --auth-token, --auth-token-ttl, --bcrypt-cost, and
/// --client-cert-auth (which lets a certificate's common name name the user).
#[derive(Debug, Clone)]
pub struct Settings {
    /// `simple`, or `jwt,` with etcd's options (`pub-key=`, `priv-key=`,
    /// `sign-method=`, `ttl=`).
    pub token: String,
    /// How long a simple token lives since its last use.
    pub token_ttl: Duration,
    pub bcrypt_cost: u32,
    pub client_cert_auth: bool,
}

/// What a request presented to identify its caller.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    /// A token from `Authenticate`.
    pub token: Option<String>,
    /// The verified client certificate's common name.
    pub common_name: Option<String>,
    /// The v2 API asks for a caller without credentials ([`V2Guest`]).
    pub v2_guest: bool,
}

/// Who calls, as etcd's `AuthInfo`: an empty name is nobody.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Caller {
    pub username: String,
    /// The auth store revision the caller was resolved at.
    pub revision: u64,
}

impl Caller {
    /// The header its writes travel through the log with.
    pub fn header(&self) -> RequestHeader {
        RequestHeader {
            username: self.username.clone(),
            auth_revision: self.revision,
        }
    }
}

/// What applying an auth request produced.
#[derive(Debug)]
pub enum AuthApplied {
    Changed,
    /// A simple token was assigned (`token` set) or a JWT is to be signed.
    Authenticated {
        username: String,
        revision: u64,
        token: Option<String>,
    },
}

/// The auth store as this member has applied it, its tokens, and the
/// checks made against it; shared by the services and the apply loop.
pub struct Auth {
    store: RwLock<AuthStore>,
    tokens: Tokens,
    bcrypt_cost: u32,
    client_cert_auth: bool,
    /// For the applied index that simple tokens wait for.
    mvcc: Store,
}

impl Auth {
    /// The auth store as `mvcc` holds it, with tokens as `settings` say.
    pub fn open(mvcc: Store, settings: &Settings) -> Result<Auth, AuthError> {
        let tokens = Tokens::from_flag(&settings.token, settings.token_ttl)?;
        let store = load(&mvcc)?;
        Ok(Auth {
            store: RwLock::new(store),
            tokens,
            bcrypt_cost: settings.bcrypt_cost,
            client_cert_auth: settings.client_cert_auth,
            mvcc,
        })
    }

    /// Reads the store again after a snapshot replaced mvcc's content;
    /// tokens issued before are forgotten.
    pub fn reload(&self) -> Result<(), AuthError> {
        *self.store.write() = load(&self.mvcc)?;
        if let Tokens::Simple(simple) = &self.tokens {
            simple.clear();
        }
        Ok(())
    }

    pub fn store(&self) -> RwLockReadGuard<'_, AuthStore> {
        self.store.read()
    }

    /// Who presented `credentials`. Auth off: nobody, whatever they sent.
    pub async fn caller(&self, credentials: &Credentials) -> Result<Caller, EtcdError> {
        let (enabled, revision) = {
            let store = self.store.read();
            (store.is_enabled(), store.revision())
        };
        if !enabled {
            return Ok(Caller {
                username: String::new(),
                revision,
            });
        }
        if let Some(token) = &credentials.token {
            // As etcd's: a simple token's caller is resolved at the store's
            // revision now, a JWT's at the revision it was signed at.
            let resolved = match &self.tokens {
                Tokens::Simple(simple) => {
                    self.wait_for_token(token).await?;
                    simple.user(token).map(|user| (user, revision))
                }
                Tokens::Jwt(jwt) => jwt.verify(token),
            };
            let (username, revision) = resolved.ok_or(etcd::INVALID_AUTH_TOKEN)?;
            return Ok(Caller { username, revision });
        }
        if self.client_cert_auth
            && let Some(common_name) = &credentials.common_name
        {
            return Ok(Caller {
                username: common_name.clone(),
                revision,
            });
        }
        if credentials.v2_guest {
            return Ok(Caller {
                username: V2_GUEST_USER.to_string(),
                revision,
            });
        }
        Ok(Caller {
            username: String::new(),
            revision,
        })
    }

    /// A simple token names the raft index that assigned it: a member that
    /// has not applied it yet waits, as etcd's do.
    async fn wait_for_token(&self, token: &str) -> Result<(), EtcdError> {
        let index = SimpleTokens::index_of(token).ok_or(etcd::INVALID_AUTH_TOKEN)?;
        let deadline = Instant::now() + TOKEN_WAIT;
        while self.mvcc.applied_index() < index {
            if Instant::now() > deadline {
                return Err(etcd::INVALID_AUTH_TOKEN);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    /// The caller may do `access` on the keys `key`/`range_end` name.
    pub fn check(
        &self,
        caller: &Caller,
        access: Access,
        key: &[u8],
        range_end: &[u8],
    ) -> Result<(), EtcdError> {
        let store = self.store.read();
        // A JWT signed before the store last changed (etcd's isOpPermitted).
        if store.is_enabled() && !caller.username.is_empty() && caller.revision < store.revision() {
            return Err(etcd::AUTH_OLD_REVISION);
        }
        store.permitted(&caller.username, access, key, range_end)
    }

    /// etcd's check after a read: the store changed since the caller was
    /// resolved (a permission may have gone meanwhile), so the answer may
    /// not be handed out.
    pub fn check_still_current(&self, caller: &Caller) -> Result<(), EtcdError> {
        let store = self.store.read();
        if store.is_enabled() && !caller.username.is_empty() && caller.revision != store.revision()
        {
            return Err(etcd::AUTH_OLD_REVISION);
        }
        Ok(())
    }

    /// The caller has the root role (or auth is off).
    pub fn check_admin(&self, caller: &Caller) -> Result<(), EtcdError> {
        self.store.read().admin_permitted(&caller.username)
    }

    /// bcrypt, with --bcrypt-cost, off the async threads.
    pub async fn hash_password(&self, password: String) -> Result<Vec<u8>, AuthError> {
        let cost = self.bcrypt_cost;
        let hashed = tokio::task::spawn_blocking(move || bcrypt::hash(password, cost))
            .await?
            .map_err(AuthError::Hash)?;
        Ok(hashed.into_bytes())
    }

    /// Checks a user's password, as etcd does before proposing an
    /// authentication.
    pub async fn check_password(&self, name: &str, password: String) -> Result<(), AuthError> {
        let hash = {
            let store = self.store.read();
            if !store.is_enabled() {
                return Err(etcd::AUTH_NOT_ENABLED.into());
            }
            store.password_hash(name)?
        };
        let matches = tokio::task::spawn_blocking(move || {
            let hash = String::from_utf8_lossy(&hash).into_owned();
            bcrypt::verify(password, &hash).unwrap_or(false)
        })
        .await?;
        if matches {
            Ok(())
        } else {
            Err(etcd::AUTH_FAILED.into())
        }
    }

    /// What an authentication proposal carries: a simple token's random
    /// part, or nothing for JWTs (signed after the apply).
    pub fn new_simple_token(&self) -> Result<String, AuthError> {
        match &self.tokens {
            Tokens::Simple(_) => SimpleTokens::random_part().map_err(AuthError::Random),
            Tokens::Jwt(_) => Ok(String::new()),
        }
    }

    /// The token an applied authentication hands the client.
    pub fn token_for(&self, applied: AuthApplied) -> Result<String, AuthError> {
        match (applied, &self.tokens) {
            (
                AuthApplied::Authenticated {
                    token: Some(token), ..
                },
                _,
            ) => Ok(token),
            (
                AuthApplied::Authenticated {
                    username, revision, ..
                },
                Tokens::Jwt(jwt),
            ) => jwt.sign(&username, revision),
            (other, _) => Err(AuthError::NotAuthenticated(other)),
        }
    }

    /// Applies one auth request (apply loop only): the caller in `header`
    /// must be an admin for every change; the new store goes into `batch`.
    pub fn apply(
        &self,
        batch: &mut WriteBatch<'_>,
        header: Option<&RequestHeader>,
        request: AuthRequest,
        index: u64,
    ) -> Result<AuthApplied, EtcdError> {
        let op = request.request.ok_or(etcd::INVALID_AUTH_MGMT)?;
        let mut store = self.store.write();
        if !matches!(op, AuthOp::Authenticate(_))
            && let Some(header) = header
        {
            store.admin_permitted(&header.username)?;
        }
        match op {
            AuthOp::Authenticate(r) => {
                store.may_authenticate(&r.name)?;
                let token = match &self.tokens {
                    Tokens::Simple(simple) => {
                        let token = format!("{}.{index}", r.simple_token);
                        simple.assign(token.clone(), &r.name);
                        Some(token)
                    }
                    Tokens::Jwt(_) => None,
                };
                return Ok(AuthApplied::Authenticated {
                    username: r.name,
                    revision: store.revision(),
                    token,
                });
            }
            AuthOp::Enable(_) => store.enable()?,
            AuthOp::Disable(_) => {
                store.disable();
                if let Tokens::Simple(simple) = &self.tokens {
                    simple.clear();
                }
            }
            AuthOp::UserAdd(r) => store.user_add(&r.name, r.password_hash.to_vec(), r.options)?,
            AuthOp::UserDelete(r) => {
                store.user_delete(&r.name)?;
                self.invalidate(&r.name);
            }
            AuthOp::UserChangePassword(r) => {
                store.user_change_password(&r.name, r.password_hash.to_vec())?;
                self.invalidate(&r.name);
            }
            AuthOp::UserGrantRole(r) => store.user_grant_role(&r.user, &r.role)?,
            AuthOp::UserRevokeRole(r) => store.user_revoke_role(&r.name, &r.role)?,
            AuthOp::RoleAdd(r) => store.role_add(&r.name)?,
            AuthOp::RoleDelete(r) => store.role_delete(&r.role)?,
            AuthOp::RoleGrantPermission(r) => store.role_grant_permission(&r.name, r.perm)?,
            AuthOp::RoleRevokePermission(r) => {
                store.role_revoke_permission(&r.role, &r.key, &r.range_end)?
            }
        }
        batch.put_state_record(RECORD.to_vec(), store.record());
        Ok(AuthApplied::Changed)
    }

    fn invalidate(&self, user: &str) {
        if let Tokens::Simple(simple) = &self.tokens {
            simple.invalidate_user(user);
        }
    }

    /// Checks a client's write against the store as it is now (apply loop
    /// only; the members' own proposals carry no header). `lease_keys`
    /// gives the keys attached to a lease.
    pub fn check_applied(
        &self,
        header: Option<&RequestHeader>,
        request: &Internal,
        lease_keys: &dyn Fn(i64) -> Vec<Vec<u8>>,
    ) -> Result<(), EtcdError> {
        let Some(header) = header else {
            return Ok(());
        };
        let store = self.store.read();
        if !store.is_enabled() {
            return Ok(());
        }
        let user = header.username.as_str();
        // etcd's isOpPermitted: a request checked against an older auth
        // store than the one it applies to fails as a whole (the client
        // refreshes its token and retries), whatever changed meanwhile.
        let permitted = |access: Access, key: &[u8], range_end: &[u8]| {
            if !user.is_empty() && header.auth_revision < store.revision() {
                return Err(etcd::AUTH_OLD_REVISION);
            }
            store.permitted(user, access, key, range_end)
        };
        match request {
            Internal::Put(r) => {
                permitted(Access::Write, &r.key, &[])?;
                if r.prev_kv {
                    permitted(Access::Read, &r.key, &[])?;
                }
                // A lease whose keys this user may not write is one it
                // could not revoke: it may not attach more keys to it.
                if r.lease != 0 {
                    for key in lease_keys(r.lease) {
                        permitted(Access::Write, &key, &[])?;
                    }
                }
                Ok(())
            }
            Internal::DeleteRange(r) => {
                permitted(Access::Write, &r.key, &r.range_end)?;
                if r.prev_kv {
                    permitted(Access::Read, &r.key, &r.range_end)?;
                }
                Ok(())
            }
            Internal::Txn(r) => check_txn(&permitted, r),
            Internal::LeaseRevoke(r) => {
                for key in lease_keys(r.id) {
                    permitted(Access::Write, &key, &[])?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// A permission check of one access to a key range.
type Permitted<'a> = dyn Fn(Access, &[u8], &[u8]) -> Result<(), EtcdError> + 'a;

/// Every compare and every operation of both branches, nested txns too.
fn check_txn(permitted: &Permitted<'_>, txn: &TxnRequest) -> Result<(), EtcdError> {
    for Compare { key, range_end, .. } in &txn.compare {
        permitted(Access::Read, key, range_end)?;
    }
    for RequestOp { request } in txn.success.iter().chain(&txn.failure) {
        match request {
            Some(Op::RequestRange(r)) => permitted(Access::Read, &r.key, &r.range_end)?,
            Some(Op::RequestPut(r)) => {
                permitted(Access::Write, &r.key, &[])?;
                if r.prev_kv {
                    permitted(Access::Read, &r.key, &[])?;
                }
            }
            Some(Op::RequestDeleteRange(r)) => {
                permitted(Access::Write, &r.key, &r.range_end)?;
                if r.prev_kv {
                    permitted(Access::Read, &r.key, &r.range_end)?;
                }
            }
            Some(Op::RequestTxn(nested)) => check_txn(permitted, nested)?,
            None => {}
        }
    }
    Ok(())
}

fn load(mvcc: &Store) -> Result<AuthStore, AuthError> {
    let records = mvcc.state_records(RECORD).map_err(AuthError::Read)?;
    match records.into_iter().find(|(key, _)| key == RECORD) {
        Some((_, record)) => AuthStore::from_record(&record).map_err(AuthError::Decode),
        None => Ok(AuthStore::default()),
    }
}
