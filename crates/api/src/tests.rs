//! Checks that the generated services sit at etcd's gRPC paths.

use tonic::server::NamedService;

use crate::{etcdserverpb, v3electionpb, v3lockpb};

#[test]
fn service_names_are_etcds() {
    use etcdserverpb::{
        auth_server::AuthServer, cluster_server::ClusterServer, kv_server::KvServer,
        lease_server::LeaseServer, maintenance_server::MaintenanceServer,
        watch_server::WatchServer,
    };
    use v3electionpb::election_server::ElectionServer;
    use v3lockpb::lock_server::LockServer;

    assert_eq!(<KvServer<()> as NamedService>::NAME, "etcdserverpb.KV");
    assert_eq!(
        <WatchServer<()> as NamedService>::NAME,
        "etcdserverpb.Watch"
    );
    assert_eq!(
        <LeaseServer<()> as NamedService>::NAME,
        "etcdserverpb.Lease"
    );
    assert_eq!(
        <ClusterServer<()> as NamedService>::NAME,
        "etcdserverpb.Cluster"
    );
    assert_eq!(
        <MaintenanceServer<()> as NamedService>::NAME,
        "etcdserverpb.Maintenance"
    );
    assert_eq!(<AuthServer<()> as NamedService>::NAME, "etcdserverpb.Auth");
    assert_eq!(<LockServer<()> as NamedService>::NAME, "v3lockpb.Lock");
    assert_eq!(
        <ElectionServer<()> as NamedService>::NAME,
        "v3electionpb.Election"
    );
}

/// Every rpc's full path, `/package.Service/Method`, as the generated code
/// routes it.
#[test]
fn method_paths_are_etcds() {
    let generated = [
        (
            "etcdserverpb",
            include_str!(concat!(env!("OUT_DIR"), "/etcdserverpb.rs")),
        ),
        (
            "v3lockpb",
            include_str!(concat!(env!("OUT_DIR"), "/v3lockpb.rs")),
        ),
        (
            "v3electionpb",
            include_str!(concat!(env!("OUT_DIR"), "/v3electionpb.rs")),
        ),
    ];
    let services: &[(&str, &str, &[&str])] = &[
        (
            "etcdserverpb",
            "KV",
            &["Range", "Put", "DeleteRange", "Txn", "Compact"],
        ),
        ("etcdserverpb", "Watch", &["Watch"]),
        (
            "etcdserverpb",
            "Lease",
            &[
                "LeaseGrant",
                "LeaseRevoke",
                "LeaseKeepAlive",
                "LeaseTimeToLive",
                "LeaseLeases",
            ],
        ),
        (
            "etcdserverpb",
            "Cluster",
            &[
                "MemberAdd",
                "MemberRemove",
                "MemberUpdate",
                "MemberList",
                "MemberPromote",
            ],
        ),
        (
            "etcdserverpb",
            "Maintenance",
            &[
                "Alarm",
                "Status",
                "Defragment",
                "Hash",
                "HashKV",
                "Snapshot",
                "MoveLeader",
            ],
        ),
        (
            "etcdserverpb",
            "Auth",
            &[
                "AuthEnable",
                "AuthDisable",
                "Authenticate",
                "UserAdd",
                "UserGet",
                "UserList",
                "UserDelete",
                "UserChangePassword",
                "UserGrantRole",
                "UserRevokeRole",
                "RoleAdd",
                "RoleGet",
                "RoleList",
                "RoleDelete",
                "RoleGrantPermission",
                "RoleRevokePermission",
            ],
        ),
        ("v3lockpb", "Lock", &["Lock", "Unlock"]),
        (
            "v3electionpb",
            "Election",
            &["Campaign", "Proclaim", "Leader", "Observe", "Resign"],
        ),
    ];
    for (package, service, methods) in services {
        let code = generated
            .iter()
            .find(|(p, _)| p == package)
            .map(|(_, code)| *code)
            .unwrap_or_default();
        for method in *methods {
            let path = format!("\"/{package}.{service}/{method}\"");
            // Once in the client, once in the server's routing table.
            assert!(
                code.matches(&path).count() >= 2,
                "{path} is not routed by the generated code"
            );
        }
    }
}

#[test]
fn streaming_shapes() {
    let etcd = include_str!(concat!(env!("OUT_DIR"), "/etcdserverpb.rs"));
    let election = include_str!(concat!(env!("OUT_DIR"), "/v3electionpb.rs"));
    // With default stubs, a server-streaming rpc answers with a boxed stream
    // (`tonic::codegen::BoxStream`).
    for response in [
        "WatchResponse",
        "LeaseKeepAliveResponse",
        "SnapshotResponse",
    ] {
        assert!(
            etcd.contains(&format!("tonic::Response<BoxStream<super::{response}>>")),
            "{response}"
        );
    }
    assert!(election.contains("tonic::Response<BoxStream<super::LeaderResponse>>"));
    // Client-streaming rpcs take a stream of requests.
    for request in ["WatchRequest", "LeaseKeepAliveRequest"] {
        assert!(
            etcd.contains(&format!("tonic::Streaming<super::{request}>")),
            "{request}"
        );
    }
}
