//! etcd's whole-store maintenance over the keyspace: with --shards the keys
//! are in the shards' stores (held here or on other members), not in the
//! cluster group's. HashKV and Hash hash every shard at one read point;
//! `snapshot save` reads every shard's stored revisions at one read point
//! and merges them in revision order; defragmentation, Status and the quota
//! count every store this member holds (docs/sharding.md).

use std::collections::VecDeque;
use std::sync::Arc;

use cairn_api::cairnpb::{self, ShardDump, ShardDumpResponse, ShardHash, ShardHashResponse};
use cairn_api::error;
use cairn_mvcc::{KvHash, MvccError, Store, StoredRevision};
use cairn_shard::ShardId;
use cairn_shard_replica::{ReadPoint, ShardHandle};
use futures_util::future::try_join_all;
use tonic::Status;

use crate::member::{Member, mvcc_status};
use crate::shards::{Route, Shards};

/// Stored revisions per page of a shard read from another member for a
/// snapshot: a page is one forwarded answer, held in memory at both ends.
const DUMP_PAGE: u64 = 2048;

/// A page ends once it holds this many bytes of key-values, however few
/// revisions that is (values may be large).
const DUMP_PAGE_BYTES: usize = 4 << 20;

/// HashKV at `revision` (≤ 0: the latest): of the store without --shards;
/// with them, of the whole keyspace at one read point. Each shard's stored
/// revisions through the revision are hashed on a replica of it (here, or
/// on a member holding it, with the caller's `token`) as one store's are,
/// and the shards' hashes combined in shard order: every replica of a shard
/// applied the same log, so the answer is the same on every member.
pub async fn hash_kv(
    member: &Member,
    token: Option<&str>,
    revision: i64,
) -> Result<KvHash, Status> {
    let Some(shards) = member.shards() else {
        return member.store.hash_kv(revision).map_err(mvcc_status);
    };
    let point = shards.read_point();
    let compact = shards.compact_revision();
    let upto = if revision <= 0 {
        point.revision
    } else {
        revision
    };
    if upto > point.revision {
        return Err(mvcc_status(MvccError::FutureRevision));
    }
    if upto < compact {
        return Err(error::COMPACTED.status());
    }
    let members = member.peers();
    let hashes = (0..shards.count()).map(|shard| {
        let read = ShardHash {
            shard,
            revision: upto,
            applied: point.needed(shard),
            revoked: point.revoked(shard),
        };
        let members = &members;
        async move {
            match shards.route(shard) {
                Route::Local(local) => hash_replica(member, &local.handle, &read).await,
                Route::Remote(replicas) => {
                    member
                        .forwarder()
                        .hash(&replicas, members, token, read)
                        .await
                }
            }
        }
    });
    let mut combined = crc32fast::Hasher::new();
    for (shard, answer) in (0u32..).zip(try_join_all(hashes).await?) {
        combined.update(&shard.to_be_bytes());
        combined.update(&answer.hash.to_be_bytes());
    }
    Ok(KvHash {
        hash: combined.finalize(),
        compact_revision: compact.max(0),
        current_revision: point.revision,
    })
}

/// `read` of a shard held here, for another member's HashKV.
pub async fn hash_held(member: &Member, read: &ShardHash) -> Result<ShardHashResponse, Status> {
    let handle = held(member, read.shard)?;
    hash_replica(member, &handle, read).await
}

async fn hash_replica(
    member: &Member,
    handle: &ShardHandle,
    read: &ShardHash,
) -> Result<ShardHashResponse, Status> {
    wait_applied(member, handle, read.applied, read.revoked).await?;
    let store = handle.store();
    let upto = read.revision;
    let hash = tokio::task::spawn_blocking(move || store.hash_through(upto))
        .await
        .map_err(|e| Status::internal(format!("hashing a shard did not finish: {e}")))?
        .map_err(mvcc_status)?;
    Ok(ShardHashResponse {
        hash: hash.hash,
        compact_revision: hash.compact_revision,
    })
}

