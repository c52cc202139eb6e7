//! Untrusted bytes through the receiving side of the peer protocol, on a
//! real transport's port: random bytes after HTTP/2's preface; gRPC calls
//! of `Send` and `SendSnapshot` whose bodies are random, or well-framed
//! messages of random content (raft messages valid or not, for this member
//! or another, groups that do not match, snapshot chunks with sizes and
//! checksums right or wrong), their frames' lengths sometimes made huge or
//! cut. The member never panics or hangs, allocates nothing like a 4 GiB
//! length, passes raft only messages addressed to it and only snapshots
//! whose size and checksum held, leaves no partial snapshot file, and still
//! answers afterwards. What raft-rs does with a well-formed message a
//! member sends is not in scope: raft trusts its members, as etcd's does.
//! `make fuzz` runs many more cases.

use std::sync::LazyLock;
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;
use prost::Message as _;
use protobuf::{Message as _, ProtobufEnum as _};
use raft::prelude::{Message, MessageType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::PeerEvent;
use super::pb::peer_client::PeerClient;
use super::pb::{MembersRequest, RaftBatch, SnapshotChunk};
use super::tests::{Member, snapshot_message};
use crate::BoxError;

const SELF: u64 = 2;
const CLUSTER: u64 = 7;
/// Longer than any case takes: a case that needs it has hung.
const CASE_TIMEOUT: Duration = Duration::from_secs(10);

/// One member for every case, on a runtime of its own.
struct Fixture {
    runtime: tokio::runtime::Runtime,
    member: Member,
}

static FIXTURE: LazyLock<parking_lot::Mutex<Fixture>> = LazyLock::new(|| {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let member = runtime
        .block_on(Member::start(SELF, CLUSTER, None))
        .expect("a member");
    parking_lot::Mutex::new(Fixture { runtime, member })
});

/// What one case sends.
#[derive(Debug, Clone)]
enum Input {
    /// Random bytes after the HTTP/2 preface.
    Raw(Vec<u8>),
    /// A gRPC call's body of random bytes.
    Body { snapshot: bool, body: Vec<u8> },
    /// A `Send` call of these batches, each framed as gRPC frames them
    /// unless `damage` says otherwise.
    Batches(Vec<(RaftBatch, Damage)>),
    /// A `SendSnapshot` call of these chunks.
    Chunks(Vec<(SnapshotChunk, Damage)>),
}

/// What becomes of one gRPC frame.
#[derive(Debug, Clone)]
enum Damage {
    None,
    /// The compression flag set (nothing was negotiated).
    Compressed,
    /// The length prefix replaced.
    Length(u32),
    /// The frame cut after this many bytes.
    Cut(usize),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        8 => Just(Damage::None),
        1 => Just(Damage::Compressed),
        1 => prop_oneof![Just(u32::MAX), Just(1 << 31), Just(128 << 20), any::<u32>()]
            .prop_map(Damage::Length),
        1 => any::<usize>().prop_map(Damage::Cut),
    ]
}

fn frame(message: &[u8], damage: &Damage) -> Vec<u8> {
    let mut out = vec![u8::from(matches!(damage, Damage::Compressed))];
    let len = match damage {
        Damage::Length(len) => *len,
        _ => message.len() as u32,
    };
    out.extend(len.to_be_bytes());
    out.extend(message);
    if let Damage::Cut(at) = damage {
        out.truncate(at % (out.len() + 1));
    }
    out
}

fn message_type() -> impl Strategy<Value = MessageType> {
    (0i32..20).prop_map(|n| MessageType::from_i32(n).unwrap_or(MessageType::MsgHup))
}

/// An encoded raft message: valid, for this member or another, with
/// random fields, or random bytes.
fn raft_message() -> impl Strategy<Value = Bytes> {
    prop_oneof![
        3 => (
            message_type(),
            prop_oneof![Just(SELF), Just(1u64), any::<u64>()],
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            prop::collection::vec(any::<u8>(), 0..16),
        )
            .prop_map(|(msg_type, to, term, index, commit, context)| {
                let message = Message {
                    msg_type,
                    from: 1,
                    to,
                    term,
                    index,
                    commit,
                    context: context.into(),
                    ..Default::default()
                };
                Bytes::from(message.write_to_bytes().unwrap_or_default())
            }),
        1 => prop::collection::vec(any::<u8>(), 0..48).prop_map(Bytes::from),
    ]
}

