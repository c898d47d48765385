//! `SessionLink`: the part of a connection's consumer session that queues hold on
//! to, and the `DeliverySink` through which they reach the connection.
//!
//! Queues know a session only through this link, and the link knows queues only by
//! id, so neither module imports the other: `session.rs` (the connection-facing
//! API) sits above both.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

// Integer keys, seeded per process: the broker assigns delivery ids, and a client's
// consumer ids, bounded in number, only share its own connection's map.
use foldhash::HashMap;

use tidings_protocol::{ConsumerCancelled, Delivery};

/// Where a session's deliveries go: the connection's outbound queue.
pub trait DeliverySink: Send + Sync + 'static {
    /// Pushes a DELIVERY frame to the connection without blocking; returns false
    /// when the connection is gone (the delivery then stays outstanding until the
    /// session is dropped or its ack timeout passes).
    fn deliver(&self, delivery: Delivery) -> bool;

    /// Like [`DeliverySink::deliver`], but the connection may hold the frame until
    /// [`DeliverySink::release`], so that a batch of deliveries leaves in one
    /// write. The default sends at once.
    fn deliver_held(&self, delivery: Delivery) -> Held {
        if self.deliver(delivery) {
            Held::Sent
        } else {
            Held::Gone
        }
    }

    /// Sends what [`DeliverySink::deliver_held`] held. The default has nothing to
    /// send.
    fn release(&self) {}

    /// Tells the connection that the server ended one of its consumers (its queue
    /// was deleted). Called once per consumer, after which no delivery for it
    /// follows. The default drops the notice.
    fn cancelled(&self, notice: ConsumerCancelled) {
        let _ = notice;
    }
}

/// What [`DeliverySink::deliver_held`] did with a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// On its way; nothing owed.
    Sent,
    /// Queued and held: the first since the last release, so the caller must call
    /// [`DeliverySink::release`] once its batch is done.
    Owed,
    /// Queued and held behind an earlier one whose caller owes the release.
    Queued,
    /// The connection is gone.
    Gone,
}

/// Outstanding deliveries taken out of a link, grouped by queue id: `(qid,
/// [(delivery id, seq)])`.
pub(crate) type ByQueue = Vec<(u32, Vec<(u64, u64)>)>;

#[derive(Default)]
struct LinkState {
    /// Consumer id → id of the queue it consumes from.
    consumers: HashMap<u32, u32>,
    /// Outstanding deliveries: delivery id → (queue id, message seq).
    deliveries: HashMap<u64, (u32, u64)>,
    closed: bool,
}

/// One session as its queues see it.
pub(crate) struct SessionLink {
    pub id: u64,
    pub sink: std::sync::Arc<dyn DeliverySink>,
    next_delivery: AtomicU64,
    state: Mutex<LinkState>,
}

impl SessionLink {
    pub fn new(id: u64, sink: std::sync::Arc<dyn DeliverySink>) -> Self {
        Self {
            id,
            sink,
            next_delivery: AtomicU64::new(1),
            state: Mutex::new(LinkState::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, LinkState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a delivery about to be sent. Called under the queue's lock (queue →
    /// link is the lock order). `None` once the session is closed.
    pub fn register(&self, qid: u32, seq: u64) -> Option<u64> {
        let mut st = self.lock();
        if st.closed {
            return None;
        }
        let id = self.next_delivery.fetch_add(1, Ordering::Relaxed);
        st.deliveries.insert(id, (qid, seq));
        Some(id)
    }

    /// Drops a delivery the queue took back (ack timeout, queue deleted), so a late
    /// ack of it is reported as unknown and the map stays bounded by what is
    /// outstanding.
    pub fn forget(&self, delivery_id: u64) {
        self.lock().deliveries.remove(&delivery_id);
    }

    /// Takes the outstanding deliveries among `ids` out of the map, grouped by queue
    /// id in first-seen order; returns them and the ids that were not outstanding.
    pub fn take(&self, ids: &[u64]) -> (ByQueue, Vec<u64>) {
        let mut by_queue: ByQueue = Vec::new();
        let mut unknown = Vec::new();
        let mut st = self.lock();
        for id in ids {
            match st.deliveries.remove(id) {
                Some((qid, seq)) => match by_queue.iter_mut().find(|(q, _)| *q == qid) {
                    Some((_, list)) => list.push((*id, seq)),
                    None => by_queue.push((qid, vec![(*id, seq)])),
                },
                None => unknown.push(*id),
            }
        }
        (by_queue, unknown)
    }

    /// Claims `consumer_id` for queue `qid`; false if the id is taken or the
    /// session is closed.
    pub fn add_consumer(&self, consumer_id: u32, qid: u32) -> bool {
        let mut st = self.lock();
        if st.closed || st.consumers.contains_key(&consumer_id) {
            return false;
        }
        st.consumers.insert(consumer_id, qid);
        true
    }

    /// How many consumers the session has.
    pub fn consumer_count(&self) -> usize {
        self.lock().consumers.len()
    }

    /// The queue id of a consumer.
    pub fn consumer_queue(&self, consumer_id: u32) -> Option<u32> {
        self.lock().consumers.get(&consumer_id).copied()
    }

    /// Frees `consumer_id`; returns its queue id.
    pub fn remove_consumer(&self, consumer_id: u32) -> Option<u32> {
        self.lock().consumers.remove(&consumer_id)
    }

    /// Frees `consumer_id` if it still consumes from `qid` (the queue ended it).
    pub fn consumer_ended(&self, consumer_id: u32, qid: u32) -> bool {
        let mut st = self.lock();
        if st.consumers.get(&consumer_id) == Some(&qid) {
            st.consumers.remove(&consumer_id);
            true
        } else {
            false
        }
    }

    /// Closes the link: no more deliveries register. Returns its consumers.
    pub fn close(&self) -> Vec<(u32, u32)> {
        let mut st = self.lock();
        st.closed = true;
        st.deliveries.clear();
        st.consumers.drain().collect()
    }
}
