//! Operators' views of queues (the HTTP API and dashboard): figures with options,
//! stored messages and dead letters peeked at without consuming them, the
//! consumers attached to a queue, and purge.

use std::sync::Arc;

use bytes::Bytes;
use tidings_protocol::{Headers, QueueInfo, Text};

use crate::queue::consumers::Consumer;
use crate::queue::durable::Queue;
use crate::queue::{QueueEngine, QueueError};
use crate::storage::Range;

/// Most messages one peek returns, whatever the limit asked for.
pub const MAX_PEEK: u32 = 1_000;

/// One queue as an operator sees it: figures, counters beyond [`QueueInfo`] and
/// resolved options.
#[derive(Debug, Clone)]
pub struct QueueView {
    /// Figures as QUEUE_INFO reports them (rates are per second over the last
    /// few seconds).
    pub info: QueueInfo,
    /// Publishes refused because the queue was full (reject-publish).
    pub rejected: u64,
    /// Messages dropped to make room (drop-head).
    pub dropped: u64,
    /// Messages whose TTL passed.
    pub expired: u64,
    /// Publishes recognised as duplicates by message id.
    pub duplicates: u64,
    /// Deliveries after the first (nack, ack timeout, consumer gone).
    pub redelivered: u64,
    /// The queue's options, defaults filled in.
    pub options: QueueSettingsView,
}

/// A queue's resolved options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSettingsView {
    /// Deliveries before a message is dead-lettered.
    pub max_deliveries: u32,
    /// Time a consumer has to ack a delivery.
    pub ack_timeout_ms: u64,
    /// Delays between redeliveries.
    pub backoff_ms: Vec<u64>,
    /// Most messages held, if limited.
    pub max_length: Option<u64>,
    /// Most payload bytes held, if limited.
    pub max_bytes: Option<u64>,
    /// `drop-head` or `reject-publish`.
    pub overflow: &'static str,
    /// Message time to live, if any.
    pub ttl_ms: Option<u64>,
    /// How long message ids are remembered for deduplication.
    pub dedup_window_ms: u64,
    /// The dead-letter queue's name.
    pub dead_letter: String,
}

/// A stored message, read without consuming it.
#[derive(Debug, Clone)]
pub struct PeekedMessage {
    /// Its position in its queue; pass `id + 1` as `from` for the next page.
    pub id: u64,
    /// The topic it was published to.
    pub topic: Text,
    /// Its headers.
    pub headers: Headers,
    /// Its payload (callers show a preview).
    pub payload: Bytes,
    /// The publisher's message id, if any.
    pub message_id: Option<Text>,
    /// Wall-clock milliseconds when it was first stored.
    pub published_ms: u64,
    /// Deliveries made so far (of a dead letter: in the dead-letter queue).
    pub deliveries: u32,
    /// For a dead letter: why it died and after how many deliveries.
    pub dead: Option<(Text, u32)>,
}

/// A consumer attached to a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsumerView {
    /// The [`ConsumerSession`](crate::queue::ConsumerSession) (one per connection).
    pub session_id: u64,
    /// The consumer id the client chose.
    pub consumer_id: u32,
    /// Deliveries it holds and has not acked.
    pub unacked: u32,
    /// Its credit window (prefetch).
    pub window: u32,
}

impl QueueEngine {
    /// Every queue's figures and options, by name.
    pub fn views(&self) -> Vec<QueueView> {
        let queues: Vec<Arc<Queue>> = self.inner.read().queues.values().cloned().collect();
        queues.iter().map(|q| view(q)).collect()
    }

    /// One queue's figures and options.
    pub fn view(&self, name: &str) -> Result<QueueView, QueueError> {
        Ok(view(&*self.inner.queue(name)?))
    }

    /// The consumers attached to `queue`.
    pub fn consumers(&self, queue: &str) -> Result<Vec<ConsumerView>, QueueError> {
        Ok(self.inner.queue(queue)?.consumer_views())
    }

    /// Up to `limit` (capped at [`MAX_PEEK`]) stored messages of `queue` from
    /// position `from` on, oldest first: ready ones and ones delivered but not yet
    /// acked (delayed ones are not listed). Nothing is consumed or changed.
    pub async fn peek(
        &self,
        queue: &str,
        from: u64,
        limit: u32,
    ) -> Result<Vec<PeekedMessage>, QueueError> {
        let q = self.inner.queue(queue)?;
        self.peek_stored(&q, from, limit).await
    }

