//! etcd's v3 API as Rust types and tonic services, generated from `proto/`,
//! plus etcd's error values (exact messages and gRPC codes).
//!
//! Packages and services follow etcd 3.4, so gRPC paths are etcd's
//! (`/etcdserverpb.KV/Range`, `/v3lockpb.Lock/Lock`, ...):
//!
//! - [`mvccpb`]: `KeyValue`, `Event`.
//! - [`authpb`]: `User`, `Role`, `Permission`, `UserAddOptions`.
//! - [`etcdserverpb`]: the KV, Watch, Lease, Cluster, Maintenance and Auth
//!   services and their messages.
//! - [`v3lockpb`]: the Lock service.
//! - [`v3electionpb`]: the Election service.
//! - [`cairnpb`]: Cairn's own internal messages, and the members' reads of
//!   each other's shard replicas (`ShardReads`).
//! - [`error`]: etcd's server errors.
//! - [`duration`]: Go's duration syntax, as etcd's flags take it.
//!
//! ```
//! use cairn_api::error::{self, EtcdError};
//! use cairn_api::etcdserverpb::PutRequest;
//!
//! // Messages are prost types; errors carry etcd's exact code and text.
//! let put = PutRequest { key: "k".into(), value: "v".into(), ..Default::default() };
//! assert_eq!(prost::Message::encoded_len(&put), 6);
//! let status = error::KEY_NOT_FOUND.status();
//! assert_eq!(status.message(), "etcdserver: key not found");
//! assert_eq!(EtcdError::from_status(&status), Some(error::KEY_NOT_FOUND));
//! ```

// Generated code is exempt from clippy; the hand-written modules are not.
#[allow(clippy::all)]
pub mod mvccpb {
    tonic::include_proto!("mvccpb");
}

#[allow(clippy::all)]
pub mod authpb {
    tonic::include_proto!("authpb");
}

#[allow(clippy::all)]
pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}

#[allow(clippy::all)]
pub mod v3lockpb {
    tonic::include_proto!("v3lockpb");
}

#[allow(clippy::all)]
pub mod v3electionpb {
    tonic::include_proto!("v3electionpb");
}

#[allow(clippy::all)]
pub mod cairnpb {
    tonic::include_proto!("cairnpb");
}

pub mod alarm_record;
pub mod duration;

/// etcd's version that Cairn answers as (Status.version, `--version`,
/// `/version`, metrics).
pub const ETCD_VERSION: &str = "3.4.23";
/// etcd's cluster version.
pub const ETCD_CLUSTER_VERSION: &str = "3.4.0";
pub mod error;
pub mod v2_guest;
pub mod watch;

#[cfg(test)]
mod tests;
