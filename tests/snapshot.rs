//! Snapshots in etcd's format, between Cairn and a real etcd 3.4 (Debian's
//! /usr/bin/etcd): etcd's snapshot restored into Cairn (`cairn snapshot
//! restore`, and an etcd data dir migrated in place), Cairn's restored into
//! etcd, with every key, revision, the compaction and leases intact.

mod common;

use std::path::Path;

use common::etcd::{Binary, Plan, Process, cairn_ok, etcdctl_local};
use serde_json::Value;

/// History written before a snapshot, and what must survive it.
struct Written {
    /// The lease ID, hex.
    lease: String,
    compact: i64,
    /// A revision between the compaction and the head.
    middle: i64,
    before: State,
}

/// Writes history: puts, overwrites, a delete, a leased key, a compaction,
/// a big value.
fn populate(p: &Process) -> Written {
    for i in 0..20 {
        p.etcdctl_ok(&["put", &format!("k{i:02}"), &format!("v{i}")]);
    }
    p.etcdctl_ok(&["put", "k01", "v1-again"]);
    p.etcdctl_ok(&["del", "k02"]);
    let grant = p.etcdctl_ok(&["lease", "grant", "600"]);
    let lease = grant
        .split_whitespace()
        .nth(1)
        .expect("lease ID in the grant output")
        .to_string();
    p.etcdctl_ok(&["put", "leased", "x", "--lease", &lease]);
    p.etcdctl_ok(&["compact", "10"]);
    p.etcdctl_ok(&["put", "k03", "v3-after-compaction"]);
    p.etcdctl_ok(&["put", "big", &"b".repeat(20_000)]);
    let middle = revision(p) - 3;
    Written {
        lease,
        compact: 10,
        middle,
        before: state(p, middle),
    }
}

fn revision(p: &Process) -> i64 {
    p.json(&["get", "nothing-here"])["header"]["revision"]
        .as_i64()
        .expect("header revision")
}

/// What must survive a snapshot: every key at the head and at `middle`,
/// the head revision, the compaction and the lease with its key.
struct State {
    head: Value,
    middle: Value,
    revision: i64,
}

fn state(p: &Process, middle: i64) -> State {
    State {
        head: p.json(&["get", "", "--prefix"])["kvs"].clone(),
        middle: p.json(&["get", "", "--prefix", "--rev", &middle.to_string()])["kvs"].clone(),
        revision: revision(p),
    }
}

fn check_restored(p: &Process, written: &Written) {
    let Written {
        lease,
        compact,
        middle,
        before,
    } = written;
    let after = state(p, *middle);
    assert_eq!(after.revision, before.revision, "head revision");
    assert_eq!(after.head, before.head, "keys at the head");
    assert_eq!(after.middle, before.middle, "keys at revision {middle}");
    let below = p.etcdctl_err(&["get", "k01", "--rev", &(compact - 1).to_string()]);
    assert!(
        below.contains("required revision has been compacted"),
        "{below}"
    );
    let ttl = p.json(&["lease", "timetolive", lease.as_str(), "--keys"]);
    assert_eq!(ttl["granted-ttl"], 600, "{ttl}");
    assert!(ttl["ttl"].as_i64().is_some_and(|t| t > 0), "{ttl}");
    // "leased", base64.
    assert_eq!(ttl["keys"], serde_json::json!(["bGVhc2Vk"]), "{ttl}");
    // Writes go on from the restored revision.
    let put = p.json(&["put", "new", "value"]);
    assert_eq!(put["header"]["revision"], before.revision + 1);
}

fn save(p: &Process, file: &Path) {
    let out = p.etcdctl_ok(&["snapshot", "save", &file.to_string_lossy()]);
    assert!(out.contains("Snapshot saved at"), "{out}");
}

#[test]
fn etcd_snapshot_restores_into_cairn() {
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Process::start_new(Binary::Etcd, dir.path());
    let written = populate(&etcd);
    let file = dir.path().join("etcd.snapshot");
    save(&etcd, &file);
    drop(etcd);

    let plan = Plan::new("restored");
    let data = dir.path().join("cairn");
    let args = plan.restore_args(&file, &data);
    let log = cairn_ok(&args);
    assert!(log.contains("added member"), "{log}");
    let cairn = plan.start(Binary::Cairn, &data);
    check_restored(&cairn, &written);
    let members = cairn.etcdctl_ok(&["member", "list"]);
    assert!(
        members.contains("restored") && members.contains(&plan.peer_url()),
        "{members}"
    );
}

