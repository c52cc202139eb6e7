//! etcd's Cluster service: the member list. Membership changes come with
//! multi-member clusters.

use std::sync::Arc;

use cairn_api::etcdserverpb::cluster_server::Cluster;
use cairn_api::etcdserverpb::{Member as PbMember, MemberListRequest, MemberListResponse};
use tonic::{Request, Response, Status};

use crate::member::Member;

pub struct ClusterService {
    member: Arc<Member>,
}

impl ClusterService {
    pub fn new(member: Arc<Member>) -> Self {
        ClusterService { member }
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_list(
        &self,
        _request: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        let m = &self.member;
        Ok(Response::new(MemberListResponse {
            header: m.header(m.store.current_revision()),
            members: vec![PbMember {
                id: m.id,
                name: m.name.clone(),
                peer_ur_ls: m.peer_urls.clone(),
                client_ur_ls: m.client_urls.clone(),
                is_learner: false,
            }],
        }))
    }
}
