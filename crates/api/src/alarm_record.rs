//! How a member keeps its active alarms (etcd's NOSPACE, CORRUPT): one
//! state record of the store each, keyed `alarm/` + member ID + alarm type
//! (both big-endian), holding the `AlarmMember`. The member applies them;
//! snapshots carry them, and etcd's `alarm` bucket maps to them.

use crate::etcdserverpb::AlarmMember;

/// The prefix every alarm record's key starts with.
pub const PREFIX: &[u8] = b"alarm/";

/// The key of `alarm`'s record.
pub fn key(alarm: &AlarmMember) -> Vec<u8> {
    let mut key = PREFIX.to_vec();
    key.extend_from_slice(&alarm.member_id.to_be_bytes());
    key.extend_from_slice(&alarm.alarm.to_be_bytes());
    key
}
