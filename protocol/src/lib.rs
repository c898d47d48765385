//! The tidings wire protocol: frames, the codec that reads and writes them, and the
//! topic and pattern rules every broker and client agree on.
//!
//! This crate has no sockets and no runtime. The broker and the client both drive
//! [`FrameCodec`] over their own I/O; anyone writing a client in another language
//! works from `PROTOCOL.md` alone, which this crate's tests hold to the code byte for
//! byte.
//!
//! ```
//! use bytes::BytesMut;
//! use tidings_protocol::{Frame, FrameCodec, Publish};
//! use tokio_util::codec::{Decoder, Encoder};
//!
//! let mut codec = FrameCodec::default();
//! let mut buf = BytesMut::new();
//! let frame = Frame::Publish(Publish::new("orders.created", &b"{\"id\":7}"[..]));
//! codec.encode(frame.clone(), &mut buf).unwrap();
//! assert_eq!(codec.decode(&mut buf).unwrap(), Some(frame));
//! ```

mod codec;
mod error;
mod frame;
mod text;
mod topic;
mod wire;

pub use codec::{
    DEFAULT_MAX_FRAME_LEN, DEFAULT_MAX_PAYLOAD, FRAME_OVERHEAD, FrameCodec, HEADER_LEN,
    MAX_ENVELOPE_LEN,
};
pub use error::{ErrorCode, ProtocolError};
pub use frame::*;
pub use text::Text;
pub use topic::{MAX_TOPIC_DEPTH, MAX_TOPIC_LEN, Pattern, PatternToken, Topic, TopicError};

/// The protocol's major version, HELLO's `version` field. A server refuses any other
/// major version in the handshake with [`ErrorCode::UnsupportedVersion`].
pub const PROTOCOL_VERSION: u16 = 1;

/// The protocol's minor version this crate speaks: `1` for protocol 1.1. A client
/// announces it in HELLO (flag `MINOR`) and the server answers, in WELCOME, the
/// minor version the session uses (the lower of the two); without the flag a
/// session is 1.0 and the server sends nothing 1.0 does not define.
pub const PROTOCOL_MINOR: u16 = 1;
