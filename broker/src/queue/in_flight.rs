//! `InFlight`: the deliveries of one queue that consumers hold and have not yet
//! acked or nacked, with their ack deadlines; and `Consumers`, the queue's
//! consumers with their credit, served round-robin.

use std::collections::BTreeSet;

// Message seqs the broker assigns: a fast hash is enough (no client picks them).
use foldhash::HashMap;
use std::sync::Arc;

use crate::queue::link::SessionLink;
use crate::queue::record::Message;
use crate::storage::Slot;

/// One outstanding delivery.
pub(crate) struct Delivered {
    pub msg: Message,
    pub slot: Slot,
    pub link: Arc<SessionLink>,
    pub consumer_id: u32,
    pub delivery_id: u64,
    pub deadline: u64,
}

/// Outstanding deliveries by message seq, and their ack deadlines.
#[derive(Default)]
pub(crate) struct InFlight {
    by_seq: HashMap<u64, Delivered>,
    deadlines: BTreeSet<(u64, u64)>,
    bytes: u64,
}

impl InFlight {
    pub fn insert(&mut self, seq: u64, d: Delivered) {
        self.deadlines.insert((d.deadline, seq));
        self.bytes += d.msg.size();
        self.by_seq.insert(seq, d);
    }

    /// Whether `seq` is out as delivery `delivery_id` of session `session_id`.
    pub fn is_out(&self, seq: u64, session_id: u64, delivery_id: u64) -> bool {
        self.by_seq
            .get(&seq)
            .is_some_and(|d| d.link.id == session_id && d.delivery_id == delivery_id)
    }

    pub fn remove(&mut self, seq: u64) -> Option<Delivered> {
        let d = self.by_seq.remove(&seq)?;
        self.deadlines.remove(&(d.deadline, seq));
        self.bytes = self.bytes.saturating_sub(d.msg.size());
        Some(d)
    }

    /// The seq of a delivery whose ack deadline is at or before `now`.
    pub fn overdue(&self, now: u64) -> Option<u64> {
        self.deadlines
            .first()
            .filter(|(deadline, _)| *deadline <= now)
            .map(|(_, seq)| *seq)
    }

    pub fn next_deadline(&self) -> Option<u64> {
        self.deadlines.first().map(|(d, _)| *d)
    }

    /// Seqs held by one consumer, in seq order.
    pub fn held_by(&self, session_id: u64, consumer_id: u32) -> Vec<u64> {
        let mut held: Vec<u64> = self
            .by_seq
            .iter()
            .filter(|(_, d)| d.link.id == session_id && d.consumer_id == consumer_id)
            .map(|(seq, _)| *seq)
            .collect();
        held.sort_unstable();
        held
    }

    pub fn len(&self) -> usize {
        self.by_seq.len()
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Everything out, for a queue being deleted.
    pub fn drain(&mut self) -> impl Iterator<Item = Delivered> + '_ {
        self.deadlines.clear();
        self.bytes = 0;
        self.by_seq.drain().map(|(_, d)| d)
    }
}

/// One consumer of a queue.
pub(crate) struct Consumer {
    pub link: Arc<SessionLink>,
    pub id: u32,
    /// Deliveries it may hold at once (its credit, capped by the engine).
    pub window: u32,
    pub outstanding: u32,
    /// Deliveries it may still get in all (CONSUME's `limit`), `None` unlimited.
    pub remaining: Option<u32>,
    /// False once its connection stopped taking deliveries.
    pub alive: bool,
}

impl Consumer {
    /// Deliveries it may have outstanding at once: its window, or fewer if it asked
    /// for only so many more; none once it is gone.
    fn credit(&self) -> u32 {
        if self.alive {
            self.remaining
                .map_or(self.window, |left| self.window.min(left))
        } else {
            0
        }
    }

    fn available(&self) -> u32 {
        self.credit()
            .min(self.window.saturating_sub(self.outstanding))
    }
}

/// A queue's consumers, served round-robin by available credit.
#[derive(Default)]
pub(crate) struct Consumers {
    list: Vec<Consumer>,
    next: usize,
}

impl Consumers {
    pub fn add(&mut self, c: Consumer) {
        self.list.push(c);
    }

    /// Every attached consumer, in attach order.
    pub fn iter(&self) -> impl Iterator<Item = &Consumer> {
        self.list.iter()
    }

    /// Index of the next consumer with credit.
    pub fn pick(&mut self) -> Option<usize> {
        let n = self.list.len();
        for i in 0..n {
            let idx = (self.next + i) % n;
            if self.list[idx].available() > 0 {
                self.next = (idx + 1) % n;
                return Some(idx);
            }
        }
        None
    }

    pub fn get_mut(&mut self, idx: usize) -> Option<&mut Consumer> {
        self.list.get_mut(idx)
    }

    pub fn find(&mut self, session_id: u64, id: u32) -> Option<&mut Consumer> {
        self.list
            .iter_mut()
            .find(|c| c.link.id == session_id && c.id == id)
    }

    /// One delivery of this consumer is done: its credit comes back.
    pub fn returned(&mut self, session_id: u64, id: u32) {
        if let Some(c) = self.find(session_id, id) {
            c.outstanding = c.outstanding.saturating_sub(1);
        }
    }

    pub fn remove(&mut self, session_id: u64, id: u32) -> bool {
        let before = self.list.len();
        self.list
            .retain(|c| !(c.link.id == session_id && c.id == id));
        self.list.len() != before
    }

    /// Credit left across all consumers.
    pub fn total_available(&self) -> usize {
        self.list
            .iter()
            .map(|c| usize::try_from(c.available()).unwrap_or(usize::MAX))
            .fold(0, usize::saturating_add)
    }

    /// Credit the live consumers have in all, outstanding deliveries included.
    pub fn total_credit(&self) -> usize {
        self.list
            .iter()
            .map(|c| usize::try_from(c.credit()).unwrap_or(usize::MAX))
            .fold(0, usize::saturating_add)
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn drain(&mut self) -> Vec<Consumer> {
        self.next = 0;
        std::mem::take(&mut self.list)
    }
}
