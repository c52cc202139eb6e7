#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use cairn_api::v3lockpb::lock_client::LockClient;
use cairn_api::v3lockpb::lock_server::{Lock, LockServer};
use cairn_api::v3lockpb::{LockRequest, LockResponse};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::Server;

use super::frame::PADDED;
use super::*;
use crate::Accept;

const DATA: u8 = 0x0;
const SETTINGS: u8 = 0x4;
const RST_STREAM: u8 = 0x3;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;

type Headers = Vec<(String, String)>;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    FrameHead::write(payload.len(), kind, flags, stream, &mut out);
    out.extend_from_slice(payload);
    out.to_vec()
}

#[derive(Debug)]
struct Parsed {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

fn parse_frames(mut b: &[u8]) -> Vec<Parsed> {
    let mut frames = Vec::new();
    while !b.is_empty() {
        let head = FrameHead::parse(b[..FRAME_HEAD_LEN].try_into().unwrap());
        let end = FRAME_HEAD_LEN + head.len;
        frames.push(Parsed {
            kind: head.kind,
            flags: head.flags,
            stream: head.stream,
            payload: b[FRAME_HEAD_LEN..end].to_vec(),
        });
        b = &b[end..];
    }
    frames
}

/// Encodes as grpc-go does: Huffman-coded strings, entries added to the
/// dynamic table and referred to by later blocks.
fn go_block(encoder: &mut httlib_hpack::Encoder<'_>, headers: &[(&str, &str)]) -> Vec<u8> {
    use httlib_hpack::Encoder as E;
    let mut dst = Vec::new();
    for (name, value) in headers {
        let flags = E::BEST_FORMAT | E::WITH_INDEXING | E::HUFFMAN_NAME | E::HUFFMAN_VALUE;
        let field = (name.as_bytes().to_vec(), value.as_bytes().to_vec(), flags);
        encoder.encode(field, &mut dst).unwrap();
    }
    dst
}

fn request(path: &str, authority: &str) -> Vec<(&'static str, String)> {
    vec![
        (":method", "POST".into()),
        (":scheme", "http".into()),
        (":path", path.into()),
        (":authority", authority.into()),
        ("content-type", "application/grpc".into()),
        ("user-agent", "grpc-go/1.26.0".into()),
        ("te", "trailers".into()),
    ]
}

fn owned(headers: &[(&str, String)]) -> Headers {
    headers
        .iter()
        .map(|(n, v)| (n.to_string(), v.clone()))
        .collect()
}

fn borrowed<'a>(headers: &'a [(&'a str, String)]) -> Vec<(&'a str, &'a str)> {
    headers.iter().map(|(n, v)| (*n, v.as_str())).collect()
}

/// Decodes a block with a decoder that has never seen another block: the
/// rewritten blocks must not lean on any dynamic table.
fn decode_fresh(block: &[u8]) -> Headers {
    Decoder::new()
        .decode(block)
        .unwrap()
        .into_iter()
        .map(|(n, v)| (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap()))
        .collect()
}

/// Feeds `input` through an AuthorityFix over a duplex pipe with a tiny
/// buffer, so reads arrive in small, odd pieces.
async fn through(input: Vec<u8>) -> io::Result<Vec<u8>> {
    let (mut client, server) = tokio::io::duplex(37);
    let writer = tokio::spawn(async move {
        // Fails only once the reader gave up, which the result shows.
        let _ = client.write_all(&input).await;
    });
    let mut out = Vec::new();
    let read = AuthorityFix::new(server).read_to_end(&mut out).await;
    writer.abort();
    read.map(|_| out)
}

/// A header block as it left AuthorityFix.
#[derive(Debug)]
struct OutBlock {
    stream: u32,
    /// Of its HEADERS frame.
    flags: u8,
    priority: Option<Vec<u8>>,
    headers: Headers,
}

/// The header blocks in `frames`, checking their CONTINUATION runs.
fn blocks(frames: &[Parsed]) -> Vec<OutBlock> {
    let mut blocks = Vec::new();
    let mut i = 0;
    while i < frames.len() {
        let f = &frames[i];
        i += 1;
        if f.kind != HEADERS {
            continue;
        }
        assert_eq!(f.flags & PADDED, 0, "rewritten HEADERS carry no padding");
        let (priority, mut fragment) = if f.flags & PRIORITY != 0 {
            (Some(f.payload[..5].to_vec()), f.payload[5..].to_vec())
        } else {
            (None, f.payload.clone())
        };
        assert!(f.payload.len() <= MAX_FRAME_PAYLOAD);
        let mut last = f.flags;
        while last & END_HEADERS == 0 {
            let c = &frames[i];
            i += 1;
            assert_eq!((c.kind, c.stream), (CONTINUATION, f.stream));
            assert!(c.payload.len() <= MAX_FRAME_PAYLOAD);
            fragment.extend_from_slice(&c.payload);
            last = c.flags;
        }
        blocks.push(OutBlock {
            stream: f.stream,
            flags: f.flags,
            priority,
            headers: decode_fresh(&fragment),
        });
    }
    blocks
}

#[tokio::test]
async fn authority_with_scheme_is_repaired_in_every_block() {
    let mut go = httlib_hpack::Encoder::default();
    let settings = frame(SETTINGS, 0, 0, &[0, 4, 0, 0, 0xff, 0xff]);
    let first = request("/etcdserverpb.Maintenance/Status", "http://127.0.0.1:2379");
    let block1 = go_block(&mut go, &borrowed(&first));
    // The same request again: grpc-go now sends mostly table indexes.
    let block2 = go_block(&mut go, &borrowed(&first));
    assert!(block2.len() < 12, "second block leans on the dynamic table");
    // Then the table is emptied and sized back (two size updates at the
    // start of a block), and a request with a path in the authority.
    let third = request(
        "/etcdserverpb.Maintenance/HashKV",
        "https://10.0.0.1:2379/x/y",
    );
    let mut block3 = Vec::new();
    go.update_max_dynamic_size(0, &mut block3).unwrap();
    go.update_max_dynamic_size(4096, &mut block3).unwrap();
    block3.extend(go_block(&mut go, &borrowed(&third)));
    let data = [0, 0, 0, 0, 2, 8, 1];

    let mut input = PREFACE.to_vec();
    input.extend(&settings);
    input.extend(frame(HEADERS, END_HEADERS, 1, &block1));
    input.extend(frame(DATA, END_STREAM, 1, &data));
    // Block 2: padded, with priority, split over two CONTINUATIONs.
    let (a, rest) = block2.split_at(3);
    let (b, c) = rest.split_at(2);
    let mut payload = vec![4];
    payload.extend([0x80, 0, 0, 1, 15]);
    payload.extend(a);
    payload.extend([0; 4]);
    input.extend(frame(HEADERS, PADDED | PRIORITY | END_STREAM, 3, &payload));
    input.extend(frame(CONTINUATION, 0, 3, b));
    input.extend(frame(CONTINUATION, END_HEADERS, 3, c));
    input.extend(frame(PING, 0, 0, &[7; 8]));
    input.extend(frame(HEADERS, END_HEADERS, 5, &block3));
    input.extend(frame(DATA, 0, 5, &data));
    input.extend(frame(DATA, END_STREAM, 5, &[]));

    let out = through(input).await.unwrap();
    assert_eq!(&out[..PREFACE.len()], PREFACE);
    let frames = parse_frames(&out[PREFACE.len()..]);
    let kinds: Vec<_> = frames.iter().map(|f| (f.kind, f.stream)).collect();
    assert_eq!(
        kinds,
        [
            (SETTINGS, 0),
            (HEADERS, 1),
            (DATA, 1),
            (HEADERS, 3),
            (PING, 0),
            (HEADERS, 5),
            (DATA, 5),
            (DATA, 5)
        ]
    );
    assert_eq!(frame(SETTINGS, 0, 0, &frames[0].payload), settings);
    assert_eq!(
        (frames[2].flags, &frames[2].payload[..]),
        (END_STREAM, &data[..])
    );
    assert_eq!(frames[4].payload, [7; 8]);
    assert_eq!((frames[6].flags, &frames[6].payload[..]), (0, &data[..]));
    assert_eq!((frames[7].flags, frames[7].payload.len()), (END_STREAM, 0));

    let mut want1 = owned(&first);
    want1[3].1 = "127.0.0.1:2379".into();
    let mut want3 = owned(&third);
    want3[3].1 = "10.0.0.1:2379".into();
    let blocks = blocks(&frames);
    assert_eq!(blocks.len(), 3);
    assert_eq!((blocks[0].stream, blocks[0].flags), (1, END_HEADERS));
    assert_eq!(blocks[0].headers, want1);
    assert_eq!(
        (blocks[1].stream, blocks[1].flags),
        (3, PRIORITY | END_STREAM | END_HEADERS)
    );
    assert_eq!(
        blocks[1].priority.as_deref(),
        Some(&[0x80, 0, 0, 1, 15][..])
    );
    assert_eq!(blocks[1].headers, want1);
    assert_eq!((blocks[2].stream, blocks[2].flags), (5, END_HEADERS));
    assert_eq!(blocks[2].headers, want3);
}

#[tokio::test]
async fn large_blocks_leave_in_continuation_frames() {
    let mut go = httlib_hpack::Encoder::default();
    let big = "v".repeat(40_000);
    let mut headers = request("/etcdserverpb.KV/Range", "http://127.0.0.1:2379");
    headers.push(("x-big", big));
    let block = go_block(&mut go, &borrowed(&headers));
    // The client, too, keeps to 16 KiB frames.
    let (first, rest) = block.split_at(MAX_FRAME_PAYLOAD - PRIORITY_LEN);
    let mut input = PREFACE.to_vec();
    let payload = [&[0, 0, 0, 0, 9], first].concat();
    input.extend(frame(HEADERS, END_STREAM | PRIORITY, 1, &payload));
    let mut chunks = rest.chunks(MAX_FRAME_PAYLOAD).peekable();
    while let Some(chunk) = chunks.next() {
        let flags = if chunks.peek().is_none() {
            END_HEADERS
        } else {
            0
        };
        input.extend(frame(CONTINUATION, flags, 1, chunk));
    }

    let out = through(input).await.unwrap();
    let frames = parse_frames(&out[PREFACE.len()..]);
    assert_eq!(frames.len(), 3, "40 KB of raw literals need three frames");
    let blocks = blocks(&frames);
    assert_eq!(blocks.len(), 1);
    assert_eq!(
        (blocks[0].stream, blocks[0].flags),
        (1, END_STREAM | PRIORITY)
    );
    assert_eq!(blocks[0].priority.as_deref(), Some(&[0, 0, 0, 0, 9][..]));
    let mut want = owned(&headers);
    want[3].1 = "127.0.0.1:2379".into();
    assert_eq!(blocks[0].headers, want);
}

#[tokio::test]
async fn names_outside_the_static_table_are_not_indexed() {
    let mut go = httlib_hpack::Encoder::default();
    let mut headers = request("/p", "http://h:1");
    headers.push(("x-custom", "v".into()));
    let block = go_block(&mut go, &borrowed(&headers));
    let mut input = PREFACE.to_vec();
    input.extend(frame(HEADERS, END_HEADERS, 1, &block));

    let out = through(input).await.unwrap();
    let frames = parse_frames(&out[PREFACE.len()..]);
    let fragment = &frames[0].payload;
    // Literal without indexing, new name, both strings raw.
    assert!(
        fragment.ends_with(b"\x00\x08x-custom\x01v"),
        "{fragment:x?}"
    );
}

#[tokio::test]
async fn a_connection_whose_first_authority_is_fine_passes_unchanged() {
    let mut go = httlib_hpack::Encoder::default();
    let ok = request("/etcdserverpb.KV/Range", "127.0.0.1:2379");
    let mut input = PREFACE.to_vec();
    input.extend(frame(SETTINGS, 0, 0, &[]));
    input.extend(frame(
        HEADERS,
        PADDED | END_HEADERS,
        1,
        &[&[2], &go_block(&mut go, &borrowed(&ok))[..], &[0, 0]].concat(),
    ));
    input.extend(frame(DATA, END_STREAM, 1, &[0; 5]));
    // Even a later scheme authority stays as it is: the first block decided.
    let later = request("/etcdserverpb.KV/Range", "http://127.0.0.1:2379");
    input.extend(frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        3,
        &go_block(&mut go, &borrowed(&later)),
    ));

    assert_eq!(through(input.clone()).await.unwrap(), input);
}

#[tokio::test]
async fn http1_passes_byte_for_byte() {
    let input =
        b"POST /v3/kv/range HTTP/1.1\r\nHost: http://127.0.0.1:2379\r\nContent-Length: 2\r\n\r\n{}"
            .to_vec();
    assert_eq!(through(input.clone()).await.unwrap(), input);
    // Shorter than the preface, and a prefix of it.
    assert_eq!(
        through(b"PRI * HTTP".to_vec()).await.unwrap(),
        b"PRI * HTTP"
    );
    assert_eq!(through(Vec::new()).await.unwrap(), b"");
}

#[tokio::test]
async fn malformed_header_blocks_end_the_connection() {
    // Index 70 while the dynamic table is empty.
    let mut input = PREFACE.to_vec();
    input.extend(frame(HEADERS, END_HEADERS, 1, &[0x80 | 70]));
    let err = through(input).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);

