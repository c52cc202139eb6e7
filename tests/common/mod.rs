//! Starting real `cairn` members for tests: free ports, a temporary data
//! directory, and a kill on drop so nothing outlives the test.

#![allow(dead_code)] // each test binary uses a different part of this

pub mod cluster;
pub mod delay;
pub mod etcd;
pub mod faketime;
pub mod http;
pub mod netfilter;
pub mod power_loss;
pub mod rng;
pub mod slow_disk;
pub mod snapshot_rot;
pub mod tmpfs;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn free_port() -> u16 {
    free_ports(1)[0]
}

/// `n` distinct free ports on 127.0.0.1, below the kernel's ephemeral range:
/// a member restarted on its port must find it still free, and a port the
/// kernel hands out (`bind(:0)`, or the local end of any outgoing
/// connection on the machine) can be taken by another process the moment
/// its member dies. Every listener is held until all are chosen, so no port
/// comes twice.
pub fn free_ports(n: usize) -> Vec<u16> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    // Above the well-known ports etcd's defaults (2379, 2380) use.
    let lowest = 10000;
    assert!(
        ephemeral_start > lowest + 1000,
        "ephemeral ports start at {ephemeral_start}"
    );
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut rng = rng::Rng(
        nanos ^ (u64::from(std::process::id()) << 32) ^ CALLS.fetch_add(1, Ordering::Relaxed),
    );
    let mut held: Vec<TcpListener> = Vec::with_capacity(n);
    for _ in 0..100 * n {
        if held.len() == n {
            break;
        }
        let port = lowest + rng.below(u64::from(ephemeral_start - lowest)) as u16;
        if let Ok(listener) = TcpListener::bind(("127.0.0.1", port)) {
            held.push(listener);
        }
    }
    assert_eq!(
        held.len(),
        n,
        "free ports on 127.0.0.1 below {ephemeral_start}"
    );
    held.iter()
        .map(|l| l.local_addr().expect("a bound listener's address").port())
        .collect()
}

/// A `cairn` process with its own data directory.
pub struct Member {
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    pub data_dir: PathBuf,
    _dir: Option<tempfile::TempDir>,
    child: Option<Child>,
    log: PathBuf,
}

impl Member {
    /// Starts a member in a new temporary directory and waits until it serves.
    pub fn start() -> Member {
        Member::start_with(&[])
    }

    /// Starts a member with extra flags.
    pub fn start_with(extra: &[&str]) -> Member {
        let dir = tempfile::tempdir().expect("temp dir");
        let data_dir = dir.path().join("data");
        let log = dir.path().join("member.log");
        let mut m = Member {
            name: "m0".into(),
            client_port: free_port(),
            peer_port: free_port(),
            data_dir,
            _dir: Some(dir),
            child: None,
            log,
        };
        m.spawn(extra);
        m
    }

    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// Starts the process (again) on the same data directory.
    pub fn spawn(&mut self, extra: &[&str]) {
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log_start = self.log_text().len();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_cairn"))
            .args(["--name", &self.name])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("{}={peer}", self.name)])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start cairn");
        self.child = Some(child);
        self.wait_ready(log_start);
    }

    fn wait_ready(&mut self, log_start: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "cairn exited with {status} before serving:\n{}",
                    self.log_text()
                );
            }
            if self.log_text()[log_start..].contains("ready to serve client requests") {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("cairn did not get ready in 30 s:\n{}", self.log_text());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGINT, as etcd's e2e harness stops members; the exit status if the
    /// process ended `within` (else it is left to `kill`).
    pub fn interrupt(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let status = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// SIGKILL: no chance to flush anything. Fails the test if the member
    /// had already exited by itself: a crash the test did not cause.
    pub fn kill(&mut self) {
        if let Some(status) = self.end() {
            panic!("the member had exited by itself ({status}) before it was killed");
        }
    }

    /// SIGKILL; how the process ended if it had already ended by itself.
    fn end(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let exited = child.try_wait().expect("try_wait on the member");
        if exited.is_none() {
            child.kill().expect("SIGKILL the member");
        }
        child.wait().expect("wait for the member");
        exited
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Runs etcdctl (v3 API) against this member.
    pub fn etcdctl(&self, args: &[&str]) -> Output {
        etcdctl(&self.endpoint(), args, None)
    }

    /// Runs etcdctl and returns stdout, panicking with stderr on failure.
    pub fn etcdctl_ok(&self, args: &[&str]) -> String {
        let out = self.etcdctl(args);
        assert!(
            out.status.success(),
            "etcdctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.end();
    }
}

pub fn etcdctl(endpoint: &str, args: &[&str], stdin: Option<&str>) -> Output {
    use std::io::Write as _;
    let mut child = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", endpoint, "--command-timeout=10s"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("etcdctl is installed (Debian package etcd-client; .ci/run installs it)");
    if let Some(mut pipe) = child.stdin.take()
        && let Some(text) = stdin
    {
        pipe.write_all(text.as_bytes()).expect("etcdctl stdin");
    }
    child.wait_with_output().expect("etcdctl runs")
}
