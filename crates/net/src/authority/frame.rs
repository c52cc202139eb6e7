//! HTTP/2 framing, as much of it as the fix reads and writes.

use std::io;

use bytes::BytesMut;

/// What an HTTP/2 client sends first (RFC 9113, section 3.4).
pub(super) const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Length, type, flags and stream id.
pub(super) const FRAME_HEAD_LEN: usize = 9;

pub(super) const HEADERS: u8 = 0x1;
pub(super) const PUSH_PROMISE: u8 = 0x5;
pub(super) const CONTINUATION: u8 = 0x9;

pub(super) const END_STREAM: u8 = 0x1;
pub(super) const END_HEADERS: u8 = 0x4;
pub(super) const PADDED: u8 = 0x8;
pub(super) const PRIORITY: u8 = 0x20;
/// Stream dependency (with its exclusive bit) and weight of a HEADERS frame
/// with the PRIORITY flag.
pub(super) const PRIORITY_LEN: usize = 5;

/// The initial SETTINGS_MAX_FRAME_SIZE. A peer may advertise more (hyper
/// advertises exactly this) but never less, so frames of this size are always
/// accepted.
pub(super) const MAX_FRAME_PAYLOAD: usize = 16_384;

#[derive(Clone, Copy)]
pub(super) struct FrameHead {
    pub(super) len: usize,
    pub(super) kind: u8,
    pub(super) flags: u8,
    /// Without the reserved bit, which receivers ignore.
    pub(super) stream: u32,
}

impl FrameHead {
    pub(super) fn parse(b: [u8; FRAME_HEAD_LEN]) -> Self {
        FrameHead {
            len: usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]),
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }

    pub(super) fn write(len: usize, kind: u8, flags: u8, stream: u32, out: &mut BytesMut) {
        // `len` never exceeds MAX_FRAME_PAYLOAD, so 24 bits hold it.
        let len = (len as u32).to_be_bytes();
        out.extend_from_slice(&[len[1], len[2], len[3], kind, flags]);
        out.extend_from_slice(&stream.to_be_bytes());
    }
}

pub(super) fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

/// The priority fields and the header block fragment of a HEADERS payload,
/// without its padding.
pub(super) fn headers_fragment(
    flags: u8,
    payload: &[u8],
) -> io::Result<(Option<[u8; PRIORITY_LEN]>, &[u8])> {
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
pub(super) fn fix_authority(value: &[u8]) -> Option<&[u8]> {
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
pub(super) fn is_scheme(s: &[u8]) -> bool {
    s.first().is_some_and(u8::is_ascii_alphabetic)
        && s.iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
}
