//! etcd's authentication and authorisation: the replicated auth store
//! (users, roles, key permissions, on/off, revision), tokens, and the checks
//! every service makes.
//!
//! Every change of the store is a proposal applied by the apply loop
//! ([`Auth::apply`]), stored with mvcc's state records in the batch of its
//! applied index, so snapshots carry it. A service resolves who calls
//! ([`Auth::caller`]: a token from the `token` or `authorization` metadata,
//! else with --client-cert-auth the client certificate's common name),
//! checks reads itself and sends writes through the log with a
//! [`RequestHeader`] naming the caller; the apply loop checks those against
//! the store as it is when they apply ([`Auth::check_applied`]), so a
//! permission revoked meanwhile counts.

mod perms;
mod store;
mod tokens;

use std::time::{Duration, Instant};

use cairn_api::cairnpb::auth_request::Request as AuthOp;
use cairn_api::cairnpb::internal_request::Request as Internal;
use cairn_api::cairnpb::{AuthRequest, RequestHeader};
use cairn_api::error::{self, EtcdError};
use cairn_api::etcdserverpb::request_op::Request as Op;
use cairn_api::etcdserverpb::{Compare, RequestOp, TxnRequest};
use cairn_consensus::BoxError;
use cairn_mvcc::{Store, WriteBatch};
use parking_lot::{RwLock, RwLockReadGuard};
use tonic::Status;

pub use perms::Access;
pub use store::AuthStore;
use tokens::{SimpleTokens, Tokens};

use crate::client_tls::ClientTlsInfo;
use crate::config::AuthSettings;
use cairn_gateway::{V2_GUEST_USER, V2Guest};

/// The mvcc state record holding the auth store.
pub(crate) const RECORD: &[u8] = b"auth";
/// How long a request with a simple token from another member waits for
/// this member to apply the authentication that made it.
const TOKEN_WAIT: Duration = Duration::from_secs(5);

/// What a request presented to identify its caller.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    token: Option<String>,
    common_name: Option<String>,
    /// The v2 API asks for a caller without credentials.
    v2_guest: bool,
}

