//! Power loss between the raft log and the store: a member acknowledges a
//! write once its raft log has fsynced it, while its store (fjall) is
//! written without a sync and made durable only every `--snapshot-count`
//! entries, before the log is compacted. The machine loses its power at a
//! random moment under a load of puts and two-key transactions; what was
//! not synced is thrown away (each file as last synced, plus a random
//! prefix of the sectors written since). After each restart every
//! acknowledged write is there at its revision, every transaction is whole
//! or absent, and revisions run on with no gap or repeat.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::power_loss;
use common::rng::Rng;
use etcd_client::{Client, GetOptions, Txn, TxnOp};

/// What the writers had acknowledged: key to (revision, value). A
/// transaction's two keys share both.
type Acked = Arc<Mutex<BTreeMap<String, (i64, String)>>>;

/// Puts and two-key transactions of fresh keys through `endpoint` until
/// the member is gone.
async fn write_until_gone(endpoint: String, round: usize, writer: usize, acked: Acked) {
    let Ok(mut c) = Client::connect([endpoint], None).await else {
        return;
    };
    for i in 0.. {
        let key = format!("r{round:02}/w{writer}/{i:06}");
        let value = format!("{round}.{writer}.{i}");
        let written = if i % 2 == 0 {
            c.put(key.as_str(), value.as_str(), None)
                .await
                .map(|r| (r.header().map(|h| h.revision()), vec![key]))
        } else {
            let keys = vec![format!("{key}/a"), format!("{key}/b")];
            let txn = Txn::new().and_then(
                keys.iter()
                    .map(|k| TxnOp::put(k.as_str(), value.as_str(), None))
                    .collect::<Vec<_>>(),
            );
            c.txn(txn)
                .await
                .map(|r| (r.header().map(|h| h.revision()), keys))
        };
        let Ok((Some(revision), keys)) = written else {
            return; // the power went
        };
        let mut acked = acked.lock().expect("the acknowledged writes");
        for k in keys {
            acked.insert(k, (revision, value.clone()));
        }
    }
}

/// Everything the member holds: key to (revision, value).
async fn stored(endpoint: &str) -> (BTreeMap<String, (i64, String)>, i64) {
    let mut c = Client::connect([endpoint], None)
        .await
        .expect("connect after the restart");
    let all = c
        .get("r", Some(GetOptions::new().with_prefix()))
        .await
        .expect("read everything back");
    let kvs = all
        .kvs()
        .iter()
        .map(|kv| {
            (
                kv.key_str().expect("a UTF-8 key").to_string(),
                (
                    kv.mod_revision(),
                    kv.value_str().expect("a UTF-8 value").to_string(),
                ),
            )
        })
        .collect();
    (kvs, all.header().expect("a header").revision())
}

const ROUNDS: usize = 12;

