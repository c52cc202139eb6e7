//! The KV benchmarks: put, range and txn-put.

use bytes::Bytes;
use cairn_api::etcdserverpb::kv_client::KvClient;
use cairn_api::etcdserverpb::{PutRequest, RangeRequest, RequestOp, TxnRequest, request_op};
use tonic::transport::Channel;

use crate::conn::{Connections, MAX_MESSAGE};
use crate::driver::Worker;
use crate::keys::KeyPicker;

pub fn kv_client(channel: Channel) -> KvClient<Channel> {
    KvClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

/// Puts one key of the key space per request.
pub struct PutWorker {
    kv: KvClient<Channel>,
    keys: KeyPicker,
    value: Bytes,
}

impl PutWorker {
    pub fn all(conns: &Connections, clients: usize, keys: &KeyPicker, value: &Bytes) -> Vec<Self> {
        (0..clients)
            .map(|i| PutWorker {
                kv: kv_client(conns.get(i)),
                keys: keys.clone(),
                value: value.clone(),
            })
            .collect()
    }
}

impl Worker for PutWorker {
    async fn request(&mut self, n: u64) -> Result<(), tonic::Status> {
        let request = PutRequest {
            key: self.keys.key(n),
            value: self.value.clone(),
            ..Default::default()
        };
        self.kv.put(request).await.map(drop)
    }
}

/// Reads the same key or range every request.
pub struct RangeWorker {
    kv: KvClient<Channel>,
    request: RangeRequest,
}

impl RangeWorker {
    pub fn all(
        conns: &Connections,
        clients: usize,
        key: &Bytes,
        range_end: &Bytes,
        serializable: bool,
    ) -> Vec<Self> {
        (0..clients)
            .map(|i| RangeWorker {
                kv: kv_client(conns.get(i)),
                request: RangeRequest {
                    key: key.clone(),
                    range_end: range_end.clone(),
                    serializable,
                    ..Default::default()
                },
            })
            .collect()
    }
}

impl Worker for RangeWorker {
    async fn request(&mut self, _n: u64) -> Result<(), tonic::Status> {
        self.kv.range(self.request.clone()).await.map(drop)
    }
}

/// A txn of `ops` puts to distinct keys per request.
pub struct TxnPutWorker {
    kv: KvClient<Channel>,
    keys: KeyPicker,
    value: Bytes,
    ops: u64,
}

impl TxnPutWorker {
    pub fn all(
        conns: &Connections,
        clients: usize,
        keys: &KeyPicker,
        value: &Bytes,
        ops: u64,
    ) -> Vec<Self> {
        (0..clients)
            .map(|i| TxnPutWorker {
                kv: kv_client(conns.get(i)),
                keys: keys.clone(),
                value: value.clone(),
                ops,
            })
            .collect()
    }
}

impl Worker for TxnPutWorker {
    async fn request(&mut self, n: u64) -> Result<(), tonic::Status> {
        let success = self
            .keys
            .distinct_keys(n, self.ops)
            .into_iter()
            .map(|key| RequestOp {
                request: Some(request_op::Request::RequestPut(PutRequest {
                    key,
                    value: self.value.clone(),
                    ..Default::default()
                })),
            })
            .collect();
        let request = TxnRequest {
            success,
            ..Default::default()
        };
        self.kv.txn(request).await.map(drop)
    }
}
