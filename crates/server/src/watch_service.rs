//! etcd's Watch service: one bidirectional stream per client carrying many
//! watchers. This layer decodes requests and encodes responses as etcd 3.4's
//! `serverWatchStream` does; which events each watcher gets is the watch
//! hub's business.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cairn_api::error::{self, EtcdError};
use cairn_api::etcdserverpb::watch_create_request::FilterType;
use cairn_api::etcdserverpb::watch_request::RequestUnion;
use cairn_api::etcdserverpb::watch_server::Watch;
use cairn_api::etcdserverpb::{WatchCreateRequest, WatchRequest, WatchResponse};
use cairn_auth::{Access, Credentials};
use cairn_watch_hub::{Delivery, WatchSpec, WatchStream};
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::member::Member;
use crate::stopping::ResponseStream;

/// Responses a stream may have in flight to a slow client; past that the
/// stream stops taking commits and catches up from the store later.
const RESPONSE_QUEUE: usize = 16;

pub struct WatchService {
    member: Arc<Member>,
    progress_interval: Duration,
}

impl WatchService {
    pub fn new(member: Arc<Member>, progress_interval: Duration) -> Self {
        WatchService {
            member,
            progress_interval,
        }
    }
}

#[tonic::async_trait]
impl Watch for WatchService {
    async fn watch(
        &self,
        request: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<ResponseStream<WatchResponse>>, Status> {
        // etcd's stream interceptor refuses every stream on a learner.
        self.member.refuse_on_learner()?;
        let credentials = crate::auth::credentials(&request);
        let requests = request.into_inner();
        let (tx, rx) = mpsc::channel(RESPONSE_QUEUE);
        let session = Session {
            member: self.member.clone(),
            stream: self.member.watch_stream(),
            out: tx,
            credentials,
        };
        tokio::spawn(session.run(requests, self.progress_interval));
        let responses = Box::pin(ReceiverStream::new(rx));
        Ok(Response::new(
            self.member.stop_signal().until_stopped(responses),
        ))
    }
}

/// One client's Watch stream.
struct Session {
    member: Arc<Member>,
    stream: WatchStream<crate::shard_events::KeyspaceEvents>,
    out: mpsc::Sender<Result<WatchResponse, Status>>,
    /// What the stream was opened with: every create is checked against
    /// the auth store as it is then.
    credentials: Credentials,
}

/// The client went away: the session ends.
struct Gone;

impl Session {
    async fn run(mut self, mut requests: Streaming<WatchRequest>, progress_interval: Duration) {
        let start = tokio::time::Instant::now() + progress_interval;
        let mut ticker = tokio::time::interval_at(start, progress_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut requests_open = true;
        loop {
            // Every branch is cancel-safe, `stream.next()` included.
            let done = tokio::select! {
                request = requests.next(), if requests_open => match request {
                    Some(Ok(request)) => self.handle(request).await,
                    // The client closed its side: as etcd's, its watchers
                    // go on until it goes away.
                    None => {
                        requests_open = false;
                        Ok(())
                    }
                    Some(Err(_)) => Err(Gone),
                },
                delivery = self.stream.next() => self.deliver(delivery).await,
                _ = ticker.tick() => self.progress().await,
                () = self.out.closed() => Err(Gone),
            };
            if done.is_err() {
                break;
            }
        }
    }

    async fn send(&self, response: WatchResponse) -> Result<(), Gone> {
        self.out.send(Ok(response)).await.map_err(|_| Gone)
    }

    fn response(&self, watch_id: i64, revision: i64) -> WatchResponse {
        WatchResponse {
            header: self.member.header(revision),
            watch_id,
            ..Default::default()
        }
    }

    async fn handle(&mut self, request: WatchRequest) -> Result<(), Gone> {
        match request.request_union {
            Some(RequestUnion::CreateRequest(create)) => {
                let revision = self.stream.revision();
                if let Err(refused) = self.permitted(&create).await {
                    // etcd 3.4 answers created and canceled at once, with
                    // the reason (a client refreshes its token on an
                    // invalid one or an old auth revision, and retries).
                    let response = WatchResponse {
                        created: true,
                        canceled: true,
                        cancel_reason: refused.message().to_string(),
                        ..self.response(-1, revision)
                    };
                    return self.send(response).await;
                }
                let spec = spec(create);
                if let Some(shards) = self.member.shards()
                    && !shards.watchable(&spec.key, &spec.range_end)
                {
                    let response = WatchResponse {
                        created: true,
                        canceled: true,
                        cancel_reason: "cairn: this member does not follow every shard of \
                                        these keys yet (a member holding one refused its feed: \
                                        the cluster secret is not applied everywhere yet); \
                                        retry, or watch through a member that holds them"
                            .into(),
                        ..self.response(-1, revision)
                    };
                    return self.send(response).await;
                }
                let mut response = match self.stream.create(spec) {
                    Ok(id) => self.response(id, revision),
                    // etcd 3.4 answers a refused create with watch ID -1,
                    // created and canceled, and the reason.
                    Err(e) => WatchResponse {
                        canceled: true,
                        cancel_reason: e.to_string(),
                        ..self.response(-1, revision)
                    },
                };
                response.created = true;
                self.send(response).await
            }
            Some(RequestUnion::CancelRequest(cancel)) => {
                // etcd says nothing about a watcher it does not have.
                if !self.stream.cancel(cancel.watch_id) {
                    return Ok(());
                }
                let response = WatchResponse {
                    canceled: true,
                    ..self.response(cancel.watch_id, self.stream.revision())
                };
                self.send(response).await
            }
            Some(RequestUnion::ProgressRequest(_)) => {
                // etcd 3.4 answers at once, for the whole stream (ID -1).
                let response = self.response(-1, self.stream.revision());
                self.send(response).await
            }
            None => Ok(()),
        }
    }

    /// Whether the stream's caller may read what `create` watches; if not,
    /// etcd's cancel reason: an invalid token, an old auth revision, no
    /// user, else permission denied (etcd's isWatchPermitted).
    async fn permitted(&self, create: &WatchCreateRequest) -> Result<(), EtcdError> {
        let auth = self.member.auth();
        let caller = auth.caller(&self.credentials).await?;
        auth.check(&caller, Access::Read, &create.key, &create.range_end)
            .map_err(|e| match e {
                error::AUTH_OLD_REVISION | error::USER_EMPTY => e,
                _ => error::PERMISSION_DENIED,
            })
    }

    async fn deliver(&mut self, delivery: Delivery) -> Result<(), Gone> {
        match delivery {
            Delivery::Events {
                watch_id,
                revision,
                events,
                fragment,
            } => {
                let response = WatchResponse {
                    events,
                    ..self.response(watch_id, revision)
                };
                if !fragment {
                    return self.send(response).await;
                }
                for part in cairn_api::watch::fragments(response, self.member.max_request_bytes()) {
                    self.send(part).await?;
                }
                Ok(())
            }
            Delivery::Compacted {
                watch_id,
                compact_revision,
            } => {
                let response = WatchResponse {
                    canceled: true,
                    compact_revision,
                    ..self.response(watch_id, self.stream.revision())
                };
                self.send(response).await
            }
            Delivery::Failed { watch_id, reason } => {
                tracing::warn!(watch_id, "watch cancelled: {reason}");
                let response = WatchResponse {
                    canceled: true,
                    cancel_reason: reason,
                    ..self.response(watch_id, self.stream.revision())
                };
                self.send(response).await
            }
        }
    }

    /// etcd's progress notification: an empty response at the current
    /// revision to each caught-up watcher that asked and saw no events.
    async fn progress(&mut self) -> Result<(), Gone> {
        let revision = self.stream.revision();
        for watch_id in self.stream.progress_due() {
            self.send(self.response(watch_id, revision)).await?;
        }
        Ok(())
    }
}

/// A create request as the hub takes it, with etcd's defaults: an empty key
/// is `\0`, the smallest key.
fn spec(create: WatchCreateRequest) -> WatchSpec {
    let filters = &create.filters;
    WatchSpec {
        watch_id: create.watch_id,
        key: if create.key.is_empty() {
            Bytes::from_static(&[0])
        } else {
            create.key
        },
        range_end: create.range_end,
        start_revision: create.start_revision,
        no_put: filters.contains(&(FilterType::Noput as i32)),
        no_delete: filters.contains(&(FilterType::Nodelete as i32)),
        prev_kv: create.prev_kv,
        progress_notify: create.progress_notify,
        fragment: create.fragment,
    }
}
