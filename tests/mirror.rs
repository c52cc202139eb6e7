//! `etcdctl make-mirror` into Cairn: from a real etcd 3.4 (Debian's
//! /usr/bin/etcd) and from another Cairn. The mirror copies what exists
//! (a Range at one revision), then follows the source's Watch and replays
//! each revision as a Txn on the destination.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use common::etcd::{Binary, Process};
use serde_json::Value;

/// A running `etcdctl make-mirror`, killed on drop.
struct Mirror(Child);

impl Mirror {
    fn start(source: &Process, destination: &Process, extra: &[&str]) -> Mirror {
        let child = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &source.endpoint(), "make-mirror"])
            .args(extra)
            .arg(destination.endpoint())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcdctl make-mirror starts");
        Mirror(child)
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Key → value of every key under `prefix`, decoded from etcdctl's JSON.
fn contents(p: &Process, prefix: &str) -> Vec<(String, String)> {
    let out: Value = p.json(&["get", prefix, "--prefix"]);
    out["kvs"]
        .as_array()
        .map(|kvs| {
            kvs.iter()
                .map(|kv| (b64_decode(&kv["key"]), b64_decode(&kv["value"])))
                .collect()
        })
        .unwrap_or_default()
}

fn b64_decode(v: &Value) -> String {
    let text = v.as_str().unwrap_or_default();
    let bytes = BASE64
        .decode(text)
        .unwrap_or_else(|e| panic!("not base64 ({e}): {text}"));
    String::from_utf8(bytes).expect("UTF-8 test data")
}

/// Waits until the destination holds `expected` under `prefix`.
fn wait_for(destination: &Process, prefix: &str, expected: &[(String, String)]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = contents(destination, prefix);
        if got == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the mirror did not converge:\n got {got:?}\nwant {expected:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Existing keys, then puts, overwrites and deletes while the mirror runs.
fn mirror_follows(source: &Process, destination: &Process) {
    for i in 0..10 {
        source.etcdctl_ok(&["put", &format!("/m/k{i}"), &format!("v{i}")]);
    }
    source.etcdctl_ok(&["put", "other", "not mirrored"]);
    let _mirror = Mirror::start(source, destination, &["--prefix", "/m/"]);
    wait_for(destination, "/m/", &contents(source, "/m/"));

    source.etcdctl_ok(&["put", "/m/k3", "changed"]);
    source.etcdctl_ok(&["del", "/m/k4"]);
    source.etcdctl_ok(&["del", "/m/k7", "/m/k9"]);
    for i in 10..15 {
        source.etcdctl_ok(&["put", &format!("/m/k{i}"), &format!("new{i}")]);
    }
    let expected = contents(source, "/m/");
    assert_eq!(expected.len(), 12);
    wait_for(destination, "/m/", &expected);
    assert!(contents(destination, "other").is_empty());
}

#[test]
fn make_mirror_from_etcd_into_cairn() {
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Process::start_new(Binary::Etcd, &dir.path().join("etcd"));
    let cairn = Process::start_new(Binary::Cairn, &dir.path().join("cairn"));
    mirror_follows(&etcd, &cairn);
}

#[test]
fn make_mirror_from_cairn_into_cairn_with_a_new_prefix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let source = Process::start_new(Binary::Cairn, &dir.path().join("source"));
    let destination = Process::start_new(Binary::Cairn, &dir.path().join("destination"));
    mirror_follows(&source, &destination);

    // --dest-prefix rewrites the source prefix on the way.
    let _mirror = Mirror::start(
        &source,
        &destination,
        &["--prefix", "/m/", "--dest-prefix", "/copy/"],
    );
    let renamed: Vec<(String, String)> = contents(&source, "/m/")
        .into_iter()
        .map(|(k, v)| (k.replacen("/m/", "/copy/", 1), v))
        .collect();
    wait_for(&destination, "/copy/", &renamed);
}
