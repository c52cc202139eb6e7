//! The apply loop's state machine: committed requests run against mvcc, a
//! whole batch of entries in one store write together with its applied index.

use cairn_api::cairnpb::InternalRequest;
use cairn_api::cairnpb::internal_request::Request;
use cairn_api::etcdserverpb::{CompactionResponse, DeleteRangeResponse, PutResponse, TxnResponse};
use std::path::Path;
use std::sync::Arc;

use cairn_consensus::{BoxError, Committed, SnapshotSource, StateMachine};
use cairn_mvcc::{MvccError, Store};
use prost::Message as _;

/// What applying one write produced.
#[derive(Debug)]
pub enum Applied {
    Put(PutResponse),
    DeleteRange(DeleteRangeResponse),
    Txn(TxnResponse),
    Compaction(CompactionResponse),
}

pub type ApplyResult = Result<Applied, MvccError>;

pub struct Applier {
    store: Store,
}

impl Applier {
    pub fn new(store: Store) -> Self {
        Applier { store }
    }
}

/// Errors that say the store itself failed, not the request.
fn is_fatal(e: &MvccError) -> bool {
    !matches!(
        e,
        MvccError::Compacted | MvccError::FutureRevision | MvccError::KeyNotFound
    )
}

impl StateMachine for Applier {
    type Output = ApplyResult;

    fn applied_index(&self) -> u64 {
        self.store.applied_index()
    }

    fn apply(
        &mut self,
        entries: &[Committed],
        applied_index: u64,
    ) -> Result<Vec<ApplyResult>, BoxError> {
        let mut batch = self.store.write();
        let mut results = Vec::with_capacity(entries.len());
        for entry in entries {
            let request = InternalRequest::decode(entry.data.clone())
                .map_err(|e| format!("entry {} does not decode: {e}", entry.index))?;
            let result = match request.request {
                Some(Request::Put(r)) => batch.put(&r).map(Applied::Put),
                Some(Request::DeleteRange(r)) => batch.delete_range(&r).map(Applied::DeleteRange),
                Some(Request::Txn(r)) => batch.txn(&r).map(Applied::Txn),
                Some(Request::Compaction(r)) => batch.compact(r.revision).map(Applied::Compaction),
                None => return Err(format!("entry {} holds no request", entry.index).into()),
            };
            if let Err(e) = &result
                && is_fatal(e)
            {
                return Err(format!("applying entry {}: {e}", entry.index).into());
            }
            results.push(result);
        }
        batch.commit(applied_index)?;
        Ok(results)
    }

    fn sync(&mut self) -> Result<(), BoxError> {
        Ok(self.store.sync()?)
    }

    fn snapshot_source(&self) -> Arc<dyn SnapshotSource> {
        Arc::new(StoreSnapshots(self.store.clone()))
    }

    fn restore(&mut self, file: &Path) -> Result<(), BoxError> {
        let mut input = std::io::BufReader::new(std::fs::File::open(file)?);
        Ok(self.store.restore_snapshot(&mut input)?)
    }
}

/// Snapshots of the mvcc store, streamed to members that fell behind.
struct StoreSnapshots(Store);

impl SnapshotSource for StoreSnapshots {
    fn write_snapshot(&self, out: &mut dyn std::io::Write) -> Result<u64, BoxError> {
        Ok(self.0.write_snapshot(out)?)
    }
}
