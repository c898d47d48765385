//! Durable-queue frames (QUEUE_*, DEAD_LETTERS, REDRIVE, CONSUME, CANCEL, CREDIT,
//! ACK, NACK), the queue side of PUBLISH, and the queue engine's place in the
//! broker's life: the one file where connections and the server meet durable
//! queues.
//!
//! The engine is not wired in yet, so queue commands are answered with ERROR
//! `Internal` and a confirmed publish reaches no queue (CONFIRM with `queues: 0`).
//! The integration replaces this file's bodies, keeping its signatures:
//! - [`BrokerQueues`]: opened by the server at start ([`BrokerQueues::open`]),
//!   shared by every connection, shut down after the connections have drained.
//! - [`QueueSession`]: one per connection, created after the handshake with the
//!   connection's [`Outbox`], through which deliveries reach the client.
//! - [`handle`] serves queue commands; [`publish`] receives every valid PUBLISH
//!   after its subscribers were served; [`stats`] adds queue figures to STATS;
//!   [`connection_closed`] releases a departed connection's deliveries.

use tidings_protocol::{Confirm, ErrorCode, Frame, Publish, Text};

use super::Session;
use super::writer::Outbox;
use crate::{BrokerError, Config};

/// The broker-wide queue state.
#[derive(Debug, Default)]
pub(crate) struct BrokerQueues {}

impl BrokerQueues {
    /// Opens the queues kept under `config.data_dir`.
    pub(crate) fn open(_config: &Config) -> Result<BrokerQueues, BrokerError> {
        Ok(BrokerQueues {})
    }

    /// Called once every connection has finished: make everything durable.
    pub(crate) async fn shutdown(&self) {}
}

/// Per-connection queue state (consumers, outstanding deliveries).
#[derive(Debug, Default)]
pub(crate) struct QueueSession {}

impl QueueSession {
    /// The queue state of a connection that just completed its handshake.
    pub(crate) fn new(_queues: &BrokerQueues, _outbox: &Outbox) -> QueueSession {
        QueueSession {}
    }
}

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

/// Queue figures for STATS_REPLY (`queue.<name>.<figure>`), after the broker's own.
pub(crate) fn stats(_session: &Session) -> Vec<(Text, u64)> {
    Vec::new()
}

/// The connection is gone: release its consumers and their deliveries.
pub(crate) async fn connection_closed(session: &mut Session) {
    let QueueSession {} = std::mem::take(&mut session.queues);
}