/// `read` of a shard held here: a page of its stored revisions, for
/// another member's snapshot.
pub async fn dump_held(member: &Member, read: ShardDump) -> Result<ShardDumpResponse, Status> {
    let handle = held(member, read.shard)?;
    wait_applied(member, &handle, read.applied, read.revoked).await?;
    let store = handle.store();
    tokio::task::spawn_blocking(move || dump_page(&store, &read))
        .await
        .map_err(|e| Status::internal(format!("reading a shard did not finish: {e}")))?
        .map_err(mvcc_status)
}

fn dump_page(store: &Store, read: &ShardDump) -> Result<ShardDumpResponse, MvccError> {
    let export = store.export()?;
    let mut revisions = Vec::new();
    let mut bytes = 0;
    let mut more = false;
    for revision in export.revisions_from(read.from_main, read.from_sub) {
        let revision = revision?;
        if revision.main > read.revision {
            break;
        }
        if revisions.len() as u64 >= read.limit.max(1) || bytes >= DUMP_PAGE_BYTES {
            more = true;
            break;
        }
        bytes += revision.kv.key.len() + revision.kv.value.len();
        revisions.push(cairnpb::StoredRevision {
            main: revision.main,
            sub: revision.sub,
            tombstone: revision.tombstone,
            kv: Some(revision.kv),
        });
    }
    Ok(ShardDumpResponse {
        revisions,
        more,
        compact_revision: export.compact_revision(),
    })
}

/// This member's replica of `shard`, or why there is none.
fn held(member: &Member, shard: ShardId) -> Result<Arc<ShardHandle>, Status> {
    match member.shards().map(|shards| shards.route(shard)) {
        Some(Route::Local(local)) => Ok(local.handle.clone()),
        _ => Err(Status::failed_precondition(format!(
            "cairn: member {:x} holds no replica of shard {shard}",
            member.id
        ))),
    }
}

async fn wait_applied(
    member: &Member,
    handle: &ShardHandle,
    applied: u64,
    revoked: i64,
) -> Result<(), Status> {
    tokio::time::timeout(
        member.request_timeout(),
        handle.wait_applied(applied, revoked),
    )
    .await
    .map_err(|_| error::TIMEOUT.status())
}

/// Every shard's stored revisions through `point`'s revision, merged in
/// revision order, for `snapshot save`. Runs on a blocking thread: the
/// shards held elsewhere are read a page at a time through `runtime`.
pub struct KeyspaceDump<'a> {
    /// By shard.
    shards: Vec<std::iter::Peekable<Revisions<'a>>>,
    /// The revision of the last one handed out, and the next sub-revision
    /// to give at it: each shard numbers its part of a cross-shard txn from
    /// 0, and the snapshot needs them distinct.
    main: i64,
    sub: u32,
}

/// One shard's stored revisions, in revision order.
type Revisions<'a> =
    Box<dyn Iterator<Item = Result<StoredRevision, cairn_etcd_compat::Error>> + 'a>;

/// The views of the shards held here, taken once each replica applied what
/// the read point needs; kept while the snapshot is written.
pub struct HeldViews {
    views: Vec<Option<cairn_mvcc::Export>>,
}

impl HeldViews {
    /// Waits until each shard held here has applied what `point` needs,
    /// and takes its view.
    pub fn take(
        member: &Member,
        shards: &Shards,
        point: &ReadPoint,
        runtime: &tokio::runtime::Handle,
    ) -> Result<HeldViews, cairn_etcd_compat::Error> {
        let mut views = Vec::new();
        for shard in 0..shards.count() {
            let Route::Local(local) = shards.route(shard) else {
                views.push(None);
                continue;
            };
            runtime
                .block_on(wait_applied(
                    member,
                    &local.handle,
                    point.needed(shard),
                    point.revoked(shard),
                ))
                .map_err(history_error)?;
            views.push(Some(local.handle.store().export()?));
        }
        Ok(HeldViews { views })
    }
}

