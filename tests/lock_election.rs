//! etcd's v3lock and v3election services, driven by etcdctl's `lock` and
//! `elect` and by the `etcd-client` crate.

mod common;

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::Member;
use etcd_client::{Client, Error, LeaderKey, LockOptions, ProclaimOptions, ResignOptions};

/// A long-running etcdctl whose stdout lines arrive on a channel.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Running {
    fn start(m: &Member, args: &[&str]) -> Running {
        let mut child = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &m.endpoint()])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcdctl is installed");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Running { child, lines }
    }

    fn line(&self, within: Duration) -> Option<String> {
        self.lines.recv_timeout(within).ok()
    }

    /// etcdctl unlocks (or resigns) on SIGINT before it exits.
    fn interrupt(&mut self) {
        let status = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
        self.child.wait().expect("etcdctl exits");
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const SOON: Duration = Duration::from_secs(10);
const A_WHILE: Duration = Duration::from_millis(1500);

#[test]
fn etcdctl_lock_holds_until_its_holder_exits() {
    let m = Member::start();
    let mut first = Running::start(&m, &["lock", "mylock"]);
    let key = first.line(SOON).expect("the holder prints its key");
    assert!(key.starts_with("mylock/"), "lock key {key:?}");

    let second = Running::start(&m, &["lock", "mylock"]);
    assert_eq!(second.line(A_WHILE), None, "the second waits");

    first.interrupt();
    let next = second.line(SOON).expect("the second gets the lock");
    assert!(next.starts_with("mylock/") && next != key, "{next:?}");
}

#[test]
fn etcdctl_lock_runs_a_command_while_holding() {
    let m = Member::start();
    // While the command runs, its lock key (etcdctl passes it in
    // ETCD_LOCK_KEY) is the only one under the lock's prefix.
    let script = format!(
        "echo \"$ETCD_LOCK_KEY\"; ETCDCTL_API=3 etcdctl --endpoints {} get --prefix --keys-only mylock/",
        m.endpoint()
    );
    let out = m.etcdctl_ok(&["lock", "mylock", "--", "sh", "-c", &script]);
    let lines: Vec<&str> = out.lines().filter(|l| !l.is_empty()).collect();
    assert!(
        lines.len() == 2 && lines[0].starts_with("mylock/") && lines[1] == lines[0],
        "the command ran without holding the lock: {out:?}"
    );
    // The lock was released when the command finished.
    assert_eq!(m.etcdctl_ok(&["get", "--prefix", "mylock/"]), "");
    let out = m.etcdctl_ok(&["lock", "mylock", "--", "echo", "again"]);
    assert_eq!(out.trim(), "again");
}

#[test]
fn a_killed_holders_lock_goes_when_its_lease_expires() {
    let m = Member::start();
    let mut holder = Running::start(&m, &["lock", "--ttl=5", "mylock"]);
    let key = holder.line(SOON).expect("the holder prints its key");
    let lease = key.strip_prefix("mylock/").expect("a key under the lock");
    // SIGKILL: no unlock, only the lease running out frees the lock.
    holder.child.kill().expect("kill");
    holder.child.wait().expect("wait");
    let second = Running::start(&m, &["lock", "mylock"]);
    assert_eq!(second.line(A_WHILE), None, "the second waits");
    let ttl = m.etcdctl_ok(&["lease", "timetolive", lease]);
    assert!(
        ttl.contains("remaining("),
        "the holder's lease is still alive while the second waits: {ttl}"
    );
    let next = second.line(SOON).expect("the second gets the lock");
    assert!(next.starts_with("mylock/") && next != key, "{next:?}");
    assert_eq!(
        m.etcdctl_ok(&["lease", "timetolive", lease]),
        // etcdctl prints the ID zero-padded to 16 digits; the lock key does not.
        format!(
            "lease {:016x} already expired\n",
            u64::from_str_radix(lease, 16).expect("a hex lease ID")
        ),
        "the lock passed on when the holder's lease expired"
    );
}

#[test]
fn etcdctl_elect_campaigns_and_observes() {
    let m = Member::start();
    let mut leader = Running::start(&m, &["elect", "myelection", "p1"]);
    let key = leader.line(SOON).expect("the leader prints its key");
    assert!(key.starts_with("myelection/"), "leader key {key:?}");
    assert_eq!(leader.line(SOON).as_deref(), Some("p1"));

    let observer = Running::start(&m, &["elect", "-l", "myelection"]);
    assert_eq!(observer.line(SOON), Some(key));
    assert_eq!(observer.line(SOON).as_deref(), Some("p1"));

    let second = Running::start(&m, &["elect", "myelection", "p2"]);
    assert_eq!(second.line(A_WHILE), None, "the second candidate waits");
    leader.interrupt();
    let next = second.line(SOON).expect("the second is elected");
    assert!(next.starts_with("myelection/"), "{next:?}");
    assert_eq!(second.line(SOON).as_deref(), Some("p2"));
    assert_eq!(observer.line(SOON), Some(next));
    assert_eq!(observer.line(SOON).as_deref(), Some("p2"));
}

fn message_of<T: std::fmt::Debug>(result: Result<T, Error>) -> String {
    match result {
        Err(Error::GRpcStatus(s)) => s.message().to_string(),
        other => panic!("expected a gRPC error, got {other:?}"),
    }
}

#[tokio::test]
async fn lock_and_election_through_the_client() {
    let m = Member::start();
    let mut c = Client::connect([m.endpoint()], None)
        .await
        .expect("connect");

    let missing = c
        .lock("l", Some(LockOptions::new().with_lease(0x1234)))
        .await;
    assert_eq!(message_of(missing), "etcdserver: requested lease not found");

    let lease = c.lease_grant(30, None).await.expect("grant").id();
    let locked = c
        .lock("l", Some(LockOptions::new().with_lease(lease)))
        .await
        .expect("lock");
    assert_eq!(locked.key(), format!("l/{lease:x}").as_bytes());
    // Locking again with the same lease is the same acquisition.
    let again = c
        .lock("l", Some(LockOptions::new().with_lease(lease)))
        .await
        .expect("lock again");
    assert_eq!(again.key(), locked.key());
    c.unlock(locked.key()).await.expect("unlock");
    assert_eq!(c.get("l/", None).await.expect("get").kvs().len(), 0);

    assert_eq!(message_of(c.leader("e").await), "election: no leader");
    let campaign = c.campaign("e", "v1", lease).await.expect("campaign");
    let leader = campaign.leader().expect("leader key").clone();
    c.proclaim(
        "v2",
        Some(ProclaimOptions::new().with_leader(leader.clone())),
    )
    .await
    .expect("proclaim");
    let current = c.leader("e").await.expect("leader");
    assert_eq!(current.kv().map(|kv| kv.value()), Some(&b"v2"[..]));

    let stale = LeaderKey::new()
        .with_name("e")
        .with_key(leader.key())
        .with_rev(leader.rev() + 100)
        .with_lease(lease);
    let refused = c
        .proclaim("v3", Some(ProclaimOptions::new().with_leader(stale)))
        .await;
    assert_eq!(message_of(refused), "election: not leader");

    c.resign(Some(ResignOptions::new().with_leader(leader)))
        .await
        .expect("resign");
    assert_eq!(message_of(c.leader("e").await), "election: no leader");
}
