//! etcd's alarms (NOSPACE, CORRUPT): raised and cleared by entries of the
//! log, kept in mvcc's state records in the same batch as the applied index
//! (so snapshots carry them), and consulted by the apply loop, which refuses
//! writes while one is active exactly as every other member does.

use std::collections::BTreeSet;

use cairn_api::alarm_record;
use cairn_api::etcdserverpb::alarm_request::AlarmAction;
use cairn_api::etcdserverpb::request_op::Request as Op;
use cairn_api::etcdserverpb::{
    AlarmMember, AlarmRequest, AlarmType, PutRequest, RequestOp, TxnRequest,
};
use cairn_mvcc::{MvccError, Store, WriteBatch};
use parking_lot::RwLock;
use prost::Message as _;

/// The active alarms, as applied.
#[derive(Default)]
pub struct Alarms {
    /// (member ID, alarm type)
    active: RwLock<BTreeSet<(u64, i32)>>,
}

impl Alarms {
    /// Replaces the active alarms with the ones `store` holds: at start, and
    /// after a snapshot replaced the store.
    pub fn load(&self, store: &Store) -> Result<(), MvccError> {
        let mut active = BTreeSet::new();
        for (key, value) in store.state_records(alarm_record::PREFIX)? {
            let alarm = AlarmMember::decode(value.as_slice()).map_err(|e| {
                MvccError::Corrupt(format!("alarm record {key:?} does not decode: {e}"))
            })?;
            active.insert((alarm.member_id, alarm.alarm));
        }
        *self.active.write() = active;
        Ok(())
    }

    /// The active alarms of type `alarm` (every type for NONE), by member.
    pub fn list(&self, alarm: i32) -> Vec<AlarmMember> {
        self.active
            .read()
            .iter()
            .filter(|(_, a)| alarm == AlarmType::None as i32 || *a == alarm)
            .map(|&(member_id, alarm)| AlarmMember { member_id, alarm })
            .collect()
    }

    /// Whether any member has an alarm of this type.
    pub fn is_active(&self, alarm: AlarmType) -> bool {
        self.active.read().iter().any(|(_, a)| *a == alarm as i32)
    }

    /// Whether member `member_id` has an alarm of this type.
    pub fn is_active_for(&self, member_id: u64, alarm: AlarmType) -> bool {
        self.active.read().contains(&(member_id, alarm as i32))
    }

    /// Applies an ACTIVATE or DEACTIVATE entry: records the change with the
    /// batch and answers with the alarm it concerned, as etcd does (nothing
    /// when deactivating an alarm that is not active).
    pub fn apply(&self, batch: &mut WriteBatch<'_>, request: &AlarmRequest) -> Vec<AlarmMember> {
        let alarm = AlarmMember {
            member_id: request.member_id,
            alarm: request.alarm,
        };
        let entry = (alarm.member_id, alarm.alarm);
        let key = alarm_record::key(&alarm);
        let mut active = self.active.write();
        match AlarmAction::try_from(request.action) {
            Ok(AlarmAction::Activate) => {
                if active.insert(entry) {
                    tracing::warn!(
                        member = format_args!("{:x}", alarm.member_id),
                        alarm = alarm_name(alarm.alarm),
                        "alarm raised"
                    );
                    batch.put_state_record(key, alarm.encode_to_vec());
                }
                vec![alarm]
            }
            Ok(AlarmAction::Deactivate) => {
                if active.remove(&entry) {
                    tracing::info!(
                        member = format_args!("{:x}", alarm.member_id),
                        alarm = alarm_name(alarm.alarm),
                        "alarm cleared"
                    );
                    batch.delete_state_record(key);
                    vec![alarm]
                } else {
                    Vec::new()
                }
            }
            // GET is answered without the log.
            Ok(AlarmAction::Get) | Err(_) => Vec::new(),
        }
    }
}

/// etcd's estimates of what a write adds to the store, for the quota check.
const KV_OVERHEAD: usize = 256;
pub const LEASE_COST: usize = 64;

pub fn put_cost(r: &PutRequest) -> usize {
    KV_OVERHEAD + r.key.len() + r.value.len()
}

/// The costlier branch's puts (nested txns count as nothing, as in etcd).
pub fn txn_cost(r: &TxnRequest) -> usize {
    let branch = |ops: &[RequestOp]| -> usize {
        ops.iter()
            .map(|op| match &op.request {
                Some(Op::RequestPut(p)) => put_cost(p),
                _ => 0,
            })
            .sum()
    };
    branch(&r.success).max(branch(&r.failure))
}

fn alarm_name(alarm: i32) -> &'static str {
    AlarmType::try_from(alarm).map_or("UNKNOWN", |a| a.as_str_name())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(action: AlarmAction, member_id: u64, alarm: AlarmType) -> AlarmRequest {
        AlarmRequest {
            action: action as i32,
            member_id,
            alarm: alarm as i32,
        }
    }

    #[test]
    fn alarms_are_stored_listed_and_cleared() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        let alarms = Alarms::default();
        let mut batch = store.write();
        let raised = alarms.apply(
            &mut batch,
            &request(AlarmAction::Activate, 7, AlarmType::Nospace),
        );
        assert_eq!(raised.len(), 1);
        alarms.apply(
            &mut batch,
            &request(AlarmAction::Activate, 9, AlarmType::Corrupt),
        );
        batch.commit(1)?;
        assert!(alarms.is_active(AlarmType::Nospace));
        assert_eq!(alarms.list(AlarmType::Corrupt as i32).len(), 1);
        assert_eq!(alarms.list(AlarmType::None as i32).len(), 2);

        let reloaded = Alarms::default();
        reloaded.load(&store)?;
        assert_eq!(
            reloaded.list(AlarmType::None as i32),
            alarms.list(AlarmType::None as i32)
        );

        let mut batch = store.write();
        let cleared = alarms.apply(
            &mut batch,
            &request(AlarmAction::Deactivate, 7, AlarmType::Nospace),
        );
        assert_eq!(cleared.len(), 1);
        let again = alarms.apply(
            &mut batch,
            &request(AlarmAction::Deactivate, 7, AlarmType::Nospace),
        );
        assert!(again.is_empty());
        batch.commit(2)?;
        assert!(!alarms.is_active(AlarmType::Nospace));
        reloaded.load(&store)?;
        assert_eq!(
            reloaded.list(AlarmType::None as i32),
            vec![AlarmMember {
                member_id: 9,
                alarm: AlarmType::Corrupt as i32
            }]
        );
        Ok(())
    }
}
