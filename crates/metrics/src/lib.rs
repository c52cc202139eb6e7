//! A member's Prometheus metrics, under etcd's names, help texts and
//! types, in the text exposition format of the `prometheus` crate.
//!
//! [`Metrics`] is made once by the member's wiring and handed to what
//! records: the apply loop counts puts and deletes ([`StoreCounters`]), the
//! client router counts gRPC calls (cairn-grpc-metrics'
//! [`GrpcMetricsLayer`]). What the member
//! knows only when asked (raft's state and counters, the store's size)
//! comes in a [`MemberSample`] at each scrape.
//!
//! ```
//! use cairn_api::mvccpb::{Event, KeyValue};
//! use cairn_metrics::{MemberSample, Metrics};
//!
//! let metrics = Metrics::new()?;
//! let put = Event { kv: Some(KeyValue { key: "k".into(), ..Default::default() }), ..Default::default() };
//! metrics.store().record(&[put]);
//! let page = metrics.render(&MemberSample { has_leader: true, ..Default::default() });
//! assert!(page.contains("etcd_server_has_leader 1"));
//! assert!(page.contains("etcd_mvcc_put_total 1"));
//! # Ok::<(), prometheus::Error>(())
//! ```

use std::sync::Arc;
use std::time::Duration;

use cairn_api::mvccpb::Event;
use cairn_api::mvccpb::event::EventType;
use cairn_consensus::{FSYNC_BUCKETS, RaftMetricsSnapshot};
use cairn_grpc_metrics::{GrpcCounters, GrpcMetricsLayer};
use prometheus::proto::{self, LabelPair, MetricFamily, MetricType};
use prometheus::{HistogramOpts, HistogramVec, IntCounter, Registry, TextEncoder};

use cairn_api::{ETCD_CLUSTER_VERSION, ETCD_VERSION};
/// Why the registry could not be built.
pub use prometheus::Error as MetricsError;

/// The member's metrics: one registry, and the counters that the hot paths
/// bump with one atomic add.
pub struct Metrics {
    registry: Registry,
    store: StoreCounters,
    grpc: Arc<GrpcCounters>,
    /// etcd's etcd_network_peer_round_trip_time_seconds, by peer (`To`).
    peer_round_trip: HistogramVec,
}

impl Metrics {
    /// The counters, registered with the process metrics.
    pub fn new() -> prometheus::Result<Metrics> {
        let registry = Registry::new();
        let store = StoreCounters {
            puts: IntCounter::new(
                "etcd_mvcc_put_total",
                "Total number of puts seen by this member.",
            )?,
            deletes: IntCounter::new(
                "etcd_mvcc_delete_total",
                "Total number of deletes seen by this member.",
            )?,
        };
        registry.register(Box::new(store.puts.clone()))?;
        registry.register(Box::new(store.deletes.clone()))?;
        let grpc = GrpcCounters::register(&registry)?;
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        // etcd's buckets: 0.1 ms doubling, 14 of them.
        let peer_round_trip = HistogramVec::new(
            HistogramOpts::new(
                "etcd_network_peer_round_trip_time_seconds",
                "Round-Trip-Time histogram between peers",
            )
            .buckets(prometheus::exponential_buckets(0.0001, 2.0, 14)?),
            &["To"],
        )?;
        registry.register(Box::new(peer_round_trip.clone()))?;
        Ok(Metrics {
            registry,
            store,
            grpc,
            peer_round_trip,
        })
    }

    /// One round trip to the peer `to`, as a probe of it measured.
    pub fn peer_round_trip(&self, to: u64, took: Duration) {
        self.peer_round_trip
            .with_label_values(&[&format!("{to:x}")])
            .observe(took.as_secs_f64());
    }

    /// The counters of the apply loop.
    pub fn store(&self) -> StoreCounters {
        self.store.clone()
    }

    /// The layer that counts the gRPC calls of the services it wraps.
    pub fn grpc_layer(&self) -> GrpcMetricsLayer {
        self.grpc.layer()
    }

    /// The text exposition of every metric, `member`'s state among them.
    pub fn render(&self, member: &MemberSample) -> String {
        let mut families = member.families();
        families.extend(self.registry.gather());
        families.sort_by(|a, b| a.name().cmp(b.name()));
        TextEncoder::new()
            .encode_to_string(&families)
            .unwrap_or_else(|e| {
                tracing::warn!("rendering metrics: {e}");
                String::new()
            })
    }
}

