//! `:authority` values that carry a scheme, repaired before h2 sees them.
//!
//! etcd's Go client makes its per-endpoint connections (`etcdctl endpoint
//! status`, `endpoint hashkv`, `move-leader`) by dialing
//! `passthrough:///http://host:port`, and grpc-go then sends the pseudo-header
//! `:authority: http://host:port`. Go's server takes it; h2 (under hyper and
//! tonic) refuses the request with RST_STREAM PROTOCOL_ERROR ("malformed
//! authority"), and neither h2 nor hyper has an option to relax that.
//! [`AuthorityFix`] sits between the accepted socket and hyper and repairs
//! such requests on their way in.
//!
//! Header blocks are HPACK-compressed against a dynamic table that the
//! client's encoder and the server's decoder build together, so one block
//! cannot be edited on its own. Here every header block of the connection is
//! decoded against the client's table, and written out again without any
//! dynamic table (static-table indexes and literals that are not indexed), so
//! h2's decoder never needs an entry of the client's table.
//!
//! The first header block of a connection decides: if its `:authority` needs
//! no repair, it and everything after it pass unchanged, h2 decodes the
//! client's own encoding as it always did, and the connection costs nothing
//! more than a look at its first frames. Every other client (tonic, h2,
//! grpc-go's own resolvers, etcd's main client connection) sends a proper
//! authority, and loona-hpack's Huffman decoder is slow (tens of
//! microseconds a string), so only the connections that need it pay for the
//! rewrite. A client is not expected to change its authority within one
//! connection: grpc-go fixes it when it dials.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use loona_hpack::{Decoder, Encoder};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// What an HTTP/2 client sends first (RFC 9113, section 3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Length, type, flags and stream id.
const FRAME_HEAD_LEN: usize = 9;

const HEADERS: u8 = 0x1;
const PUSH_PROMISE: u8 = 0x5;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// Stream dependency (with its exclusive bit) and weight of a HEADERS frame
/// with the PRIORITY flag.
const PRIORITY_LEN: usize = 5;

/// The initial SETTINGS_MAX_FRAME_SIZE. A peer may advertise more (hyper
/// advertises exactly this) but never less, so frames of this size are always
/// accepted.
const MAX_FRAME_PAYLOAD: usize = 16_384;
/// The SETTINGS_HEADER_TABLE_SIZE the server advertises: the protocol
/// default, which h2 keeps and hyper and tonic do not change. A client's
/// dynamic table size update may not ask for more.
const HEADER_TABLE_SIZE: usize = 4_096;
/// Bound on a header block, both its encoded bytes while its frames are
/// collected and its decoded header list (names, values and 32 octets per
/// field, counted as SETTINGS_MAX_HEADER_LIST_SIZE counts). hyper asks for
/// 16 KiB and h2 drops a connection at four times that; this only keeps the
/// memory one block can take here bounded, well above both.
const MAX_BLOCK: usize = 1 << 20;
/// Buffer for the bytes examined here: frame heads, header block fragments,
/// and whatever else one read brings along.
const READ_BUF_LEN: usize = 16 * 1024;

/// Wraps an accepted client connection so that HTTP/2 request headers whose
/// :authority carries a scheme ("http://host:port") reach h2 as "host:port".
///
/// Reads are examined and rewritten as the module describes; writes pass
/// straight through. A connection that does not open with the HTTP/2 client
/// preface (HTTP/1.1) passes unchanged in both directions.
pub struct AuthorityFix<S> {
    inner: S,
    mode: Mode,
    frame: Frame,
    /// Client bytes read from `inner` and not yet examined are
    /// `buf[lo..hi]`; the whole buffer is initialized once, so reads go
    /// straight into it.
    buf: Box<[u8]>,
    lo: usize,
    hi: usize,
    /// Examined bytes waiting for the reader.
    out: BytesMut,
    /// A header block whose HEADERS frame came without END_HEADERS, waiting
    /// for its CONTINUATION frames.
    block: Option<Block>,
    /// Keeps the client's dynamic table.
    decoder: Decoder<'static>,
    /// Writes blocks with its dynamic table at size 0, so it never refers to
    /// an entry of one.
    encoder: Encoder<'static>,
    /// `inner` reported end of file.
    eof: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// Matching the client preface.
    Preface,
    /// HTTP/2 frames, before the connection's first header block.
    FirstBlock,
    /// HTTP/2 frames, every header block rewritten.
    Rewrite,
    /// Every byte passes unchanged.
    Raw,
}

