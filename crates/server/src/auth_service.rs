//! etcd's Auth service. Changes of the auth store (and authentications,
//! which assign tokens) go through consensus, checked for the root role by
//! the apply loop; listings and lookups are answered from the store this
//! member has applied, after a linearizable barrier.

use std::sync::Arc;

use cairn_api::cairnpb::auth_request::Request as AuthOp;
use cairn_api::cairnpb::{self, AuthRequest};
use cairn_api::error;
use cairn_api::etcdserverpb::auth_server::Auth;
use cairn_api::etcdserverpb::{
    AuthDisableRequest, AuthDisableResponse, AuthEnableRequest, AuthEnableResponse,
    AuthRoleAddRequest, AuthRoleAddResponse, AuthRoleDeleteRequest, AuthRoleDeleteResponse,
    AuthRoleGetRequest, AuthRoleGetResponse, AuthRoleGrantPermissionRequest,
    AuthRoleGrantPermissionResponse, AuthRoleListRequest, AuthRoleListResponse,
    AuthRoleRevokePermissionRequest, AuthRoleRevokePermissionResponse, AuthUserAddRequest,
    AuthUserAddResponse, AuthUserChangePasswordRequest, AuthUserChangePasswordResponse,
    AuthUserDeleteRequest, AuthUserDeleteResponse, AuthUserGetRequest, AuthUserGetResponse,
    AuthUserGrantRoleRequest, AuthUserGrantRoleResponse, AuthUserListRequest, AuthUserListResponse,
    AuthUserRevokeRoleRequest, AuthUserRevokeRoleResponse, AuthenticateRequest,
    AuthenticateResponse, ResponseHeader,
};
use cairn_auth::{AuthApplied, Caller};
use tonic::{Request, Response, Status};

use crate::auth::RequestAuth as _;
use crate::member::Member;

pub struct AuthService {
    member: Arc<Member>,
}

impl AuthService {
    pub fn new(member: Arc<Member>) -> Self {
        AuthService { member }
    }

    fn header(&self) -> Option<ResponseHeader> {
        self.member.current_header()
    }

    /// Proposes one auth request for the caller of `request` and waits for
    /// its application.
    async fn change<T>(&self, request: &Request<T>, op: AuthOp) -> Result<AuthApplied, Status> {
        let caller = self.member.auth().caller_of(request).await?;
        self.propose(&caller, op).await
    }

    async fn propose(&self, caller: &Caller, op: AuthOp) -> Result<AuthApplied, Status> {
        let proposal = AuthRequest { request: Some(op) };
        self.member.propose_for(caller, proposal).await
    }

    /// The caller of a lookup, once this member has applied everything
    /// committed before it.
    async fn reader<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        let caller = self.member.auth().caller_of(request).await?;
        self.member.linearizable_barrier().await?;
        Ok(caller)
    }
}

#[tonic::async_trait]
impl Auth for AuthService {
    async fn auth_enable(
        &self,
        request: Request<AuthEnableRequest>,
    ) -> Result<Response<AuthEnableResponse>, Status> {
        let op = AuthOp::Enable(*request.get_ref());
        self.change(&request, op).await?;
        tracing::info!("enabled authentication");
        Ok(Response::new(AuthEnableResponse {
            header: self.header(),
        }))
    }

    async fn auth_disable(
        &self,
        request: Request<AuthDisableRequest>,
    ) -> Result<Response<AuthDisableResponse>, Status> {
        let op = AuthOp::Disable(*request.get_ref());
        self.change(&request, op).await?;
        tracing::info!("disabled authentication");
        Ok(Response::new(AuthDisableResponse {
            header: self.header(),
        }))
    }

    async fn authenticate(
        &self,
        request: Request<AuthenticateRequest>,
    ) -> Result<Response<AuthenticateResponse>, Status> {
        let auth = self.member.auth();
        self.member.linearizable_barrier().await?;
        let AuthenticateRequest { name, password } = request.get_ref().clone();
        if let Err(e) = auth
            .check_password(&name, password)
            .await
            .map_err(crate::auth::status)
        {
            if e.message() != error::AUTH_NOT_ENABLED.message() {
                tracing::warn!(user = %name, "invalid authentication was requested: {}", e.message());
            }
            return Err(e);
        }
        let op = AuthOp::Authenticate(cairnpb::Authenticate {
            name,
            simple_token: auth.new_simple_token().map_err(crate::auth::status)?,
        });
        // Whoever asks may authenticate: a stale token sent along does not
        // matter.
        let applied = self.propose(&Caller::default(), op).await?;
        Ok(Response::new(AuthenticateResponse {
            header: self.header(),
            token: auth.token_for(applied).map_err(crate::auth::status)?,
        }))
    }

    async fn user_add(
        &self,
        request: Request<AuthUserAddRequest>,
    ) -> Result<Response<AuthUserAddResponse>, Status> {
        let AuthUserAddRequest {
            name,
            password,
            options,
        } = request.get_ref().clone();
        if name.is_empty() {
            return Err(error::USER_EMPTY.status());
        }
        let no_password = options.as_ref().is_some_and(|o| o.no_password);
        let password_hash = if no_password {
            Vec::new()
        } else {
            self.member
                .auth()
                .hash_password(password)
                .await
                .map_err(crate::auth::status)?
        };
        let op = AuthOp::UserAdd(cairnpb::UserAdd {
            name,
            password_hash: password_hash.into(),
            options,
        });
        self.change(&request, op).await?;
        Ok(Response::new(AuthUserAddResponse {
            header: self.header(),
        }))
    }

