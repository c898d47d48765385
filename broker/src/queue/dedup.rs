//! `Dedup`: the message ids a queue has seen within its dedup window, bounded in
//! count and in bytes.
//!
//! An id is remembered for the queue's `dedup_window_ms` after it was stored, or
//! until the table is full: past [`EngineConfig::dedup_capacity`] ids or
//! [`EngineConfig::dedup_max_bytes`] bytes (each id costs its length plus
//! [`ID_OVERHEAD`]) the oldest ids are forgotten early, so a flood of unique ids
//! costs bounded memory and only weakens deduplication.
//!
//! [`EngineConfig::dedup_capacity`]: crate::queue::EngineConfig::dedup_capacity
//! [`EngineConfig::dedup_max_bytes`]: crate::queue::EngineConfig::dedup_max_bytes

use std::collections::{HashMap, VecDeque};

use tidings_protocol::Text;

/// Bytes an id costs in the table beyond its own length: its map slot, its place
/// in the expiry order and their timestamps.
pub const ID_OVERHEAD: u64 = 64;

#[derive(Default)]
pub(crate) struct Dedup {
    ids: HashMap<Text, u64>,
    order: VecDeque<(u64, Text)>,
    bytes: u64,
}

impl Dedup {
    /// Whether `id` was seen within `window` ms before `now`.
    pub fn seen(&self, id: &Text, now: u64, window: u64) -> bool {
        self.ids
            .get(id)
            .is_some_and(|seen| now < seen.saturating_add(window))
    }

    /// Remembers `id` as seen at `now`.
    pub fn insert(&mut self, id: Text, now: u64) {
        self.bytes += cost(&id);
        self.ids.insert(id.clone(), now);
        self.order.push_back((now, id));
    }

    /// Forgets `id` if it was last seen at `seen_ms` (its publish failed to commit,
    /// so a retry must not be answered as a duplicate of nothing).
    pub fn forget(&mut self, id: &Text, seen_ms: u64) {
        if self.ids.get(id) == Some(&seen_ms) {
            self.ids.remove(id);
            // Its place in `order` goes when it reaches the front (`prune` skips ids
            // no longer in the map); its bytes are counted until then.
        }
    }

    /// Forgets ids past their window, and the oldest ones while over the bounds.
    /// Returns the ids forgotten, for the store to drop too.
    pub fn prune(&mut self, now: u64, window: u64, max_ids: usize, max_bytes: u64) -> Vec<Text> {
        let mut gone = Vec::new();
        while let Some((ts, _)) = self.order.front() {
            let expired = now >= ts.saturating_add(window);
            if !expired && self.order.len() <= max_ids && self.bytes <= max_bytes {
                break;
            }
            let Some((ts, id)) = self.order.pop_front() else {
                break;
            };
            self.bytes = self.bytes.saturating_sub(cost(&id));
            // The id may have been seen again since; only the latest sighting counts.
            if self.ids.get(&id) == Some(&ts) {
                self.ids.remove(&id);
                gone.push(id);
            }
        }
        gone
    }

    /// When the oldest id expires, if any is remembered.
    pub fn next_expiry(&self, window: u64) -> Option<u64> {
        self.order.front().map(|(ts, _)| ts.saturating_add(window))
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn clear(&mut self) {
        *self = Dedup::default();
    }
}

fn cost(id: &Text) -> u64 {
    id.len() as u64 + ID_OVERHEAD
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_in_bytes_and_expires() {
        let mut d = Dedup::default();
        for i in 0..100 {
            d.insert(Text::from(format!("id-{i:04}")), 10);
        }
        let per = 7 + ID_OVERHEAD;
        let gone = d.prune(10, 1000, 1_000_000, per * 10);
        assert_eq!(gone.len(), 90);
        assert_eq!(d.len(), 10);
        assert!(d.bytes() <= per * 10);
        assert!(d.seen(&Text::from("id-0099"), 11, 1000));
        assert!(!d.seen(&Text::from("id-0000"), 11, 1000));
        assert_eq!(d.prune(1010, 1000, 1_000_000, u64::MAX).len(), 10);
        assert_eq!(d.bytes(), 0);
    }
}
