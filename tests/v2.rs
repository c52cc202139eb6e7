//! etcd's v2 keys API, emulated on the v3 store with --enable-v2: the seed's
//! curl session (set, get, change, delete, TTLs, long-poll watches,
//! directories, a prevExist lock, in-order keys, compare-and-swap) and
//! etcdctl with ETCDCTL_API=2.

mod common;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::Member;
use common::http::{HttpResponse, form, request, request_as_user, stream_request};
use serde_json::Value;

fn v2_member() -> Member {
    Member::start_with(&["--enable-v2"])
}

fn index(response: &HttpResponse) -> i64 {
    response
        .header("X-Etcd-Index")
        .and_then(|i| i.parse().ok())
        .unwrap_or_else(|| panic!("no X-Etcd-Index in {:?}", response.headers))
}

/// A long poll in the background.
fn poll(addr: &str, path: &str) -> std::thread::JoinHandle<HttpResponse> {
    let addr = addr.to_string();
    let path = path.to_string();
    std::thread::spawn(move || request(&addr, "GET", &path, ""))
}

#[test]
fn the_seed_session() {
    let member = v2_member();
    let addr = member.endpoint();

    // Set, get, change, delete.
    let set = form(&addr, "PUT", "/v2/keys/message", "value=Hello+world");
    assert_eq!(set.status, 201, "{}", set.body);
    let body = set.json();
    assert_eq!(body["action"], "set");
    assert_eq!(body["node"]["key"], "/message");
    assert_eq!(body["node"]["value"], "Hello world");
    let created = body["node"]["createdIndex"].as_i64().expect("createdIndex");
    assert_eq!(body["node"]["modifiedIndex"].as_i64(), Some(created));
    assert_eq!(index(&set), created);
    let cluster_id = set.header("X-Etcd-Cluster-Id").expect("X-Etcd-Cluster-Id");
    assert!(
        u64::from_str_radix(cluster_id, 16).is_ok_and(|id| id != 0),
        "{cluster_id}"
    );

    let get = request(&addr, "GET", "/v2/keys/message", "").json();
    assert_eq!(get["action"], "get");
    assert_eq!(get["node"]["value"], "Hello world");

    let change = form(&addr, "PUT", "/v2/keys/message", "value=Hello+etcd");
    assert_eq!(change.status, 200);
    let change = change.json();
    assert_eq!(change["node"]["value"], "Hello etcd");
    assert_eq!(change["prevNode"]["value"], "Hello world");

    let delete = request(&addr, "DELETE", "/v2/keys/message", "");
    assert_eq!(delete.status, 200);
    let delete = delete.json();
    assert_eq!(delete["action"], "delete");
    assert_eq!(delete["prevNode"]["value"], "Hello etcd");
    let missing = request(&addr, "GET", "/v2/keys/message", "");
    assert_eq!(missing.status, 404);
    let error = missing.json();
    assert_eq!(error["errorCode"], 100);
    assert_eq!(error["message"], "Key not found");
    assert_eq!(error["cause"], "/message");

    // A directory, listed, listed recursively, deleted.
    let dir = form(&addr, "PUT", "/v2/keys/dir", "dir=true").json();
    assert_eq!(dir["node"]["dir"], Value::Bool(true));
    form(&addr, "PUT", "/v2/keys/dir/sub/leaf", "value=1");
    form(&addr, "PUT", "/v2/keys/dir/file", "value=2");
    form(&addr, "PUT", "/v2/keys/dir/_hidden", "value=3");
    let list = request(&addr, "GET", "/v2/keys/dir", "").json();
    let nodes = list["node"]["nodes"].as_array().expect("children");
    let keys: Vec<&str> = nodes.iter().filter_map(|n| n["key"].as_str()).collect();
    assert_eq!(keys, ["/dir/file", "/dir/sub"], "{list}");
    assert!(nodes[1].get("nodes").is_none(), "not recursive: {list}");
    let tree = request(&addr, "GET", "/v2/keys/dir?recursive=true&sorted=true", "").json();
    assert_eq!(
        tree["node"]["nodes"][1]["nodes"][0]["key"], "/dir/sub/leaf",
        "{tree}"
    );
    assert_eq!(tree["node"]["nodes"][1]["nodes"][0]["value"], "1");
    let not_file = request(&addr, "DELETE", "/v2/keys/dir", "");
    assert_eq!(
        (not_file.status, not_file.json()["errorCode"].clone()),
        (403, 102.into())
    );
    let not_empty = request(&addr, "DELETE", "/v2/keys/dir?dir=true", "");
    assert_eq!(
        (not_empty.status, not_empty.json()["errorCode"].clone()),
        (403, 108.into())
    );
    let not_dir = form(&addr, "PUT", "/v2/keys/dir/file/below", "value=x");
    assert_eq!(not_dir.json()["errorCode"], 104);
    let gone = request(&addr, "DELETE", "/v2/keys/dir?recursive=true", "");
    assert_eq!(gone.status, 200, "{}", gone.body);
    assert_eq!(
        request(&addr, "GET", "/v2/keys/dir/sub/leaf", "").status,
        404
    );

    // prevExist=false as a lock.
    let first = form(&addr, "PUT", "/v2/keys/lock?prevExist=false", "value=me");
    assert_eq!(first.status, 201);
    assert_eq!(first.json()["action"], "create");
    let second = form(&addr, "PUT", "/v2/keys/lock?prevExist=false", "value=you");
    assert_eq!(second.status, 412);
    let error = second.json();
    assert_eq!(error["errorCode"], 105);
    assert_eq!(error["message"], "Key already exists");

    // Compare-and-swap and compare-and-delete.
    let cas = form(&addr, "PUT", "/v2/keys/lock?prevValue=you", "value=x");
    assert_eq!(cas.status, 412);
    assert_eq!(cas.json()["cause"], "[you != me]");
    let cas = form(&addr, "PUT", "/v2/keys/lock?prevValue=me", "value=you").json();
    assert_eq!(cas["action"], "compareAndSwap");
    let modified = cas["node"]["modifiedIndex"].as_i64().expect("index");
    let cad = request(
        &addr,
        "DELETE",
        &format!("/v2/keys/lock?prevIndex={modified}"),
        "",
    );
    assert_eq!(cad.json()["action"], "compareAndDelete");

    // POST makes in-order keys.
    let a = form(&addr, "POST", "/v2/keys/queue", "value=Job1").json();
    let b = form(&addr, "POST", "/v2/keys/queue", "value=Job2").json();
    assert_eq!(a["action"], "create");
    let (ka, kb) = (
        a["node"]["key"].as_str().expect("key").to_string(),
        b["node"]["key"].as_str().expect("key").to_string(),
    );
    assert!(ka.starts_with("/queue/") && ka < kb, "{ka} {kb}");
    let queue = request(&addr, "GET", "/v2/keys/queue?sorted=true", "").json();
    let values: Vec<&str> = queue["node"]["nodes"]
        .as_array()
        .expect("jobs")
        .iter()
        .filter_map(|n| n["value"].as_str())
        .collect();
    assert_eq!(values, ["Job1", "Job2"]);
}