    // A DATA frame inside a header block.
    let mut input = PREFACE.to_vec();
    input.extend(frame(HEADERS, 0, 1, &[0x82]));
    input.extend(frame(DATA, 0, 1, &[1]));
    assert!(through(input).await.is_err());

    // Padding longer than the frame.
    let mut input = PREFACE.to_vec();
    input.extend(frame(HEADERS, PADDED | END_HEADERS, 1, &[9, 0x82]));
    assert!(through(input).await.is_err());

    // A dynamic table larger than the server allows.
    let mut input = PREFACE.to_vec();
    let mut block = Vec::new();
    httlib_hpack::Encoder::default()
        .update_max_dynamic_size(65_536, &mut block)
        .unwrap();
    block.push(0x82);
    input.extend(frame(HEADERS, END_HEADERS, 1, &block));
    assert!(through(input).await.is_err());
}

#[test]
fn fix_authority_drops_scheme_and_path() {
    let fix = |v: &str| fix_authority(v.as_bytes()).map(|f| String::from_utf8(f.to_vec()).unwrap());
    assert_eq!(
        fix("http://127.0.0.1:2379").as_deref(),
        Some("127.0.0.1:2379")
    );
    assert_eq!(fix("HTTPS://h:1/a/b").as_deref(), Some("h:1"));
    assert_eq!(
        fix("unix://localhost:27989").as_deref(),
        Some("localhost:27989")
    );
    assert_eq!(fix("unix:///tmp/etcd.sock").as_deref(), Some(""));
    assert_eq!(fix("127.0.0.1:2379"), None);
    assert_eq!(fix("localhost"), None);
    assert_eq!(fix(""), None);
}