impl<'a> KeyspaceDump<'a> {
    /// Reads the shards held here from `held` and the others from a member
    /// holding each, with the caller's `token`.
    pub fn new(
        member: &'a Member,
        shards: &'a Shards,
        held: &'a HeldViews,
        point: &'a ReadPoint,
        token: Option<String>,
        runtime: tokio::runtime::Handle,
    ) -> KeyspaceDump<'a> {
        let revision = point.revision;
        let readers = (0..shards.count())
            .zip(&held.views)
            .map(|(shard, view)| {
                let revisions: Revisions<'a> = match (view, shards.route(shard)) {
                    (Some(view), _) => Box::new(
                        view.revisions()
                            .take_while(move |r| r.as_ref().map_or(true, |r| r.main <= revision))
                            .map(|r| r.map_err(cairn_etcd_compat::Error::from)),
                    ),
                    (None, Route::Remote(replicas)) => Box::new(RemotePages {
                        member,
                        replicas,
                        runtime: runtime.clone(),
                        token: token.clone(),
                        read: ShardDump {
                            shard,
                            revision,
                            applied: point.needed(shard),
                            revoked: point.revoked(shard),
                            from_main: 0,
                            from_sub: 0,
                            limit: DUMP_PAGE,
                        },
                        page: VecDeque::new(),
                        done: false,
                        compacted: None,
                    }),
                    (None, Route::Local(_)) => Box::new(std::iter::empty()),
                };
                revisions.peekable()
            })
            .collect();
        KeyspaceDump {
            shards: readers,
            main: 0,
            sub: 0,
        }
    }
}

impl Iterator for KeyspaceDump<'_> {
    type Item = Result<StoredRevision, cairn_etcd_compat::Error>;

    fn next(&mut self) -> Option<Self::Item> {
        // The oldest revision any shard has next; at one revision (a
        // cross-shard txn), the lower shard first.
        let mut oldest: Option<(i64, usize)> = None;
        for (i, shard) in self.shards.iter_mut().enumerate() {
            match shard.peek() {
                Some(Err(_)) => return shard.next(),
                Some(Ok(revision)) if oldest.is_none_or(|(main, _)| revision.main < main) => {
                    oldest = Some((revision.main, i));
                }
                _ => {}
            }
        }
        let (_, i) = oldest?;
        let mut revision = match self.shards[i].next()? {
            Ok(revision) => revision,
            Err(e) => return Some(Err(e)),
        };
        if revision.main != self.main {
            self.main = revision.main;
            self.sub = 0;
        }
        revision.sub = self.sub;
        self.sub += 1;
        Some(Ok(revision))
    }
}

/// A shard held elsewhere, read a page at a time from a member holding it.
struct RemotePages<'a> {
    member: &'a Member,
    replicas: Vec<u64>,
    runtime: tokio::runtime::Handle,
    token: Option<String>,
    /// The next page's request.
    read: ShardDump,
    page: VecDeque<StoredRevision>,
    done: bool,
    /// The shard's compact revision when its first page was read.
    compacted: Option<i64>,
}

impl RemotePages<'_> {
    fn fetch(&mut self) -> Result<(), cairn_etcd_compat::Error> {
        let members = self.member.peers();
        let answer = self
            .runtime
            .block_on(self.member.forwarder().dump(
                &self.replicas,
                &members,
                self.token.as_deref(),
                self.read,
            ))
            .map_err(history_error)?;
        // A compaction between two pages may have dropped revisions the
        // first page's view still held: the pages would not be one view.
        if *self.compacted.get_or_insert(answer.compact_revision) != answer.compact_revision {
            return Err(cairn_etcd_compat::Error::History(
                format!(
                    "shard {} was compacted while the snapshot was read; save it again",
                    self.read.shard
                )
                .into(),
            ));
        }
        self.done = !answer.more;
        for revision in answer.revisions {
            self.read.from_main = revision.main;
            self.read.from_sub = revision.sub + 1;
            self.page.push_back(StoredRevision {
                main: revision.main,
                sub: revision.sub,
                tombstone: revision.tombstone,
                kv: revision.kv.unwrap_or_default(),
            });
        }
        Ok(())
    }
}

