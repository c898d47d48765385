//! `Consumer` and `Delivery`: taking messages from a durable queue, with acks.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use tidings_protocol::{Ack, ErrorCode, Frame, Nack, Text};
use tokio::sync::mpsc;

use crate::client::{Client, TimeoutKind};
use crate::command::Command;
use crate::error::{AckError, CallError, ConsumerError, PublishError, QueueError};
use crate::handle::Handle;

impl Client {
    /// Starts a consumer on `queue` with a credit window of `prefetch`
    /// deliveries: the broker sends at most that many unacknowledged deliveries at
    /// once, and each ack or nack makes room for the next. A `prefetch` above the
    /// broker's [`Client::max_credit`] is clamped to it (0 counts as 1).
    ///
    /// ```no_run
    /// # async fn demo(client: tidings_client::Client) -> Result<(), Box<dyn std::error::Error>> {
    /// use futures::StreamExt;
    /// let mut consumer = client.consume("billing", 64).await?;
    /// while let Some(delivery) = consumer.next().await {
    ///     println!("attempt {}: {:?}", delivery.attempt(), delivery.payload());
    ///     delivery.ack().await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn consume(
        &self,
        queue: impl Into<Text>,
        prefetch: u32,
    ) -> Result<Consumer, QueueError> {
        self.consume_inner(queue.into(), prefetch, None).await
    }

    /// [`Client::consume`] for at most `limit` deliveries in all: the broker sends
    /// no more than that (redeliveries included), whatever the credit, so a
    /// consumer that wants N messages never holds (and then abandons) more than N.
    /// The stream does not end by itself; [`Consumer::close`] it once done.
    ///
    /// ```no_run
    /// # async fn demo(client: tidings_client::Client) -> Result<(), tidings_client::Error> {
    /// use futures::StreamExt;
    /// // Take exactly one job, if there is one, without touching any other.
    /// let mut one = client.consume_limited("jobs", 1, 1).await?;
    /// if let Some(job) = one.next().await {
    ///     job.ack().await?;
    /// }
    /// one.close().await?;
    /// # Ok(()) }
    /// ```
    pub async fn consume_limited(
        &self,
        queue: impl Into<Text>,
        prefetch: u32,
        limit: u32,
    ) -> Result<Consumer, QueueError> {
        self.consume_inner(queue.into(), prefetch, Some(limit))
            .await
    }

    async fn consume_inner(
        &self,
        queue: Text,
        prefetch: u32,
        limit: Option<u32>,
    ) -> Result<Consumer, QueueError> {
        let handle = self.handle();
        let prefetch = handle.shared.clamp_credit(prefetch.max(1));
        let cid = handle.shared.next_sid();
        // Room for one window from the current connection and one left over from a
        // connection that dropped, whose deliveries the user may still be holding.
        let capacity = usize::try_from(prefetch)
            .unwrap_or(usize::MAX / 4)
            .saturating_mul(2)
            .saturating_add(16);
        let (tx, rx) = mpsc::channel(capacity);
        let ended = Arc::new(OnceLock::new());
        let sink = ConsumerSink {
            tx,
            ended: ended.clone(),
        };
        let q = queue.clone();
        handle
            .call_with(self.timeout(TimeoutKind::Queue), |id, reply| {
                Command::Consume {
                    id,
                    cid,
                    queue: q,
                    prefetch,
                    limit,
                    sink,
                    reply,
                }
            })
            .await?;
        Ok(Consumer {
            cid,
            queue,
            rx,
            ended,
            end_reported: false,
            client: self.clone(),
            active: true,
        })
    }
}

/// The connection task's end of a consumer: where its deliveries go, and why it
/// ended when the broker ended it.
pub(crate) struct ConsumerSink {
    pub(crate) tx: mpsc::Sender<Delivery>,
    pub(crate) ended: Arc<OnceLock<ConsumerError>>,
}

impl ConsumerSink {
    /// Records why the consumer ended; its stream ends once this sink (the last
    /// sender) is dropped and the buffered deliveries are taken.
    pub(crate) fn end(&self, reason: ConsumerError) {
        let _ = self.ended.set(reason);
    }
}

