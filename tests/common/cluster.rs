//! Multi-member clusters of real `cairn` processes, started with etcd 3.4's
//! flags: free ports, one temporary directory, and SIGKILL for every process
//! on drop (stopped ones included), so nothing outlives the test.
//!
//! `CAIRN_TEST_SERVER=/usr/bin/etcd` runs the same tests against etcd itself:
//! that is how they were checked to describe etcd's behaviour.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions, GetOptions, StatusResponse};

use super::{etcdctl, free_ports};

/// Short raft timings so that elections take well under a second.
pub const HEARTBEAT_MS: u64 = 50;
pub const ELECTION_MS: u64 = 500;
pub const ELECTION_TIMEOUT: Duration = Duration::from_millis(ELECTION_MS);

/// What etcd answers a membership change that could cost the quorum while
/// some voter has not been connected for 5 s (--strict-reconfig-check).
pub const UNHEALTHY: &str = "etcdserver: unhealthy cluster";

/// How long a member may take to print "ready to serve client requests".
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// The per-request timeout of `client()`.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The binary under test: `cairn`, unless CAIRN_TEST_SERVER names another
/// one that takes etcd's flags (etcd 3.4 itself).
pub fn server_binary() -> PathBuf {
    std::env::var_os("CAIRN_TEST_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_cairn")))
}

/// One member: its ports, data directory, log and the full argument list it
/// was started with (a restart reuses it).
pub struct Node {
    pub name: String,
    pub client_port: u16,
    /// The port it advertises to its peers (where it listens, unless the
    /// cluster was started with its peers behind proxies).
    pub peer_port: u16,
    pub data_dir: PathBuf,
    /// The raft member ID (what `etcdctl member list` shows, in hex there).
    pub id: u64,
    log: PathBuf,
    args: Vec<String>,
    /// Extra environment of the process (say, a preloaded fake clock).
    env: Vec<(String, String)>,
    child: Option<Child>,
    stopped: bool,
    removed: bool,
}

impl Node {
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    pub fn client_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    pub fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Starts the process with `self.args`; does not wait for it to serve.
    fn spawn(&mut self) -> usize {
        let log_start = self.log_text().len();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("open log {}: {e}", self.log.display()));
        let child = Command::new(server_binary())
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env_remove("ETCDCTL_API")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", server_binary().display()));
        self.child = Some(child);
        self.stopped = false;
        log_start
    }

    /// Waits for etcd's "ready to serve client requests" in the log written
    /// since `log_start`.
    fn wait_ready(&mut self, log_start: usize, deadline: Instant) {
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                // The last line, the error the member exited with, first:
                // a long panic message may be cut in the middle.
                let log = self.log_text();
                panic!(
                    "{} exited with {status} before serving: {}\n{}",
                    self.name,
                    tail(&log, 1),
                    tail(&log, 60)
                );
            }
            let log = self.log_text();
            if log
                .get(log_start..)
                .is_some_and(|l| l.contains("ready to serve client requests"))
            {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "{} did not get ready in {READY_TIMEOUT:?}:\n{}",
                    self.name,
                    tail(&log, 60)
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    fn signal(&self, signal: &str) {
        let Some(child) = self.child.as_ref() else {
            panic!("{} is not running: cannot send SIG{signal}", self.name);
        };
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &child.id().to_string()])
            .status()
            .unwrap_or_else(|e| panic!("run kill -{signal}: {e}"));
        assert!(status.success(), "kill -{signal} {} failed", child.id());
    }

    /// SIGKILL; returns how the process ended if it had already ended by
    /// itself, which a test that meant to kill it must not overlook.
    fn kill(&mut self) -> Option<std::process::ExitStatus> {
        self.stopped = false;
        let mut child = self.child.take()?;
        let exited = child.try_wait().expect("try_wait on a member");
        if exited.is_none() {
            // SIGKILL also ends a SIGSTOPped process.
            child.kill().expect("SIGKILL a member");
        }
        child.wait().expect("wait for a killed member");
        exited
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// What a member stores, as a linearizable or serializable range over every
/// key returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dump {
    /// The header revision of the range.
    pub revision: i64,
    /// key → (value, create revision, mod revision, version)
    pub kvs: BTreeMap<String, (String, i64, i64, i64)>,
}

