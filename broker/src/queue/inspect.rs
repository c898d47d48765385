//! Operators' views of queues (the HTTP API and dashboard): figures with options,
//! stored messages and dead letters peeked at without consuming them, the
//! consumers attached to a queue, and purge.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tidings_protocol::{Headers, QueueInfo, Text};

use crate::queue::queue::Queue;
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
    /// The [`QueueSession`](crate::queue::QueueSession) (one per connection).
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
    /// their consumers; delayed ones stay until due). Returns how many went.
    pub async fn purge(&self, queue: &str) -> Result<u64, QueueError> {
        self.inner.check_open()?;
        let q = self.inner.queue(queue)?;
        self.settle().await?;
        let mut purged = 0u64;
        loop {
            let paged = q.paged.notified();
            let (batch, more) = q.take_ready(4096);
            if batch.is_empty() {
                if !more {
                    break;
                }
                // Wait for the page read take_ready started; bounded so a store that
                // stopped answering cannot hang the caller.
                if tokio::time::timeout(Duration::from_secs(5), paged)
                    .await
                    .is_err()
                {
                    break;
                }
                continue;
            }
            let done: Vec<_> = batch
                .into_iter()
                .map(|(slot, msg)| (slot, msg.size()))
                .collect();
            purged += done.len() as u64;
            q.finish_move(&done, false);
        }
        // The removals are queued for the next commit; wait for it.
        self.inner.store.batch(|b| b.ticket()).wait().await?;
        Ok(purged)
    }

    /// Waits until every write queued so far is committed and announced to its
    /// queue. A confirm (or a dead-letter move) resolves when its round is durable,
    /// a moment before the queue hears of it and makes the message ready; an
    /// operator's action right after one waits here so that it sees the message.
    pub async fn settle(&self) -> Result<(), QueueError> {
        self.inner.check_open()?;
        self.inner.store.batch(|b| b.ticket()).wait().await
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
