//! The auth store in etcd's buckets (`auth`, `authUsers`, `authRoles`) and
//! in Cairn's store (one state record holding a `cairnpb.AuthState`).

use cairn_api::authpb::{Role, User};
use cairn_api::cairnpb::AuthState;
use cairn_auth::RECORD as AUTH_RECORD;
use cairn_mvcc::{Export, MvccError};
use prost::Message as _;

/// The auth buckets' content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct AuthBuckets {
    pub(crate) enabled: bool,
    pub(crate) revision: u64,
    /// Name → authpb.User, sorted by name.
    pub(crate) users: Vec<(Vec<u8>, Vec<u8>)>,
    /// Name → authpb.Role, sorted by name.
    pub(crate) roles: Vec<(Vec<u8>, Vec<u8>)>,
}

impl AuthBuckets {
    /// The auth store as the view holds it (its state record).
    pub(crate) fn of(export: &Export) -> Result<AuthBuckets, MvccError> {
        let record = export
            .state_records(AUTH_RECORD)?
            .into_iter()
            .find(|(key, _)| key == AUTH_RECORD);
        let Some((_, record)) = record else {
            return Ok(AuthBuckets::default());
        };
        let state = AuthState::decode(record.as_slice())
            .map_err(|e| MvccError::Corrupt(format!("auth record: {e}")))?;
        let mut users: Vec<(Vec<u8>, Vec<u8>)> = state
            .users
            .iter()
            .map(|u| (u.name.to_vec(), u.encode_to_vec()))
            .collect();
        let mut roles: Vec<(Vec<u8>, Vec<u8>)> = state
            .roles
            .iter()
            .map(|r| (r.name.to_vec(), r.encode_to_vec()))
            .collect();
        users.sort();
        roles.sort();
        Ok(AuthBuckets {
            enabled: state.enabled,
            // etcd's store starts at revision 1.
            revision: state.revision.max(1),
            users,
            roles,
        })
    }

    /// The auth store's state record for these buckets.
    pub(crate) fn to_record(&self) -> Result<(Vec<u8>, Vec<u8>), prost::DecodeError> {
        let users = self
            .users
            .iter()
            .map(|(_, user)| User::decode(user.as_slice()))
            .collect::<Result<_, _>>()?;
        let roles = self
            .roles
            .iter()
            .map(|(_, role)| Role::decode(role.as_slice()))
            .collect::<Result<_, _>>()?;
        let state = AuthState {
            enabled: self.enabled,
            revision: self.revision,
            users,
            roles,
        };
        Ok((AUTH_RECORD.to_vec(), state.encode_to_vec()))
    }
}

impl Default for AuthBuckets {
    /// What a fresh etcd holds: auth never enabled, at revision 1.
    fn default() -> Self {
        AuthBuckets {
            enabled: false,
            revision: 1,
            users: Vec::new(),
            roles: Vec::new(),
        }
    }
}
