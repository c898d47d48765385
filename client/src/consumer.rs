//! `Consumer` and `Delivery`: taking messages from a durable queue, with acks.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use tidings_protocol::{Frame, Text};
use tokio::sync::mpsc;

use crate::client::Client;
use crate::command::Command;
use crate::error::{AckError, QueueError};
use crate::handle::Handle;

impl Client {
    /// Starts a consumer on `queue` with a credit window of `prefetch`
    /// deliveries: the broker sends at most that many unacknowledged deliveries at
    /// once, and each ack or nack makes room for the next.
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
        let queue = queue.into();
        let prefetch = prefetch.max(1);
        let handle = self.handle();
        let cid = handle.shared.next_sid();
        // Room for one window from the current connection and one left over from a
        // connection that dropped, whose deliveries the user may still be holding.
        let capacity = usize::try_from(prefetch)
            .unwrap_or(usize::MAX / 4)
            .saturating_mul(2)
            .saturating_add(16);
        let (tx, rx) = mpsc::channel(capacity);
        let q = queue.clone();
        handle
            .call_with(|id, reply| Command::Consume {
                id,
                cid,
                queue: q,
                prefetch,
                tx,
                reply,
            })
            .await?;
        Ok(Consumer {
            cid,
            queue,
            rx,
            client: self.clone(),
            active: true,
        })
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
/// Dropping the consumer cancels it in the background (its unacked deliveries go
/// back to the queue); [`Consumer::cancel`] does the same and waits for the broker.
pub struct Consumer {
    cid: u32,
    queue: Text,
    rx: mpsc::Receiver<Delivery>,
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
    pub async fn next_delivery(&mut self) -> Option<Delivery> {
        self.rx.recv().await
    }

    /// Widens the credit window by `credit` deliveries (a CREDIT frame).
    pub fn add_credit(&self, credit: u32) -> Result<(), QueueError> {
        self.client
            .handle()
            .send(Command::Credit {
                cid: self.cid,
                credit,
            })
            .map_err(|_| QueueError::Closed)
    }

    /// Stops the consumer and waits for the broker to confirm; unacked deliveries
    /// go back to the queue.
    pub async fn cancel(mut self) -> Result<(), QueueError> {
        self.active = false;
        let cid = self.cid;
        self.client
            .handle()
            .call_with(|_, reply| Command::Cancel {
                cid,
                reply: Some(reply),
            })
            .await?;
        Ok(())
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
    pub async fn ack(self) -> Result<(), AckError> {
        self.settle(|epoch, delivery_id| Command::Ack { epoch, delivery_id })
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