enum Frame {
    /// Expecting a frame head.
    Head,
    /// Passing this many more payload bytes of a frame left as it is.
    Pass(usize),
    /// Collecting the payload of a HEADERS or CONTINUATION frame.
    Collect {
        head: FrameHead,
        raw_head: [u8; FRAME_HEAD_LEN],
        payload: Vec<u8>,
    },
}

#[derive(Clone, Copy)]
struct FrameHead {
    len: usize,
    kind: u8,
    flags: u8,
    /// Without the reserved bit, which receivers ignore.
    stream: u32,
}

impl FrameHead {
    fn parse(b: [u8; FRAME_HEAD_LEN]) -> Self {
        FrameHead {
            len: usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]),
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }

    fn write(len: usize, kind: u8, flags: u8, stream: u32, out: &mut BytesMut) {
        // `len` never exceeds MAX_FRAME_PAYLOAD, so 24 bits hold it.
        let len = (len as u32).to_be_bytes();
        out.extend_from_slice(&[len[1], len[2], len[3], kind, flags]);
        out.extend_from_slice(&stream.to_be_bytes());
    }
}

/// One header block: what its HEADERS frame said, and the fragments of all
/// its frames joined.
struct Block {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; PRIORITY_LEN]>,
    fragment: Vec<u8>,
    /// The client's frames as they came, kept only for the connection's first
    /// block, which passes unchanged if it needs no repair.
    raw: Vec<u8>,
}

fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

impl<S: AsyncRead + AsyncWrite + Unpin> AuthorityFix<S> {
    /// Wraps a freshly accepted connection, before any byte was read.
    pub fn new(inner: S) -> Self {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(HEADER_TABLE_SIZE);
        let mut encoder = Encoder::new();
        encoder.set_max_table_size(0);
        AuthorityFix {
            inner,
            mode: Mode::Preface,
            frame: Frame::Head,
            buf: vec![0; READ_BUF_LEN].into_boxed_slice(),
            lo: 0,
            hi: 0,
            out: BytesMut::new(),
            block: None,
            decoder,
            encoder,
            eof: false,
        }
    }

    /// The wrapped connection.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// From here on every byte passes unchanged: what is buffered goes to
    /// the reader, and later reads go straight to `inner`, so the buffer and
    /// the client's table are not needed again.
    fn enter_raw(&mut self) {
        self.out.extend_from_slice(&self.buf[self.lo..self.hi]);
        self.buf = Box::default();
        self.lo = 0;
        self.hi = 0;
        self.decoder = Decoder::new();
        self.mode = Mode::Raw;
    }

    /// Examines buffered client bytes: moves what is ready to `out` and
    /// advances the parser. Returns false when nothing can be done without
    /// more bytes.
    fn examine(&mut self) -> io::Result<bool> {
        let avail = self.hi - self.lo;
        match self.mode {
            // `enter_raw` left nothing buffered.
            Mode::Raw => Ok(false),
            Mode::Preface => {
                let n = avail.min(PREFACE.len());
                if self.buf[self.lo..self.lo + n] != PREFACE[..n] {
                    // Not HTTP/2 with prior knowledge: nothing here is ours
                    // to touch, the buffered bytes included.
                    self.enter_raw();
                    return Ok(true);
                }
                if n < PREFACE.len() {
                    return Ok(false);
                }
                self.out.extend_from_slice(PREFACE);
                self.lo += n;
                self.mode = Mode::FirstBlock;
                Ok(true)
            }
            Mode::FirstBlock | Mode::Rewrite => self.examine_frames(),
        }
    }