#[test]
fn acknowledged_writes_survive_power_loss_between_the_raft_log_and_the_store() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let Some(shim) = power_loss::build_shim(dir.path()) else {
        eprintln!("skipped: no C compiler to build the power-loss shim");
        return;
    };
    let durable = dir.path().join("durable");
    std::fs::create_dir(&durable).expect("the durable copies' directory");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    // The store synced, and the log compacted behind it, every 50 entries:
    // each round's load crosses several of those points.
    let mut cluster = Cluster::start_with(1, &["--snapshot-count", "50"]);
    let data = cluster.node(0).data_dir.clone();
    // Killed before the shim watched it, the member's files as they are are
    // durable (the page cache survives a kill); from now on it runs with it.
    cluster.kill(0);
    power_loss::all_durable(&data, &durable);
    cluster.restart_with_env(0, power_loss::env(&shim, &durable));

    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut rng = Rng(seed);
    let acked: Acked = Arc::default();
    let mut outcomes: BTreeMap<(String, &str), usize> = BTreeMap::new();
    let mut replayed = Vec::new();
    for round in 0..ROUNDS {
        let endpoint = cluster.endpoint(0);
        let writers: Vec<_> = (0..4)
            .map(|w| runtime.spawn(write_until_gone(endpoint.clone(), round, w, acked.clone())))
            .collect();
        std::thread::sleep(Duration::from_millis(300 + rng.below(1200)));
        cluster.kill(0);
        for w in writers {
            runtime.block_on(w).expect("a writer panicked");
        }
        for (outcome, n) in
            power_loss::lose_power(&data, &durable, &mut |n| rng.below(n as u64) as usize)
        {
            *outcomes.entry(outcome).or_default() += n;
        }
        let started = Instant::now();
        cluster.restart(0);
        let log = cluster.log_text(0);
        if let Some((commit, applied)) = power_loss::commit_and_applied(&log) {
            replayed.push(commit.saturating_sub(applied));
        }

        let (stored, current) = runtime.block_on(stored(&endpoint));
        let acked = acked.lock().expect("the acknowledged writes").clone();
        eprintln!(
            "round {round} (seed {seed}): {} writes acknowledged so far, {} keys stored, \
             revision {current}, back in {:?}; raft log entries replayed into the store: {:?}",
            acked.len(),
            stored.len(),
            started.elapsed(),
            replayed.last()
        );
        // Nothing acknowledged is lost.
        for (key, (revision, value)) in &acked {
            assert_eq!(
                stored.get(key),
                Some(&(*revision, value.clone())),
                "round {round}: acknowledged {key} = {value} at revision {revision}"
            );
        }
        // Nothing is half there: each revision is one put or one whole
        // transaction (its two keys, one value), and they run from 2 (the
        // first write) to the current one with no gap.
        let mut by_revision: BTreeMap<i64, Vec<(&String, &String)>> = BTreeMap::new();
        for (key, (revision, value)) in &stored {
            by_revision.entry(*revision).or_default().push((key, value));
        }
        for (revision, keys) in &by_revision {
            let whole = match keys.as_slice() {
                [(_, _)] => true,
                [(a, va), (b, vb)] => {
                    a.ends_with("/a")
                        && b.ends_with("/b")
                        && a[..a.len() - 2] == b[..b.len() - 2]
                        && va == vb
                }
                _ => false,
            };
            assert!(whole, "round {round}: revision {revision} holds {keys:?}");
        }
        assert_eq!(
            by_revision.keys().copied().collect::<Vec<_>>(),
            (2..=current).collect::<Vec<_>>(),
            "round {round}: revisions with a gap or a repeat"
        );
    }
    eprintln!("files after each power loss, by what was left of them: {outcomes:?}");
    eprintln!("entries replayed at each restart: {replayed:?}");
    let acked = acked.lock().expect("the acknowledged writes").len();
    assert!(acked > 100, "the load wrote too little: {acked}");
    // The power losses threw away writes to the store that were not
    // synced, and the store, behind the log, had entries replayed into it.
    let store_lost: usize = ["as synced", "torn"]
        .iter()
        .filter_map(|outcome| outcomes.get(&("member/kv".to_string(), *outcome)))
        .sum();
    assert!(
        store_lost > 0,
        "no power loss lost anything of the store: {outcomes:?}"
    );
    assert!(
        replayed.iter().any(|&n| n > 0),
        "no restart replayed the raft log into the store: {replayed:?}"
    );
}

