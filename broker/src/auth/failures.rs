//! `FailureLog`: authentication failures logged at most once per interval, with
//! the count of those folded into the next line, so a brute-force run cannot flood
//! the log (or the disk under it).

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;
use tracing::warn;

/// At most one failure line per this interval.
pub const LOG_INTERVAL: Duration = Duration::from_secs(1);

/// Rate-limited failure logging.
#[derive(Debug)]
pub struct FailureLog {
    interval: Duration,
    state: Mutex<LogState>,
}

#[derive(Debug)]
struct LogState {
    last_logged: Option<Instant>,
    /// Failures since the last line that were not logged.
    suppressed: u64,
    /// Every failure since start.
    total: u64,
}

impl Default for FailureLog {
    fn default() -> Self {
        Self::new(LOG_INTERVAL)
    }
}

impl FailureLog {
    /// A log that writes at most one line per `interval`.
    pub fn new(interval: Duration) -> Self {
        FailureLog {
            interval,
            state: Mutex::new(LogState {
                last_logged: None,
                suppressed: 0,
                total: 0,
            }),
        }
    }

    /// Records one failure; returns true when it was written to the log.
    pub fn record(&self, peer: Option<SocketAddr>, user: Option<&str>, reason: &str) -> bool {
        let now = Instant::now();
        let suppressed = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            state.total += 1;
            let due = state
                .last_logged
                .is_none_or(|last| now.duration_since(last) >= self.interval);
            if !due {
                state.suppressed += 1;
                return false;
            }
            state.last_logged = Some(now);
            std::mem::take(&mut state.suppressed)
        };
        let peer = peer.map(|p| p.to_string()).unwrap_or_default();
        warn!(
            %peer,
            user = user.unwrap_or(""),
            reason,
            suppressed_since_last = suppressed,
            "authentication failed"
        );
        true
    }

    /// Every failure recorded since start.
    pub fn total(&self) -> u64 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn one_line_per_interval() {
        let log = FailureLog::new(Duration::from_secs(1));
        let logged = (0..1000)
            .filter(|_| log.record(None, Some("u"), "wrong password"))
            .count();
        assert_eq!(logged, 1);
        tokio::time::advance(Duration::from_millis(1001)).await;
        assert!(log.record(None, None, "x"));
        assert!(!log.record(None, None, "x"));
        assert_eq!(log.total(), 1002);
    }
}
