//! The services the proxy passes through as they are: Cluster (except the
//! member list under --resolver-prefix), Maintenance, Auth, and Lock and
//! Election (with their names inside the namespace).

use std::pin::Pin;

use cairn_api::etcdserverpb::auth_client::AuthClient;
use cairn_api::etcdserverpb::auth_server::Auth;
use cairn_api::etcdserverpb::cluster_client::ClusterClient;
use cairn_api::etcdserverpb::cluster_server::Cluster;
use cairn_api::etcdserverpb::maintenance_client::MaintenanceClient;
use cairn_api::etcdserverpb::maintenance_server::Maintenance;
use cairn_api::etcdserverpb::*;
use cairn_api::v3electionpb::election_client::ElectionClient;
use cairn_api::v3electionpb::election_server::Election;
use cairn_api::v3electionpb::{
    CampaignRequest, CampaignResponse, LeaderKey, LeaderRequest, LeaderResponse, ProclaimRequest,
    ProclaimResponse, ResignRequest, ResignResponse,
};
use cairn_api::v3lockpb::lock_client::LockClient;
use cairn_api::v3lockpb::lock_server::Lock;
use cairn_api::v3lockpb::{LockRequest, LockResponse, UnlockRequest, UnlockResponse};
use tokio_stream::{Stream, StreamExt as _};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::namespace::Namespace;
use crate::resolver::Registry;
use crate::upstream::{Caller, MAX_MESSAGE, Retry, Upstream};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Sends `$request` through `$client::$method` on the members, with the
/// caller's token, failing over as `$retry` allows.
macro_rules! forward {
    ($self:ident, $request:ident, $client:ident, $method:ident, $retry:expr) => {{
        let caller = Caller::of($request.metadata());
        let message = $request.into_inner();
        let response = $self
            .upstream
            .call($retry, |channel| {
                let request = caller.request(Clone::clone(&message));
                async move {
                    Ok($client::new(channel)
                        .max_decoding_message_size(MAX_MESSAGE)
                        .$method(request)
                        .await?
                        .into_inner())
                }
            })
            .await?;
        Ok(Response::new(response))
    }};
}

pub struct ClusterProxy {
    pub upstream: Upstream,
    /// Set with --resolver-prefix: the member list is the proxies.
    pub registry: Option<Registry>,
}

#[tonic::async_trait]
impl Cluster for ClusterProxy {
    async fn member_add(
        &self,
        request: Request<MemberAddRequest>,
    ) -> Result<Response<MemberAddResponse>, Status> {
        forward!(self, request, ClusterClient, member_add, Retry::IfNotSent)
    }

    async fn member_remove(
        &self,
        request: Request<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        forward!(
            self,
            request,
            ClusterClient,
            member_remove,
            Retry::IfNotSent
        )
    }

    async fn member_update(
        &self,
        request: Request<MemberUpdateRequest>,
    ) -> Result<Response<MemberUpdateResponse>, Status> {
        forward!(
            self,
            request,
            ClusterClient,
            member_update,
            Retry::IfNotSent
        )
    }

    async fn member_list(
        &self,
        request: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        if let Some(registry) = &self.registry {
            return Ok(Response::new(registry.member_list().await?));
        }
        forward!(self, request, ClusterClient, member_list, Retry::Idempotent)
    }

    async fn member_promote(
        &self,
        request: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        forward!(
            self,
            request,
            ClusterClient,
            member_promote,
            Retry::IfNotSent
        )
    }
}

pub struct MaintenanceProxy {
    pub upstream: Upstream,
}

#[tonic::async_trait]
impl Maintenance for MaintenanceProxy {
    async fn alarm(
        &self,
        request: Request<AlarmRequest>,
    ) -> Result<Response<AlarmResponse>, Status> {
        forward!(self, request, MaintenanceClient, alarm, Retry::IfNotSent)
    }

    async fn status(
        &self,
        request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        forward!(self, request, MaintenanceClient, status, Retry::Idempotent)
    }

    async fn defragment(
        &self,
        request: Request<DefragmentRequest>,
    ) -> Result<Response<DefragmentResponse>, Status> {
        forward!(
            self,
            request,
            MaintenanceClient,
            defragment,
            Retry::IfNotSent
        )
    }

    async fn hash(&self, request: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        forward!(self, request, MaintenanceClient, hash, Retry::Idempotent)
    }

    async fn hash_kv(
        &self,
        request: Request<HashKvRequest>,
    ) -> Result<Response<HashKvResponse>, Status> {
        forward!(self, request, MaintenanceClient, hash_kv, Retry::Idempotent)
    }

    async fn snapshot(
        &self,
        request: Request<SnapshotRequest>,
    ) -> Result<Response<BoxStream<SnapshotResponse>>, Status> {
        let caller = Caller::of(request.metadata());
        let message = request.into_inner();
        let stream = self
            .upstream
            .call(Retry::Idempotent, |channel| {
                let request = caller.request(Clone::clone(&message));
                async move {
                    Ok(MaintenanceClient::new(channel)
                        .max_decoding_message_size(MAX_MESSAGE)
                        .snapshot(request)
                        .await?
                        .into_inner())
                }
            })
            .await?;
        Ok(Response::new(Box::pin(stream)))
    }

