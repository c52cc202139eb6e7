//! Corruption checks across members: a member whose stored data was altered
//! behind Cairn's back (as etcd's e2e test alters a member's bolt file) is
//! refused at start by --experimental-initial-corrupt-check, and caught by
//! the leader's periodic check (--experimental-corrupt-check-time), which
//! raises the CORRUPT alarm that stops writes. A flipped bit in a member's
//! raft log, or in its store's tables or journal, makes it refuse to start;
//! the cluster rebuilds it.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use etcd_client::{AlarmAction, AlarmType};

/// Alters the last byte of every stored revision's value (the value is the
/// last field of a stored KeyValue without a lease), as the member's own
/// store would never write it. The member must be stopped.
fn corrupt_values(data_dir: &Path) {
    let db = fjall::Database::builder(data_dir.join("member/kv"))
        .open()
        .expect("open the member's store");
    let revisions = db
        .keyspace("revisions", fjall::KeyspaceCreateOptions::default)
        .expect("the revisions keyspace");
    let mut altered = Vec::new();
    for entry in revisions.iter() {
        let (key, value) = entry.into_inner().expect("read a revision");
        let mut value = value.to_vec();
        if let Some(last) = value.last_mut() {
            *last = last.wrapping_add(1);
        }
        altered.push((key.to_vec(), value));
    }
    assert!(!altered.is_empty(), "nothing stored to corrupt");
    for (key, value) in altered {
        revisions.insert(key, value).expect("rewrite a revision");
    }
    db.persist(fjall::PersistMode::SyncAll).expect("persist");
}

