//! The member's Prometheus metrics, under etcd's names: counters the hot
//! paths bump with one atomic add, and gauges read when `/metrics` is
//! scraped. Rendered in the Prometheus text format.

use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use cairn_api::etcdserverpb::RangeRequest;
use cairn_api::mvccpb::Event;
use cairn_api::mvccpb::event::EventType;
use http::{Request, Response};

use crate::config::{ETCD_CLUSTER_VERSION, ETCD_VERSION};
use crate::member::Member;

/// Counters of the key-value store, bumped by the apply loop.
pub struct MvccCounters {
    puts: AtomicU64,
    deletes: AtomicU64,
}

/// The process's store counters (as etcd's, one registry per process).
pub static MVCC: MvccCounters = MvccCounters {
    puts: AtomicU64::new(0),
    deletes: AtomicU64::new(0),
};

impl MvccCounters {
    /// Counts one applied batch's events.
    pub fn record(&self, events: &[Event]) {
        let deletes = events
            .iter()
            .filter(|e| e.r#type == EventType::Delete as i32)
            .count() as u64;
        let puts = events.len() as u64 - deletes;
        if puts > 0 {
            self.puts.fetch_add(puts, Ordering::Relaxed);
        }
        if deletes > 0 {
            self.deletes.fetch_add(deletes, Ordering::Relaxed);
        }
    }
}

/// etcd's gRPC methods and how each streams, in path order, so a request's
/// path finds its counters by binary search.
const GRPC_METHODS: &[(&str, &str)] = &[
    ("/etcdserverpb.Auth/AuthDisable", "unary"),
    ("/etcdserverpb.Auth/AuthEnable", "unary"),
    ("/etcdserverpb.Auth/Authenticate", "unary"),
    ("/etcdserverpb.Auth/RoleAdd", "unary"),
    ("/etcdserverpb.Auth/RoleDelete", "unary"),
    ("/etcdserverpb.Auth/RoleGet", "unary"),
    ("/etcdserverpb.Auth/RoleGrantPermission", "unary"),
    ("/etcdserverpb.Auth/RoleList", "unary"),
    ("/etcdserverpb.Auth/RoleRevokePermission", "unary"),
    ("/etcdserverpb.Auth/UserAdd", "unary"),
    ("/etcdserverpb.Auth/UserChangePassword", "unary"),
    ("/etcdserverpb.Auth/UserDelete", "unary"),
    ("/etcdserverpb.Auth/UserGet", "unary"),
    ("/etcdserverpb.Auth/UserGrantRole", "unary"),
    ("/etcdserverpb.Auth/UserList", "unary"),
    ("/etcdserverpb.Auth/UserRevokeRole", "unary"),
    ("/etcdserverpb.Cluster/MemberAdd", "unary"),
    ("/etcdserverpb.Cluster/MemberList", "unary"),
    ("/etcdserverpb.Cluster/MemberPromote", "unary"),
    ("/etcdserverpb.Cluster/MemberRemove", "unary"),
    ("/etcdserverpb.Cluster/MemberUpdate", "unary"),
    ("/etcdserverpb.KV/Compact", "unary"),
    ("/etcdserverpb.KV/DeleteRange", "unary"),
    ("/etcdserverpb.KV/Put", "unary"),
    ("/etcdserverpb.KV/Range", "unary"),
    ("/etcdserverpb.KV/Txn", "unary"),
    ("/etcdserverpb.Lease/LeaseGrant", "unary"),
    ("/etcdserverpb.Lease/LeaseKeepAlive", "bidi_stream"),
    ("/etcdserverpb.Lease/LeaseLeases", "unary"),
    ("/etcdserverpb.Lease/LeaseRevoke", "unary"),
    ("/etcdserverpb.Lease/LeaseTimeToLive", "unary"),
    ("/etcdserverpb.Maintenance/Alarm", "unary"),
    ("/etcdserverpb.Maintenance/Defragment", "unary"),
    ("/etcdserverpb.Maintenance/Hash", "unary"),
    ("/etcdserverpb.Maintenance/HashKV", "unary"),
    ("/etcdserverpb.Maintenance/MoveLeader", "unary"),
    ("/etcdserverpb.Maintenance/Snapshot", "server_stream"),
    ("/etcdserverpb.Maintenance/Status", "unary"),
    ("/etcdserverpb.Watch/Watch", "bidi_stream"),
    ("/v3electionpb.Election/Campaign", "unary"),
    ("/v3electionpb.Election/Leader", "unary"),
    ("/v3electionpb.Election/Observe", "server_stream"),
    ("/v3electionpb.Election/Proclaim", "unary"),
    ("/v3electionpb.Election/Resign", "unary"),
    ("/v3lockpb.Lock/Lock", "unary"),
    ("/v3lockpb.Lock/Unlock", "unary"),
];

/// gRPC's status codes, by number.
const GRPC_CODES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];
const CANCELED: usize = 1;
const UNKNOWN: usize = 2;

