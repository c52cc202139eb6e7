//! A `cairn-grpc-proxy` process for tests: free ports, its log in a
//! temporary directory, a kill on drop, and its metrics page.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::free_port;

pub struct Proxy {
    pub port: u16,
    pub metrics_port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Proxy {
    /// Starts the proxy in front of `endpoints` (host:port) and waits until
    /// it prints etcd's readiness line.
    pub fn start(endpoints: &[String], extra: &[&str]) -> Proxy {
        let dir = tempfile::tempdir().expect("temp dir");
        let (port, metrics_port) = (free_port(), free_port());
        let log = std::fs::File::create(dir.path().join("proxy.log")).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_cairn-grpc-proxy"))
            .arg("start")
            .arg(format!("--endpoints={}", endpoints.join(",")))
            .arg(format!("--listen-addr=127.0.0.1:{port}"))
            .arg(format!("--metrics-addr=http://127.0.0.1:{metrics_port}"))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start cairn-grpc-proxy");
        let mut proxy = Proxy {
            port,
            metrics_port,
            dir,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !proxy.log_text().contains("started gRPC proxy") {
            if let Some(child) = proxy.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("proxy exited with {status}:\n{}", proxy.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "proxy not ready:\n{}",
                proxy.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        proxy
    }

    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("proxy.log")).unwrap_or_default()
    }

    /// The metrics page, as text.
    pub fn metrics_text(&self) -> String {
        let addr = format!("127.0.0.1:{}", self.metrics_port);
        crate::common::http::request(&addr, "GET", "/metrics", "").body
    }

    /// One metric's value, 0 if absent.
    pub fn metric(&self, name: &str) -> f64 {
        self.metrics_text()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| {
                let (n, v) = l.split_once(' ')?;
                (n == name).then(|| v.trim().parse().ok()).flatten()
            })
            .unwrap_or(0.0)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