struct EchoLock;

#[tonic::async_trait]
impl Lock for EchoLock {
    async fn lock(
        &self,
        request: tonic::Request<LockRequest>,
    ) -> Result<tonic::Response<LockResponse>, tonic::Status> {
        Ok(tonic::Response::new(LockResponse {
            header: None,
            key: request.into_inner().name,
        }))
    }
}

/// A tonic server on a loopback port, its connections wrapped or not.
async fn serve(wrap: bool) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = Server::builder().add_service(LockServer::new(EchoLock));
    let accept = Accept::plain("test");
    if wrap {
        let (incoming, _) = accept.spawn::<crate::ClientConn>(listener);
        tokio::spawn(router.serve_with_incoming(incoming));
    } else {
        let (incoming, _) = accept.spawn::<ServerStream>(listener);
        tokio::spawn(router.serve_with_incoming(incoming));
    }
    addr
}

#[derive(Debug, PartialEq)]
enum Outcome {
    /// Response headers, trailers, and the message.
    Reply(Headers, Headers, Vec<u8>),
    /// RST_STREAM with this error code.
    Reset(u32),
}

/// A bare HTTP/2 client that sends what grpc-go sends, with whatever
/// authority it is given: h2's client API cannot put a scheme there.
struct GoLikeClient {
    stream: TcpStream,
    encoder: httlib_hpack::Encoder<'static>,
    decoder: Decoder<'static>,
    next_stream: u32,
}

