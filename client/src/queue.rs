//! Durable queue management: `QueueConfig` and the declare, delete, bind, info,
//! list, dead-letter and redrive operations.

use std::time::Duration;

use tidings_protocol::{
    DeadLetters, Frame, Overflow, Pattern, QueueBind, QueueDeclare, QueueDelete, QueueInfo,
    QueueInfoRequest, QueueList, QueueOptions, QueueUnbind, Redrive, Text,
};

use crate::client::{Client, TimeoutKind};
use crate::consumer::expect_ok;
use crate::error::QueueError;

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A queue's name, bindings and options, for [`Client::declare_queue`]. Options
/// left unset take the broker's defaults.
///
/// ```
/// use std::time::Duration;
/// use tidings_client::{Overflow, QueueConfig};
///
/// let config = QueueConfig::new("billing")
///     .bind("orders.created")
///     .max_deliveries(5)
///     .ack_timeout(Duration::from_secs(30))
///     .backoff([Duration::from_secs(1), Duration::from_secs(10)])
///     .max_length(100_000)
///     .overflow(Overflow::DropHead)
///     .dead_letter("billing.dlq");
/// assert_eq!(config.name(), "billing");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueConfig {
    name: Text,
    options: QueueOptions,
}

impl QueueConfig {
    /// A queue named `name` with no bindings and every default.
    pub fn new(name: impl Into<Text>) -> Self {
        Self {
            name: name.into(),
            options: QueueOptions::default(),
        }
    }

    /// The queue's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Adds a binding: messages published to topics matching `pattern` are stored.
    pub fn bind(mut self, pattern: impl Into<Text>) -> Self {
        self.options.bindings.push(pattern.into());
        self
    }

    /// Deliveries before a message moves to the dead-letter queue.
    pub fn max_deliveries(mut self, n: u32) -> Self {
        self.options.max_deliveries = Some(n);
        self
    }

    /// How long a delivery may stay unacked before it is redelivered.
    pub fn ack_timeout(mut self, timeout: Duration) -> Self {
        self.options.ack_timeout_ms = Some(millis(timeout));
        self
    }

    /// Delays between redeliveries after a nack or timeout (the last one repeats).
    pub fn backoff(mut self, delays: impl IntoIterator<Item = Duration>) -> Self {
        self.options.backoff_ms = Some(delays.into_iter().map(millis).collect());
        self
    }

    /// Most messages the queue holds.
    pub fn max_length(mut self, n: u64) -> Self {
        self.options.max_length = Some(n);
        self
    }

    /// Most payload bytes the queue holds.
    pub fn max_bytes(mut self, bytes: u64) -> Self {
        self.options.max_bytes = Some(bytes);
        self
    }

    /// What happens when a limit is reached.
    pub fn overflow(mut self, overflow: Overflow) -> Self {
        self.options.overflow = Some(overflow);
        self
    }

    /// How long a message may wait in the queue before it expires.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.options.ttl_ms = Some(millis(ttl));
        self
    }

    /// How long a message id is remembered to drop duplicates.
    pub fn dedup_window(mut self, window: Duration) -> Self {
        self.options.dedup_window_ms = Some(millis(window));
        self
    }

    /// The name of the dead-letter queue.
    pub fn dead_letter(mut self, name: impl Into<Text>) -> Self {
        self.options.dead_letter = Some(name.into());
        self
    }

    /// The options as they go on the wire.
    pub fn options(&self) -> &QueueOptions {
        &self.options
    }
}

/// A dead letter: a message that exhausted its deliveries or expired.
pub type DeadLetter = tidings_protocol::DeadLetter;

fn check_pattern(pattern: &str) -> Result<(), QueueError> {
    Pattern::new(pattern)
        .map(|_| ())
        .map_err(|reason| QueueError::InvalidPattern {
            pattern: pattern.to_owned(),
            reason,
        })
}

impl Client {
    /// Creates a queue, or checks that an existing one has these options
    /// (`QueueOptionsMismatch` otherwise).
    ///
    /// ```no_run
    /// # async fn demo(client: tidings_client::Client) -> Result<(), tidings_client::QueueError> {
    /// use tidings_client::QueueConfig;
    /// client.declare_queue(QueueConfig::new("billing").bind("orders.created")).await?;
    /// # Ok(()) }
    /// ```
    pub async fn declare_queue(&self, config: QueueConfig) -> Result<(), QueueError> {
        for pattern in &config.options.bindings {
            check_pattern(pattern)?;
        }
        let answer = self
            .handle()
            .call(self.timeout(TimeoutKind::Queue), |request_id| {
                Frame::QueueDeclare(QueueDeclare {
                    request_id,
                    name: config.name,
                    options: config.options,
                })
            })
            .await?;
        expect_ok(answer)
    }

    /// Deletes a queue and its messages.
    pub async fn delete_queue(&self, name: impl Into<Text>) -> Result<(), QueueError> {
        let name = name.into();
        let answer = self
            .handle()
            .call(self.timeout(TimeoutKind::Queue), |request_id| {
                Frame::QueueDelete(QueueDelete { request_id, name })
            })
            .await?;
        expect_ok(answer)
    }

