//! `RateHistory`: broker-wide message rates sampled every few seconds over the last
//! minutes, so the dashboard can chart them from its first load.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::Ctx;
use super::health::stat;

/// Time between samples.
pub(crate) const SAMPLE_EVERY: Duration = Duration::from_secs(2);
/// Samples kept: ten minutes.
const KEPT: usize = 300;

/// Per-second rates between two samples, stamped with the later one's time.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub(crate) struct RatePoint {
    /// Unix milliseconds.
    pub t: u64,
    /// Messages stored in queues per second.
    pub publish: f64,
    /// Queue deliveries per second.
    pub deliver: f64,
    /// Queue acks per second.
    pub ack: f64,
    /// PUBLISH frames received per second (pub/sub and queues).
    pub messages_in: f64,
    /// MESSAGE and DELIVERY frames sent per second.
    pub messages_out: f64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Totals {
    published: u64,
    delivered: u64,
    acked: u64,
    messages_in: u64,
    messages_out: u64,
}

/// The sampled history (bounded: [`KEPT`] points).
#[derive(Debug, Default)]
pub(crate) struct RateHistory {
    inner: Mutex<History>,
}

#[derive(Debug, Default)]
struct History {
    last: Option<(Instant, Totals)>,
    points: VecDeque<RatePoint>,
}

impl RateHistory {
    /// The points, oldest first.
    pub(crate) fn points(&self) -> Vec<RatePoint> {
        self.lock().points.iter().copied().collect()
    }

    fn record(&self, now: Instant, totals: Totals) {
        let mut h = self.lock();
        if let Some((then, before)) = h.last {
            let secs = now.duration_since(then).as_secs_f64();
            if secs > 0.0 {
                #[allow(clippy::cast_precision_loss)]
                let rate = |a: u64, b: u64| a.saturating_sub(b) as f64 / secs;
                let t = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
                let point = RatePoint {
                    t,
                    publish: rate(totals.published, before.published),
                    deliver: rate(totals.delivered, before.delivered),
                    ack: rate(totals.acked, before.acked),
                    messages_in: rate(totals.messages_in, before.messages_in),
                    messages_out: rate(totals.messages_out, before.messages_out),
                };
                if h.points.len() == KEPT {
                    h.points.pop_front();
                }
                h.points.push_back(point);
            }
        }
        h.last = Some((now, totals));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, History> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Samples until `stop`.
pub(super) async fn sample(ctx: Ctx, stop: CancellationToken) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let mut totals = Totals {
            messages_in: stat(&ctx, "messages.in"),
            messages_out: stat(&ctx, "messages.out"),
            ..Totals::default()
        };
        for q in ctx.engine.list() {
            totals.published += q.published;
            totals.delivered += q.delivered;
            totals.acked += q.acked;
        }
        ctx.rates.record(Instant::now(), totals);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_per_second_and_history_is_bounded() {
        let history = RateHistory::default();
        let start = Instant::now();
        history.record(start, Totals::default());
        assert!(history.points().is_empty());
        let totals = Totals {
            published: 20,
            ..Totals::default()
        };
        history.record(start + Duration::from_secs(2), totals);
        assert_eq!(history.points()[0].publish, 10.0);
        for i in 0..(KEPT as u64 + 10) {
            history.record(start + Duration::from_secs(4 + i), totals);
        }
        assert_eq!(history.points().len(), KEPT);
    }
}
