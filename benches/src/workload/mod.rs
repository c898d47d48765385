//! The workloads, each generic over a [`Driver`](crate::driver::Driver), and what they share.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::control::RunControl;
use crate::driver::Publisher;
use crate::payload;

pub mod bursty;
pub mod fanin;
pub mod fanout;
pub mod latency;
pub mod queue;
pub mod reqrep;

/// Settings every workload shares.
#[derive(Debug, Clone)]
pub struct Common {
    /// Hard time limit of the measured part of a run.
    pub deadline: Duration,
    /// How long receivers wait for stragglers once the senders are done.
    pub drain: Duration,
    /// Makes topic and queue names unique to this run, so runs never see each other.
    pub run_id: String,
}

impl Common {
    /// Settings with a fresh run id.
    pub fn new(deadline: Duration, drain: Duration) -> Common {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        Common {
            deadline,
            drain,
            run_id: format!("{:x}{:08x}", std::process::id(), nanos),
        }
    }

    /// The topic a workload uses in this run: `bench.<workload>.<run id>`.
    pub fn topic(&self, workload: &str) -> String {
        format!("bench.{workload}.{}", self.run_id)
    }
}

/// Checks a message size: it must hold the sequence number and timestamp.
pub fn check_size(size: usize) -> Result<()> {
    if size < payload::HEADER_LEN {
        bail!(
            "--size {size} is too small: every message carries a {}-byte sequence number and timestamp",
            payload::HEADER_LEN
        );
    }
    if size > 16 * 1024 * 1024 {
        bail!("--size {size} is larger than 16 MiB, more than any system here accepts by default");
    }
    Ok(())
}

/// Splits `0..total` into `parts` contiguous ranges whose lengths differ by at most one.
pub fn split(total: u64, parts: usize) -> Vec<Range<u64>> {
    let parts = parts.max(1) as u64;
    let (base, extra) = (total / parts, total % parts);
    let mut start = 0;
    (0..parts)
        .map(|i| {
            let len = base + u64::from(i < extra);
            let range = start..start + len;
            start += len;
            range
        })
        .collect()
}

/// What one sending task did.
pub struct Sent {
    /// Messages handed to the system.
    pub count: u64,
    /// When it sent its first and finished (flushed) its last.
    pub started: Instant,
    /// See `started`.
    pub finished: Instant,
    /// Why it stopped early, if it did.
    pub error: Option<String>,
}

/// Publishes `seqs` as fast as the publisher takes them, then flushes; stops early
/// at the deadline or on stop.
pub async fn publish_range<P: Publisher>(
    mut publisher: P,
    seqs: Range<u64>,
    size: usize,
    ctl: Arc<RunControl>,
) -> Sent {
    let started = Instant::now();
    let mut count = 0;
    let mut error = None;
    for seq in seqs {
        // Checking the clock every message would cost more than some publishes.
        if seq % 1024 == 0 && (ctl.expired() || ctl.stop.is_cancelled()) {
            error = Some(format!("stopped by the deadline after {count} messages"));
            break;
        }
        if let Err(err) = publisher.publish(payload::encode(seq, size)).await {
            error = Some(format!("publish failed after {count} messages: {err:#}"));
            break;
        }
        count += 1;
    }
    if let Err(err) = publisher.flush().await {
        error.get_or_insert(format!("flush failed: {err:#}"));
    }
    Sent {
        count,
        started,
        finished: Instant::now(),
        error,
    }
}

/// Messages per second over all senders, from the first start to the last finish.
pub fn send_rate(sent: &[Sent]) -> f64 {
    let count: u64 = sent.iter().map(|s| s.count).sum();
    let start = sent.iter().map(|s| s.started).min();
    let end = sent.iter().map(|s| s.finished).max();
    match (start, end) {
        (Some(s), Some(e)) if e > s => count as f64 / (e - s).as_secs_f64(),
        _ => 0.0,
    }
}

/// Turns a task's join error into text (a panic in a driver must not hide the report).
pub fn joined<T>(result: Result<T, tokio::task::JoinError>) -> Result<T, String> {
    result.map_err(|e| format!("task failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_covers_everything_once() {
        assert_eq!(split(10, 3), vec![0..4, 4..7, 7..10]);
        assert_eq!(split(2, 4), vec![0..1, 1..2, 2..2, 2..2]);
        assert_eq!(split(5, 0), vec![0..5]);
        let total: u64 = split(1_000_001, 7).iter().map(|r| r.end - r.start).sum();
        assert_eq!(total, 1_000_001);
    }

    #[test]
    fn sizes_must_hold_the_header() {
        assert!(check_size(15).is_err());
        assert!(check_size(16).is_ok());
        assert!(check_size(128).is_ok());
        assert!(check_size(64 * 1024 * 1024).is_err());
    }

    #[test]
    fn topics_are_unique_per_run() {
        let c = Common::new(Duration::from_secs(1), Duration::from_secs(1));
        assert!(c.topic("fanin").starts_with("bench.fanin."));
        assert!(!c.topic("fanin").contains(' '));
    }
}
