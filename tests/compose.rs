//! The compose stack (deploy/compose.yaml: three members behind the
//! grpc-proxy, as containers of the images `make image` builds) under
//! faults. They need a Docker engine and the images, so they are ignored in
//! the default run: `make test-compose` runs them (and .ci/run does when a
//! Docker engine answers).
//!
//! Each test brings up its own compose project, with the proxy published on
//! a free port, and takes it down with its volumes when done.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{etcdctl, free_port};

const MEMBERS: [&str; 3] = ["m1", "m2", "m3"];

fn compose_command() -> Vec<String> {
    let plugin = Command::new("docker")
        .args(["compose", "version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if plugin {
        vec!["docker".into(), "compose".into()]
    } else {
        vec!["docker-compose".into()]
    }
}

fn run(program: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(program);
    command.args(args);
    for (k, v) in env {
        command.env(k, v);
    }
    command
        .output()
        .unwrap_or_else(|e| panic!("{program} {args:?} does not run: {e}"))
}

fn run_ok(program: &str, args: &[&str], env: &[(&str, &str)]) -> String {
    let out = run(program, args, env);
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// One compose project of the stack.
struct Stack {
    project: String,
    port: String,
    compose: Vec<String>,
}

impl Stack {
    fn up() -> Stack {
        let stack = Stack {
            project: format!("cairntest{}x{}", std::process::id(), free_port()),
            port: free_port().to_string(),
            compose: compose_command(),
        };
        stack.compose(&["up", "-d"]);
        stack.wait_healthy();
        stack
    }

    fn compose(&self, args: &[&str]) -> String {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/compose.yaml");
        let file = file.to_str().expect("a UTF-8 path");
        let mut all: Vec<&str> = self.compose[1..].iter().map(String::as_str).collect();
        all.extend(["-p", &self.project, "-f", file]);
        all.extend(args);
        run_ok(&self.compose[0], &all, &[("CAIRN_PORT", &self.port)])
    }

    fn wait_healthy(&self) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/wait-healthy.sh");
        let out = run_ok(
            script.to_str().expect("a UTF-8 path"),
            &[&self.project],
            &[("CAIRN_PORT", &self.port)],
        );
        eprintln!("{out}");
    }

    fn proxy(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn container(&self, service: &str) -> String {
        let id = run_ok(
            "docker",
            &[
                "ps",
                "-aq",
                "--filter",
                &format!("label=com.docker.compose.project={}", self.project),
                "--filter",
                &format!("label=com.docker.compose.service={service}"),
            ],
            &[],
        );
        assert!(!id.is_empty(), "no container for {service}");
        id
    }

    fn network(&self) -> String {
        format!("{}_cairn", self.project)
    }

    /// A member's client endpoint on the compose network, which the host
    /// reaches directly.
    fn member_endpoint(&self, service: &str) -> String {
        let ip = run_ok(
            "docker",
            &[
                "inspect",
                "-f",
                &format!(
                    "{{{{(index .NetworkSettings.Networks \"{}\").IPAddress}}}}",
                    self.network()
                ),
                &self.container(service),
            ],
            &[],
        );
        format!("{ip}:2379")
    }

    /// The member that leads, asking each member that answers.
    fn leader(&self) -> &'static str {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            for service in MEMBERS {
                let out = etcdctl(
                    &self.member_endpoint(service),
                    &["endpoint", "status", "-w", "json"],
                    None,
                );
                if !out.status.success() {
                    continue;
                }
                let status: serde_json::Value =
                    serde_json::from_slice(&out.stdout).expect("endpoint status JSON");
                let status = &status[0]["Status"];
                if status["leader"].as_u64().is_some()
                    && status["leader"] == status["header"]["member_id"]
                {
                    return service;
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("no member leads");
    }

    fn put(&self, key: &str, value: &str) -> bool {
        put(&self.proxy(), key, value)
    }

    fn put_retrying(&self, key: &str, value: &str, patience: Duration) -> bool {
        put_retrying(&self.proxy(), key, value, patience)
    }

    fn get(&self, endpoint: &str, key: &str, serializable: bool) -> Option<String> {
        let mut args = vec!["get", key, "--print-value-only"];
        if serializable {
            args.push("--consistency=s");
        }
        let out = etcdctl(endpoint, &args, None);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

fn put(endpoint: &str, key: &str, value: &str) -> bool {
    etcdctl(endpoint, &["put", key, value], None)
        .status
        .success()
}

/// Puts, retrying for up to `patience`, as a client that retries does.
fn put_retrying(endpoint: &str, key: &str, value: &str, patience: Duration) -> bool {
    let deadline = Instant::now() + patience;
    loop {
        if put(endpoint, key, value) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = std::panic::catch_unwind(|| self.compose(&["down", "-v", "-t", "2"]));
    }
}

#[test]
#[ignore = "needs Docker and `make image`; run by `make test-compose`"]
fn killing_the_leader_keeps_writes_going_through_the_proxy() {
    let stack = Stack::up();
    assert!(stack.put("before", "1"));
    let leader = stack.leader();
    run_ok("docker", &["kill", &stack.container(leader)], &[]);
    let killed = Instant::now();
    assert!(
        stack.put_retrying("after", "2", Duration::from_secs(15)),
        "no write through the proxy within 15 s of killing the leader"
    );
    eprintln!(
        "killed leader {leader}; the first write went through {:?} later",
        killed.elapsed()
    );
    assert_eq!(
        stack.get(&stack.proxy(), "before", false).as_deref(),
        Some("1")
    );
    assert_eq!(
        stack.get(&stack.proxy(), "after", false).as_deref(),
        Some("2")
    );
}

#[test]
#[ignore = "needs Docker and `make image`; run by `make test-compose`"]
fn a_disconnected_member_catches_up_after_reconnecting() {
    let stack = Stack::up();
    let cut = "m3";
    let endpoint = stack.member_endpoint(cut);
    let network = stack.network();
    let container = stack.container(cut);
    run_ok(
        "docker",
        &["network", "disconnect", &network, &container],
        &[],
    );
    for i in 0..20 {
        assert!(
            stack.put_retrying(&format!("k{i}"), &i.to_string(), Duration::from_secs(15)),
            "the two connected members stopped taking writes"
        );
    }
    // The cut-off member, asked from inside its own network namespace (the
    // host cannot reach it now), serves and has none of those writes.
    let pid = run_ok(
        "docker",
        &["inspect", "-f", "{{.State.Pid}}", &container],
        &[],
    );
    for key in ["k0", "k19"] {
        let out = run_ok(
            "nsenter",
            &[
                "-t",
                &pid,
                "-n",
                "etcdctl",
                "--endpoints=127.0.0.1:2379",
                "get",
                key,
                "--consistency=s",
            ],
            &[("ETCDCTL_API", "3")],
        );
        assert_eq!(out, "", "{cut} has {key} although it was cut off");
    }
    run_ok("docker", &["network", "connect", &network, &container], &[]);
    let endpoint_after = stack.member_endpoint(cut);
    assert_eq!(endpoint, endpoint_after, "the member kept its address");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if stack.get(&endpoint, "k19", true).as_deref() == Some("19") {
            break;
        }
        assert!(Instant::now() < deadline, "{cut} did not catch up in 30 s");
        std::thread::sleep(Duration::from_millis(200));
    }
    for i in 0..20 {
        assert_eq!(
            stack.get(&endpoint, &format!("k{i}"), true),
            Some(i.to_string())
        );
    }
}

#[test]
#[ignore = "needs Docker and `make image`; run by `make test-compose`"]
fn a_rolling_restart_fails_no_request_of_a_retrying_client() {
    let stack = Stack::up();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let proxy = stack.proxy();
        std::thread::spawn(move || {
            let mut written = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let ok = put_retrying(
                    &proxy,
                    "counter",
                    &written.to_string(),
                    Duration::from_secs(20),
                );
                assert!(ok, "a write through {proxy} failed for 20 s");
                written += 1;
            }
            written
        })
    };
    for service in MEMBERS {
        run_ok(
            "docker",
            &["restart", "-t", "5", &stack.container(service)],
            &[],
        );
        stack.wait_healthy();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writer.join().expect("the writer did not fail");
    assert!(written > 0);
    assert_eq!(
        stack.get(&stack.proxy(), "counter", false),
        Some((written - 1).to_string())
    );
}

#[test]
#[ignore = "needs Docker and `make image`; run by `make test-compose`"]
fn down_and_up_keeps_the_data() {
    let stack = Stack::up();
    assert!(stack.put("kept", "yes"));
    stack.compose(&["down", "-t", "5"]);
    stack.compose(&["up", "-d"]);
    stack.wait_healthy();
    assert_eq!(
        stack.get(&stack.proxy(), "kept", false).as_deref(),
        Some("yes")
    );
}
