//! `EngineConfig` and `FsyncPolicy`: where queues live, how hard they are made durable,
//! and the memory bounds of each queue.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

/// Default of [`EngineConfig::max_credit`].
pub const DEFAULT_MAX_CREDIT: u32 = 1024;
use crate::storage::StorageBackend;
use crate::telemetry::StorageMetrics;

/// When a write counts as durable, and so when a publisher confirm may go out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FsyncPolicy {
    /// Default. Every group commit is written to the queue log and `fdatasync`ed
    /// before any of its confirms go out. A confirmed message survives `kill -9`, a
    /// kernel crash and power loss (as far as the disk honours its flush command).
    #[default]
    Always,
    /// Confirm once the group commit is written to the queue log, which the operating
    /// system then holds, and `fdatasync` every interval. A confirmed message
    /// survives `kill -9` of the broker; a kernel crash or power loss loses the
    /// messages confirmed during the last interval.
    Interval(Duration),
    /// Confirm once written to the queue log, and never `fdatasync` (the index is
    /// still flushed at checkpoints). Survives `kill -9` of the broker; a kernel crash
    /// or power loss loses whatever the operating system had not written back.
    Never,
}

impl FromStr for FsyncPolicy {
    type Err = String;

    /// Parses `always`, `never` or `interval:MS` (MS a positive number of milliseconds).
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "always" => Ok(FsyncPolicy::Always),
            "never" => Ok(FsyncPolicy::Never),
            other => {
                let ms = other
                    .strip_prefix("interval:")
                    .and_then(|ms| ms.parse::<u64>().ok())
                    .filter(|ms| *ms > 0)
                    .ok_or_else(|| {
                        format!(
                            "unknown fsync policy `{other}` (expected always, never or interval:MS with MS > 0)"
                        )
                    })?;
                Ok(FsyncPolicy::Interval(Duration::from_millis(ms)))
            }
        }
    }
}

impl fmt::Display for FsyncPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FsyncPolicy::Always => f.write_str("always"),
            FsyncPolicy::Never => f.write_str("never"),
            FsyncPolicy::Interval(d) => write!(f, "interval:{}", d.as_millis()),
        }
    }
}

/// Values for the queue options a declare leaves out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueDefaults {
    /// Deliveries before a message is dead-lettered (5).
    pub max_deliveries: u32,
    /// Time a consumer has to ack a delivery (30 s).
    pub ack_timeout: Duration,
    /// How long message ids are remembered for deduplication (2 min).
    pub dedup_window: Duration,
}

impl Default for QueueDefaults {
    fn default() -> Self {
        Self {
            max_deliveries: 5,
            ack_timeout: Duration::from_secs(30),
            dedup_window: Duration::from_secs(120),
        }
    }
}

/// How the queue engine stores and caches messages.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Directory of the queue store: sled's files, and the queue log under `segments/`
    /// (created if missing). Nothing else may use it.
    pub data_dir: PathBuf,
    /// When writes count as durable.
    pub fsync: FsyncPolicy,
    /// Most ready messages each queue keeps in memory (4096); the rest are paged in
    /// from the store when consumers get to them.
    pub ready_window: usize,
    /// Most bytes of ready messages each queue keeps in memory (8 MiB), counted as
    /// [`MESSAGE_OVERHEAD`](crate::queue::MESSAGE_OVERHEAD) plus topic, headers and
    /// payload per message.
    pub ready_window_bytes: usize,
    /// Most delayed messages each queue keeps in memory, the next ones due (1024).
    pub delayed_window: usize,
    /// Most bytes of delayed messages each queue keeps in memory (4 MiB), counted
    /// like `ready_window_bytes`.
    pub delayed_window_bytes: usize,
    /// Most message ids each queue remembers for deduplication (100,000); past that
    /// the oldest ids are forgotten early.
    pub dedup_capacity: usize,
    /// Most bytes of message ids each queue remembers (8 MiB), each id counted as
    /// its length plus [`DEDUP_ID_OVERHEAD`](crate::queue::DEDUP_ID_OVERHEAD); past
    /// that the oldest ids are forgotten early.
    pub dedup_max_bytes: usize,
    /// Longest message id a publish to a queue may carry, in bytes (256): ids are
    /// kept in every queue's dedup table. The broker checks its own
    /// `--max-message-id-len` before a publish gets here; this is the engine's own
    /// bound for other embedders.
    pub max_message_id_len: usize,
    /// Most credit (deliveries outstanding at once) one consumer may have (1024);
    /// a CONSUME or CREDIT asking for more is clamped to it.
    pub max_credit: u32,
    /// Most bytes queued for the store's next round (they wait while the store syncs
    /// and answers the last one, or checkpoints) before publishes are refused with
    /// [`QueueError::Overloaded`](crate::queue::QueueError::Overloaded) (256 MiB).
    pub max_pending_bytes: usize,
    /// sled's page cache in bytes (64 MiB).
    pub cache_bytes: u64,
    /// Size at which a segment of the queue log is closed and the next one started
    /// (32 MiB). A segment is deleted only when every message in it is gone, so this
    /// is also how much disk one old unacked message can keep.
    pub segment_bytes: u64,
    /// How often the index (sled) is flushed, after which the log before the flush is
    /// needed no more (1 s). Bounds how much log a restart after a crash replays.
    pub checkpoint_interval: Duration,
    /// Defaults for queue options.
    pub defaults: QueueDefaults,
    /// A clock driven by hand, for deterministic tests; `None` (the default) is the
    /// system clock.
    pub clock: Option<crate::queue::ManualClock>,
    /// Where the log and the index live: the real file system and sled, unless a
    /// test simulates them.
    pub storage: StorageBackend,
    /// Repair mode: on damage in the queue log, cut the log there (reporting what was
    /// dropped) instead of refusing to start (`tidings-broker --repair`).
    pub repair: bool,
    /// Where the store reports fsync latency, commit sizes, checkpoints and
    /// failures (a fresh sink by default).
    pub metrics: Arc<StorageMetrics>,
}

impl EngineConfig {
    /// The defaults, storing in `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            fsync: FsyncPolicy::Always,
            ready_window: 4096,
            ready_window_bytes: 8 << 20,
            delayed_window: 1024,
            delayed_window_bytes: 4 << 20,
            dedup_capacity: 100_000,
            dedup_max_bytes: 8 << 20,
            max_message_id_len: 256,
            max_credit: DEFAULT_MAX_CREDIT,
            max_pending_bytes: 256 << 20,
            cache_bytes: 64 << 20,
            segment_bytes: 32 << 20,
            checkpoint_interval: Duration::from_secs(1),
            defaults: QueueDefaults::default(),
            clock: None,
            storage: StorageBackend::real(),
            repair: false,
            metrics: Arc::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fsync_policy_round_trips() {
        for s in ["always", "never", "interval:250"] {
            let p: FsyncPolicy = s.parse().unwrap();
            assert_eq!(p.to_string(), s);
        }
        assert!("interval:0".parse::<FsyncPolicy>().is_err());
        assert!("interval:x".parse::<FsyncPolicy>().is_err());
        assert!("sometimes".parse::<FsyncPolicy>().is_err());
    }
}
