//! Untrusted bytes through [`AuthorityFix`]: whatever a client sends after
//! the preface (frames with random heads, random HPACK, a header block
//! that needs the rewrite followed by garbage), the fix returns bytes or an
//! error and never panics. `make fuzz` runs many more cases.

use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::frame::{FRAME_HEAD_LEN, FrameHead, HEADERS, PREFACE};
use super::*;

/// A HEADERS frame whose block needs the rewrite, so what follows goes
/// through the decoding path.
fn needs_rewrite() -> Vec<u8> {
    let mut encoder = Encoder::new();
    let mut block = Vec::new();
    let headers: [(&[u8], &[u8]); 4] = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", b"/etcdserverpb.KV/Range"),
        (b":authority", b"http://127.0.0.1:2379"),
    ];
    encoder
        .encode_into(headers.iter().copied(), &mut block)
        .expect("encode");
    let mut out = BytesMut::new();
    FrameHead::write(block.len(), HEADERS, END_HEADERS, 1, &mut out);
    out.extend_from_slice(&block);
    out.to_vec()
}

/// A frame with a random head and payload.
fn random_frame() -> impl Strategy<Value = Vec<u8>> {
    (
        any::<u8>(),
        any::<u8>(),
        0u32..8,
        prop::collection::vec(any::<u8>(), 0..200),
    )
        .prop_map(|(kind, flags, stream, payload)| {
            let mut out = BytesMut::with_capacity(FRAME_HEAD_LEN + payload.len());
            FrameHead::write(payload.len(), kind % 10, flags, stream, &mut out);
            out.extend_from_slice(&payload);
            out.to_vec()
        })
}

/// Everything the fix reads out of `input`, until the end or an error.
fn through_fix(input: Vec<u8>) -> Result<(), TestCaseError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    runtime.block_on(async move {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let writer = tokio::spawn(async move {
            let _ = client.write_all(&input).await;
            let _ = client.shutdown().await;
            client
        });
        let mut fix = AuthorityFix::new(server);
        let mut out = Vec::new();
        let _ = fix.read_to_end(&mut out).await;
        drop(fix);
        let _ = writer.await;
    });
    Ok(())
}

proptest! {
    #[test]
    fn random_frames_after_the_preface_never_panic(
        rewrite in any::<bool>(),
        frames in prop::collection::vec(random_frame(), 0..8),
        tail in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut input = PREFACE.to_vec();
        if rewrite {
            input.extend(needs_rewrite());
        }
        for frame in frames {
            input.extend(frame);
        }
        input.extend(tail);
        through_fix(input)?;
    }

    #[test]
    fn random_bytes_never_panic(input in prop::collection::vec(any::<u8>(), 0..512)) {
        through_fix(input)?;
    }
}