impl GoLikeClient {
    async fn connect(addr: SocketAddr) -> Self {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(PREFACE).await.unwrap();
        stream.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
        GoLikeClient {
            stream,
            encoder: httlib_hpack::Encoder::default(),
            decoder: Decoder::new(),
            next_stream: 1,
        }
    }

    async fn lock(&mut self, authority: &str, name: &[u8]) -> Outcome {
        let id = self.next_stream;
        self.next_stream += 2;
        let headers = request("/v3lockpb.Lock/Lock", authority);
        let block = go_block(&mut self.encoder, &borrowed(&headers));
        let message = LockRequest {
            name: name.to_vec().into(),
            lease: 0,
        }
        .encode_to_vec();
        let mut body = vec![0];
        body.extend((message.len() as u32).to_be_bytes());
        body.extend(message);
        self.stream
            .write_all(&frame(HEADERS, END_HEADERS, id, &block))
            .await
            .unwrap();
        self.stream
            .write_all(&frame(DATA, END_STREAM, id, &body))
            .await
            .unwrap();

        let mut blocks = Vec::new();
        let mut data = Vec::new();
        loop {
            let mut head = [0; FRAME_HEAD_LEN];
            self.stream.read_exact(&mut head).await.unwrap();
            let head = FrameHead::parse(head);
            let mut payload = vec![0; head.len];
            self.stream.read_exact(&mut payload).await.unwrap();
            match head.kind {
                SETTINGS if head.flags & 0x1 == 0 => {
                    self.stream
                        .write_all(&frame(SETTINGS, 0x1, 0, &[]))
                        .await
                        .unwrap();
                }
                GOAWAY => panic!("GOAWAY {payload:?}"),
                RST_STREAM if head.stream == id => {
                    return Outcome::Reset(u32::from_be_bytes(payload[..4].try_into().unwrap()));
                }
                HEADERS if head.stream == id => {
                    assert_ne!(head.flags & END_HEADERS, 0);
                    let fields = self.decoder.decode(&payload).unwrap();
                    blocks.push(
                        fields
                            .into_iter()
                            .map(|(n, v)| {
                                (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap())
                            })
                            .collect::<Headers>(),
                    );
                    if head.flags & END_STREAM != 0 {
                        let trailers = blocks.pop().unwrap();
                        let headers = blocks.pop().unwrap_or_default();
                        return Outcome::Reply(headers, trailers, data);
                    }
                }
                DATA if head.stream == id => data.extend(payload),
                _ => {}
            }
        }
    }
}

