use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::*;

/// Writes `content` (bucket → key → value, with nested buckets under
/// `nested`) and returns the file.
fn write_db(
    dir: &Path,
    buckets: &BTreeMap<Vec<u8>, BTreeMap<Vec<u8>, Vec<u8>>>,
) -> std::path::PathBuf {
    let path = dir.join("db");
    let file = std::fs::File::create(&path).expect("create");
    let mut writer = Writer::new(file).expect("writer");
    for (name, content) in buckets {
        writer.begin_bucket(name).expect("begin");
        for (k, v) in content {
            writer.put(k, v).expect("put");
        }
        writer.end_bucket().expect("end");
    }
    writer.finish().expect("finish");
    path
}

fn read_all(db: &Db, bucket: &Bucket) -> BTreeMap<Vec<u8>, Vec<u8>> {
    db.entries(bucket)
        .map(|e| match e.expect("entry") {
            (k, Item::Value(v)) => (k, v),
            (k, Item::Bucket(_)) => panic!("unexpected bucket {k:?}"),
        })
        .collect()
}

fn read_buckets(path: &Path) -> BTreeMap<Vec<u8>, BTreeMap<Vec<u8>, Vec<u8>>> {
    let db = Db::open(path).expect("open");
    db.entries(db.root())
        .map(|e| match e.expect("entry") {
            (name, Item::Bucket(b)) => (name, read_all(&db, &b)),
            (name, Item::Value(_)) => panic!("value {name:?} in the root bucket"),
        })
        .collect()
}

#[test]
fn round_trip_small_and_empty_buckets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut buckets = BTreeMap::new();
    buckets.insert(b"empty".to_vec(), BTreeMap::new());
    buckets.insert(
        b"small".to_vec(),
        BTreeMap::from([(b"a".to_vec(), b"1".to_vec()), (b"b".to_vec(), Vec::new())]),
    );
    let path = write_db(dir.path(), &buckets);
    assert_eq!(
        std::fs::metadata(&path).expect("meta").len() % PAGE_SIZE as u64,
        0
    );
    assert_eq!(read_buckets(&path), buckets);
    let db = Db::open(&path).expect("open");
    // Both small buckets are inline: the file is metas, freelist and root.
    assert_eq!(db.size(), 4 * PAGE_SIZE as u64);
    assert!(db.bucket(db.root(), b"small").expect("lookup").is_some());
    assert!(db.bucket(db.root(), b"missing").expect("lookup").is_none());
}

#[test]
fn many_keys_make_multi_level_branches() {
    let dir = tempfile::tempdir().expect("tempdir");
    let content: BTreeMap<Vec<u8>, Vec<u8>> = (0u32..60_000)
        .map(|i| {
            (
                format!("key-{i:08}").into_bytes(),
                format!("value {i}").into_bytes(),
            )
        })
        .collect();
    let buckets = BTreeMap::from([(b"key".to_vec(), content)]);
    let path = write_db(dir.path(), &buckets);
    assert_eq!(read_buckets(&path), buckets);
    // 60,000 elements of ~40 bytes fill ~600 leaves, which need more than
    // one branch page (~200 children each): three levels.
    let depth = tree_depth(&path, b"key");
    assert!(depth >= 3, "depth {depth}");
}

/// Levels of bucket `name`'s tree, read from the raw pages.
fn tree_depth(path: &Path, name: &[u8]) -> usize {
    let bytes = std::fs::read(path).expect("read");
    let db = Db::open(path).expect("open");
    let Some(bucket) = db.bucket(db.root(), name).expect("lookup") else {
        panic!("no bucket");
    };
    let mut page = bucket.root as usize;
    let mut depth = 1;
    loop {
        let at = page * PAGE_SIZE;
        if u16_at(&bytes, at + 8) != BRANCH_PAGE {
            return depth;
        }
        // First child of the branch.
        page = u64_at(&bytes, at + PAGE_HEADER_SIZE + 8) as usize;
        depth += 1;
    }
}

#[test]
fn big_values_use_overflow_pages() {
    let dir = tempfile::tempdir().expect("tempdir");
    let content = BTreeMap::from([
        (b"a".to_vec(), vec![1u8; 10]),
        (
            b"big".to_vec(),
            (0..3 * PAGE_SIZE + 17).map(|i| i as u8).collect(),
        ),
        (b"c".to_vec(), vec![3u8; 100]),
        (b"huge".to_vec(), vec![4u8; 1 << 20]),
    ]);
    let buckets = BTreeMap::from([(b"blobs".to_vec(), content)]);
    let path = write_db(dir.path(), &buckets);
    assert_eq!(read_buckets(&path), buckets);
}

