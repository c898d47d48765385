//! The client's errors: one small enum per operation family, so that callers can
//! match the cases they handle (no responders, timed out, queue not found …).
//!
//! Each message states its cause once: a cause is either part of the message or
//! the error's `source()`, never both, so that a reporter walking the chain (such
//! as anyhow's `{:#}`) does not print it twice. Causes are part of the message.

use std::time::Duration;

use thiserror::Error;
use tidings_protocol::{ErrorCode, ErrorReply, ProtocolError, TopicError};

/// An ERROR frame from the broker: its code and its message.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("broker refused: {message} ({})", self.code_name())]
pub struct ServerError {
    /// The raw code, kept so that codes from newer brokers survive.
    pub raw_code: u16,
    /// The broker's explanation.
    pub message: String,
}

impl ServerError {
    /// The code, if this client version knows it.
    pub fn code(&self) -> Option<ErrorCode> {
        ErrorCode::from_u16(self.raw_code)
    }

    fn code_name(&self) -> String {
        match self.code() {
            Some(code) => code.name().to_owned(),
            None => format!("code {}", self.raw_code),
        }
    }
}

impl From<&ErrorReply> for ServerError {
    fn from(reply: &ErrorReply) -> Self {
        Self {
            raw_code: reply.code,
            message: reply.message.to_string(),
        }
    }
}

/// Why [`crate::ClientBuilder::connect`] failed.
#[derive(Debug, Error)]
pub enum ConnectError {
    /// The TCP connection could not be opened.
    #[error("cannot connect to {addr}: {error}")]
    Io {
        /// The address dialled.
        addr: String,
        /// The socket error (in the message, not repeated as a `source`).
        error: std::io::Error,
    },
    /// Connecting and the handshake took longer than the connect timeout.
    #[error("connecting to {addr} timed out after {after:?}")]
    TimedOut {
        /// The address dialled.
        addr: String,
        /// The connect timeout.
        after: Duration,
    },
    /// The broker refused the handshake (bad token, unsupported version, full …).
    #[error("broker at {addr} refused the connection: {error}")]
    Refused {
        /// The address dialled.
        addr: String,
        /// What the broker said; `error.code()` tells the reason apart.
        error: ServerError,
    },
    /// The broker sent bytes that are not a valid frame.
    #[error("broker at {addr} sent an invalid frame: {error}")]
    Protocol {
        /// The address dialled.
        addr: String,
        /// What was wrong.
        error: ProtocolError,
    },
    /// The broker answered the handshake with something other than WELCOME.
    #[error("broker at {addr} answered HELLO with {frame} instead of WELCOME")]
    UnexpectedFrame {
        /// The address dialled.
        addr: String,
        /// The frame's name.
        frame: &'static str,
    },
    /// The broker closed the connection during the handshake.
    #[error("broker at {addr} closed the connection during the handshake")]
    Closed {
        /// The address dialled.
        addr: String,
    },
    /// TLS could not be set up: unreadable CA or certificate files, or the TLS
    /// handshake failed (an untrusted or expired certificate, a wrong name).
    #[error("TLS with {addr}: {message}")]
    Tls {
        /// The address dialled.
        addr: String,
        /// What failed.
        message: String,
    },
}