fn reply_key(outcome: Outcome) -> Vec<u8> {
    let Outcome::Reply(headers, trailers, data) = outcome else {
        panic!("{outcome:?}");
    };
    assert!(
        headers.contains(&(":status".into(), "200".into())),
        "{headers:?}"
    );
    assert!(
        trailers.contains(&("grpc-status".into(), "0".into())),
        "{trailers:?}"
    );
    LockResponse::decode(&data[5..]).unwrap().key.to_vec()
}

#[tokio::test]
async fn tonic_answers_a_scheme_authority_through_the_fix() {
    let run = async {
        // Without the fix, h2 refuses the request: what etcdctl meets.
        let plain = serve(false).await;
        let mut client = GoLikeClient::connect(plain).await;
        let authority = format!("http://{plain}");
        assert_eq!(client.lock(&authority, b"a").await, Outcome::Reset(1));

        let fixed = serve(true).await;
        let mut client = GoLikeClient::connect(fixed).await;
        let authority = format!("http://{fixed}");
        assert_eq!(reply_key(client.lock(&authority, b"a").await), b"a");
        // The second call's headers are nearly all dynamic table indexes.
        assert_eq!(reply_key(client.lock(&authority, b"b").await), b"b");

        // Ordinary clients go through the fix untouched.
        let mut tonic = LockClient::connect(format!("http://{fixed}"))
            .await
            .unwrap();
        for name in [&b"c"[..], b"d"] {
            let request = LockRequest {
                name: name.to_vec().into(),
                lease: 0,
            };
            assert_eq!(tonic.lock(request).await.unwrap().into_inner().key, name);
        }
    };
    // Guards against a hang only; nothing here is timed.
    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .unwrap();
}
