//! Real etcd 3.4 members (Debian's etcd-server, /usr/bin/etcd) and `cairn`
//! members on a data dir a test prepared, for the tests that move data
//! between the two.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;

/// Which binary a [`Process`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Binary {
    Etcd,
    Cairn,
}

/// One single-member cluster's process on a given data dir, killed on drop.
pub struct Process {
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    pub data_dir: PathBuf,
    log: PathBuf,
    child: Child,
}

/// Ports and names for a member whose data dir a restore writes first.
pub struct Plan {
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    pub token: String,
}

impl Plan {
    pub fn new(name: &str) -> Plan {
        Plan {
            name: name.to_string(),
            client_port: free_port(),
            peer_port: free_port(),
            token: format!("token-{}", free_port()),
        }
    }

    pub fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    pub fn initial_cluster(&self) -> String {
        format!("{}={}", self.name, self.peer_url())
    }

    /// `snapshot restore <file>` with the flags `etcdctl` and `cairn` take
    /// for this member.
    pub fn restore_args(&self, file: &Path, data_dir: &Path) -> Vec<String> {
        vec![
            "snapshot".into(),
            "restore".into(),
            file.to_string_lossy().into_owned(),
            "--name".into(),
            self.name.clone(),
            "--data-dir".into(),
            data_dir.to_string_lossy().into_owned(),
            "--initial-cluster".into(),
            self.initial_cluster(),
            "--initial-cluster-token".into(),
            self.token.clone(),
            "--initial-advertise-peer-urls".into(),
            self.peer_url(),
        ]
    }

    /// Starts `binary` on `data_dir` with this plan's flags and waits until
    /// it answers.
    pub fn start(&self, binary: Binary, data_dir: &Path) -> Process {
        self.start_with(binary, data_dir, &[])
    }

    /// As `start`, with more flags.
    pub fn start_with(&self, binary: Binary, data_dir: &Path, flags: &[&str]) -> Process {
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = self.peer_url();
        let log = data_dir.with_extension("log");
        if let Some(parent) = data_dir.parent() {
            std::fs::create_dir_all(parent).expect("data dir's parent");
        }
        let program = match binary {
            Binary::Etcd => PathBuf::from("etcd"),
            Binary::Cairn => PathBuf::from(env!("CARGO_BIN_EXE_cairn")),
        };
        let child = Command::new(program)
            .args(["--name", &self.name])
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster()])
            .args(["--initial-cluster-token", &self.token])
            .args(flags)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "starting {binary:?} (etcd is Debian's etcd-server; .ci/run installs it): {e}"
                )
            });
        let mut process = Process {
            name: self.name.clone(),
            client_port: self.client_port,
            peer_port: self.peer_port,
            data_dir: data_dir.to_path_buf(),
            log,
            child,
        };
        process.wait_ready();
        process
    }
}

impl Process {
    /// A new single-member cluster of `binary` in `dir`.
    pub fn start_new(binary: Binary, dir: &Path) -> Process {
        Plan::new("m0").start(binary, &dir.join("data"))
    }

    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("exited with {status} before serving:\n{}", self.log_text());
            }
            let out = super::etcdctl(&self.endpoint(), &["endpoint", "health"], None);
            if out.status.success() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("not ready in 30 s:\n{}", self.log_text());
    }

    /// Runs etcdctl and returns stdout, panicking with stderr on failure.
    pub fn etcdctl_ok(&self, args: &[&str]) -> String {
        let out = super::etcdctl(&self.endpoint(), args, None);
        assert!(
            out.status.success(),
            "etcdctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// stderr of a failing etcdctl run.
    pub fn etcdctl_err(&self, args: &[&str]) -> String {
        let out = super::etcdctl(&self.endpoint(), args, None);
        assert!(!out.status.success(), "etcdctl {args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.extend(["-w", "json"]);
        let text = self.etcdctl_ok(&all);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a local etcdctl command (no endpoint: `snapshot status/restore`);
/// returns stdout then stderr (where etcdctl logs).
pub fn etcdctl_local(args: &[String]) -> String {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(args)
        .output()
        .expect("etcdctl runs");
    assert!(
        out.status.success(),
        "etcdctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `cairn` with `args` (a subcommand) and returns its stderr.
pub fn cairn_ok(args: &[String]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(args)
        .output()
        .expect("cairn runs");
    assert!(
        out.status.success(),
        "cairn {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}