    /// Adds a binding pattern to a queue.
    pub async fn bind(
        &self,
        queue: impl Into<Text>,
        pattern: impl Into<Text>,
    ) -> Result<(), QueueError> {
        let (name, pattern) = (queue.into(), pattern.into());
        check_pattern(&pattern)?;
        let answer = self
            .handle()
            .call(self.timeout(TimeoutKind::Queue), |request_id| {
                Frame::QueueBind(QueueBind {
                    request_id,
                    name,
                    pattern,
                })
            })
            .await?;
        expect_ok(answer)
    }

    /// Removes a binding pattern from a queue.
    pub async fn unbind(
        &self,
        queue: impl Into<Text>,
        pattern: impl Into<Text>,
    ) -> Result<(), QueueError> {
        let (name, pattern) = (queue.into(), pattern.into());
        let answer = self
            .handle()
            .call(self.timeout(TimeoutKind::Queue), |request_id| {
                Frame::QueueUnbind(QueueUnbind {
                    request_id,
                    name,
                    pattern,
                })
            })
            .await?;
        expect_ok(answer)
    }

    /// One queue's figures.
    pub async fn queue_info(&self, name: impl Into<Text>) -> Result<QueueInfo, QueueError> {
        let name = name.into();
        match self
            .handle()
            .call(self.timeout(TimeoutKind::Queue), |request_id| {
                Frame::QueueInfoRequest(QueueInfoRequest { request_id, name })
            })
            .await?
        {
            Frame::QueueInfo(reply) => Ok(reply.info),
            other => Err(QueueError::UnexpectedReply {
                frame: other.name(),
            }),
        }
    }

    /// A queue's name and options as the broker holds them, defaults filled in
    /// (from QUEUE_INFO; the broker must speak protocol 1.1): declaring the result
    /// again is a match.
    ///
    /// ```no_run
    /// # async fn demo(client: tidings_client::Client) -> Result<(), tidings_client::QueueError> {
    /// let config = client.queue_config("billing").await?;
    /// println!("{:?}", config.options().max_deliveries);
    /// # Ok(()) }
    /// ```
    pub async fn queue_config(&self, name: impl Into<Text>) -> Result<QueueConfig, QueueError> {
        let name = name.into();
        let queue = name.clone();
        match self
            .handle()
            .call(self.timeout(TimeoutKind::Queue), |request_id| {
                Frame::QueueInfoRequest(QueueInfoRequest { request_id, name })
            })
            .await?
        {
            Frame::QueueInfo(reply) => match reply.options {
                Some(options) => Ok(QueueConfig {
                    name: queue,
                    options: *options,
                }),
                None => Err(QueueError::UnexpectedReply {
                    frame: "QUEUE_INFO_REPLY without options (a 1.0 broker)",
                }),
            },
            other => Err(QueueError::UnexpectedReply {
                frame: other.name(),
            }),
        }
    }

    /// Every queue's figures.
    pub async fn list_queues(&self) -> Result<Vec<QueueInfo>, QueueError> {
        match self
            .handle()
            .call(self.timeout(TimeoutKind::Queue), |request_id| {
                Frame::QueueList(QueueList { request_id })
            })
            .await?
        {
            Frame::QueueListReply(reply) => Ok(reply.queues),
            other => Err(QueueError::UnexpectedReply {
                frame: other.name(),
            }),
        }
    }

    /// The dead letters of `queue`, oldest first; at most `limit` (0: all). The
    /// server answers in pages no larger than its max frame; this asks for the
    /// next page until it has them all (or `limit`).
    pub async fn dead_letters(
        &self,
        queue: impl Into<Text>,
        limit: u32,
    ) -> Result<Vec<DeadLetter>, QueueError> {
        let queue = queue.into();
        let mut letters = Vec::new();
        let mut from = None;
        loop {
            let want = match limit {
                0 => 0,
                n => n.saturating_sub(u32::try_from(letters.len()).unwrap_or(u32::MAX)),
            };
            let queue = queue.clone();
            match self
                .handle()
                .call(self.timeout(TimeoutKind::Queue), |request_id| {
                    Frame::DeadLetters(DeadLetters {
                        request_id,
                        queue,
                        limit: want,
                        from,
                    })
                })
                .await?
            {
                Frame::DeadLettersReply(reply) => {
                    letters.extend(reply.letters);
                    let full = limit != 0 && letters.len() >= limit as usize;
                    match reply.next {
                        Some(next) if !full => from = Some(next),
                        _ => return Ok(letters),
                    }
                }
                other => {
                    return Err(QueueError::UnexpectedReply {
                        frame: other.name(),
                    });
                }
            }
        }
    }

    /// Moves every dead letter of `queue` back into it; returns how many moved.
    pub async fn redrive(&self, queue: impl Into<Text>) -> Result<u64, QueueError> {
        self.redrive_limit(queue, 0).await
    }

    /// Moves at most `limit` dead letters (0: all) back into `queue`.
    pub async fn redrive_limit(
        &self,
        queue: impl Into<Text>,
        limit: u32,
    ) -> Result<u64, QueueError> {
        let queue = queue.into();
        match self
            .handle()
            .call(self.timeout(TimeoutKind::Queue), |request_id| {
                Frame::Redrive(Redrive {
                    request_id,
                    queue,
                    limit,
                })
            })
            .await?
        {
            Frame::RedriveReply(reply) => Ok(reply.moved),
            other => Err(QueueError::UnexpectedReply {
                frame: other.name(),
            }),
        }
    }
}
