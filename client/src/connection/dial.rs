//! Dialling the broker and the HELLO → WELCOME handshake.

use bytes::BytesMut;
use tidings_protocol::{Frame, FrameCodec, Hello, PROTOCOL_VERSION, Text, Welcome};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::codec::Decoder;

use crate::error::{ConnectError, ServerError};
use crate::options::ClientBuilder;
use crate::tls::{self, Transport};

/// A connected, handshaken socket (plain TCP or TLS).
pub(crate) struct Opened {
    pub(super) stream: Transport,
    pub(super) welcome: Welcome,
    pub(super) rbuf: BytesMut,
}

impl Opened {
    pub(crate) fn max_payload(&self) -> usize {
        usize::try_from(self.welcome.max_payload).unwrap_or(usize::MAX)
    }
}

/// Dials the broker and performs the handshake, all under the connect timeout.
pub(crate) async fn open(opts: &ClientBuilder) -> Result<Opened, ConnectError> {
    let attempt = async {
        let mut stream = tls::dial(opts).await?;
        let (welcome, rbuf) = handshake(&mut stream, opts).await?;
        Ok(Opened {
            stream,
            welcome,
            rbuf,
        })
    };
    match tokio::time::timeout(opts.connect_timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(ConnectError::TimedOut {
            addr: opts.addr.clone(),
            after: opts.connect_timeout,
        }),
    }
}

/// HELLO → WELCOME or ERROR. Returns the welcome and whatever was read past it.
pub(crate) async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    opts: &ClientBuilder,
) -> Result<(Welcome, BytesMut), ConnectError> {
    let addr = &opts.addr;
    let hello = Frame::Hello(Hello {
        version: PROTOCOL_VERSION,
        client_name: Text::from(opts.name.as_str()),
        token: opts.token.as_deref().map(Text::from),
        user: opts.user.as_deref().map(Text::from),
    });
    let mut wbuf = BytesMut::new();
    let protocol = |source| ConnectError::Protocol {
        addr: addr.clone(),
        source,
    };
    hello.encode(&mut wbuf).map_err(protocol)?;
    let io_err = |source| ConnectError::Io {
        addr: addr.clone(),
        source,
    };
    io.write_all(&wbuf).await.map_err(io_err)?;
    io.flush().await.map_err(io_err)?;
    let mut codec = FrameCodec::default();
    let mut rbuf = BytesMut::with_capacity(8 * 1024);
    loop {
        if let Some(frame) = codec.decode(&mut rbuf).map_err(protocol)? {
            return match frame {
                Frame::Welcome(welcome) => Ok((welcome, rbuf)),
                Frame::Error(e) => Err(ConnectError::Refused {
                    addr: addr.clone(),
                    error: ServerError::from(&e),
                }),
                other => Err(ConnectError::UnexpectedFrame {
                    addr: addr.clone(),
                    frame: other.name(),
                }),
            };
        }
        if io.read_buf(&mut rbuf).await.map_err(io_err)? == 0 {
            return Err(ConnectError::Closed { addr: addr.clone() });
        }
    }
}
