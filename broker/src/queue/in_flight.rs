//! `InFlight`: the deliveries of one queue that consumers hold and have not yet
//! acked or nacked, with their ack deadlines (the consumers are in consumers.rs).

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
