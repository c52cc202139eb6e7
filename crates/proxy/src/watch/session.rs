//! One client's Watch stream: its create, cancel and progress requests,
//! and the responses its watchers are handed.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use cairn_api::etcdserverpb::watch_create_request::FilterType;
use cairn_api::etcdserverpb::watch_request::RequestUnion;
use cairn_api::etcdserverpb::{WatchCreateRequest, WatchRequest, WatchResponse};
use tokio::sync::mpsc;
use tonic::metadata::AsciiMetadataValue;
use tonic::{Status, Streaming};

use super::client::{ClientWatcher, Outbox, Outgoing};
use super::{Hub, RangeKey};

/// One client's Watch stream.
pub(super) struct Session {
    pub(super) hub: Arc<Hub>,
    pub(super) token: Option<AsciiMetadataValue>,
    pub(super) outbox: Outbox,
    /// watch ID → (registration, broadcast).
    pub(super) watchers: HashMap<i64, (u64, RangeKey)>,
    pub(super) next_id: i64,
    pub(super) out: mpsc::Sender<Result<WatchResponse, Status>>,
}

impl Session {
    pub(super) async fn run(
        mut self,
        mut requests: Streaming<WatchRequest>,
        mut outbox: mpsc::UnboundedReceiver<Outgoing>,
    ) {
        // A client that closes its side still gets its watchers' events, as
        // from etcd: the session ends when the client goes away.
        let mut requests_open = true;
        loop {
            tokio::select! {
                request = requests.message(), if requests_open => match request {
                    Ok(Some(request)) => {
                        if self.handle(request).await.is_err() {
                            break;
                        }
                    }
                    Ok(None) => requests_open = false,
                    Err(_) => break,
                },
                () = self.out.closed() => break,
                Some(outgoing) = outbox.recv() => {
                    self.outbox.queued.fetch_sub(1, Ordering::AcqRel);
                    if self.deliver(outgoing).await.is_err() {
                        break;
                    }
                }
            }
        }
        for (_, (reg, key)) in self.watchers.drain() {
            self.hub.leave(&key, reg);
            self.hub.metrics.client_watchers.dec();
        }
    }

    pub(super) async fn deliver(&mut self, outgoing: Outgoing) -> Result<(), ()> {
        let watch_id = outgoing.watch_id;
        match self.watchers.get(&watch_id) {
            Some((reg, _)) if *reg == outgoing.reg => {}
            _ => return Ok(()),
        }
        if outgoing.response.canceled {
            self.watchers.remove(&watch_id);
            self.hub.metrics.client_watchers.dec();
        }
        self.send(outgoing.response).await
    }

    pub(super) async fn send(&self, response: WatchResponse) -> Result<(), ()> {
        self.out.send(Ok(response)).await.map_err(|_| ())
    }

    pub(super) async fn handle(&mut self, request: WatchRequest) -> Result<(), ()> {
        match request.request_union {
            Some(RequestUnion::CreateRequest(create)) => self.create(create).await,
            Some(RequestUnion::CancelRequest(cancel)) => {
                let Some((reg, key)) = self.watchers.remove(&cancel.watch_id) else {
                    return Ok(());
                };
                self.hub.leave(&key, reg);
                self.hub.metrics.client_watchers.dec();
                let header = *self.hub.latest.lock();
                self.send(WatchResponse {
                    header: Some(header),
                    watch_id: cancel.watch_id,
                    canceled: true,
                    ..Default::default()
                })
                .await
            }
            Some(RequestUnion::ProgressRequest(_)) => {
                let header = *self.hub.latest.lock();
                self.send(WatchResponse {
                    header: Some(header),
                    watch_id: -1,
                    ..Default::default()
                })
                .await
            }
            None => Ok(()),
        }
    }

    pub(super) async fn create(&mut self, create: WatchCreateRequest) -> Result<(), ()> {
        let key = if create.key.is_empty() {
            Bytes::from_static(&[0])
        } else {
            create.key.clone()
        };
        let empty_range = !matches!(&create.range_end[..], [] | [0]) && key >= create.range_end;
        let duplicate = create.watch_id != 0 && self.watchers.contains_key(&create.watch_id);
        if empty_range || duplicate {
            let reason = if empty_range {
                "mvcc: watcher range is empty"
            } else {
                "mvcc: duplicate watch ID provided on the WatchStream"
            };
            let header = *self.hub.latest.lock();
            return self
                .send(WatchResponse {
                    header: Some(header),
                    watch_id: -1,
                    created: true,
                    canceled: true,
                    cancel_reason: reason.to_owned(),
                    ..Default::default()
                })
                .await;
        }
        let watch_id = if create.watch_id == 0 {
            while self.watchers.contains_key(&self.next_id) {
                self.next_id += 1;
            }
            self.next_id += 1;
            self.next_id - 1
        } else {
            create.watch_id
        };
        let (key, end) = self.hub.namespace.interval(&key, &create.range_end);
        let range = RangeKey {
            key,
            end,
            token: self.token.clone(),
        };
        let reg = self.hub.next_reg.fetch_add(1, Ordering::Relaxed);
        let watcher = ClientWatcher {
            reg,
            watch_id,
            outbox: self.outbox.clone(),
            no_put: create.filters.contains(&(FilterType::Noput as i32)),
            no_delete: create.filters.contains(&(FilterType::Nodelete as i32)),
            prev_kv: create.prev_kv,
            progress_notify: create.progress_notify,
            fragment_bytes: create.fragment.then_some(self.hub.max_request_bytes),
            next_rev: 0,
            quiet: true,
            namespace: self.hub.namespace.clone(),
        };
        self.watchers.insert(watch_id, (reg, range.clone()));
        self.hub.metrics.client_watchers.inc();
        self.hub.join(range, watcher, create.start_revision);
        Ok(())
    }
}