/// The deliveries of one consumer, as a [`Stream`].
///
/// Deliveries are at-least-once: a delivery that is not acked before its
/// connection drops or its ack timeout passes is redelivered (with a higher
/// [`Delivery::attempt`]), possibly out of order. After a reconnect the consumer
/// is restored with the same id and window.
///
/// # Cancel safety
///
/// `next()` is cancel safe: a delivery is never lost by dropping the future; it
/// stays buffered for the next call.
///
/// # Ending
///
/// - [`Consumer::close`] sends the acks and nacks given so far and a CANCEL, and
///   returns once the broker has answered the CANCEL (see its guarantees).
/// - Dropping the consumer does the same in the background, with nothing to wait
///   on: a queue deleted right after may race the acks. Use `close` when it
///   matters.
/// - The broker may end it: when its queue is deleted the stream ends, and
///   [`Consumer::try_next`] returns [`ConsumerError::Cancelled`] once the buffered
///   deliveries are taken ([`Consumer::end_reason`] keeps it).
pub struct Consumer {
    cid: u32,
    queue: Text,
    rx: mpsc::Receiver<Delivery>,
    ended: Arc<OnceLock<ConsumerError>>,
    end_reported: bool,
    client: Client,
    active: bool,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("cid", &self.cid)
            .field("queue", &self.queue)
            .finish()
    }
}

impl Consumer {
    /// The queue consumed.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The next delivery, or `None` once the consumer has ended. Cancel safe.
    /// Does not say why it ended; [`Consumer::try_next`] does.
    pub async fn next_delivery(&mut self) -> Option<Delivery> {
        self.rx.recv().await
    }

    /// The next delivery; `Ok(None)` once the consumer has ended by the caller's
    /// doing, or `Err` (once, then `Ok(None)`) when the broker ended it: its queue
    /// was deleted ([`ConsumerError::Cancelled`]) or it could not be restored after
    /// a reconnect ([`ConsumerError::NotRestored`]). Cancel safe.
    ///
    /// ```no_run
    /// # async fn demo(client: tidings_client::Client) -> Result<(), tidings_client::Error> {
    /// let mut jobs = client.consume("jobs", 16).await?;
    /// loop {
    ///     match jobs.try_next().await {
    ///         Ok(Some(job)) => job.ack().await?,
    ///         Ok(None) => break,
    ///         Err(ended) if ended.queue_deleted() => {
    ///             eprintln!("queue deleted: {ended}");
    ///             break;
    ///         }
    ///         Err(ended) => return Err(ended.into()),
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn try_next(&mut self) -> Result<Option<Delivery>, ConsumerError> {
        if let Some(delivery) = self.rx.recv().await {
            return Ok(Some(delivery));
        }
        match self.ended.get() {
            Some(reason) if !self.end_reported => {
                self.end_reported = true;
                Err(reason.clone())
            }
            _ => Ok(None),
        }
    }

    /// Why the broker ended this consumer, once it has.
    pub fn end_reason(&self) -> Option<&ConsumerError> {
        self.ended.get()
    }

    /// Widens the credit window by `credit` deliveries (a CREDIT frame), up to the
    /// broker's [`Client::max_credit`]: past it nothing is sent.
    pub fn add_credit(&self, credit: u32) -> Result<(), QueueError> {
        self.client
            .handle()
            .send(Command::Credit {
                cid: self.cid,
                credit,
            })
            .map_err(|_| QueueError::Closed)
    }

