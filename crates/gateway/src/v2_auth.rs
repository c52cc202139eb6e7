//! etcd's v2 auth API (`/v2/auth/...`) on the v3 Auth service, and the
//! v2 API's basic authentication.
//!
//! Users and roles are v3's. A v2 permission pattern is a v3 permission on
//! the v2 keyspace ([`crate::v2::PREFIX`]): `/dir/*` becomes the prefix range
//! of `/dir` (the directory node and everything under it, and, unlike v2,
//! siblings such as `/dirx`), `*` the whole v2 keyspace, any other pattern
//! that exact key. Enabling auth grants the v3 root role to the root user
//! first, since v2 needs only the root user. Requests carrying basic auth
//! credentials are made with the token v3's Authenticate gives for them.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use cairn_api::authpb::Permission;
use cairn_api::authpb::permission::Type as PermissionType;
use cairn_api::etcdserverpb::auth_client::AuthClient;
use cairn_api::etcdserverpb::{
    AuthDisableRequest, AuthEnableRequest, AuthRoleAddRequest, AuthRoleDeleteRequest,
    AuthRoleGetRequest, AuthRoleGrantPermissionRequest, AuthRoleListRequest,
    AuthRoleRevokePermissionRequest, AuthUserAddRequest, AuthUserChangePasswordRequest,
    AuthUserDeleteRequest, AuthUserGetRequest, AuthUserGrantRoleRequest, AuthUserListRequest,
    AuthUserRevokeRoleRequest, AuthenticateRequest,
};
use cairn_api::v2_guest::{V2_GUEST_ROLE, V2Guest};
use http::request::Parts;
use http::{Method, Response, StatusCode};
use serde::{Deserialize, Serialize};
use tonic::{Code, Status};

use crate::ClientTlsInfo;
use crate::grpc::GrpcService;
use crate::v2::{PREFIX, prefix_end};
use crate::{Body, full};

