//! etcd 3.4's write-ahead log (`member/wal`), read once to migrate an etcd
//! data dir: the member and cluster IDs, the membership its conf changes
//! leave, and the committed writes `member/snap/db` does not hold yet (etcd
//! commits its database every 100 ms, so a member that was killed has
//! acknowledged writes only in its WAL).

use std::path::{Path, PathBuf};

use cairn_api::cairnpb::{self, AuthRequest, InternalRequest, auth_request, internal_request};
use cairn_api::etcdserverpb::{
    AlarmRequest, AuthDisableRequest, AuthEnableRequest, AuthRoleAddRequest, AuthRoleDeleteRequest,
    AuthRoleGrantPermissionRequest, AuthRoleRevokePermissionRequest, AuthUserAddRequest,
    AuthUserChangePasswordRequest, AuthUserDeleteRequest, AuthUserGrantRoleRequest,
    AuthUserRevokeRoleRequest, CompactionRequest, DeleteRangeRequest, LeaseCheckpointRequest,
    LeaseGrantRequest, LeaseRevokeRequest, PutRequest, TxnRequest,
};
use prost::Message as _;

use crate::member::stored_member;
use crate::{Error, Member};

/// What Cairn needs from etcd's WAL.
#[derive(Debug, Default, PartialEq)]
pub struct Wal {
    pub member_id: u64,
    pub cluster_id: u64,
    pub members: Vec<Member>,
    /// The committed writes after `consistent_index`, as Cairn's requests,
    /// with their raft indexes, in log order.
    pub writes: Vec<(u64, InternalRequest)>,
}

/// walpb.Record.
#[derive(Clone, PartialEq, prost::Message)]
struct WalRecord {
    #[prost(int64, tag = "1")]
    kind: i64,
    #[prost(uint32, tag = "2")]
    crc: u32,
    #[prost(bytes = "vec", tag = "3")]
    data: Vec<u8>,
}

/// etcdserverpb.Metadata, the WAL's metadata record.
#[derive(Clone, PartialEq, prost::Message)]
struct WalMetadata {
    #[prost(uint64, tag = "1")]
    node_id: u64,
    #[prost(uint64, tag = "2")]
    cluster_id: u64,
}

/// raftpb.Entry.
#[derive(Clone, PartialEq, prost::Message)]
struct RaftEntry {
    #[prost(int32, tag = "1")]
    kind: i32,
    #[prost(uint64, tag = "2")]
    term: u64,
    #[prost(uint64, tag = "3")]
    index: u64,
    #[prost(bytes = "vec", tag = "4")]
    data: Vec<u8>,
}

/// raftpb.ConfChange.
#[derive(Clone, PartialEq, prost::Message)]
struct ConfChange {
    #[prost(uint64, tag = "1")]
    id: u64,
    #[prost(int32, tag = "2")]
    kind: i32,
    #[prost(uint64, tag = "3")]
    node_id: u64,
    #[prost(bytes = "vec", tag = "4")]
    context: Vec<u8>,
}

/// raftpb.HardState, the WAL's state record.
#[derive(Clone, PartialEq, prost::Message)]
struct HardState {
    #[prost(uint64, tag = "1")]
    term: u64,
    #[prost(uint64, tag = "2")]
    vote: u64,
    #[prost(uint64, tag = "3")]
    commit: u64,
}

/// etcdserverpb.RequestHeader.
#[derive(Clone, PartialEq, prost::Message)]
struct EtcdRequestHeader {
    #[prost(uint64, tag = "1")]
    id: u64,
    #[prost(string, tag = "2")]
    username: String,
    #[prost(uint64, tag = "3")]
    auth_revision: u64,
}