    fn examine_frames(&mut self) -> io::Result<bool> {
        let avail = self.hi - self.lo;
        match &mut self.frame {
            Frame::Pass(left) => {
                let n = (*left).min(avail);
                if n == 0 {
                    return Ok(false);
                }
                self.out.extend_from_slice(&self.buf[self.lo..self.lo + n]);
                self.lo += n;
                *left -= n;
                if *left == 0 {
                    self.frame = Frame::Head;
                }
                Ok(true)
            }
            Frame::Collect { head, payload, .. } => {
                let n = (head.len - payload.len()).min(avail);
                payload.extend_from_slice(&self.buf[self.lo..self.lo + n]);
                self.lo += n;
                if payload.len() < head.len {
                    return Ok(n > 0);
                }
                if let Frame::Collect {
                    head,
                    raw_head,
                    payload,
                } = std::mem::replace(&mut self.frame, Frame::Head)
                {
                    self.collected(head, raw_head, payload)?;
                }
                Ok(true)
            }
            Frame::Head => {
                if avail < FRAME_HEAD_LEN {
                    return Ok(false);
                }
                let mut raw_head = [0; FRAME_HEAD_LEN];
                raw_head.copy_from_slice(&self.buf[self.lo..self.lo + FRAME_HEAD_LEN]);
                self.lo += FRAME_HEAD_LEN;
                self.start_frame(FrameHead::parse(raw_head), raw_head)?;
                Ok(true)
            }
        }
    }

    fn start_frame(&mut self, head: FrameHead, raw_head: [u8; FRAME_HEAD_LEN]) -> io::Result<()> {
        let collect = match (head.kind, &self.block) {
            (HEADERS, None) => true,
            (CONTINUATION, Some(block)) if block.stream == head.stream => true,
            // A client never pushes (RFC 9113, section 8.4); h2 would end the
            // connection, and the block it carries is not decoded here.
            (PUSH_PROMISE, _) => return Err(invalid("HTTP/2 client sent PUSH_PROMISE")),
            // A header block is a contiguous run of frames (RFC 9113,
            // section 4.3); h2 would end the connection too.
            (_, Some(_)) => return Err(invalid("HTTP/2 header block interrupted")),
            (CONTINUATION, None) => return Err(invalid("HTTP/2 CONTINUATION without HEADERS")),
            _ => false,
        };
        if !collect {
            self.out.extend_from_slice(&raw_head);
            if head.len > 0 {
                self.frame = Frame::Pass(head.len);
            }
            return Ok(());
        }
        let so_far = self.block.as_ref().map_or(0, |b| b.fragment.len());
        if so_far + head.len > MAX_BLOCK {
            return Err(invalid("HTTP/2 header block too large"));
        }
        let payload = Vec::with_capacity(head.len);
        if head.len == 0 {
            return self.collected(head, raw_head, payload);
        }
        self.frame = Frame::Collect {
            head,
            raw_head,
            payload,
        };
        Ok(())
    }

    /// A HEADERS or CONTINUATION frame is complete.
    fn collected(
        &mut self,
        head: FrameHead,
        raw_head: [u8; FRAME_HEAD_LEN],
        payload: Vec<u8>,
    ) -> io::Result<()> {
        let keep_raw = self.mode == Mode::FirstBlock;
        if head.kind == HEADERS {
            let (priority, fragment) = headers_fragment(head.flags, &payload)?;
            let mut raw = Vec::new();
            if keep_raw {
                raw.extend_from_slice(&raw_head);
                raw.extend_from_slice(&payload);
            }
            self.block = Some(Block {
                stream: head.stream,
                end_stream: head.flags & END_STREAM != 0,
                priority,
                fragment: fragment.to_vec(),
                raw,
            });
        } else if let Some(block) = &mut self.block {
            // CONTINUATION frames carry neither padding nor priority.
            block.fragment.extend_from_slice(&payload);
            if keep_raw {
                block.raw.extend_from_slice(&raw_head);
                block.raw.extend_from_slice(&payload);
            }
        }
        if head.flags & END_HEADERS != 0
            && let Some(block) = self.block.take()
        {
            self.finish(block)?;
        }
        Ok(())
    }

