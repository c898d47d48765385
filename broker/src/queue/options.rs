//! `Settings`: a queue's options with the defaults filled in, validated, compared for
//! re-declares and serialised for the store.

use serde::{Deserialize, Serialize};
use tidings_protocol::{Overflow, QueueOptions, Topic};

use crate::queue::config::QueueDefaults;
use crate::queue::error::QueueError;

/// Resolved options of one queue. Bindings are kept apart: they change through
/// bind/unbind, so a re-declare adds its bindings instead of comparing them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Settings {
    pub max_deliveries: u32,
    pub ack_timeout_ms: u64,
    pub backoff_ms: Vec<u64>,
    pub max_length: Option<u64>,
    pub max_bytes: Option<u64>,
    /// `true` for drop-head, `false` for reject-publish.
    pub drop_head: bool,
    pub ttl_ms: Option<u64>,
    pub dedup_window_ms: u64,
    pub dead_letter: String,
}

impl Settings {
    /// Fills in defaults and validates.
    pub fn resolve(
        name: &str,
        options: &QueueOptions,
        defaults: &QueueDefaults,
    ) -> Result<Self, QueueError> {
        Topic::validate(name)
            .map_err(|e| QueueError::InvalidQueue(format!("name `{name}`: {e}")))?;
        let max_deliveries = options.max_deliveries.unwrap_or(defaults.max_deliveries);
        if max_deliveries == 0 {
            return Err(QueueError::InvalidQueue(
                "max_deliveries must be at least 1".into(),
            ));
        }
        let ack_timeout_ms = options
            .ack_timeout_ms
            .unwrap_or(u64::try_from(defaults.ack_timeout.as_millis()).unwrap_or(u64::MAX));
        if ack_timeout_ms == 0 {
            return Err(QueueError::InvalidQueue(
                "ack_timeout_ms must be at least 1".into(),
            ));
        }
        let dead_letter = match &options.dead_letter {
            Some(dl) => {
                Topic::validate(dl)
                    .map_err(|e| QueueError::InvalidQueue(format!("dead_letter `{dl}`: {e}")))?;
                dl.to_string()
            }
            None => {
                let derived = format!("{name}.dlq");
                Topic::validate(&derived).map_err(|e| {
                    QueueError::InvalidQueue(format!(
                        "the name `{name}` is valid, but its default dead-letter queue `{name}.dlq` is not ({e}); name one that fits with the dead_letter option"
                    ))
                })?;
                derived
            }
        };
        if dead_letter == name {
            return Err(QueueError::InvalidQueue(
                "a queue cannot be its own dead-letter queue".into(),
            ));
        }
        Ok(Self {
            max_deliveries,
            ack_timeout_ms,
            backoff_ms: options.backoff_ms.clone().unwrap_or_default(),
            max_length: options.max_length,
            max_bytes: options.max_bytes,
            drop_head: options.overflow == Some(Overflow::DropHead),
            ttl_ms: options.ttl_ms.filter(|t| *t > 0),
            dedup_window_ms: options
                .dedup_window_ms
                .unwrap_or(u64::try_from(defaults.dedup_window.as_millis()).unwrap_or(u64::MAX)),
            dead_letter,
        })
    }

    /// Names the first option that differs, as `option: existing X, requested Y`.
    pub fn difference(&self, requested: &Settings) -> Option<String> {
        fn show<T: std::fmt::Debug>(field: &str, a: &T, b: &T) -> String {
            format!("{field}: existing {a:?}, requested {b:?}")
        }
        let overflow = |drop: bool| if drop { "drop-head" } else { "reject-publish" };
        let (a, b) = (self, requested);
        if a.max_deliveries != b.max_deliveries {
            return Some(show("max_deliveries", &a.max_deliveries, &b.max_deliveries));
        }
        if a.ack_timeout_ms != b.ack_timeout_ms {
            return Some(show("ack_timeout_ms", &a.ack_timeout_ms, &b.ack_timeout_ms));
        }
        if a.backoff_ms != b.backoff_ms {
            return Some(show("backoff_ms", &a.backoff_ms, &b.backoff_ms));
        }
        if a.max_length != b.max_length {
            return Some(show("max_length", &a.max_length, &b.max_length));
        }
        if a.max_bytes != b.max_bytes {
            return Some(show("max_bytes", &a.max_bytes, &b.max_bytes));
        }
        if a.drop_head != b.drop_head {
            return Some(show(
                "overflow",
                &overflow(a.drop_head),
                &overflow(b.drop_head),
            ));
        }
        if a.ttl_ms != b.ttl_ms {
            return Some(show("ttl_ms", &a.ttl_ms, &b.ttl_ms));
        }
        if a.dedup_window_ms != b.dedup_window_ms {
            return Some(show(
                "dedup_window_ms",
                &a.dedup_window_ms,
                &b.dedup_window_ms,
            ));
        }
        if a.dead_letter != b.dead_letter {
            return Some(show("dead_letter", &a.dead_letter, &b.dead_letter));
        }
        None
    }