/// Per method: calls started, and calls handled by status code.
struct GrpcCounters {
    started: [AtomicU64; GRPC_METHODS.len()],
    handled: [[AtomicU64; GRPC_CODES.len()]; GRPC_METHODS.len()],
}

#[allow(clippy::declare_interior_mutable_const)]
const ZERO: AtomicU64 = AtomicU64::new(0);
#[allow(clippy::declare_interior_mutable_const)]
const ZEROS: [AtomicU64; GRPC_CODES.len()] = [ZERO; GRPC_CODES.len()];

static GRPC: GrpcCounters = GrpcCounters {
    started: [ZERO; GRPC_METHODS.len()],
    handled: [ZEROS; GRPC_METHODS.len()],
};

fn method_index(path: &str) -> Option<usize> {
    GRPC_METHODS.binary_search_by(|(m, _)| m.cmp(&path)).ok()
}

fn handled(method: usize, code: usize) {
    GRPC.handled[method][code.min(GRPC_CODES.len() - 1)].fetch_add(1, Ordering::Relaxed);
}

/// Counts gRPC calls as go-grpc-prometheus does for etcd:
/// grpc_server_started_total when a call arrives, grpc_server_handled_total
/// with its status code when it ends, Canceled when the client leaves first.
#[derive(Clone, Copy, Default)]
pub struct GrpcMetricsLayer;

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> GrpcMetrics<S> {
        GrpcMetrics { inner }
    }
}

#[derive(Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
}

impl<S, B, ResBody> tower::Service<Request<B>> for GrpcMetrics<S>
where
    S: tower::Service<Request<B>, Response = Response<ResBody>>,
{
    type Response = Response<CountedBody<ResBody>>;
    type Error = S::Error;
    type Future = CountedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let method = method_index(request.uri().path());
        if let Some(m) = method {
            GRPC.started[m].fetch_add(1, Ordering::Relaxed);
        }
        CountedFuture {
            inner: self.inner.call(request),
            method,
        }
    }
}

pin_project_lite::pin_project! {
    pub struct CountedFuture<F> {
        #[pin]
        inner: F,
        method: Option<usize>,
    }
}

impl<F, ResBody, E> Future for CountedFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
{
    type Output = Result<Response<CountedBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.inner.poll(cx))?;
        let mut method = *this.method;
        if let Some(m) = method
            && let Some(code) = grpc_status(response.headers())
        {
            // A trailers-only answer: the call ended with its headers.
            handled(m, code);
            method = None;
        }
        Poll::Ready(Ok(response.map(|inner| CountedBody { inner, method })))
    }
}

fn grpc_status(headers: &http::HeaderMap) -> Option<usize> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

pin_project_lite::pin_project! {
    /// A gRPC response body that counts its call once it ends.
    pub struct CountedBody<B> {
        #[pin]
        inner: B,
        method: Option<usize>,
    }

    impl<B> PinnedDrop for CountedBody<B> {
        fn drop(this: Pin<&mut Self>) {
            // Dropped before its trailers: the client went away.
            if let Some(m) = this.project().method.take() {
                handled(m, CANCELED);
            }
        }
    }
}

