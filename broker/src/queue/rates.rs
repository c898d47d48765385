//! `Stats`: a queue's counters since start and its per-second rates, kept in
//! one-second buckets filled as events happen, so an idle queue needs no timer.

/// Seconds a rate covers: the last this many whole seconds before the current one.
const RATE_SECONDS: u64 = 5;
const BUCKETS: usize = 6;
const _: () = assert!(BUCKETS as u64 == RATE_SECONDS + 1);

/// Events counted per second.
#[derive(Default, Clone, Copy)]
struct Bucket {
    second: u64,
    published: u64,
    delivered: u64,
    acked: u64,
}

/// Which rate an event feeds.
#[derive(Clone, Copy)]
pub(crate) enum Event {
    Published,
    Delivered,
    Acked,
}

#[derive(Default)]
pub(crate) struct Stats {
    pub published: u64,
    pub delivered: u64,
    pub acked: u64,
    pub dead_lettered: u64,
    pub rejected: u64,
    pub dropped: u64,
    pub expired: u64,
    pub duplicates: u64,
    /// Deliveries with an attempt number above 1.
    pub redelivered: u64,
    buckets: [Bucket; BUCKETS],
}

impl Stats {
    /// Counts one event at wall-clock `now_ms`.
    pub fn count(&mut self, event: Event, now_ms: u64) {
        let second = now_ms / 1000;
        let b = &mut self.buckets[usize::try_from(second % BUCKETS as u64).unwrap_or(0)];
        if b.second != second {
            *b = Bucket {
                second,
                ..Bucket::default()
            };
        }
        match event {
            Event::Published => {
                self.published += 1;
                b.published += 1;
            }
            Event::Delivered => {
                self.delivered += 1;
                b.delivered += 1;
            }
            Event::Acked => {
                self.acked += 1;
                b.acked += 1;
            }
        }
    }

    /// Publishes, deliveries and acks per second over the last [`RATE_SECONDS`]
    /// whole seconds before `now_ms`.
    pub fn rates(&self, now_ms: u64) -> (u64, u64, u64) {
        let current = now_ms / 1000;
        let window = current.saturating_sub(RATE_SECONDS)..current;
        let (mut p, mut d, mut a) = (0, 0, 0);
        for b in &self.buckets {
            if window.contains(&b.second) {
                p += b.published;
                d += b.delivered;
                a += b.acked;
            }
        }
        (p / RATE_SECONDS, d / RATE_SECONDS, a / RATE_SECONDS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_cover_the_last_whole_seconds() {
        let mut s = Stats::default();
        for ms in (10_000..15_000).step_by(10) {
            s.count(Event::Published, ms);
        }
        s.count(Event::Acked, 15_500);
        // 500 publishes over seconds 10..15, read during second 15.
        assert_eq!(s.rates(15_900), (100, 0, 0));
        // Second 16 sees 11..16: 400 publishes and the ack.
        assert_eq!(s.rates(16_000), (80, 0, 0));
        assert_eq!(s.rates(60_000), (0, 0, 0));
        assert_eq!(s.published, 500);
    }
}