    /// Decodes a complete header block against the client's table, repairs
    /// `:authority`, and queues the block again without the dynamic table
    /// (or, for an unremarkable first block, as it came).
    fn finish(&mut self, block: Block) -> io::Result<()> {
        let mut encoded = Vec::with_capacity(block.fragment.len() * 2);
        let mut repaired = false;
        let mut list_size = 0usize;
        let mut write_error = None;
        let encoder = &mut self.encoder;
        self.decoder
            .decode_with_cb(&block.fragment, |name, value| {
                list_size += name.len() + value.len() + 32;
                if list_size > MAX_BLOCK {
                    // Decoding goes on so the table stays right; the block
                    // is refused below.
                    return;
                }
                let mut value: &[u8] = &value;
                if &*name == b":authority"
                    && let Some(fixed) = fix_authority(value)
                {
                    repaired = true;
                    if fixed.is_empty() {
                        // Nothing of a host was left ("unix:///path"); an
                        // absent :authority is fine, an empty one is not.
                        return;
                    }
                    value = fixed;
                }
                let start = encoded.len();
                if let Err(e) = encoder.encode_header_into((&name, value), &mut encoded) {
                    write_error.get_or_insert(e);
                }
                // With no dynamic table to add to, the encoder still writes
                // a name it cannot find in the static table as "literal with
                // incremental indexing, new name": a lone 0x40 octet, then
                // name and value. The "without indexing" form is the same
                // but for that octet being 0x00; it keeps h2's table empty
                // too.
                if let Some(first) = encoded.get_mut(start)
                    && *first == 0x40
                {
                    *first = 0x00;
                }
            })
            .map_err(|e| invalid(format!("malformed HPACK header block: {e}")))?;
        if let Some(e) = write_error {
            return Err(e);
        }
        if list_size > MAX_BLOCK {
            return Err(invalid("HTTP/2 header list too large"));
        }

        if self.mode == Mode::FirstBlock {
            if !repaired {
                // h2 gets the client's own bytes from the start, so its
                // table matches the client's without help from here.
                self.out.extend_from_slice(&block.raw);
                self.enter_raw();
                return Ok(());
            }
            self.mode = Mode::Rewrite;
        }
        self.emit(&block, &encoded);
        Ok(())
    }

    /// Queues a header block as one HEADERS frame and as many CONTINUATION
    /// frames as it needs.
    fn emit(&mut self, block: &Block, encoded: &[u8]) {
        let priority_len = if block.priority.is_some() {
            PRIORITY_LEN
        } else {
            0
        };
        let (first, mut rest) =
            encoded.split_at(encoded.len().min(MAX_FRAME_PAYLOAD - priority_len));
        let mut flags = if rest.is_empty() { END_HEADERS } else { 0 };
        if block.end_stream {
            flags |= END_STREAM;
        }
        if block.priority.is_some() {
            flags |= PRIORITY;
        }
        FrameHead::write(
            priority_len + first.len(),
            HEADERS,
            flags,
            block.stream,
            &mut self.out,
        );
        if let Some(priority) = &block.priority {
            self.out.extend_from_slice(priority);
        }
        self.out.extend_from_slice(first);
        while !rest.is_empty() {
            let (chunk, tail) = rest.split_at(rest.len().min(MAX_FRAME_PAYLOAD));
            let flags = if tail.is_empty() { END_HEADERS } else { 0 };
            FrameHead::write(
                chunk.len(),
                CONTINUATION,
                flags,
                block.stream,
                &mut self.out,
            );
            self.out.extend_from_slice(chunk);
            rest = tail;
        }
    }

    /// Reads more client bytes into `buf`.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.lo == self.hi {
            self.lo = 0;
            self.hi = 0;
        } else if self.hi == self.buf.len() {
            // `examine` leaves at most a partial frame head or preface
            // behind, so moving it to the front always makes room.
            self.buf.copy_within(self.lo..self.hi, 0);
            self.hi -= self.lo;
            self.lo = 0;
        }
        let mut read = ReadBuf::new(&mut self.buf[self.hi..]);
        ready!(Pin::new(&mut self.inner).poll_read(cx, &mut read))?;
        let n = read.filled().len();
        if n == 0 {
            self.eof = true;
        }
        self.hi += n;
        Poll::Ready(Ok(()))
    }
}