/// The credentials of a request's `Authorization: Basic` header.
pub fn basic_credentials(parts: &Parts) -> Option<(String, String)> {
    let header = parts
        .headers
        .get(http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let encoded = header.strip_prefix("Basic ")?;
    let decoded = String::from_utf8(BASE64.decode(encoded.trim()).ok()?).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

/// What basic authentication came to.
pub enum Login {
    /// No credentials, or auth is off: requests go without a token.
    Anonymous,
    Token(String),
    /// The credentials are wrong.
    Refused,
}

pub async fn login(grpc: &GrpcService, parts: &Parts) -> Login {
    let Some((name, password)) = basic_credentials(parts) else {
        return Login::Anonymous;
    };
    let mut auth = AuthClient::new(grpc.clone());
    match auth
        .authenticate(AuthenticateRequest { name, password })
        .await
    {
        Ok(reply) => Login::Token(reply.into_inner().token),
        Err(status) if status.message().contains("authentication is not enabled") => {
            Login::Anonymous
        }
        Err(_) => Login::Refused,
    }
}

/// `grpc` with `mark` applied to every request it is sent.
fn each_request(
    grpc: GrpcService,
    mark: impl Fn(&mut http::Request<tonic::body::Body>) + Clone + Send + Sync + 'static,
) -> GrpcService {
    use tower::ServiceExt as _;
    crate::grpc::boxed(grpc.map_request(move |mut request| {
        mark(&mut request);
        request
    }))
}

/// `grpc` with every request made by the user a client certificate names
/// (as the member's own TLS listener would attach it).
pub fn as_certificate_user(grpc: GrpcService, name: String) -> GrpcService {
    each_request(grpc, move |request| {
        request.extensions_mut().insert(ClientTlsInfo {
            common_name: Some(name.clone()),
            chain_common_names: Vec::new(),
        });
    })
}

/// `grpc` with every request made as v2's guest.
pub fn as_guest(grpc: GrpcService) -> GrpcService {
    each_request(grpc, |request| {
        request.extensions_mut().insert(V2Guest);
    })
}

/// `grpc` with every request carrying `token`, as etcd's clients send it.
pub fn with_token(grpc: GrpcService, token: &str) -> GrpcService {
    let Ok(value) = http::HeaderValue::from_str(token) else {
        return grpc;
    };
    each_request(grpc, move |request| {
        request.headers_mut().insert("token", value.clone());
    })
}

#[derive(Serialize)]
struct User {
    user: String,
    roles: Option<Vec<String>>,
}

#[derive(Deserialize, Default)]
struct UserChange {
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    grant: Vec<String>,
    #[serde(default)]
    revoke: Vec<String>,
}

#[derive(Serialize, Deserialize, Default, Debug, PartialEq)]
struct KvPermissions {
    read: Option<Vec<String>>,
    write: Option<Vec<String>>,
}

#[derive(Serialize, Deserialize, Default, Debug)]
struct Permissions {
    #[serde(default)]
    kv: KvPermissions,
}

#[derive(Serialize)]
struct Role {
    role: String,
    permissions: Permissions,
}

#[derive(Deserialize, Default)]
struct RoleChange {
    #[serde(default)]
    permissions: Option<Permissions>,
    #[serde(default)]
    grant: Option<Permissions>,
    #[serde(default)]
    revoke: Option<Permissions>,
}

fn json(status: StatusCode, body: &impl Serialize) -> Response<Body> {
    let mut response = Response::new(full(serde_json::to_vec(body).unwrap_or_default()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

/// v2's auth errors: `{"message": …}`.
fn error(status: StatusCode, message: &str) -> Response<Body> {
    #[derive(Serialize)]
    struct Message<'a> {
        message: &'a str,
    }
    json(status, &Message { message })
}

fn from_status(status: &Status) -> Response<Body> {
    let http = match status.code() {
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::FailedPrecondition | Code::AlreadyExists => StatusCode::CONFLICT,
        Code::PermissionDenied | Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::InvalidArgument => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let message = match status.message() {
        m if m.contains("user name not found") => "auth: user not found",
        m if m.contains("role name not found") => "auth: role not found",
        m if m.contains("permission denied") || m.contains("user name is empty") => {
            "Insufficient credentials"
        }
        m => m,
    };
    error(http, message)
}

/// The v2 pattern of a v3 permission on the v2 keyspace.
fn pattern(permission: &Permission) -> Option<String> {
    let key = std::str::from_utf8(permission.key.strip_prefix(PREFIX)?).ok()?;
    if permission.range_end.is_empty() {
        return Some(key.to_string());
    }
    if permission.range_end.as_ref() == prefix_end(&permission.key).as_slice() {
        return Some(if key.is_empty() {
            "*".to_string()
        } else {
            format!("{key}/*")
        });
    }
    None
}

/// The v3 key range of a v2 pattern.
fn key_range(pattern: &str) -> (Vec<u8>, Vec<u8>) {
    let mut key = PREFIX.to_vec();
    match pattern.strip_suffix('*') {
        Some(prefix) => {
            key.extend_from_slice(prefix.trim_end_matches('/').as_bytes());
            let end = prefix_end(&key);
            (key, end)
        }
        None => {
            key.extend_from_slice(pattern.as_bytes());
            (key, Vec::new())
        }
    }
}

/// Each pattern with whether it is granted for reading and for writing.
fn patterns(kv: &KvPermissions) -> Vec<(String, bool, bool)> {
    let mut out: Vec<(String, bool, bool)> = Vec::new();
    for (list, read) in [(&kv.read, true), (&kv.write, false)] {
        for p in list.iter().flatten() {
            match out.iter_mut().find(|(q, _, _)| q == p) {
                Some(entry) if read => entry.1 = true,
                Some(entry) => entry.2 = true,
                None => out.push((p.clone(), read, !read)),
            }
        }
    }
    out
}

fn permission_type(read: bool, write: bool) -> PermissionType {
    match (read, write) {
        (true, true) => PermissionType::Readwrite,
        (false, true) => PermissionType::Write,
        _ => PermissionType::Read,
    }
}

pub struct AuthApi {
    grpc: GrpcService,
}

impl AuthApi {
    /// The v2 auth API, calling v3 with `grpc` (which carries the caller's
    /// token, if any).
    pub fn new(grpc: GrpcService) -> Self {
        AuthApi { grpc }
    }

    /// Wrong credentials, as v2 answers them.
    pub fn refused() -> Response<Body> {
        error(StatusCode::UNAUTHORIZED, "Insufficient credentials")
    }

    fn client(&self) -> AuthClient<GrpcService> {
        AuthClient::new(self.grpc.clone())
    }

    pub async fn handle(&self, parts: &Parts, body: &[u8]) -> Response<Body> {
        let path = parts.uri.path().trim_end_matches('/');
        let rest = path.strip_prefix("/v2/auth").unwrap_or("");
        let mut segments = rest.trim_start_matches('/').splitn(2, '/');
        let (kind, name) = (segments.next().unwrap_or(""), segments.next());
        let result = match (kind, name, &parts.method) {
            ("enable", None, &Method::GET) => self.enabled().await,
            ("enable", None, &Method::PUT) => self.enable().await,
            ("enable", None, &Method::DELETE) => self.disable().await,
            ("users", None, &Method::GET) => self.users().await,
            ("users", Some(name), &Method::GET) => {
                self.user(name).await.map(|u| json(StatusCode::OK, &u))
            }
            ("users", Some(name), &Method::PUT) => self.put_user(name, body).await,
            ("users", Some(name), &Method::DELETE) => self
                .client()
                .user_delete(AuthUserDeleteRequest {
                    name: name.to_string(),
                })
                .await
                .map(|_| json(StatusCode::OK, &serde_json::json!({}))),
            ("roles", None, &Method::GET) => self.roles().await,
            ("roles", Some(name), &Method::GET) => {
                self.role(name).await.map(|r| json(StatusCode::OK, &r))
            }
            ("roles", Some(name), &Method::PUT) => self.put_role(name, body).await,
            ("roles", Some(name), &Method::DELETE) => self
                .client()
                .role_delete(AuthRoleDeleteRequest {
                    role: name.to_string(),
                })
                .await
                .map(|_| json(StatusCode::OK, &serde_json::json!({}))),
            ("enable" | "users" | "roles", _, _) => {
                return error(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed");
            }
            _ => return error(StatusCode::NOT_FOUND, "Not Found"),
        };
        result.unwrap_or_else(|status| from_status(&status))
    }

    /// Whether auth is on: v3 3.4 has no status call, but Authenticate
    /// tells.
    async fn enabled(&self) -> Result<Response<Body>, Status> {
        let probe = self
            .client()
            .authenticate(AuthenticateRequest {
                name: String::new(),
                password: String::new(),
            })
            .await;
        let enabled =
            !matches!(&probe, Err(s) if s.message().contains("authentication is not enabled"));
        Ok(json(
            StatusCode::OK,
            &serde_json::json!({ "enabled": enabled }),
        ))
    }

    async fn enable(&self) -> Result<Response<Body>, Status> {
        let mut auth = self.client();
        // v2 needs only a root user; v3 wants it to hold the root role.
        match auth
            .role_add(AuthRoleAddRequest {
                name: "root".to_string(),
            })
            .await
        {
            Ok(_) => {}
            Err(s) if s.message().contains("already exists") => {}
            Err(s) => return Err(s),
        }
        auth.user_grant_role(AuthUserGrantRoleRequest {
            user: "root".to_string(),
            role: "root".to_string(),
        })
        .await?;
        // As etcd v2: callers without credentials get the guest role, made
        // with read and write on everything unless it exists already.
        match auth
            .role_add(AuthRoleAddRequest {
                name: V2_GUEST_ROLE.to_string(),
            })
            .await
        {
            Ok(_) => {
                let (key, range_end) = key_range("/*");
                auth.role_grant_permission(AuthRoleGrantPermissionRequest {
                    name: V2_GUEST_ROLE.to_string(),
                    perm: Some(Permission {
                        perm_type: PermissionType::Readwrite as i32,
                        key: key.into(),
                        range_end: range_end.into(),
                    }),
                })
                .await?;
            }
            Err(s) if s.message().contains("already exists") => {}
            Err(s) => return Err(s),
        }
        auth.auth_enable(AuthEnableRequest {}).await?;
        Ok(json(StatusCode::OK, &serde_json::json!({})))
    }

    async fn disable(&self) -> Result<Response<Body>, Status> {
        self.client().auth_disable(AuthDisableRequest {}).await?;
        Ok(json(StatusCode::OK, &serde_json::json!({})))
    }

    async fn user(&self, name: &str) -> Result<User, Status> {
        let reply = self
            .client()
            .user_get(AuthUserGetRequest {
                name: name.to_string(),
            })
            .await?
            .into_inner();
        Ok(User {
            user: name.to_string(),
            roles: (!reply.roles.is_empty()).then_some(reply.roles),
        })
    }

    async fn users(&self) -> Result<Response<Body>, Status> {
        let names = self
            .client()
            .user_list(AuthUserListRequest {})
            .await?
            .into_inner()
            .users;
        let mut users = Vec::new();
        for name in names {
            users.push(self.user(&name).await?);
        }
        Ok(json(StatusCode::OK, &serde_json::json!({ "users": users })))
    }

    async fn put_user(&self, name: &str, body: &[u8]) -> Result<Response<Body>, Status> {
        let change: UserChange = serde_json::from_slice(body)
            .map_err(|e| Status::invalid_argument(format!("bad user JSON: {e}")))?;
        let mut auth = self.client();
        let existing = match self.user(name).await {
            Ok(user) => Some(user.roles.unwrap_or_default()),
            Err(s) if s.code() == Code::FailedPrecondition || s.code() == Code::NotFound => None,
            Err(s) => return Err(s),
        };
        let exists = existing.is_some();
        // etcd's v2 auth refuses to grant a role the user already has.
        let held = existing.unwrap_or_default();
        if let Some(role) = change.grant.iter().find(|r| held.contains(r)) {
            let message = format!("Granting duplicate role {role} for user {name}");
            return Ok(error(StatusCode::CONFLICT, &message));
        }
        if !exists {
            auth.user_add(AuthUserAddRequest {
                name: name.to_string(),
                password: change.password.clone().unwrap_or_default(),
                ..Default::default()
            })
            .await?;
        } else if let Some(password) = &change.password {
            auth.user_change_password(AuthUserChangePasswordRequest {
                name: name.to_string(),
                password: password.clone(),
            })
            .await?;
        }
        for role in &change.grant {
            auth.user_grant_role(AuthUserGrantRoleRequest {
                user: name.to_string(),
                role: role.clone(),
            })
            .await?;
        }
        for role in &change.revoke {
            auth.user_revoke_role(AuthUserRevokeRoleRequest {
                name: name.to_string(),
                role: role.clone(),
            })
            .await?;
        }
        let user = self.user(name).await?;
        let status = if exists {
            StatusCode::OK
        } else {
            StatusCode::CREATED
        };
        Ok(json(status, &user))
    }

    async fn role(&self, name: &str) -> Result<Role, Status> {
        let reply = self
            .client()
            .role_get(AuthRoleGetRequest {
                role: name.to_string(),
            })
            .await?
            .into_inner();
        let mut kv = KvPermissions::default();
        for permission in &reply.perm {
            let Some(p) = pattern(permission) else {
                continue;
            };
            let kind =
                PermissionType::try_from(permission.perm_type).unwrap_or(PermissionType::Read);
            if matches!(kind, PermissionType::Read | PermissionType::Readwrite) {
                kv.read.get_or_insert_with(Vec::new).push(p.clone());
            }
            if matches!(kind, PermissionType::Write | PermissionType::Readwrite) {
                kv.write.get_or_insert_with(Vec::new).push(p);
            }
        }
        Ok(Role {
            role: name.to_string(),
            permissions: Permissions { kv },
        })
    }

    async fn roles(&self) -> Result<Response<Body>, Status> {
        let names = self
            .client()
            .role_list(AuthRoleListRequest {})
            .await?
            .into_inner()
            .roles;
        let mut roles = Vec::new();
        for name in names {
            roles.push(self.role(&name).await?);
        }
        Ok(json(StatusCode::OK, &serde_json::json!({ "roles": roles })))
    }

    async fn put_role(&self, name: &str, body: &[u8]) -> Result<Response<Body>, Status> {
        let change: RoleChange = serde_json::from_slice(body)
            .map_err(|e| Status::invalid_argument(format!("bad role JSON: {e}")))?;
        let mut auth = self.client();
        let exists = match self.role(name).await {
            Ok(_) => true,
            Err(s) if s.code() == Code::FailedPrecondition || s.code() == Code::NotFound => false,
            Err(s) => return Err(s),
        };
        if !exists {
            auth.role_add(AuthRoleAddRequest {
                name: name.to_string(),
            })
            .await?;
        }
        let grants = change.permissions.iter().chain(&change.grant);
        for permissions in grants {
            for (p, read, write) in patterns(&permissions.kv) {
                let (key, range_end) = key_range(&p);
                auth.role_grant_permission(AuthRoleGrantPermissionRequest {
                    name: name.to_string(),
                    perm: Some(Permission {
                        perm_type: permission_type(read, write) as i32,
                        key: key.into(),
                        range_end: range_end.into(),
                    }),
                })
                .await?;
            }
        }
        if let Some(permissions) = &change.revoke {
            for (p, _, _) in patterns(&permissions.kv) {
                let (key, range_end) = key_range(&p);
                auth.role_revoke_permission(AuthRoleRevokePermissionRequest {
                    role: name.to_string(),
                    key: key.into(),
                    range_end: range_end.into(),
                })
                .await?;
            }
        }
        let role = self.role(name).await?;
        let status = if exists {
            StatusCode::OK
        } else {
            StatusCode::CREATED
        };
        Ok(json(status, &role))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_map_to_v2_key_ranges_and_back() {
        for p in ["/foo/*", "/foo", "*"] {
            let (key, range_end) = key_range(p);
            let permission = Permission {
                perm_type: PermissionType::Read as i32,
                key: key.into(),
                range_end: range_end.into(),
            };
            assert_eq!(pattern(&permission).as_deref(), Some(p));
        }
        let (key, end) = key_range("/foo/*");
        assert!(key.as_slice() <= [PREFIX, b"/foo"].concat().as_slice());
        assert!(end.as_slice() > [PREFIX, b"/foo/bar"].concat().as_slice());
    }

    #[test]
    fn read_and_write_lists_merge() {
        let kv = KvPermissions {
            read: Some(vec!["/a/*".into(), "/b".into()]),
            write: Some(vec!["/a/*".into()]),
        };
        assert_eq!(
            patterns(&kv),
            vec![
                ("/a/*".to_string(), true, true),
                ("/b".to_string(), true, false)
            ]
        );
    }

    #[test]
    fn basic_credentials_decode() {
        let credentials = |header: &str| {
            let request = http::Request::builder()
                .header(http::header::AUTHORIZATION, header)
                .body(())
                .expect("a request");
            basic_credentials(&request.into_parts().0)
        };
        assert_eq!(
            credentials("Basic Zm9vOnBhc3M="),
            Some(("foo".to_string(), "pass".to_string()))
        );
        assert_eq!(
            credentials("Basic Zm9vOg=="),
            Some(("foo".to_string(), String::new()))
        );
        assert_eq!(credentials("Basic !"), None);
        assert_eq!(credentials("Bearer Zm9vOnBhc3M="), None);
    }
}
