//! Writes of many responses in one system call.
//!
//! Under load, the apply thread completes many requests at once; each
//! request's task hands its response to the connection, whose task (woken
//! by each, and run next by tokio) wrote and flushed it alone: about one
//! `writev` per response, each costing a loopback send and the receiver's
//! softirq. [`Coalesced`] keeps what the connection writes and, at its
//! flush, first lets the other ready tasks run once (`yield_now`), so the
//! responses they complete meanwhile go out in the same write.

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf as _, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Past this many bytes kept, a write first hands them to the stream.
const MAX_KEPT: usize = 256 * 1024;
/// A buffer grown past this by a burst is let go once written out, so an
/// idle connection holds little.
const KEPT_CAPACITY: usize = 64 * 1024;

/// A stream whose writes are kept until a flush, which yields once to the
/// runtime before writing them out together.
pub struct Coalesced<S> {
    inner: S,
    /// Written by the caller, not yet handed to `inner`.
    kept: BytesMut,
    /// Whether the other ready tasks ran since the caller last flushed.
    yielded: bool,
}

impl<S> Coalesced<S> {
    pub fn new(inner: S) -> Self {
        Coalesced {
            inner,
            kept: BytesMut::new(),
            yielded: false,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncWrite + Unpin> Coalesced<S> {
    /// Hands every kept byte to `inner`.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.kept.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.kept))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.kept.advance(n);
        }
        if self.kept.capacity() > KEPT_CAPACITY {
            self.kept = BytesMut::new();
        }
        Poll::Ready(Ok(()))
    }

    fn poll_room(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.kept.len() >= MAX_KEPT {
            ready!(self.poll_write_out(cx))?;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Coalesced<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Coalesced<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_room(cx))?;
        this.kept.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_room(cx))?;
        let mut n = 0;
        for buf in bufs {
            this.kept.extend_from_slice(buf);
            n += buf.len();
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.kept.is_empty() && !this.yielded {
            this.yielded = true;
            // Deferred behind every task already ready (tokio's yield), not
            // run next as a plain self-wake would be.
            if std::pin::pin!(tokio::task::yield_now())
                .poll(cx)
                .is_pending()
            {
                return Poll::Pending;
            }
        }
        ready!(this.poll_write_out(cx))?;
        this.yielded = false;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_write_out(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[tokio::test]
    async fn writes_reach_the_peer_at_the_flush_in_order() -> io::Result<()> {
        let (near, mut far) = tokio::io::duplex(1 << 20);
        let mut near = Coalesced::new(near);
        near.write_all(b"one ").await?;
        near.write_all(b"two").await?;
        let mut got = [0u8; 7];
        // Kept until the flush.
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), far.read(&mut got))
                .await
                .is_err()
        );
        near.flush().await?;
        far.read_exact(&mut got).await?;
        assert_eq!(&got, b"one two");
        Ok(())
    }

    #[tokio::test]
    async fn a_large_write_goes_out_without_a_flush_and_shutdown_writes_the_rest() -> io::Result<()>
    {
        let (near, mut far) = tokio::io::duplex(4 << 20);
        let mut near = Coalesced::new(near);
        let big = vec![7u8; MAX_KEPT + 10];
        near.write_all(&big).await?;
        near.write_all(b"tail").await?;
        let mut first = vec![0u8; MAX_KEPT + 10];
        far.read_exact(&mut first).await?;
        assert_eq!(first, big);
        near.shutdown().await?;
        let mut rest = Vec::new();
        far.read_to_end(&mut rest).await?;
        assert_eq!(rest, b"tail");
        Ok(())
    }

    /// Counts the writes it is handed.
    #[derive(Default)]
    struct Counting {
        writes: usize,
        bytes: Vec<u8>,
    }

    impl AsyncWrite for Counting {
        fn poll_write(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            this.writes += 1;
            this.bytes.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn many_writes_before_a_flush_are_one_write() -> io::Result<()> {
        let mut near = Coalesced::new(Counting::default());
        for response in [&b"first"[..], b"second", b"third"] {
            near.write_all(response).await?;
        }
        near.flush().await?;
        assert_eq!(near.get_ref().writes, 1);
        assert_eq!(near.get_ref().bytes, b"firstsecondthird");
        Ok(())
    }
}
