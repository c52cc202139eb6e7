//! The hub against a model store: ordering and exactly-once delivery while
//! streams lag, filters, prev_kv, compaction, watch IDs.

use std::time::Duration;

use proptest::prelude::*;

use super::*;

/// An in-memory store: every event ever committed, in revision order.
#[derive(Clone, Default)]
struct Model(Arc<Mutex<ModelState>>);

#[derive(Default)]
struct ModelState {
    events: Vec<Event>,
    current: i64,
    compact: i64,
}

fn rev_of(e: &Event) -> i64 {
    e.kv.as_ref().map_or(0, |kv| kv.mod_revision)
}

fn key_of(e: &Event) -> Bytes {
    e.kv.as_ref().map(|kv| kv.key.clone()).unwrap_or_default()
}

impl Model {
    fn new() -> Model {
        let model = Model::default();
        model.0.lock().current = 1;
        model
    }

    /// Commits one revision changing `keys` (deletes when `delete`) and
    /// publishes it, as the apply loop does.
    fn write(&self, hub: &WatchHub, keys: &[&str], delete: bool) {
        let commit = {
            let mut state = self.0.lock();
            let prev = state.current;
            let revision = prev + 1;
            let events: Vec<Event> = keys
                .iter()
                .map(|k| Event {
                    r#type: if delete {
                        EventType::Delete
                    } else {
                        EventType::Put
                    } as i32,
                    kv: Some(KeyValue {
                        key: Bytes::copy_from_slice(k.as_bytes()),
                        mod_revision: revision,
                        value: if delete {
                            Bytes::new()
                        } else {
                            Bytes::from(format!("v{revision}"))
                        },
                        ..Default::default()
                    }),
                    prev_kv: None,
                })
                .collect();
            state.events.extend(events.iter().cloned());
            state.current = revision;
            Commit {
                prev_revision: prev,
                revision,
                events,
            }
        };
        hub.publish(commit);
    }
}

impl EventSource for Model {
    fn current_revision(&self) -> i64 {
        self.0.lock().current
    }

    fn compact_revision(&self) -> i64 {
        self.0.lock().compact
    }

    fn events_since(
        &self,
        key: &[u8],
        range_end: &[u8],
        from_revision: i64,
        limit: usize,
    ) -> Result<(Vec<Event>, i64), CatchUpError> {
        let state = self.0.lock();
        if from_revision < state.compact {
            return Err(CatchUpError::Compacted);
        }
        let spec = WatchSpec {
            key: Bytes::copy_from_slice(key),
            range_end: Bytes::copy_from_slice(range_end),
            ..Default::default()
        };
        let mut out: Vec<Event> = Vec::new();
        for e in state.events.iter().filter(|e| rev_of(e) >= from_revision) {
            if out.len() >= limit && out.last().map(rev_of) != Some(rev_of(e)) {
                return Ok((out, rev_of(e)));
            }
            if spec.matches(&key_of(e)) {
                out.push(e.clone());
            }
        }
        Ok((out, state.current.max(from_revision - 1) + 1))
    }

    fn kv_at(&self, key: &[u8], revision: i64) -> Option<KeyValue> {
        let state = self.0.lock();
        let last = state
            .events
            .iter()
            .rfind(|e| rev_of(e) <= revision && &key_of(e)[..] == key)?;
        if last.r#type == EventType::Put as i32 {
            last.kv.clone()
        } else {
            None
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => panic!("runtime: {e}"),
    }
}

/// Everything the stream has for its client until it goes quiet.
async fn drain<S: EventSource>(stream: &mut WatchStream<S>) -> Vec<Delivery> {
    let mut out = Vec::new();
    while let Ok(d) = tokio::time::timeout(Duration::from_millis(20), stream.next()).await {
        out.push(d);
    }
    out
}

fn spec(key: &str, range_end: &str, start_revision: i64) -> WatchSpec {
    WatchSpec {
        key: Bytes::copy_from_slice(key.as_bytes()),
        range_end: Bytes::copy_from_slice(range_end.as_bytes()),
        start_revision,
        ..Default::default()
    }
}

/// (watch id, revision, key) of every event delivered.
fn events_of(deliveries: &[Delivery]) -> Vec<(i64, i64, Bytes)> {
    deliveries
        .iter()
        .flat_map(|d| match d {
            Delivery::Events {
                watch_id, events, ..
            } => events
                .iter()
                .map(|e| (*watch_id, rev_of(e), key_of(e)))
                .collect(),
            _ => Vec::new(),
        })
        .collect()
}

#[derive(Clone, Debug)]
enum Step {
    /// Commit one revision of these keys.
    Write(Vec<u8>),
    /// A watcher of key prefix `k` (one letter) from `back` revisions ago
    /// (0: from now).
    Watch(u8, i64),
    /// Let the stream deliver what it has.
    Drain,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => prop::collection::vec(0u8..3, 1..4).prop_map(Step::Write),
        1 => (0u8..3, 0i64..6).prop_map(|(k, back)| Step::Watch(k, back)),
        1 => Just(Step::Drain),
    ]
}

