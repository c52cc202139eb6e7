//! Corruption checks across members: a member whose stored data was altered
//! behind Cairn's back (as etcd's e2e test alters a member's bolt file) is
//! refused at start by --experimental-initial-corrupt-check, and caught by
//! the leader's periodic check (--experimental-corrupt-check-time), which
//! raises the CORRUPT alarm that stops writes. A flipped bit in a member's
//! raft log, or in its store's tables or journal, makes it refuse to start;
//! the cluster rebuilds it. Damaged while the member runs, its tables are
//! never served wrong: the first read that reaches a damaged block is
//! refused and the member stops, saying how to repair it; the others serve
//! on, and the member refuses to start again.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::cluster::{Cluster, Dump};
use common::rng::Rng;
use etcd_client::{AlarmAction, AlarmType, GetOptions, Txn, TxnOp};

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

/// Flips one bit halfway through what `file` holds before its zeroed tail,
/// in place: a member that runs goes on writing the file meanwhile.
fn flip_a_middle_bit(file: &Path) {
    let bytes = std::fs::read(file).expect("read the file");
    let written = bytes.iter().rposition(|&b| b != 0).expect("records") + 1;
    flip_in_place(file, written as u64 / 2);
}

/// Flips one bit of the byte at `at` of `file`, through a descriptor of its
/// own: whatever has the file open sees it on its next read from the disk.
/// False if the file is gone or shorter.
fn flip_in_place(file: &Path, at: u64) -> bool {
    use std::os::unix::fs::FileExt as _;
    let Ok(f) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
    else {
        return false;
    };
    let mut byte = [0u8];
    if f.read_exact_at(&mut byte, at).is_err() {
        return false;
    }
    byte[0] ^= 0x04;
    f.write_all_at(&byte, at).expect("write a byte back");
    true
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

    rebuild_member_0(&mut cluster, &foo_keys()).await;
}

/// Moves everything a stopped member's store keeps in fjall's journal into
/// its tables (SSTs), then flips one bit in the middle of each table of the
/// revisions keyspace; returns the files it changed.
fn rot_store_tables(data_dir: &Path) -> Vec<PathBuf> {
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
    let tables = store_tables(data_dir);
    for table in &tables {
        let mut bytes = std::fs::read(table).expect("read a table");
        let at = bytes.len() / 2;
        bytes[at] ^= 0x04;
        std::fs::write(table, bytes).expect("write a table");
    }
    tables
}

/// Every table file (SST) of a member's store.
fn store_tables(data_dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![data_dir.join("member/kv")];
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
    files
        .into_iter()
        .filter(|f| f.components().any(|c| c.as_os_str() == "tables"))
        .collect()
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
    rebuild_member_0(cluster, &foo_keys()).await;
}

/// The keys `put_keys` wrote.
fn foo_keys() -> Vec<String> {
    (0..10).map(|i| format!("foo{i:05}")).collect()
}

/// The way back for a member that refuses its damaged data: remove it, and
/// add a fresh member that catches up from the others; it must hold `keys`.
async fn rebuild_member_0(cluster: &mut Cluster, keys: &[String]) -> Dump {
    rebuild_member(cluster, 0, keys).await
}

