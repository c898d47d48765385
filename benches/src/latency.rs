//! Latency recording in an HDR histogram (nanoseconds in, microseconds out).

use hdrhistogram::Histogram;

/// Highest latency recorded exactly: one hour. Anything slower saturates here.
const MAX_NS: u64 = 3_600_000_000_000;

/// One receiver's latencies; merge them with [`Latencies::merge`].
#[derive(Clone)]
pub struct Latencies {
    hist: Histogram<u64>,
}

/// The percentiles a report prints, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Percentiles {
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Largest recorded.
    pub max_us: f64,
}

impl Default for Latencies {
    fn default() -> Self {
        Latencies {
            // Three significant digits: 0.1 % error, about 200 KiB per histogram.
            hist: Histogram::new_with_bounds(1, MAX_NS, 3)
                .expect("static bounds are valid: 1 <= MAX_NS and 3 sigfigs"),
        }
    }
}

impl Latencies {
    /// Records one sample; zero and out-of-range values are clamped, never dropped.
    pub fn record_ns(&mut self, ns: u64) {
        self.hist.saturating_record(ns.clamp(1, MAX_NS));
    }

    /// Adds another receiver's samples.
    pub fn merge(&mut self, other: &Latencies) {
        // Same bounds on both sides, so `add` cannot fail; saturate rather than panic anyway.
        if self.hist.add(&other.hist).is_err() {
            for v in other.hist.iter_recorded() {
                self.hist
                    .saturating_record_n(v.value_iterated_to(), v.count_at_value());
            }
        }
    }

    /// Number of samples.
    #[cfg(test)]
    pub fn len(&self) -> u64 {
        self.hist.len()
    }

    /// The percentiles, or `None` when nothing was recorded.
    pub fn percentiles(&self) -> Option<Percentiles> {
        if self.hist.is_empty() {
            return None;
        }
        let us = |ns: u64| ns as f64 / 1_000.0;
        Some(Percentiles {
            p50_us: us(self.hist.value_at_quantile(0.50)),
            p90_us: us(self.hist.value_at_quantile(0.90)),
            p99_us: us(self.hist.value_at_quantile(0.99)),
            p999_us: us(self.hist.value_at_quantile(0.999)),
            max_us: us(self.hist.max()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut l = Latencies::default();
        for us in 1..=1000u64 {
            l.record_ns(us * 1_000);
        }
        let p = l.percentiles().expect("samples recorded");
        assert!((p.p50_us - 500.0).abs() <= 1.0, "{p:?}");
        assert!((p.p99_us - 990.0).abs() <= 1.0, "{p:?}");
        assert!((p.p999_us - 999.0).abs() <= 1.0, "{p:?}");
        assert!((p.max_us - 1000.0).abs() <= 1.0, "{p:?}");
    }

    #[test]
    fn merge_adds_samples_and_extremes_are_clamped() {
        let mut a = Latencies::default();
        let mut b = Latencies::default();
        a.record_ns(0);
        b.record_ns(u64::MAX);
        a.merge(&b);
        assert_eq!(a.len(), 2);
        let p = a.percentiles().expect("two samples");
        assert!(p.max_us >= 3_599_000_000.0);
    }

    #[test]
    fn empty_has_no_percentiles() {
        assert_eq!(Latencies::default().percentiles(), None);
    }
}