/// etcdserverpb.InternalRaftRequest, etcd 3.4's entry data. Requests that
/// change nothing v3 keeps (v2 store writes, reads, authentications, whose
/// tokens die with the process) are kept as bytes, only to be told apart.
#[derive(Clone, PartialEq, prost::Message)]
struct EtcdRequest {
    #[prost(message, optional, tag = "100")]
    header: Option<EtcdRequestHeader>,
    #[prost(bytes = "vec", optional, tag = "2")]
    v2: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "3")]
    range: Option<Vec<u8>>,
    #[prost(message, optional, tag = "4")]
    put: Option<PutRequest>,
    #[prost(message, optional, tag = "5")]
    delete_range: Option<DeleteRangeRequest>,
    #[prost(message, optional, tag = "6")]
    txn: Option<TxnRequest>,
    #[prost(message, optional, tag = "7")]
    compaction: Option<CompactionRequest>,
    #[prost(message, optional, tag = "8")]
    lease_grant: Option<LeaseGrantRequest>,
    #[prost(message, optional, tag = "9")]
    lease_revoke: Option<LeaseRevokeRequest>,
    #[prost(message, optional, tag = "10")]
    alarm: Option<AlarmRequest>,
    #[prost(message, optional, tag = "11")]
    lease_checkpoint: Option<LeaseCheckpointRequest>,
    #[prost(message, optional, tag = "1000")]
    auth_enable: Option<AuthEnableRequest>,
    #[prost(message, optional, tag = "1011")]
    auth_disable: Option<AuthDisableRequest>,
    #[prost(bytes = "vec", optional, tag = "1012")]
    authenticate: Option<Vec<u8>>,
    #[prost(message, optional, tag = "1100")]
    auth_user_add: Option<AuthUserAddRequest>,
    #[prost(message, optional, tag = "1101")]
    auth_user_delete: Option<AuthUserDeleteRequest>,
    #[prost(bytes = "vec", optional, tag = "1102")]
    auth_user_get: Option<Vec<u8>>,
    #[prost(message, optional, tag = "1103")]
    auth_user_change_password: Option<AuthUserChangePasswordRequest>,
    #[prost(message, optional, tag = "1104")]
    auth_user_grant_role: Option<AuthUserGrantRoleRequest>,
    #[prost(message, optional, tag = "1105")]
    auth_user_revoke_role: Option<AuthUserRevokeRoleRequest>,
    #[prost(bytes = "vec", optional, tag = "1106")]
    auth_user_list: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "1107")]
    auth_role_list: Option<Vec<u8>>,
    #[prost(message, optional, tag = "1200")]
    auth_role_add: Option<AuthRoleAddRequest>,
    #[prost(message, optional, tag = "1201")]
    auth_role_delete: Option<AuthRoleDeleteRequest>,
    #[prost(bytes = "vec", optional, tag = "1202")]
    auth_role_get: Option<Vec<u8>>,
    #[prost(message, optional, tag = "1203")]
    auth_role_grant_permission: Option<AuthRoleGrantPermissionRequest>,
    #[prost(message, optional, tag = "1204")]
    auth_role_revoke_permission: Option<AuthRoleRevokePermissionRequest>,
}

impl EtcdRequest {
    /// The same write as Cairn proposes it, or None for what leaves the v3
    /// store as it is. etcd 3.4 hashes a new password when it applies the
    /// entry; Cairn's entries carry the hash, made here at `bcrypt_cost`.
    fn into_cairn(self, bcrypt_cost: u32) -> Result<Option<InternalRequest>, Error> {
        use auth_request::Request as Auth;
        use internal_request::Request as Write;
        let hash = |password: String| {
            bcrypt::hash(password, bcrypt_cost)
                .map(|h| h.into_bytes().into())
                .map_err(Error::Bcrypt)
        };
        let auth = |request| {
            Write::Auth(AuthRequest {
                request: Some(request),
            })
        };
        let request = if let Some(r) = self.put {
            Write::Put(r)
        } else if let Some(r) = self.delete_range {
            Write::DeleteRange(r)
        } else if let Some(r) = self.txn {
            Write::Txn(r)
        } else if let Some(r) = self.compaction {
            Write::Compaction(r)
        } else if let Some(r) = self.lease_grant {
            Write::LeaseGrant(r)
        } else if let Some(r) = self.lease_revoke {
            Write::LeaseRevoke(r)
        } else if let Some(r) = self.alarm {
            Write::Alarm(r)
        } else if let Some(r) = self.lease_checkpoint {
            Write::LeaseCheckpoint(r)
        } else if let Some(r) = self.auth_enable {
            auth(Auth::Enable(r))
        } else if let Some(r) = self.auth_disable {
            auth(Auth::Disable(r))
        } else if let Some(r) = self.auth_user_add {
            let no_password = r.options.as_ref().is_some_and(|o| o.no_password);
            auth(Auth::UserAdd(cairnpb::UserAdd {
                password_hash: if no_password {
                    Default::default()
                } else {
                    hash(r.password)?
                },
                name: r.name,
                options: r.options,
            }))
        } else if let Some(r) = self.auth_user_delete {
            auth(Auth::UserDelete(r))
        } else if let Some(r) = self.auth_user_change_password {
            auth(Auth::UserChangePassword(cairnpb::UserChangePassword {
                password_hash: hash(r.password)?,
                name: r.name,
            }))
        } else if let Some(r) = self.auth_user_grant_role {
            auth(Auth::UserGrantRole(r))
        } else if let Some(r) = self.auth_user_revoke_role {
            auth(Auth::UserRevokeRole(r))
        } else if let Some(r) = self.auth_role_add {
            auth(Auth::RoleAdd(r))
        } else if let Some(r) = self.auth_role_delete {
            auth(Auth::RoleDelete(r))
        } else if let Some(r) = self.auth_role_grant_permission {
            auth(Auth::RoleGrantPermission(r))
        } else if let Some(r) = self.auth_role_revoke_permission {
            auth(Auth::RoleRevokePermission(r))
        } else if self.v2.is_some()
            || self.range.is_some()
            || self.authenticate.is_some()
            || self.auth_user_get.is_some()
            || self.auth_user_list.is_some()
            || self.auth_role_list.is_some()
            || self.auth_role_get.is_some()
        {
            return Ok(None);
        } else {
            return Err(Error::Invalid(
                "a request of a kind etcd 3.4 does not write".into(),
            ));
        };
        Ok(Some(InternalRequest {
            request: Some(request),
            header: self.header.map(|h| cairnpb::RequestHeader {
                username: h.username,
                auth_revision: h.auth_revision,
            }),
        }))
    }
}