/// [`rebuild_member_0`] for member `damaged` of three.
async fn rebuild_member(cluster: &mut Cluster, damaged: usize, keys: &[String]) -> Dump {
    let others: Vec<usize> = (0..3).filter(|&i| i != damaged).collect();
    // A leader elected when the member went down drops a membership change
    // until it has applied what it inherited (raft's pending conf change
    // rule, as in etcd): let it commit a write first.
    let mut client = cluster.client(others[0]).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while client.put("settled", "1", None).await.is_err() {
        assert!(Instant::now() < deadline, "the other members take no write");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cluster.remove_member(damaged);
    let fresh = cluster.add_member(&format!("m{damaged}-rebuilt"), false);
    let dump = cluster
        .wait_converged(&[others[0], others[1], fresh], Duration::from_secs(20))
        .await;
    let missing: Vec<&String> = keys.iter().filter(|k| !dump.kvs.contains_key(*k)).collect();
    assert!(
        missing.is_empty(),
        "the rebuilt member lacks keys: {missing:?}"
    );
    dump
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

/// How many keys the running member's test writes: about 2 MB of values,
/// far less than fjall's block cache, so the test must keep the blocks out
/// of the cache (see below) rather than push them out.
const ROT_KEYS: usize = 3000;

fn rot_key(i: usize) -> String {
    format!("rot/{i:05}")
}

/// 640 hex digits, unique to `i`: compression cannot fold the values into
/// a few blocks.
fn rot_value(i: usize) -> String {
    let mut rng = Rng(i as u64 + 1);
    (0..80)
        .map(|_| format!("{:08x}", rng.next() as u32))
        .collect()
}

/// Damages the files of a running member: one bit in about every 32 KiB of
/// each of its store's tables (about one data block in eight), at random
/// offsets; its raft log is left sound, so that what refuses its restart is
/// what it found in its store. Returns how many bytes it changed.
fn rot_a_running_member(data_dir: &Path, rng: &mut Rng) -> usize {
    let mut flipped = 0;
    for table in store_tables(data_dir) {
        let Ok(len) = std::fs::metadata(&table).map(|m| m.len()) else {
            continue; // compacted away meanwhile
        };
        for start in (0..len).step_by(32 << 10) {
            let at = start + rng.below((32 << 10).min(len - start));
            if flip_in_place(&table, at) {
                flipped += 1;
            }
        }
    }
    flipped
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bit_rot_under_a_running_member_is_never_served_and_the_cluster_rebuilds_the_member() {
    let mut cluster = Cluster::start(3);
    // Written after m0 started: the index rebuild at its start read every
    // revision it had then through fjall's block cache; these are read
    // from the files, once they are in tables.
    let mut client = cluster.client(0).await;
    let mut revision = 0;
    for chunk in (0..ROT_KEYS).collect::<Vec<_>>().chunks(100) {
        let puts: Vec<TxnOp> = chunk
            .iter()
            .map(|&i| TxnOp::put(rot_key(i), rot_value(i), None))
            .collect();
        let txn = client
            .txn(Txn::new().and_then(puts))
            .await
            .expect("a txn of puts");
        revision = txn.header().expect("a header").revision();
    }
    // m0 applied them (its status reads no key), then its memtables go to
    // tables, which nothing has read yet.
    let deadline = Instant::now() + Duration::from_secs(20);
    while cluster
        .status(0)
        .await
        .ok()
        .and_then(|s| s.header().map(|h| h.revision()))
        .is_none_or(|r| r < revision)
    {
        assert!(Instant::now() < deadline, "m0 did not apply the puts");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.etcdctl_ok(0, &["defrag"]);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let flipped = rot_a_running_member(&cluster.node(0).data_dir, &mut Rng(seed));
    assert!(flipped > 0, "m0 has no table to damage");

    // Every key from m0's own store, one at a time: the right value, until
    // a read reaches a damaged block; that one is refused as Unavailable
    // (which sends an etcd client's retry to another member), and m0 stops.
    let mut c0 = cluster.client(0).await;
    let (mut right, mut refused) = (0, None);
    for i in 0..ROT_KEYS {
        let key = rot_key(i);
        match c0
            .get(key.as_str(), Some(GetOptions::new().with_serializable()))
            .await
        {
            Ok(got) => {
                let values: Vec<&[u8]> = got.kvs().iter().map(|kv| kv.value()).collect();
                assert_eq!(
                    values,
                    vec![rot_value(i).as_bytes()],
                    "m0 answered {key} wrongly (seed {seed})"
                );
                right += 1;
            }
            Err(e) => {
                refused = Some(e.to_string());
                break;
            }
        }
    }
    eprintln!(
        "seed {seed}: {flipped} bytes of m0's tables damaged; {right} keys read right, then \
         {refused:?}"
    );
    let refused = refused.unwrap_or_else(|| {
        panic!("no read reached a damaged block: the test proves nothing (seed {seed})")
    });
    assert!(
        refused.contains("Unavailable") && refused.contains("mvcc store damaged"),
        "{refused}"
    );
    // m0 exits by itself, non-zero, saying what was found and what to do.
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = cluster.exit_status(0) {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "m0 still runs 30 s after it found its store damaged"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!status.success(), "m0 stopped on damage with {status}");
    let log = cluster.log_text(0);
    let says = |log: &str| {
        log.contains("the member's store is damaged (mvcc store damaged: ")
            && log.contains("etcdctl member remove")
            && log.contains("member add")
    };
    assert!(says(&log), "m0's log does not say what happened:\n{log}");

    // The others serve every key, and take writes (once they have elected
    // a leader, if m0 was it).
    let mut c1 = cluster.client(1).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while let Err(e) = c1.put("after-rot", "1", None).await {
        assert!(Instant::now() < deadline, "m1 takes no write: {e}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for m in [1, 2] {
        let dump = cluster.dump(m, false).await.expect("a range of m1 or m2");
        for i in 0..ROT_KEYS {
            assert_eq!(
                dump.kvs.get(&rot_key(i)).map(|v| v.0.as_str()),
                Some(rot_value(i).as_str()),
                "m{m} lost {}",
                rot_key(i)
            );
        }
    }

    // Restarted, the damaged member refuses to start, saying why again.
    cluster.end(0);
    let (status, log) = cluster.restart_expecting_exit(0);
    assert!(!status.success(), "the damaged member started:\n{log}");
    assert!(says(&log), "{log}");
    let mut keys: Vec<String> = (0..ROT_KEYS).map(rot_key).collect();
    keys.push("after-rot".into());
    let dump = rebuild_member_0(&mut cluster, &keys).await;
    assert!(
        (0..ROT_KEYS).all(|i| dump.kvs[&rot_key(i)].0 == rot_value(i)),
        "the rebuilt member holds wrong values"
    );
}

/// Puts `n` keys `prefix/NNNN` through member `i`, four writers at once;
/// returns them.
async fn put_many(cluster: &Cluster, i: usize, prefix: &str, n: usize) -> Vec<String> {
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..4 {
        let mut client = cluster.client(i).await;
        let prefix = prefix.to_string();
        writers.spawn(async move {
            for k in (w..n).step_by(4) {
                let key = format!("{prefix}/{k:04}");
                client
                    .put(key.as_str(), format!("v{k}"), None)
                    .await
                    .unwrap_or_else(|e| panic!("put {key}: {e}"));
            }
        });
    }
    while let Some(done) = writers.join_next().await {
        done.expect("a writer panicked");
    }
    (0..n).map(|k| format!("{prefix}/{k:04}")).collect()
}

/// A value the snapshot tests look for in the snapshot a member receives.
const ROT_TARGET: &str = "the-value-to-rot";

/// A bit flipped in a value: the snapshot still decodes, to a wrong value
/// ("phe-value-to-rot"); only the checksum at its end can tell.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_whose_value_rotted_after_its_arrival_is_refused_and_the_member_rebuilt() {
    snapshot_damaged_after_its_arrival(Some(ROT_TARGET), "checksum").await;
}

/// A bit flipped in the middle of the file, in a record's framing or its
/// encoded fields: refused as it is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_damaged_mid_file_after_its_arrival_is_refused_and_the_member_rebuilt() {
    snapshot_damaged_after_its_arrival(None, "invalid mvcc snapshot").await;
}

/// A follower that fell behind the leader's compacted log gets a snapshot,
/// whole (the transport's size and CRC-32 checks pass), which the shim then
/// damages at rest before the store restores it (at `pattern`, or in the
/// middle). The member must refuse it (`why` says how it noticed) and
/// stop; refuse to start again, saying what to do; and the cluster must
/// rebuild it, every acknowledged key there.
async fn snapshot_damaged_after_its_arrival(pattern: Option<&str>, why: &str) {
    let shim_dir = tempfile::tempdir().expect("a temp dir");
    let Some(shim) = common::snapshot_rot::build_shim(shim_dir.path()) else {
        eprintln!("skipped: no C compiler to build the snapshot-rot shim");
        return;
    };
    // The leader compacts its log every 50 entries, keeping 50 for slow
    // followers: a follower 400 entries behind can only get a snapshot.
    let mut cluster = Cluster::start_with(3, &["--snapshot-count", "50"]);
    let leader = cluster.wait_leader(Duration::from_secs(10)).await;
    let behind = (leader + 1) % 3;
    let mut keys = put_many(&cluster, leader, "before", 20).await;
    cluster.kill(behind);
    keys.extend(put_many(&cluster, leader, "missed", 400).await);
    let mut client = cluster.client(leader).await;
    client
        .put("rot-target", ROT_TARGET, None)
        .await
        .expect("put the value to rot");

    cluster.set_env(behind, common::snapshot_rot::env(&shim, pattern));
    let (status, log) = cluster.restart_expecting_exit(behind);
    let said = |log: &str| -> String {
        log.lines()
            .filter(|l| l.contains("snapshot") || l.contains("stopping"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        log.contains(common::snapshot_rot::DAMAGED),
        "the shim damaged no snapshot of m{behind}:\n{log}"
    );
    eprintln!("m{behind} on the damaged snapshot:\n{}", said(&log));
    assert!(
        !status.success(),
        "m{behind} exited with {status} after restoring a damaged snapshot"
    );
    // The store refused it and stayed as it was; the member stopped
    // rather than serve on from there.
    assert!(
        log.contains("mvcc snapshot restore failed; the store is unchanged")
            && log.contains("restoring snapshot")
            && log.contains(why),
        "m{behind} does not say it refused the snapshot ({why}):\n{}",
        said(&log)
    );

    // Its raft log had been reset to the snapshot: started again (without
    // the shim), it refuses its store, which is behind the log, saying
    // what to do.
    cluster.set_env(behind, Vec::new());
    let (status, log) = cluster.restart_expecting_exit(behind);
    assert!(
        !status.success(),
        "m{behind} started on a refused snapshot:\n{log}"
    );
    assert!(
        log.contains("remove this member's data and add it to the cluster again"),
        "m{behind} does not say what to do:\n{log}"
    );

    // The others serve every key; removed and added again on an empty
    // directory, the member gets a sound snapshot and holds them all.
    keys.push("rot-target".into());
    let dump = rebuild_member(&mut cluster, behind, &keys).await;
    for key in &keys {
        let want = match key.rsplit_once('/') {
            Some((_, k)) => format!("v{}", k.parse::<usize>().expect("a numbered key")),
            None => ROT_TARGET.to_string(),
        };
        assert_eq!(dump.kvs[key].0, want, "{key}");
    }
}

/// A member killed while it restores a snapshot from its leader (its raft
/// log already reset to the snapshot, its store not yet restored) finishes
/// the restore from the received file at its next start, and catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_killed_restoring_a_snapshot_finishes_the_restore_at_its_next_start() {
    let shim_dir = tempfile::tempdir().expect("a temp dir");
    let Some(shim) = common::snapshot_rot::build_shim(shim_dir.path()) else {
        eprintln!("skipped: no C compiler to build the snapshot-rot shim");
        return;
    };
    let mut cluster = Cluster::start_with(3, &["--snapshot-count", "50"]);
    let leader = cluster.wait_leader(Duration::from_secs(10)).await;
    let behind = (leader + 1) % 3;
    cluster.kill(behind);
    let keys = put_many(&cluster, leader, "missed", 400).await;

    cluster.set_env(behind, common::snapshot_rot::env_killing(&shim));
    let (status, log) = cluster.restart_expecting_exit(behind);
    assert!(
        log.contains("installing a snapshot from the leader")
            && log.contains(common::snapshot_rot::KILLED),
        "m{behind} was not killed restoring a snapshot ({status}):\n{log}"
    );

    cluster.set_env(behind, Vec::new());
    let start = cluster.log_text(behind).len();
    cluster.restart(behind);
    let log = cluster.log_text(behind);
    assert!(
        log[start..].contains("restoring the snapshot whose restore was cut short"),
        "m{behind} did not restore the snapshot at its start:\n{}",
        &log[start..]
    );
    let dump = cluster
        .wait_converged(&[0, 1, 2], Duration::from_secs(20))
        .await;
    for key in &keys {
        let k: usize = key[key.len() - 4..].parse().expect("a numbered key");
        assert_eq!(
            dump.kvs.get(key).map(|v| v.0.as_str()),
            Some(format!("v{k}").as_str()),
            "{key}"
        );
    }
}