/// Counters of the key-value store, bumped by the apply loop.
#[derive(Clone)]
pub struct StoreCounters {
    puts: IntCounter,
    deletes: IntCounter,
}

impl StoreCounters {
    /// Counts one applied batch's events.
    pub fn record(&self, events: &[Event]) {
        let deletes = events
            .iter()
            .filter(|e| e.r#type == EventType::Delete as i32)
            .count() as u64;
        let puts = events.len() as u64 - deletes;
        if puts > 0 {
            self.puts.inc_by(puts);
        }
        if deletes > 0 {
            self.deletes.inc_by(deletes);
        }
    }
}

/// What the member reports of its own state when scraped.
#[derive(Debug, Clone, Default)]
pub struct MemberSample {
    pub id: u64,
    pub has_leader: bool,
    pub is_leader: bool,
    pub is_learner: bool,
    pub committed_index: u64,
    pub applied_index: u64,
    pub raft: RaftMetricsSnapshot,
    pub keys: u64,
    pub revision: u64,
    pub compact_revision: u64,
    pub db_total_bytes: u64,
    pub db_in_use_bytes: u64,
    /// Bytes in the store's block cache (Cairn's own).
    pub block_cache_bytes: u64,
    /// With --shards: this member's replica of each shard it holds.
    pub shards: Vec<ShardSample>,
}

/// One shard replica's state when scraped.
#[derive(Debug, Clone, Default)]
pub struct ShardSample {
    pub shard: u32,
    pub is_leader: bool,
    pub applied_index: u64,
    pub revision: u64,
    pub keys: u64,
    pub db_total_bytes: u64,
}

impl MemberSample {
    fn families(&self) -> Vec<MetricFamily> {
        let raft = &self.raft;
        // etcd labels the cluster version by major and minor only.
        let cluster_version = ETCD_CLUSTER_VERSION
            .rsplit_once('.')
            .map_or(ETCD_CLUSTER_VERSION, |(minor, _)| minor);
        vec![
            gauge(
                "etcd_server_has_leader",
                "Whether or not a leader exists. 1 is existence, 0 is not.",
                &[],
                u64::from(self.has_leader),
            ),
            gauge(
                "etcd_server_is_leader",
                "Whether or not this member is a leader. 1 if is, 0 otherwise.",
                &[],
                u64::from(self.is_leader),
            ),
            gauge(
                "etcd_server_is_learner",
                "Whether or not this member is a learner. 1 if is, 0 otherwise.",
                &[],
                u64::from(self.is_learner),
            ),
            gauge(
                "etcd_server_proposals_committed_total",
                "The total number of consensus proposals committed.",
                &[],
                self.committed_index,
            ),
            gauge(
                "etcd_server_proposals_applied_total",
                "The total number of consensus proposals applied.",
                &[],
                self.applied_index,
            ),
            counter(
                "etcd_server_leader_changes_seen_total",
                "The number of leader changes seen.",
                raft.leader_changes,
            ),
            gauge(
                "etcd_server_proposals_pending",
                "The current number of pending proposals to commit.",
                &[],
                raft.proposals_pending.max(0) as u64,
            ),
            counter(
                "etcd_server_proposals_failed_total",
                "The total number of failed proposals seen.",
                raft.proposals_failed,
            ),
            fsync_histogram(raft),
            gauge(
                "etcd_server_id",
                "Server or member ID in hexadecimal format. 1 for 'server_id' label with current ID.",
                &[("server_id", &format!("{:x}", self.id))],
                1,
            ),
            gauge(
                "etcd_server_version",
                "Which version is running. 1 for 'server_version' label with current version.",
                &[("server_version", ETCD_VERSION)],
                1,
            ),
            gauge(
                "etcd_cluster_version",
                "Which version is running. 1 for 'cluster_version' label with current cluster version",
                &[("cluster_version", cluster_version)],
                1,
            ),
            gauge(
                "etcd_debugging_mvcc_keys_total",
                "Total number of keys.",
                &[],
                self.keys,
            ),
            gauge(
                "etcd_mvcc_current_revision",
                "The current revision of store.",
                &[],
                self.revision,
            ),
            gauge(
                "etcd_debugging_mvcc_current_revision",
                "The current revision of store.",
                &[],
                self.revision,
            ),
            gauge(
                "etcd_mvcc_compact_revision",
                "The revision of the last compaction in store.",
                &[],
                self.compact_revision,
            ),
            gauge(
                "etcd_mvcc_db_total_size_in_bytes",
                "Total size of the underlying database physically allocated in bytes.",
                &[],
                self.db_total_bytes,
            ),
            gauge(
                "etcd_mvcc_db_total_size_in_use_in_bytes",
                "Total size of the underlying database logically in use in bytes.",
                &[],
                self.db_in_use_bytes,
            ),
            gauge(
                "cairn_mvcc_block_cache_bytes",
                "Bytes of table blocks the store's block cache holds.",
                &[],
                self.block_cache_bytes,
            ),
        ]
        .into_iter()
        .chain(self.shard_families())
        .collect()
    }