const WAL_METADATA: i64 = 1;
const WAL_ENTRY: i64 = 2;
const WAL_STATE: i64 = 3;
const WAL_CRC: i64 = 4;
/// etcd's smallest disk sector: a torn write leaves whole sectors unwritten.
const SECTOR: usize = 512;
const ENTRY_NORMAL: i32 = 0;
const ENTRY_CONF_CHANGE: i32 = 1;
const CONF_ADD_NODE: i32 = 0;
const CONF_REMOVE_NODE: i32 = 1;
const CONF_UPDATE_NODE: i32 = 2;
const CONF_ADD_LEARNER: i32 = 3;

/// A record's frame, the little-endian u64 before it: its length (low 56
/// bits) and the padding after it (the top byte's low 3 bits, when its
/// high bit is set).
fn frame_of(field: &[u8]) -> (usize, usize) {
    let mut bytes = [0; 8];
    bytes.copy_from_slice(&field[..8]);
    let field = u64::from_le_bytes(bytes);
    let len = (field & 0x00ff_ffff_ffff_ffff) as usize;
    let pad = if field >> 63 == 1 {
        ((field >> 56) & 0x7) as usize
    } else {
        0
    };
    (len, pad)
}

fn crc_mismatch(file: &Path, at: usize) -> Error {
    Error::Invalid(format!(
        "etcd's WAL {} is damaged: the record at byte {at} fails its CRC",
        file.display()
    ))
}

/// Whether a record (`framed`, at `offset` in its file) is a torn write, as
/// etcd decides it: some sector's share of it is all zeros.
fn torn(framed: &[u8], offset: usize) -> bool {
    let mut at = 0;
    while at < framed.len() {
        let end = (at + SECTOR - (offset + at) % SECTOR).min(framed.len());
        if framed[at..end].iter().all(|&b| b == 0) {
            return true;
        }
        at = end;
    }
    false
}

