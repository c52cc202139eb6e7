//! The auth store's replicated state, as etcd 3.4's `authStore`: whether
//! auth is on, its revision (bumped by every change), users and roles.
//! Every change comes from the apply loop, so every member holds the same.

use std::collections::BTreeMap;

use cairn_api::authpb::{Permission, Role, User, UserAddOptions};
use cairn_api::cairnpb::AuthState;
use cairn_api::error::{self, EtcdError};
use prost::Message as _;

use crate::perms::{self, Access};
use crate::{V2_GUEST_ROLE, V2_GUEST_USER};

/// The user that must exist, with the root role, before auth is enabled.
pub const ROOT_USER: &str = "root";
/// The role that may do anything, including changing the auth store.
pub const ROOT_ROLE: &str = "root";

/// Users and roles by name, whether auth is on, and the store's revision.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AuthStore {
    enabled: bool,
    revision: u64,
    users: BTreeMap<String, User>,
    roles: BTreeMap<String, Role>,
}

fn name_of(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

impl AuthStore {
    /// The store a record of [`AuthStore::record`] holds.
    pub fn from_record(record: &[u8]) -> Result<AuthStore, prost::DecodeError> {
        let state = AuthState::decode(record)?;
        Ok(AuthStore {
            enabled: state.enabled,
            revision: state.revision,
            users: state
                .users
                .into_iter()
                .map(|u| (name_of(&u.name), u))
                .collect(),
            roles: state
                .roles
                .into_iter()
                .map(|r| (name_of(&r.name), r))
                .collect(),
        })
    }

    /// The whole store as one record, for mvcc.
    pub fn record(&self) -> Vec<u8> {
        AuthState {
            enabled: self.enabled,
            revision: self.revision,
            users: self.users.values().cloned().collect(),
            roles: self.roles.values().cloned().collect(),
        }
        .encode_to_vec()
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// Bumped by every change; 0 for a store never changed.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    fn changed(&mut self) {
        self.revision += 1;
    }

    pub fn user(&self, name: &str) -> Option<&User> {
        self.users.get(name)
    }

    pub fn user_names(&self) -> Vec<String> {
        self.users.keys().cloned().collect()
    }

    pub fn role_names(&self) -> Vec<String> {
        self.roles.keys().cloned().collect()
    }

    /// A role's permissions; `root` has every key, added or not.
    pub fn role_permissions(&self, name: &str) -> Result<Vec<Permission>, EtcdError> {
        if name == ROOT_ROLE {
            return Ok(vec![Permission {
                perm_type: cairn_api::authpb::permission::Type::Readwrite as i32,
                key: Default::default(),
                range_end: vec![0].into(),
            }]);
        }
        self.roles
            .get(name)
            .map(|r| r.key_permission.clone())
            .ok_or(error::ROLE_NOT_FOUND)
    }

    pub fn has_role(&self, user: &str, role: &str) -> bool {
        self.users
            .get(user)
            .is_some_and(|u| u.roles.iter().any(|r| r == role))
    }

    /// The password hash to check a password against; authentication fails
    /// for unknown users and users without a password.
    pub fn password_hash(&self, name: &str) -> Result<Vec<u8>, EtcdError> {
        match self.users.get(name) {
            Some(user) if !no_password(user) => Ok(user.password.to_vec()),
            _ => Err(error::AUTH_FAILED),
        }
    }

    /// Whether `user` may authenticate by password (apply side).
    pub fn may_authenticate(&self, user: &str) -> Result<(), EtcdError> {
        if !self.enabled {
            return Err(error::AUTH_NOT_ENABLED);
        }
        match self.users.get(user) {
            Some(u) if !no_password(u) => Ok(()),
            _ => Err(error::AUTH_FAILED),
        }
    }

    /// etcd's `isOpPermitted`: with auth on, `user` (empty: nobody) must
    /// exist and hold the root role or permissions covering the keys. The
    /// v2 API's guest holds the `guest` role.
    pub fn permitted(
        &self,
        user: &str,
        access: Access,
        key: &[u8],
        range_end: &[u8],
    ) -> Result<(), EtcdError> {
        if !self.enabled {
            return Ok(());
        }
        if user.is_empty() {
            return Err(error::USER_EMPTY);
        }
        let guest_roles = [V2_GUEST_ROLE.to_string()];
        let roles = match self.users.get(user) {
            Some(u) => u.roles.as_slice(),
            None if user == V2_GUEST_USER => &guest_roles,
            None => return Err(error::PERMISSION_DENIED),
        };
        if roles.iter().any(|r| r == ROOT_ROLE) {
            return Ok(());
        }
        let perms = roles
            .iter()
            .filter_map(|r| self.roles.get(r))
            .flat_map(|r| r.key_permission.iter());
        if perms::covers(perms, access, key, range_end) {
            Ok(())
        } else {
            Err(error::PERMISSION_DENIED)
        }
    }

    /// etcd's `IsAdminPermitted`: with auth on, the root role is needed.
    pub fn admin_permitted(&self, user: &str) -> Result<(), EtcdError> {
        if !self.enabled {
            return Ok(());
        }
        if user.is_empty() {
            return Err(error::USER_EMPTY);
        }
        match self.users.get(user) {
            None => Err(error::USER_NOT_FOUND),
            Some(u) if u.roles.iter().any(|r| r == ROOT_ROLE) => Ok(()),
            Some(_) => Err(error::PERMISSION_DENIED),
        }
    }

    pub fn enable(&mut self) -> Result<(), EtcdError> {
        if self.enabled {
            return Ok(());
        }
        let root = self
            .users
            .get(ROOT_USER)
            .ok_or(error::ROOT_USER_NOT_EXIST)?;
        if !root.roles.iter().any(|r| r == ROOT_ROLE) {
            return Err(error::ROOT_ROLE_NOT_EXIST);
        }
        self.enabled = true;
        self.changed();
        Ok(())
    }

    pub fn disable(&mut self) {
        if self.enabled {
            self.enabled = false;
            self.changed();
        }
    }

    pub fn user_add(
        &mut self,
        name: &str,
        password_hash: Vec<u8>,
        options: Option<UserAddOptions>,
    ) -> Result<(), EtcdError> {
        if name.is_empty() {
            return Err(error::USER_EMPTY);
        }
        if self.users.contains_key(name) {
            return Err(error::USER_ALREADY_EXIST);
        }
        self.users.insert(
            name.to_string(),
            User {
                name: name.as_bytes().to_vec().into(),
                password: password_hash.into(),
                roles: Vec::new(),
                options,
            },
        );
        self.changed();
        Ok(())
    }

    pub fn user_delete(&mut self, name: &str) -> Result<(), EtcdError> {
        if self.enabled && name == ROOT_USER {
            return Err(error::INVALID_AUTH_MGMT);
        }
        self.users.remove(name).ok_or(error::USER_NOT_FOUND)?;
        self.changed();
        Ok(())
    }

    pub fn user_change_password(
        &mut self,
        name: &str,
        password_hash: Vec<u8>,
    ) -> Result<(), EtcdError> {
        let user = self.users.get_mut(name).ok_or(error::USER_NOT_FOUND)?;
        user.password = password_hash.into();
        self.changed();
        Ok(())
    }

    pub fn user_grant_role(&mut self, name: &str, role: &str) -> Result<(), EtcdError> {
        if !self.users.contains_key(name) {
            return Err(error::USER_NOT_FOUND);
        }
        if role != ROOT_ROLE && !self.roles.contains_key(role) {
            return Err(error::ROLE_NOT_FOUND);
        }
        let user = self.users.get_mut(name).ok_or(error::USER_NOT_FOUND)?;
        // etcd keeps roles sorted and ignores a second grant.
        match user.roles.binary_search_by(|r| r.as_str().cmp(role)) {
            Ok(_) => return Ok(()),
            Err(at) => user.roles.insert(at, role.to_string()),
        }
        self.changed();
        Ok(())
    }

    pub fn user_revoke_role(&mut self, name: &str, role: &str) -> Result<(), EtcdError> {
        if self.enabled && name == ROOT_USER && role == ROOT_ROLE {
            return Err(error::INVALID_AUTH_MGMT);
        }
        let user = self.users.get_mut(name).ok_or(error::USER_NOT_FOUND)?;
        let at = user
            .roles
            .iter()
            .position(|r| r == role)
            .ok_or(error::ROLE_NOT_GRANTED)?;
        user.roles.remove(at);
        self.changed();
        Ok(())
    }

    pub fn role_add(&mut self, name: &str) -> Result<(), EtcdError> {
        if name.is_empty() {
            return Err(error::ROLE_EMPTY);
        }
        if self.roles.contains_key(name) {
            return Err(error::ROLE_ALREADY_EXIST);
        }
        self.roles.insert(
            name.to_string(),
            Role {
                name: name.as_bytes().to_vec().into(),
                key_permission: Vec::new(),
            },
        );
        self.changed();
        Ok(())
    }

    /// Deletes a role and takes it from every user that had it.
    pub fn role_delete(&mut self, name: &str) -> Result<(), EtcdError> {
        if self.enabled && name == ROOT_ROLE {
            return Err(error::INVALID_AUTH_MGMT);
        }
        self.roles.remove(name).ok_or(error::ROLE_NOT_FOUND)?;
        for user in self.users.values_mut() {
            user.roles.retain(|r| r != name);
        }
        self.changed();
        Ok(())
    }

    /// Grants a permission, replacing the type of one on the same keys.
    pub fn role_grant_permission(
        &mut self,
        name: &str,
        perm: Option<Permission>,
    ) -> Result<(), EtcdError> {
        let perm = perm.ok_or(error::PERMISSION_NOT_GIVEN)?;
        let role = self.roles.get_mut(name).ok_or(error::ROLE_NOT_FOUND)?;
        let perms = &mut role.key_permission;
        match perms
            .iter_mut()
            .find(|p| p.key == perm.key && p.range_end == perm.range_end)
        {
            Some(same) => same.perm_type = perm.perm_type,
            None => {
                let at = perms.partition_point(|p| p.key <= perm.key);
                perms.insert(at, perm);
            }
        }
        self.changed();
        Ok(())
    }

    pub fn role_revoke_permission(
        &mut self,
        name: &str,
        key: &[u8],
        range_end: &[u8],
    ) -> Result<(), EtcdError> {
        let role = self.roles.get_mut(name).ok_or(error::ROLE_NOT_FOUND)?;
        let at = role
            .key_permission
            .iter()
            .position(|p| p.key == key && p.range_end == range_end)
            .ok_or(error::PERMISSION_NOT_GRANTED)?;
        role.key_permission.remove(at);
        self.changed();
        Ok(())
    }
}

fn no_password(user: &User) -> bool {
    user.options.as_ref().is_some_and(|o| o.no_password)
}

#[cfg(test)]
mod tests {
    use cairn_api::authpb::permission::Type as PermType;

    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn perm(perm_type: PermType, key: &str, range_end: &str) -> Option<Permission> {
        Some(Permission {
            perm_type: perm_type as i32,
            key: key.as_bytes().to_vec().into(),
            range_end: range_end.as_bytes().to_vec().into(),
        })
    }

    fn with_root() -> Result<AuthStore, EtcdError> {
        let mut store = AuthStore::default();
        store.user_add(ROOT_USER, b"hash".to_vec(), None)?;
        store.user_grant_role(ROOT_USER, ROOT_ROLE)?;
        Ok(store)
    }

    /// The v2 API's caller without credentials holds exactly the guest
    /// role, while it exists.
    #[test]
    fn the_v2_guest_has_the_guest_roles_permissions() -> TestResult {
        let mut store = with_root()?;
        store.enable()?;
        let denied = store.permitted(V2_GUEST_USER, Access::Write, b"k", b"");
        assert_eq!(denied, Err(error::PERMISSION_DENIED));
        store.role_add(V2_GUEST_ROLE)?;
        store.role_grant_permission(V2_GUEST_ROLE, perm(PermType::Readwrite, "k", ""))?;
        store.permitted(V2_GUEST_USER, Access::Write, b"k", b"")?;
        let elsewhere = store.permitted(V2_GUEST_USER, Access::Read, b"other", b"");
        assert_eq!(elsewhere, Err(error::PERMISSION_DENIED));
        assert_eq!(
            store.admin_permitted(V2_GUEST_USER),
            Err(error::USER_NOT_FOUND)
        );
        Ok(())
    }

    #[test]
    fn enabling_needs_root_with_the_root_role() -> TestResult {
        let mut store = AuthStore::default();
        assert_eq!(store.enable(), Err(error::ROOT_USER_NOT_EXIST));
        store.user_add(ROOT_USER, Vec::new(), None)?;
        assert_eq!(store.enable(), Err(error::ROOT_ROLE_NOT_EXIST));
        store.user_grant_role(ROOT_USER, ROOT_ROLE)?;
        let before = store.revision();
        store.enable()?;
        assert!(store.is_enabled());
        assert_eq!(store.revision(), before + 1);
        // Enabling twice changes nothing.
        store.enable()?;
        assert_eq!(store.revision(), before + 1);
        assert_eq!(store.user_delete(ROOT_USER), Err(error::INVALID_AUTH_MGMT));
        assert_eq!(
            store.user_revoke_role(ROOT_USER, ROOT_ROLE),
            Err(error::INVALID_AUTH_MGMT)
        );
        assert_eq!(store.role_delete(ROOT_ROLE), Err(error::INVALID_AUTH_MGMT));
        Ok(())
    }

    #[test]
    fn users_and_roles_keep_etcds_errors() -> TestResult {
        let mut store = with_root()?;
        assert_eq!(store.user_add("", Vec::new(), None), Err(error::USER_EMPTY));
        assert_eq!(
            store.user_add(ROOT_USER, Vec::new(), None),
            Err(error::USER_ALREADY_EXIST)
        );
        assert_eq!(store.user_delete("nobody"), Err(error::USER_NOT_FOUND));
        assert_eq!(
            store.user_grant_role(ROOT_USER, "missing"),
            Err(error::ROLE_NOT_FOUND)
        );
        assert_eq!(store.role_add(""), Err(error::ROLE_EMPTY));
        store.role_add("r")?;
        assert_eq!(store.role_add("r"), Err(error::ROLE_ALREADY_EXIST));
        assert_eq!(
            store.user_revoke_role(ROOT_USER, "r"),
            Err(error::ROLE_NOT_GRANTED)
        );
        assert_eq!(
            store.role_revoke_permission("r", b"k", b""),
            Err(error::PERMISSION_NOT_GRANTED)
        );
        assert_eq!(
            store.role_grant_permission("r", None),
            Err(error::PERMISSION_NOT_GIVEN)
        );
        Ok(())
    }

    #[test]
    fn permissions_follow_grants_and_revokes() -> TestResult {
        let mut store = with_root()?;
        store.user_add("u", b"hash".to_vec(), None)?;
        store.role_add("reader")?;
        store.role_grant_permission("reader", perm(PermType::Read, "/app/", "/app0"))?;
        store.user_grant_role("u", "reader")?;
        // Off: everyone may do anything.
        assert_eq!(store.permitted("", Access::Write, b"/x", b""), Ok(()));
        store.enable()?;
        assert_eq!(store.permitted("u", Access::Read, b"/app/a", b""), Ok(()));
        assert_eq!(
            store.permitted("u", Access::Write, b"/app/a", b""),
            Err(error::PERMISSION_DENIED)
        );
        assert_eq!(
            store.permitted("u", Access::Read, b"/other/", b""),
            Err(error::PERMISSION_DENIED)
        );
        assert_eq!(
            store.permitted("", Access::Read, b"/app/a", b""),
            Err(error::USER_EMPTY)
        );
        assert_eq!(
            store.permitted(ROOT_USER, Access::Write, b"/x", b"\0"),
            Ok(())
        );
        // A second grant on the same keys replaces the type.
        store.role_grant_permission("reader", perm(PermType::Readwrite, "/app/", "/app0"))?;
        assert_eq!(store.permitted("u", Access::Write, b"/app/a", b""), Ok(()));
        store.role_revoke_permission("reader", b"/app/", b"/app0")?;
        assert_eq!(
            store.permitted("u", Access::Read, b"/app/a", b""),
            Err(error::PERMISSION_DENIED)
        );
        assert_eq!(store.admin_permitted(ROOT_USER), Ok(()));
        assert_eq!(store.admin_permitted("u"), Err(error::PERMISSION_DENIED));
        assert_eq!(store.admin_permitted("ghost"), Err(error::USER_NOT_FOUND));
        Ok(())
    }

    #[test]
    fn deleting_a_role_revokes_it_and_the_record_round_trips() -> TestResult {
        let mut store = with_root()?;
        store.user_add("u", Vec::new(), None)?;
        store.role_add("a")?;
        store.role_add("b")?;
        store.user_grant_role("u", "b")?;
        store.user_grant_role("u", "a")?;
        assert_eq!(store.user("u").ok_or("no user u")?.roles, vec!["a", "b"]);
        store.role_delete("a")?;
        assert_eq!(store.user("u").ok_or("no user u")?.roles, vec!["b"]);
        let copy = AuthStore::from_record(&store.record())?;
        assert_eq!(copy, store);
        Ok(())
    }

    #[test]
    fn password_users_only_authenticate() -> TestResult {
        let mut store = with_root()?;
        store.user_add("cn", Vec::new(), Some(UserAddOptions { no_password: true }))?;
        assert_eq!(store.password_hash("cn"), Err(error::AUTH_FAILED));
        assert_eq!(store.password_hash("nobody"), Err(error::AUTH_FAILED));
        assert_eq!(store.password_hash(ROOT_USER), Ok(b"hash".to_vec()));
        assert_eq!(
            store.may_authenticate(ROOT_USER),
            Err(error::AUTH_NOT_ENABLED)
        );
        store.enable()?;
        assert_eq!(store.may_authenticate(ROOT_USER), Ok(()));
        assert_eq!(store.may_authenticate("cn"), Err(error::AUTH_FAILED));
        Ok(())
    }
}