const KEYS: [&str; 3] = ["a", "b", "c"];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// However the writes, watchers and a tiny stream queue interleave,
    /// each watcher gets every event of its keys from its start revision on,
    /// once, in revision order.
    #[test]
    fn every_event_exactly_once_in_order(steps in prop::collection::vec(step(), 1..40)) {
        runtime().block_on(async {
            let hub = WatchHub::new();
            let model = Model::new();
            // A queue of one commit and small catch-up reads: streams lag
            // and catch up all the time.
            let mut stream = hub.open_with(model.clone(), 1, 2);
            let mut starts: Vec<(i64, &str, i64)> = Vec::new();
            let mut delivered = Vec::new();
            for step in steps {
                match step {
                    Step::Write(keys) => {
                        let mut names: Vec<&str> = keys.iter().map(|k| KEYS[*k as usize]).collect();
                        // A revision changes a key once, as in etcd.
                        names.sort_unstable();
                        names.dedup();
                        model.write(&hub, &names, false);
                    }
                    Step::Watch(k, back) => {
                        let current = model.current_revision();
                        let start = if back == 0 { 0 } else { (current - back).max(1) };
                        let key = KEYS[k as usize];
                        let id = stream.create(spec(key, "", start)).map_err(|e| {
                            TestCaseError::fail(format!("create: {e}"))
                        })?;
                        let from = if start == 0 { current + 1 } else { start };
                        starts.push((id, key, from));
                    }
                    Step::Drain => delivered.extend(drain(&mut stream).await),
                }
            }
            delivered.extend(drain(&mut stream).await);
            let got = events_of(&delivered);
            let all = model.0.lock().events.clone();
            for (id, key, from) in starts {
                let expected: Vec<(i64, i64, Bytes)> = all
                    .iter()
                    .filter(|e| rev_of(e) >= from && &key_of(e)[..] == key.as_bytes())
                    .map(|e| (id, rev_of(e), key_of(e)))
                    .collect();
                let mine: Vec<_> = got.iter().filter(|(w, _, _)| *w == id).cloned().collect();
                prop_assert_eq!(mine, expected, "watcher {} of {} from {}", id, key, from);
            }
            Ok::<(), TestCaseError>(())
        })?;
    }
}

#[test]
fn filters_prev_kv_and_one_response_per_commit() {
    runtime().block_on(async {
        let hub = WatchHub::new();
        let model = Model::new();
        let mut stream = hub.open(model.clone());
        let no_put = stream.create(WatchSpec {
            no_put: true,
            ..spec("a", "\0", 0)
        });
        let prev = stream.create(WatchSpec {
            prev_kv: true,
            no_delete: true,
            ..spec("a", "b", 0)
        });
        assert_eq!((no_put, prev), (Ok(0), Ok(1)));
        model.write(&hub, &["a", "ab"], false);
        model.write(&hub, &["a"], false);
        model.write(&hub, &["a", "ab"], true);
        let out = drain(&mut stream).await;
        assert_eq!(
            events_of(&out),
            vec![
                (1, 2, Bytes::from("a")),
                (1, 2, Bytes::from("ab")),
                (1, 3, Bytes::from("a")),
                (0, 4, Bytes::from("a")),
                (0, 4, Bytes::from("ab")),
            ]
        );
        // One response per watcher and commit.
        assert_eq!(out.len(), 3);
        let prev_value = match &out[1] {
            Delivery::Events { events, .. } => {
                events[0].prev_kv.as_ref().map(|kv| kv.value.clone())
            }
            _ => None,
        };
        assert_eq!(prev_value, Some(Bytes::from("v2")));
    });
}

#[test]
fn compacted_start_is_reported_and_ids_follow_etcd() {
    runtime().block_on(async {
        let hub = WatchHub::new();
        let model = Model::new();
        for _ in 0..5 {
            model.write(&hub, &["k"], false);
        }
        model.0.lock().compact = 4;
        let mut stream = hub.open(model.clone());
        assert_eq!(stream.create(spec("k", "", 2)), Ok(0));
        assert_eq!(
            stream.create(WatchSpec {
                watch_id: 0,
                ..spec("k", "", 4)
            }),
            Ok(1)
        );
        assert_eq!(
            stream.create(WatchSpec {
                watch_id: 1,
                ..spec("k", "", 0)
            }),
            Err(CreateError::DuplicateId)
        );
        assert_eq!(
            stream.create(spec("b", "a", 0)),
            Err(CreateError::EmptyRange)
        );
        let out = drain(&mut stream).await;
        assert_eq!(
            out.first(),
            Some(&Delivery::Compacted {
                watch_id: 0,
                compact_revision: 4
            })
        );
        assert_eq!(
            events_of(&out),
            vec![
                (1, 4, Bytes::from("k")),
                (1, 5, Bytes::from("k")),
                (1, 6, Bytes::from("k"))
            ]
        );
        assert!(stream.cancel(1));
        assert!(!stream.cancel(1));
        model.write(&hub, &["k"], false);
        assert!(drain(&mut stream).await.is_empty());
    });
}

#[test]
fn progress_is_due_for_quiet_synced_watchers_only() {
    runtime().block_on(async {
        let hub = WatchHub::new();
        let model = Model::new();
        let mut stream = hub.open(model.clone());
        let quiet = stream.create(WatchSpec {
            progress_notify: true,
            ..spec("q", "", 0)
        });
        let busy = stream.create(WatchSpec {
            progress_notify: true,
            ..spec("b", "", 0)
        });
        model.write(&hub, &["b"], false);
        drain(&mut stream).await;
        assert_eq!(busy, Ok(1));
        assert_eq!(stream.progress_due(), quiet.into_iter().collect::<Vec<_>>());
        assert_eq!(stream.progress_due(), vec![0, 1]);
    });
}
