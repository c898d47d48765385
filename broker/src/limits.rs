//! `Limits`: how much one client may make the broker hold, each a flag with a
//! default. A refusal is ERROR `LimitExceeded` whose message names the limit's flag
//! ([`Limits::exceeded`]); the connection stays open.

use clap::Args;

use crate::config::parse_size;

/// Per-connection and broker-wide limits.
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct Limits {
    /// Subscriptions one connection may hold at once [default: 10000].
    #[arg(
        long,
        env = "TIDINGS_MAX_SUBSCRIPTIONS",
        default_value_t = 10_000,
        hide_default_value = true
    )]
    pub max_subscriptions: usize,

    /// Queues the broker holds; declaring one more is refused [default: 10000].
    #[arg(
        long,
        env = "TIDINGS_MAX_QUEUES",
        default_value_t = 10_000,
        hide_default_value = true
    )]
    pub max_queues: usize,

    /// Binding patterns one queue may have [default: 1000].
    #[arg(
        long,
        env = "TIDINGS_MAX_BINDINGS",
        default_value_t = 1_000,
        hide_default_value = true
    )]
    pub max_bindings: usize,

    /// Consumers one connection may have at once [default: 1000].
    #[arg(
        long,
        env = "TIDINGS_MAX_CONSUMERS",
        default_value_t = 1_000,
        hide_default_value = true
    )]
    pub max_consumers: usize,

    /// Bytes of headers (keys plus values) one message may carry [default: 16KiB].
    #[arg(long, env = "TIDINGS_MAX_HEADER_BYTES", default_value = "16KiB", hide_default_value = true, value_parser = parse_size)]
    pub max_header_bytes: usize,

    /// Longest message id (deduplication key) in bytes [default: 256].
    #[arg(
        long,
        env = "TIDINGS_MAX_MESSAGE_ID_LEN",
        default_value_t = 256,
        hide_default_value = true
    )]
    pub max_message_id_len: usize,

    /// Requests (publishes awaiting a confirm, queue operations) one connection
    /// may have unanswered; past it the connection stops reading until answers go
    /// out [default: 4096].
    #[arg(
        long,
        env = "TIDINGS_MAX_PENDING_REQUESTS",
        default_value_t = 4096,
        hide_default_value = true
    )]
    pub max_pending_requests: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_subscriptions: 10_000,
            max_queues: 10_000,
            max_bindings: 1_000,
            max_consumers: 1_000,
            max_header_bytes: 16 * 1024,
            max_message_id_len: 256,
            max_pending_requests: 4096,
        }
    }
}

/// Largest `--max-header-bytes`: headers must fit the frame overhead beside the
/// topic and fixed fields.
pub const MAX_HEADER_BYTES_LIMIT: usize = 48 * 1024;

impl Limits {
    /// The text of a LimitExceeded error: which limit, its value, what was asked.
    ///
    /// ```
    /// let text = tidings_broker::Limits::exceeded("max-subscriptions", 10, "subscriptions on this connection");
    /// assert_eq!(text, "limit `max-subscriptions` (10) reached: subscriptions on this connection");
    /// ```
    pub fn exceeded(flag: &str, limit: usize, what: &str) -> String {
        format!("limit `{flag}` ({limit}) reached: {what}")
    }

    /// Sets one setting from its text form (config file), if it is one of these.
    pub(crate) fn set(&mut self, id: &str, raw: &str) -> Option<Result<(), String>> {
        let num = |raw: &str| raw.parse::<usize>().map_err(|e| e.to_string());
        let result = match id {
            "max_subscriptions" => num(raw).map(|v| self.max_subscriptions = v),
            "max_queues" => num(raw).map(|v| self.max_queues = v),
            "max_bindings" => num(raw).map(|v| self.max_bindings = v),
            "max_consumers" => num(raw).map(|v| self.max_consumers = v),
            "max_header_bytes" => parse_size(raw).map(|v| self.max_header_bytes = v),
            "max_message_id_len" => num(raw).map(|v| self.max_message_id_len = v),
            "max_pending_requests" => num(raw).map(|v| self.max_pending_requests = v),
            _ => return None,
        };
        Some(result)
    }

    /// Checks ranges: every limit at least 1, headers within the frame overhead.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let at_least_one = [
            ("max-subscriptions", self.max_subscriptions),
            ("max-queues", self.max_queues),
            ("max-bindings", self.max_bindings),
            ("max-consumers", self.max_consumers),
            ("max-message-id-len", self.max_message_id_len),
            ("max-pending-requests", self.max_pending_requests),
        ];
        for (name, value) in at_least_one {
            if value == 0 {
                return Err((name, "must be at least 1".into()));
            }
        }
        if self.max_header_bytes > MAX_HEADER_BYTES_LIMIT {
            return Err(("max-header-bytes", "must be at most 48KiB".into()));
        }
        Ok(())
    }

    /// The file-form lines of these settings.
    pub(crate) fn toml_lines(&self, line: &mut dyn FnMut(&str, String)) {
        line("max-subscriptions", self.max_subscriptions.to_string());
        line("max-queues", self.max_queues.to_string());
        line("max-bindings", self.max_bindings.to_string());
        line("max-consumers", self.max_consumers.to_string());
        line("max-header-bytes", self.max_header_bytes.to_string());
        line("max-message-id-len", self.max_message_id_len.to_string());
        line(
            "max-pending-requests",
            self.max_pending_requests.to_string(),
        );
    }
}
