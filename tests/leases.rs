//! Leases on a real member: grant, attach, revoke in one revision, expiry by
//! the leader, keep-alive, restart, and etcdctl's output.

mod common;

use std::time::{Duration, Instant};

use common::Member;
use etcd_client::{Client, Error, GetOptions, LeaseTimeToLiveOptions, PutOptions, Txn, TxnOp};

async fn connect(m: &Member) -> Client {
    Client::connect([m.endpoint()], None)
        .await
        .expect("connect")
}

const NOT_FOUND: i32 = 5;

fn status_of<T: std::fmt::Debug>(result: Result<T, Error>) -> (i32, String) {
    match result {
        Err(Error::GRpcStatus(s)) => (s.code() as i32, s.message().to_string()),
        other => panic!("expected a gRPC error, got {other:?}"),
    }
}

async fn exists(c: &mut Client, key: &str) -> bool {
    !c.get(key, None).await.expect("get").kvs().is_empty()
}

/// Polls until `key` is gone; false if it is still there after `limit`.
async fn vanishes(c: &mut Client, key: &str, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if !exists(c, key).await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

#[tokio::test]
async fn attached_keys_go_with_their_lease_in_one_revision() {
    let mut m = Member::start();
    let mut c = connect(&m).await;
    let lease = c.lease_grant(60, None).await.expect("grant");
    assert_eq!(lease.ttl(), 60);
    let id = lease.id();
    assert!(id > 0);
    let with_lease = || Some(PutOptions::new().with_lease(id));
    c.put("a", "1", with_lease()).await.expect("put a");
    c.put("b", "1", with_lease()).await.expect("put b");
    c.put("c", "1", with_lease()).await.expect("put c");
    c.put("keep", "1", None).await.expect("put keep");
    // A put with ignore_lease keeps the key's lease.
    c.put("a", "2", Some(PutOptions::new().with_ignore_lease()))
        .await
        .expect("put ignore_lease");
    let a = c.get("a", None).await.expect("get a");
    assert_eq!(a.kvs()[0].lease(), id);
    assert_eq!(a.kvs()[0].value(), b"2");
    // Deleting or re-putting without the lease detaches a key.
    c.delete("b", None).await.expect("delete b");
    c.put("c", "2", None).await.expect("put c without lease");

    // A missing lease fails the put, in a txn too, and writes nothing.
    let missing = Some(PutOptions::new().with_lease(id + 1));
    assert_eq!(
        status_of(c.put("x", "1", missing.clone()).await),
        (NOT_FOUND, "etcdserver: requested lease not found".into())
    );
    let txn = Txn::new().and_then([TxnOp::put("y", "1", None), TxnOp::put("x", "1", missing)]);
    assert_eq!(status_of(c.txn(txn).await).0, NOT_FOUND);
    assert!(!exists(&mut c, "y").await);

    let ttl = c
        .lease_time_to_live(id, Some(LeaseTimeToLiveOptions::new().with_keys()))
        .await
        .expect("time to live");
    assert_eq!(ttl.granted_ttl(), 60);
    assert!((50..=60).contains(&ttl.ttl()), "{}", ttl.ttl());
    assert_eq!(ttl.keys(), [b"a".to_vec()]);

    // Leases and attachments survive a restart.
    m.kill();
    m.spawn(&[]);
    let mut c = connect(&m).await;
    let leases = c.leases().await.expect("leases");
    assert_eq!(
        leases.leases().iter().map(|l| l.id()).collect::<Vec<_>>(),
        [id]
    );
    c.put("d", "1", Some(PutOptions::new().with_lease(id)))
        .await
        .expect("put d");

    let before = c
        .get("keep", None)
        .await
        .expect("get")
        .header()
        .map(|h| h.revision());
    let revoked = c.lease_revoke(id).await.expect("revoke");
    let after = revoked.header().map(|h| h.revision());
    assert_eq!(
        after,
        before.map(|r| r + 1),
        "a and d deleted in one revision"
    );
    assert!(!exists(&mut c, "a").await);
    assert!(!exists(&mut c, "d").await);
    assert!(exists(&mut c, "c").await);
    assert!(exists(&mut c, "keep").await);
    assert_eq!(
        status_of(c.lease_revoke(id).await),
        (NOT_FOUND, "etcdserver: requested lease not found".into())
    );
    let gone = c.lease_time_to_live(id, None).await.expect("time to live");
    assert_eq!(gone.ttl(), -1);
}

#[tokio::test]
async fn expired_leases_take_their_keys_and_keep_alive_holds_them() {
    let m = Member::start();
    let mut c = connect(&m).await;
    let short = c.lease_grant(2, None).await.expect("grant").id();
    let kept = c.lease_grant(2, None).await.expect("grant").id();
    c.put("short", "1", Some(PutOptions::new().with_lease(short)))
        .await
        .expect("put");
    c.put("kept", "1", Some(PutOptions::new().with_lease(kept)))
        .await
        .expect("put");
    let (mut keeper, mut answers) = c.lease_keep_alive(kept).await.expect("keep alive");
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    // Renews every 500 ms until told to stop; returns how many renewals
    // were answered, or what was wrong with an answer.
    let renewing = tokio::spawn(async move {
        let mut renewed = 0u32;
        loop {
            keeper.keep_alive().await.map_err(|e| e.to_string())?;
            match answers.message().await {
                Ok(Some(answer)) if answer.ttl() > 0 => renewed += 1,
                other => return Err(format!("keep-alive answered {other:?}")),
            }
            tokio::select! {
                _ = &mut stopped => return Ok(renewed),
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    });
    assert!(
        vanishes(&mut c, "short", Duration::from_secs(20)).await,
        "the expired lease's key is still there"
    );
    // Several TTLs later the kept-alive key is still there.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(exists(&mut c, "kept").await);
    // A task that stopped early already holds its error.
    let _ = stop.send(());
    let renewed = renewing
        .await
        .expect("the renewing task ends")
        .expect("every renewal answered with a TTL");
    assert!(renewed >= 4, "{renewed} renewals answered");
    assert!(
        vanishes(&mut c, "kept", Duration::from_secs(20)).await,
        "the lease no longer kept alive did not expire"
    );
    let leases = c.leases().await.expect("leases");
    assert!(leases.leases().is_empty());
    let get = c
        .get("", Some(GetOptions::new().with_all_keys()))
        .await
        .expect("get");
    assert!(get.kvs().is_empty());
}

#[test]
fn etcdctl_lease_commands_print_as_etcd() {
    let m = Member::start();
    let granted = m.etcdctl_ok(&["lease", "grant", "100"]);
    let id = granted
        .strip_prefix("lease ")
        .and_then(|rest| rest.strip_suffix(" granted with TTL(100s)\n"))
        .unwrap_or_else(|| panic!("grant printed {granted:?}"))
        .to_string();
    m.etcdctl_ok(&["put", "k1", "v", "--lease", &id]);
    m.etcdctl_ok(&["put", "k2", "v", "--lease", &id]);
    let ttl = m.etcdctl_ok(&["lease", "timetolive", &id, "--keys"]);
    assert!(
        ttl.starts_with(&format!("lease {id} granted with TTL(100s), remaining("))
            && ttl.ends_with("s), attached keys([k1 k2])\n"),
        "{ttl}"
    );
    assert_eq!(
        m.etcdctl_ok(&["lease", "list"]),
        format!("found 1 leases\n{id}\n")
    );
    assert_eq!(
        m.etcdctl_ok(&["lease", "keep-alive", "--once", &id]),
        format!("lease {id} keepalived with TTL(100)\n")
    );
    assert_eq!(
        m.etcdctl_ok(&["lease", "revoke", &id]),
        format!("lease {id} revoked\n")
    );
    assert_eq!(
        m.etcdctl_ok(&["lease", "timetolive", &id]),
        format!("lease {id} already expired\n")
    );
    assert_eq!(m.etcdctl_ok(&["get", "k", "--prefix"]), "");
    let missing = m.etcdctl(&["lease", "revoke", &id]);
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("requested lease not found"),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );
}
