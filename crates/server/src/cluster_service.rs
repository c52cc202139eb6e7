//! etcd's Cluster service: membership changes go through consensus (root
//! only, with auth on); the member list is the registry this member has
//! applied.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use cairn_api::error;
use cairn_api::etcdserverpb::cluster_server::Cluster;
use cairn_api::etcdserverpb::{
    Member as PbMember, MemberAddRequest, MemberAddResponse, MemberListRequest, MemberListResponse,
    MemberPromoteRequest, MemberPromoteResponse, MemberRemoveRequest, MemberRemoveResponse,
    MemberUpdateRequest, MemberUpdateResponse,
};
use cairn_consensus::{MembershipChange, PeerInfo};
use tonic::{Request, Response, Status};

use crate::auth::RequestAuth as _;
use crate::ids;
use crate::member::Member;

pub struct ClusterService {
    member: Arc<Member>,
}

impl ClusterService {
    pub fn new(member: Arc<Member>) -> Self {
        ClusterService { member }
    }

    async fn change(&self, change: MembershipChange) -> Result<Vec<PbMember>, Status> {
        let members = self.member.change_membership(change).await?;
        Ok(members.iter().map(to_pb).collect())
    }

    fn header(&self) -> Option<cairn_api::etcdserverpb::ResponseHeader> {
        self.member.current_header()
    }
}

pub fn to_pb(m: &PeerInfo) -> PbMember {
    PbMember {
        id: m.id,
        name: m.name.clone(),
        peer_ur_ls: m.peer_urls.clone(),
        client_ur_ls: m.client_urls.clone(),
        is_learner: m.is_learner,
    }
}

/// etcd refuses peer URLs that are not absolute http(s) URLs with a host.
fn check_peer_urls(urls: &[String]) -> Result<(), Status> {
    let valid = |u: &str| {
        let rest = u
            .strip_prefix("http://")
            .or_else(|| u.strip_prefix("https://"));
        rest.is_some_and(|r| !r.is_empty() && !r.starts_with(':') && !r.starts_with('/'))
    };
    if urls.is_empty() || !urls.iter().all(|u| valid(u)) {
        return Err(error::MEMBER_BAD_URLS.status());
    }
    Ok(())
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_add(
        &self,
        request: Request<MemberAddRequest>,
    ) -> Result<Response<MemberAddResponse>, Status> {
        self.member.auth().admin_of(&request).await?;
        let request = request.into_inner();
        check_peer_urls(&request.peer_ur_ls)?;
        // As etcd: the ID mixes the peer URLs with the time of the request,
        // so a member removed and added again gets a new one.
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let id = ids::member_id(&request.peer_ur_ls, &now.to_string());
        let added = PeerInfo {
            id,
            name: String::new(),
            peer_urls: request.peer_ur_ls,
            client_urls: Vec::new(),
            is_learner: request.is_learner,
        };
        let members = self.change(MembershipChange::Add(added.clone())).await?;
        Ok(Response::new(MemberAddResponse {
            header: self.header(),
            member: Some(to_pb(&added)),
            members,
        }))
    }

    async fn member_remove(
        &self,
        request: Request<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        self.member.auth().admin_of(&request).await?;
        let members = self
            .change(MembershipChange::Remove(request.get_ref().id))
            .await?;
        Ok(Response::new(MemberRemoveResponse {
            header: self.header(),
            members,
        }))
    }

    async fn member_update(
        &self,
        request: Request<MemberUpdateRequest>,
    ) -> Result<Response<MemberUpdateResponse>, Status> {
        self.member.auth().admin_of(&request).await?;
        let request = request.into_inner();
        check_peer_urls(&request.peer_ur_ls)?;
        let change = MembershipChange::UpdatePeerUrls {
            id: request.id,
            peer_urls: request.peer_ur_ls,
        };
        let members = self.change(change).await?;
        Ok(Response::new(MemberUpdateResponse {
            header: self.header(),
            members,
        }))
    }

    async fn member_list(
        &self,
        _request: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        let members = self.member.node.members().iter().map(to_pb).collect();
        Ok(Response::new(MemberListResponse {
            header: self.header(),
            members,
        }))
    }

    async fn member_promote(
        &self,
        request: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        self.member.auth().admin_of(&request).await?;
        let members = self
            .change(MembershipChange::Promote(request.get_ref().id))
            .await?;
        Ok(Response::new(MemberPromoteResponse {
            header: self.header(),
            members,
        }))
    }
}