    async fn move_leader(
        &self,
        request: Request<MoveLeaderRequest>,
    ) -> Result<Response<MoveLeaderResponse>, Status> {
        forward!(
            self,
            request,
            MaintenanceClient,
            move_leader,
            Retry::IfNotSent
        )
    }
}

pub struct AuthProxy {
    pub upstream: Upstream,
}

#[tonic::async_trait]
impl Auth for AuthProxy {
    async fn auth_enable(
        &self,
        request: Request<AuthEnableRequest>,
    ) -> Result<Response<AuthEnableResponse>, Status> {
        forward!(self, request, AuthClient, auth_enable, Retry::IfNotSent)
    }

    async fn auth_disable(
        &self,
        request: Request<AuthDisableRequest>,
    ) -> Result<Response<AuthDisableResponse>, Status> {
        forward!(self, request, AuthClient, auth_disable, Retry::IfNotSent)
    }

    async fn authenticate(
        &self,
        request: Request<AuthenticateRequest>,
    ) -> Result<Response<AuthenticateResponse>, Status> {
        forward!(self, request, AuthClient, authenticate, Retry::IfNotSent)
    }

    async fn user_add(
        &self,
        request: Request<AuthUserAddRequest>,
    ) -> Result<Response<AuthUserAddResponse>, Status> {
        forward!(self, request, AuthClient, user_add, Retry::IfNotSent)
    }

    async fn user_get(
        &self,
        request: Request<AuthUserGetRequest>,
    ) -> Result<Response<AuthUserGetResponse>, Status> {
        forward!(self, request, AuthClient, user_get, Retry::Idempotent)
    }

    async fn user_list(
        &self,
        request: Request<AuthUserListRequest>,
    ) -> Result<Response<AuthUserListResponse>, Status> {
        forward!(self, request, AuthClient, user_list, Retry::Idempotent)
    }

    async fn user_delete(
        &self,
        request: Request<AuthUserDeleteRequest>,
    ) -> Result<Response<AuthUserDeleteResponse>, Status> {
        forward!(self, request, AuthClient, user_delete, Retry::IfNotSent)
    }

    async fn user_change_password(
        &self,
        request: Request<AuthUserChangePasswordRequest>,
    ) -> Result<Response<AuthUserChangePasswordResponse>, Status> {
        forward!(
            self,
            request,
            AuthClient,
            user_change_password,
            Retry::IfNotSent
        )
    }

    async fn user_grant_role(
        &self,
        request: Request<AuthUserGrantRoleRequest>,
    ) -> Result<Response<AuthUserGrantRoleResponse>, Status> {
        forward!(self, request, AuthClient, user_grant_role, Retry::IfNotSent)
    }

    async fn user_revoke_role(
        &self,
        request: Request<AuthUserRevokeRoleRequest>,
    ) -> Result<Response<AuthUserRevokeRoleResponse>, Status> {
        forward!(
            self,
            request,
            AuthClient,
            user_revoke_role,
            Retry::IfNotSent
        )
    }

    async fn role_add(
        &self,
        request: Request<AuthRoleAddRequest>,
    ) -> Result<Response<AuthRoleAddResponse>, Status> {
        forward!(self, request, AuthClient, role_add, Retry::IfNotSent)
    }

    async fn role_get(
        &self,
        request: Request<AuthRoleGetRequest>,
    ) -> Result<Response<AuthRoleGetResponse>, Status> {
        forward!(self, request, AuthClient, role_get, Retry::Idempotent)
    }

    async fn role_list(
        &self,
        request: Request<AuthRoleListRequest>,
    ) -> Result<Response<AuthRoleListResponse>, Status> {
        forward!(self, request, AuthClient, role_list, Retry::Idempotent)
    }

    async fn role_delete(
        &self,
        request: Request<AuthRoleDeleteRequest>,
    ) -> Result<Response<AuthRoleDeleteResponse>, Status> {
        forward!(self, request, AuthClient, role_delete, Retry::IfNotSent)
    }

    async fn role_grant_permission(
        &self,
        request: Request<AuthRoleGrantPermissionRequest>,
    ) -> Result<Response<AuthRoleGrantPermissionResponse>, Status> {
        forward!(
            self,
            request,
            AuthClient,
            role_grant_permission,
            Retry::IfNotSent
        )
    }

    async fn role_revoke_permission(
        &self,
        request: Request<AuthRoleRevokePermissionRequest>,
    ) -> Result<Response<AuthRoleRevokePermissionResponse>, Status> {
        forward!(
            self,
            request,
            AuthClient,
            role_revoke_permission,
            Retry::IfNotSent
        )
    }
}

pub struct LockProxy {
    pub upstream: Upstream,
    pub namespace: Namespace,
}

