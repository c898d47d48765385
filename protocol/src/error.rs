//! `ProtocolError` (what the codec can find wrong) and `ErrorCode` (the numbers that
//! travel in ERROR frames). Codes are listed in PROTOCOL.md and never reused.

use thiserror::Error;

/// Something wrong with the bytes on the wire.
///
/// [`ProtocolError::is_fatal`] says whether the stream can still be trusted: a fatal
/// error means the frame boundaries are lost or the peer is broken, so the connection
/// must be closed after the error frame. Non-fatal errors consumed exactly one whole
/// frame, and the next frame can be read.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    /// The length prefix announces more than the configured maximum.
    #[error("frame of {len} bytes exceeds the maximum frame length of {max} bytes")]
    FrameTooLarge {
        /// Announced length.
        len: usize,
        /// Configured maximum.
        max: usize,
    },
    /// The length prefix is smaller than the two bytes of type and flags.
    #[error("frame length {len} is shorter than the 2-byte frame header")]
    FrameTooShort {
        /// Announced length.
        len: usize,
    },
    /// The frame type byte is not one this version knows. The frame was skipped.
    #[error("unknown frame type 0x{kind:02x}")]
    UnknownFrameType {
        /// The type byte.
        kind: u8,
    },
    /// A frame type only a server sends arrived at a server
    /// ([`crate::FrameCodec::for_server`]). The frame was skipped unread.
    #[error("{frame} is sent only by the server")]
    UnexpectedFrame {
        /// Frame name.
        frame: &'static str,
    },
    /// A flag bit this version does not define was set. The frame was skipped.
    #[error("unknown flags 0x{flags:02x} on {frame} frame")]
    UnknownFlags {
        /// Frame name.
        frame: &'static str,
        /// The offending bits.
        flags: u8,
    },
    /// The body ended before a field was complete.
    #[error(
        "{frame} frame truncated in field `{field}` at body offset {offset}: need {need} bytes, have {have}"
    )]
    UnexpectedEof {
        /// Frame name.
        frame: &'static str,
        /// Field being read.
        field: &'static str,
        /// Offset of the field within the frame body.
        offset: usize,
        /// Bytes the field needs.
        need: usize,
        /// Bytes left in the body.
        have: usize,
    },
    /// A string field is not UTF-8.
    #[error("{frame} frame field `{field}` at body offset {offset} is not valid UTF-8")]
    InvalidUtf8 {
        /// Frame name.
        frame: &'static str,
        /// Field being read.
        field: &'static str,
        /// Offset of the field within the frame body.
        offset: usize,
    },
    /// A field holds a value outside its domain.
    #[error("{frame} frame field `{field}` has invalid value {value}")]
    InvalidValue {
        /// Frame name.
        frame: &'static str,
        /// Field being read.
        field: &'static str,
        /// The value read.
        value: u64,
    },
    /// Bytes were left over after the last field of a frame with no trailing payload.
    #[error("{frame} frame has {count} unexpected trailing bytes")]
    TrailingBytes {
        /// Frame name.
        frame: &'static str,
        /// How many bytes were left.
        count: usize,
    },
    /// A value is too large to be encoded (a string over 65,535 bytes, a list over
    /// its count field). Raised by the encoder only.
    #[error("cannot encode {frame} field `{field}`: length {len} exceeds {max}")]
    TooLongToEncode {
        /// Frame name.
        frame: &'static str,
        /// Field being written.
        field: &'static str,
        /// Actual length.
        len: usize,
        /// Largest encodable.
        max: usize,
    },
    /// An I/O error from the transport (only produced through the `Decoder`/`Encoder`
    /// traits, which require `From<io::Error>`).
    #[error("i/o error: {0}")]
    Io(String),
}

impl ProtocolError {
    /// True when the connection can no longer be trusted and must close.
    pub fn is_fatal(&self) -> bool {
        !matches!(
            self,
            ProtocolError::UnknownFrameType { .. }
                | ProtocolError::UnknownFlags { .. }
                | ProtocolError::UnexpectedFrame { .. }
        )
    }

    /// The wire error code reported for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            ProtocolError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            ProtocolError::UnknownFrameType { .. } => ErrorCode::UnknownFrameType,
            ProtocolError::UnknownFlags { .. } => ErrorCode::UnknownFlags,
            ProtocolError::UnexpectedFrame { .. } => ErrorCode::UnexpectedFrame,
            _ => ErrorCode::MalformedFrame,
        }
    }
}

impl From<std::io::Error> for ProtocolError {
    fn from(err: std::io::Error) -> Self {
        ProtocolError::Io(err.to_string())
    }
}

