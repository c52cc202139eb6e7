//! Listening on an etcd URL, a TCP port or a Unix socket, and the
//! connections either side of one.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use crate::{Address, EtcdUrl};

/// A bound listener: TCP, or a Unix socket.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixSocketListener),
}

/// A listening Unix socket. Its file is removed when it is dropped, as Go's
/// listeners remove theirs when closed, so a stopped member leaves no
/// socket behind.
pub struct UnixSocketListener {
    listener: UnixListener,
    path: PathBuf,
}

impl Drop for UnixSocketListener {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::debug!(path = %self.path.display(), error = %e, "removing a Unix socket file failed");
        }
    }
}

impl Listener {
    /// Binds `url`'s address. A host name is resolved, its IPv4 address
    /// preferred; a Unix socket's file left by an earlier process is
    /// removed first, as etcd's unix listener does.
    pub async fn bind(url: &EtcdUrl) -> io::Result<Listener> {
        match &url.address {
            Address::Tcp { host, port } => {
                let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), *port))
                    .await?
                    .collect();
                let addr = addrs
                    .iter()
                    .find(|a| a.is_ipv4())
                    .or(addrs.first())
                    .copied()
                    .ok_or_else(|| {
                        io::Error::new(
                            io::ErrorKind::NotFound,
                            format!("{host} resolves to no address"),
                        )
                    })?;
                Ok(Listener::Tcp(TcpListener::bind(addr).await?))
            }
            Address::Unix(path) => Ok(Listener::Unix(bind_unix(path)?)),
        }
    }

    /// The next connection and who made it (an address, or the socket's
    /// file for a Unix socket, whose clients have no names).
    pub async fn accept(&self) -> io::Result<(Socket, String)> {
        match self {
            Listener::Tcp(listener) => {
                let (tcp, remote) = listener.accept().await?;
                Ok((Socket::Tcp(tcp), remote.to_string()))
            }
            Listener::Unix(unix) => {
                let (stream, _) = unix.listener.accept().await?;
                Ok((Socket::Unix(stream), unix.path.display().to_string()))
            }
        }
    }

    /// Where it listens: an address, or a socket's file.
    pub fn local_addr(&self) -> io::Result<String> {
        match self {
            Listener::Tcp(listener) => Ok(listener.local_addr()?.to_string()),
            Listener::Unix(unix) => Ok(unix.path.display().to_string()),
        }
    }
}

fn bind_unix(path: &Path) -> io::Result<UnixSocketListener> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    Ok(UnixSocketListener {
        listener: UnixListener::bind(path)?,
        path: path.to_owned(),
    })
}

impl From<TcpListener> for Listener {
    fn from(listener: TcpListener) -> Listener {
        Listener::Tcp(listener)
    }
}

/// One connection, TCP or Unix socket, before any TLS.
pub enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Socket {
    /// Connects to `address`.
    pub async fn connect(address: &Address) -> io::Result<Socket> {
        match address {
            Address::Tcp { host, port } => {
                let tcp = TcpStream::connect((host.as_str(), *port)).await?;
                // Requests and replies are small and latency-bound.
                tcp.set_nodelay(true)?;
                Ok(Socket::Tcp(tcp))
            }
            Address::Unix(path) => Ok(Socket::Unix(UnixStream::connect(path).await?)),
        }
    }

    /// The first byte the other side sent, left unread; `None` when it
    /// closed before sending any.
    pub(crate) async fn peek_first_byte(&self) -> io::Result<Option<u8>> {
        let mut first = [0u8; 1];
        let read = match self {
            Socket::Tcp(tcp) => tcp.peek(&mut first).await?,
            // tokio has no peek for Unix sockets.
            Socket::Unix(unix) => loop {
                unix.readable().await?;
                let peeked = unix.try_io(Interest::READABLE, || {
                    rustix::net::recv(unix, &mut first[..], rustix::net::RecvFlags::PEEK)
                        .map(|(read, _)| read)
                        .map_err(io::Error::from)
                });
                match peeked {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    read => break read?,
                }
            },
        };
        Ok((read == 1).then_some(first[0]))
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Socket::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Socket::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Socket::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Socket::Tcp(s) => s.is_write_vectored(),
            Socket::Unix(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_flush(cx),
            Socket::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Socket::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
