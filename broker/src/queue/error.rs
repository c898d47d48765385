//! `QueueError`: everything a durable-queue operation can refuse, with its wire code.

use thiserror::Error;
use tidings_protocol::ErrorCode;

/// Why a queue operation failed. [`QueueError::code`] gives the number that travels in
/// the ERROR frame; the `Display` text is the frame's message.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum QueueError {
    /// No queue with this name exists.
    #[error("queue `{0}` not found")]
    NotFound(String),
    /// The queue exists with different options.
    #[error("queue `{name}` exists with different options: {difference}")]
    OptionsMismatch {
        /// The queue.
        name: String,
        /// The first option that differs, with both values.
        difference: String,
    },
    /// The queue name or one of its options is invalid.
    #[error("invalid queue: {0}")]
    InvalidQueue(String),
    /// A binding pattern failed validation.
    #[error("invalid pattern `{pattern}`: {reason}")]
    InvalidPattern {
        /// The pattern as given.
        pattern: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Some acked or nacked ids were not outstanding on this session (the others were
    /// handled).
    #[error("unknown delivery ids {ids:?}")]
    UnknownDelivery {
        /// The ids that were not outstanding.
        ids: Vec<u64>,
    },
    /// The consumer id is already in use on this session.
    #[error("consumer id {0} is already in use")]
    DuplicateConsumer(u32),
    /// No consumer with this id exists on this session.
    #[error("no consumer with id {0}")]
    UnknownConsumer(u32),
    /// An argument is out of range (for example zero credit).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The store could not make the change durable (disk full, I/O error). A publish
    /// that gets this error may or may not have been stored.
    #[error("storage failure: {0}")]
    Storage(String),
    /// More bytes are waiting to be written than the engine is configured to buffer.
    #[error("storage is overloaded: {pending} bytes are waiting to be written")]
    Overloaded {
        /// Bytes waiting.
        pending: usize,
    },
    /// The engine has been shut down.
    #[error("the queue engine is shutting down")]
    ShuttingDown,
}

impl QueueError {
    /// The wire error code for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            QueueError::NotFound(_) => ErrorCode::QueueNotFound,
            QueueError::OptionsMismatch { .. } => ErrorCode::QueueOptionsMismatch,
            QueueError::InvalidQueue(_) => ErrorCode::InvalidQueue,
            QueueError::InvalidPattern { .. } => ErrorCode::InvalidPattern,
            QueueError::UnknownDelivery { .. } => ErrorCode::UnknownDelivery,
            QueueError::DuplicateConsumer(_) => ErrorCode::DuplicateConsumer,
            QueueError::UnknownConsumer(_) => ErrorCode::UnknownConsumer,
            QueueError::InvalidArgument(_) => ErrorCode::InvalidArgument,
            QueueError::Storage(_) | QueueError::Overloaded { .. } => ErrorCode::StorageFailure,
            QueueError::ShuttingDown => ErrorCode::ShuttingDown,
        }
    }
}