#[test]
fn etcd_data_dir_migrates_into_cairn_in_place() {
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Process::start_new(Binary::Etcd, dir.path());
    let written = populate(&etcd);
    let file = dir.path().join("etcd.snapshot");
    save(&etcd, &file);
    drop(etcd);

    // etcd's own restore writes etcd's data dir (member/snap/db, member/wal);
    // cairn started on it migrates it.
    let plan = Plan::new("migrated");
    let data = dir.path().join("etcd-restored");
    let args = plan.restore_args(&file, &data);
    let restore_log = etcdctl_local(&args);
    let cairn = plan.start(Binary::Cairn, &data);
    assert!(
        cairn.log_text().contains("migrating it"),
        "{}",
        cairn.log_text()
    );
    check_restored(&cairn, &written);
    // The member ID is the one etcd's restore gave it (read from its WAL).
    let id = restore_log
        .split("\"added-peer-id\":\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("etcdctl logs the member it added")
        .to_string();
    let listed = cairn.etcdctl_ok(&["member", "list"]);
    assert!(
        listed.starts_with(&format!("{id}, started, migrated")),
        "{listed}"
    );
}

#[test]
fn cairn_snapshot_restores_into_etcd() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cairn = Process::start_new(Binary::Cairn, dir.path());
    let written = populate(&cairn);
    let file = dir.path().join("cairn.snapshot");
    save(&cairn, &file);
    drop(cairn);

    let status = etcdctl_local(&[
        "snapshot".into(),
        "status".into(),
        file.to_string_lossy().into_owned(),
        "-w".into(),
        "json".into(),
    ]);
    let status: Value =
        serde_json::from_str(status.lines().next().unwrap_or_default()).expect("status JSON");
    // The newest stored revision; the keys include every stored revision
    // and the other buckets' records.
    assert_eq!(status["revision"], written.before.revision, "{status}");
    assert!(
        status["totalKey"].as_i64().is_some_and(|n| n > 20),
        "{status}"
    );

    let plan = Plan::new("etcd-restored");
    let data = dir.path().join("etcd");
    let args = plan.restore_args(&file, &data);
    etcdctl_local(&args);
    let etcd = plan.start(Binary::Etcd, &data);
    check_restored(&etcd, &written);
}

#[test]
fn a_damaged_snapshot_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cairn = Process::start_new(Binary::Cairn, dir.path());
    cairn.etcdctl_ok(&["put", "a", "1"]);
    let file = dir.path().join("cairn.snapshot");
    save(&cairn, &file);
    let mut bytes = std::fs::read(&file).expect("read");
    bytes[5000] ^= 0xff;
    std::fs::write(&file, bytes).expect("write");

    let plan = Plan::new("x");
    let data = dir.path().join("restored");
    let args = plan.restore_args(&file, &data);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(&args)
        .output()
        .expect("cairn runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("expected sha256"), "{stderr}");
    assert!(!data.exists(), "nothing left behind");
}

/// etcd commits its database in batches; a member killed between two
/// holds its last acknowledged writes only in its WAL, which the migration
/// replays as etcd's next start would. The batch is made to outlast the
/// test, so the writes after the compaction (which commits) are WAL-only.
#[test]
fn a_killed_etcd_members_data_dir_migrates_into_cairn_with_its_wal_tail() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plan = Plan::new("live");
    let data = dir.path().join("data");
    let etcd = plan.start_with(
        Binary::Etcd,
        &data,
        &[
            "--backend-batch-interval",
            "1h",
            "--backend-batch-limit",
            "1000000",
        ],
    );
    let written = populate(&etcd);
    let id = etcd.json(&["endpoint", "status"])[0]["Status"]["header"]["member_id"]
        .as_u64()
        .expect("member ID");
    // SIGKILL.
    drop(etcd);

    let cairn = plan.start(Binary::Cairn, &data);
    let log = cairn.log_text();
    assert!(log.contains("migrating it"), "{log}");
    let replayed: u64 = log
        .split("replayed=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count of replayed writes in {log}"));
    assert!(replayed >= 2, "the puts after the compaction: {log}");
    check_restored(&cairn, &written);
    let listed = cairn.etcdctl_ok(&["member", "list"]);
    assert!(
        listed.starts_with(&format!("{id:x}, started, live")),
        "{listed}"
    );
}
