//! etcd's v3 API as Rust types and tonic services, generated from `proto/`,
//! plus etcd's error values (exact messages and gRPC codes).

#![allow(clippy::all)]

pub mod mvccpb {
    tonic::include_proto!("mvccpb");
}

pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}

pub mod cairnpb {
    tonic::include_proto!("cairnpb");
}
