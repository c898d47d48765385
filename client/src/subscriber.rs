//! `Subscription`: a stream of the messages matching a pattern.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use futures::Stream;
use tidings_protocol::{Pattern, Text};

use crate::client::{Client, TimeoutKind};
use crate::command::Command;
use crate::error::SubscribeError;
use crate::message::Message;
use crate::sub_buffer::{Item, SubBuffer, Taker};

impl Client {
    /// Subscribes to every topic matching `pattern` (`*` matches one token, `>` one
    /// or more trailing tokens).
    ///
    /// ```no_run
    /// # async fn demo(client: tidings_client::Client) -> Result<(), tidings_client::SubscribeError> {
    /// use futures::StreamExt;
    /// let mut orders = client.subscribe("orders.>").await?;
    /// while let Some(msg) = orders.next().await {
    ///     println!("{}: {} bytes", msg.topic(), msg.payload().len());
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn subscribe(
        &self,
        pattern: impl Into<Text>,
    ) -> Result<Subscription, SubscribeError> {
        self.subscribe_inner(pattern.into(), None).await
    }

    /// Subscribes as a member of `group`: each message matching `pattern` goes to
    /// one member of the group only (load balancing without a durable queue).
    pub async fn subscribe_group(
        &self,
        pattern: impl Into<Text>,
        group: impl Into<Text>,
    ) -> Result<Subscription, SubscribeError> {
        self.subscribe_inner(pattern.into(), Some(group.into()))
            .await
    }

    async fn subscribe_inner(
        &self,
        pattern: Text,
        group: Option<Text>,
    ) -> Result<Subscription, SubscribeError> {
        Pattern::new(pattern.as_str()).map_err(|reason| SubscribeError::InvalidPattern {
            pattern: pattern.to_string(),
            reason,
        })?;
        let handle = self.handle();
        let sid = handle.shared.next_sid();
        let opts = &handle.shared.opts;
        let buffer = Arc::new(SubBuffer::new(
            opts.subscription_capacity,
            opts.subscription_max_bytes,
        ));
        let stalls = Arc::new(AtomicU64::new(0));
        handle
            .call_with(self.timeout(TimeoutKind::Subscribe), |id, reply| {
                Command::Subscribe {
                    id,
                    sid,
                    pattern: pattern.clone(),
                    group,
                    buffer: buffer.clone(),
                    stalls: stalls.clone(),
                    reply,
                }
            })
            .await?;
        Ok(Subscription {
            sid,
            pattern,
            buffer,
            taker: Taker::new(),
            stalls,
            interruptions: 0,
            client: self.clone(),
            active: true,
        })
    }
}

/// A place in a subscription's stream where messages may have been lost, from
/// [`Subscription::try_next`]. Subscriptions are at-most-once: what was published
/// while the connection was down is not received. The subscription goes on after
/// it (restored with the reconnect).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Interruption {
    /// The broker cut the connection off as a slow consumer: its outbound buffer
    /// for this client overflowed because the client did not read fast enough.
    /// Messages queued for this client then, and those published until the
    /// reconnect, were lost.
    #[error("the broker cut the connection off as a slow consumer ({message}); messages were lost")]
    SlowConsumer {
        /// The broker's explanation.
        message: String,
    },
    /// The connection was lost for another reason; messages published until the
    /// reconnect were not received.
    #[error("the connection to the broker was lost ({reason}); messages may have been missed")]
    Disconnected {
        /// Why, in words.
        reason: String,
    },
}