impl Iterator for RemotePages<'_> {
    type Item = Result<StoredRevision, cairn_etcd_compat::Error>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.page.is_empty()
            && !self.done
            && let Err(e) = self.fetch()
        {
            self.done = true;
            return Some(Err(e));
        }
        self.page.pop_front().map(Ok)
    }
}

fn history_error(status: Status) -> cairn_etcd_compat::Error {
    cairn_etcd_compat::Error::History(Box::new(status))
}

/// Defragments every store this member holds: the cluster group's and each
/// held shard's.
pub async fn defragment(member: &Member) -> Result<(), Status> {
    for store in member.stores() {
        tokio::task::spawn_blocking(move || store.defragment())
            .await
            .map_err(|e| Status::internal(format!("defragment did not finish: {e}")))?
            .map_err(mvcc_status)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use cairn_api::etcdserverpb::PutRequest;

    use super::*;

    fn revision(
        main: i64,
        sub: u32,
        key: &str,
    ) -> Result<StoredRevision, cairn_etcd_compat::Error> {
        Ok(StoredRevision {
            main,
            sub,
            tombstone: false,
            kv: cairn_api::mvccpb::KeyValue {
                key: Bytes::from(key.to_string()),
                mod_revision: main,
                ..Default::default()
            },
        })
    }

    #[test]
    fn shards_merge_in_revision_order_with_distinct_sub_revisions() {
        // Shard 0 holds revisions 2 and 4 and part of the txn at 5; shard 1
        // holds 3 and the rest of the txn, both parts numbered from 0.
        let shard0: Revisions<'_> = Box::new(
            vec![
                revision(2, 0, "a"),
                revision(4, 0, "b"),
                revision(5, 0, "t0"),
                revision(5, 1, "t1"),
            ]
            .into_iter(),
        );
        let shard1: Revisions<'_> =
            Box::new(vec![revision(3, 0, "c"), revision(5, 0, "t2")].into_iter());
        let merged = KeyspaceDump {
            shards: vec![shard0.peekable(), shard1.peekable()],
            main: 0,
            sub: 0,
        };
        let order: Vec<(i64, u32, String)> = merged
            .map(|r| {
                r.map(|r| {
                    (
                        r.main,
                        r.sub,
                        String::from_utf8_lossy(&r.kv.key).into_owned(),
                    )
                })
            })
            .collect::<Result<_, _>>()
            .expect("merged");
        let expected = [
            (2, 0, "a"),
            (3, 0, "c"),
            (4, 0, "b"),
            (5, 0, "t0"),
            (5, 1, "t1"),
            (5, 2, "t2"),
        ];
        let expected: Vec<(i64, u32, String)> = expected
            .iter()
            .map(|(main, sub, key)| (*main, *sub, key.to_string()))
            .collect();
        assert_eq!(order, expected);
    }

    #[test]
    fn a_shard_is_read_in_pages_up_to_the_revision() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        for i in 0..7u64 {
            let mut batch = store.write();
            batch.put(&PutRequest {
                key: Bytes::from(format!("k{i}")),
                value: Bytes::from_static(b"v"),
                ..Default::default()
            })?;
            batch.commit(i + 1)?;
        }
        // Revisions 2..=8 stored; read through 7, three at a time.
        let mut read = ShardDump {
            revision: 7,
            limit: 3,
            ..Default::default()
        };
        let mut pages = Vec::new();
        loop {
            let page = dump_page(&store, &read)?;
            let mains: Vec<i64> = page.revisions.iter().map(|r| r.main).collect();
            pages.push(mains);
            let Some(last) = page.revisions.last() else {
                break;
            };
            read.from_main = last.main;
            read.from_sub = last.sub + 1;
            if !page.more {
                break;
            }
        }
        assert_eq!(pages, vec![vec![2, 3, 4], vec![5, 6, 7]]);
        Ok(())
    }
}
