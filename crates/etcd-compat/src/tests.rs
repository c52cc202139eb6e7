//! A store out to etcd's format and back, a restore, and a migration of an
//! etcd data dir.

use std::io::Write as _;
use std::path::Path;

use cairn_api::alarm_record;
use cairn_api::authpb::User;
use cairn_api::cairnpb::{AuthState, InternalRequest, Lease, internal_request};
use cairn_api::etcdserverpb::{
    AlarmMember, AlarmType, DeleteRangeRequest, PutRequest, RangeRequest, ResponseHeader,
};
use cairn_auth::RECORD as AUTH_RECORD;
use cairn_mvcc::{Store, StoredRevision};
use prost::Message as _;

use super::*;

fn put(key: &str, value: &str) -> PutRequest {
    PutRequest {
        key: key.as_bytes().to_vec().into(),
        value: value.as_bytes().to_vec().into(),
        ..Default::default()
    }
}

fn member(id: u64, name: &str) -> Member {
    Member {
        id,
        name: name.into(),
        peer_urls: vec![format!("http://{name}:2380")],
        client_urls: vec![format!("http://{name}:2379")],
        is_learner: false,
    }
}

/// A store with history, a tombstone, a compaction, a lease and auth.
fn populated(path: &Path) -> Store {
    let store = Store::open(path).expect("open");
    let mut batch = store.write();
    for i in 0..5 {
        batch.put(&put("a", &format!("v{i}"))).expect("put");
    }
    batch.put(&put("b", "gone")).expect("put");
    batch
        .delete_range(&DeleteRangeRequest {
            key: "b".into(),
            ..Default::default()
        })
        .expect("delete");
    batch.put(&put("c", "kept")).expect("put");
    let lease = Lease {
        id: 7,
        ttl: 60,
        remaining_ttl: 0,
    };
    batch.put_lease(7, lease.encode_to_vec());
    let auth = AuthState {
        enabled: true,
        revision: 3,
        users: vec![User {
            name: "root".into(),
            roles: vec!["root".into()],
            ..Default::default()
        }],
        roles: Vec::new(),
    };
    batch.put_state_record(AUTH_RECORD.to_vec(), auth.encode_to_vec());
    for alarm in [
        AlarmMember {
            member_id: 0x2a,
            alarm: AlarmType::Nospace as i32,
        },
        AlarmMember {
            member_id: 0x1b,
            alarm: AlarmType::Corrupt as i32,
        },
    ] {
        batch.put_state_record(alarm_record::key(&alarm), alarm.encode_to_vec());
    }
    batch.commit(40).expect("commit");
    let mut batch = store.write();
    batch.compact(3).expect("compact");
    batch.commit(41).expect("commit");
    store
}

/// What `etcdctl snapshot save` keeps of the stream: every blob.
fn save(snapshot: EtcdSnapshot, path: &Path) {
    let size = snapshot.size();
    let responses: Vec<_> = snapshot
        .responses(Some(ResponseHeader {
            revision: 9,
            ..Default::default()
        }))
        .collect::<Result<_, _>>()
        .expect("responses");
    assert_eq!(responses[0].header.as_ref().map(|h| h.revision), Some(9));
    assert!(responses[1..].iter().all(|r| r.header.is_none()));
    let (sha, chunks) = responses.split_last().expect("a sha");
    assert_eq!(sha.blob.len(), 32);
    let sizes: u64 = chunks.iter().map(|c| c.blob.len() as u64).sum();
    assert_eq!(sizes, size);
    assert_eq!(chunks.last().map(|c| c.remaining_bytes), Some(0));
    let mut file = std::fs::File::create(path).expect("create");
    for response in &responses {
        file.write_all(&response.blob).expect("write");
    }
}

/// Tombstones keep only their key and mod revision in etcd's format.
fn revisions(store: &Store) -> Vec<StoredRevision> {
    let export = store.export().expect("export");
    export
        .revisions()
        .map(|r| {
            let mut r = r.expect("revision");
            if r.tombstone {
                r.kv = cairn_api::mvccpb::KeyValue {
                    key: r.kv.key,
                    mod_revision: r.main,
                    ..Default::default()
                };
            }
            r
        })
        .collect()
}

#[test]
fn a_store_round_trips_through_etcds_format() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = populated(&dir.path().join("kv"));
    let members = [member(2, "b"), member(1, "a")];
    let snapshot =
        EtcdSnapshot::write(&store.export().expect("export"), &members, dir.path()).expect("write");
    let saved = dir.path().join("snapshot.db");
    save(snapshot, &saved);
    verify_hash(&saved, false).expect("etcd's sha256");
    // Only the saved file is left: the snapshot's own file had no name.
    assert_eq!(std::fs::read_dir(dir.path()).expect("list").count(), 2);

    let summary = import_bbolt(&saved, &dir.path().join("restored")).expect("import");
    let restored = Store::open(&dir.path().join("restored")).expect("open");
    assert_eq!(
        summary,
        Summary {
            revisions: revisions(&store).len() as u64,
            revision: 9,
            compact_revision: 3,
            leases: 1,
            consistent_index: 41,
            auth_enabled: true,
            users: 1,
            // In the bucket's order: by hex ID.
            members: vec![member(1, "a"), member(2, "b")],
        }
    );
    assert_eq!(revisions(&restored), revisions(&store));
    assert_eq!(restored.compact_revision(), 3);
    assert_eq!(restored.current_revision(), 9);
    assert_eq!(restored.applied_index(), 0);
    assert_eq!(
        restored.leases().expect("leases"),
        store.leases().expect("leases")
    );
    assert_eq!(
        restored.state_records(AUTH_RECORD).expect("auth"),
        store.state_records(AUTH_RECORD).expect("auth")
    );
    // The alarms travel through etcd's `alarm` bucket.
    let alarms = restored
        .state_records(alarm_record::PREFIX)
        .expect("alarms");
    assert_eq!(alarms.len(), 2);
    assert_eq!(
        alarms,
        store.state_records(alarm_record::PREFIX).expect("alarms")
    );
    let a = restored
        .range(&RangeRequest {
            key: "a".into(),
            ..Default::default()
        })
        .expect("range");
    assert_eq!(&a.kvs[0].value[..], b"v4");
    assert_eq!(a.kvs[0].version, 5);
}