/// A cluster of `cairn` processes in one temporary directory.
pub struct Cluster {
    nodes: Vec<Node>,
    token: String,
    extra: Vec<String>,
    dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts `n` members with the short timings and waits until every one
    /// serves clients.
    pub fn start(n: usize) -> Cluster {
        Cluster::start_with(n, &[])
    }

    /// As `start`, with extra flags for every member (e.g. --snapshot-count).
    pub fn start_with(n: usize, extra: &[&str]) -> Cluster {
        Cluster::start_prepared(n, extra, |_| {})
    }

    /// As `start_with`, calling `prepare` with each member's data directory
    /// (not created yet) before any member starts: to mount a filesystem
    /// there, say.
    pub fn start_prepared(n: usize, extra: &[&str], prepare: impl FnMut(&Path)) -> Cluster {
        Cluster::start_inner(n, extra, prepare, None)
    }

    /// As `start_with`, each member listening for its peers on a port of
    /// its own but advertising another, where `proxy(advertised, listening)`
    /// is called to put something that forwards between them (a delaying
    /// proxy, say) before any member starts.
    pub fn start_with_peers_behind(
        n: usize,
        extra: &[&str],
        proxy: &mut dyn FnMut(u16, u16),
    ) -> Cluster {
        Cluster::start_inner(n, extra, |_| {}, Some(proxy))
    }