/// Why a publish failed.
#[derive(Debug, Error)]
pub enum PublishError {
    /// The topic is not a valid topic (wildcards, empty tokens, whitespace …).
    #[error("invalid topic `{topic}`: {reason}")]
    InvalidTopic {
        /// The topic given.
        topic: String,
        /// The rule it broke (in the message, not repeated as a `source`).
        reason: TopicError,
    },
    /// The payload is larger than the broker accepts (learned in the handshake).
    #[error("payload of {size} bytes exceeds the broker's maximum of {max} bytes")]
    PayloadTooLarge {
        /// The payload's size.
        size: usize,
        /// The broker's limit.
        max: usize,
    },
    /// Topic, reply topic, message id and headers take more room than a publish
    /// may spend beside its payload (`tidings_protocol::MAX_ENVELOPE_LEN`).
    #[error("topic, reply_to, message id and headers take {size} bytes; at most {max} are allowed")]
    EnvelopeTooLarge {
        /// Their encoded size.
        size: usize,
        /// The protocol's limit.
        max: usize,
    },
    /// The connection was down and did not come back within the offline wait.
    #[error("not connected to the broker (waited {waited:?} for a reconnect)")]
    Disconnected {
        /// How long the publish waited.
        waited: Duration,
    },
    /// The connection dropped before the broker confirmed; the message may or may
    /// not have been stored.
    #[error("connection lost before the broker confirmed the publish; it may or may not be stored")]
    ConnectionLost,
    /// No confirm arrived within the request timeout.
    #[error("no confirm from the broker within {after:?}")]
    TimedOut {
        /// The timeout.
        after: Duration,
    },
    /// The broker confirmed, but no queue is bound to the topic: the message is
    /// stored nowhere. Allow it with [`crate::ConfirmOptions::allow_unroutable`].
    #[error("no queue is bound to `{topic}`: the confirmed publish is stored nowhere")]
    Unroutable {
        /// The topic published to.
        topic: String,
    },
    /// The broker confirmed, but some queues refused the message because they
    /// were full (overflow reject-publish). Allow it with
    /// [`crate::ConfirmOptions::allow_queue_full`].
    #[error("{rejected} full queue(s) refused the publish to `{topic}` ({queues} stored it)")]
    QueueFull {
        /// The topic published to.
        topic: String,
        /// Queues that stored the message.
        queues: u32,
        /// Queues that refused it.
        rejected: u32,
    },
    /// The broker refused the publish.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// [`crate::Message::respond`] on a message that has no reply topic.
    #[error("the message has no reply_to topic to respond to")]
    NoReplyTo,
    /// The client has shut down (its reconnect policy gave up).
    #[error("the client is closed")]
    Closed,
}

/// Why a subscribe or unsubscribe failed.
#[derive(Debug, Error)]
pub enum SubscribeError {
    /// The pattern is not valid.
    #[error("invalid pattern `{pattern}`: {reason}")]
    InvalidPattern {
        /// The pattern given.
        pattern: String,
        /// The rule it broke (in the message, not repeated as a `source`).
        reason: TopicError,
    },
    /// The connection was down and did not come back within the offline wait.
    #[error("not connected to the broker (waited {waited:?} for a reconnect)")]
    Disconnected {
        /// How long the call waited.
        waited: Duration,
    },
    /// The connection dropped before the broker answered.
    #[error("connection lost before the broker answered")]
    ConnectionLost,
    /// No answer within the request timeout.
    #[error("no answer from the broker within {after:?}")]
    TimedOut {
        /// The timeout.
        after: Duration,
    },
    /// The broker refused.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// The client has shut down.
    #[error("the client is closed")]
    Closed,
}

/// Why a request failed.
#[derive(Debug, Error)]
pub enum RequestError {
    /// Nothing was subscribed to the request's topic; the broker said so at once.
    #[error("no responders for `{topic}`")]
    NoResponders {
        /// The request's topic.
        topic: String,
    },
    /// No reply within the timeout.
    #[error("request to `{topic}` timed out after {after:?}")]
    TimedOut {
        /// The request's topic.
        topic: String,
        /// The timeout.
        after: Duration,
    },
    /// The request could not be published.
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// The connection dropped while waiting for the reply.
    #[error("connection lost while waiting for the reply")]
    ConnectionLost,
    /// The broker refused the request.
    #[error(transparent)]
    Server(ServerError),
    /// The client has shut down.
    #[error("the client is closed")]
    Closed,
}

/// Why a queue operation (declare, delete, bind, info, consume, stats …) failed.
#[derive(Debug, Error)]
pub enum QueueError {
    /// The broker refused; [`QueueError::code`] says why (queue not found, options
    /// mismatch …).
    #[error(transparent)]
    Server(#[from] ServerError),
    /// A binding pattern is not valid.
    #[error("invalid pattern `{pattern}`: {reason}")]
    InvalidPattern {
        /// The pattern given.
        pattern: String,
        /// The rule it broke (in the message, not repeated as a `source`).
        reason: TopicError,
    },
    /// The connection was down and did not come back within the offline wait.
    #[error("not connected to the broker (waited {waited:?} for a reconnect)")]
    Disconnected {
        /// How long the call waited.
        waited: Duration,
    },
    /// The connection dropped before the broker answered.
    #[error("connection lost before the broker answered")]
    ConnectionLost,
    /// No answer within the request timeout.
    #[error("no answer from the broker within {after:?}")]
    TimedOut {
        /// The timeout.
        after: Duration,
    },
    /// The broker answered with a frame this call does not expect.
    #[error("unexpected {frame} answer from the broker")]
    UnexpectedReply {
        /// The frame's name.
        frame: &'static str,
    },
    /// The client has shut down.
    #[error("the client is closed")]
    Closed,
}

impl QueueError {
    /// The broker's error code, when the broker refused.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            QueueError::Server(e) => e.code(),
            _ => None,
        }
    }
}