    /// Stops the consumer and returns once the broker has taken everything this
    /// client sent for it.
    ///
    /// Guarantees, when it returns `Ok`:
    ///
    /// - every [`Delivery::ack`] and [`Delivery::nack`] called (returned) before
    ///   `close` was called has been applied by the broker: acked messages are out
    ///   of the queue and will not be redelivered while the broker runs (after a
    ///   broker crash an ack not yet on disk may be undone: at-least-once);
    /// - the consumer is cancelled: no more deliveries come for it, and its unacked
    ///   deliveries (including those still buffered in this `Consumer`) are back in
    ///   the queue for other consumers, counted as attempts;
    /// - so deleting the queue or starting another consumer afterwards cannot race
    ///   them.
    ///
    /// Acks given after `close` (for deliveries still held) are refused by the
    /// broker. A consumer the broker already ended closes with `Ok`. Errors: the
    /// connection dropped or the queue timeout passed before the broker answered;
    /// the broker then returns the deliveries itself when the connection ends.
    pub async fn close(mut self) -> Result<(), QueueError> {
        self.active = false;
        let cid = self.cid;
        let answer = self
            .client
            .handle()
            .call_with(self.client.timeout(TimeoutKind::Queue), |_, reply| {
                Command::Cancel {
                    cid,
                    reply: Some(reply),
                }
            })
            .await;
        match answer {
            Ok(_) => Ok(()),
            // The broker had ended it already (queue deleted, not restored).
            Err(CallError::Server(e)) if e.code() == Some(ErrorCode::UnknownConsumer) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

impl Stream for Consumer {
    type Item = Delivery;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        if self.active {
            let _ = self.client.handle().send(Command::Cancel {
                cid: self.cid,
                reply: None,
            });
        }
    }
}

/// One message delivered from a queue. Acknowledge it with [`Delivery::ack`], or
/// hand it back with [`Delivery::nack`] / [`Delivery::nack_after`]. A delivery
/// dropped without either is redelivered after the queue's ack timeout (or when
/// the connection closes).
///
/// Acks and nacks are batched: they are collected by the connection task and sent
/// as one ACK (or NACK) frame with every id gathered before its next write.
pub struct Delivery {
    frame: tidings_protocol::Delivery,
    epoch: u64,
    handle: Handle,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("queue", &self.frame.queue)
            .field("topic", &self.frame.topic)
            .field("id", &self.frame.delivery_id)
            .field("attempt", &self.frame.attempt)
            .field("payload_len", &self.frame.payload.len())
            .finish()
    }
}

impl Delivery {
    pub(crate) fn new(frame: tidings_protocol::Delivery, epoch: u64, handle: Handle) -> Self {
        Self {
            frame,
            epoch,
            handle,
        }
    }

    /// The topic the message was published to.
    pub fn topic(&self) -> &str {
        &self.frame.topic
    }

    /// The queue it came from.
    pub fn queue(&self) -> &str {
        &self.frame.queue
    }

    /// The payload.
    pub fn payload(&self) -> &Bytes {
        &self.frame.payload
    }

    /// The headers, in order.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &str)> {
        self.frame
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The value of the first header named `key`.
    pub fn header_value(&self, key: &str) -> Option<&str> {
        self.frame
            .headers
            .iter()
            .find(|(k, _)| k.as_str() == key)
            .map(|(_, v)| v.as_str())
    }

    /// The message id the publisher set (the one queues deduplicate on), if any.
    pub fn message_id(&self) -> Option<&str> {
        self.frame.message_id.as_deref()
    }

    /// Where the publisher wants answers, if it set a reply topic: request/reply
    /// through a queue (see [`Delivery::respond`]).
    pub fn reply_to_topic(&self) -> Option<&str> {
        self.frame.reply_to.as_deref()
    }

    /// Publishes `payload` to this delivery's reply topic, the way a worker answers
    /// a request that came through a queue. Acking is still up to the caller.
    ///
    /// ```no_run
    /// # async fn demo(client: tidings_client::Client) -> Result<(), tidings_client::Error> {
    /// use futures::StreamExt;
    /// let mut jobs = client.consume("resize", 8).await?;
    /// while let Some(job) = jobs.next().await {
    ///     job.respond("done").await?;
    ///     job.ack().await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn respond(&self, payload: impl Into<Bytes>) -> Result<(), PublishError> {
        let Some(reply_to) = &self.frame.reply_to else {
            return Err(PublishError::NoReplyTo);
        };
        self.handle
            .publish_message(crate::Message::new(reply_to.clone(), payload))
            .await
    }

    /// 1 on the first delivery, 2 on the first redelivery, and so on.
    pub fn attempt(&self) -> u32 {
        self.frame.attempt
    }

