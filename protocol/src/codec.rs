//! `FrameCodec`: the tokio-util `Decoder`/`Encoder` for length-prefixed frames.

use bytes::{Buf, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::error::ProtocolError;
use crate::frame::{Direction, Frame};

/// Bytes before the body: `len:u32 type:u8 flags:u8`.
pub const HEADER_LEN: usize = 6;

/// Default largest PUBLISH payload: 1 MiB.
pub const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;

/// What a maximum frame holds beyond a maximum payload: `max_frame_len =
/// max_payload + FRAME_OVERHEAD` (64 KiB). It is larger than any envelope
/// ([`MAX_ENVELOPE_LEN`]) plus the fields a MESSAGE or DELIVERY adds (a queue name of
/// at most 1,024 bytes, ids), so no frame a server sends for a publish it accepted is
/// larger than the `max_frame_len` it announced.
pub const FRAME_OVERHEAD: usize = 64 * 1024;

/// The most bytes a PUBLISH may spend on everything but its payload: the body
/// length minus the payload length (request id, topic, reply_to, message_id,
/// delay and headers, with their length prefixes): 60 KiB, room for the largest
/// headers a broker may be configured to allow (48 KiB) plus topic, reply_to and
/// message_id. More is refused with
/// `EnvelopeTooLarge`.
pub const MAX_ENVELOPE_LEN: usize = 60 * 1024;

/// Default largest frame (value of the length prefix): the default payload plus
/// [`FRAME_OVERHEAD`].
pub const DEFAULT_MAX_FRAME_LEN: usize = DEFAULT_MAX_PAYLOAD + FRAME_OVERHEAD;

/// Reads and writes frames, refusing any whose length prefix exceeds
/// `max_frame_len` before a byte of it is buffered.
///
/// Decoding never copies a payload: the frame's bytes are split off the read buffer
/// and frozen, and payloads, topics and names are slices of them.
///
/// On an error the offending frame has been consumed when the error is not fatal
/// ([`ProtocolError::is_fatal`]), so a caller that owns its buffer may keep reading.
/// A fatal error consumes nothing that can be trusted: send the ERROR and close.
///
/// Note for `tokio_util::codec::FramedRead` users: after the decoder returns an
/// error, `FramedRead` yields `None` once before it reads on (tokio issue 3976).
/// A loop that stops at the first `None` would therefore end the connection on a
/// non-fatal error too; either keep polling after a non-fatal error, or drive
/// [`Decoder::decode`] over a buffer you own, which has no such quirk.
///
/// ```
/// use bytes::BytesMut;
/// use tidings_protocol::{Frame, FrameCodec, Ping, ProtocolError};
/// use tokio_util::codec::Decoder;
///
/// let mut codec = FrameCodec::new(1024);
/// // An unknown frame type (0x7f), then a PING.
/// let mut buf = BytesMut::from(&[0, 0, 0, 2, 0x7f, 0, 0, 0, 0, 2, 0x03, 0][..]);
/// let err = codec.decode(&mut buf).unwrap_err();
/// assert_eq!(err, ProtocolError::UnknownFrameType { kind: 0x7f });
/// assert!(!err.is_fatal());
/// assert_eq!(codec.decode(&mut buf).unwrap(), Some(Frame::Ping(Ping)));
///
/// // A length prefix over the maximum fails before the frame is buffered.
/// let mut buf = BytesMut::from(&[0, 0, 0x10, 0][..]);
/// assert!(codec.decode(&mut buf).unwrap_err().is_fatal());
/// ```
#[derive(Debug, Clone)]
pub struct FrameCodec {
    max_frame_len: usize,
    /// Set by [`FrameCodec::for_server`]: frames only a server sends are refused
    /// from their type byte, before their flags or body are looked at.
    server: bool,
    /// The request id of the frame the last failed decode was reading.
    failed_request_id: Option<u32>,
}

impl Default for FrameCodec {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FRAME_LEN)
    }
}

impl FrameCodec {
    /// A codec with this maximum frame length.
    pub fn new(max_frame_len: usize) -> Self {
        Self {
            max_frame_len,
            server: false,
            failed_request_id: None,
        }
    }

    /// A codec for the server's side of a connection: besides everything
    /// [`FrameCodec::new`] checks, a frame type only a server sends (WELCOME,
    /// MESSAGE, DELIVERY, OK, …) is refused from its type byte with the non-fatal
    /// [`ProtocolError::UnexpectedFrame`], and the frame skipped, before its flags or
    /// body are read. The order of checks is: length, type known, type allowed from
    /// a client, flags, body.
    pub fn for_server(max_frame_len: usize) -> Self {
        Self {
            server: true,
            ..Self::new(max_frame_len)
        }
    }

    /// After a decode error about a whole frame (unknown flags, malformed body,
    /// unexpected type): the request id of that frame, when its type carries one
    /// and it could be read; `None` otherwise. The ERROR answering the problem
    /// carries it, so that a client can match the error to its request.
    pub fn failed_request_id(&self) -> Option<u32> {
        self.failed_request_id
    }

    /// The maximum frame length.
    pub fn max_frame_len(&self) -> usize {
        self.max_frame_len
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = ProtocolError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, ProtocolError> {
        self.failed_request_id = None;
        let Some(prefix) = src.get(..4) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
        // usize is at least 32 bits on every target we build for.
        let len = len as usize;
        if len > self.max_frame_len {
            return Err(ProtocolError::FrameTooLarge {
                len,
                max: self.max_frame_len,
            });
        }
        if len < 2 {
            return Err(ProtocolError::FrameTooShort { len });
        }
        // Cannot overflow where usize is 64 bits, but a 32-bit target with a huge
        // maximum must not panic either.
        let Some(total) = len.checked_add(4) else {
            return Err(ProtocolError::FrameTooLarge {
                len,
                max: self.max_frame_len,
            });
        };
        if src.len() < total {
            // `total` is bounded by max_frame_len, so this reserve is too.
            src.reserve(total - src.len());
            return Ok(None);
        }
        let mut frame = src.split_to(total).freeze();
        frame.advance(4);
        let kind = frame.get_u8();
        let flags = frame.get_u8();
        if self.server && Frame::direction_of(kind) == Some(Direction::ServerToClient) {
            return Err(ProtocolError::UnexpectedFrame {
                frame: Frame::name_of(kind).unwrap_or("?"),
            });
        }
        let request_id = Frame::peek_request_id(kind, flags, &frame);
        Frame::parse(kind, flags, frame).map(Some).inspect_err(|_| {
            self.failed_request_id = request_id;
        })
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = ProtocolError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), ProtocolError> {
        self.encode(&frame, dst)
    }
}

impl Encoder<&Frame> for FrameCodec {
    type Error = ProtocolError;

    fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), ProtocolError> {
        let start = dst.len();
        frame.encode(dst)?;
        let len = dst.len() - start - 4;
        if len > self.max_frame_len {
            dst.truncate(start);
            return Err(ProtocolError::FrameTooLarge {
                len,
                max: self.max_frame_len,
            });
        }
        Ok(())
    }
}
