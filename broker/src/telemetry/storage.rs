//! `StorageMetrics`: the sink the queue store reports its durability work to
//! (fsync latency, group-commit sizes, checkpoint time, failure), read by
//! `/metrics` and `/readyz`. Calls are cheap (an atomic or a short lock per commit
//! round, never per message) and never fail.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

/// What the queue store did, for operators. One per store; the store holds an
/// `Arc` of it through [`EngineConfig`](crate::queue::EngineConfig).
#[derive(Debug)]
pub struct StorageMetrics {
    /// Seconds per `fdatasync` round of the queue log.
    pub(crate) fsync_seconds: Histogram,
    /// Messages written per group-commit round.
    pub(crate) batch_messages: Histogram,
    /// Seconds per checkpoint (sled flush and sync).
    pub(crate) checkpoint_seconds: Histogram,
    /// Failed writes or syncs.
    pub(crate) failures: Counter,
    failed: AtomicBool,
    failure: Mutex<Option<String>>,
}

impl Default for StorageMetrics {
    fn default() -> Self {
        StorageMetrics {
            // 50 µs .. ~1.6 s: a good disk syncs in well under a millisecond, a busy
            // or networked one in tens.
            fsync_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            // 1 .. 32768 messages per round.
            batch_messages: Histogram::new(exponential_buckets(1.0, 2.0, 16)),
            // 1 ms .. ~16 s.
            checkpoint_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            failures: Counter::default(),
            failed: AtomicBool::new(false),
            failure: Mutex::new(None),
        }
    }
}

impl StorageMetrics {
    /// One `fdatasync` round of the queue log took `took`.
    pub fn fsync(&self, took: Duration) {
        self.fsync_seconds.observe(took.as_secs_f64());
    }

    /// One group-commit round wrote `messages` messages.
    pub fn batch(&self, messages: usize) {
        // Exact below 2^53, far beyond any round.
        #[allow(clippy::cast_precision_loss)]
        self.batch_messages.observe(messages as f64);
    }

    /// One checkpoint took `took`.
    pub fn checkpoint(&self, took: Duration) {
        self.checkpoint_seconds.observe(took.as_secs_f64());
    }

    /// A write or sync failed: the store is fail-stop from here on (no later
    /// confirm may succeed), so the broker is not ready. The first reason is kept.
    pub fn failed(&self, what: &str) {
        self.failures.inc();
        let mut failure = self.failure.lock().unwrap_or_else(PoisonError::into_inner);
        if failure.is_none() {
            *failure = Some(what.to_owned());
        }
        self.failed.store(true, Ordering::Relaxed);
    }

    /// Why storage failed, if it did.
    pub fn failure(&self) -> Option<String> {
        if !self.failed.load(Ordering::Relaxed) {
            return None;
        }
        self.failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}