#[test]
fn nested_buckets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("db");
    let mut writer = Writer::new(std::fs::File::create(&path).expect("create")).expect("writer");
    writer.begin_bucket(b"outer").expect("begin");
    writer.put(b"a", b"1").expect("put");
    writer.begin_bucket(b"inner").expect("begin");
    for i in 0..500u32 {
        writer.put(&i.to_be_bytes(), &[7; 50]).expect("put");
    }
    writer.end_bucket().expect("end");
    writer.put(b"z", b"26").expect("put");
    writer.finish().expect("finish closes the open bucket");

    let db = Db::open(&path).expect("open");
    let outer = db
        .bucket(db.root(), b"outer")
        .expect("lookup")
        .expect("outer");
    let items: Vec<(Vec<u8>, Item)> = db.entries(&outer).map(|e| e.expect("entry")).collect();
    assert_eq!(items.len(), 3);
    assert_eq!(items[0], (b"a".to_vec(), Item::Value(b"1".to_vec())));
    assert_eq!(items[2], (b"z".to_vec(), Item::Value(b"26".to_vec())));
    let Item::Bucket(inner) = &items[1].1 else {
        panic!("inner is not a bucket");
    };
    let inner = read_all(&db, inner);
    assert_eq!(inner.len(), 500);
    assert!(inner.values().all(|v| v == &[7; 50]));
}

#[test]
fn keys_out_of_order_are_refused() {
    let mut writer = Writer::new(Cursor::new(Vec::new())).expect("writer");
    writer.begin_bucket(b"b").expect("begin");
    writer.put(b"2", b"").expect("put");
    assert!(matches!(writer.put(b"1", b""), Err(Error::Unordered)));
    assert!(matches!(writer.put(b"2", b""), Err(Error::Unordered)));
    writer.end_bucket().expect("end");
    assert!(matches!(writer.begin_bucket(b"a"), Err(Error::Unordered)));
    assert!(matches!(writer.end_bucket(), Err(Error::Invalid(_))));
}

#[test]
fn damaged_files_fail_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let buckets = BTreeMap::from([(
        b"b".to_vec(),
        (0u32..2000)
            .map(|i| (i.to_be_bytes().to_vec(), vec![1; 30]))
            .collect::<BTreeMap<_, _>>(),
    )]);
    let path = write_db(dir.path(), &buckets);
    let good = std::fs::read(&path).expect("read");

    // A broken checksum on one meta: the other is used.
    let mut bytes = good.clone();
    bytes[PAGE_HEADER_SIZE + 20] ^= 0xff;
    std::fs::write(&path, &bytes).expect("write");
    assert_eq!(read_buckets(&path), buckets);
    // On both: not a database.
    bytes[PAGE_SIZE + PAGE_HEADER_SIZE + 20] ^= 0xff;
    std::fs::write(&path, &bytes).expect("write");
    assert!(matches!(Db::open(&path), Err(Error::Invalid(_))));

    // Garbage in a data page: an error, never a panic.
    let mut bytes = good;
    for b in &mut bytes[5 * PAGE_SIZE..6 * PAGE_SIZE] {
        *b = 0xab;
    }
    std::fs::write(&path, &bytes).expect("write");
    let db = Db::open(&path).expect("open");
    let bucket = db.bucket(db.root(), b"b").expect("lookup").expect("bucket");
    assert!(db.entries(&bucket).any(|e| e.is_err()));
}