#[test]
fn a_restore_builds_a_data_dir_once_and_leaves_nothing_when_it_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = populated(&dir.path().join("kv"));
    let saved = dir.path().join("snapshot.db");
    save(
        EtcdSnapshot::write(&store.export().expect("export"), &[], dir.path()).expect("write"),
        &saved,
    );
    let bootstrap = Bootstrap {
        member_id: 1,
        cluster_id: 9,
        members: vec![member(1, "a")],
    };
    let data_dir = dir.path().join("a.etcd");
    let summary = restore(&saved, &data_dir, &bootstrap, false).expect("restore");
    assert_eq!(summary.revision, 9);
    let member_dir = data_dir.join("member");
    assert!(member_dir.join("kv").is_dir());
    assert_eq!(
        read_bootstrap(&member_dir).expect("read"),
        Some(bootstrap.clone())
    );
    let again = restore(&saved, &data_dir, &bootstrap, false).expect_err("exists");
    assert!(matches!(again, Error::DataDirExists(_)), "{again}");
    finish_restore(&member_dir).expect("finish");
    assert_eq!(read_bootstrap(&member_dir).expect("read"), None);

    // A database cut short, its hash not checked: the import fails.
    let bytes = std::fs::read(&saved).expect("read");
    std::fs::write(&saved, &bytes[..4096 * 3]).expect("write");
    let other = dir.path().join("b.etcd");
    restore(&saved, &other, &bootstrap, true).expect_err("a damaged database");
    assert!(!other.exists(), "nothing left behind");
}

/// Applies puts as the member would, and remembers what it was given.
#[derive(Default)]
struct Puts {
    indexes: Vec<u64>,
}

impl ApplyWrites for Puts {
    type Error = cairn_mvcc::MvccError;

    fn apply_writes(
        &mut self,
        store: &Store,
        writes: Vec<(u64, InternalRequest)>,
    ) -> Result<(), Self::Error> {
        let mut batch = store.write();
        for (index, request) in writes {
            self.indexes.push(index);
            if let Some(internal_request::Request::Put(put)) = request.request {
                batch.put(&put)?;
            }
        }
        batch.commit(0)?;
        Ok(())
    }
}

#[test]
fn an_etcd_data_dir_migrates_in_place_with_its_wal_tail() {
    let dir = tempfile::tempdir().expect("tempdir");
    let member_dir = dir.path().join("member");
    let members = [member(1, "a"), member(2, "b"), member(3, "c")];
    let mut applier = Puts::default();
    assert_eq!(
        migrate_etcd(&member_dir, 4, &mut applier).expect("nothing to migrate"),
        None
    );

    // The database holds the writes up to raft index 41 (the three
    // AddNodes are older), the WAL two more puts past it.
    let store = populated(&dir.path().join("source"));
    let snap = member_dir.join("snap");
    std::fs::create_dir_all(&snap).expect("mkdir");
    save(
        EtcdSnapshot::write(&store.export().expect("export"), &members, dir.path()).expect("write"),
        &snap.join("db"),
    );
    let wal = crate::wal::tests::killed_members_wal(2, 99, &members, 42, &["d", "e"]);
    std::fs::create_dir_all(member_dir.join("wal")).expect("mkdir");
    std::fs::write(member_dir.join("wal/0-0.wal"), &wal).expect("write");
    let other_dir = dir.path().join("other/member");
    std::fs::create_dir_all(other_dir.join("wal")).expect("mkdir");
    std::fs::create_dir_all(other_dir.join("snap")).expect("mkdir");
    std::fs::copy(snap.join("db"), other_dir.join("snap/db")).expect("copy");

    let bootstrap = migrate_etcd(&member_dir, 4, &mut applier)
        .expect("migrate")
        .expect("an etcd data dir");
    assert_eq!(
        bootstrap,
        Bootstrap {
            member_id: 2,
            cluster_id: 99,
            members: members.to_vec(),
        }
    );
    assert_eq!(applier.indexes, [42, 43]);
    assert_eq!(read_bootstrap(&member_dir).expect("read"), Some(bootstrap));
    assert!(!member_dir.join("kv.migrating").exists());
    let migrated = Store::open(&member_dir.join("kv")).expect("open");
    assert_eq!(migrated.current_revision(), 11);
    assert_eq!(migrated.applied_index(), 0);
    let d = migrated
        .range(&RangeRequest {
            key: "d".into(),
            ..Default::default()
        })
        .expect("range");
    assert_eq!(&d.kvs[0].value[..], b"from the WAL");
    drop(migrated);
    // Migrated once: etcd's files are not read again.
    assert_eq!(
        migrate_etcd(&member_dir, 4, &mut Puts::default()).expect("again"),
        None
    );

    // A WAL whose member is not among the members it leaves is refused.
    let stranger = crate::wal::tests::killed_members_wal(7, 99, &members, 42, &[]);
    std::fs::write(other_dir.join("wal/0-0.wal"), &stranger).expect("write");
    let refused = migrate_etcd(&other_dir, 4, &mut Puts::default()).expect_err("a stranger");
    assert!(
        matches!(refused, Error::UnknownMember { member: 7, .. }),
        "{refused}"
    );
    assert!(!other_dir.join("kv").exists());
}
