//! Durable-queue frames (QUEUE_*, DEAD_LETTERS, REDRIVE, CONSUME, CANCEL, CREDIT,
//! ACK, NACK) and the queue side of PUBLISH: the one place where a connection meets
//! the durable-queue engine.
//!
//! The engine is not wired in yet, so queue commands are answered with ERROR
//! `Internal` and a confirmed publish reaches no queue (CONFIRM with `queues: 0`).
//! The integration replaces this file: [`QueueSession`] holds a connection's
//! consumers, [`handle`] serves the commands, [`publish`] hands every published
//! message to the queues whose bindings match, and [`connection_closed`] returns a
//! departed connection's unacknowledged deliveries.

use tidings_protocol::{Confirm, ErrorCode, Frame, Publish};

use super::Session;

/// Per-connection queue state (consumers, outstanding deliveries).
#[derive(Debug, Default)]
pub(crate) struct QueueSession {}

/// Serves one queue command from the connection's client.
pub(crate) async fn handle(session: &mut Session, frame: Frame) {
    let request_id = frame.request_id().unwrap_or(0);
    session.reply_error(
        request_id,
        ErrorCode::Internal,
        format!("{}: durable queues are not available yet", frame.name()),
    );
}

/// Hands a published message (topic and payload already validated, subscribers
/// already served) to the durable queues, and answers a confirm request once every
/// queue that took it has made it durable.
pub(crate) async fn publish(session: &mut Session, publish: Publish) {
    if publish.confirm {
        session.reply(Frame::Confirm(Confirm {
            request_id: publish.request_id.unwrap_or(0),
            queues: 0,
            rejected: 0,
            duplicate: false,
        }));
    }
}

/// The connection is gone: release its consumers and their deliveries.
pub(crate) async fn connection_closed(session: &mut Session) {
    let QueueSession {} = std::mem::take(&mut session.queues);
}