/// The priority fields and the header block fragment of a HEADERS payload,
/// without its padding.
fn headers_fragment(flags: u8, payload: &[u8]) -> io::Result<(Option<[u8; PRIORITY_LEN]>, &[u8])> {
    let mut rest = payload;
    if flags & PADDED != 0 {
        let Some((&pad, body)) = rest.split_first() else {
            return Err(invalid("HTTP/2 HEADERS too short for its padding"));
        };
        let Some(keep) = body.len().checked_sub(usize::from(pad)) else {
            return Err(invalid("HTTP/2 HEADERS padding exceeds the frame"));
        };
        rest = &body[..keep];
    }
    let mut priority = None;
    if flags & PRIORITY != 0 {
        let Some((fields, body)) = rest.split_first_chunk::<PRIORITY_LEN>() else {
            return Err(invalid("HTTP/2 HEADERS too short for its priority"));
        };
        priority = Some(*fields);
        rest = body;
    }
    Ok((priority, rest))
}

/// "http://127.0.0.1:2379" → "127.0.0.1:2379": drops a leading scheme and
/// anything from the first '/' after the host. None if there was nothing to
/// drop. Any scheme goes, not only http and https (etcd also knows `unix://`
/// and `unixs://` endpoints): a value with "://" in it is refused by h2
/// whatever its scheme.
fn fix_authority(value: &[u8]) -> Option<&[u8]> {
    let rest = match value.windows(3).position(|w| w == b"://") {
        Some(i) if is_scheme(&value[..i]) => &value[i + 3..],
        _ => value,
    };
    let host = match rest.iter().position(|&b| b == b'/') {
        Some(i) => &rest[..i],
        None => rest,
    };
    (host.len() != value.len()).then_some(host)
}

/// RFC 3986: ALPHA *( ALPHA / DIGIT / "+" / "-" / "." ).
fn is_scheme(s: &[u8]) -> bool {
    s.first().is_some_and(u8::is_ascii_alphabetic)
        && s.iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        dst: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if dst.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if !this.out.is_empty() {
                let n = this.out.len().min(dst.remaining());
                dst.put_slice(&this.out[..n]);
                this.out.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.lo == this.hi {
                match (this.mode, &this.frame) {
                    (Mode::Raw, _) => return Pin::new(&mut this.inner).poll_read(cx, dst),
                    // The bulk of a connection (DATA payloads) goes from the
                    // socket straight into the reader's buffer.
                    (Mode::FirstBlock | Mode::Rewrite, &Frame::Pass(left)) => {
                        let slot = dst.initialize_unfilled_to(left.min(dst.remaining()));
                        let mut read = ReadBuf::new(slot);
                        ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
                        let n = read.filled().len();
                        dst.advance(n);
                        if n == 0 {
                            this.eof = true;
                        } else if n == left {
                            this.frame = Frame::Head;
                        } else {
                            this.frame = Frame::Pass(left - n);
                        }
                        return Poll::Ready(Ok(()));
                    }
                    _ => {}
                }
            }
            if this.examine()? {
                continue;
            }
            if this.eof {
                if this.mode == Mode::Preface && this.lo < this.hi {
                    // A short connection that began like the preface but
                    // ended: hand over what it sent.
                    this.enter_raw();
                    continue;
                }
                // Whatever partial frame is left would be no use to h2.
                return Poll::Ready(Ok(()));
            }
            ready!(this.poll_fill(cx))?;
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl Connected for AuthorityFix<TcpStream> {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::net::SocketAddr;
    use std::time::Duration;

    use cairn_api::v3lockpb::lock_client::LockClient;
    use cairn_api::v3lockpb::lock_server::{Lock, LockServer};
    use cairn_api::v3lockpb::{LockRequest, LockResponse};
    use prost::Message;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio_stream::StreamExt;
    use tokio_stream::wrappers::TcpListenerStream;
    use tonic::transport::Server;

    use super::*;

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
        let input = b"POST /v3/kv/range HTTP/1.1\r\nHost: http://127.0.0.1:2379\r\nContent-Length: 2\r\n\r\n{}".to_vec();
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
        let fix =
            |v: &str| fix_authority(v.as_bytes()).map(|f| String::from_utf8(f.to_vec()).unwrap());
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
        let incoming = TcpListenerStream::new(listener);
        if wrap {
            tokio::spawn(router.serve_with_incoming(incoming.map(|s| s.map(AuthorityFix::new))));
        } else {
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
                        return Outcome::Reset(u32::from_be_bytes(
                            payload[..4].try_into().unwrap(),
                        ));
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
}