    /// The delivery id (unique on its connection).
    pub fn id(&self) -> u64 {
        self.frame.delivery_id
    }

    fn settle(self, cmd: impl FnOnce(u64, u64) -> Command) -> Result<(), AckError> {
        if self.handle.shared.epoch.load(Ordering::Relaxed) != self.epoch {
            return Err(AckError::Stale);
        }
        self.handle
            .send(cmd(self.epoch, self.frame.delivery_id))
            .map_err(|_| AckError::Closed)
    }

    /// Done: removes the message from its queue.
    ///
    /// Returns once the ack is queued for the connection, not when the broker has
    /// it: acks are batched into one ACK frame per write. An error means it could
    /// not even be queued ([`AckError::Stale`]: the delivery's connection is gone,
    /// and the broker redelivers it). To know the broker applied it, use
    /// [`Delivery::ack_confirmed`], or [`Consumer::close`] for all acks at once.
    pub async fn ack(self) -> Result<(), AckError> {
        self.settle(|epoch, delivery_id| Command::Ack { epoch, delivery_id })
    }

    /// Acks and waits for the broker's answer: when it returns `Ok`, the broker
    /// has removed the message from its queue (it will not be redelivered while
    /// the broker runs). Costs a round trip and a frame of its own; prefer
    /// [`Delivery::ack`] in a hot loop. Bounded by the queue timeout.
    ///
    /// ```no_run
    /// # async fn demo(client: tidings_client::Client) -> Result<(), tidings_client::Error> {
    /// use futures::StreamExt;
    /// let mut payments = client.consume("payments", 1).await?;
    /// if let Some(payment) = payments.next().await {
    ///     payment.ack_confirmed().await?; // only then tell the customer
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn ack_confirmed(self) -> Result<(), AckError> {
        let ids = vec![self.frame.delivery_id];
        self.settle_confirmed(|request_id| Frame::Ack(Ack { request_id, ids }))
            .await
    }

    /// Nacks and waits for the broker's answer: when it returns `Ok`, the message
    /// is back in its queue (or dead-lettered). Bounded by the queue timeout.
    pub async fn nack_confirmed(self) -> Result<(), AckError> {
        let ids = vec![self.frame.delivery_id];
        self.settle_confirmed(|request_id| {
            Frame::Nack(Nack {
                request_id,
                delay_ms: None,
                ids,
            })
        })
        .await
    }

    async fn settle_confirmed(self, make: impl FnOnce(u32) -> Frame) -> Result<(), AckError> {
        if self.handle.shared.epoch.load(Ordering::Relaxed) != self.epoch {
            return Err(AckError::Stale);
        }
        let timeout = self.handle.shared.opts.queue_timeout;
        match self.handle.call(timeout, make).await {
            Ok(_) => Ok(()),
            Err(CallError::Server(e)) => Err(AckError::Refused(e)),
            Err(CallError::Closed) => Err(AckError::Closed),
            Err(CallError::TimedOut(after)) => Err(AckError::TimedOut { after }),
            Err(CallError::ConnectionLost | CallError::Disconnected(_)) => {
                Err(AckError::ConnectionLost)
            }
        }
    }

    /// Hands the message back for redelivery, after the queue's backoff.
    pub async fn nack(self) -> Result<(), AckError> {
        self.settle(|epoch, delivery_id| Command::Nack {
            epoch,
            delivery_id,
            delay_ms: None,
        })
    }

    /// Hands the message back for redelivery no sooner than `delay` from now.
    pub async fn nack_after(self, delay: Duration) -> Result<(), AckError> {
        let delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.settle(|epoch, delivery_id| Command::Nack {
            epoch,
            delivery_id,
            delay_ms: Some(delay_ms),
        })
    }
}

/// Maps a frame that should be OK.
pub(crate) fn expect_ok(frame: Frame) -> Result<(), QueueError> {
    match frame {
        Frame::Ok(_) => Ok(()),
        other => Err(QueueError::UnexpectedReply {
            frame: other.name(),
        }),
    }
}