impl<B: http_body::Body> http_body::Body for CountedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if let Some(m) = *this.method {
            match &frame {
                Some(Ok(f)) => {
                    if let Some(code) = f.trailers_ref().and_then(grpc_status) {
                        handled(m, code);
                        *this.method = None;
                    }
                }
                Some(Err(_)) | None => {
                    handled(m, UNKNOWN);
                    *this.method = None;
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The text exposition of every metric of `member`.
pub fn render(member: &Member) -> String {
    let mut out = String::with_capacity(16 * 1024);
    let raft = member.node.status();
    gauge(
        &mut out,
        "etcd_server_has_leader",
        "Whether or not a leader exists. 1 is existence, 0 is not.",
        u64::from(raft.leader != 0),
    );
    gauge(
        &mut out,
        "etcd_server_is_leader",
        "Whether or not this member is a leader. 1 if is, 0 otherwise.",
        u64::from(raft.leader != 0 && raft.leader == raft.id),
    );
    gauge(
        &mut out,
        "etcd_server_is_learner",
        "Whether or not this member is a learner. 1 if is, 0 otherwise.",
        u64::from(raft.is_learner),
    );
    gauge(
        &mut out,
        "etcd_server_proposals_committed_total",
        "The total number of consensus proposals committed.",
        raft.commit_index,
    );
    gauge(
        &mut out,
        "etcd_server_proposals_applied_total",
        "The total number of consensus proposals applied.",
        raft.applied_index,
    );
    let consensus = member.node.metrics().snapshot();
    counter(
        &mut out,
        "etcd_server_leader_changes_seen_total",
        "The number of leader changes seen.",
        consensus.leader_changes,
    );
    gauge(
        &mut out,
        "etcd_server_proposals_pending",
        "The current number of pending proposals to commit.",
        consensus.proposals_pending.max(0) as u64,
    );
    counter(
        &mut out,
        "etcd_server_proposals_failed_total",
        "The total number of failed proposals seen.",
        consensus.proposals_failed,
    );
    let _ = writeln!(
        out,
        "# HELP etcd_disk_wal_fsync_duration_seconds The latency distributions of fsync called by WAL.\n# TYPE etcd_disk_wal_fsync_duration_seconds histogram"
    );
    for (bound, count) in cairn_consensus::FSYNC_BUCKETS
        .iter()
        .zip(&consensus.fsync_cumulative)
    {
        let _ = writeln!(
            out,
            "etcd_disk_wal_fsync_duration_seconds_bucket{{le=\"{bound}\"}} {count}"
        );
    }
    let _ = writeln!(
        out,
        "etcd_disk_wal_fsync_duration_seconds_bucket{{le=\"+Inf\"}} {count}\netcd_disk_wal_fsync_duration_seconds_sum {sum}\netcd_disk_wal_fsync_duration_seconds_count {count}",
        count = consensus.fsync_count,
        sum = consensus.fsync_seconds_sum,
    );
    let _ = writeln!(
        out,
        "# HELP etcd_server_id Server or member ID in hexadecimal format. 1 for 'server_id' label with current ID.\n# TYPE etcd_server_id gauge\netcd_server_id{{server_id=\"{:x}\"}} 1",
        member.id
    );
    let _ = writeln!(
        out,
        "# HELP etcd_server_version Which version is running. 1 for 'server_version' label with current version.\n# TYPE etcd_server_version gauge\netcd_server_version{{server_version=\"{ETCD_VERSION}\"}} 1"
    );
    // etcd labels the cluster version by major and minor only.
    let cluster_version = ETCD_CLUSTER_VERSION
        .rsplit_once('.')
        .map_or(ETCD_CLUSTER_VERSION, |(minor, _)| minor);
    let _ = writeln!(
        out,
        "# HELP etcd_cluster_version Which version is running. 1 for 'cluster_version' label with current cluster version\n# TYPE etcd_cluster_version gauge\netcd_cluster_version{{cluster_version=\"{cluster_version}\"}} 1"
    );

    counter(
        &mut out,
        "etcd_mvcc_put_total",
        "Total number of puts seen by this member.",
        MVCC.puts.load(Ordering::Relaxed),
    );
    counter(
        &mut out,
        "etcd_mvcc_delete_total",
        "Total number of deletes seen by this member.",
        MVCC.deletes.load(Ordering::Relaxed),
    );
    let keys = member
        .store
        .range(&RangeRequest {
            key: vec![0].into(),
            range_end: vec![0].into(),
            count_only: true,
            ..Default::default()
        })
        .map_or(0, |r| r.count.max(0) as u64);
    gauge(
        &mut out,
        "etcd_debugging_mvcc_keys_total",
        "Total number of keys.",
        keys,
    );
    let revision = member.store.current_revision().max(0) as u64;
    gauge(
        &mut out,
        "etcd_mvcc_current_revision",
        "The current revision of store.",
        revision,
    );
    gauge(
        &mut out,
        "etcd_debugging_mvcc_current_revision",
        "The current revision of store.",
        revision,
    );
    gauge(
        &mut out,
        "etcd_mvcc_compact_revision",
        "The revision of the last compaction in store.",
        member.store.compact_revision() as u64,
    );
    let size = member.store.size();
    gauge(
        &mut out,
        "etcd_mvcc_db_total_size_in_bytes",
        "Total size of the underlying database physically allocated in bytes.",
        size.total,
    );
    gauge(
        &mut out,
        "etcd_mvcc_db_total_size_in_use_in_bytes",
        "Total size of the underlying database logically in use in bytes.",
        size.in_use,
    );

    render_grpc(&mut out);
    render_process(&mut out);
    out
}

fn render_grpc(out: &mut String) {
    let _ = writeln!(
        out,
        "# HELP grpc_server_started_total Total number of RPCs started on the server.\n# TYPE grpc_server_started_total counter"
    );
    for (i, (path, kind)) in GRPC_METHODS.iter().enumerate() {
        let (service, method) = split_path(path);
        let _ = writeln!(
            out,
            "grpc_server_started_total{{grpc_method=\"{method}\",grpc_service=\"{service}\",grpc_type=\"{kind}\"}} {}",
            GRPC.started[i].load(Ordering::Relaxed)
        );
    }
    let _ = writeln!(
        out,
        "# HELP grpc_server_handled_total Total number of RPCs completed on the server, regardless of success or failure.\n# TYPE grpc_server_handled_total counter"
    );
    for (i, (path, kind)) in GRPC_METHODS.iter().enumerate() {
        let (service, method) = split_path(path);
        for (code, name) in GRPC_CODES.iter().enumerate() {
            let n = GRPC.handled[i][code].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "grpc_server_handled_total{{grpc_code=\"{name}\",grpc_method=\"{method}\",grpc_service=\"{service}\",grpc_type=\"{kind}\"}} {n}"
            );
        }
    }
}

fn split_path(path: &str) -> (&str, &str) {
    path.trim_start_matches('/')
        .split_once('/')
        .unwrap_or((path, ""))
}

/// The standard process metrics, from /proc.
fn render_process(out: &mut String) {
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
        };
        if let Some(kb) = field("VmRSS:") {
            gauge(
                out,
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                kb * 1024,
            );
        }
        if let Some(kb) = field("VmSize:") {
            gauge(
                out,
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                kb * 1024,
            );
        }
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        gauge(
            out,
            "process_open_fds",
            "Number of open file descriptors.",
            fds.count() as u64,
        );
    }
    // utime and stime, in clock ticks of 1/100 s (Linux's USER_HZ).
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat")
        && let Some((_, rest)) = stat.rsplit_once(')')
    {
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let seconds = (ticks(11) + ticks(12)) as f64 / 100.0;
        let _ = writeln!(
            out,
            "# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.\n# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total {seconds}"
        );
    }
}

fn gauge(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
    );
}

fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_are_sorted_for_lookup() {
        assert!(GRPC_METHODS.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(
            method_index("/etcdserverpb.Watch/Watch").map(|i| GRPC_METHODS[i].1),
            Some("bidi_stream")
        );
        assert_eq!(method_index("/v3/kv/range"), None);
        assert_eq!(
            split_path("/etcdserverpb.KV/Range"),
            ("etcdserverpb.KV", "Range")
        );
    }

    #[test]
    fn events_count_as_puts_and_deletes() {
        let before = (
            MVCC.puts.load(Ordering::Relaxed),
            MVCC.deletes.load(Ordering::Relaxed),
        );
        MVCC.record(&[
            Event {
                r#type: EventType::Put as i32,
                ..Default::default()
            },
            Event {
                r#type: EventType::Delete as i32,
                ..Default::default()
            },
            Event {
                r#type: EventType::Put as i32,
                ..Default::default()
            },
        ]);
        assert!(MVCC.puts.load(Ordering::Relaxed) >= before.0 + 2);
        assert!(MVCC.deletes.load(Ordering::Relaxed) > before.1);
    }
}
