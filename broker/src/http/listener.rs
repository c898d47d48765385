//! `Limited`: the HTTP side's listener, admitting at most
//! [`MAX_HTTP_CONNECTIONS`] connections at once, so that clients of the operators'
//! port cannot make the broker hold unbounded sockets and buffers. A connection
//! past the cap waits in the kernel's backlog until one closes.
//!
//! With TLS (`--http-tls`), each accepted socket shakes hands in its own task,
//! within the handshake timeout, so a slow or plaintext client neither holds up
//! the accept loop nor keeps its place for long; the acceptor is taken from
//! [`Tls`] per handshake, so a SIGHUP reload applies to the next connection.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::server::TlsStream;

use crate::tls::Tls;

/// Most HTTP connections served at once.
pub(crate) const MAX_HTTP_CONNECTIONS: usize = 256;
/// Pause after an accept error (such as running out of descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A TCP listener with a cap on open connections, serving TLS when given it.
pub(crate) struct Limited {
    inner: TcpListener,
    permits: Arc<Semaphore>,
    tls: Option<(Tls, Duration)>,
    /// Connections whose TLS handshake finished, from their handshake tasks.
    handshaken: mpsc::Receiver<(Admitted, SocketAddr)>,
    handshaken_tx: mpsc::Sender<(Admitted, SocketAddr)>,
}

impl Limited {
    /// `tls`: the certificate to serve and how long a handshake may take.
    pub(crate) fn new(inner: TcpListener, tls: Option<(Tls, Duration)>) -> Limited {
        // Each handshake holds a permit, so no more than the cap can be in here.
        let (handshaken_tx, handshaken) = mpsc::channel(MAX_HTTP_CONNECTIONS);
        Limited {
            inner,
            permits: Arc::new(Semaphore::new(MAX_HTTP_CONNECTIONS)),
            tls,
            handshaken,
            handshaken_tx,
        }
    }
}

/// An accepted connection, holding its place under the cap until dropped.
pub(crate) struct Admitted {
    stream: Stream,
    _permit: OwnedSemaphorePermit,
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl axum::serve::Listener for Limited {
    type Io = Admitted;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Admitted, SocketAddr) {
        loop {
            let permits = self.permits.clone();
            let inner = &self.inner;
            let accepted = async move {
                let Ok(permit) = permits.acquire_owned().await else {
                    // The semaphore is never closed; wait rather than spin if it were.
                    return std::future::pending().await;
                };
                (permit, inner.accept().await)
            };
            // Both branches are cancel-safe: a permit not yet used goes back, and
            // accept() and recv() lose nothing when dropped.
            let (permit, accepted) = tokio::select! {
                Some(done) = self.handshaken.recv() => return done,
                pair = accepted => pair,
            };
            let (stream, peer) = match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    tracing::warn!(error = %err, "HTTP accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let Some((tls, timeout)) = &self.tls else {
                let stream = Stream::Plain(stream);
                return (
                    Admitted {
                        stream,
                        _permit: permit,
                    },
                    peer,
                );
            };
            let acceptor = tls.acceptor();
            let timeout = *timeout;
            let done = self.handshaken_tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                    Ok(Ok(tls_stream)) => {
                        let admitted = Admitted {
                            stream: Stream::Tls(Box::new(tls_stream)),
                            _permit: permit,
                        };
                        let _ = done.send((admitted, peer)).await;
                    }
                    Ok(Err(err)) => tracing::info!(%peer, error = %err, "HTTPS handshake failed"),
                    Err(_) => tracing::info!(%peer, ?timeout, "HTTPS handshake timed out"),
                }
            });
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

impl AsyncRead for Admitted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.stream {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Admitted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.stream {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.stream {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.stream {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.stream {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.stream {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }
}