#[tonic::async_trait]
impl Lock for LockProxy {
    async fn lock(&self, request: Request<LockRequest>) -> Result<Response<LockResponse>, Status> {
        let (caller, mut lock) = (Caller::of(request.metadata()), request.into_inner());
        lock.name = self.namespace.key(&lock.name);
        let mut response = self
            .upstream
            .call(Retry::IfNotSent, |channel| {
                let request = caller.request(lock.clone());
                async move { Ok(LockClient::new(channel).lock(request).await?.into_inner()) }
            })
            .await
            .map_err(|s| self.namespace.status(s))?;
        self.namespace.strip(&mut response.key);
        Ok(Response::new(response))
    }

    async fn unlock(
        &self,
        request: Request<UnlockRequest>,
    ) -> Result<Response<UnlockResponse>, Status> {
        let (caller, mut unlock) = (Caller::of(request.metadata()), request.into_inner());
        unlock.key = self.namespace.key(&unlock.key);
        let response = self
            .upstream
            .call(Retry::IfNotSent, |channel| {
                let request = caller.request(unlock.clone());
                async move { Ok(LockClient::new(channel).unlock(request).await?.into_inner()) }
            })
            .await
            .map_err(|s| self.namespace.status(s))?;
        Ok(Response::new(response))
    }
}

pub struct ElectionProxy {
    pub upstream: Upstream,
    pub namespace: Namespace,
}

impl ElectionProxy {
    fn leader_up(&self, leader: &mut Option<LeaderKey>) {
        if let Some(l) = leader {
            l.name = self.namespace.key(&l.name);
            l.key = self.namespace.key(&l.key);
        }
    }

    fn leader_down(&self, leader: &mut Option<LeaderKey>) {
        if let Some(l) = leader {
            self.namespace.strip(&mut l.name);
            self.namespace.strip(&mut l.key);
        }
    }

    fn client(channel: Channel) -> ElectionClient<Channel> {
        ElectionClient::new(channel).max_decoding_message_size(MAX_MESSAGE)
    }
}

#[tonic::async_trait]
impl Election for ElectionProxy {
    async fn campaign(
        &self,
        request: Request<CampaignRequest>,
    ) -> Result<Response<CampaignResponse>, Status> {
        let (caller, mut campaign) = (Caller::of(request.metadata()), request.into_inner());
        campaign.name = self.namespace.key(&campaign.name);
        let mut response = self
            .upstream
            .call(Retry::IfNotSent, |channel| {
                let request = caller.request(campaign.clone());
                async move { Ok(Self::client(channel).campaign(request).await?.into_inner()) }
            })
            .await
            .map_err(|s| self.namespace.status(s))?;
        self.leader_down(&mut response.leader);
        Ok(Response::new(response))
    }

    async fn proclaim(
        &self,
        request: Request<ProclaimRequest>,
    ) -> Result<Response<ProclaimResponse>, Status> {
        let (caller, mut proclaim) = (Caller::of(request.metadata()), request.into_inner());
        self.leader_up(&mut proclaim.leader);
        let response = self
            .upstream
            .call(Retry::IfNotSent, |channel| {
                let request = caller.request(proclaim.clone());
                async move { Ok(Self::client(channel).proclaim(request).await?.into_inner()) }
            })
            .await
            .map_err(|s| self.namespace.status(s))?;
        Ok(Response::new(response))
    }

    async fn leader(
        &self,
        request: Request<LeaderRequest>,
    ) -> Result<Response<LeaderResponse>, Status> {
        let (caller, mut leader) = (Caller::of(request.metadata()), request.into_inner());
        leader.name = self.namespace.key(&leader.name);
        let mut response = self
            .upstream
            .call(Retry::Idempotent, |channel| {
                let request = caller.request(leader.clone());
                async move { Ok(Self::client(channel).leader(request).await?.into_inner()) }
            })
            .await
            .map_err(|s| self.namespace.status(s))?;
        if let Some(kv) = &mut response.kv {
            self.namespace.strip_kv(kv);
        }
        Ok(Response::new(response))
    }

    async fn observe(
        &self,
        request: Request<LeaderRequest>,
    ) -> Result<Response<BoxStream<LeaderResponse>>, Status> {
        let (caller, mut leader) = (Caller::of(request.metadata()), request.into_inner());
        leader.name = self.namespace.key(&leader.name);
        let stream = self
            .upstream
            .call(Retry::Idempotent, |channel| {
                let request = caller.request(leader.clone());
                async move { Ok(Self::client(channel).observe(request).await?.into_inner()) }
            })
            .await
            .map_err(|s| self.namespace.status(s))?;
        let namespace = self.namespace.clone();
        let stream = stream.map(move |response| {
            let mut response = response.map_err(|s| namespace.status(s))?;
            if let Some(kv) = &mut response.kv {
                namespace.strip_kv(kv);
            }
            Ok(response)
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn resign(
        &self,
        request: Request<ResignRequest>,
    ) -> Result<Response<ResignResponse>, Status> {
        let (caller, mut resign) = (Caller::of(request.metadata()), request.into_inner());
        self.leader_up(&mut resign.leader);
        let response = self
            .upstream
            .call(Retry::IfNotSent, |channel| {
                let request = caller.request(resign.clone());
                async move { Ok(Self::client(channel).resign(request).await?.into_inner()) }
            })
            .await
            .map_err(|s| self.namespace.status(s))?;
        Ok(Response::new(response))
    }
}