    /// The options as QUEUE_DECLARE states them, every default filled in: declaring
    /// them again is a match. `max_length`, `max_bytes` and `ttl_ms` stay absent
    /// when unlimited.
    pub fn to_options(&self, bindings: Vec<tidings_protocol::Text>) -> QueueOptions {
        QueueOptions {
            bindings,
            max_deliveries: Some(self.max_deliveries),
            ack_timeout_ms: Some(self.ack_timeout_ms),
            backoff_ms: Some(self.backoff_ms.clone()),
            max_length: self.max_length,
            max_bytes: self.max_bytes,
            overflow: Some(if self.drop_head {
                Overflow::DropHead
            } else {
                Overflow::RejectPublish
            }),
            ttl_ms: self.ttl_ms,
            dedup_window_ms: Some(self.dedup_window_ms),
            dead_letter: Some(self.dead_letter.as_str().into()),
        }
    }

    /// Delay before redelivery after `deliveries` failed attempts (1 = first failure).
    pub fn backoff_after(&self, deliveries: u32) -> u64 {
        let Some(last) = self.backoff_ms.len().checked_sub(1) else {
            return 0;
        };
        let index = usize::try_from(deliveries.saturating_sub(1))
            .unwrap_or(usize::MAX)
            .min(last);
        self.backoff_ms[index]
    }
}

/// What the store keeps per queue definition.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct StoredDefinition {
    pub qid: u32,
    pub settings: Settings,
    pub bindings: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(o: QueueOptions) -> Result<Settings, QueueError> {
        Settings::resolve("orders", &o, &QueueDefaults::default())
    }

    #[test]
    fn defaults_fill_in_and_explicit_defaults_compare_equal() {
        let a = settings(QueueOptions::default()).unwrap();
        assert_eq!(a.max_deliveries, 5);
        assert_eq!(a.ack_timeout_ms, 30_000);
        assert_eq!(a.dead_letter, "orders.dlq");
        let b = settings(QueueOptions {
            max_deliveries: Some(5),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(a.difference(&b), None);
        let c = settings(QueueOptions {
            max_deliveries: Some(3),
            ..Default::default()
        })
        .unwrap();
        let diff = a.difference(&c).unwrap();
        assert!(diff.contains("max_deliveries"), "{diff}");
    }

    #[test]
    fn invalid_options_are_refused() {
        assert!(Settings::resolve("a..b", &QueueOptions::default(), &Default::default()).is_err());
        assert!(
            settings(QueueOptions {
                max_deliveries: Some(0),
                ..Default::default()
            })
            .is_err()
        );
        assert!(
            settings(QueueOptions {
                dead_letter: Some("orders".into()),
                ..Default::default()
            })
            .is_err()
        );
    }

    #[test]
    fn a_name_whose_default_dead_letter_queue_is_too_long_says_so() {
        let name = "a".repeat(1022);
        let err = settings_named(&name, QueueOptions::default()).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("default dead-letter queue"), "{text}");
        assert!(text.contains("dead_letter option"), "{text}");
        let ok = settings_named(
            &name,
            QueueOptions {
                dead_letter: Some("short.dlq".into()),
                ..Default::default()
            },
        );
        assert_eq!(ok.unwrap().dead_letter, "short.dlq");
    }

    fn settings_named(name: &str, o: QueueOptions) -> Result<Settings, QueueError> {
        Settings::resolve(name, &o, &QueueDefaults::default())
    }

    #[test]
    fn backoff_repeats_its_last_entry() {
        let s = settings(QueueOptions {
            backoff_ms: Some(vec![10, 20, 30]),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            [1, 2, 3, 4, 9].map(|n| s.backoff_after(n)),
            [10, 20, 30, 30, 30]
        );
        assert_eq!(
            settings(QueueOptions::default()).unwrap().backoff_after(3),
            0
        );
    }
}
