//! `QueueSession`: one connection's consumers and outstanding deliveries, and the
//! `DeliverySink` through which queues hand it messages.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tidings_protocol::Delivery;

use crate::queue::EngineInner;
use crate::queue::error::QueueError;
use crate::queue::queue::{DeadLetterMove, Queue, Requeue};

/// Where a session's deliveries go: the connection's outbound queue.
pub trait DeliverySink: Send + Sync + 'static {
    /// Pushes a DELIVERY frame to the connection without blocking; returns false
    /// when the connection is gone (the delivery then stays outstanding until the
    /// session is dropped or its ack timeout passes).
    fn deliver(&self, delivery: Delivery) -> bool;
}

#[derive(Default)]
struct SessionState {
    consumers: HashMap<u32, Arc<Queue>>,
    /// Outstanding deliveries: id → (queue, message seq).
    deliveries: HashMap<u64, (Arc<Queue>, u64)>,
    closed: bool,
}

/// The part of a session that queues hold on to while they have its deliveries out.
pub(crate) struct SessionInner {
    pub id: u64,
    pub sink: Arc<dyn DeliverySink>,
    next_delivery: AtomicU64,
    state: Mutex<SessionState>,
}

impl SessionInner {
    fn lock(&self) -> MutexGuard<'_, SessionState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a delivery about to be sent. Called under the queue's lock (queue →
    /// session is the lock order). False once the session is closed.
    pub fn register(&self, queue: &Arc<Queue>, seq: u64) -> Option<u64> {
        let mut st = self.lock();
        if st.closed {
            return None;
        }
        let id = self.next_delivery.fetch_add(1, Ordering::Relaxed);
        st.deliveries.insert(id, (queue.clone(), seq));
        Some(id)
    }

    /// Drops a delivery the queue took back (ack timeout), so a late ack of it is
    /// reported as unknown and the map stays bounded by what is outstanding.
    pub fn forget(&self, delivery_id: u64) {
        self.lock().deliveries.remove(&delivery_id);
    }
}

/// One connection's view of the queues: its consumers and the deliveries it has not
/// yet acked. Dropping it cancels its consumers and makes all its unacked deliveries
/// available again at once (they keep their attempt count).
pub struct QueueSession {
    inner: Arc<SessionInner>,
    engine: Arc<EngineInner>,
}

/// Groups `(delivery id, seq)` pairs by queue, keeping first-seen order.
type ByQueue = Vec<(Arc<Queue>, Vec<(u64, u64)>)>;

impl QueueSession {
    pub(crate) fn new(engine: Arc<EngineInner>, id: u64, sink: Arc<dyn DeliverySink>) -> Self {
        Self {
            inner: Arc::new(SessionInner {
                id,
                sink,
                next_delivery: AtomicU64::new(1),
                state: Mutex::new(SessionState::default()),
            }),
            engine,
        }
    }

    /// How many consumers this connection has (for `--max-consumers`).
    pub fn consumer_count(&self) -> usize {
        self.inner.lock().consumers.len()
    }

    /// Starts consumer `consumer_id` on `queue` with `credit` deliveries outstanding
    /// at most. Errors: `DuplicateConsumer`, `NotFound`, `InvalidArgument` (credit 0).
    pub async fn consume(
        &self,
        consumer_id: u32,
        queue: &str,
        credit: u32,
    ) -> Result<(), QueueError> {
        self.consume_limited(consumer_id, queue, credit, None).await
    }

    /// [`QueueSession::consume`] for at most `limit` deliveries in all (`None`:
    /// unlimited); past it the consumer gets nothing more until cancelled.
    pub async fn consume_limited(
        &self,
        consumer_id: u32,
        queue: &str,
        credit: u32,
        limit: Option<u32>,
    ) -> Result<(), QueueError> {
        if limit == Some(0) {
            return Err(QueueError::InvalidArgument(
                "limit must be at least 1 (omit it for no limit)".into(),
            ));
        }
        if credit == 0 {
            return Err(QueueError::InvalidArgument(
                "credit must be at least 1".into(),
            ));
        }
        let q = self.engine.queue(queue)?;
        {
            let mut st = self.inner.lock();
            if st.consumers.contains_key(&consumer_id) {
                return Err(QueueError::DuplicateConsumer(consumer_id));
            }
            st.consumers.insert(consumer_id, q.clone());
        }
        q.add_consumer(&self.inner, consumer_id, credit, limit);
        Ok(())
    }