fn batch() -> impl Strategy<Value = RaftBatch> {
    (
        prop_oneof![4 => Just(CLUSTER), 1 => any::<u64>()],
        prop::collection::vec(raft_message(), 0..4),
        prop::collection::vec(prop_oneof![Just(0u64), Just(1u64), any::<u64>()], 0..4),
    )
        .prop_map(|(cluster_id, messages, groups)| RaftBatch {
            cluster_id,
            from: 1,
            messages,
            groups,
        })
}

/// A snapshot stream: a first chunk with a MsgSnapshot (valid or not, for
/// this member or not), data in pieces, and a last chunk whose size and
/// checksum are right or not, or missing.
fn chunks() -> impl Strategy<Value = Vec<(SnapshotChunk, Damage)>> {
    (
        prop_oneof![4 => Just(CLUSTER), 1 => any::<u64>()],
        prop_oneof![
            4 => (prop_oneof![Just(SELF), any::<u64>()], any::<u64>()).prop_map(|(to, index)| {
                Bytes::from(snapshot_message(1, to, index).write_to_bytes().unwrap_or_default())
            }),
            1 => raft_message(),
        ],
        prop_oneof![4 => Just(0u64), 1 => any::<u64>()],
        prop_oneof![
            Just(b"[]".to_vec()),
            prop::collection::vec(any::<u8>(), 0..16)
        ],
        prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..4),
        (0u8..4, any::<u64>(), any::<u32>()),
        prop::collection::vec(damage(), 6),
    )
        .prop_map(
            |(cluster_id, message, group, members, data, (last, size, crc), damages)| {
                let all: Vec<u8> = data.concat();
                let mut chunks = vec![SnapshotChunk {
                    cluster_id,
                    from: 1,
                    message,
                    members: members.into(),
                    group,
                    ..Default::default()
                }];
                chunks.extend(data.into_iter().map(|data| SnapshotChunk {
                    data: data.into(),
                    ..Default::default()
                }));
                // 0: no last chunk; 1: right; 2: wrong size; 3: wrong checksum.
                if last > 0 {
                    chunks.push(SnapshotChunk {
                        last: true,
                        size: if last == 2 { size } else { all.len() as u64 },
                        crc32: Some(if last == 3 {
                            crc
                        } else {
                            crc32fast::hash(&all)
                        }),
                        ..Default::default()
                    });
                }
                chunks
                    .into_iter()
                    .zip(damages.into_iter().cycle())
                    .collect()
            },
        )
}

fn input() -> impl Strategy<Value = Input> {
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..256).prop_map(Input::Raw),
        1 => (any::<bool>(), prop::collection::vec(any::<u8>(), 0..256))
            .prop_map(|(snapshot, body)| Input::Body { snapshot, body }),
        3 => prop::collection::vec((batch(), damage()), 0..4).prop_map(Input::Batches),
        3 => chunks().prop_map(Input::Chunks),
    ]
}