/// The model itself: an entry made since its directory's last sync is lost
/// when the draw says so (a new file gone, a rename undone, and the file it
/// had replaced back), kept otherwise; one made before is never touched.
#[test]
fn the_power_loss_model_loses_directory_entries_made_since_the_last_sync() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let (data, durable) = (dir.path().join("data"), dir.path().join("durable"));
    std::fs::create_dir_all(data.join("sub")).expect("a data directory");
    std::fs::create_dir(&durable).expect("the durable copies' directory");
    std::fs::write(data.join("old"), "old").expect("a file");
    std::fs::write(data.join("target"), "replaced").expect("a file");
    power_loss::all_durable(&data, &durable);
    // Since the last sync: a new file, a new directory with a file, a
    // rename over an existing name, in a directory never synced again.
    std::fs::write(data.join("new"), "new").expect("a file");
    std::fs::create_dir(data.join("newdir")).expect("a directory");
    std::fs::write(data.join("newdir/inner"), "inner").expect("a file");
    std::fs::rename(data.join("old"), data.join("target")).expect("a rename");
    std::fs::write(data.join("sub/kept"), "kept").expect("a file");
    // The draws for entries come first, a directory's by name, parents
    // first: new, newdir, target, then sub/kept. Those lose (1) but the
    // fourth keeps (0); then every file keeps what was written (n - 1).
    let mut draws = 0;
    let outcomes = power_loss::lose_power(&data, &durable, &mut |n| {
        draws += 1;
        if draws == 4 { 0 } else { n - 1 }
    });
    let names = |d: &Path| -> Vec<String> {
        let mut n: Vec<String> = std::fs::read_dir(d)
            .expect("list")
            .map(|e| {
                e.expect("an entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        n.sort();
        n
    };
    assert_eq!(names(&data), ["old", "sub", "target"], "{outcomes:?}");
    assert_eq!(
        std::fs::read_to_string(data.join("old")).expect("old"),
        "old"
    );
    assert_eq!(
        std::fs::read_to_string(data.join("target")).expect("target"),
        "replaced"
    );
    assert_eq!(names(&data.join("sub")), ["kept"], "{outcomes:?}");
}

/// Puts `n` keys `prefix/NNN` one at a time; returns those acknowledged.
async fn put_keys(endpoint: &str, prefix: &str, n: usize) -> BTreeMap<String, String> {
    let mut c = Client::connect([endpoint], None)
        .await
        .expect("connect to the member");
    let mut acked = BTreeMap::new();
    for i in 0..n {
        let (key, value) = (format!("{prefix}/{i:03}"), format!("v{i}"));
        c.put(key.as_str(), value.as_str(), None)
            .await
            .unwrap_or_else(|e| panic!("put {key}: {e}"));
        acked.insert(key, value);
    }
    acked
}

const FIRST_STARTS: usize = 6;

/// A member's first start makes directories (its member directory, its raft
/// log's, its store's) and names files in them (its identity): each must be
/// durable, its directory synced, before the member acknowledges a write.
/// Started on an empty data directory under the shim, the member takes
/// writes and loses its power; what it made since a directory's last sync
/// may be gone. Started again, it must be the same member, with every
/// acknowledged write.
#[test]
fn a_members_first_start_survives_power_loss() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let Some(shim) = power_loss::build_shim(dir.path()) else {
        eprintln!("skipped: no C compiler to build the power-loss shim");
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let mut cluster = Cluster::start(1);
    let data = cluster.node(0).data_dir.clone();
    let endpoint = cluster.endpoint(0);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut rng = Rng(seed);
    let mut outcomes: BTreeMap<(String, &str), usize> = BTreeMap::new();
    for round in 0..FIRST_STARTS {
        cluster.kill(0);
        let durable = dir.path().join(format!("durable-{round}"));
        std::fs::create_dir(&durable).expect("the durable copies' directory");
        std::fs::remove_dir_all(&data).expect("empty the data directory");
        std::fs::create_dir(&data).expect("an empty data directory");
        power_loss::all_durable(&data, &durable);
        cluster.set_env(0, power_loss::env(&shim, &durable));
        cluster.restart(0);
        let acked = runtime.block_on(put_keys(&endpoint, "r-first", 20));
        cluster.kill(0);
        for (outcome, n) in
            power_loss::lose_power(&data, &durable, &mut |n| rng.below(n as u64) as usize)
        {
            *outcomes.entry(outcome).or_default() += n;
        }
        cluster.restart(0);
        let (stored, _) = runtime.block_on(stored(&endpoint));
        let stored: BTreeMap<String, String> =
            stored.into_iter().map(|(k, (_, v))| (k, v)).collect();
        assert_eq!(
            stored, acked,
            "round {round} (seed {seed}): the member came back without its writes; \
             power loss outcomes so far: {outcomes:?}"
        );
        std::fs::remove_dir_all(&durable).expect("remove the durable copies");
    }
    eprintln!("entries and files after each power loss, by what was left of them: {outcomes:?}");
}
