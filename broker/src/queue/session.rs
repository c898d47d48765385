//! `ConsumerSession`: one connection's consumers and outstanding deliveries — the
//! consume / cancel / credit / ack / nack API of the connection layer.

use std::sync::Arc;
use std::time::Duration;

use crate::queue::delivery::Requeue;
use crate::queue::engine::EngineInner;
use crate::queue::error::QueueError;
use crate::queue::link::{DeliverySink, SessionLink};

/// One connection's view of the queues: its consumers and the deliveries it has not
/// yet acked. Dropping it cancels its consumers and makes all its unacked deliveries
/// available again at once (they keep their attempt count).
pub struct ConsumerSession {
    link: Arc<SessionLink>,
    engine: Arc<EngineInner>,
}

impl ConsumerSession {
    pub(crate) fn new(engine: Arc<EngineInner>, id: u64, sink: Arc<dyn DeliverySink>) -> Self {
        Self {
            link: Arc::new(SessionLink::new(id, sink)),
            engine,
        }
    }

    /// How many consumers this connection has (for `--max-consumers`).
    pub fn consumer_count(&self) -> usize {
        self.link.consumer_count()
    }

    /// Starts consumer `consumer_id` on `queue` with `credit` deliveries outstanding
    /// at most, capped at the engine's `max_credit`; returns the credit granted.
    /// Errors: `DuplicateConsumer`, `NotFound`, `InvalidArgument` (credit 0).
    pub fn consume(&self, consumer_id: u32, queue: &str, credit: u32) -> Result<u32, QueueError> {
        self.consume_limited(consumer_id, queue, credit, None)
    }

    /// [`ConsumerSession::consume`] for at most `limit` deliveries in all (`None`:
    /// unlimited); past it the consumer gets nothing more until cancelled.
    pub fn consume_limited(
        &self,
        consumer_id: u32,
        queue: &str,
        credit: u32,
        limit: Option<u32>,
    ) -> Result<u32, QueueError> {
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
        if !self.link.add_consumer(consumer_id, q.qid) {
            return Err(QueueError::DuplicateConsumer(consumer_id));
        }
        let granted = credit.min(self.engine.limits.max_credit);
        if !q.add_consumer(&self.link, consumer_id, granted, limit) {
            // Deleted between the lookup and now.
            self.link.remove_consumer(consumer_id);
            return Err(QueueError::NotFound(queue.to_owned()));
        }
        Ok(granted)
    }

    /// Stops a consumer; its unacked deliveries go back to the queue at once.
    pub fn cancel(&self, consumer_id: u32) -> Result<(), QueueError> {
        let qid = self
            .link
            .remove_consumer(consumer_id)
            .ok_or(QueueError::UnknownConsumer(consumer_id))?;
        if let Some(q) = self.engine.queue_by_id(qid) {
            q.remove_consumer(self.link.id, consumer_id);
            self.engine.move_departures(&q, q.take_departures());
        }
        Ok(())
    }

    /// This session's id, as [`QueueEngine::consumers`](crate::queue::QueueEngine::consumers)
    /// reports it.
    pub fn id(&self) -> u64 {
        self.link.id
    }

    /// Raises a consumer's credit by `credit`, up to the engine's `max_credit`;
    /// returns the consumer's window now.
    pub fn credit(&self, consumer_id: u32, credit: u32) -> Result<u32, QueueError> {
        if credit == 0 {
            return Err(QueueError::InvalidArgument(
                "credit must be at least 1".into(),
            ));
        }
        let unknown = QueueError::UnknownConsumer(consumer_id);
        let qid = self
            .link
            .consumer_queue(consumer_id)
            .ok_or(unknown.clone())?;
        let q = self.engine.queue_by_id(qid).ok_or(unknown.clone())?;
        q.add_credit(self.link.id, consumer_id, credit)
            .ok_or(unknown)
    }

    /// Acks deliveries: their messages are removed from their queues. Ids that are not
    /// outstanding on this session (unknown, already acked, or taken back after an
    /// ack timeout) are reported in `UnknownDelivery`; the others are still acked.
    pub fn ack(&self, ids: &[u64]) -> Result<(), QueueError> {
        let (by_queue, mut unknown) = self.link.take(ids);
        for (qid, list) in by_queue {
            match self.engine.queue_by_id(qid) {
                Some(q) => unknown.extend(q.ack(self.link.id, &list)),
                None => unknown.extend(list.iter().map(|(id, _)| *id)),
            }
        }
        unknown_result(unknown)
    }

    /// Returns deliveries to their queues: after `delay` if given, else after the
    /// queue's backoff for their attempt. A message that has had `max_deliveries`
    /// deliveries goes to the dead-letter queue instead. Unknown ids as for `ack`.
    pub fn nack(&self, ids: &[u64], delay: Option<Duration>) -> Result<(), QueueError> {
        let how = match delay {
            Some(d) => Requeue::After(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            None => Requeue::Backoff,
        };
        let (by_queue, mut unknown) = self.link.take(ids);
        for (qid, list) in by_queue {
            match self.engine.queue_by_id(qid) {
                Some(q) => {
                    unknown.extend(q.nack(self.link.id, &list, how));
                    // Dead letters are handed over now, not by the timer: the
                    // dead-letter queue exists when the NACK is answered.
                    self.engine.move_departures(&q, q.take_departures());
                }
                None => unknown.extend(list.iter().map(|(id, _)| *id)),
            }
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

impl Drop for ConsumerSession {
    fn drop(&mut self) {
        for (consumer_id, qid) in self.link.close() {
            if let Some(q) = self.engine.queue_by_id(qid) {
                q.remove_consumer(self.link.id, consumer_id);
                self.engine.move_departures(&q, q.take_departures());
            }
        }
    }
}
