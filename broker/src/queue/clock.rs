//! The engine's clock: wall-clock milliseconds, since due times and publish times
//! are stored and must mean the same after a restart. Tests can drive it by hand
//! ([`ManualClock`]) so that timeouts, delays and TTLs happen exactly when a test
//! says, with no real waiting.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Notify;

/// Wall-clock milliseconds since the Unix epoch.
fn system_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A clock that moves only when told to, for deterministic tests of timeouts,
/// delays and TTLs. Give it to [`EngineConfig::clock`](crate::queue::EngineConfig);
/// clones share one time.
///
/// ```
/// use tidings_broker::queue::ManualClock;
///
/// let clock = ManualClock::new(1_000);
/// clock.advance(250);
/// assert_eq!(clock.now_ms(), 1_250);
/// ```
#[derive(Debug, Clone)]
pub struct ManualClock {
    now: Arc<AtomicU64>,
    moved: Arc<Notify>,
}

impl ManualClock {
    /// A clock standing at `start_ms` (milliseconds since the Unix epoch).
    pub fn new(start_ms: u64) -> Self {
        Self {
            now: Arc::new(AtomicU64::new(start_ms)),
            moved: Arc::new(Notify::new()),
        }
    }

    /// The time it shows.
    pub fn now_ms(&self) -> u64 {
        self.now.load(Ordering::SeqCst)
    }

    /// Moves it forward; the engine's timer then runs whatever fell due.
    pub fn advance(&self, ms: u64) {
        self.now.fetch_add(ms, Ordering::SeqCst);
        self.moved.notify_one();
    }
}

/// The clock an engine and its queues read.
#[derive(Debug, Clone)]
pub(crate) enum Clock {
    System,
    Manual(ManualClock),
}

impl Clock {
    pub fn now_ms(&self) -> u64 {
        match self {
            Clock::System => system_now_ms(),
            Clock::Manual(c) => c.now_ms(),
        }
    }

    /// Resolves when a manual clock moves; never for the system clock (the timer
    /// sleeps on real time instead).
    pub async fn moved(&self) {
        match self {
            Clock::System => std::future::pending().await,
            Clock::Manual(c) => c.moved.notified().await,
        }
    }

    pub fn is_manual(&self) -> bool {
        matches!(self, Clock::Manual(_))
    }
}
