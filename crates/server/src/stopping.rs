//! Ending the calls that would outlive a stopping member: watch streams,
//! lease keep-alive streams, election observations, lock and campaign
//! waits. etcd's Stop cuts them with the connections; here they end at once
//! with etcd's `etcdserver: server stopped` (Unavailable, so clients and a
//! grpc-proxy go to another member), and the member's graceful shutdown
//! only waits for the short calls still under way.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use cairn_api::error;
use tokio::sync::watch;
use tokio_stream::Stream;
use tonic::Status;

/// A response stream, as the generated service traits spell it.
pub type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Whether the member has stopped serving clients.
pub struct Stopping(watch::Sender<bool>);

impl Default for Stopping {
    fn default() -> Stopping {
        Stopping(watch::channel(false).0)
    }
}

impl Stopping {
    /// From now on, every long-lived call ends with "server stopped".
    pub fn stop(&self) {
        self.0.send_replace(true);
    }

    pub fn signal(&self) -> StopSignal {
        StopSignal(self.0.subscribe())
    }
}

/// One call's view of [`Stopping`].
pub struct StopSignal(watch::Receiver<bool>);

impl StopSignal {
    /// Resolves once the member stops serving (at once if it has); may be
    /// awaited again.
    pub async fn stopped(&mut self) {
        // An error means the member is gone: stopped too.
        let _ = self.0.wait_for(|stopped| *stopped).await;
    }

    /// `stream`, ended with etcd's "server stopped" once the member stops
    /// serving, whatever it still had queued for a slow client.
    pub fn until_stopped<T: 'static>(mut self, stream: ResponseStream<T>) -> ResponseStream<T> {
        Box::pin(UntilStopped {
            inner: Some(stream),
            stopped: Box::pin(async move { self.stopped().await }),
        })
    }
}

struct UntilStopped<T> {
    /// None once the stream has ended.
    inner: Option<ResponseStream<T>>,
    stopped: Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl<T> Stream for UntilStopped<T> {
    type Item = Result<T, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        if this.stopped.as_mut().poll(cx).is_ready() {
            // Dropping the inner stream tells its producer the client is gone.
            this.inner = None;
            return Poll::Ready(Some(Err(error::STOPPED.status())));
        }
        let next = inner.as_mut().poll_next(cx);
        if let Poll::Ready(None) = next {
            this.inner = None;
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use tokio_stream::StreamExt as _;

    use super::*;

    #[tokio::test]
    async fn a_stream_ends_with_server_stopped_when_the_member_stops() {
        let stopping = Stopping::default();
        let endless: ResponseStream<u32> =
            Box::pin(tokio_stream::iter([Ok(1)]).chain(tokio_stream::pending()));
        let mut stream = stopping.signal().until_stopped(endless);
        assert_eq!(stream.next().await.map(|r| r.ok()), Some(Some(1)));
        stopping.stop();
        let ended = stream.next().await.and_then(|r| r.err());
        assert_eq!(
            ended.map(|s| (s.code(), s.message().to_owned())),
            Some((
                tonic::Code::Unavailable,
                "etcdserver: server stopped".into()
            ))
        );
        assert!(stream.next().await.is_none());
    }

    #[tokio::test]
    async fn a_stream_that_ends_first_ends_as_it_did() {
        let stopping = Stopping::default();
        let short: ResponseStream<u32> = Box::pin(tokio_stream::iter([Ok(1), Ok(2)]));
        let items: Vec<_> = stopping
            .signal()
            .until_stopped(short)
            .map(|r| r.ok())
            .collect()
            .await;
        assert_eq!(items, vec![Some(1), Some(2)]);
        let mut signal = stopping.signal();
        stopping.stop();
        signal.stopped().await;
        signal.stopped().await;
    }
}
