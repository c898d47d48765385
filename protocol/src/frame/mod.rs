//! `Frame`: every message of the protocol, with its type byte, flags and body layout.
//!
//! A frame on the wire is `[len:u32][type:u8][flags:u8][body]`, where `len` counts
//! the type, flags and body bytes. Each struct's docs give its body layout; the
//! full reference, with worked hex examples, is PROTOCOL.md.

mod consumer;
mod control;
mod messaging;
mod queue;

use bytes::{BufMut, Bytes, BytesMut};

pub use consumer::*;
pub use control::*;
pub use messaging::*;
pub use queue::*;

use crate::error::ProtocolError;
use crate::text::Text;
use crate::wire::{Reader, Writer};

/// Message headers: small key/value pairs carried next to the payload, in order.
pub type Headers = Vec<(Text, Text)>;

/// Who may send a frame type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Only clients send it; a server receiving it from a peer is fine.
    ClientToServer,
    /// Only the server sends it; a client sending it gets `UnexpectedFrame`.
    ServerToClient,
    /// Either side may send it (PING, PONG).
    Both,
}

macro_rules! frames {
    ($( $(#[$doc:meta])* $variant:ident ( $ty:ty ) = $code:literal, $name:literal, $dir:ident; )*) => {
        /// One protocol frame.
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub enum Frame {
            $( $(#[$doc])* $variant($ty), )*
        }

        /// Frame type bytes, as they appear on the wire, named like the variants of
        /// [`Frame`] so that a match over either reads the same.
        #[allow(non_upper_case_globals)]
        pub mod kind {
            $( #[doc = concat!("Type byte of ", $name, ".")] pub const $variant: u8 = $code; )*
        }

        impl Frame {
            /// The type byte of this frame.
            pub fn kind(&self) -> u8 {
                match self { $( Frame::$variant(_) => $code, )* }
            }

            /// The frame's name as PROTOCOL.md spells it.
            pub fn name(&self) -> &'static str {
                match self { $( Frame::$variant(_) => $name, )* }
            }

            /// Who may send this frame.
            pub fn direction(&self) -> Direction {
                match self { $( Frame::$variant(_) => Direction::$dir, )* }
            }

            /// Who sends frames of type `kind`, if this version knows the type.
            pub fn direction_of(kind: u8) -> Option<Direction> {
                match kind { $( $code => Some(Direction::$dir), )* _ => None }
            }

            /// The name of a type byte, if this version knows it.
            pub fn name_of(kind: u8) -> Option<&'static str> {
                match kind { $( $code => Some($name), )* _ => None }
            }

            fn encode_body(&self, w: &mut Writer<'_>) -> Result<u8, ProtocolError> {
                match self { $( Frame::$variant(f) => f.encode(w), )* }
            }

            /// Parses one frame from its type byte, flags and body.
            pub fn parse(kind: u8, flags: u8, body: Bytes) -> Result<Frame, ProtocolError> {
                match kind {
                    $( $code => {
                        let mut r = Reader::new($name, body);
                        let f = <$ty>::decode(flags, &mut r)?;
                        r.finish()?;
                        Ok(Frame::$variant(f))
                    } )*
                    _ => Err(ProtocolError::UnknownFrameType { kind }),
                }
            }
        }

        $( impl From<$ty> for Frame {
            fn from(f: $ty) -> Frame { Frame::$variant(f) }
        } )*
    };
}

frames! {
    /// Opens the session (client).
    Hello(Hello) = 0x01, "HELLO", ClientToServer;
    /// Accepts the session and states the server's limits (server).
    Welcome(Welcome) = 0x02, "WELCOME", ServerToClient;
    /// Liveness probe; the receiver answers PONG.
    Ping(Ping) = 0x03, "PING", Both;
    /// Answer to PING.
    Pong(Pong) = 0x04, "PONG", Both;
    /// Publishes a message to a topic.
    Publish(Publish) = 0x10, "PUBLISH", ClientToServer;
    /// Subscribes to a pattern.
    Subscribe(Subscribe) = 0x11, "SUBSCRIBE", ClientToServer;
    /// Ends a subscription.
    Unsubscribe(Unsubscribe) = 0x12, "UNSUBSCRIBE", ClientToServer;
    /// A message for a subscription (server).
    Message(Message) = 0x13, "MESSAGE", ServerToClient;
    /// Creates a queue, or checks an existing one has these options.
    QueueDeclare(QueueDeclare) = 0x20, "QUEUE_DECLARE", ClientToServer;
    /// Deletes a queue and its messages.
    QueueDelete(QueueDelete) = 0x21, "QUEUE_DELETE", ClientToServer;
    /// Adds a binding pattern to a queue.
    QueueBind(QueueBind) = 0x22, "QUEUE_BIND", ClientToServer;
    /// Removes a binding pattern from a queue.
    QueueUnbind(QueueUnbind) = 0x23, "QUEUE_UNBIND", ClientToServer;
    /// Asks for one queue's figures.
    QueueInfoRequest(QueueInfoRequest) = 0x24, "QUEUE_INFO", ClientToServer;
    /// Asks for every queue's figures.
    QueueList(QueueList) = 0x25, "QUEUE_LIST", ClientToServer;
    /// Lists a queue's dead letters.
    DeadLetters(DeadLetters) = 0x26, "DEAD_LETTERS", ClientToServer;
    /// Moves dead letters back into their queue.
    Redrive(Redrive) = 0x27, "REDRIVE", ClientToServer;
    /// Starts a consumer on a queue.
    Consume(Consume) = 0x30, "CONSUME", ClientToServer;
    /// Stops a consumer.
    Cancel(Cancel) = 0x31, "CANCEL", ClientToServer;
    /// Adds credit (prefetch) to a consumer.
    Credit(Credit) = 0x32, "CREDIT", ClientToServer;
    /// A queued message for a consumer (server).
    Delivery(Delivery) = 0x33, "DELIVERY", ServerToClient;
    /// Acknowledges deliveries.
    Ack(Ack) = 0x34, "ACK", ClientToServer;
    /// Returns deliveries to their queue.
    Nack(Nack) = 0x35, "NACK", ClientToServer;
    /// The server ended a consumer (its queue was deleted, or shutdown) (server).
    ConsumerCancelled(ConsumerCancelled) = 0x36, "CONSUMER_CANCELLED", ServerToClient;
    /// Asks for server statistics.
    Stats(Stats) = 0x40, "STATS", ClientToServer;
    /// A request succeeded (server).
    Ok(OkReply) = 0x50, "OK", ServerToClient;
    /// A request failed, or the connection is about to close (server).
    Error(ErrorReply) = 0x51, "ERROR", ServerToClient;
    /// A publish is durable in every queue that took it (server).
    Confirm(Confirm) = 0x52, "CONFIRM", ServerToClient;
    /// One queue's figures (server).
    QueueInfo(QueueInfoReply) = 0x53, "QUEUE_INFO_REPLY", ServerToClient;
    /// Every queue's figures (server).
    QueueListReply(QueueListReply) = 0x54, "QUEUE_LIST_REPLY", ServerToClient;
    /// A queue's dead letters (server).
    DeadLettersReply(DeadLettersReply) = 0x55, "DEAD_LETTERS_REPLY", ServerToClient;
    /// How many dead letters were moved back (server).
    RedriveReply(RedriveReply) = 0x56, "REDRIVE_REPLY", ServerToClient;
    /// Server statistics (server).
    StatsReply(StatsReply) = 0x57, "STATS_REPLY", ServerToClient;
}

impl Frame {
    /// Appends the whole frame, length prefix included, to `dst`.
    ///
    /// Fails only when a field is too long for its length prefix; `dst` is then left
    /// as it was.
    pub fn encode(&self, dst: &mut BytesMut) -> Result<(), ProtocolError> {
        encode_frame(dst, self.kind(), self.name(), |w| self.encode_body(w))
    }

    /// The request id this frame carries, if it has one (for matching answers).
    pub fn request_id(&self) -> Option<u32> {
        match self {
            Frame::Publish(f) => f.request_id,
            Frame::Subscribe(f) => Some(f.request_id),
            Frame::Unsubscribe(f) => Some(f.request_id),
            Frame::QueueDeclare(f) => Some(f.request_id),
            Frame::QueueDelete(f) => Some(f.request_id),
            Frame::QueueBind(f) => Some(f.request_id),
            Frame::QueueUnbind(f) => Some(f.request_id),
            Frame::QueueInfoRequest(f) => Some(f.request_id),
            Frame::QueueList(f) => Some(f.request_id),
            Frame::DeadLetters(f) => Some(f.request_id),
            Frame::Redrive(f) => Some(f.request_id),
            Frame::Consume(f) => Some(f.request_id),
            Frame::Cancel(f) => Some(f.request_id),
            Frame::Ack(f) => Some(f.request_id),
            Frame::Nack(f) => Some(f.request_id),
            Frame::Stats(f) => Some(f.request_id),
            Frame::Ok(f) => Some(f.request_id),
            Frame::Error(f) => Some(f.request_id),
            Frame::Confirm(f) => Some(f.request_id),
            Frame::QueueInfo(f) => Some(f.request_id),
            Frame::QueueListReply(f) => Some(f.request_id),
            Frame::DeadLettersReply(f) => Some(f.request_id),
            Frame::RedriveReply(f) => Some(f.request_id),
            Frame::StatsReply(f) => Some(f.request_id),
            Frame::Hello(_)
            | Frame::Welcome(_)
            | Frame::Ping(_)
            | Frame::Pong(_)
            | Frame::Message(_)
            | Frame::Credit(_)
            | Frame::Delivery(_)
            | Frame::ConsumerCancelled(_) => None,
        }
    }
}

/// Rejects flag bits outside `known`.
impl Frame {
    /// The request id of a frame of type `kind` read from its body, when the type
    /// carries one at the start of its body (PUBLISH: only with flag `REQUEST_ID`)
    /// and the body is long enough to hold it. Used to answer a frame that cannot be
    /// decoded with an ERROR the client can match to its request.
    pub fn peek_request_id(kind: u8, flags: u8, body: &[u8]) -> Option<u32> {
        let carries = match kind {
            kind::Publish => flags & Publish::FLAG_REQUEST_ID != 0,
            kind::Hello
            | kind::Welcome
            | kind::Ping
            | kind::Pong
            | kind::Message
            | kind::Credit
            | kind::Delivery
            | kind::ConsumerCancelled => false,
            other => Frame::name_of(other).is_some(),
        };
        let bytes: [u8; 4] = body.get(..4)?.try_into().ok()?;
        carries.then(|| u32::from_be_bytes(bytes))
    }
}

pub(crate) fn check_flags(frame: &'static str, flags: u8, known: u8) -> Result<(), ProtocolError> {
    match flags & !known {
        0 => Ok(()),
        unknown => Err(ProtocolError::UnknownFlags {
            frame,
            flags: unknown,
        }),
    }
}

/// Frames whose body is just a request id.
/// Appends a frame of type `kind` to `dst`: its length prefix, type, flags and the
/// body `body` writes (returning the flags). Fails only when a field is too long for
/// its length prefix; `dst` is then left as it was.
pub(crate) fn encode_frame(
    dst: &mut BytesMut,
    kind: u8,
    name: &'static str,
    body: impl FnOnce(&mut Writer<'_>) -> Result<u8, ProtocolError>,
) -> Result<(), ProtocolError> {
    let start = dst.len();
    dst.put_u32(0);
    dst.put_u8(kind);
    dst.put_u8(0);
    let mut w = Writer { dst, frame: name };
    match body(&mut w) {
        Ok(flags) => {
            let len = dst.len() - start - 4;
            let Ok(len32) = u32::try_from(len) else {
                dst.truncate(start);
                return Err(ProtocolError::TooLongToEncode {
                    frame: name,
                    field: "frame",
                    len,
                    max: u32::MAX as usize,
                });
            };
            dst[start..start + 4].copy_from_slice(&len32.to_be_bytes());
            dst[start + 5] = flags;
            Ok(())
        }
        Err(e) => {
            dst.truncate(start);
            Err(e)
        }
    }
}

macro_rules! request_only {
    ($( $(#[$doc:meta])* $name:ident, $frame:literal; )*) => {$(
        $(#[$doc])*
        ///
        /// Body: `request_id:u32`. No flags.
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub struct $name {
            /// Matches the answer to this request.
            pub request_id: u32,
        }

        impl $name {
            pub(crate) fn encode(&self, w: &mut crate::wire::Writer<'_>) -> Result<u8, crate::ProtocolError> {
                w.u32(self.request_id);
                Ok(0)
            }

            pub(crate) fn decode(flags: u8, r: &mut crate::wire::Reader) -> Result<Self, crate::ProtocolError> {
                crate::frame::check_flags($frame, flags, 0)?;
                Ok(Self { request_id: r.u32("request_id")? })
            }
        }
    )*};
}
pub(crate) use request_only;