impl Credentials {
    pub fn of<T>(request: &tonic::Request<T>) -> Credentials {
        let metadata = request.metadata();
        // etcd's gRPC clients send `token`; its gateway forwards the HTTP
        // Authorization header as `authorization`.
        let token = metadata
            .get("token")
            .or_else(|| metadata.get("authorization"))
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let common_name = request
            .extensions()
            .get::<ClientTlsInfo>()
            .and_then(|tls| tls.common_name.clone());
        let v2_guest = request.extensions().get::<V2Guest>().is_some();
        Credentials {
            token,
            common_name,
            v2_guest,
        }
    }
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
    pub fn open(mvcc: Store, settings: &AuthSettings) -> anyhow::Result<Auth> {
        let tokens = Tokens::from_flag(&settings.token, settings.token_ttl)?;
        let store = load(&mvcc).map_err(|e| anyhow::anyhow!("loading the auth store: {e}"))?;
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
    pub fn reload(&self) -> Result<(), BoxError> {
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
    pub async fn caller(&self, credentials: &Credentials) -> Result<Caller, Status> {
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
            let username = match &self.tokens {
                Tokens::Simple(simple) => {
                    self.wait_for_token(token).await?;
                    simple.user(token)
                }
                Tokens::Jwt(jwt) => jwt.verify(token).map(|(user, _)| user),
            };
            let username = username.ok_or_else(|| error::INVALID_AUTH_TOKEN.status())?;
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

    /// Resolves the caller of a request.
    pub async fn caller_of<T>(&self, request: &tonic::Request<T>) -> Result<Caller, Status> {
        self.caller(&Credentials::of(request)).await
    }

    /// A simple token names the raft index that assigned it: a member that
    /// has not applied it yet waits, as etcd's do.
    async fn wait_for_token(&self, token: &str) -> Result<(), Status> {
        let index =
            SimpleTokens::index_of(token).ok_or_else(|| error::INVALID_AUTH_TOKEN.status())?;
        let deadline = Instant::now() + TOKEN_WAIT;
        while self.mvcc.applied_index() < index {
            if Instant::now() > deadline {
                return Err(error::INVALID_AUTH_TOKEN.status());
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
    ) -> Result<(), Status> {
        self.store
            .read()
            .permitted(&caller.username, access, key, range_end)
            .map_err(|e| e.status())
    }

    /// The caller has the root role (or auth is off).
    pub fn check_admin(&self, caller: &Caller) -> Result<(), Status> {
        self.store
            .read()
            .admin_permitted(&caller.username)
            .map_err(|e| e.status())
    }

    /// Resolves the caller of a request and checks it is an admin.
    pub async fn admin_of<T>(&self, request: &tonic::Request<T>) -> Result<(), Status> {
        let caller = self.caller_of(request).await?;
        self.check_admin(&caller)
    }

    /// bcrypt, with --bcrypt-cost, off the async threads.
    pub async fn hash_password(&self, password: String) -> Result<Vec<u8>, Status> {
        let cost = self.bcrypt_cost;
        let hashed = tokio::task::spawn_blocking(move || bcrypt::hash(password, cost))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(format!("hashing the password: {e}")))?;
        Ok(hashed.into_bytes())
    }

    /// Checks a user's password, as etcd does before proposing an
    /// authentication.
    pub async fn check_password(&self, name: &str, password: String) -> Result<(), Status> {
        let hash = {
            let store = self.store.read();
            if !store.is_enabled() {
                return Err(error::AUTH_NOT_ENABLED.status());
            }
            store.password_hash(name).map_err(|e| e.status())?
        };
        let matches = tokio::task::spawn_blocking(move || {
            let hash = String::from_utf8_lossy(&hash).into_owned();
            bcrypt::verify(password, &hash).unwrap_or(false)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        if matches {
            Ok(())
        } else {
            Err(error::AUTH_FAILED.status())
        }
    }

    /// What an authentication proposal carries: a simple token's random
    /// part, or nothing for JWTs (signed after the apply).
    pub fn new_simple_token(&self) -> Result<String, Status> {
        match &self.tokens {
            Tokens::Simple(_) => SimpleTokens::random_part()
                .map_err(|e| Status::internal(format!("no randomness for a token: {e}"))),
            Tokens::Jwt(_) => Ok(String::new()),
        }
    }

    /// The token an applied authentication hands the client.
    pub fn token_for(&self, applied: AuthApplied) -> Result<String, Status> {
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
            ) => jwt
                .sign(&username, revision)
                .map_err(|e| Status::internal(format!("signing the token: {e}"))),
            (other, _) => Err(Status::internal(format!(
                "authentication applied as {other:?}"
            ))),
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
        let op = request.request.ok_or(error::INVALID_AUTH_MGMT)?;
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
        match request {
            Internal::Put(r) => {
                store.permitted(user, Access::Write, &r.key, &[])?;
                if r.prev_kv {
                    store.permitted(user, Access::Read, &r.key, &[])?;
                }
                // A lease whose keys this user may not write is one it
                // could not revoke: it may not attach more keys to it.
                if r.lease != 0 {
                    for key in lease_keys(r.lease) {
                        store.permitted(user, Access::Write, &key, &[])?;
                    }
                }
                Ok(())
            }
            Internal::DeleteRange(r) => {
                store.permitted(user, Access::Write, &r.key, &r.range_end)?;
                if r.prev_kv {
                    store.permitted(user, Access::Read, &r.key, &r.range_end)?;
                }
                Ok(())
            }
            Internal::Txn(r) => check_txn(&store, user, r),
            Internal::LeaseRevoke(r) => {
                for key in lease_keys(r.id) {
                    store.permitted(user, Access::Write, &key, &[])?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// Every compare and every operation of both branches, nested txns too.
fn check_txn(store: &AuthStore, user: &str, txn: &TxnRequest) -> Result<(), EtcdError> {
    for Compare { key, range_end, .. } in &txn.compare {
        store.permitted(user, Access::Read, key, range_end)?;
    }
    for RequestOp { request } in txn.success.iter().chain(&txn.failure) {
        match request {
            Some(Op::RequestRange(r)) => {
                store.permitted(user, Access::Read, &r.key, &r.range_end)?
            }
            Some(Op::RequestPut(r)) => {
                store.permitted(user, Access::Write, &r.key, &[])?;
                if r.prev_kv {
                    store.permitted(user, Access::Read, &r.key, &[])?;
                }
            }
            Some(Op::RequestDeleteRange(r)) => {
                store.permitted(user, Access::Write, &r.key, &r.range_end)?;
                if r.prev_kv {
                    store.permitted(user, Access::Read, &r.key, &r.range_end)?;
                }
            }
            Some(Op::RequestTxn(nested)) => check_txn(store, user, nested)?,
            None => {}
        }
    }
    Ok(())
}

fn load(mvcc: &Store) -> Result<AuthStore, BoxError> {
    let records = mvcc.state_records(RECORD)?;
    match records.into_iter().find(|(key, _)| key == RECORD) {
        Some((_, record)) => Ok(AuthStore::from_record(&record)?),
        None => Ok(AuthStore::default()),
    }
}
