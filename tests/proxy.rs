//! The grpc-proxy in front of real members: watch coalescing, the read
//! cache's ordering, --namespace, --resolver-prefix, keep-alive coalescing,
//! and failover when a member dies.

mod common;
#[path = "common/proxy.rs"]
mod proxy_process;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::Member;
use common::cluster::Cluster;
use etcd_client::{Client, EventType, GetOptions, LockOptions, WatchOptions};
use proxy_process::Proxy;

async fn connect(endpoint: String) -> Client {
    Client::connect([endpoint], None).await.expect("connect")
}

/// Polls `check` for up to 20 s.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_watchers_on_ten_keys_share_ten_upstream_watches() {
    const KEYS: usize = 10;
    const STREAMS: usize = 100;
    const PER_STREAM: usize = 100;
    let member = Member::start();
    let proxy = Proxy::start(&[member.endpoint()], &[]);
    let mut c = connect(proxy.endpoint()).await;
    // Each key's history before any watcher: revisions 2..=11.
    let mut history: HashMap<String, Vec<i64>> = HashMap::new();
    for k in 0..KEYS {
        let r = c.put(format!("k{k}"), "v0", None).await.expect("put");
        history
            .entry(format!("k{k}"))
            .or_default()
            .push(r.header().expect("header").revision());
    }
    let now = c
        .get("k0", None)
        .await
        .expect("get")
        .header()
        .expect("header")
        .revision();

    // Starts: mostly "now", some in the future, a few in the past (before
    // the coalesced watch began: they catch up on their own first).
    let start_of = |g: usize| -> i64 {
        match g % 100 {
            1 => 2 + (g % KEYS) as i64, // that key's first write
            n if n % 3 == 2 => now + 5,
            _ => 0,
        }
    };
    let mut streams = Vec::new();
    for s in 0..STREAMS {
        let mut watch_client = c.watch_client();
        let first = s * PER_STREAM;
        let (mut watcher, stream) = watch_client
            .watch(
                format!("k{}", first % KEYS),
                Some(WatchOptions::new().with_start_revision(start_of(first))),
            )
            .await
            .expect("watch");
        for g in first + 1..first + PER_STREAM {
            watcher
                .watch(
                    format!("k{}", g % KEYS),
                    Some(WatchOptions::new().with_start_revision(start_of(g))),
                )
                .await
                .expect("watch");
        }
        streams.push((watcher, stream));
    }
    eventually("10,000 client watchers", || {
        proxy.metric("cairn_proxy_client_watchers") == 10_000.0
    })
    .await;

    for round in 1..=3 {
        for k in 0..KEYS {
            let r = c
                .put(format!("k{k}"), format!("v{round}"), None)
                .await
                .expect("put");
            history
                .get_mut(&format!("k{k}"))
                .expect("key")
                .push(r.header().expect("header").revision());
        }
    }

    // Every watcher gets exactly the revisions of its key from its start:
    // watch IDs are 0.. in creation order on each stream.
    for (s, (_watcher, stream)) in streams.iter_mut().enumerate() {
        let mut got: HashMap<i64, Vec<i64>> = HashMap::new();
        let expected: HashMap<i64, Vec<i64>> = (0..PER_STREAM)
            .map(|j| {
                let g = s * PER_STREAM + j;
                let from = match start_of(g) {
                    0 => now + 1,
                    r => r,
                };
                let revs = history[&format!("k{}", g % KEYS)]
                    .iter()
                    .copied()
                    .filter(|r| *r >= from)
                    .collect();
                (j as i64, revs)
            })
            .collect();
        let total: usize = expected.values().map(Vec::len).sum();
        let mut count = 0;
        while count < total {
            let response = tokio::time::timeout(Duration::from_secs(20), stream.message())
                .await
                .expect("events within 20 s")
                .expect("stream works")
                .expect("stream open");
            for e in response.events() {
                assert_eq!(e.event_type(), EventType::Put);
                let kv = e.kv().expect("kv");
                got.entry(response.watch_id())
                    .or_default()
                    .push(kv.mod_revision());
                count += 1;
            }
        }
        for (id, revs) in &expected {
            assert_eq!(
                got.get(id).cloned().unwrap_or_default(),
                *revs,
                "stream {s} watcher {id}"
            );
        }
    }

    // Catch-ups done: one upstream watch per key, however many clients.
    eventually("10 upstream watches", || {
        proxy.metric("cairn_proxy_upstream_watchers") == KEYS as f64
    })
    .await;
    assert_eq!(
        proxy.metric("grpc_proxy_watchers_coalescing_total"),
        9_990.0
    );
    // The member agrees: it was asked for one watch per key, one per client
    // watch that started in the past (g % 100 == 1) while it caught up, and
    // a cancel for each of those, not for 10,000.
    let catch_ups = (0..STREAMS * PER_STREAM).filter(|g| g % 100 == 1).count() as u64;
    let asked = watch_requests(&member);
    assert!(
        (KEYS as u64..=KEYS as u64 + 2 * catch_ups).contains(&asked),
        "the member got {asked} watch requests for {KEYS} keys and {catch_ups} catch-ups"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_another_member_invalidates_the_cache_before_its_event_arrives() {
    let cluster = Cluster::start(3);
    let proxy = Proxy::start(&[cluster.endpoint(0)], &[]);
    let mut through_proxy = connect(proxy.endpoint()).await;
    let mut other = cluster.client(1).await;
    through_proxy.put("hot", "v0", None).await.expect("put");
    let serializable = || Some(GetOptions::new().with_serializable());
    let (_watcher, mut events) = through_proxy.watch("hot", None).await.expect("watch");
    for i in 1..=20 {
        // Read twice: the second is answered from the cache.
        for _ in 0..2 {
            through_proxy.get("hot", serializable()).await.expect("get");
        }
        let value = format!("v{i}");
        other.put("hot", value.as_str(), None).await.expect("put");
        let response = tokio::time::timeout(Duration::from_secs(10), events.message())
            .await
            .expect("event within 10 s")
            .expect("stream works")
            .expect("stream open");
        let kv = response.events()[0].kv().expect("kv");
        assert_eq!(kv.value(), value.as_bytes());
        // The event reached us, so the cache has already dropped "hot".
        let read = through_proxy.get("hot", serializable()).await.expect("get");
        assert_eq!(read.kvs()[0].value(), value.as_bytes(), "stale read {i}");
    }
    assert!(proxy.metric("grpc_proxy_cache_hits_total") >= 20.0);
}

/// Under auth the cache serves each caller only what a member confirms that
/// caller may read now: two users reading one key through one proxy never
/// get each other's cached answer, and a revoked permission counts at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_reads_under_auth_are_confirmed_for_each_caller() {
    let member = Member::start();
    let add_user = |name: &str| {
        let out = common::etcdctl(
            &member.endpoint(),
            &["user", "add", name, "--interactive=false"],
            Some(&format!("{name}\n")),
        );
        assert!(out.status.success(), "{out:?}");
    };
    for user in ["root", "alice", "bob"] {
        add_user(user);
    }
    member.etcdctl_ok(&["user", "grant-role", "root", "root"]);
    for (role, prefix, user) in [("app", "/app/", "alice"), ("other", "/other/", "bob")] {
        member.etcdctl_ok(&["role", "add", role]);
        member.etcdctl_ok(&[
            "role",
            "grant-permission",
            role,
            "read",
            prefix,
            "--prefix=true",
        ]);
        member.etcdctl_ok(&["user", "grant-role", user, role]);
    }
    member.etcdctl_ok(&["auth", "enable"]);
    member.etcdctl_ok(&["--user=root:root", "put", "/app/k", "secret"]);

    let proxy = Proxy::start(&[member.endpoint()], &["--cache-user=root:root"]);
    let as_user = |name: &'static str| {
        let endpoint = proxy.endpoint();
        async move {
            let options = etcd_client::ConnectOptions::new().with_user(name, name);
            Client::connect([endpoint], Some(options))
                .await
                .expect("connect")
        }
    };
    let mut alice = as_user("alice").await;
    let mut bob = as_user("bob").await;
    let mut nobody = connect(proxy.endpoint()).await;
    let serializable = || Some(GetOptions::new().with_serializable());

    // alice's reads come from the cache once its watch (as root) is up.
    let mut hits = 0.0;
    for _ in 0..200 {
        let read = alice
            .get("/app/k", serializable())
            .await
            .expect("alice reads");
        assert_eq!(read.kvs()[0].value(), b"secret");
        hits = proxy.metric("grpc_proxy_cache_hits_total");
        if hits >= 3.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(hits >= 3.0, "alice's reads never came from the cache");

    // bob and a caller without a token get the member's refusal, however
    // often they ask.
    for _ in 0..3 {
        let denied = bob
            .get("/app/k", serializable())
            .await
            .expect_err("bob may not");
        assert!(
            denied.to_string().contains("etcdserver: permission denied"),
            "{denied}"
        );
        let empty = nobody
            .get("/app/k", serializable())
            .await
            .expect_err("nobody may not");
        assert!(
            empty.to_string().contains("etcdserver: user name is empty"),
            "{empty}"
        );
    }

    // Revoked on the member itself: alice's cached answer is not served,
    // nor counted as a hit.
    let hits = proxy.metric("grpc_proxy_cache_hits_total");
    member.etcdctl_ok(&["--user=root:root", "user", "revoke-role", "alice", "app"]);
    let revoked = alice
        .get("/app/k", serializable())
        .await
        .expect_err("revoked");
    assert!(
        revoked
            .to_string()
            .contains("etcdserver: permission denied"),
        "{revoked}"
    );
    assert_eq!(proxy.metric("grpc_proxy_cache_hits_total"), hits);
}

