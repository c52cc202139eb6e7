//! The accept loop of every listener: TLS handshakes in tasks of their own
//! under a time limit, so a client that stalls in its handshake holds up
//! nobody else; optionally plain and TLS on one port, told apart by their
//! first byte.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;

use crate::{Listener, MaybeTls, RevokedSerials, ServerStream, ServerTls, Socket};

/// A TLS handshake that takes longer is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Accepted connections waiting for the server to pick them up.
const BACKLOG: usize = 64;
/// The first byte of a TLS ClientHello: a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// How a listener accepts connections; [`Accept::spawn`] runs the loop.
#[derive(Clone)]
pub struct Accept {
    tls: Option<TlsAcceptor>,
    /// Plain connections too, beside TLS ones.
    or_plain: bool,
    revoked: Option<Arc<RevokedSerials>>,
    backlog: usize,
    /// Names the listener in logs ("client", "peer", ...): "peer TLS
    /// handshake failed" is what tests look for in a member's log.
    name: &'static str,
}

impl Accept {
    /// Plain connections.
    pub fn plain(name: &'static str) -> Accept {
        Accept {
            tls: None,
            or_plain: false,
            revoked: None,
            backlog: BACKLOG,
            name,
        }
    }

    /// TLS connections, or plain ones when `tls` is `None`.
    pub fn new(tls: Option<&ServerTls>, name: &'static str) -> Accept {
        Accept {
            tls: tls.map(|tls| TlsAcceptor::from(tls.0.clone())),
            ..Accept::plain(name)
        }
    }

    /// TLS connections, and plain ones on the same port (an http:// and an
    /// https:// URL on one address, as etcd allows): a connection that
    /// opens with a TLS handshake record is handshaken, any other is plain.
    pub fn or_plain(mut self) -> Accept {
        self.or_plain = true;
        self
    }

    /// Refuses, after the handshake, a client certificate whose serial is
    /// revoked: etcd's own CRL check, by serial alone.
    pub fn refusing(mut self, revoked: RevokedSerials) -> Accept {
        self.revoked = (!revoked.is_empty()).then(|| Arc::new(revoked));
        self
    }

    /// How many accepted connections may wait for the server.
    pub fn backlog(mut self, backlog: usize) -> Accept {
        self.backlog = backlog;
        self
    }

    /// Accepts on `listener` (TCP or a Unix socket) until the stream is
    /// dropped (or the task aborted), each connection made a `C` (the
    /// stream itself, or a wrapper such as [`crate::AuthorityFix`]).
    pub fn spawn<C>(
        self,
        listener: impl Into<Listener>,
    ) -> (ReceiverStream<Result<C, Infallible>>, JoinHandle<()>)
    where
        C: From<ServerStream> + Send + 'static,
    {
        let (conns, stream) = mpsc::channel(self.backlog);
        let task = tokio::spawn(self.run(listener.into(), conns));
        (ReceiverStream::new(stream), task)
    }

    async fn run<C>(self, listener: Listener, conns: mpsc::Sender<Result<C, Infallible>>)
    where
        C: From<ServerStream> + Send + 'static,
    {
        loop {
            let accepted = tokio::select! {
                () = conns.closed() => return,
                accepted = listener.accept() => accepted,
            };
            let (socket, remote) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    tracing::warn!(error = %e, "{}: accepting a connection failed", self.name);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            // Requests and replies are small and latency-bound.
            if let Socket::Tcp(tcp) = &socket
                && let Err(e) = tcp.set_nodelay(true)
            {
                tracing::debug!(%remote, error = %e, "setting TCP_NODELAY failed");
            }
            if self.tls.is_none() {
                if conns
                    .send(Ok(C::from(MaybeTls::Plain(socket))))
                    .await
                    .is_err()
                {
                    return;
                }
                continue;
            }
            tokio::spawn(self.clone().one(socket, remote, conns.clone()));
        }
    }

    /// Handshakes one connection (sniffing first when plain is allowed
    /// too) and hands it over.
    async fn one<C>(
        self,
        socket: Socket,
        remote: String,
        conns: mpsc::Sender<Result<C, Infallible>>,
    ) where
        C: From<ServerStream>,
    {
        let Some(acceptor) = &self.tls else {
            return;
        };
        if self.or_plain {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, socket.peek_first_byte()).await {
                Ok(Ok(Some(TLS_HANDSHAKE_RECORD))) => {}
                Ok(Ok(Some(_))) => {
                    let _ = conns.send(Ok(C::from(MaybeTls::Plain(socket)))).await;
                    return;
                }
                // Closed or silent before its first byte.
                _ => return,
            }
        }
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(socket)).await {
            Ok(Ok(tls)) => tls,
            // etcd's words after ours: its tests look for them.
            Ok(Err(e)) => {
                tracing::warn!(
                    "{} TLS handshake failed: rejected connection from \"{remote}\" (error \"{e}\")",
                    self.name
                );
                return;
            }
            Err(_) => {
                tracing::warn!(
                    "{} TLS handshake failed: rejected connection from \"{remote}\" (TLS handshake not done in {HANDSHAKE_TIMEOUT:?})",
                    self.name
                );
                return;
            }
        };
        if let Some(revoked) = &self.revoked {
            let leaf = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
            if leaf.is_some_and(|cert| revoked.revokes(cert)) {
                tracing::warn!(
                    "{}: rejected connection from \"{remote}\" (error \"revoked client certificate\")",
                    self.name
                );
                return;
            }
        }
        // Fails only when the server is shutting down: the connection is
        // dropped then.
        let _ = conns.send(Ok(C::from(MaybeTls::Tls(Box::new(tls))))).await;
    }
}