    fn start_inner(
        n: usize,
        extra: &[&str],
        mut prepare: impl FnMut(&Path),
        mut proxy: Option<&mut dyn FnMut(u16, u16)>,
    ) -> Cluster {
        static CLUSTERS: AtomicU64 = AtomicU64::new(0);
        let dir = tempfile::tempdir().expect("create a temp dir for the cluster");
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let token = format!(
            "cairn-test-{}-{}-{nanos}",
            std::process::id(),
            CLUSTERS.fetch_add(1, Ordering::Relaxed)
        );
        let mut cluster = Cluster {
            nodes: Vec::new(),
            token,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            dir,
        };
        let ports: Vec<(u16, u16, u16)> = free_ports(3 * n)
            .chunks(3)
            .map(|p| (p[0], p[1], if proxy.is_some() { p[2] } else { p[1] }))
            .collect();
        let initial_cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer, _))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        for (i, (client_port, peer_port, listen_peer_port)) in ports.into_iter().enumerate() {
            if let Some(proxy) = proxy.as_mut() {
                proxy(peer_port, listen_peer_port);
            }
            let node = cluster.new_node(
                format!("m{i}"),
                client_port,
                (peer_port, listen_peer_port),
                &initial_cluster,
                "new",
            );
            cluster.nodes.push(node);
        }
        for node in &cluster.nodes {
            prepare(&node.data_dir);
        }
        // etcd serves only once it has published itself through raft, which
        // needs a quorum: start every process, then wait for each.
        let starts: Vec<usize> = cluster.nodes.iter_mut().map(Node::spawn).collect();
        let deadline = Instant::now() + READY_TIMEOUT;
        for (node, start) in cluster.nodes.iter_mut().zip(starts) {
            node.wait_ready(start, deadline);
        }
        let ids = cluster.member_ids(0);
        for node in &mut cluster.nodes {
            node.id = *ids
                .get(&node.name)
                .unwrap_or_else(|| panic!("{} is not in the member list {ids:?}", node.name));
        }
        cluster
    }

    fn new_node(
        &self,
        name: String,
        client_port: u16,
        (peer_port, listen_peer_port): (u16, u16),
        initial_cluster: &str,
        state: &str,
    ) -> Node {
        let data_dir = self.dir.path().join(format!("{name}.etcd"));
        let log = self.dir.path().join(format!("{name}.log"));
        let client = format!("http://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let listen_peer = format!("http://127.0.0.1:{listen_peer_port}");
        let mut args: Vec<String> = vec![
            "--name".into(),
            name.clone(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--listen-client-urls".into(),
            client.clone(),
            "--advertise-client-urls".into(),
            client,
            "--listen-peer-urls".into(),
            listen_peer,
            "--initial-advertise-peer-urls".into(),
            peer,
            "--initial-cluster".into(),
            initial_cluster.into(),
            "--initial-cluster-token".into(),
            self.token.clone(),
            "--initial-cluster-state".into(),
            state.into(),
            "--heartbeat-interval".into(),
            HEARTBEAT_MS.to_string(),
            "--election-timeout".into(),
            ELECTION_MS.to_string(),
        ];
        args.extend(self.extra.iter().cloned());
        Node {
            name,
            client_port,
            peer_port,
            data_dir,
            id: 0,
            log,
            args,
            env: Vec::new(),
            child: None,
            stopped: false,
            removed: false,
        }
    }

    /// The cluster's temporary directory: for what must last as long as its
    /// members (a preloaded library's files, say), deleted with it.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Number of members ever started (removed ones included; indices stay).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    /// Running, not stopped and not removed.
    pub fn is_up(&self, i: usize) -> bool {
        let n = &self.nodes[i];
        n.child.is_some() && !n.stopped && !n.removed
    }

    /// Indices of the members that are up.
    pub fn up(&self) -> Vec<usize> {
        (0..self.len()).filter(|&i| self.is_up(i)).collect()
    }

    pub fn endpoint(&self, i: usize) -> String {
        self.nodes[i].endpoint()
    }

    /// Client endpoints (host:port) of the members that are up.
    pub fn endpoints(&self) -> Vec<String> {
        self.up().into_iter().map(|i| self.endpoint(i)).collect()
    }

    /// The member's log (stderr), every start of it.
    pub fn log_text(&self, i: usize) -> String {
        self.nodes[i].log_text()
    }

    /// Index of the member with raft ID `id`.
    pub fn index_of(&self, id: u64) -> Option<usize> {
        self.nodes.iter().position(|n| n.id == id && id != 0)
    }

    /// The process ID of member `i`, if it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].child.as_ref().map(Child::id)
    }

    /// How member `i`'s process ended, if it did by itself.
    pub fn exit_status(&mut self, i: usize) -> Option<std::process::ExitStatus> {
        self.nodes[i].child.as_mut()?.try_wait().ok().flatten()
    }

    /// SIGKILL. Fails the test if the member had already exited by itself:
    /// a crash the test did not cause.
    pub fn kill(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        if let Some(status) = node.kill() {
            panic!(
                "{} had exited by itself ({status}) before it was killed:\n{}",
                node.name,
                tail(&node.log_text(), 60)
            );
        }
    }

    /// SIGKILL if member `i` still runs; how it ended if it had ended by
    /// itself (for a test that expects it may have).
    pub fn end(&mut self, i: usize) -> Option<std::process::ExitStatus> {
        self.nodes[i].kill()
    }

    /// Kills member `i` and starts it again with `env` as its environment
    /// (from then on), waiting until it serves.
    pub fn restart_with_env(&mut self, i: usize, env: Vec<(String, String)>) {
        self.kill(i);
        self.nodes[i].env = env;
        self.restart(i);
    }

    /// Starts a killed member again, same data directory and flags, and waits
    /// until it serves.
    pub fn restart(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        assert!(node.child.is_none(), "{} is still running", node.name);
        assert!(!node.removed, "{} was removed", node.name);
        let start = node.spawn();
        node.wait_ready(start, Instant::now() + READY_TIMEOUT);
    }

    /// Sets the environment member `i`'s process gets at its next start.
    pub fn set_env(&mut self, i: usize, env: Vec<(String, String)>) {
        self.nodes[i].env = env;
    }

    /// Starts killed members again, all before waiting for any: a member
    /// serves only once a quorum is up, so a whole cluster cannot come back
    /// one `restart` at a time.
    pub fn restart_all(&mut self, members: &[usize]) {
        let mut starts = Vec::new();
        for &i in members {
            let node = &mut self.nodes[i];
            assert!(node.child.is_none(), "{} is still running", node.name);
            assert!(!node.removed, "{} was removed", node.name);
            starts.push(node.spawn());
        }
        let deadline = Instant::now() + READY_TIMEOUT;
        for (&i, start) in members.iter().zip(starts) {
            self.nodes[i].wait_ready(start, deadline);
        }
    }

    /// Starts a killed member again and waits for it to exit, as a member
    /// that refuses to start does; returns its exit status and what it
    /// logged this time.
    pub fn restart_expecting_exit(&mut self, i: usize) -> (std::process::ExitStatus, String) {
        let node = &mut self.nodes[i];
        assert!(node.child.is_none(), "{} is still running", node.name);
        let start = node.spawn();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = node.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                node.child = None;
                let log = node.log_text();
                return (status, log.get(start..).unwrap_or_default().to_string());
            }
            assert!(
                Instant::now() < deadline,
                "{} is still running after {READY_TIMEOUT:?}:\n{}",
                node.name,
                tail(&node.log_text(), 60)
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// SIGSTOP: the process keeps its sockets but answers nothing.
    pub fn stop(&mut self, i: usize) {
        self.nodes[i].signal("STOP");
        self.nodes[i].stopped = true;
    }

    /// SIGCONT.
    pub fn cont(&mut self, i: usize) {
        self.nodes[i].signal("CONT");
        self.nodes[i].stopped = false;
    }

    /// A client of member `i` alone, with REQUEST_TIMEOUT per request.
    pub async fn client(&self, i: usize) -> Client {
        self.client_with_timeout(i, REQUEST_TIMEOUT).await
    }

    pub async fn client_with_timeout(&self, i: usize, timeout: Duration) -> Client {
        connect(&self.endpoint(i), timeout).await
    }

    /// Maintenance.Status of member `i`, or why not within a second.
    pub async fn status(&self, i: usize) -> Result<StatusResponse, String> {
        let mut c = self.client_with_timeout(i, Duration::from_secs(1)).await;
        match tokio::time::timeout(Duration::from_secs(1), c.status()).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("status timed out".into()),
        }
    }

    /// The leader every member that is up agrees on, if there is one and it
    /// is up.
    pub async fn leader(&self) -> Option<usize> {
        let up = self.up();
        let mut leader = None;
        for &i in &up {
            let s = self.status(i).await.ok()?;
            if s.leader() == 0 || leader.is_some_and(|l| l != s.leader()) {
                return None;
            }
            leader = Some(s.leader());
        }
        let i = self.index_of(leader?)?;
        up.contains(&i).then_some(i)
    }

    /// Polls `leader()` until there is one.
    pub async fn wait_leader(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.leader().await {
                return l;
            }
            if Instant::now() > deadline {
                let statuses: Vec<String> = describe_statuses(self).await;
                panic!("no agreed leader within {timeout:?}: {statuses:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Every key of member `i`: a linearizable range, or a serializable one
    /// (the member's local state, no raft round).
    pub async fn dump(&self, i: usize, serializable: bool) -> Result<Dump, String> {
        let mut c = self.client(i).await;
        let mut opts = GetOptions::new().with_all_keys();
        if serializable {
            opts = opts.with_serializable();
        }
        let resp = tokio::time::timeout(REQUEST_TIMEOUT, c.get("", Some(opts)))
            .await
            .map_err(|_| format!("range on {} timed out", self.nodes[i].name))?
            .map_err(|e| format!("range on {}: {e}", self.nodes[i].name))?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        let kvs = resp
            .kvs()
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    (
                        String::from_utf8_lossy(kv.value()).into_owned(),
                        kv.create_revision(),
                        kv.mod_revision(),
                        kv.version(),
                    ),
                )
            })
            .collect();
        Ok(Dump { revision, kvs })
    }

    /// Waits until the serializable dumps of `members` are all equal (same
    /// keys, values, revisions and header revision) and returns that state.
    pub async fn wait_converged(&self, members: &[usize], timeout: Duration) -> Dump {
        let deadline = Instant::now() + timeout;
        loop {
            let mut dumps = Vec::new();
            for &i in members {
                dumps.push(self.dump(i, true).await);
            }
            if let Some(Ok(first)) = dumps.first()
                && dumps.iter().all(|d| d.as_ref() == Ok(first))
            {
                return first.clone();
            }
            if Instant::now() > deadline {
                let summary: Vec<String> = members
                    .iter()
                    .zip(&dumps)
                    .map(|(i, d)| match d {
                        Ok(d) => format!(
                            "{}: revision {}, {} keys",
                            self.nodes[*i].name,
                            d.revision,
                            d.kvs.len()
                        ),
                        Err(e) => format!("{}: {e}", self.nodes[*i].name),
                    })
                    .collect();
                let ok: Vec<&Dump> = dumps.iter().flatten().collect();
                if let Some(a) = ok.first()
                    && let Some(b) = ok.iter().find(|d| **d != *a)
                {
                    panic!(
                        "members did not converge within {timeout:?}: {summary:?}; \
                         some differences: {:?}",
                        diff(a, b)
                    );
                }
                panic!("members did not converge within {timeout:?}: {summary:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs etcdctl against member `i`.
    pub fn etcdctl(&self, i: usize, args: &[&str]) -> Output {
        etcdctl(&self.endpoint(i), args, None)
    }

    /// Runs etcdctl against member `i`; stdout, or a panic with stderr.
    pub fn etcdctl_ok(&self, i: usize, args: &[&str]) -> String {
        let out = self.etcdctl(i, args);
        assert!(
            out.status.success(),
            "etcdctl {args:?} on {} failed: {}{}",
            self.nodes[i].name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs etcdctl against member `i` until it succeeds, retrying while it
    /// fails with `retry_on` in its error (for up to `within`); stdout.
    pub fn etcdctl_retry(
        &self,
        i: usize,
        args: &[&str],
        retry_on: &str,
        within: Duration,
    ) -> String {
        let deadline = Instant::now() + within;
        loop {
            let out = self.etcdctl(i, args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            if out.status.success() {
                return String::from_utf8_lossy(&out.stdout).into_owned();
            }
            assert!(
                stderr.contains(retry_on) && Instant::now() < deadline,
                "etcdctl {args:?} on {} failed: {}{stderr}",
                self.nodes[i].name,
                String::from_utf8_lossy(&out.stdout),
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Runs etcdctl with --endpoints listing every member that is up.
    pub fn etcdctl_all(&self, args: &[&str]) -> Output {
        etcdctl(&self.endpoints().join(","), args, None)
    }

    /// `etcdctl member list -w json` through member `i`: name → ID (a member
    /// added but not started yet has an empty name and is left out).
    pub fn member_ids(&self, i: usize) -> BTreeMap<String, u64> {
        let list = member_list(self, i);
        list.iter()
            .filter_map(|m| {
                let name = m["name"].as_str()?;
                (!name.is_empty()).then_some((name.to_string(), m["ID"].as_u64()?))
            })
            .collect()
    }

    /// `etcdctl member add NAME --peer-urls=... [--learner]` through a member
    /// that is up, then starts the new member with the ETCD_INITIAL_CLUSTER
    /// etcdctl printed and --initial-cluster-state existing, and waits until
    /// it serves. Returns its index.
    pub fn add_member(&mut self, name: &str, learner: bool) -> usize {
        let ports = free_ports(2);
        let (client_port, peer_port) = (ports[0], ports[1]);
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let via = *self
            .up()
            .first()
            .expect("a member that is up to add through");
        let peer_flag = format!("--peer-urls={peer_url}");
        let mut args = vec!["member", "add", name, &peer_flag];
        if learner {
            args.push("--learner");
        }
        // etcd refuses membership changes until every voter has been
        // connected for 5 s (--strict-reconfig-check).
        let out = self.etcdctl_retry(via, &args, UNHEALTHY, Duration::from_secs(15));
        // Member 8211f1d0f64f3269 added to cluster ef37ad9dc622a7c4
        //
        // ETCD_NAME="m3"
        // ETCD_INITIAL_CLUSTER="m0=http://...,m3=http://..."
        // ETCD_INITIAL_ADVERTISE_PEER_URLS="http://..."
        // ETCD_INITIAL_CLUSTER_STATE="existing"
        let id = out
            .lines()
            .find_map(|l| l.strip_prefix("Member ")?.split_whitespace().next())
            .and_then(|hex| u64::from_str_radix(hex, 16).ok())
            .unwrap_or_else(|| panic!("no member ID in etcdctl member add's output:\n{out}"));
        let env = |var: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(&format!("{var}=")))
                .map(|v| v.trim_matches('"').to_string())
                .unwrap_or_else(|| panic!("no {var} in etcdctl member add's output:\n{out}"))
        };
        let initial_cluster = env("ETCD_INITIAL_CLUSTER");
        assert_eq!(env("ETCD_INITIAL_CLUSTER_STATE"), "existing");
        assert_eq!(env("ETCD_INITIAL_ADVERTISE_PEER_URLS"), peer_url);
        let mut node = self.new_node(
            name.to_string(),
            client_port,
            (peer_port, peer_port),
            &initial_cluster,
            "existing",
        );
        node.id = id;
        let start = node.spawn();
        self.nodes.push(node);
        let i = self.nodes.len() - 1;
        self.nodes[i].wait_ready(start, Instant::now() + READY_TIMEOUT);
        i
    }

    /// `etcdctl member remove ID` through another member that is up; the
    /// removed process is killed (etcd's exits by itself) and never counted
    /// again.
    pub fn remove_member(&mut self, i: usize) {
        let via = *self
            .up()
            .iter()
            .find(|&&j| j != i)
            .expect("another member that is up to remove through");
        let id = format!("{:x}", self.nodes[i].id);
        let out = self.etcdctl_retry(
            via,
            &["member", "remove", &id],
            UNHEALTHY,
            Duration::from_secs(15),
        );
        assert!(
            out.contains("removed from cluster"),
            "etcdctl member remove said: {out}"
        );
        // A removed member may well have exited by itself.
        self.nodes[i].kill();
        self.nodes[i].removed = true;
    }
}

/// Up to 10 keys on which two dumps differ, with both sides.
pub fn diff(a: &Dump, b: &Dump) -> Vec<String> {
    let keys: std::collections::BTreeSet<&String> = a.kvs.keys().chain(b.kvs.keys()).collect();
    keys.into_iter()
        .filter(|k| a.kvs.get(*k) != b.kvs.get(*k))
        .take(10)
        .map(|k| format!("{k}: {:?} vs {:?}", a.kvs.get(k), b.kvs.get(k)))
        .collect()
}

/// `etcdctl member list -w json` through member `i`: the "members" array.
pub fn member_list(cluster: &Cluster, i: usize) -> Vec<serde_json::Value> {
    let out = cluster.etcdctl_ok(i, &["member", "list", "-w", "json"]);
    let json: serde_json::Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("member list is not JSON ({e}): {out}"));
    json["members"]
        .as_array()
        .cloned()
        .unwrap_or_else(|| panic!("no members in {out}"))
}

/// Each member's view of the leader and term, for failure messages.
async fn describe_statuses(cluster: &Cluster) -> Vec<String> {
    let mut out = Vec::new();
    for i in cluster.up() {
        let s = cluster.status(i).await;
        out.push(match s {
            Ok(s) => format!(
                "{}: leader {:x} term {}",
                cluster.nodes[i].name,
                s.leader(),
                s.raft_term()
            ),
            Err(e) => format!("{}: {e}", cluster.nodes[i].name),
        });
    }
    out
}

/// A client of one endpoint. etcd-client connects lazily, so this does not
/// fail when the member is down; requests do.
pub async fn connect(endpoint: &str, timeout: Duration) -> Client {
    let options = ConnectOptions::new()
        .with_timeout(timeout)
        .with_connect_timeout(Duration::from_secs(1));
    Client::connect([endpoint], Some(options))
        .await
        .unwrap_or_else(|e| panic!("etcd-client connect to {endpoint}: {e}"))
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            // Dropped after a failure, or after a test that let members end.
            node.kill();
        }
        if std::thread::panicking() {
            for node in &self.nodes {
                eprintln!(
                    "---- last lines of {} ({}) ----\n{}",
                    node.name,
                    node.log.display(),
                    tail(&node.log_text(), 40)
                );
            }
        }
    }
}
