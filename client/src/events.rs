//! `Event` and `Events`: what the connection task reports about the connection's
//! life, for services that want to log or alert on reconnects.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures::Stream;
use futures::stream::BoxStream;
use tokio::sync::broadcast;

/// Something that happened to the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The connection came back after a drop, and the broker has answered the
    /// restored subscriptions and consumers: a message published after this event
    /// reaches them.
    Reconnected {
        /// Failed attempts before this one succeeded.
        attempts: u32,
    },
    /// The connection dropped; the client is reconnecting (or closing, when its
    /// policy says so).
    Disconnected {
        /// Why, in words.
        reason: String,
    },
    /// The broker cut the connection off as a slow consumer (ERROR `SlowConsumer`):
    /// the client did not read fast enough, and messages for its subscriptions
    /// were lost. [`Event::Disconnected`] follows; each subscription marks the
    /// place with [`crate::Interruption::SlowConsumer`].
    SlowConsumer {
        /// The broker's explanation.
        message: String,
    },
    /// The client gave up reconnecting (or was dropped) and is closed for good.
    Closed,
}

/// A stream of [`Event`]s, from [`crate::Client::events`].
///
/// If the stream is not polled and falls more than 64 events behind, the oldest
/// are skipped. [`Event::Closed`] is the last event of a client.
///
/// # Cancel safety
///
/// `next()` is cancel safe: an event is never lost by dropping the future.
pub struct Events {
    inner: BoxStream<'static, Event>,
}

impl Events {
    pub(crate) fn new(rx: broadcast::Receiver<Event>) -> Self {
        let inner = futures::stream::unfold(rx, |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(event) => return Some((event, rx)),
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
        Self {
            inner: Box::pin(inner),
        }
    }
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events").finish_non_exhaustive()
    }
}

impl Stream for Events {
    type Item = Event;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.inner.as_mut().poll_next(cx)
    }
}