/// Castagnoli CRC-32, as `etcdctl snapshot status` hashes.
fn crc32c(crc: u32, bytes: &[u8]) -> u32 {
    let mut crc = !crc;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

struct Etcd {
    child: Child,
    endpoint: String,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn etcdctl(endpoint: Option<&str>, args: &[&str]) -> String {
    let mut cmd = Command::new("etcdctl");
    cmd.env("ETCDCTL_API", "3");
    if let Some(endpoint) = endpoint {
        cmd.args(["--endpoints", endpoint]);
    }
    let out = cmd.args(args).output().expect("etcdctl runs");
    assert!(
        out.status.success(),
        "etcdctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn start_etcd(dir: &Path) -> Etcd {
    let client = format!("http://127.0.0.1:{}", free_port());
    let peer = format!("http://127.0.0.1:{}", free_port());
    let child = Command::new("etcd")
        .args(["--data-dir", &dir.join("etcd").to_string_lossy()])
        .args([
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
        ])
        .args([
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
        ])
        .args(["--initial-cluster", &format!("default={peer}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("/usr/bin/etcd (Debian's etcd-server) starts");
    let etcd = Etcd {
        child,
        endpoint: client,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let ok = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &etcd.endpoint, "endpoint", "health"])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return etcd;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("etcd did not become healthy");
}

/// The real etcd writes a snapshot; this reader finds its buckets, its
/// revisions and the values put.
#[test]
fn reads_a_snapshot_etcd_wrote() {
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = start_etcd(dir.path());
    for i in 0..50 {
        etcdctl(
            Some(&etcd.endpoint),
            &["put", &format!("k{i:02}"), &format!("v{i}")],
        );
    }
    etcdctl(Some(&etcd.endpoint), &["del", "k00"]);
    let big = "x".repeat(10_000);
    etcdctl(Some(&etcd.endpoint), &["put", "big", &big]);
    let file = dir.path().join("snap.db");
    etcdctl(
        Some(&etcd.endpoint),
        &["snapshot", "save", &file.to_string_lossy()],
    );

    let buckets = read_buckets(&file);
    for name in [
        "key", "meta", "lease", "members", "cluster", "alarm", "auth",
    ] {
        assert!(buckets.contains_key(name.as_bytes()), "bucket {name}");
    }
    let keys = &buckets[b"key".as_slice()];
    // 50 puts, one delete (a tombstone key, marked 't'), one big put: 52
    // revisions from 2 on.
    assert_eq!(keys.len(), 52);
    let revs: Vec<u64> = keys
        .keys()
        .map(|k| u64::from_be_bytes(k[..8].try_into().expect("rev")))
        .collect();
    assert_eq!(revs, (2..54).collect::<Vec<u64>>());
    let tombstone = keys.keys().find(|k| k.len() == 18).expect("a tombstone");
    assert_eq!(tombstone[17], b't');
    let big_kv = keys.values().last().expect("big");
    assert!(big_kv.windows(big.len()).any(|w| w == big.as_bytes()));

    // etcdctl's status hash: CRC-32C of bucket names, keys and values.
    let mut hash = 0;
    let mut total = 0;
    for (name, content) in &buckets {
        hash = crc32c(hash, name);
        for (k, v) in content {
            hash = crc32c(hash, k);
            hash = crc32c(hash, v);
            total += 1;
        }
    }
    let status = etcdctl(
        None,
        &["snapshot", "status", &file.to_string_lossy(), "-w", "json"],
    );
    assert!(status.contains(&format!("\"hash\":{hash}")), "{status}");
    assert!(
        status.contains(&format!("\"totalKey\":{total}")),
        "{status}"
    );
}

/// A database this writer wrote passes etcdctl's integrity check (bbolt's
/// tx.Check) and reads back with the hash, revision and count it holds.
#[test]
fn etcdctl_reads_a_database_written_here() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut key = BTreeMap::new();
    for main in 2u64..5000 {
        let mut rev = main.to_be_bytes().to_vec();
        rev.push(b'_');
        rev.extend_from_slice(&0u64.to_be_bytes());
        key.insert(rev, vec![main as u8; (main % 300) as usize + 1]);
    }
    let mut big_rev = 5000u64.to_be_bytes().to_vec();
    big_rev.push(b'_');
    big_rev.extend_from_slice(&0u64.to_be_bytes());
    key.insert(big_rev, vec![9; 20_000]);
    let buckets = BTreeMap::from([
        (b"alarm".to_vec(), BTreeMap::new()),
        (b"key".to_vec(), key),
        (
            b"meta".to_vec(),
            BTreeMap::from([(b"consistent_index".to_vec(), 7u64.to_be_bytes().to_vec())]),
        ),
    ]);
    let path = write_db(dir.path(), &buckets);
    let mut hash = 0;
    let mut total = 0;
    for (name, content) in &buckets {
        hash = crc32c(hash, name);
        for (k, v) in content {
            hash = crc32c(hash, k);
            hash = crc32c(hash, v);
            total += 1;
        }
    }
    let status = etcdctl(
        None,
        &["snapshot", "status", &path.to_string_lossy(), "-w", "json"],
    );
    assert!(status.contains(&format!("\"hash\":{hash}")), "{status}");
    assert!(status.contains("\"revision\":5000"), "{status}");
    assert!(
        status.contains(&format!("\"totalKey\":{total}")),
        "{status}"
    );
}

/// Reads everything under `bucket`, nested buckets to a small depth; the
/// number of items is bounded, so a damaged tree that loops ends the walk.
fn walk(db: &Db, bucket: &Bucket, depth: usize, budget: &mut usize) {
    for entry in db.entries(bucket) {
        if *budget == 0 {
            return;
        }
        *budget -= 1;
        let Ok((key, item)) = entry else { return };
        if let Item::Bucket(nested) = item
            && depth > 0
        {
            let _ = db.bucket(bucket, &key);
            walk(db, &nested, depth - 1, budget);
        }
    }
}

proptest::proptest! {
    /// A database damaged anywhere (an etcd snapshot is untrusted input)
    /// opens and reads, or is refused; the reader never panics. `make fuzz`
    /// runs many more cases.
    #[test]
    fn damaged_databases_never_panic_the_reader(
        flips in proptest::collection::vec(
            (proptest::prelude::any::<proptest::sample::Index>(), 0u8..=255),
            1..16,
        ),
        cut in proptest::prelude::any::<proptest::sample::Index>(),
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut buckets = BTreeMap::new();
        for b in 0..3u8 {
            let content: BTreeMap<Vec<u8>, Vec<u8>> = (0..200u32)
                .map(|i| (format!("key{b}-{i:05}").into_bytes(), vec![b; (i % 50) as usize]))
                .collect();
            buckets.insert(vec![b'a' + b], content);
        }
        let path = write_db(dir.path(), &buckets);
        let mut bytes = std::fs::read(&path).expect("read");
        for (at, value) in &flips {
            let at = at.index(bytes.len());
            bytes[at] ^= value | 1;
        }
        bytes.truncate(cut.index(bytes.len() + 1).max(1));
        std::fs::write(&path, &bytes).expect("write");
        if let Ok(db) = Db::open(&path) {
            let mut budget = 100_000;
            walk(&db, db.root(), 3, &mut budget);
        }
    }
}
