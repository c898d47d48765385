//! The async client of the tidings event broker.
//!
//! A [`Client`] is one TCP connection, owned by one background task and shared by
//! cheap clones across every task of a service. Through it a service publishes
//! events, subscribes to topic patterns, makes requests to other services, and
//! works through durable queues with acknowledgements — knowing only the bus.
//!
//! ```no_run
//! use futures::StreamExt;
//! use tidings_client::{Client, Message, QueueConfig};
//!
//! # async fn demo() -> Result<(), tidings_client::Error> {
//! let client = Client::connect("127.0.0.1:7878").await?;
//!
//! // Publish/subscribe (at-most-once).
//! let mut orders = client.subscribe("orders.>").await?;
//! client.publish("orders.created", r#"{"id":7}"#).await?;
//! let msg = orders.next().await.expect("subscribed before publishing");
//! assert_eq!(msg.topic(), "orders.created");
//!
//! // Request/reply.
//! let price = client.request("pricing.quote", "sku-42").await?;
//!
//! // Durable queues (at-least-once) with publisher confirms and acks.
//! client.declare_queue(QueueConfig::new("billing").bind("orders.created")).await?;
//! let confirm = client.publish_confirmed(Message::new("orders.created", "{}")).await?;
//! assert_eq!(confirm.queues, 1);
//! let mut billing = client.consume("billing", 32).await?;
//! while let Some(delivery) = billing.next().await {
//!     delivery.ack().await?;
//! }
//! # Ok(()) }
//! ```
//!
//! # Pipelining and buffering
//!
//! Every operation is turned into a command for the connection task, which writes
//! whatever is queued in one go. Publishes return as soon as they are queued; the
//! bytes queued but not written are bounded
//! ([`ClientBuilder::max_buffered_bytes`]), beyond which publishes wait. Answers
//! (confirms, queue operations, requests) are matched by request id, so any number
//! may be outstanding at once.
//!
//! # Reconnects
//!
//! When the connection drops, the client reconnects with backoff
//! ([`ReconnectPolicy`]), redoes the handshake and restores its subscriptions and
//! consumers. Meanwhile, new operations wait up to
//! [`ClientBuilder::offline_wait`] and then fail with a `Disconnected` error;
//! confirms, requests and calls in flight when it dropped fail with
//! `ConnectionLost` (the broker may or may not have acted on them). Watch
//! [`Client::events`] to see it happen.
//!
//! # Timeouts
//!
//! Each kind of call has its own default bound on the broker's answer:
//! [`ClientBuilder::request_timeout`] (replies to requests),
//! [`ClientBuilder::confirm_timeout`] (publish confirms and flush),
//! [`ClientBuilder::subscribe_timeout`] and [`ClientBuilder::queue_timeout`] (queue
//! operations, consume, close, awaited acks). [`Client::with_timeout`] gives a
//! handle whose calls all use one bound instead: a per-call override.
//!
//! # Confirms, acks and losses
//!
//! A confirm that stored the message nowhere is an error
//! ([`PublishError::Unroutable`], [`PublishError::QueueFull`]) unless
//! [`ConfirmOptions`] allows it; [`Client::enqueue_confirmed`] sends now and
//! returns the confirm as a future. [`Delivery::ack`] only queues the ack;
//! [`Delivery::ack_confirmed`] and [`Consumer::close`] wait for the broker. A
//! subscription reports where messages may have been lost (an [`Interruption`]
//! from [`Subscription::try_next`], [`Event::SlowConsumer`] on [`Client::events`]);
//! a consumer the broker ended says why ([`ConsumerError`] from
//! [`Consumer::try_next`]).
//!
//! # Cancel safety
//!
//! [`Subscription`], [`Consumer`] and [`Events`] are streams whose `next()` is
//! cancel safe: dropping the future (for example in `tokio::select!`) loses
//! nothing. The other operations are safe to cancel in the sense that nothing
//! breaks, but a cancelled publish may or may not have been queued, and a
//! cancelled request's reply is discarded when it arrives.
//!
//! # Errors
//!
//! Each family of operations has its own error enum ([`ConnectError`],
//! [`PublishError`], [`SubscribeError`], [`RequestError`], [`QueueError`],
//! [`AckError`]) whose variants can be matched; [`Error`] wraps them all for `?`.

mod client;
mod command;
mod connection;
mod consumer;
mod error;
mod events;
mod handle;
mod message;
mod options;
mod queue;
mod request;
mod sub_buffer;
mod subscriber;
mod tls;

pub use client::{Client, ConfirmOptions, Confirmation, PendingConfirm, Stats};
pub use consumer::{Consumer, Delivery};
pub use error::{
    AckError, ConnectError, ConsumerError, Error, PublishError, QueueError, RequestError,
    ServerError, SubscribeError,
};
pub use events::{Event, Events};
pub use message::Message;
pub use options::{ClientBuilder, ReconnectPolicy};
pub use queue::{DeadLetter, QueueConfig};
pub use subscriber::{Interruption, Subscription};
pub use tidings_protocol::{ErrorCode, Overflow, QueueInfo, Text, TopicError};
pub use tls::{ClientTls, TLS_SCHEME};
