//! Two (or more) transports on 127.0.0.1 talking to each other.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use crossbeam_channel::Receiver;
use protobuf::Message as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use super::pb::peer_client::PeerClient;
use super::pb::{RaftBatch, SnapshotChunk};
use super::*;
use crate::BoxError;
use crate::raft_transport::{CLUSTER_GROUP, GroupId};

type TestResult = Result<(), BoxError>;

const WAIT: Duration = Duration::from_secs(20);

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// The byte at offset `i` of a test snapshot.
fn pattern(i: usize) -> u8 {
    (i.wrapping_mul(2_654_435_761) >> 13) as u8
}

/// Writes `size` bytes of `pattern` in uneven pieces, failing at `fail_at`
/// bytes when set, after waiting `delay`.
struct TestSource {
    size: usize,
    fail_at: Option<usize>,
    delay: Duration,
}

impl TestSource {
    fn new(size: usize) -> Arc<TestSource> {
        Arc::new(TestSource {
            size,
            fail_at: None,
            delay: Duration::ZERO,
        })
    }
}

impl SnapshotSource for TestSource {
    fn write_snapshot(&self, out: &mut dyn Write) -> std::io::Result<u64> {
        std::thread::sleep(self.delay);
        let mut written = 0;
        let mut piece = 0usize;
        while written < self.size {
            if let Some(fail_at) = self.fail_at
                && written >= fail_at
            {
                return Err(std::io::Error::other("the test source fails here"));
            }
            let n = (1 + piece * 7919 % 100_000).min(self.size - written);
            let bytes: Vec<u8> = (written..written + n).map(pattern).collect();
            out.write_all(&bytes)?;
            written += n;
            piece += 1;
        }
        Ok(42)
    }
}

pub(super) struct Member {
    pub(super) id: u64,
    transport: Arc<Transport>,
    pub(super) events: Receiver<PeerEvent>,
    pub(super) addr: SocketAddr,
    pub(super) url: String,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<Result<(), TransportError>>>,
    dir: tempfile::TempDir,
}

impl Member {
    pub(super) async fn start(
        id: u64,
        cluster_id: u64,
        tls: Option<PeerTls>,
    ) -> Result<Member, BoxError> {
        Member::start_with(id, cluster_id, tls, TestSource::new(0)).await
    }

    async fn start_with(
        id: u64,
        cluster_id: u64,
        tls: Option<PeerTls>,
        source: Arc<dyn SnapshotSource>,
    ) -> Result<Member, BoxError> {
        Member::start_on(id, cluster_id, tls, source, "127.0.0.1").await
    }

    /// Serves on a free port of `ip`.
    async fn start_on(
        id: u64,
        cluster_id: u64,
        tls: Option<PeerTls>,
        source: Arc<dyn SnapshotSource>,
        ip: &str,
    ) -> Result<Member, BoxError> {
        init_tracing();
        let listener = TcpListener::bind((ip, 0)).await?;
        let addr = listener.local_addr()?;
        let dir = tempfile::tempdir()?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let (events_tx, events) = EventSender::channel();
        let transport = Transport::start(TransportConfig {
            self_id: id,
            cluster_id,
            tls,
        });
        transport.attach(&GroupEndpoint {
            group: CLUSTER_GROUP,
            member: id,
            events: events_tx,
            snapshot_source: source,
            members_blob: Arc::new(move || format!("members of {id}").into_bytes()),
            snap_dir: dir.path().join("snap"),
            stopped: tokio::sync::watch::channel(None).1,
        });
        let mut member = Member {
            id,
            transport,
            events,
            addr,
            url: format!("{scheme}://{addr}"),
            stop: None,
            server: None,
            dir,
        };
        member.serve(listener);
        Ok(member)
    }

    fn serve(&mut self, listener: TcpListener) {
        let (stop, stopped) = oneshot::channel::<()>();
        let transport = self.transport.clone();
        self.server = Some(tokio::spawn(transport.serve(listener, async move {
            let _ = stopped.await;
        })));
        self.stop = Some(stop);
    }

