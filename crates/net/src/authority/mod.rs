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

mod frame;
#[cfg(test)]
mod fuzz_tests;
#[cfg(test)]
mod tests;

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use loona_hpack::{Decoder, Encoder};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

use self::frame::{
    CONTINUATION, END_HEADERS, END_STREAM, FRAME_HEAD_LEN, FrameHead, HEADERS, MAX_FRAME_PAYLOAD,
    PREFACE, PRIORITY, PRIORITY_LEN, PUSH_PROMISE, fix_authority, headers_fragment, invalid,
};
use crate::{ClientTlsInfo, Coalesced, ServerStream};

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

impl From<ServerStream> for AuthorityFix<Coalesced<ServerStream>> {
    fn from(stream: ServerStream) -> Self {
        AuthorityFix::new(Coalesced::new(stream))
    }
}

/// A client connection: what its certificate says of the caller reaches
/// every request (empty on a plain connection).
impl Connected for AuthorityFix<Coalesced<ServerStream>> {
    type ConnectInfo = ClientTlsInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.get_ref().client_tls_info()
    }
}