/// Why a consumer's stream ended other than by the caller: the typed end of
/// [`crate::Consumer::try_next`].
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ConsumerError {
    /// The broker cancelled the consumer (CONSUMER_CANCELLED): its queue was
    /// deleted (`reason` 1), or another reason a newer broker gives.
    #[error("the broker cancelled the consumer of `{queue}`: {message}")]
    Cancelled {
        /// The queue consumed.
        queue: String,
        /// The wire reason (1: queue deleted); see `tidings_protocol::CancelReason`.
        reason: u8,
        /// The broker's explanation.
        message: String,
    },
    /// After a reconnect the broker refused to start the consumer again (for
    /// example the queue was deleted while the connection was down).
    #[error("the consumer of `{queue}` could not be restored after a reconnect: {error}")]
    NotRestored {
        /// The queue consumed.
        queue: String,
        /// What the broker said.
        error: ServerError,
    },
}

impl ConsumerError {
    /// True when the consumer ended because its queue no longer exists.
    pub fn queue_deleted(&self) -> bool {
        match self {
            ConsumerError::Cancelled { reason, .. } => {
                *reason == tidings_protocol::CancelReason::QueueDeleted as u8
            }
            ConsumerError::NotRestored { error, .. } => {
                error.code() == Some(ErrorCode::QueueNotFound)
            }
        }
    }
}

/// Why an ack or nack could not be sent, or (for the `_confirmed` variants) was
/// not confirmed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum AckError {
    /// The delivery came over a connection that has since dropped; the broker
    /// redelivers it, so there is nothing left to acknowledge.
    #[error("the delivery's connection was lost; the broker will redeliver it")]
    Stale,
    /// The broker refused the ack or nack (for example `UnknownDelivery`: the
    /// delivery is no longer outstanding, its consumer having been cancelled).
    #[error(transparent)]
    Refused(ServerError),
    /// The connection dropped before the broker answered; the broker redelivers
    /// the delivery unless the ack reached it first.
    #[error("connection lost before the broker confirmed the ack")]
    ConnectionLost,
    /// No answer within the queue timeout.
    #[error("no answer to the ack within {after:?}")]
    TimedOut {
        /// The timeout.
        after: Duration,
    },
    /// The client has shut down.
    #[error("the client is closed")]
    Closed,
}

/// Any client error, for callers that do not need to tell the families apart.
#[derive(Debug, Error)]
pub enum Error {
    /// See [`ConnectError`].
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// See [`PublishError`].
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// See [`SubscribeError`].
    #[error(transparent)]
    Subscribe(#[from] SubscribeError),
    /// See [`RequestError`].
    #[error(transparent)]
    Request(#[from] RequestError),
    /// See [`QueueError`].
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// See [`AckError`].
    #[error(transparent)]
    Ack(#[from] AckError),
    /// See [`ConsumerError`].
    #[error(transparent)]
    Consumer(#[from] ConsumerError),
}

/// How anything that talks to the connection task can fail, before it is mapped
/// into the caller's family.
#[derive(Debug)]
pub(crate) enum CallError {
    /// The connection was down for the whole offline wait.
    Disconnected(Duration),
    /// The connection task has ended.
    Closed,
    /// The connection dropped before the answer came.
    ConnectionLost,
    /// No answer within the request timeout.
    TimedOut(Duration),
    /// The broker sent ERROR.
    Server(ServerError),
}

macro_rules! call_error_into {
    ($($ty:ident),*) => {$(
        impl From<CallError> for $ty {
            fn from(e: CallError) -> Self {
                match e {
                    CallError::Disconnected(waited) => $ty::Disconnected { waited },
                    CallError::Closed => $ty::Closed,
                    CallError::ConnectionLost => $ty::ConnectionLost,
                    CallError::TimedOut(after) => $ty::TimedOut { after },
                    CallError::Server(e) => $ty::Server(e),
                }
            }
        }
    )*};
}
call_error_into!(PublishError, SubscribeError, QueueError);