#[test]
fn ttls_expire_keys() {
    let member = v2_member();
    let addr = member.endpoint();
    let set = form(&addr, "PUT", "/v2/keys/foo", "value=bar&ttl=3").json();
    assert_eq!(set["node"]["ttl"], 3, "{set}");
    assert!(set["node"]["expiration"].as_str().is_some(), "{set}");
    let deadline = Instant::now() + Duration::from_secs(15);
    while request(&addr, "GET", "/v2/keys/foo", "").status != 404 {
        assert!(Instant::now() < deadline, "/foo did not expire");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn waits_return_on_a_change() {
    let member = v2_member();
    let addr = member.endpoint();
    form(&addr, "PUT", "/v2/keys/foo", "value=one");

    let waiting = poll(&addr, "/v2/keys/foo?wait=true");
    std::thread::sleep(Duration::from_millis(300));
    form(&addr, "PUT", "/v2/keys/foo", "value=two");
    let event = waiting.join().expect("the poll").json();
    assert_eq!(event["action"], "set");
    assert_eq!(event["node"]["value"], "two");
    assert_eq!(event["prevNode"]["value"], "one");

    // A recursive wait on a directory sees a nested change.
    form(&addr, "PUT", "/v2/keys/dir", "dir=true");
    let waiting = poll(&addr, "/v2/keys/dir?recursive=true&wait=true");
    std::thread::sleep(Duration::from_millis(300));
    form(&addr, "PUT", "/v2/keys/dir/a/b", "value=deep");
    let event = waiting.join().expect("the poll").json();
    assert_eq!(event["node"]["key"], "/dir/a/b", "{event}");

    // waitIndex reaches back into history.
    let set = form(&addr, "PUT", "/v2/keys/past", "value=then").json();
    let at = set["node"]["modifiedIndex"].as_i64().expect("index");
    form(&addr, "PUT", "/v2/keys/past", "value=now");
    let event = request(
        &addr,
        "GET",
        &format!("/v2/keys/past?wait=true&waitIndex={at}"),
        "",
    );
    assert_eq!(event.json()["node"]["value"], "then");
    // ... but not beyond the last 1000 events.
    for i in 0..1001 {
        form(&addr, "PUT", "/v2/keys/churn", &format!("value={i}"));
    }
    let cleared = request(
        &addr,
        "GET",
        &format!("/v2/keys/past?wait=true&waitIndex={at}"),
        "",
    );
    assert_eq!(cleared.status, 400);
    assert_eq!(cleared.json()["errorCode"], 401);
}

#[test]
fn refresh_renews_a_ttl_and_tells_no_watcher() {
    let member = v2_member();
    let addr = member.endpoint();
    form(&addr, "PUT", "/v2/keys/lock", "value=owner&ttl=2");
    let waiting = poll(&addr, "/v2/keys/lock?wait=true");
    std::thread::sleep(Duration::from_millis(300));

    let refreshed = form(
        &addr,
        "PUT",
        "/v2/keys/lock",
        "refresh=true&ttl=30&prevExist=true",
    );
    assert_eq!(refreshed.status, 200, "{}", refreshed.body);
    let body = refreshed.json();
    assert_eq!(body["action"], "update");
    assert_eq!(body["node"]["value"], "owner", "the value is kept");
    assert_eq!(body["node"]["ttl"], 30);
    assert_eq!(body["prevNode"]["ttl"].as_i64().map(|t| t <= 2), Some(true));

    // etcd's refusals: a value, no TTL, no node.
    let cases = [
        ("refresh=true&ttl=5&value=x", 211),
        ("refresh=true", 212),
        ("refresh=true&ttl=", 212),
        ("refresh=maybe&ttl=5", 209),
    ];
    for (form_body, code) in cases {
        let refused = form(&addr, "PUT", "/v2/keys/lock", form_body);
        assert_eq!(refused.status, 400, "{form_body}: {}", refused.body);
        assert_eq!(refused.json()["errorCode"], code, "{form_body}");
    }
    let missing = form(&addr, "PUT", "/v2/keys/nothing", "refresh=true&ttl=5");
    assert_eq!(missing.json()["errorCode"], 100);

    // Past the first TTL the node is still there, and the watcher heard
    // nothing until a real change.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(request(&addr, "GET", "/v2/keys/lock", "").status, 200);
    assert!(!waiting.is_finished(), "a refresh woke a watcher");
    form(&addr, "PUT", "/v2/keys/lock", "value=next");
    let event = waiting.join().expect("the poll").json();
    assert_eq!(event["node"]["value"], "next", "{event}");
}

#[test]
fn a_streaming_wait_sends_every_event() {
    let member = v2_member();
    let addr = member.endpoint();
    let mut events = stream_request(&addr, "GET", "/v2/keys/feed?wait=true&stream=true", "");
    assert_eq!(events.status, 200);
    for i in 1..=3 {
        form(&addr, "PUT", "/v2/keys/feed", &format!("value={i}"));
    }
    for i in 1..=3 {
        let event = events.next_json().expect("an event");
        assert_eq!(event["action"], "set");
        assert_eq!(event["node"]["value"], i.to_string(), "{event}");
    }
}

#[test]
fn answers_carry_the_raft_index_and_term() {
    let member = v2_member();
    let addr = member.endpoint();
    let raft = |response: &HttpResponse| {
        let header = |name| response.header(name).and_then(|v| v.parse::<u64>().ok());
        (header("X-Raft-Index"), header("X-Raft-Term"))
    };
    let set = form(&addr, "PUT", "/v2/keys/k", "value=v");
    let (index, term) = raft(&set);
    assert!(index.is_some_and(|i| i > 0), "{:?}", set.headers);
    assert!(term.is_some_and(|t| t >= 1), "{:?}", set.headers);
    let get = request(&addr, "GET", "/v2/keys/k", "");
    assert!(raft(&get).0 >= index, "the raft index does not go back");
    // Errors carry X-Etcd-Index only, as etcd's.
    let missing = request(&addr, "GET", "/v2/keys/none", "");
    assert_eq!(raft(&missing), (None, None));
    assert!(missing.header("X-Etcd-Index").is_some());
}

fn etcdctl_v2(member: &Member, args: &[&str]) -> Output {
    Command::new("etcdctl")
        .env("ETCDCTL_API", "2")
        .args(["--endpoints", &format!("http://{}", member.endpoint())])
        .args(args)
        .output()
        .expect("run etcdctl")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[test]
fn etcdctl_v2_set_mk_rm_ls_watch() {
    let member = v2_member();
    let set = etcdctl_v2(&member, &["set", "/foo", "bar"]);
    assert!(set.status.success(), "{}", stdout(&set));
    assert_eq!(String::from_utf8_lossy(&set.stdout).trim(), "bar");
    let get = etcdctl_v2(&member, &["get", "/foo"]);
    assert_eq!(String::from_utf8_lossy(&get.stdout).trim(), "bar");

    let mk = etcdctl_v2(&member, &["mk", "/made", "once"]);
    assert!(mk.status.success(), "{}", stdout(&mk));
    let again = etcdctl_v2(&member, &["mk", "/made", "twice"]);
    assert!(
        stdout(&again).contains("Error:  105: Key already exists"),
        "{}",
        stdout(&again)
    );

    let ls = etcdctl_v2(&member, &["ls"]);
    let listed = String::from_utf8_lossy(&ls.stdout).into_owned();
    assert!(
        listed.contains("/foo") && listed.contains("/made"),
        "{listed}"
    );

    let rm = etcdctl_v2(&member, &["rm", "/foo"]);
    assert!(
        stdout(&rm).contains("PrevNode.Value: bar"),
        "{}",
        stdout(&rm)
    );
    let rm = etcdctl_v2(&member, &["rm", "/foo"]);
    assert!(
        stdout(&rm).contains("Error:  100: Key not found"),
        "{}",
        stdout(&rm)
    );

    let endpoint = format!("http://{}", member.endpoint());
    let watch = std::thread::spawn(move || {
        Command::new("etcdctl")
            .env("ETCDCTL_API", "2")
            .args(["--endpoints", &endpoint, "watch", "/watched"])
            .output()
            .expect("run etcdctl watch")
    });
    std::thread::sleep(Duration::from_millis(500));
    let set = etcdctl_v2(&member, &["set", "/watched", "seen"]);
    assert!(set.status.success(), "{}", stdout(&set));
    let watched = watch.join().expect("the watch");
    assert_eq!(String::from_utf8_lossy(&watched.stdout).trim(), "seen");
}

#[test]
fn v2_is_off_without_the_flag() {
    let member = Member::start();
    assert_eq!(
        request(&member.endpoint(), "GET", "/v2/keys/foo", "").status,
        404
    );
}

#[test]
fn v2_auth_users_roles_and_basic_auth() {
    let member = v2_member();
    let addr = member.endpoint();
    form(&addr, "PUT", "/v2/keys/foo", "value=bar");
    form(&addr, "PUT", "/v2/keys/other", "value=secret");

    let user = request(
        &addr,
        "PUT",
        "/v2/auth/users/foo",
        r#"{"user":"foo", "password":"pass"}"#,
    );
    assert_eq!(
        (user.status, user.body.as_str()),
        (201, r#"{"user":"foo","roles":null}"#)
    );
    let role = request(
        &addr,
        "PUT",
        "/v2/auth/roles/foo",
        r#"{"role":"foo", "permissions": {"kv": {"read": ["/foo/*"]}}}"#,
    );
    assert_eq!(
        role.body,
        r#"{"role":"foo","permissions":{"kv":{"read":["/foo/*"],"write":null}}}"#
    );
    let granted = request(
        &addr,
        "PUT",
        "/v2/auth/users/foo",
        r#"{"user": "foo", "grant": ["foo"]}"#,
    );
    assert_eq!(granted.body, r#"{"user":"foo","roles":["foo"]}"#);

    let root = etcdctl_v2(&member, &["user", "add", "root:a"]);
    assert!(
        stdout(&root).contains("User root created"),
        "{}",
        stdout(&root)
    );
    let enable = etcdctl_v2(&member, &["auth", "enable"]);
    assert!(
        stdout(&enable).contains("Authentication Enabled"),
        "{}",
        stdout(&enable)
    );

    for (name, password) in [("root", "a"), ("foo", "pass")] {
        let got = request_as_user(&addr, "GET", "/v2/keys/foo/", "", name, password);
        assert_eq!(got.status, 200, "{name}: {}", got.body);
        assert_eq!(got.json()["node"]["value"], "bar");
    }
    let denied = request_as_user(&addr, "GET", "/v2/keys/other", "", "foo", "pass");
    assert_eq!(denied.status, 401, "{}", denied.body);
    let wrong = request_as_user(&addr, "GET", "/v2/keys/foo/", "", "foo", "");
    assert_eq!(wrong.status, 401);
    assert!(
        wrong
            .body
            .contains("The request requires user authentication"),
        "{}",
        wrong.body
    );
    // As etcd v2: enabling auth made the guest role, which lets callers
    // without credentials read and write everything until it is removed.
    let guest = request(&addr, "PUT", "/v2/keys/by-guest", "value=g");
    assert_eq!(guest.status, 201, "{}", guest.body);
    let removed = request_as_user(&addr, "DELETE", "/v2/auth/roles/guest", "", "root", "a");
    assert_eq!(removed.status, 200, "{}", removed.body);
    let anonymous = request(&addr, "GET", "/v2/keys/foo", "");
    assert_eq!(anonymous.status, 401, "{}", anonymous.body);
}