    /// Per shard held, labelled `shard`; none without --shards.
    fn shard_families(&self) -> Vec<MetricFamily> {
        if self.shards.is_empty() {
            return Vec::new();
        }
        let per_shard = |name: &str, help: &str, value: fn(&ShardSample) -> u64| {
            let metrics = self.shards.iter().map(|shard| {
                let mut gauge = proto::Gauge::default();
                gauge.set_value(value(shard) as f64);
                let mut metric = proto::Metric::from_gauge(gauge);
                let mut label = LabelPair::default();
                label.set_name("shard".to_string());
                label.set_value(shard.shard.to_string());
                metric.set_label(vec![label]);
                metric
            });
            let mut family = family(name, help, MetricType::GAUGE, proto::Metric::default());
            family.set_metric(metrics.collect());
            family
        };
        vec![
            per_shard(
                "cairn_shard_is_leader",
                "Whether this member leads the shard's raft group. 1 if it does, 0 otherwise.",
                |s| u64::from(s.is_leader),
            ),
            per_shard(
                "cairn_shard_applied_index",
                "The last index of the shard's log applied to this member's replica.",
                |s| s.applied_index,
            ),
            per_shard(
                "cairn_shard_current_revision",
                "The keyspace revision of the shard's last write this member's replica holds.",
                |s| s.revision,
            ),
            per_shard(
                "cairn_shard_keys_total",
                "Keys in this member's replica of the shard.",
                |s| s.keys,
            ),
            per_shard(
                "cairn_shard_db_total_size_in_bytes",
                "Bytes this member's replica of the shard takes on disk.",
                |s| s.db_total_bytes,
            ),
        ]
    }
}

fn family(name: &str, help: &str, kind: MetricType, metric: proto::Metric) -> MetricFamily {
    let mut family = MetricFamily::default();
    family.set_name(name.to_string());
    family.set_help(help.to_string());
    family.set_field_type(kind);
    family.set_metric(vec![metric]);
    family
}

fn gauge(name: &str, help: &str, labels: &[(&str, &str)], value: u64) -> MetricFamily {
    let mut gauge = proto::Gauge::default();
    gauge.set_value(value as f64);
    let mut metric = proto::Metric::from_gauge(gauge);
    metric.set_label(
        labels
            .iter()
            .map(|(name, value)| {
                let mut pair = LabelPair::default();
                pair.set_name(name.to_string());
                pair.set_value(value.to_string());
                pair
            })
            .collect(),
    );
    family(name, help, MetricType::GAUGE, metric)
}

fn counter(name: &str, help: &str, value: u64) -> MetricFamily {
    let mut counter = proto::Counter::default();
    counter.set_value(value as f64);
    let mut metric = proto::Metric::default();
    metric.set_counter(counter);
    family(name, help, MetricType::COUNTER, metric)
}

/// etcd_disk_wal_fsync_duration_seconds, from the consensus layer's
/// cumulative buckets.
fn fsync_histogram(raft: &RaftMetricsSnapshot) -> MetricFamily {
    let mut histogram = proto::Histogram::default();
    histogram.set_bucket(
        FSYNC_BUCKETS
            .iter()
            .zip(&raft.fsync_cumulative)
            .map(|(&bound, &count)| {
                let mut bucket = proto::Bucket::default();
                bucket.set_upper_bound(bound);
                bucket.set_cumulative_count(count);
                bucket
            })
            .collect(),
    );
    histogram.set_sample_count(raft.fsync_count);
    histogram.set_sample_sum(raft.fsync_seconds_sum);
    let mut metric = proto::Metric::default();
    metric.set_histogram(histogram);
    family(
        "etcd_disk_wal_fsync_duration_seconds",
        "The latency distributions of fsync called by WAL.",
        MetricType::HISTOGRAM,
        metric,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: EventType) -> Event {
        Event {
            r#type: kind as i32,
            ..Default::default()
        }
    }

    #[test]
    fn events_count_as_puts_and_deletes() -> prometheus::Result<()> {
        let metrics = Metrics::new()?;
        metrics.store().record(&[
            event(EventType::Put),
            event(EventType::Delete),
            event(EventType::Put),
        ]);
        let text = metrics.render(&MemberSample::default());
        assert!(text.contains("\netcd_mvcc_put_total 2\n"), "{text}");
        assert!(text.contains("\netcd_mvcc_delete_total 1\n"), "{text}");
        Ok(())
    }

    #[test]
    fn peer_round_trips_are_etcds_histogram_by_peer() -> prometheus::Result<()> {
        let metrics = Metrics::new()?;
        metrics.peer_round_trip(0xabc, Duration::from_micros(150));
        let text = metrics.render(&MemberSample::default());
        for expected in [
            "# TYPE etcd_network_peer_round_trip_time_seconds histogram\n",
            "etcd_network_peer_round_trip_time_seconds_bucket{To=\"abc\",le=\"0.0001\"} 0\n",
            "etcd_network_peer_round_trip_time_seconds_bucket{To=\"abc\",le=\"0.0002\"} 1\n",
            "etcd_network_peer_round_trip_time_seconds_bucket{To=\"abc\",le=\"0.8192\"} 1\n",
            "etcd_network_peer_round_trip_time_seconds_count{To=\"abc\"} 1\n",
        ] {
            assert!(
                text.contains(expected),
                "{expected:?} missing from:\n{text}"
            );
        }
        Ok(())
    }

    #[test]
    fn renders_etcd_names_help_and_types() -> prometheus::Result<()> {
        let metrics = Metrics::new()?;
        let mut raft = RaftMetricsSnapshot {
            leader_changes: 1,
            fsync_cumulative: vec![1; FSYNC_BUCKETS.len()],
            fsync_count: 2,
            fsync_seconds_sum: 9.5,
            ..Default::default()
        };
        raft.fsync_cumulative[0] = 0;
        let sample = MemberSample {
            id: 0xabc,
            has_leader: true,
            raft,
            keys: 3,
            block_cache_bytes: 4096,
            ..Default::default()
        };
        let text = metrics.render(&sample);
        for expected in [
            "# HELP etcd_server_has_leader Whether or not a leader exists. 1 is existence, 0 is not.\n# TYPE etcd_server_has_leader gauge\netcd_server_has_leader 1\n",
            "# TYPE etcd_server_leader_changes_seen_total counter\netcd_server_leader_changes_seen_total 1\n",
            "etcd_server_id{server_id=\"abc\"} 1\n",
            "etcd_cluster_version{cluster_version=\"3.4\"} 1\n",
            "etcd_debugging_mvcc_keys_total 3\n",
            "# TYPE cairn_mvcc_block_cache_bytes gauge\ncairn_mvcc_block_cache_bytes 4096\n",
            "# TYPE etcd_disk_wal_fsync_duration_seconds histogram\netcd_disk_wal_fsync_duration_seconds_bucket{le=\"0.001\"} 0\netcd_disk_wal_fsync_duration_seconds_bucket{le=\"0.002\"} 1\n",
            "etcd_disk_wal_fsync_duration_seconds_bucket{le=\"8.192\"} 1\netcd_disk_wal_fsync_duration_seconds_bucket{le=\"+Inf\"} 2\netcd_disk_wal_fsync_duration_seconds_sum 9.5\netcd_disk_wal_fsync_duration_seconds_count 2\n",
            "grpc_server_started_total{grpc_method=\"Put\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"} 0\n",
            "grpc_server_msg_sent_total{grpc_method=\"Range\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"} 0\n",
            "grpc_server_handled_total{grpc_code=\"Canceled\",grpc_method=\"Watch\",grpc_service=\"etcdserverpb.Watch\",grpc_type=\"bidi_stream\"} 0\n",
            "# TYPE process_cpu_seconds_total counter\n",
            "\nprocess_resident_memory_bytes ",
        ] {
            assert!(
                text.contains(expected),
                "{expected:?} missing from:\n{text}"
            );
        }
        Ok(())
    }
}
