//! Dialling the broker and the HELLO → WELCOME handshake.

use bytes::BytesMut;
use tidings_protocol::{
    ErrorCode, Frame, FrameCodec, Hello, PROTOCOL_MINOR, PROTOCOL_VERSION, Text, Welcome,
};
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

    /// The broker's max credit (0: not announced, a 1.0 broker).
    pub(crate) fn max_credit(&self) -> u32 {
        self.welcome.max_credit.unwrap_or(0)
    }

    /// The largest frame the broker said it sends or accepts.
    pub(crate) fn max_frame_len(&self) -> usize {
        usize::try_from(self.welcome.max_frame_len).unwrap_or(usize::MAX)
    }
}

/// Dials the broker and performs the handshake, all under the connect timeout. The
/// HELLO announces protocol 1.1; a 1.0 broker refuses the unknown flag (with
/// `HandshakeRequired`, closing), and is dialled again with a 1.0 HELLO.
pub(crate) async fn open(opts: &ClientBuilder) -> Result<Opened, ConnectError> {
    match open_with(opts, Some(PROTOCOL_MINOR)).await {
        Err(ConnectError::Refused { error, .. })
            if matches!(
                error.code(),
                Some(ErrorCode::HandshakeRequired | ErrorCode::UnknownFlags)
            ) =>
        {
            open_with(opts, None).await
        }
        other => other,
    }
}

async fn open_with(opts: &ClientBuilder, minor: Option<u16>) -> Result<Opened, ConnectError> {
    let attempt = async {
        let mut stream = tls::dial(opts).await?;
        let (welcome, rbuf) = handshake(&mut stream, opts, minor).await?;
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
    minor: Option<u16>,
) -> Result<(Welcome, BytesMut), ConnectError> {
    let addr = &opts.addr;
    let hello = Frame::Hello(Hello {
        minor,
        version: PROTOCOL_VERSION,
        client_name: Text::from(opts.name.as_str()),
        token: opts.token.as_deref().map(Text::from),
        user: opts.user.as_deref().map(Text::from),
    });
    let mut wbuf = BytesMut::new();
    let protocol = |error| ConnectError::Protocol {
        addr: addr.clone(),
        error,
    };
    hello.encode(&mut wbuf).map_err(protocol)?;
    let io_err = |error| ConnectError::Io {
        addr: addr.clone(),
        error,
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