    async fn user_get(
        &self,
        request: Request<AuthUserGetRequest>,
    ) -> Result<Response<AuthUserGetResponse>, Status> {
        let caller = self.reader(&request).await?;
        let name = &request.get_ref().name;
        let store = self.member.auth().store();
        // Anyone may look themselves up.
        if let Err(e) = store.admin_permitted(&caller.username)
            && caller.username != *name
        {
            return Err(e.status());
        }
        let user = store
            .user(name)
            .ok_or_else(|| error::USER_NOT_FOUND.status())?;
        Ok(Response::new(AuthUserGetResponse {
            header: self.header(),
            roles: user.roles.clone(),
        }))
    }

    async fn user_list(
        &self,
        request: Request<AuthUserListRequest>,
    ) -> Result<Response<AuthUserListResponse>, Status> {
        let caller = self.reader(&request).await?;
        let store = self.member.auth().store();
        store
            .admin_permitted(&caller.username)
            .map_err(|e| e.status())?;
        Ok(Response::new(AuthUserListResponse {
            header: self.header(),
            users: store.user_names(),
        }))
    }

    async fn user_delete(
        &self,
        request: Request<AuthUserDeleteRequest>,
    ) -> Result<Response<AuthUserDeleteResponse>, Status> {
        let op = AuthOp::UserDelete(request.get_ref().clone());
        self.change(&request, op).await?;
        Ok(Response::new(AuthUserDeleteResponse {
            header: self.header(),
        }))
    }

    async fn user_change_password(
        &self,
        request: Request<AuthUserChangePasswordRequest>,
    ) -> Result<Response<AuthUserChangePasswordResponse>, Status> {
        let AuthUserChangePasswordRequest { name, password } = request.get_ref().clone();
        let password_hash = self
            .member
            .auth()
            .hash_password(password)
            .await
            .map_err(crate::auth::status)?;
        let op = AuthOp::UserChangePassword(cairnpb::UserChangePassword {
            name,
            password_hash: password_hash.into(),
        });
        self.change(&request, op).await?;
        Ok(Response::new(AuthUserChangePasswordResponse {
            header: self.header(),
        }))
    }

    async fn user_grant_role(
        &self,
        request: Request<AuthUserGrantRoleRequest>,
    ) -> Result<Response<AuthUserGrantRoleResponse>, Status> {
        let op = AuthOp::UserGrantRole(request.get_ref().clone());
        self.change(&request, op).await?;
        Ok(Response::new(AuthUserGrantRoleResponse {
            header: self.header(),
        }))
    }

    async fn user_revoke_role(
        &self,
        request: Request<AuthUserRevokeRoleRequest>,
    ) -> Result<Response<AuthUserRevokeRoleResponse>, Status> {
        let op = AuthOp::UserRevokeRole(request.get_ref().clone());
        self.change(&request, op).await?;
        Ok(Response::new(AuthUserRevokeRoleResponse {
            header: self.header(),
        }))
    }

    async fn role_add(
        &self,
        request: Request<AuthRoleAddRequest>,
    ) -> Result<Response<AuthRoleAddResponse>, Status> {
        let op = AuthOp::RoleAdd(request.get_ref().clone());
        self.change(&request, op).await?;
        Ok(Response::new(AuthRoleAddResponse {
            header: self.header(),
        }))
    }

    async fn role_get(
        &self,
        request: Request<AuthRoleGetRequest>,
    ) -> Result<Response<AuthRoleGetResponse>, Status> {
        let caller = self.reader(&request).await?;
        let role = &request.get_ref().role;
        let store = self.member.auth().store();
        // Anyone may look up a role they have.
        if let Err(e) = store.admin_permitted(&caller.username)
            && !store.has_role(&caller.username, role)
        {
            return Err(e.status());
        }
        let perm = store.role_permissions(role).map_err(|e| e.status())?;
        Ok(Response::new(AuthRoleGetResponse {
            header: self.header(),
            perm,
        }))
    }

    async fn role_list(
        &self,
        request: Request<AuthRoleListRequest>,
    ) -> Result<Response<AuthRoleListResponse>, Status> {
        let caller = self.reader(&request).await?;
        let store = self.member.auth().store();
        store
            .admin_permitted(&caller.username)
            .map_err(|e| e.status())?;
        Ok(Response::new(AuthRoleListResponse {
            header: self.header(),
            roles: store.role_names(),
        }))
    }

    async fn role_delete(
        &self,
        request: Request<AuthRoleDeleteRequest>,
    ) -> Result<Response<AuthRoleDeleteResponse>, Status> {
        let op = AuthOp::RoleDelete(request.get_ref().clone());
        self.change(&request, op).await?;
        Ok(Response::new(AuthRoleDeleteResponse {
            header: self.header(),
        }))
    }

    async fn role_grant_permission(
        &self,
        request: Request<AuthRoleGrantPermissionRequest>,
    ) -> Result<Response<AuthRoleGrantPermissionResponse>, Status> {
        let op = AuthOp::RoleGrantPermission(request.get_ref().clone());
        self.change(&request, op).await?;
        Ok(Response::new(AuthRoleGrantPermissionResponse {
            header: self.header(),
        }))
    }

    async fn role_revoke_permission(
        &self,
        request: Request<AuthRoleRevokePermissionRequest>,
    ) -> Result<Response<AuthRoleRevokePermissionResponse>, Status> {
        let op = AuthOp::RoleRevokePermission(request.get_ref().clone());
        self.change(&request, op).await?;
        Ok(Response::new(AuthRoleRevokePermissionResponse {
            header: self.header(),
        }))
    }
}