    /// Stops a consumer; its unacked deliveries go back to the queue at once.
    pub async fn cancel(&self, consumer_id: u32) -> Result<(), QueueError> {
        let q = self
            .inner
            .lock()
            .consumers
            .remove(&consumer_id)
            .ok_or(QueueError::UnknownConsumer(consumer_id))?;
        let outbox = q.remove_consumer(self.inner.id, consumer_id);
        self.engine.move_dead_letters(&q, outbox);
        Ok(())
    }

    /// This session's id, as [`QueueEngine::consumers`](crate::queue::QueueEngine::consumers)
    /// reports it.
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// Raises a consumer's credit by `credit`.
    pub fn credit(&self, consumer_id: u32, credit: u32) -> Result<(), QueueError> {
        if credit == 0 {
            return Err(QueueError::InvalidArgument(
                "credit must be at least 1".into(),
            ));
        }
        let q = self
            .inner
            .lock()
            .consumers
            .get(&consumer_id)
            .cloned()
            .ok_or(QueueError::UnknownConsumer(consumer_id))?;
        q.add_credit(self.inner.id, consumer_id, credit);
        Ok(())
    }

    fn take(&self, ids: &[u64]) -> (ByQueue, Vec<u64>) {
        let mut by_queue: ByQueue = Vec::new();
        let mut unknown = Vec::new();
        let mut st = self.inner.lock();
        for id in ids {
            match st.deliveries.remove(id) {
                Some((q, seq)) => match by_queue.iter_mut().find(|(bq, _)| Arc::ptr_eq(bq, &q)) {
                    Some((_, list)) => list.push((*id, seq)),
                    None => by_queue.push((q, vec![(*id, seq)])),
                },
                None => unknown.push(*id),
            }
        }
        (by_queue, unknown)
    }

    /// Acks deliveries: their messages are removed from their queues. Ids that are not
    /// outstanding on this session (unknown, already acked, or taken back after an
    /// ack timeout) are reported in `UnknownDelivery`; the others are still acked.
    pub async fn ack(&self, ids: &[u64]) -> Result<(), QueueError> {
        let (by_queue, mut unknown) = self.take(ids);
        for (q, list) in by_queue {
            unknown.extend(q.ack(self.inner.id, &list));
        }
        unknown_result(unknown)
    }

    /// Returns deliveries to their queues: after `delay` if given, else after the
    /// queue's backoff for their attempt. A message that has had `max_deliveries`
    /// deliveries goes to the dead-letter queue instead. Unknown ids as for `ack`.
    pub async fn nack(&self, ids: &[u64], delay: Option<Duration>) -> Result<(), QueueError> {
        let how = match delay {
            Some(d) => Requeue::After(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            None => Requeue::Backoff,
        };
        let (by_queue, mut unknown) = self.take(ids);
        for (q, list) in by_queue {
            let (bad, outbox): (Vec<u64>, Vec<DeadLetterMove>) = q.nack(self.inner.id, &list, how);
            unknown.extend(bad);
            self.engine.move_dead_letters(&q, outbox);
        }
        unknown_result(unknown)
    }
}

fn unknown_result(mut ids: Vec<u64>) -> Result<(), QueueError> {
    if ids.is_empty() {
        Ok(())
    } else {
        ids.sort_unstable();
        Err(QueueError::UnknownDelivery { ids })
    }
}

impl Drop for QueueSession {
    fn drop(&mut self) {
        let consumers = {
            let mut st = self.inner.lock();
            st.closed = true;
            st.deliveries.clear();
            std::mem::take(&mut st.consumers)
        };
        for (consumer_id, q) in consumers {
            let outbox = q.remove_consumer(self.inner.id, consumer_id);
            self.engine.move_dead_letters(&q, outbox);
        }
    }
}