/// Auth turned on through another endpoint tells the proxy nothing: a
/// caller without a token must get the member's refusal, not the answer the
/// cache held from before, and that refused hit is not counted as one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_turned_on_elsewhere_ends_tokenless_cached_reads() {
    let member = Member::start();
    member.etcdctl_ok(&["put", "k", "before auth"]);
    let proxy = Proxy::start(&[member.endpoint()], &[]);
    let mut nobody = connect(proxy.endpoint()).await;
    let serializable = || Some(GetOptions::new().with_serializable());
    let mut hits = 0.0;
    for _ in 0..200 {
        let read = nobody.get("k", serializable()).await.expect("get");
        assert_eq!(read.kvs()[0].value(), b"before auth");
        hits = proxy.metric("grpc_proxy_cache_hits_total");
        if hits >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(hits >= 1.0, "the read never came from the cache");

    let out = common::etcdctl(
        &member.endpoint(),
        &["user", "add", "root", "--interactive=false"],
        Some("root\n"),
    );
    assert!(out.status.success(), "{out:?}");
    member.etcdctl_ok(&["user", "grant-role", "root", "root"]);
    member.etcdctl_ok(&["auth", "enable"]);

    for _ in 0..3 {
        let refused = nobody
            .get("k", serializable())
            .await
            .expect_err("a caller without a token may read nothing now");
        assert!(
            refused
                .to_string()
                .contains("etcdserver: user name is empty"),
            "{refused}"
        );
    }
    assert_eq!(proxy.metric("grpc_proxy_cache_hits_total"), hits);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_sees_only_its_own_keys() {
    let member = Member::start();
    let proxy = Proxy::start(&[member.endpoint()], &["--namespace=tenant/"]);
    let mut direct = connect(member.endpoint()).await;
    let mut tenant = connect(proxy.endpoint()).await;
    direct.put("a", "outside", None).await.expect("put");

    let (_watcher, mut events) = tenant.watch("a", None).await.expect("watch");
    tenant.put("a", "inside", None).await.expect("put");
    let response = tokio::time::timeout(Duration::from_secs(10), events.message())
        .await
        .expect("event within 10 s")
        .expect("stream works")
        .expect("stream open");
    assert_eq!(response.events()[0].kv().expect("kv").key(), b"a");

    let stored = direct.get("tenant/a", None).await.expect("get");
    assert_eq!(stored.kvs()[0].value(), b"inside");
    let all = tenant
        .get("", Some(GetOptions::new().with_all_keys()))
        .await
        .expect("get all");
    let keys: Vec<&[u8]> = all.kvs().iter().map(|kv| kv.key()).collect();
    assert_eq!(keys, vec![b"a".as_slice()]);
    tenant
        .delete("", Some(etcd_client::DeleteOptions::new().with_all_keys()))
        .await
        .expect("delete all");
    let outside = direct.get("a", None).await.expect("get");
    assert_eq!(outside.kvs()[0].value(), b"outside");
    assert_eq!(direct.get("tenant/a", None).await.expect("get").count(), 0);
    // An empty key inside a namespace is etcd's "key is not provided".
    let err = tenant.put("", "x", None).await.expect_err("empty key");
    assert!(err.to_string().contains("key is not provided"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_survives_a_member_kill() {
    let mut cluster = Cluster::start(3);
    let proxy = Proxy::start(&cluster.endpoints(), &[]);
    let mut c = connect(proxy.endpoint()).await;
    let first = c.put("k", "0", None).await.expect("put");
    let from = first.header().expect("header").revision();
    let (_watcher, mut events) = c
        .watch("k", Some(WatchOptions::new().with_start_revision(from)))
        .await
        .expect("watch");
    // The proxy uses the first endpoint until it fails.
    cluster.kill(0);
    let mut revisions = vec![from];
    for i in 1..=10 {
        let deadline = Instant::now() + Duration::from_secs(20);
        let put = loop {
            match c.put("k", i.to_string(), None).await {
                Ok(r) => break r,
                Err(e) => {
                    assert!(Instant::now() < deadline, "put {i} kept failing: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        revisions.push(put.header().expect("header").revision());
    }
    let mut seen = Vec::new();
    while seen.len() < revisions.len() {
        let Ok(received) = tokio::time::timeout(Duration::from_secs(20), events.message()).await
        else {
            panic!("no events within 20 s; proxy log:\n{}", proxy.log_text());
        };
        let response = received.expect("stream works").expect("stream open");
        seen.extend(
            response
                .events()
                .iter()
                .filter_map(|e| e.kv().map(|kv| kv.mod_revision())),
        );
    }
    // A put retried after an unknown outcome may have landed twice; every
    // acknowledged one is seen, in order, exactly once.
    let mut acknowledged = revisions.clone();
    acknowledged.sort_unstable();
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    assert!(
        acknowledged.iter().all(|r| seen.contains(r)),
        "{seen:?} vs {acknowledged:?}"
    );
    let got = c.get("k", None).await.expect("get");
    assert_eq!(got.kvs()[0].value(), b"10");
}

/// etcd's e2e restarts a member behind a proxy with SIGINT. The calls that
/// would outlive it (the proxy cache's watch, its keep-alive stream,
/// clients' watches, observations and lock waits) end at once with etcd's
/// "server stopped" (Unavailable, so clients go elsewhere), instead of
/// holding the member for its request timeout; the proxy serves again once
/// the member is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_with_a_proxy_attached_stops_on_sigint() {
    let mut member = Member::start();
    let proxy = Proxy::start(&[member.endpoint()], &[]);
    let mut client = connect(proxy.endpoint()).await;
    client.put("k", "v1", None).await.expect("put");
    let (_watcher, _events) = client.watch("k", None).await.expect("watch");
    let lease = client.lease_grant(60, None).await.expect("grant").id();
    let (mut keeper, mut answers) = client.lease_keep_alive(lease).await.expect("keep alive");
    keeper.keep_alive().await.expect("send");
    answers.message().await.expect("answer").expect("open");

    // Straight on the member, to see how each call ends.
    let mut direct = connect(member.endpoint()).await;
    let (_direct_watcher, mut events) = direct.watch("k", None).await.expect("watch");
    let (mut direct_keeper, mut direct_answers) =
        direct.lease_keep_alive(lease).await.expect("keep alive");
    direct_keeper.keep_alive().await.expect("send");
    direct_answers
        .message()
        .await
        .expect("answer")
        .expect("open");
    let mut observation = direct.observe("election").await.expect("observe");
    let with_lease = |id| Some(LockOptions::new().with_lease(id));
    direct.lock("lock", with_lease(lease)).await.expect("lock");
    let other = direct.lease_grant(60, None).await.expect("grant").id();
    let mut waiter = connect(member.endpoint()).await;
    let lock_wait =
        tokio::spawn(async move { waiter.lock("lock", with_lease(other)).await.map(|_| ()) });
    let ends = tokio::spawn(async move {
        let watch = loop {
            match events.message().await {
                Ok(Some(_)) => continue,
                other => break other.map(|_| ()),
            }
        };
        let keep_alive = direct_answers.message().await.map(|_| ());
        let observe = observation.message().await.map(|_| ());
        (watch, keep_alive, observe)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    let status = tokio::task::block_in_place(|| member.interrupt(Duration::from_secs(15)));
    assert!(
        status.is_some(),
        "the member did not exit on SIGINT:\n{}",
        member.log_text()
    );
    let (watch, keep_alive, observe) = ends.await.expect("stream task");
    let lock = lock_wait.await.expect("lock task");
    for (call, end) in [
        ("watch", watch),
        ("keep-alive", keep_alive),
        ("observe", observe),
        ("lock", lock),
    ] {
        let error = end.expect_err(call).to_string();
        assert!(
            error.contains("etcdserver: server stopped"),
            "{call} ended with {error}"
        );
    }

    assert!(
        !member
            .log_text()
            .contains("still open after the request timeout"),
        "the member waited out its request timeout:\n{}",
        member.log_text()
    );
    tokio::task::block_in_place(|| member.spawn(&[]));
    let mut put = client.put("k", "v2", None).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while put.is_err() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        put = client.put("k", "v2", None).await;
    }
    put.expect("a put through the proxy after the restart");
}

/// The proxy's progress notifications come as often as its
/// --experimental-watch-progress-notify-interval says (etcd's default is
/// ten minutes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_notifications_follow_the_configured_interval() {
    let member = Member::start();
    let proxy = Proxy::start(
        &[member.endpoint()],
        &["--experimental-watch-progress-notify-interval=300ms"],
    );
    let mut client = connect(proxy.endpoint()).await;
    let put = client.put("k", "v", None).await.expect("put");
    let revision = put.header().expect("header").revision();
    let options = WatchOptions::new().with_progress_notify();
    let (_watcher, mut events) = client.watch("k", Some(options)).await.expect("watch");
    let mut notifications = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    while notifications < 2 {
        let left = deadline.saturating_duration_since(Instant::now());
        let response = tokio::time::timeout(left, events.message())
            .await
            .expect("two progress notifications within 5 s")
            .expect("stream works")
            .expect("stream open");
        if !response.created() && response.events().is_empty() {
            assert!(response.header().expect("header").revision() >= revision);
            notifications += 1;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alives_share_one_upstream_stream_and_registration_lists_the_proxy() {
    let member = Member::start();
    let advertise = "127.0.0.1:23790";
    let proxy = Proxy::start(
        &[member.endpoint()],
        &[
            "--resolver-prefix=proxies",
            "--resolver-ttl=10",
            &format!("--advertise-client-url={advertise}"),
        ],
    );
    let mut c = connect(proxy.endpoint()).await;
    let lease = c.lease_grant(30, None).await.expect("grant").id();
    let mut clients = Vec::new();
    for _ in 0..20 {
        let mut client = connect(proxy.endpoint()).await;
        let (mut keeper, mut responses) = client.lease_keep_alive(lease).await.expect("keep alive");
        keeper.keep_alive().await.expect("send");
        let response = tokio::time::timeout(Duration::from_secs(10), responses.message())
            .await
            .expect("answer within 10 s")
            .expect("stream works")
            .expect("stream open");
        assert_eq!(response.id(), lease);
        assert!(response.ttl() > 0);
        clients.push((client, keeper, responses));
    }
    assert_eq!(proxy.metric("cairn_proxy_client_keepalive_streams"), 20.0);
    assert_eq!(proxy.metric("cairn_proxy_upstream_keepalive_streams"), 1.0);

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let members = c.member_list().await.expect("member list");
        let urls: Vec<String> = members
            .members()
            .iter()
            .flat_map(|m| m.client_urls().to_vec())
            .collect();
        if urls == vec![advertise.to_owned()] {
            break;
        }
        assert!(Instant::now() < deadline, "proxy not listed: {urls:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The member's count of messages received on Watch streams: creates,
/// cancels and progress requests.
fn watch_requests(member: &Member) -> u64 {
    const LINE: &str = "grpc_server_msg_received_total{grpc_method=\"Watch\",grpc_service=\"etcdserverpb.Watch\",grpc_type=\"bidi_stream\"} ";
    common::http::request(&member.endpoint(), "GET", "/metrics", "")
        .body
        .lines()
        .find_map(|l| l.strip_prefix(LINE)?.parse().ok())
        .expect("the member counts watch requests")
}

/// The member's count of Watch calls that ended with the client gone.
fn canceled_watches(member: &Member) -> u64 {
    const LINE: &str = "grpc_server_handled_total{grpc_code=\"Canceled\",grpc_method=\"Watch\",grpc_service=\"etcdserverpb.Watch\",grpc_type=\"bidi_stream\"} ";
    common::http::request(&member.endpoint(), "GET", "/metrics", "")
        .body
        .lines()
        .find_map(|l| l.strip_prefix(LINE)?.parse().ok())
        .expect("the member counts cancelled watches")
}

/// A client watch from an old revision is one watch on the member, as
/// behind etcd's proxy (the coalesced watch starts where its first watcher
/// does, with no private catch-up watch beside it): each client watch that
/// ends is one cancelled Watch on the member, the count etcd's e2e
/// TestV3Metrics reads with its watches going through the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_from_the_past_is_one_watch_on_the_member() {
    let member = Member::start();
    let proxy = Proxy::start(&[member.endpoint()], &[]);
    let mut c = connect(proxy.endpoint()).await;
    c.put("k", "v", None).await.expect("put");
    let before = canceled_watches(&member);
    for round in 1..=3 {
        let mut client = connect(proxy.endpoint()).await;
        let (watcher, mut stream) = client
            .watch("k", Some(WatchOptions::new().with_start_revision(1)))
            .await
            .expect("watch");
        let event = loop {
            let response = tokio::time::timeout(Duration::from_secs(10), stream.message())
                .await
                .expect("an answer within 10 s")
                .expect("stream works")
                .expect("stream open");
            if let Some(event) = response.events().first() {
                break event.clone();
            }
        };
        assert_eq!(event.kv().expect("kv").value(), b"v");
        drop((watcher, stream, client));
        let expected = before + round;
        eventually("the member's count of cancelled watches", || {
            canceled_watches(&member) >= expected
        })
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(canceled_watches(&member), expected, "round {round}");
    }
}

/// The proxy's metrics page counts the calls of its own gRPC server as
/// go-grpc-prometheus does: calls started and handled by code, a watch
/// whose client left as Canceled, and the messages each way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_counts_its_own_grpc_calls() {
    let member = Member::start();
    let proxy = Proxy::start(&[member.endpoint()], &[]);
    let mut c = connect(proxy.endpoint()).await;
    c.put("k", "v", None).await.expect("put");
    let (watcher, mut stream) = c.watch("k", None).await.expect("watch");
    c.put("k", "w", None).await.expect("put");
    loop {
        let response = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("an answer within 10 s")
            .expect("stream works")
            .expect("stream open");
        if !response.events().is_empty() {
            break;
        }
    }
    drop((watcher, stream));
    let labels = |method: &str, service: &str, kind: &str| {
        format!(
            "grpc_method=\"{method}\",grpc_service=\"etcdserverpb.{service}\",grpc_type=\"{kind}\""
        )
    };
    let put = labels("Put", "KV", "unary");
    let watch = labels("Watch", "Watch", "bidi_stream");
    eventually("the watch counted as Canceled", || {
        proxy.metric(&format!(
            "grpc_server_handled_total{{grpc_code=\"Canceled\",{watch}}}"
        )) == 1.0
    })
    .await;
    for (name, value) in [
        (format!("grpc_server_started_total{{{put}}}"), 2.0),
        (
            format!("grpc_server_handled_total{{grpc_code=\"OK\",{put}}}"),
            2.0,
        ),
        (format!("grpc_server_msg_received_total{{{put}}}"), 2.0),
        (format!("grpc_server_msg_sent_total{{{put}}}"), 2.0),
        (format!("grpc_server_started_total{{{watch}}}"), 1.0),
        // The create request; the created response and the event.
        (format!("grpc_server_msg_received_total{{{watch}}}"), 1.0),
        (format!("grpc_server_msg_sent_total{{{watch}}}"), 2.0),
    ] {
        assert_eq!(proxy.metric(&name), value, "{name}");
    }
}

/// etcd's `grpc-proxy start --auto-tls --insecure-skip-tls-verify` in front
/// of a member with --auto-tls, as etcd's *ClientAutoTLS e2e tests run it:
/// clients reach the proxy over TLS with a certificate the proxy made (kept
/// under --data-dir), and the proxy reaches the member over TLS without
/// verifying the member's self-signed certificate.
#[test]
fn auto_tls_on_both_sides_of_the_proxy() {
    let member_port = common::free_port();
    let member_url = format!("https://127.0.0.1:{member_port}");
    // The later flags win over the plain ones Member starts with.
    let _member = Member::start_with(&[
        "--listen-client-urls",
        &member_url,
        "--advertise-client-urls",
        &member_url,
        "--auto-tls",
    ]);
    let data_dir = tempfile::tempdir().expect("temp dir");
    let data_dir_flag = format!("--data-dir={}", data_dir.path().display());
    let proxy = Proxy::start(
        std::slice::from_ref(&member_url),
        &["--auto-tls", "--insecure-skip-tls-verify", &data_dir_flag],
    );
    let cert = data_dir.path().join("fixtures/proxy/cert.pem");
    assert!(cert.exists(), "no certificate kept at {}", cert.display());

    let tls = ["--insecure-transport=false", "--insecure-skip-tls-verify"];
    let etcdctl = |args: &[&str]| {
        let args: Vec<&str> = tls.iter().chain(args).copied().collect();
        common::etcdctl(&format!("https://{}", proxy.endpoint()), &args, None)
    };
    let put = etcdctl(&["put", "k", "through TLS"]);
    assert!(
        put.status.success(),
        "put: {}\n{}",
        String::from_utf8_lossy(&put.stderr),
        proxy.log_text()
    );
    let get = etcdctl(&["get", "k", "--print-value-only"]);
    assert_eq!(String::from_utf8_lossy(&get.stdout), "through TLS\n");
    // The proxy serves TLS only.
    let plain = common::etcdctl(
        &proxy.endpoint(),
        &["get", "k", "--dial-timeout=1s", "--command-timeout=2s"],
        None,
    );
    assert!(!plain.status.success());
}

#[test]
fn listen_cipher_suites_are_taken_as_etcds_grpc_proxy_takes_them() {
    let member = Member::start();
    // Go's names, or empty for the defaults, as etcd's e2e passes them.
    for suites in [
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
        "",
    ] {
        let flag = format!("--listen-cipher-suites={suites}");
        let proxy = Proxy::start(&[member.endpoint()], &[&flag]);
        assert!(proxy.log_text().contains("started gRPC proxy"));
    }
    // A name no TLS library knows is refused at start.
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_cairn-grpc-proxy"))
        .args([
            "start",
            &format!("--endpoints={}", member.endpoint()),
            "--listen-cipher-suites=TLS_NO_SUCH_SUITE",
        ])
        .output()
        .expect("run cairn-grpc-proxy");
    assert!(!refused.status.success(), "{refused:?}");
}
