//! The HTTP gateway on a member's client port, as curl and etcd's tools use
//! it: /v3 JSON in grpc-gateway's encoding (a streamed watch, a txn, lease
//! grant and keep-alive), refusals of bad input that write nothing,
//! /version, /metrics on the client and metrics URLs, and /health turning
//! 503 when a three-member cluster loses its quorum.

mod common;

use std::time::{Duration, Instant};

use common::Member;
use common::cluster::Cluster;
use common::http::{b64, request, stream};
use serde_json::Value;

fn revision(reply: &Value) -> i64 {
    reply["header"]["revision"]
        .as_str()
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("no revision in {reply}"))
}

#[test]
fn watch_over_http_receives_events() {
    let member = Member::start();
    let addr = member.endpoint();
    let body = format!(r#"{{"create_request": {{"key": "{}"}}}}"#, b64("watched"));
    let mut watch = stream(&addr, "/v3/watch", &body);
    assert_eq!(watch.status, 200);
    let created = watch.next_json().expect("the created response");
    assert_eq!(created["result"]["created"], Value::Bool(true), "{created}");

    for value in ["one", "two"] {
        let put = format!(
            r#"{{"key": "{}", "value": "{}"}}"#,
            b64("watched"),
            b64(value)
        );
        assert_eq!(request(&addr, "POST", "/v3/kv/put", &put).status, 200);
        let event = watch.next_json().expect("an event");
        let kv = &event["result"]["events"][0]["kv"];
        assert_eq!(kv["key"], Value::String(b64("watched")), "{event}");
        assert_eq!(kv["value"], Value::String(b64(value)), "{event}");
    }
    // A delete comes as a DELETE event (the PUT type is the default, left out).
    let delete = format!(r#"{{"key": "{}"}}"#, b64("watched"));
    assert_eq!(
        request(&addr, "POST", "/v3/kv/deleterange", &delete).status,
        200
    );
    let event = watch.next_json().expect("the delete");
    assert_eq!(event["result"]["events"][0]["type"], "DELETE", "{event}");
}

#[test]
fn json_txn_runs_the_branch_its_compare_picks() {
    let member = Member::start();
    let addr = member.endpoint();
    let put = format!(r#"{{"key": "{}", "value": "{}"}}"#, b64("k"), b64("v"));
    assert_eq!(request(&addr, "POST", "/v3/kv/put", &put).status, 200);

    // camelCase and proto field names alike, enums by name.
    let txn = |expected: &str| {
        format!(
            r#"{{"compare": [{{"key": "{k}", "result": "EQUAL", "target": "VALUE", "value": "{e}"}}],
                "success": [{{"requestRange": {{"key": "{k}"}}}}],
                "failure": [{{"request_put": {{"key": "{f}", "value": "{e}"}}}}]}}"#,
            k = b64("k"),
            e = b64(expected),
            f = b64("failed"),
        )
    };
    let reply = request(&addr, "POST", "/v3/kv/txn", &txn("v"));
    assert_eq!(reply.status, 200, "{}", reply.body);
    let reply = reply.json();
    assert_eq!(reply["succeeded"], Value::Bool(true), "{reply}");
    let kvs = &reply["responses"][0]["response_range"]["kvs"];
    assert_eq!(kvs[0]["value"], Value::String(b64("v")), "{reply}");
    assert_eq!(kvs[0]["version"], "1", "int64 as a string: {reply}");

    let reply = request(&addr, "POST", "/v3/kv/txn", &txn("other")).json();
    assert!(
        reply.get("succeeded").is_none(),
        "false is left out: {reply}"
    );
    assert!(reply["responses"][0]["response_put"].is_object(), "{reply}");
    let range = format!(r#"{{"key": "{}"}}"#, b64("failed"));
    let got = request(&addr, "POST", "/v3/kv/range", &range).json();
    assert_eq!(got["kvs"][0]["value"], Value::String(b64("other")), "{got}");
}

#[test]
fn lease_grant_and_keep_alive_over_http() {
    let member = Member::start();
    let addr = member.endpoint();
    let granted = request(&addr, "POST", "/v3/lease/grant", r#"{"TTL": 60}"#);
    assert_eq!(granted.status, 200, "{}", granted.body);
    let granted = granted.json();
    let id = granted["ID"].as_str().expect("an ID").to_string();
    assert_eq!(granted["TTL"], "60", "{granted}");

    let mut keep_alive = stream(&addr, "/v3/lease/keepalive", &format!(r#"{{"ID": {id}}}"#));
    assert_eq!(keep_alive.status, 200);
    let renewed = keep_alive.next_json().expect("a keep-alive response");
    assert_eq!(
        renewed["result"]["ID"],
        Value::String(id.clone()),
        "{renewed}"
    );
    assert_eq!(renewed["result"]["TTL"], "60", "{renewed}");
    // The client closed its side after one request: so does the stream.
    assert!(keep_alive.next_json().is_none());

    let ttl = request(
        &addr,
        "POST",
        "/v3/kv/lease/timetolive",
        &format!(r#"{{"ID": "{id}"}}"#),
    )
    .json();
    assert_eq!(ttl["grantedTTL"], "60", "{ttl}");
    let revoked = request(
        &addr,
        "POST",
        "/v3/lease/revoke",
        &format!(r#"{{"ID": {id}}}"#),
    );
    assert_eq!(revoked.status, 200, "{}", revoked.body);
    let again = request(
        &addr,
        "POST",
        "/v3/lease/revoke",
        &format!(r#"{{"ID": {id}}}"#),
    );
    assert_eq!(again.status, 404, "{}", again.body);
    assert_eq!(
        again.json()["error"],
        "etcdserver: requested lease not found"
    );
}

#[test]
fn bad_input_gets_400_and_writes_nothing() {
    let member = Member::start();
    let addr = member.endpoint();
    let before = revision(&request(&addr, "POST", "/v3/kv/range", r#"{"key": "AA=="}"#).json());
    for body in [
        r#"{"key": "Zm9v", "value": "YmFy""#.to_string(),
        r#"{"key": "!!!", "value": "YmFy"}"#.to_string(),
        r#"{"key": "Zm9v", "vaule": "YmFy"}"#.to_string(),
        r#"{"key": "Zm9v", "lease": "seven"}"#.to_string(),
        "[]".to_string(),
    ] {
        let reply = request(&addr, "POST", "/v3/kv/put", &body);
        assert_eq!(reply.status, 400, "{body}: {}", reply.body);
        let error = reply.json();
        assert_eq!(error["code"], 3, "{error}");
        assert!(
            error["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{error}"
        );
        assert_eq!(error["error"], error["message"], "{error}");
    }
    // etcd's own validation, through the same error shape.
    let reply = request(&addr, "POST", "/v3/kv/put", r#"{"value": "YmFy"}"#);
    assert_eq!(reply.status, 400);
    assert_eq!(reply.json()["error"], "etcdserver: key is not provided");
    let after = revision(&request(&addr, "POST", "/v3/kv/range", r#"{"key": "AA=="}"#).json());
    assert_eq!(before, after, "a refused request wrote something");
    // Unknown routes and methods.
    assert_eq!(request(&addr, "POST", "/v3/kv/nothing", "{}").status, 404);
    assert_eq!(request(&addr, "GET", "/v3/kv/range", "").status, 405);
}

/// etcd's grpc-gateway calls its own gRPC server, so its /v3 calls count in
/// grpc_server_handled_total; /health's checks do not.
#[test]
fn gateway_calls_count_as_grpc_calls() {
    let member = Member::start();
    let addr = member.endpoint();
    let put = format!(r#"{{"key": "{}", "value": "{}"}}"#, b64("k"), b64("v"));
    for _ in 0..3 {
        assert_eq!(request(&addr, "POST", "/v3/kv/put", &put).status, 200);
    }
    assert_eq!(request(&addr, "GET", "/health", "").status, 200);
    let metrics = request(&addr, "GET", "/metrics", "").body;
    let line = |method: &str| {
        format!(
            "grpc_server_handled_total{{grpc_code=\"OK\",grpc_method=\"{method}\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"}} "
        )
    };
    assert!(
        metrics.contains(&format!("{}3\n", line("Put"))),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!("{}0\n", line("Range"))),
        "{metrics}"
    );
}

#[test]
fn version_metrics_and_the_metrics_url() {
    let metrics_port = common::free_port();
    let metrics_url = format!("http://127.0.0.1:{metrics_port}");
    let member = Member::start_with(&["--listen-metrics-urls", &metrics_url]);
    let addr = member.endpoint();
    let version = request(&addr, "GET", "/version", "").json();
    assert_eq!(version["etcdserver"], "3.4.23", "{version}");
    assert_eq!(version["etcdcluster"], "3.4.0", "{version}");
    // v3beta is an alias of v3.
    let put = format!(r#"{{"key": "{}", "value": "{}"}}"#, b64("m"), b64("v"));
    assert_eq!(request(&addr, "POST", "/v3beta/kv/put", &put).status, 200);
    member.etcdctl_ok(&["put", "grpc", "counted"]);

    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    for target in [addr.as_str(), metrics_addr.as_str()] {
        let metrics = request(target, "GET", "/metrics", "");
        assert_eq!(metrics.status, 200);
        let text = metrics.body;
        for expected in [
            "etcd_server_has_leader 1",
            "etcd_mvcc_put_total 2",
            "etcd_debugging_mvcc_keys_total 2",
            // The gateway's put and etcdctl's.
            "grpc_server_handled_total{grpc_code=\"OK\",grpc_method=\"Put\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"} 2",
            "grpc_server_msg_received_total{grpc_method=\"Put\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"} 2",
            "grpc_server_msg_sent_total{grpc_method=\"Put\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"} 2",
            "etcd_server_version{server_version=\"3.4.23\"} 1",
            "process_resident_memory_bytes ",
            "etcd_server_leader_changes_seen_total 1",
            "etcd_server_proposals_pending 0",
        ] {
            assert!(
                text.contains(expected),
                "{expected:?} missing from:\n{text}"
            );
        }
        let fsyncs: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("etcd_disk_wal_fsync_duration_seconds_count "))
            .and_then(|n| n.parse().ok())
            .expect("an fsync count");
        assert!(fsyncs > 0, "the raft log was never fsynced?");
        let health = request(target, "GET", "/health", "");
        assert_eq!(
            (health.status, health.body.as_str()),
            (200, r#"{"health":"true"}"#)
        );
    }
    // The metrics URL serves nothing else.
    assert_eq!(request(&metrics_addr, "GET", "/version", "").status, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn health_turns_503_when_a_cluster_loses_quorum() {
    let mut cluster = Cluster::start(3);
    cluster.wait_leader(Duration::from_secs(10)).await;
    for i in 0..3 {
        let health = request(&cluster.endpoint(i), "GET", "/health", "");
        assert_eq!(
            (health.status, health.body.as_str()),
            (200, r#"{"health":"true"}"#)
        );
    }
    cluster.kill(1);
    cluster.kill(2);
    let endpoint = cluster.endpoint(0);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let health = tokio::task::spawn_blocking({
            let endpoint = endpoint.clone();
            move || request(&endpoint, "GET", "/health", "")
        })
        .await
        .expect("the request");
        if health.status == 503 {
            // etcd 3.4's body, exactly; the reason in a header.
            assert_eq!(health.body.trim_end(), r#"{"health":"false"}"#);
            assert!(
                health
                    .header("x-cairn-health-reason")
                    .is_some_and(|r| !r.is_empty()),
                "{:?}",
                health.headers
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still healthy without quorum: {} {}",
            health.status,
            health.body
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