/// Reads etcd's WAL files in `dir`, in name order: records framed by a
/// little-endian u64 whose low 56 bits are the length and whose top byte,
/// when its high bit is set, holds the padding after the record (to 8
/// bytes) in its low 3 bits. Files end at a zero length (they are
/// preallocated). Returns the metadata (member and cluster IDs), the members
/// the conf-change entries leave (applied to `db_members`, the database's,
/// unless the log starts at index 1) and the writes committed after
/// `consistent_index` (the last entry the database holds), which etcd
/// itself would replay at its next start. A later entry at an index
/// overrides an earlier one (a new leader may rewrite the log's tail).
/// Every record's CRC is checked as etcd checks it: a CRC-32C running over
/// the data of every record, each file opening with a CRC record that
/// carries the previous file's. A record that fails it is damage (an
/// error), unless it is the last file's torn tail (a sector of it never
/// written), which etcd too takes for the end of the log.
pub fn read_wal(
    dir: &Path,
    db_members: &[Member],
    consistent_index: u64,
    bcrypt_cost: u32,
) -> Result<Wal, Error> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|error| Error::File {
            action: "reading etcd's WAL in",
            path: dir.to_owned(),
            error,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .collect();
    files.sort();
    let mut metadata = None;
    let mut commit = 0;
    let mut crc = 0u32;
    let mut entries: std::collections::BTreeMap<u64, RaftEntry> = Default::default();
    for (file_number, file) in files.iter().enumerate() {
        let last_file = file_number + 1 == files.len();
        let bytes = std::fs::read(file).map_err(|error| Error::File {
            action: "reading",
            path: file.clone(),
            error,
        })?;
        let decode = |what: &str, error| Error::Decode {
            what: format!("{what} of {}", file.display()),
            error,
        };
        let mut at = 0usize;
        while at + 8 <= bytes.len() {
            let (len, pad) = frame_of(&bytes[at..at + 8]);
            if len == 0 {
                break;
            }
            let start = at + 8;
            let Some(record) = bytes.get(start..start + len) else {
                tracing::warn!(file = %file.display(), "etcd WAL ends in a torn record");
                break;
            };
            let framed = &bytes[start..(start + len + pad).min(bytes.len())];
            let record = match WalRecord::decode(record) {
                Ok(record) => record,
                Err(_) if last_file && torn(framed, start) => {
                    tracing::warn!(file = %file.display(), "etcd WAL ends in a torn record");
                    break;
                }
                Err(e) => return Err(decode("a record", e)),
            };
            let data = record.data.as_slice();
            if record.kind == WAL_CRC {
                if crc != 0 && record.crc != crc {
                    return Err(crc_mismatch(file, at));
                }
                crc = record.crc;
            } else {
                crc = crc32c::crc32c_append(crc, data);
                if record.crc != crc {
                    if last_file && torn(framed, start) {
                        tracing::warn!(file = %file.display(), "etcd WAL ends in a torn record");
                        break;
                    }
                    return Err(crc_mismatch(file, at));
                }
            }
            match record.kind {
                WAL_METADATA => {
                    metadata =
                        Some(WalMetadata::decode(data).map_err(|e| decode("the metadata", e))?)
                }
                WAL_STATE => {
                    commit = HardState::decode(data)
                        .map_err(|e| decode("a hard state", e))?
                        .commit
                }
                WAL_ENTRY => {
                    let entry = RaftEntry::decode(data).map_err(|e| decode("an entry", e))?;
                    // A rewritten tail drops everything after it.
                    let _ = entries.split_off(&entry.index);
                    entries.insert(entry.index, entry);
                }
                _ => {}
            }
            at = start + len + pad;
        }
    }
    let metadata = metadata.ok_or_else(|| {
        Error::Invalid(format!("etcd's WAL in {} has no metadata", dir.display()))
    })?;
    // A log from index 1 holds every membership change; one that starts
    // later (etcd released the files before its last snapshot) applies its
    // changes to the membership the database recorded by then.
    let from_start = entries.keys().next() == Some(&1);
    let mut members: Vec<Member> = if from_start {
        Vec::new()
    } else {
        db_members.to_vec()
    };
    for entry in entries.values().filter(|e| e.kind == ENTRY_CONF_CHANGE) {
        let change = ConfChange::decode(entry.data.as_slice()).map_err(|error| Error::Decode {
            what: format!("the conf change at raft index {}", entry.index),
            error,
        })?;
        match change.kind {
            CONF_ADD_NODE | CONF_ADD_LEARNER | CONF_UPDATE_NODE => {
                let mut member = stored_member(&change.context)
                    .map_err(|e| Error::Invalid(format!("conf change at {}: {e}", entry.index)))?;
                member.id = change.node_id;
                let was_learner = members.iter().any(|m| m.id == member.id && m.is_learner);
                member.is_learner = change.kind == CONF_ADD_LEARNER
                    || change.kind == CONF_UPDATE_NODE && was_learner;
                members.retain(|m| m.id != member.id);
                members.push(member);
            }
            CONF_REMOVE_NODE => members.retain(|m| m.id != change.node_id),
            _ => {}
        }
    }
    let mut writes = Vec::new();
    let past_the_database = entries
        .range(consistent_index + 1..)
        .map(|(_, e)| e)
        .take_while(|e| e.index <= commit);
    for entry in past_the_database {
        // Empty entries are a new leader's first.
        if entry.kind != ENTRY_NORMAL || entry.data.is_empty() {
            continue;
        }
        let request =
            EtcdRequest::decode(entry.data.as_slice()).map_err(|error| Error::Decode {
                what: format!("etcd's request at raft index {}", entry.index),
                error,
            })?;
        let request = request.into_cairn(bcrypt_cost).map_err(|e| {
            Error::Invalid(format!("etcd's request at raft index {}: {e}", entry.index))
        })?;
        if let Some(request) = request {
            writes.push((entry.index, request));
        }
    }
    Ok(Wal {
        member_id: metadata.node_id,
        cluster_id: metadata.cluster_id,
        members,
        writes,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::member::{StoredMember, member_json};

    /// A WAL as a killed etcd member leaves it: its metadata, one AddNode
    /// per member from index 1, then one put of each key from index
    /// `first_put` (the entries between are gone), all committed.
    pub(crate) fn killed_members_wal(
        member_id: u64,
        cluster_id: u64,
        members: &[Member],
        first_put: u64,
        keys: &[&str],
    ) -> Vec<u8> {
        let mut wal = record(
            WAL_METADATA,
            WalMetadata {
                node_id: member_id,
                cluster_id,
            }
            .encode_to_vec(),
        );
        let mut index = 0;
        for member in members {
            index += 1;
            let change = ConfChange {
                id: 0,
                kind: CONF_ADD_NODE,
                node_id: member.id,
                context: member_json(member).into_bytes(),
            };
            let entry = RaftEntry {
                kind: ENTRY_CONF_CHANGE,
                term: 1,
                index,
                data: change.encode_to_vec(),
            };
            wal.extend(record(WAL_ENTRY, entry.encode_to_vec()));
        }
        index = index.max(first_put - 1);
        for key in keys {
            index += 1;
            let put = EtcdRequest {
                put: Some(PutRequest {
                    key: key.as_bytes().to_vec().into(),
                    value: b"from the WAL".to_vec().into(),
                    ..Default::default()
                }),
                ..Default::default()
            };
            wal.extend(normal(index, &put));
        }
        let state = HardState {
            term: 2,
            vote: member_id,
            commit: index,
        };
        wal.extend(record(WAL_STATE, state.encode_to_vec()));
        seal(&wal)
    }

    /// The records of `wal` (framed by [`record`], CRCs left 0) with the
    /// running CRC-32C etcd writes, and whatever follows them (zeros).
    pub(crate) fn seal(wal: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut crc = 0;
        let mut at = 0;
        while at + 8 <= wal.len() {
            let (len, pad) = frame_of(&wal[at..at + 8]);
            if len == 0 {
                break;
            }
            let mut rec = WalRecord::decode(&wal[at + 8..at + 8 + len]).expect("a record");
            crc = crc32c::crc32c_append(crc, &rec.data);
            rec.crc = crc;
            out.extend(frame(rec));
            at += 8 + len + pad;
        }
        out.extend_from_slice(&wal[at..]);
        out
    }

    /// One WAL record, framed and padded as etcd writes it, its CRC left 0
    /// for [`seal`].
    fn record(kind: i64, data: Vec<u8>) -> Vec<u8> {
        frame(WalRecord { kind, crc: 0, data })
    }

    fn frame(record: WalRecord) -> Vec<u8> {
        let body = record.encode_to_vec();
        let pad = (8 - body.len() % 8) % 8;
        let mut field = body.len() as u64;
        if pad != 0 {
            field |= (0x80 | pad as u64) << 56;
        }
        let mut out = field.to_le_bytes().to_vec();
        out.extend_from_slice(&body);
        out.extend(std::iter::repeat_n(0, pad));
        out
    }

    fn normal(index: u64, request: &EtcdRequest) -> Vec<u8> {
        let entry = RaftEntry {
            kind: ENTRY_NORMAL,
            term: 2,
            index,
            data: request.encode_to_vec(),
        };
        record(WAL_ENTRY, entry.encode_to_vec())
    }

    /// Only what is committed and past the database is replayed; reads,
    /// v2 writes and authentications are not writes of the v3 store.
    #[test]
    fn writes_past_the_database_up_to_the_commit_are_replayed() {
        let put = |key: &str| EtcdRequest {
            put: Some(PutRequest {
                key: key.as_bytes().to_vec().into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut wal = record(
            WAL_METADATA,
            WalMetadata {
                node_id: 1,
                cluster_id: 2,
            }
            .encode_to_vec(),
        );
        wal.extend(normal(1, &put("in-the-db")));
        wal.extend(normal(2, &put("rewritten")));
        // A new leader's empty entry, then index 2 rewritten.
        wal.extend(record(
            WAL_ENTRY,
            RaftEntry {
                kind: ENTRY_NORMAL,
                term: 3,
                index: 2,
                data: Vec::new(),
            }
            .encode_to_vec(),
        ));
        wal.extend(normal(3, &put("replayed")));
        let authenticate = EtcdRequest {
            authenticate: Some(Vec::new()),
            ..Default::default()
        };
        wal.extend(normal(4, &authenticate));
        let user_add = EtcdRequest {
            auth_user_add: Some(AuthUserAddRequest {
                name: "u".into(),
                password: "p".into(),
                options: None,
            }),
            header: Some(EtcdRequestHeader {
                id: 9,
                username: "root".into(),
                auth_revision: 5,
            }),
            ..Default::default()
        };
        wal.extend(normal(5, &user_add));
        wal.extend(record(
            WAL_STATE,
            HardState {
                term: 3,
                vote: 1,
                commit: 5,
            }
            .encode_to_vec(),
        ));
        wal.extend(normal(6, &put("not-committed")));
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("0-0.wal"), seal(&wal)).expect("write");

        let read = read_wal(dir.path(), &[], 1, 4).expect("read");
        let indexes: Vec<u64> = read.writes.iter().map(|(i, _)| *i).collect();
        assert_eq!(indexes, [3, 5]);
        match &read.writes[0].1.request {
            Some(internal_request::Request::Put(p)) => assert_eq!(&p.key[..], b"replayed"),
            other => panic!("{other:?}"),
        }
        let added = &read.writes[1].1;
        assert_eq!(
            added.header,
            Some(cairnpb::RequestHeader {
                username: "root".into(),
                auth_revision: 5
            })
        );
        let Some(internal_request::Request::Auth(AuthRequest {
            request: Some(auth_request::Request::UserAdd(u)),
        })) = &added.request
        else {
            panic!("{added:?}");
        };
        assert!(
            bcrypt::verify("p", std::str::from_utf8(&u.password_hash).expect("utf8"))
                .expect("hash")
        );

        let nothing_committed = read_wal(dir.path(), &[], 5, 4).expect("read");
        assert!(nothing_committed.writes.is_empty());
    }

    /// A WAL as etcd 3.4's `snapshot restore` writes it: metadata, then one
    /// AddNode conf change per member, records padded to 8 bytes.
    #[test]
    fn reads_membership_from_etcds_wal() {
        let member = |id: u64, name: &str| StoredMember {
            id,
            peer_urls: vec![format!("http://{name}:2380")],
            is_learner: false,
            name: name.into(),
            client_urls: Vec::new(),
        };
        let mut wal = record(
            WAL_METADATA,
            WalMetadata {
                node_id: 2,
                cluster_id: 99,
            }
            .encode_to_vec(),
        );
        for (index, (id, name, kind)) in [
            (1, "a", CONF_ADD_NODE),
            (2, "b", CONF_ADD_NODE),
            (3, "c", CONF_ADD_NODE),
            (1, "a", CONF_REMOVE_NODE),
        ]
        .into_iter()
        .enumerate()
        {
            let change = ConfChange {
                id: 0,
                kind,
                node_id: id,
                context: serde_json::to_vec(&member(id, name)).expect("json"),
            };
            let entry = RaftEntry {
                kind: ENTRY_CONF_CHANGE,
                term: 1,
                index: index as u64 + 1,
                data: change.encode_to_vec(),
            };
            wal.extend(record(WAL_ENTRY, entry.encode_to_vec()));
        }
        // Preallocated space after the last record.
        wal.extend(std::iter::repeat_n(0, 4096));
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("0000000000000000-0000000000000000.wal"),
            seal(&wal),
        )
        .expect("write");
        let stale = [Member {
            id: 42,
            name: "old".into(),
            ..Default::default()
        }];
        let read = read_wal(dir.path(), &stale, 0, 4).expect("read");
        assert_eq!(read.member_id, 2);
        assert_eq!(read.cluster_id, 99);
        let names: Vec<&str> = read.members.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["b", "c"]);
        assert_eq!(read.members[0].peer_urls, ["http://b:2380"]);

        // A log whose first files are gone: its changes apply to the
        // database's members.
        let path = dir.path().join("0000000000000000-0000000000000000.wal");
        let mut tail = record(
            WAL_METADATA,
            WalMetadata {
                node_id: 2,
                cluster_id: 99,
            }
            .encode_to_vec(),
        );
        let change = ConfChange {
            id: 0,
            kind: CONF_ADD_NODE,
            node_id: 2,
            context: serde_json::to_vec(&member(2, "b")).expect("json"),
        };
        let entry = RaftEntry {
            kind: ENTRY_CONF_CHANGE,
            term: 3,
            index: 500,
            data: change.encode_to_vec(),
        };
        tail.extend(record(WAL_ENTRY, entry.encode_to_vec()));
        std::fs::write(&path, seal(&tail)).expect("write");
        let read = read_wal(dir.path(), &stale, 0, 4).expect("read");
        let names: Vec<&str> = read.members.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["old", "b"]);
    }

    #[test]
    fn a_damaged_record_is_refused_and_a_torn_tail_ends_the_log() {
        let members = [Member {
            id: 2,
            name: "b".into(),
            peer_urls: vec!["http://b:2380".into()],
            ..Default::default()
        }];
        let wal = killed_members_wal(2, 99, &members, 2, &["k1", "k2"]);
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("0-0.wal");
        std::fs::write(&path, &wal).expect("write");
        assert_eq!(
            read_wal(dir.path(), &[], 0, 4).expect("read").writes.len(),
            2
        );

        // One bit of a key flipped: the CRC says so.
        let at = wal
            .windows(2)
            .rposition(|w| w == b"k1")
            .expect("the key is in the log");
        let mut damaged = wal.clone();
        damaged[at] ^= 0x01;
        std::fs::write(&path, &damaged).expect("write");
        let error = read_wal(dir.path(), &[], 0, 4).expect_err("damage is found");
        assert!(error.to_string().contains("fails its CRC"), "{error}");

        // The last record cut off by a crash (its sector never written,
        // zeros where it was): the log ends before it, as etcd reads it.
        let mut last = 0;
        let mut offset = 0;
        while offset + 8 <= wal.len() {
            let (len, pad) = frame_of(&wal[offset..offset + 8]);
            last = offset;
            offset += 8 + len + pad;
        }
        let mut torn = wal.clone();
        torn.truncate(last + 8);
        torn.extend(std::iter::repeat_n(0, wal.len() - last - 8));
        std::fs::write(&path, &torn).expect("write");
        let read = read_wal(dir.path(), &[], 0, 4).expect("a torn tail is the end");
        assert_eq!(read.member_id, 2);
    }

    proptest::proptest! {
        /// etcd's WAL damaged anywhere (a data dir to migrate is untrusted
        /// input) is read or refused, and never panics the reader. `make
        /// fuzz` runs many more cases.
        #[test]
        fn a_damaged_etcd_wal_never_panics_the_reader(
            flips in proptest::collection::vec(
                (proptest::prelude::any::<proptest::sample::Index>(), 0u8..=255),
                1..8,
            ),
            cut in proptest::prelude::any::<proptest::sample::Index>(),
        ) {
            let members = [Member {
                id: 2,
                name: "b".into(),
                peer_urls: vec!["http://b:2380".into()],
                ..Default::default()
            }];
            let mut wal = killed_members_wal(2, 99, &members, 2, &["k1", "k2", "k3"]);
            for (at, value) in &flips {
                let at = at.index(wal.len());
                wal[at] ^= value | 1;
            }
            wal.truncate(cut.index(wal.len() + 1));
            let dir = tempfile::tempdir().expect("tempdir");
            std::fs::write(dir.path().join("0-0.wal"), &wal).expect("write");
            let _ = read_wal(dir.path(), &[], 0, 4);
        }
    }
}
