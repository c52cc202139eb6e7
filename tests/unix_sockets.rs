//! Members on Unix sockets, as etcd 3.4 takes `unix://` and `unixs://` URLs
//! (its e2e TestEtcdUnixPeers): `unix://host:port` is a socket file named
//! `host:port` in the member's working directory.
//!
//! `CAIRN_TEST_SERVER=/usr/bin/etcd` runs it against etcd itself.

mod common;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::cluster::server_binary;

/// Processes killed when the test ends, however it ends.
struct Members(Vec<Child>);

impl Drop for Members {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// etcdctl in `dir`, where the sockets are.
fn etcdctl(dir: &Path, endpoint: &str, args: &[&str]) -> Output {
    Command::new("etcdctl")
        .current_dir(dir)
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", endpoint, "--command-timeout=10s"])
        .args(args)
        .output()
        .expect("etcdctl is installed (Debian package etcd-client)")
}

fn wait_ready(log: &Path, child: &mut Child, deadline: Instant) {
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains("ready to serve client requests") {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("member exited with {status} before serving:\n{text}");
        }
        assert!(
            Instant::now() < deadline,
            "member not ready in time:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Three members whose peers talk over Unix sockets with TLS (unixs://,
/// --peer-auto-tls) and whose clients come over plain Unix sockets: a
/// write on one member is read on another, and the member list names the
/// sockets' URLs.
#[test]
fn a_cluster_on_unix_sockets() {
    let dir = tempfile::tempdir().expect("temp dir");
    let peer = |i: usize| format!("unixs://m{i}.peer:1");
    let client = |i: usize| format!("unix://m{i}.client:2");
    let initial_cluster: Vec<String> = (0..3).map(|i| format!("m{i}={}", peer(i))).collect();
    let mut members = Members(Vec::new());
    let mut logs = Vec::new();
    for i in 0..3 {
        let log = dir.path().join(format!("m{i}.log"));
        let child = Command::new(server_binary())
            .current_dir(dir.path())
            .args(["--name", &format!("m{i}")])
            .args(["--data-dir", &format!("m{i}.etcd")])
            .args(["--listen-peer-urls", &peer(i)])
            .args(["--initial-advertise-peer-urls", &peer(i)])
            .args(["--initial-cluster", &initial_cluster.join(",")])
            .args(["--initial-cluster-token", "unix-sockets"])
            .args(["--listen-client-urls", &client(i)])
            .args(["--advertise-client-urls", &client(i)])
            .args(["--peer-auto-tls", "--heartbeat-interval=50"])
            .arg("--election-timeout=500")
            .env_remove("ETCDCTL_API")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start the member");
        members.0.push(child);
        logs.push(log);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for (log, child) in logs.iter().zip(&mut members.0) {
        wait_ready(log, child, deadline);
    }
    for i in 0..3 {
        assert!(dir.path().join(format!("m{i}.peer:1")).exists());
        assert!(dir.path().join(format!("m{i}.client:2")).exists());
    }

    let put = etcdctl(dir.path(), &client(0), &["put", "k", "over a socket"]);
    assert!(
        put.status.success(),
        "put: {}",
        String::from_utf8_lossy(&put.stderr)
    );
    let get = etcdctl(dir.path(), &client(2), &["get", "k", "--print-value-only"]);
    assert_eq!(String::from_utf8_lossy(&get.stdout), "over a socket\n");
    let list = etcdctl(dir.path(), &client(1), &["member", "list"]);
    let list = String::from_utf8_lossy(&list.stdout);
    for i in 0..3 {
        assert!(
            list.contains(&format!(", m{i}, {}, {}, false", peer(i), client(i))),
            "{list}"
        );
    }
}
