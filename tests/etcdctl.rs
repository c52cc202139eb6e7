//! The seed session and more, driven by the real etcdctl against a real member.

mod common;

use common::Member;
// etcdctl's JSON shows bytes as standard base64.
use common::http::b64;

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[test]
fn seed_session() {
    let m = Member::start();
    assert_eq!(m.etcdctl_ok(&["put", "key1", "v1"]), "OK\n");
    assert_eq!(m.etcdctl_ok(&["get", "key1"]), "key1\nv1\n");
    for i in 0..10 {
        assert_eq!(
            m.etcdctl_ok(&["put", &format!("key{i}"), &format!("value{i}")]),
            "OK\n"
        );
    }
    let range = m.etcdctl_ok(&["get", "key1", "key6"]);
    let expected: String = (1..6).map(|i| format!("key{i}\nvalue{i}\n")).collect();
    assert_eq!(range, expected);
    let all = m.etcdctl_ok(&["get", "key", "--prefix"]);
    let expected: String = (0..10).map(|i| format!("key{i}\nvalue{i}\n")).collect();
    assert_eq!(all, expected);

    let out = json(&m.etcdctl_ok(&["get", "key0", "-w", "json"]));
    let header = &out["header"];
    for field in ["cluster_id", "member_id", "revision", "raft_term"] {
        assert!(
            header[field].as_u64().unwrap_or(0) > 0,
            "header.{field} in {out}"
        );
    }
    // key1 once, then key0..key9: key0 is the second write, revision 3.
    assert_eq!(header["revision"], 12);
    assert_eq!(out["count"], 1);
    let kv = &out["kvs"][0];
    assert_eq!(kv["key"], b64("key0"));
    assert_eq!(kv["value"], b64("value0"));
    assert_eq!(kv["create_revision"], 3);
    assert_eq!(kv["mod_revision"], 3);
    assert_eq!(kv["version"], 1);

    let key1 = json(&m.etcdctl_ok(&["get", "key1", "-w", "json"]));
    assert_eq!(key1["kvs"][0]["create_revision"], 2);
    assert_eq!(key1["kvs"][0]["mod_revision"], 4);
    assert_eq!(key1["kvs"][0]["version"], 2);
}

#[test]
fn old_revisions_then_compaction() {
    let m = Member::start();
    m.etcdctl_ok(&["put", "k", "old"]);
    m.etcdctl_ok(&["put", "k", "new"]);
    let rev = json(&m.etcdctl_ok(&["get", "k", "-w", "json"]))["header"]["revision"]
        .as_i64()
        .unwrap_or(0);
    assert_eq!(
        m.etcdctl_ok(&["get", "k", &format!("--rev={}", rev - 1)]),
        "k\nold\n"
    );
    assert_eq!(m.etcdctl_ok(&["get", "k"]), "k\nnew\n");

    let out = m.etcdctl(&["get", "k", &format!("--rev={}", rev + 10)]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("etcdserver: mvcc: required revision is a future revision"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    assert_eq!(
        m.etcdctl_ok(&["compaction", &rev.to_string()]),
        format!("compacted revision {rev}\n")
    );
    let out = m.etcdctl(&["get", "k", &format!("--rev={}", rev - 1)]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("etcdserver: mvcc: required revision has been compacted"),
        "{stderr}"
    );
    // The compaction point itself stays readable.
    assert_eq!(
        m.etcdctl_ok(&["get", "k", &format!("--rev={rev}")]),
        "k\nnew\n"
    );
}

#[test]
fn txn_delete_and_status() {
    let m = Member::start();
    m.etcdctl_ok(&["put", "lock", "free"]);
    let script = "value(\"lock\") = \"free\"\n\nput lock taken\nput owner me\n\nput failed yes\n\n";
    let out = common::etcdctl(&m.endpoint(), &["txn"], Some(script));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "SUCCESS\n\nOK\n\nOK\n"
    );
    assert_eq!(m.etcdctl_ok(&["get", "lock"]), "lock\ntaken\n");
    // The same txn now takes the failure branch.
    let out = common::etcdctl(&m.endpoint(), &["txn"], Some(script));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "FAILURE\n\nOK\n");

    assert_eq!(
        m.etcdctl_ok(&["del", "lock", "--prev-kv"]),
        "1\nlock\ntaken\n"
    );
    assert_eq!(m.etcdctl_ok(&["del", "nothing"]), "0\n");

    let status = json(&m.etcdctl_ok(&["endpoint", "status", "-w", "json"]));
    let s = &status[0]["Status"];
    assert_eq!(s["version"], "3.4.23");
    assert_eq!(s["leader"], s["header"]["member_id"]);
    assert!(s["raftIndex"].as_u64().unwrap_or(0) >= 5, "{status}");
    assert!(s["dbSize"].as_i64().unwrap_or(0) > 0, "{status}");
    let table = m.etcdctl_ok(&["endpoint", "status"]);
    assert!(
        table.contains("3.4.23") && table.contains("true"),
        "{table}"
    );

    let members = m.etcdctl_ok(&["member", "list"]);
    assert!(
        members.contains(", started, m0, http://127.0.0.1:"),
        "{members}"
    );
}

#[test]
fn bad_input_gets_etcds_errors_and_writes_nothing() {
    let m = Member::start();
    let err = |args: &[&str]| String::from_utf8_lossy(&m.etcdctl(args).stderr).into_owned();
    assert!(err(&["put", "", "v"]).contains("etcdserver: key is not provided"));
    assert!(err(&["put", "k", "--ignore-value"]).contains("etcdserver: key not found"));
    let rev = json(&m.etcdctl_ok(&["get", "k", "-w", "json"]))["header"]["revision"].clone();
    assert_eq!(rev, 1, "no refused request wrote anything");
}