    /// Stops serving, and checks the server really stops (graceful shutdown
    /// must not wait forever on peers' open streams).
    async fn stop_serving(&mut self) -> TestResult {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            tokio::time::timeout(WAIT, server).await???;
        }
        Ok(())
    }

    pub(super) fn snap_dir(&self) -> PathBuf {
        self.dir.path().join("snap")
    }
}

fn connect(a: &Member, b: &Member) {
    a.transport
        .set_peers(CLUSTER_GROUP, &[(b.id, vec![b.url.clone()])]);
    b.transport
        .set_peers(CLUSTER_GROUP, &[(a.id, vec![a.url.clone()])]);
}

fn heartbeat(from: u64, to: u64, commit: u64) -> Message {
    Message {
        msg_type: MessageType::MsgHeartbeat,
        from,
        to,
        term: 1,
        commit,
        ..Default::default()
    }
}

/// Waits for the first event that `matches` (dropping the others).
async fn wait_for(
    events: &Receiver<PeerEvent>,
    what: &str,
    mut matches: impl FnMut(&PeerEvent) -> bool,
) -> Result<PeerEvent, BoxError> {
    let deadline = Instant::now() + WAIT;
    loop {
        while let Ok(event) = events.try_recv() {
            if matches(&event) {
                return Ok(event);
            }
        }
        if Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}").into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Collects the Message events that arrive within `period`.
async fn messages_within(events: &Receiver<PeerEvent>, period: Duration) -> Vec<Message> {
    let deadline = Instant::now() + period;
    let mut messages = Vec::new();
    while Instant::now() < deadline {
        while let Ok(event) = events.try_recv() {
            if let PeerEvent::Message(m) = event {
                messages.push(m);
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    messages
}

/// Sends `count` heartbeats a → b and checks they all arrive, in order.
async fn exchange(a: &Member, b: &Member, count: u64) -> TestResult {
    // The first message may race the connection: resend until one lands.
    let deadline = Instant::now() + WAIT;
    loop {
        a.transport
            .send(CLUSTER_GROUP, vec![heartbeat(a.id, b.id, 0)]);
        let got = messages_within(&b.events, Duration::from_millis(100)).await;
        if !got.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("no message from {} reached {}", a.id, b.id).into());
        }
    }
    // The stream is up now, so nothing is lost: order and count are exact.
    a.transport.send(
        CLUSTER_GROUP,
        (1..=count).map(|i| heartbeat(a.id, b.id, i)).collect(),
    );
    let mut expected = 1;
    while expected <= count {
        let event = wait_for(
            &b.events,
            "a heartbeat",
            |e| matches!(e, PeerEvent::Message(m) if m.commit > 0),
        )
        .await?;
        if let PeerEvent::Message(m) = event {
            assert_eq!(m.commit, expected, "messages arrive in order");
            assert_eq!(
                (m.from, m.to, m.msg_type),
                (a.id, b.id, MessageType::MsgHeartbeat)
            );
            expected += 1;
        }
    }
    Ok(())
}

async fn pair(
    tls_a: Option<PeerTls>,
    tls_b: Option<PeerTls>,
) -> Result<(Member, Member), BoxError> {
    let a = Member::start(1, 7, tls_a).await?;
    let b = Member::start(2, 7, tls_b).await?;
    connect(&a, &b);
    Ok((a, b))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_messages_both_ways_in_order() -> TestResult {
    let (mut a, mut b) = pair(None, None).await?;
    exchange(&a, &b, 1000).await?;
    exchange(&b, &a, 10).await?;
    a.stop_serving().await?;
    b.stop_serving().await
}

/// Attaches raft group `group` to `member`'s transport, with a channel of
/// its own, as a member hosting several groups does.
fn attach_group(member: &Member, group: GroupId) -> Receiver<PeerEvent> {
    let (events_tx, events) = EventSender::channel();
    member.transport.attach(&GroupEndpoint {
        group,
        member: member.id,
        events: events_tx,
        snapshot_source: TestSource::new(0),
        members_blob: Arc::new(Vec::new),
        snap_dir: member.dir.path().join(format!("snap-{group}")),
        stopped: tokio::sync::watch::channel(None).1,
    });
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_share_one_stream_and_keep_apart() -> TestResult {
    let (mut a, mut b) = pair(None, None).await?;
    let b_group7 = attach_group(&b, 7);
    attach_group(&a, 7);
    a.transport.set_peers(7, &[(b.id, vec![b.url.clone()])]);
    exchange(&a, &b, 10).await?;

    // Interleaved in one send: each group's messages reach its own channel,
    // in order; a group b does not run (9) loses its messages and nothing else.
    let messages = (1..=30u64)
        .map(|i| (i % 3, heartbeat(a.id, b.id, i)))
        .collect::<Vec<_>>();
    for (slot, message) in messages {
        let group = [CLUSTER_GROUP, 7, 9][slot as usize];
        a.transport.send(group, vec![message]);
    }
    let cluster = messages_within(&b.events, Duration::from_millis(500)).await;
    let seven = messages_within(&b_group7, Duration::from_millis(100)).await;
    let commits = |got: &[Message]| got.iter().map(|m| m.commit).collect::<Vec<_>>();
    assert_eq!(
        commits(&cluster),
        (1..=30).filter(|i| i % 3 == 0).collect::<Vec<_>>()
    );
    assert_eq!(
        commits(&seven),
        (1..=30).filter(|i| i % 3 == 1).collect::<Vec<_>>()
    );

    // Detached, group 7 drops b as its peer; the cluster group keeps it.
    a.transport.detach(7);
    a.transport.send(7, vec![heartbeat(a.id, b.id, 99)]);
    exchange(&a, &b, 5).await?;
    assert!(
        messages_within(&b_group7, Duration::from_millis(200))
            .await
            .is_empty()
    );

    // Groups name their peers separately: b still reaches a in group 7.
    b.transport.set_peers(7, &[(a.id, vec![a.url.clone()])]);
    let a_group7 = attach_group(&a, 7);
    b.transport.send(7, vec![heartbeat(b.id, a.id, 1)]);
    let got = wait_for(&a_group7, "a group-7 heartbeat", |e| {
        matches!(e, PeerEvent::Message(_))
    })
    .await?;
    assert!(matches!(got, PeerEvent::Message(m) if m.commit == 1));
    a.stop_serving().await?;
    b.stop_serving().await
}

fn localhost() -> Vec<String> {
    vec!["127.0.0.1".to_owned(), "localhost".to_owned()]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_tls_messages() -> TestResult {
    let (mut a, mut b) = pair(
        Some(PeerTls::self_signed(&localhost())?),
        Some(PeerTls::self_signed(&localhost())?),
    )
    .await?;
    assert!(a.url.starts_with("https://"));
    exchange(&a, &b, 100).await?;
    exchange(&b, &a, 100).await?;
    a.stop_serving().await?;
    b.stop_serving().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_tls_with_client_cert_auth() -> TestResult {
    let tls = || -> Result<PeerTls, TransportError> {
        Ok(PeerTls {
            client_cert_auth: true,
            ..PeerTls::self_signed(&localhost())?
        })
    };
    let (a, b) = pair(Some(tls()?), Some(tls()?)).await?;
    exchange(&a, &b, 10).await
}

struct TestCa {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
}

impl TestCa {
    fn new(name: &str) -> Result<TestCa, BoxError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.distinguished_name.push(DnType::CommonName, name);
        let pem = params.self_signed(&key)?.pem();
        Ok(TestCa { params, key, pem })
    }

    /// A member certificate for 127.0.0.1 and localhost, good for both
    /// server and client authentication, trusting `trusted`.
    fn member_tls(&self, name: &str, trusted: &TestCa) -> Result<PeerTls, BoxError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(localhost())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer)?;
        Ok(PeerTls {
            cert_pem: cert.pem().into_bytes(),
            key_pem: key.serialize_pem().into_bytes(),
            trusted_ca_pem: Some(trusted.pem.clone().into_bytes()),
            client_cert_auth: true,
            allowed_cn: None,
            allowed_hostname: None,
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_verified_tls_with_client_cert_auth() -> TestResult {
    let ca = TestCa::new("cairn test CA")?;
    let (mut a, mut b) = pair(
        Some(ca.member_tls("member-1", &ca)?),
        Some(ca.member_tls("member-2", &ca)?),
    )
    .await?;
    exchange(&a, &b, 100).await?;
    exchange(&b, &a, 100).await?;
    a.stop_serving().await?;
    b.stop_serving().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_cert_from_another_ca_is_refused() -> TestResult {
    let ca = TestCa::new("cairn test CA")?;
    let other = TestCa::new("some other CA")?;
    // The intruder trusts the right CA, so it accepts the server; the
    // server must refuse the intruder's certificate.
    let server = Member::start(2, 7, Some(ca.member_tls("member-2", &ca)?)).await?;
    let intruder = Member::start(1, 7, Some(other.member_tls("intruder", &ca)?)).await?;
    intruder
        .transport
        .set_peers(CLUSTER_GROUP, &[(server.id, vec![server.url.clone()])]);
    for i in 0..20 {
        intruder
            .transport
            .send(CLUSTER_GROUP, vec![heartbeat(1, 2, i)]);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_for(&intruder.events, "Unreachable(2)", |e| {
        matches!(e, PeerEvent::Unreachable(2))
    })
    .await?;
    let got = messages_within(&server.events, Duration::from_millis(500)).await;
    assert!(got.is_empty(), "the server accepted {} messages", got.len());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_peer_without_tls_config_is_unreachable() -> TestResult {
    let server = Member::start(2, 7, Some(PeerTls::self_signed(&localhost())?)).await?;
    let plain = Member::start(1, 7, None).await?;
    plain
        .transport
        .set_peers(CLUSTER_GROUP, &[(server.id, vec![server.url.clone()])]);
    plain
        .transport
        .send(CLUSTER_GROUP, vec![heartbeat(1, 2, 1)]);
    wait_for(&plain.events, "Unreachable(2)", |e| {
        matches!(e, PeerEvent::Unreachable(2))
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_id_mismatch_is_refused() -> TestResult {
    let a = Member::start(1, 7, None).await?;
    let b = Member::start(2, 8, None).await?;
    connect(&a, &b);
    for i in 0..20 {
        a.transport.send(CLUSTER_GROUP, vec![heartbeat(1, 2, i)]);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_for(&a.events, "Unreachable(2)", |e| {
        matches!(e, PeerEvent::Unreachable(2))
    })
    .await?;
    let got = messages_within(&b.events, Duration::from_millis(300)).await;
    assert!(got.is_empty(), "another cluster's messages were accepted");

    // What the refusal looks like on the wire.
    let mut client = PeerClient::connect(b.url.clone()).await?;
    let batch = RaftBatch {
        cluster_id: 7,
        from: 1,
        messages: vec![heartbeat(1, 2, 1).write_to_bytes()?.into()],
        ..Default::default()
    };
    let status = match client.send(tokio_stream::iter(vec![batch])).await {
        Ok(_) => return Err("a batch of another cluster was accepted".into()),
        Err(status) => status,
    };
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert_eq!(status.message(), "cluster ID mismatch");
    Ok(())
}

/// An address nothing listens on (bound, then closed).
async fn dead_addr() -> Result<SocketAddr, BoxError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    Ok(listener.local_addr()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_is_bounded_while_the_peer_is_down() -> TestResult {
    let a = Member::start(1, 7, None).await?;
    let down = dead_addr().await?;
    a.transport
        .set_peers(CLUSTER_GROUP, &[(2, vec![format!("http://{down}")])]);
    a.transport.send(CLUSTER_GROUP, vec![heartbeat(1, 2, 0)]);
    wait_for(&a.events, "Unreachable(2)", |e| {
        matches!(e, PeerEvent::Unreachable(2))
    })
    .await?;
    // The sender now waits out its backoff: these pile up in the queue.
    a.transport.send(
        CLUSTER_GROUP,
        (1..=20_000).map(|i| heartbeat(1, 2, i)).collect(),
    );
    assert!(a.transport.queued(2) <= QUEUE_CAPACITY);
    assert!(a.transport.dropped(2) > 0, "a full queue drops messages");
    // Only a handful of reports for thousands of drops.
    let unreachable = messages_and_unreachable(&a.events);
    assert!(unreachable <= 10, "{unreachable} Unreachable reports");
    // After the next failed attempt the queue is emptied.
    let deadline = Instant::now() + WAIT;
    while a.transport.queued(2) > 0 {
        if Instant::now() > deadline {
            return Err("the queue of a down peer is never emptied".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

fn messages_and_unreachable(events: &Receiver<PeerEvent>) -> usize {
    events
        .try_iter()
        .filter(|e| matches!(e, PeerEvent::Unreachable(_)))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_to_unknown_peers_are_reported_unreachable() -> TestResult {
    let a = Member::start(1, 7, None).await?;
    a.transport.send(CLUSTER_GROUP, vec![heartbeat(1, 9, 1)]);
    wait_for(&a.events, "Unreachable(9)", |e| {
        matches!(e, PeerEvent::Unreachable(9))
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_the_peer_comes_back() -> TestResult {
    let a = Member::start(1, 7, None).await?;
    // b binds its port again after a restart. Outgoing connections take
    // their local ports from 127.0.0.1, where one may have just taken b's
    // freed port; on an address of its own in 127/8, nothing else will.
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH)?.subsec_nanos();
    let ip = format!(
        "127.{}.{}.{}",
        1 + std::process::id() % 250,
        nanos % 250,
        1 + nanos / 250 % 250
    );
    let mut b = Member::start_on(2, 7, None, TestSource::new(0), &ip).await?;
    connect(&a, &b);
    exchange(&a, &b, 10).await?;
    b.stop_serving().await?;
    // Messages while b is down are dropped and reported.
    a.transport.send(CLUSTER_GROUP, vec![heartbeat(1, 2, 0)]);
    wait_for(&a.events, "Unreachable(2)", |e| {
        matches!(e, PeerEvent::Unreachable(2))
    })
    .await?;
    // b comes back on the same address.
    let listener = TcpListener::bind(b.addr).await?;
    b.serve(listener);
    exchange(&a, &b, 10).await?;
    // And the peer's second URL is used when the first is dead.
    let dead = dead_addr().await?;
    a.transport.set_peers(
        CLUSTER_GROUP,
        &[(2, vec![format!("http://{dead}"), b.url.clone()])],
    );
    exchange(&a, &b, 10).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_peers_get_nothing() -> TestResult {
    let (a, b) = pair(None, None).await?;
    exchange(&a, &b, 1).await?;
    a.transport.set_peers(CLUSTER_GROUP, &[]);
    a.transport.send(CLUSTER_GROUP, vec![heartbeat(1, 2, 5)]);
    wait_for(&a.events, "Unreachable(2)", |e| {
        matches!(e, PeerEvent::Unreachable(2))
    })
    .await?;
    let got = messages_within(&b.events, Duration::from_millis(300)).await;
    assert!(got.is_empty());
    Ok(())
}

pub(super) fn snapshot_message(from: u64, to: u64, index: u64) -> Message {
    let mut message = Message {
        msg_type: MessageType::MsgSnapshot,
        from,
        to,
        term: 3,
        ..Default::default()
    };
    let meta = message.mut_snapshot().mut_metadata();
    meta.index = index;
    meta.term = 2;
    meta.mut_conf_state().voters = vec![1, 2, 3];
    message
}

async fn snapshot_files(dir: &Path) -> Result<Vec<PathBuf>, BoxError> {
    let mut files = Vec::new();
    let Ok(mut entries) = tokio::fs::read_dir(dir).await else {
        return Ok(files);
    };
    while let Some(entry) = entries.next_entry().await? {
        files.push(entry.path());
    }
    Ok(files)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_of_several_mib_arrives_intact() -> TestResult {
    let size = 5 * 1024 * 1024 + 12_345;
    let a = Member::start_with(1, 7, None, TestSource::new(size)).await?;
    let b = Member::start(2, 7, None).await?;
    connect(&a, &b);
    let sent = snapshot_message(1, 2, 77);
    a.transport.send(CLUSTER_GROUP, vec![sent.clone()]);
    let outcome = wait_for(&a.events, "SnapshotSent", |e| {
        matches!(e, PeerEvent::SnapshotSent { .. })
    })
    .await?;
    assert!(
        matches!(outcome, PeerEvent::SnapshotSent { to: 2, ok: true }),
        "{outcome:?}"
    );
    let received = wait_for(&b.events, "SnapshotReceived", |e| {
        matches!(e, PeerEvent::SnapshotReceived { .. })
    })
    .await?;
    let PeerEvent::SnapshotReceived {
        message,
        file,
        members,
    } = received
    else {
        return Err("not a snapshot".into());
    };
    assert_eq!(message, sent);
    assert_eq!(members, b"members of 1");
    assert!(file.starts_with(b.snap_dir()));
    let data = tokio::fs::read(&file).await?;
    assert_eq!(data.len(), size);
    assert!(data.iter().enumerate().all(|(i, byte)| *byte == pattern(i)));
    // Only the finished file is left; the consumer deletes it.
    assert_eq!(snapshot_files(&b.snap_dir()).await?, vec![file]);
    Ok(())
}

/// A snapshot stream as a sender writes it: the data in two chunks, and a
/// last chunk with the data's size and the given CRC-32.
fn snapshot_stream(data: &[u8], crc32: Option<u32>) -> Result<Vec<SnapshotChunk>, BoxError> {
    let (a, b) = data.split_at(data.len() / 2);
    Ok(vec![
        SnapshotChunk {
            cluster_id: 7,
            from: 1,
            message: snapshot_message(1, 2, 10).write_to_bytes()?.into(),
            members: Bytes::from_static(b"members of 1"),
            data: Bytes::copy_from_slice(a),
            ..Default::default()
        },
        SnapshotChunk {
            data: Bytes::copy_from_slice(b),
            ..Default::default()
        },
        SnapshotChunk {
            last: true,
            size: data.len() as u64,
            crc32,
            ..Default::default()
        },
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_damaged_on_the_way_is_refused_by_its_checksum() -> TestResult {
    let b = Member::start(2, 7, None).await?;
    let mut client = PeerClient::connect(b.url.clone()).await?;
    let data: Vec<u8> = (0..100_000).map(pattern).collect();
    let crc = crc32fast::hash(&data);
    let mut damaged = data.clone();
    damaged[54_321] ^= 0x10;

    let status = match client
        .send_snapshot(tokio_stream::iter(snapshot_stream(&damaged, Some(crc))?))
        .await
    {
        Ok(_) => return Err("a damaged snapshot was accepted".into()),
        Err(status) => status,
    };
    assert_eq!(status.code(), tonic::Code::DataLoss, "{status:?}");
    assert!(status.message().contains("CRC-32"), "{status:?}");
    // Nothing reaches raft, nothing is left on disk.
    assert!(snapshot_files(&b.snap_dir()).await?.is_empty());
    assert!(
        !b.events
            .try_iter()
            .any(|e| matches!(e, PeerEvent::SnapshotReceived { .. }))
    );

    // The same stream undamaged arrives, and so does one from a sender that
    // sends no checksum.
    for crc32 in [Some(crc), None] {
        let ack = client
            .send_snapshot(tokio_stream::iter(snapshot_stream(&data, crc32)?))
            .await?;
        assert_eq!(ack.into_inner().size, data.len() as u64);
        let received = wait_for(&b.events, "SnapshotReceived", |e| {
            matches!(e, PeerEvent::SnapshotReceived { .. })
        })
        .await?;
        let PeerEvent::SnapshotReceived { file, .. } = received else {
            return Err("not a snapshot".into());
        };
        assert_eq!(tokio::fs::read(&file).await?, data);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_snapshot_is_reported_and_leaves_no_file() -> TestResult {
    let source = Arc::new(TestSource {
        size: 4 * 1024 * 1024,
        fail_at: Some(1024 * 1024),
        delay: Duration::ZERO,
    });
    let a = Member::start_with(1, 7, None, source).await?;
    let b = Member::start(2, 7, None).await?;
    connect(&a, &b);
    a.transport
        .send(CLUSTER_GROUP, vec![snapshot_message(1, 2, 10)]);
    let outcome = wait_for(&a.events, "SnapshotSent", |e| {
        matches!(e, PeerEvent::SnapshotSent { .. })
    })
    .await?;
    assert!(
        matches!(outcome, PeerEvent::SnapshotSent { to: 2, ok: false }),
        "{outcome:?}"
    );
    // The receiver notices the cut stream and removes the partial file.
    let deadline = Instant::now() + WAIT;
    while !snapshot_files(&b.snap_dir()).await?.is_empty() {
        if Instant::now() > deadline {
            return Err("a partial snapshot file was left behind".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !b.events
            .try_iter()
            .any(|e| matches!(e, PeerEvent::SnapshotReceived { .. }))
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_snapshot_at_a_time_per_peer() -> TestResult {
    let source = Arc::new(TestSource {
        size: 1024,
        fail_at: None,
        delay: Duration::from_millis(300),
    });
    let a = Member::start_with(1, 7, None, source).await?;
    let b = Member::start(2, 7, None).await?;
    connect(&a, &b);
    a.transport.send(
        CLUSTER_GROUP,
        vec![snapshot_message(1, 2, 10), snapshot_message(1, 2, 11)],
    );
    let first = wait_for(&a.events, "SnapshotSent", |e| {
        matches!(e, PeerEvent::SnapshotSent { .. })
    })
    .await?;
    assert!(
        matches!(first, PeerEvent::SnapshotSent { to: 2, ok: false }),
        "{first:?}"
    );
    let second = wait_for(&a.events, "SnapshotSent", |e| {
        matches!(e, PeerEvent::SnapshotSent { .. })
    })
    .await?;
    assert!(
        matches!(second, PeerEvent::SnapshotSent { to: 2, ok: true }),
        "{second:?}"
    );
    let received = wait_for(&b.events, "SnapshotReceived", |e| {
        matches!(e, PeerEvent::SnapshotReceived { .. })
    })
    .await?;
    if let PeerEvent::SnapshotReceived { message, .. } = received {
        assert_eq!(message.get_snapshot().get_metadata().index, 10);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_over_ca_verified_tls() -> TestResult {
    let ca = TestCa::new("cairn test CA")?;
    let a = Member::start_with(
        1,
        7,
        Some(ca.member_tls("member-1", &ca)?),
        TestSource::new(3 * 1024 * 1024),
    )
    .await?;
    let b = Member::start(2, 7, Some(ca.member_tls("member-2", &ca)?)).await?;
    connect(&a, &b);
    a.transport
        .send(CLUSTER_GROUP, vec![snapshot_message(1, 2, 5)]);
    let outcome = wait_for(&a.events, "SnapshotSent", |e| {
        matches!(e, PeerEvent::SnapshotSent { .. })
    })
    .await?;
    assert!(
        matches!(outcome, PeerEvent::SnapshotSent { to: 2, ok: true }),
        "{outcome:?}"
    );
    let received = wait_for(&b.events, "SnapshotReceived", |e| {
        matches!(e, PeerEvent::SnapshotReceived { .. })
    })
    .await?;
    if let PeerEvent::SnapshotReceived { file, .. } = received {
        assert_eq!(tokio::fs::metadata(&file).await?.len(), 3 * 1024 * 1024);
    }
    Ok(())
}

#[test]
fn partial_snapshots_are_removed_at_start() -> TestResult {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("a.snap.part"), b"cut short")?;
    std::fs::write(dir.path().join("b.snap"), b"complete")?;
    server::remove_partial_snapshots(dir.path());
    assert!(!dir.path().join("a.snap.part").exists());
    assert!(dir.path().join("b.snap").exists());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_to_another_cluster_fails_without_hanging() -> TestResult {
    // Big enough that the writer blocks on the stream when the receiver
    // refuses it: the refusal must unblock it.
    let a = Member::start_with(1, 7, None, TestSource::new(16 * 1024 * 1024)).await?;
    let b = Member::start(2, 8, None).await?;
    connect(&a, &b);
    a.transport
        .send(CLUSTER_GROUP, vec![snapshot_message(1, 2, 10)]);
    let outcome = wait_for(&a.events, "SnapshotSent", |e| {
        matches!(e, PeerEvent::SnapshotSent { .. })
    })
    .await?;
    assert!(
        matches!(outcome, PeerEvent::SnapshotSent { to: 2, ok: false }),
        "{outcome:?}"
    );
    assert!(snapshot_files(&b.snap_dir()).await?.is_empty());
    Ok(())
}