async fn put_keys(cluster: &Cluster) {
    let mut client = cluster.client(0).await;
    for i in 0..10 {
        client
            .put(format!("foo{i:05}"), format!("v{i:05}"), None)
            .await
            .expect("put");
    }
    // Every member applies them before one is stopped.
    tokio::time::sleep(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_member_is_refused_at_start() {
    let mut cluster = Cluster::start_with(3, &["--experimental-initial-corrupt-check"]);
    put_keys(&cluster).await;
    let id = cluster.node(0).id;
    cluster.kill(0);
    corrupt_values(&cluster.node(0).data_dir);
    let (status, log) = cluster.restart_expecting_exit(0);
    assert!(!status.success(), "the corrupted member started:\n{log}");
    assert!(
        log.contains(&format!(
            "etcdmain: {id:016x} found data inconsistency with peers"
        )),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leaders_periodic_check_raises_the_corrupt_alarm() {
    let mut cluster = Cluster::start_with(3, &["--experimental-corrupt-check-time", "1s"]);
    put_keys(&cluster).await;
    // A follower: the leader checks the others.
    let mut client = cluster.client(0).await;
    let leader = client.status().await.expect("status").leader();
    let follower = (0..3)
        .find(|&i| cluster.node(i).id != leader)
        .expect("a follower");
    let id = cluster.node(follower).id;
    cluster.kill(follower);
    corrupt_values(&cluster.node(follower).data_dir);
    cluster.restart(follower);

    let deadline = Instant::now() + Duration::from_secs(20);
    let leader_index = cluster.index_of(leader).expect("the leader is a member");
    let mut client = cluster.client(leader_index).await;
    loop {
        let alarms = client
            .alarm(AlarmAction::Get, AlarmType::None, None)
            .await
            .expect("alarm list");
        let raised: Vec<(u64, i32)> = alarms
            .alarms()
            .iter()
            .map(|a| (a.member_id(), a.alarm() as i32))
            .collect();
        if !raised.is_empty() {
            assert_eq!(raised, vec![(id, AlarmType::Corrupt as i32)]);
            break;
        }
        assert!(Instant::now() < deadline, "no CORRUPT alarm within 20 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    match client.put("after", "x", None).await {
        Err(etcd_client::Error::GRpcStatus(s)) => {
            assert_eq!(s.message(), "etcdserver: corrupt cluster")
        }
        other => panic!("a write under CORRUPT: {other:?}"),
    }
}

/// Flips one bit in the middle of a member's last raft log segment. The
/// member must be stopped.
fn rot_raft_log(data_dir: &Path) {
    let wal = data_dir.join("member/raft/wal");
    let mut segments: Vec<_> = std::fs::read_dir(&wal)
        .expect("the member's raft log")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .collect();
    segments.sort();
    flip_a_middle_bit(&segments.pop().expect("a segment"));
}

/// Flips one bit halfway through what `file` holds before its zeroed tail.
fn flip_a_middle_bit(file: &Path) {
    let mut bytes = std::fs::read(file).expect("read the file");
    let written = bytes.iter().rposition(|&b| b != 0).expect("records") + 1;
    bytes[written / 2] ^= 0x04;
    std::fs::write(file, bytes).expect("write the file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bit_rot_in_the_raft_log_is_refused_and_the_cluster_rebuilds_the_member() {
    let mut cluster = Cluster::start(3);
    put_keys(&cluster).await;
    cluster.kill(0);
    rot_raft_log(&cluster.node(0).data_dir);
    let (status, log) = cluster.restart_expecting_exit(0);
    assert!(
        !status.success(),
        "a member with a damaged log started:\n{log}"
    );
    assert!(log.contains("fails its checksum"), "{log}");

    rebuild_member_0(&mut cluster).await;
}

/// Moves everything a stopped member's store keeps in fjall's journal into
/// its tables (SSTs), then flips one bit in the middle of each table of the
/// revisions keyspace; returns the files it changed.
fn rot_store_tables(data_dir: &Path) -> Vec<std::path::PathBuf> {
    let kv = data_dir.join("member/kv");
    {
        let db = fjall::Database::builder(&kv)
            .open()
            .expect("open the member's store");
        let revisions = db
            .keyspace("revisions", fjall::KeyspaceCreateOptions::default)
            .expect("the revisions keyspace");
        revisions
            .rotate_memtable_and_wait()
            .expect("flush the revisions to a table");
        db.persist(fjall::PersistMode::SyncAll).expect("persist");
    }
    let mut files = Vec::new();
    let mut dirs = vec![kv];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("read the store's directory") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                files.push(path);
            }
        }
    }
    let tables: Vec<_> = files
        .into_iter()
        .filter(|f| f.components().any(|c| c.as_os_str() == "tables"))
        .collect();
    for table in &tables {
        let mut bytes = std::fs::read(table).expect("read a table");
        let at = bytes.len() / 2;
        bytes[at] ^= 0x04;
        std::fs::write(table, bytes).expect("write a table");
    }
    tables
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bit_rot_in_the_stores_tables_is_refused_and_the_cluster_rebuilds_the_member() {
    let mut cluster = Cluster::start(3);
    put_keys(&cluster).await;
    cluster.kill(0);
    let rotted = rot_store_tables(&cluster.node(0).data_dir);
    assert!(!rotted.is_empty(), "no table to rot");
    refused_then_rebuilt(&mut cluster, "Storage(ChecksumMismatch").await;
}

/// Restarts member 0, whose store was damaged: it must refuse to start,
/// saying why; then removes it and adds a fresh member, which must catch up
/// from the others.
async fn refused_then_rebuilt(cluster: &mut Cluster, why: &str) {
    let (status, log) = cluster.restart_expecting_exit(0);
    assert!(
        !status.success(),
        "a member with a damaged store started:\n{log}"
    );
    assert!(
        log.contains("opening the key-value store") && log.contains(why),
        "{log}"
    );
    rebuild_member_0(cluster).await;
}

/// The way back for a member that refuses its damaged data: remove it, and
/// add a fresh member that catches up from the others.
async fn rebuild_member_0(cluster: &mut Cluster) {
    // A leader elected when member 0 went down drops a membership change
    // until it has applied what it inherited (raft's pending conf change
    // rule, as in etcd): let it commit a write first.
    let mut client = cluster.client(1).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while client.put("settled", "1", None).await.is_err() {
        assert!(Instant::now() < deadline, "members 1 and 2 take no write");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cluster.remove_member(0);
    let fresh = cluster.add_member("m0-rebuilt", false);
    let dump = cluster
        .wait_converged(&[1, 2, fresh], Duration::from_secs(20))
        .await;
    assert!(
        (0..10).all(|i| dump.kvs.contains_key(&format!("foo{i:05}"))),
        "the rebuilt member lacks keys: {dump:?}"
    );
}

/// Flips one bit in the middle of a stopped member's store journal (fjall's
/// write-ahead log, which holds what is not yet in tables).
fn rot_store_journal(data_dir: &Path) {
    flip_a_middle_bit(&data_dir.join("member/kv/0.jnl"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bit_rot_in_the_stores_journal_is_refused_and_the_cluster_rebuilds_the_member() {
    let mut cluster = Cluster::start(3);
    put_keys(&cluster).await;
    cluster.kill(0);
    rot_store_journal(&cluster.node(0).data_dir);
    // fjall forgives a torn last batch, not a damaged one before it.
    refused_then_rebuilt(&mut cluster, "JournalRecovery(ChecksumMismatch)").await;
}
