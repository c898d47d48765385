//! Counting which sequence numbers arrived: missing, duplicated and foreign messages.
//!
//! A lock-free bitset so that several receivers (competing consumers) can share one
//! tracker without contending on a lock for every message.

use std::sync::atomic::{AtomicU64, Ordering};

/// One bit per expected sequence number `0..expected`.
pub struct SeqTracker {
    bits: Vec<AtomicU64>,
    expected: u64,
    unique: AtomicU64,
    duplicates: AtomicU64,
    foreign: AtomicU64,
}

/// What a tracker saw, once receiving is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tally {
    /// Distinct expected sequence numbers received.
    pub unique: u64,
    /// Expected sequence numbers that never arrived.
    pub missing: u64,
    /// Arrivals of a sequence number already seen.
    pub duplicates: u64,
    /// Payloads that were not ours: too short, or a sequence number out of range.
    pub foreign: u64,
}

impl SeqTracker {
    /// A tracker expecting sequence numbers `0..expected`.
    pub fn new(expected: u64) -> SeqTracker {
        let words = usize::try_from(expected.div_ceil(64)).unwrap_or(usize::MAX);
        SeqTracker {
            bits: (0..words).map(|_| AtomicU64::new(0)).collect(),
            expected,
            unique: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            foreign: AtomicU64::new(0),
        }
    }

    /// Records one arrival; returns true when it was the first of its sequence number.
    pub fn record(&self, seq: u64) -> bool {
        let Some(word) = usize::try_from(seq / 64)
            .ok()
            .and_then(|w| self.bits.get(w))
            .filter(|_| seq < self.expected)
        else {
            self.foreign.fetch_add(1, Ordering::Relaxed);
            return false;
        };
        let mask = 1u64 << (seq % 64);
        if word.fetch_or(mask, Ordering::Relaxed) & mask == 0 {
            self.unique.fetch_add(1, Ordering::Relaxed);
            true
        } else {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
            false
        }
    }

    /// Records a payload too short to carry a sequence number.
    pub fn record_foreign(&self) {
        self.foreign.fetch_add(1, Ordering::Relaxed);
    }

    /// True once every expected sequence number has arrived at least once.
    pub fn complete(&self) -> bool {
        self.unique.load(Ordering::Relaxed) >= self.expected
    }

    /// The counts as they stand now.
    pub fn tally(&self) -> Tally {
        let unique = self.unique.load(Ordering::Relaxed);
        Tally {
            unique,
            missing: self.expected.saturating_sub(unique),
            duplicates: self.duplicates.load(Ordering::Relaxed),
            foreign: self.foreign.load(Ordering::Relaxed),
        }
    }
}

impl Tally {
    /// Adds another receiver's tally (fan-out: every subscriber expects every message).
    pub fn add(&mut self, other: Tally) {
        self.unique += other.unique;
        self.missing += other.missing;
        self.duplicates += other.duplicates;
        self.foreign += other.foreign;
    }

    /// True when nothing was lost, doubled or foreign.
    #[cfg(test)]
    pub fn clean(&self) -> bool {
        self.missing == 0 && self.duplicates == 0 && self.foreign == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_missing_and_duplicates() {
        let t = SeqTracker::new(130);
        for seq in 0..130 {
            if seq != 7 && seq != 129 {
                assert!(t.record(seq));
            }
        }
        assert!(!t.record(3));
        assert!(!t.record(3));
        assert!(!t.complete());
        let tally = t.tally();
        assert_eq!(tally.unique, 128);
        assert_eq!(tally.missing, 2);
        assert_eq!(tally.duplicates, 2);
        assert_eq!(tally.foreign, 0);
        assert!(!tally.clean());
        assert!(t.record(7) && t.record(129));
        assert!(t.complete());
    }

    #[test]
    fn out_of_range_is_foreign_not_a_panic() {
        let t = SeqTracker::new(10);
        assert!(!t.record(10));
        assert!(!t.record(u64::MAX));
        t.record_foreign();
        assert_eq!(t.tally().foreign, 3);
        assert_eq!(t.tally().missing, 10);
    }

    #[test]
    fn shared_between_threads() {
        let t = std::sync::Arc::new(SeqTracker::new(10_000));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let t = t.clone();
                std::thread::spawn(move || (0..10_000).for_each(|s| _ = t.record(s)))
            })
            .collect();
        handles
            .into_iter()
            .for_each(|h| h.join().expect("no panic"));
        let tally = t.tally();
        assert_eq!(tally.unique, 10_000);
        assert_eq!(tally.duplicates, 30_000);
        assert!(t.complete());
    }

    #[test]
    fn empty_run_is_complete() {
        assert!(SeqTracker::new(0).complete());
        assert!(SeqTracker::new(0).tally().clean());
    }
}