/// The messages of one subscription, as a [`Stream`].
///
/// # Buffering and slow subscribers
///
/// Each subscription buffers up to `subscription_capacity` messages and
/// `subscription_max_bytes` bytes (see [`crate::ClientBuilder::subscription_capacity`]
/// and [`crate::ClientBuilder::subscription_max_bytes`]). Messages are never
/// dropped in the client: when the buffer is full because the stream is not polled
/// fast enough, the connection **stops reading** from the socket until the
/// subscription makes room (backpressure; counted in [`Subscription::stalls`]).
/// TCP then pushes back on the broker, so memory stays bounded on both sides.
///
/// The price: one slow subscription slows its whole connection — the other
/// subscriptions, request replies and queue deliveries on the same client wait
/// with it. Give a subscriber that may fall behind a client of its own. If it
/// stays behind long enough for the broker's outbound bound
/// (`--max-pending-bytes`) to fill, the broker's slow-consumer policy applies
/// (by default it disconnects the client), which protects the broker and the
/// other clients. Subscriptions are at-most-once (messages published while the
/// connection is down are not seen); use a durable queue when every message
/// matters.
///
/// After a reconnect the subscription is restored with the same id; messages
/// published while the connection was down are not seen. The stream marks the
/// place: [`Subscription::try_next`] returns an [`Interruption`] there (saying
/// whether the broker cut the client off as a slow consumer), and
/// [`crate::Client::events`] reports it too.
///
/// # Cancel safety
///
/// `next()` is cancel safe: if it is dropped before completing (say, in a
/// `select!`), no message is lost; it stays buffered for the next call.
///
/// Dropping the subscription unsubscribes in the background;
/// [`Subscription::unsubscribe`] does the same and waits for the broker's answer.
pub struct Subscription {
    sid: u32,
    pattern: Text,
    buffer: Arc<SubBuffer>,
    taker: Taker,
    stalls: Arc<AtomicU64>,
    /// Gaps passed over by `next`/`next_message` (which yield messages only).
    interruptions: u64,
    client: Client,
    active: bool,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("sid", &self.sid)
            .field("pattern", &self.pattern)
            .finish()
    }
}

impl Subscription {
    /// The subscription's id on its connection.
    pub fn sid(&self) -> u32 {
        self.sid
    }

    /// The pattern subscribed to.
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// Messages dropped because this subscription's buffer was full: always 0,
    /// since a full buffer now holds the connection back instead (see
    /// [`Subscription::stalls`]). Kept so that code checking it goes on working.
    pub fn dropped(&self) -> u64 {
        0
    }

    /// How many times this subscription's full buffer made its connection stop
    /// reading until it made room.
    pub fn stalls(&self) -> u64 {
        self.stalls.load(Ordering::Relaxed)
    }

    /// The next message, or `None` once the subscription has ended. Cancel safe.
    /// Passes over interruptions (counted in [`Subscription::interruptions`]);
    /// [`Subscription::try_next`] reports them.
    pub async fn next_message(&mut self) -> Option<Message> {
        std::future::poll_fn(|cx| self.poll_message(cx)).await
    }

    /// The next message, `Ok(None)` once the subscription has ended, or `Err` at
    /// the place where messages may have been lost: the broker cut the connection
    /// off as a slow consumer ([`Interruption::SlowConsumer`]) or the connection
    /// dropped ([`Interruption::Disconnected`]). The subscription goes on after an
    /// `Err`; call again for the messages since the reconnect. Cancel safe.
    ///
    /// ```no_run
    /// # async fn demo(client: tidings_client::Client) -> Result<(), tidings_client::SubscribeError> {
    /// use tidings_client::Interruption;
    /// let mut prices = client.subscribe("prices.>").await?;
    /// loop {
    ///     match prices.try_next().await {
    ///         Ok(Some(msg)) => println!("{}", msg.topic()),
    ///         Ok(None) => break,
    ///         Err(Interruption::SlowConsumer { .. }) => eprintln!("too slow: prices were lost"),
    ///         Err(gap) => eprintln!("{gap}"),
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn try_next(&mut self) -> Result<Option<Message>, Interruption> {
        match std::future::poll_fn(|cx| self.taker.poll_next(&self.buffer, cx)).await {
            Some(Item::Message(m)) => Ok(Some(m)),
            Some(Item::Gap(gap)) => Err(gap),
            None => Ok(None),
        }
    }

    /// How many interruptions `next` and [`Subscription::next_message`] passed
    /// over (those [`Subscription::try_next`] returned are not counted).
    pub fn interruptions(&self) -> u64 {
        self.interruptions
    }

    fn poll_message(&mut self, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        loop {
            match self.taker.poll_next(&self.buffer, cx) {
                Poll::Ready(Some(Item::Message(m))) => return Poll::Ready(Some(m)),
                Poll::Ready(Some(Item::Gap(_))) => self.interruptions += 1,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Ends the subscription and waits for the broker to confirm.
    pub async fn unsubscribe(mut self) -> Result<(), SubscribeError> {
        self.active = false;
        let sid = self.sid;
        self.client
            .handle()
            .call_with(self.client.timeout(TimeoutKind::Subscribe), |_, reply| {
                Command::Unsubscribe {
                    sid,
                    reply: Some(reply),
                }
            })
            .await?;
        Ok(())
    }
}

impl Stream for Subscription {
    type Item = Message;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        self.poll_message(cx)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.buffer.drop_receiver();
        if self.active {
            let _ = self.client.handle().send(Command::Unsubscribe {
                sid: self.sid,
                reply: None,
            });
        }
    }
}
