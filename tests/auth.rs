//! Auth against a real member: users, roles and permissions set up with the
//! real etcdctl, then enforced on KV, Watch and the next request after a
//! revoke, and kept across a restart.

mod common;

use cairn_api::etcdserverpb::auth_client::AuthClient;
use cairn_api::etcdserverpb::watch_client::WatchClient;
use cairn_api::etcdserverpb::watch_request::RequestUnion;
use cairn_api::etcdserverpb::{AuthenticateRequest, WatchCreateRequest, WatchRequest};
use common::Member;
use etcd_client::{Client, ConnectOptions, Permission, PermissionType};

/// Creates root (password "root") with the root role, a role `app-reader`
/// that may read `/app/`, a user alice (password "alice") with it, and
/// turns auth on.
fn set_up(m: &Member) {
    let add_user = |name: &str| {
        let out = common::etcdctl(
            &m.endpoint(),
            &["user", "add", name, "--interactive=false"],
            Some(&format!("{name}\n")),
        );
        assert!(out.status.success(), "{out:?}");
    };
    add_user("root");
    m.etcdctl_ok(&["user", "grant-role", "root", "root"]);
    m.etcdctl_ok(&["role", "add", "app-reader"]);
    m.etcdctl_ok(&[
        "role",
        "grant-permission",
        "app-reader",
        "read",
        "/app/",
        "--prefix=true",
    ]);
    add_user("alice");
    m.etcdctl_ok(&["user", "grant-role", "alice", "app-reader"]);
    assert_eq!(
        m.etcdctl_ok(&["auth", "enable"]),
        "Authentication Enabled\n"
    );
}

fn as_user(m: &Member, user: &str, args: &[&str]) -> std::process::Output {
    let credentials = format!("--user={user}:{user}");
    let mut all = vec![credentials.as_str()];
    all.extend_from_slice(args);
    m.etcdctl(&all)
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_reader_of_app_can_neither_write_there_nor_read_elsewhere() {
    let mut m = Member::start();
    set_up(&m);
    assert!(
        as_user(&m, "root", &["put", "/app/a", "1"])
            .status
            .success()
    );
    assert!(
        as_user(&m, "root", &["put", "/other/b", "2"])
            .status
            .success()
    );

    let read = as_user(&m, "alice", &["get", "/app/", "--prefix"]);
    assert_eq!(String::from_utf8_lossy(&read.stdout), "/app/a\n1\n");
    let write = as_user(&m, "alice", &["put", "/app/a", "x"]);
    assert!(!write.status.success());
    assert!(
        stderr(&write).contains("etcdserver: permission denied"),
        "{write:?}"
    );
    let elsewhere = as_user(&m, "alice", &["get", "/other/b"]);
    assert!(stderr(&elsewhere).contains("etcdserver: permission denied"));
    // A txn is checked in both branches, taken or not.
    let txn = common::etcdctl(
        &m.endpoint(),
        &["--user=alice:alice", "txn"],
        Some("\nget /app/a\n\nput /other/b 3\n\n"),
    );
    assert!(
        stderr(&txn).contains("etcdserver: permission denied"),
        "{txn:?}"
    );

    let wrong = as_user(&m, "nobody", &["get", "/app/a"]);
    assert!(stderr(&wrong).contains("authentication failed, invalid user ID or password"));
    let anonymous = m.etcdctl(&["get", "/app/a"]);
    assert!(stderr(&anonymous).contains("etcdserver: user name is empty"));
    // Only root manages auth.
    let manage = as_user(&m, "alice", &["role", "add", "mine"]);
    assert!(stderr(&manage).contains("etcdserver: permission denied"));

    // The auth store is durable: after a restart the same users still hold.
    m.kill();
    m.spawn(&[]);
    let again = as_user(&m, "alice", &["get", "/app/a"]);
    assert_eq!(String::from_utf8_lossy(&again.stdout), "/app/a\n1\n");
    assert!(
        !as_user(&m, "alice", &["put", "/app/a", "x"])
            .status
            .success()
    );
}

#[tokio::test]
async fn a_revoked_permission_counts_from_the_next_request() {
    let m = Member::start();
    set_up(&m);
    m.etcdctl_ok(&[
        "--user=root:root",
        "role",
        "grant-permission",
        "app-reader",
        "readwrite",
        "/app/",
        "--prefix=true",
    ]);
    let endpoint = format!("http://{}", m.endpoint());
    let options = ConnectOptions::new().with_user("alice", "alice");
    let mut alice = Client::connect([endpoint.as_str()], Some(options))
        .await
        .expect("alice connects");
    alice
        .put("/app/k", "1", None)
        .await
        .expect("alice may write");
    // The Lock service writes and reads under the lock's name as its caller.
    let held = alice.lock("/app/lock", None).await.expect("alice may lock");
    alice.unlock(held.key()).await.expect("unlock");
    let err = alice
        .lock("/other/lock", None)
        .await
        .expect_err("no rights there");
    assert!(err.to_string().contains("permission denied"), "{err}");

    let root_options = ConnectOptions::new().with_user("root", "root");
    let mut root = Client::connect([endpoint.as_str()], Some(root_options))
        .await
        .expect("root connects");
    root.role_revoke_permission(
        "app-reader",
        "/app/",
        Some(etcd_client::RoleRevokePermissionOptions::new().with_prefix()),
    )
    .await
    .expect("revoke");
    // Same client, same token: refused now.
    let err = alice.put("/app/k", "2", None).await.expect_err("revoked");
    assert!(err.to_string().contains("permission denied"), "{err}");
    let err = alice.get("/app/k", None).await.expect_err("revoked");
    assert!(err.to_string().contains("permission denied"), "{err}");

    // And granted again, it counts at once too.
    root.role_grant_permission(
        "app-reader",
        Permission::new(PermissionType::Read, "/app/k"),
    )
    .await
    .expect("grant");
    let got = alice.get("/app/k", None).await.expect("readable again");
    assert_eq!(got.kvs()[0].value(), b"1");
}

#[tokio::test]
async fn a_watch_on_a_forbidden_range_is_cancelled() {
    let m = Member::start();
    set_up(&m);
    let endpoint = format!("http://{}", m.endpoint());
    let token = AuthClient::connect(endpoint.clone())
        .await
        .expect("connect")
        .authenticate(AuthenticateRequest {
            name: "alice".into(),
            password: "alice".into(),
        })
        .await
        .expect("alice authenticates")
        .into_inner()
        .token;

    let create = |key: &str, range_end: &str| WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: key.as_bytes().to_vec().into(),
            range_end: range_end.as_bytes().to_vec().into(),
            ..Default::default()
        })),
    };
    let requests = tokio_stream::iter([create("/other/", "/other0"), create("/app/", "/app0")]);
    let mut request = tonic::Request::new(requests);
    request
        .metadata_mut()
        .insert("token", token.parse().expect("ascii token"));
    let mut responses = WatchClient::connect(endpoint)
        .await
        .expect("connect")
        .watch(request)
        .await
        .expect("watch stream")
        .into_inner();

    let refused = responses.message().await.expect("response").expect("open");
    assert!(refused.created && refused.canceled, "{refused:?}");
    assert_eq!(refused.cancel_reason, "etcdserver: permission denied");
    let allowed = responses.message().await.expect("response").expect("open");
    assert!(allowed.created && !allowed.canceled, "{allowed:?}");
}