macro_rules! error_codes {
    ($( $(#[$doc:meta])* $name:ident = $value:literal, $close:literal; )*) => {
        /// Numeric error codes carried by ERROR frames (PROTOCOL.md, "Error codes").
        /// A code is never reused for another meaning.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u16)]
        pub enum ErrorCode {
            $( $(#[$doc])* $name = $value, )*
        }

        impl ErrorCode {
            /// Every defined code, in numeric order.
            pub const ALL: &'static [ErrorCode] = &[ $( ErrorCode::$name, )* ];

            /// The code for a number, if this version defines it.
            pub fn from_u16(value: u16) -> Option<Self> {
                match value {
                    $( $value => Some(ErrorCode::$name), )*
                    _ => None,
                }
            }

            /// True when the server closes the connection after sending this code.
            pub fn closes_connection(self) -> bool {
                match self {
                    $( ErrorCode::$name => $close, )*
                }
            }

            /// The code's stable name as PROTOCOL.md spells it (`MalformedFrame`); stats
            /// use its snake_case form (`errors.malformed_frame`).
            pub fn name(self) -> &'static str {
                match self {
                    $( ErrorCode::$name => stringify!($name), )*
                }
            }
        }
    };
}

error_codes! {
    /// The frame body does not follow its layout.
    MalformedFrame = 1, true;
    /// The frame is larger than the server's maximum frame length.
    FrameTooLarge = 2, true;
    /// The frame type is unknown to this server; the frame was skipped.
    UnknownFrameType = 3, false;
    /// The frame carries flag bits unknown to this server; the frame was skipped.
    UnknownFlags = 4, false;
    /// The handshake asked for a protocol version this server does not speak.
    UnsupportedVersion = 5, true;
    /// A frame other than HELLO arrived before the handshake.
    HandshakeRequired = 6, true;
    /// No HELLO arrived within the handshake timeout.
    HandshakeTimeout = 7, true;
    /// The handshake token is missing or wrong.
    AuthFailed = 8, true;
    /// A frame only the server may send arrived from a client, or a second HELLO.
    UnexpectedFrame = 9, false;
    /// The server is at its connection limit.
    TooManyConnections = 10, true;
    /// The connection's outbound buffer overflowed; it was not reading fast enough.
    SlowConsumer = 11, true;
    /// The peer missed too many heartbeats.
    HeartbeatTimeout = 12, true;
    /// The server is shutting down.
    ShuttingDown = 13, true;
    /// A topic failed validation.
    InvalidTopic = 20, false;
    /// A subscription or binding pattern failed validation.
    InvalidPattern = 21, false;
    /// The subscription id is already in use on this connection.
    DuplicateSubscription = 22, false;
    /// No subscription with this id exists on this connection.
    UnknownSubscription = 23, false;
    /// A request was published and no subscription matched its topic.
    NoResponders = 24, false;
    /// The payload exceeds the server's maximum payload size.
    PayloadTooLarge = 25, false;
    /// An argument is outside its allowed range (for example zero credit).
    InvalidArgument = 26, false;
    /// No queue with this name exists.
    QueueNotFound = 30, false;
    /// The queue exists with different options; the message names the difference.
    QueueOptionsMismatch = 31, false;
    /// The queue name or one of its options is invalid.
    InvalidQueue = 32, false;
    /// An ack or nack named a delivery id that is not outstanding on this connection.
    UnknownDelivery = 33, false;
    /// The consumer id is already in use on this connection.
    DuplicateConsumer = 34, false;
    /// No consumer with this id exists on this connection.
    UnknownConsumer = 35, false;
    /// The queue is full and its overflow policy is reject-publish.
    QueueFull = 36, false;
    /// The store could not make the message durable (for example the disk is full).
    StorageFailure = 37, false;
    /// The user's permissions do not allow the operation; the message names the
    /// operation, the topic, pattern or queue, and the deciding rule.
    PermissionDenied = 40, false;
    /// A configured limit refused the request; the message names the limit's flag
    /// and its value.
    LimitExceeded = 41, false;
    /// An operator closed the connection (the broker's HTTP API); the connection
    /// is closed after this error. Reconnecting is allowed.
    ClosedByOperator = 42, true;
    /// A PUBLISH spends more than `MAX_ENVELOPE_LEN` bytes on everything but its
    /// payload (topic, reply_to, message_id, headers).
    EnvelopeTooLarge = 45, false;
    /// An unexpected server fault; the message says more.
    Internal = 99, false;
}
