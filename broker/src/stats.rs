//! `Stats`: the broker's counters, shared by every connection and reported by the
//! STATS frame as named entries (`connections.current`, `messages.in`,
//! `errors.invalid_topic`, ...).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use tidings_protocol::{ErrorCode, Text};

/// Counters and gauges, updated with relaxed atomics: each is a statistic on its
/// own, and no code orders memory by them.
#[derive(Debug)]
pub struct Stats {
    started: Instant,
    connections_current: AtomicU64,
    connections_total: AtomicU64,
    connections_rejected: AtomicU64,
    messages_in: AtomicU64,
    messages_out: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    subscriptions: AtomicU64,
    slow_consumers: AtomicU64,
    pending_bytes_peak: AtomicU64,
    errors: Box<[AtomicU64]>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            started: Instant::now(),
            connections_current: AtomicU64::new(0),
            connections_total: AtomicU64::new(0),
            connections_rejected: AtomicU64::new(0),
            messages_in: AtomicU64::new(0),
            messages_out: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            subscriptions: AtomicU64::new(0),
            slow_consumers: AtomicU64::new(0),
            pending_bytes_peak: AtomicU64::new(0),
            errors: ErrorCode::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

fn widen(n: usize) -> u64 {
    // usize is at most 64 bits on every target we build for.
    n as u64
}

impl Stats {
    /// A connection was accepted and admitted.
    pub fn connection_opened(&self) {
        self.connections_current.fetch_add(1, Relaxed);
        self.connections_total.fetch_add(1, Relaxed);
    }

    /// An admitted connection ended.
    pub fn connection_closed(&self) {
        self.connections_current.fetch_sub(1, Relaxed);
    }

    /// A connection was refused at the connection limit.
    pub fn connection_rejected(&self) {
        self.connections_rejected.fetch_add(1, Relaxed);
    }

    /// A PUBLISH arrived.
    pub fn message_in(&self) {
        self.messages_in.fetch_add(1, Relaxed);
    }

    /// `n` MESSAGE or DELIVERY frames were queued for subscribers or consumers.
    pub fn messages_out(&self, n: usize) {
        self.messages_out.fetch_add(widen(n), Relaxed);
    }

    /// `n` bytes were read from a socket.
    pub fn bytes_in(&self, n: usize) {
        self.bytes_in.fetch_add(widen(n), Relaxed);
    }

    /// `n` bytes were written to a socket.
    pub fn bytes_out(&self, n: usize) {
        self.bytes_out.fetch_add(widen(n), Relaxed);
    }

    /// The number of subscriptions changed by `delta`.
    pub fn subscriptions_changed(&self, delta: i64) {
        if delta >= 0 {
            self.subscriptions.fetch_add(delta.unsigned_abs(), Relaxed);
        } else {
            self.subscriptions.fetch_sub(delta.unsigned_abs(), Relaxed);
        }
    }

    /// A connection was disconnected as a slow consumer.
    pub fn slow_consumer(&self) {
        self.slow_consumers.fetch_add(1, Relaxed);
    }

    /// Bytes queued for one connection reached `connection_total`.
    pub fn pending(&self, connection_total: usize) {
        let total = widen(connection_total);
        // Called per queued frame from every connection: read first, so the shared
        // cache line is written only when the peak actually moves.
        if total > self.pending_bytes_peak.load(Relaxed) {
            self.pending_bytes_peak.fetch_max(total, Relaxed);
        }
    }

    /// An ERROR frame with this code was sent (or, for a close, attempted).
    pub fn error(&self, code: ErrorCode) {
        if let Some(i) = ErrorCode::ALL.iter().position(|c| *c == code) {
            self.errors[i].fetch_add(1, Relaxed);
        }
    }

    /// How many ERROR frames with this code were sent.
    pub fn errors(&self, code: ErrorCode) -> u64 {
        ErrorCode::ALL
            .iter()
            .position(|c| *c == code)
            .map_or(0, |i| self.errors[i].load(Relaxed))
    }

    /// Every counter as `(name, value)`, in a stable order, for STATS_REPLY.
    ///
    /// `outbound.pending_bytes_peak` is the most bytes ever queued for a single
    /// connection: it shows that the slow-consumer bound holds.
    pub fn snapshot(&self) -> Vec<(Text, u64)> {
        let mut entries = vec![
            ("uptime.seconds", self.started.elapsed().as_secs()),
            (
                "connections.current",
                self.connections_current.load(Relaxed),
            ),
            ("connections.total", self.connections_total.load(Relaxed)),
            (
                "connections.rejected",
                self.connections_rejected.load(Relaxed),
            ),
            ("messages.in", self.messages_in.load(Relaxed)),
            ("messages.out", self.messages_out.load(Relaxed)),
            ("bytes.in", self.bytes_in.load(Relaxed)),
            ("bytes.out", self.bytes_out.load(Relaxed)),
            ("subscriptions.current", self.subscriptions.load(Relaxed)),
            (
                "connections.slow_consumers",
                self.slow_consumers.load(Relaxed),
            ),
            (
                "outbound.pending_bytes_peak",
                self.pending_bytes_peak.load(Relaxed),
            ),
        ]
        .into_iter()
        .map(|(name, value)| (Text::from(name), value))
        .collect::<Vec<_>>();
        for (code, count) in ErrorCode::ALL.iter().zip(self.errors.iter()) {
            let name = format!("errors.{}", snake_case(code.name()));
            entries.push((Text::from(name), count.load(Relaxed)));
        }
        entries
    }
}

/// `InvalidTopic` -> `invalid_topic`. `ErrorCode::name` gives the variant's name,
/// and stats (and the Prometheus error labels) use snake_case.
pub(crate) fn snake_case(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_names_are_snake_case() {
        assert_eq!(snake_case("InvalidTopic"), "invalid_topic");
        assert_eq!(snake_case("invalid_topic"), "invalid_topic");
        let stats = Stats::default();
        stats.error(ErrorCode::InvalidTopic);
        let snap = stats.snapshot();
        let get = |n: &str| snap.iter().find(|(k, _)| k.as_str() == n).map(|e| e.1);
        assert_eq!(get("errors.invalid_topic"), Some(1));
        assert_eq!(get("errors.too_many_connections"), Some(0));
    }
}