/// Sends `frames` as the body of one gRPC call to `path` and reads the
/// answer, whatever it is.
async fn call(member: &Member, path: &str, frames: Vec<Vec<u8>>) -> Result<(), BoxError> {
    let tcp = TcpStream::connect(member.addr).await?;
    let (client, connection) = h2::client::handshake(tcp).await?;
    let connection = tokio::spawn(connection);
    let mut client = client.ready().await?;
    let request = http::Request::post(format!("http://{}{path}", member.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())?;
    let (response, mut body) = client.send_request(request, false)?;
    for frame in frames {
        body.send_data(frame.into(), false)?;
    }
    body.send_data(Bytes::new(), true)?;
    let mut response = response.await?.into_body();
    while let Some(data) = response.data().await {
        let data = data?;
        let _ = response.flow_control().release_capacity(data.len());
    }
    let _ = response.trailers().await;
    connection.abort();
    Ok(())
}

async fn raw(member: &Member, bytes: &[u8]) -> std::io::Result<()> {
    let mut tcp = TcpStream::connect(member.addr).await?;
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
    tcp.write_all(bytes).await?;
    tcp.shutdown().await?;
    let mut sink = Vec::new();
    tcp.read_to_end(&mut sink).await?;
    Ok(())
}

async fn send(member: &Member, input: &Input) {
    // Errors are the member refusing, or closing the connection: fine.
    let _ = match input {
        Input::Raw(bytes) => raw(member, bytes).await.map_err(BoxError::from),
        Input::Body { snapshot, body } => {
            let path = if *snapshot {
                "/cairnpeerpb.Peer/SendSnapshot"
            } else {
                "/cairnpeerpb.Peer/Send"
            };
            call(member, path, vec![body.clone()]).await
        }
        Input::Batches(batches) => {
            let frames = batches
                .iter()
                .map(|(batch, damage)| frame(&batch.encode_to_vec(), damage))
                .collect();
            call(member, "/cairnpeerpb.Peer/Send", frames).await
        }
        Input::Chunks(chunks) => {
            let frames = chunks
                .iter()
                .map(|(chunk, damage)| frame(&chunk.encode_to_vec(), damage))
                .collect();
            call(member, "/cairnpeerpb.Peer/SendSnapshot", frames).await
        }
    };
}

/// What raft may receive from `input`: each snapshot's data, if its
/// stream was whole (the checks on what is not are the member's).
fn whole_snapshots(input: &Input) -> Option<Vec<u8>> {
    let Input::Chunks(chunks) = input else {
        return None;
    };
    Some(chunks.iter().flat_map(|(c, _)| c.data.to_vec()).collect())
}

/// Sends `input`; returns how many messages and snapshots reached raft.
fn through_member(input: Input) -> Result<(usize, usize), TestCaseError> {
    let fixture = FIXTURE.lock();
    let member = &fixture.member;
    fixture.runtime.block_on(async {
        tokio::time::timeout(CASE_TIMEOUT, send(member, &input))
            .await
            .map_err(|_| TestCaseError::fail("the member did not answer: hung"))?;
        // It still answers.
        let mut client = PeerClient::connect(member.url.clone())
            .await
            .map_err(|e| TestCaseError::fail(format!("cannot connect afterwards: {e}")))?;
        client
            .members(MembersRequest {})
            .await
            .map_err(|e| TestCaseError::fail(format!("no answer afterwards: {e}")))?;
        // Whatever reached raft was for this member, and whole.
        let (mut messages, mut snapshots) = (0, 0);
        while let Ok(event) = member.events.try_recv() {
            match event {
                PeerEvent::Message(message) => {
                    prop_assert_eq!(message.to, SELF);
                    messages += 1;
                }
                PeerEvent::SnapshotReceived { message, file, .. } => {
                    snapshots += 1;
                    prop_assert_eq!(message.to, SELF);
                    prop_assert_eq!(message.get_msg_type(), MessageType::MsgSnapshot);
                    let data = std::fs::read(&file).unwrap_or_default();
                    let _ = std::fs::remove_file(&file);
                    prop_assert_eq!(Some(data), whole_snapshots(&input));
                }
                _ => {}
            }
        }
        // A refused or cut stream leaves no file behind, once its handler
        // has ended.
        let deadline = tokio::time::Instant::now() + CASE_TIMEOUT;
        loop {
            let left: Vec<_> = std::fs::read_dir(member.snap_dir())
                .map(|entries| entries.flatten().map(|e| e.path()).collect())
                .unwrap_or_default();
            if left.is_empty() {
                break;
            }
            prop_assert!(
                tokio::time::Instant::now() < deadline,
                "snapshot files left behind: {left:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok((messages, snapshots))
    })
}

proptest! {
    #[test]
    fn hostile_peer_input_never_panic(input in input()) {
        through_member(input)?;
    }
}

/// The harness's own check: what a sound peer sends gets through it.
#[test]
fn a_sound_batch_and_snapshot_get_through() -> Result<(), TestCaseError> {
    let heartbeat = Message {
        msg_type: MessageType::MsgHeartbeat,
        from: 1,
        to: SELF,
        ..Default::default()
    };
    let batch = RaftBatch {
        cluster_id: CLUSTER,
        from: 1,
        messages: vec![Bytes::from(heartbeat.write_to_bytes().unwrap_or_default())],
        groups: Vec::new(),
    };
    assert_eq!(
        through_member(Input::Batches(vec![(batch, Damage::None)]))?,
        (1, 0)
    );
    let data = b"state machine".to_vec();
    let chunks = vec![
        SnapshotChunk {
            cluster_id: CLUSTER,
            from: 1,
            message: Bytes::from(
                snapshot_message(1, SELF, 5)
                    .write_to_bytes()
                    .unwrap_or_default(),
            ),
            data: data.clone().into(),
            ..Default::default()
        },
        SnapshotChunk {
            last: true,
            size: data.len() as u64,
            crc32: Some(crc32fast::hash(&data)),
            ..Default::default()
        },
    ];
    let chunks = chunks.into_iter().map(|c| (c, Damage::None)).collect();
    assert_eq!(through_member(Input::Chunks(chunks))?, (0, 1));
    Ok(())
}