    /// Like [`QueueEngine::peek`] on the dead-letter queue of `queue`; returns its
    /// name too. Empty when it does not exist yet.
    pub async fn peek_dead_letters(
        &self,
        queue: &str,
        from: u64,
        limit: u32,
    ) -> Result<(String, Vec<PeekedMessage>), QueueError> {
        let q = self.inner.queue(queue)?;
        let name = q.settings.dead_letter.clone();
        let Ok(dlq) = self.inner.queue(&name) else {
            return Ok((name, Vec::new()));
        };
        let letters = self.peek_stored(&dlq, from, limit).await?;
        Ok((name, letters))
    }

    /// Removes every ready message of `queue` (delivered, unacked ones stay with
    /// their consumers; delayed ones stay until due). Returns how many went, once
    /// their removal is durable.
    pub async fn purge(&self, queue: &str) -> Result<u64, QueueError> {
        self.inner.check_open()?;
        let q = self.inner.queue(queue)?;
        self.settle().await;
        let mut purged = 0u64;
        let mut from = 0u64;
        loop {
            let page = self.inner.read_letters(&q, from).await?;
            let Some(last) = page.last().map(|l| l.key.1) else {
                break;
            };
            from = last + 1;
            let done: Vec<_> = q
                .claim(page, |_| true)
                .into_iter()
                .map(|c| (c.slot, c.message.size()))
                .collect();
            purged += done.len() as u64;
            q.finish_departures(&done, false);
        }
        // The removals are queued for the next commit; wait for it.
        self.inner.store.batch(|b| b.ticket()).wait().await?;
        Ok(purged)
    }

    async fn peek_stored(
        &self,
        q: &Queue,
        from: u64,
        limit: u32,
    ) -> Result<Vec<PeekedMessage>, QueueError> {
        let limit = usize::try_from(limit.clamp(1, MAX_PEEK)).unwrap_or(1);
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.inner.store.read(
            Range::Messages { qid: q.qid, from },
            limit,
            usize::MAX,
            move |result| {
                let _ = tx.send(result);
            },
        );
        let loaded = rx.await.map_err(|_| QueueError::ShuttingDown)??;
        Ok(loaded
            .into_iter()
            .map(|l| PeekedMessage {
                id: l.key.1,
                topic: l.message.topic,
                headers: l.message.headers,
                payload: l.message.payload,
                message_id: l.message.message_id,
                published_ms: l.message.published_ms,
                deliveries: l.message.deliveries,
                dead: l.message.dead.map(|d| (d.reason, d.attempts)),
            })
            .collect())
    }
}

fn view(q: &Queue) -> QueueView {
    let info = q.info();
    let mut extra = q.extra_stats().into_iter();
    let mut next = |name: &str| {
        extra
            .find(|(n, _)| *n == name)
            .map_or(0, |(_, value)| value)
    };
    let (rejected, dropped, expired, duplicates) = (
        next("rejected"),
        next("dropped"),
        next("expired"),
        next("duplicates"),
    );
    let s = &q.settings;
    QueueView {
        info,
        rejected,
        dropped,
        expired,
        duplicates,
        redelivered: q.redelivered(),
        options: QueueSettingsView {
            max_deliveries: s.max_deliveries,
            ack_timeout_ms: s.ack_timeout_ms,
            backoff_ms: s.backoff_ms.clone(),
            max_length: s.max_length,
            max_bytes: s.max_bytes,
            overflow: if s.drop_head {
                "drop-head"
            } else {
                "reject-publish"
            },
            ttl_ms: s.ttl_ms,
            dedup_window_ms: s.dedup_window_ms,
            dead_letter: s.dead_letter.clone(),
        },
    }
}

impl Queue {
    /// Deliveries with an attempt number above 1, since the broker started.
    pub fn redelivered(&self) -> u64 {
        self.lock().stats.redelivered
    }

    /// The attached consumers, for operators.
    pub fn consumer_views(&self) -> Vec<ConsumerView> {
        self.lock()
            .consumers
            .iter()
            .map(|c: &Consumer| ConsumerView {
                session_id: c.link.id,
                consumer_id: c.id,
                unacked: c.outstanding,
                window: c.window,
            })
            .collect()
    }
}
