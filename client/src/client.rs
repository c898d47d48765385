//! `Client`: the cheap, cloneable handle every task uses to talk to the one
//! connection task that owns the socket.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use tidings_protocol::{Frame, Stats as StatsFrame, Text};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::command::Command;
use crate::connection;
use crate::error::{ConnectError, PublishError, QueueError, ServerError};
use crate::events::Events;
use crate::handle::{ConnState, Handle, Shared};
use crate::message::Message;
use crate::options::ClientBuilder;

/// Ends the connection task when the last [`Client`] clone is dropped.
struct ClientInner {
    handle: Handle,
    _close: DropGuard,
}

/// A connection to a tidings broker.
///
/// `Client` is cheap to clone (an `Arc` inside) and safe to use from many tasks at
/// once: every clone talks, through a channel, to the one task that owns the
/// socket, so publishes from all of them are pipelined and coalesced into few
/// writes. The connection closes when the last clone, [`crate::Subscription`] and
/// [`crate::Consumer`] are dropped.
///
/// ```no_run
/// # async fn demo() -> Result<(), tidings_client::Error> {
/// let client = tidings_client::Client::connect("127.0.0.1:7878").await?;
/// client.publish("orders.created", "order 7").await?;
/// client.flush().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Client {
    inner: Arc<ClientInner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("addr", &self.inner.handle.shared.opts.addr)
            .field("state", &*self.inner.handle.shared.state.borrow())
            .finish()
    }
}

impl Client {
    /// Connects with every default of [`ClientBuilder`].
    pub async fn connect(addr: impl Into<String>) -> Result<Client, ConnectError> {
        ClientBuilder::new(addr).connect().await
    }

    /// A builder for every option.
    pub fn builder(addr: impl Into<String>) -> ClientBuilder {
        ClientBuilder::new(addr)
    }

    pub(crate) async fn start(opts: ClientBuilder) -> Result<Client, ConnectError> {
        let opened = connection::open(&opts).await?;
        let (state_tx, state_rx) = watch::channel(ConnState::Connected);
        let shared = Arc::new(Shared::new(opts, state_rx, opened.max_payload()));
        let (tx, rx) = mpsc::unbounded_channel();
        let handle = Handle { tx, shared };
        let close = CancellationToken::new();
        connection::spawn(opened, handle.clone(), rx, state_tx, close.clone());
        Ok(Client {
            inner: Arc::new(ClientInner {
                handle,
                _close: close.drop_guard(),
            }),
        })
    }

    pub(crate) fn handle(&self) -> &Handle {
        &self.inner.handle
    }

    /// True while the connection is up.
    pub fn is_connected(&self) -> bool {
        *self.handle().shared.state.borrow() == ConnState::Connected
    }

    /// The largest payload the broker accepts (learned in the handshake).
    pub fn max_payload(&self) -> usize {
        self.handle().shared.max_payload.load(Ordering::Relaxed)
    }

    /// Connection events (disconnected, reconnected, closed).
    ///
    /// Each call returns a new stream that sees the events from then on.
    pub fn events(&self) -> Events {
        Events::new(self.handle().shared.events.subscribe())
    }

    /// Publishes `payload` to `topic`, fire and forget.
    ///
    /// The publish is queued for the connection task and returns at once; it is
    /// written together with whatever else is queued. Use [`Client::flush`] to wait
    /// until it is on the wire, or [`Client::publish_confirmed`] to wait until it is
    /// durable. While the connection is down it waits up to the offline wait for a
    /// reconnect, then fails with [`PublishError::Disconnected`].
    pub async fn publish(
        &self,
        topic: impl Into<Text>,
        payload: impl Into<Bytes>,
    ) -> Result<(), PublishError> {
        self.handle()
            .publish_message(Message::new(topic, payload))
            .await
    }

    /// Publishes a [`Message`] with its headers, id, reply topic and delay.
    ///
    /// ```no_run
    /// # async fn demo(client: tidings_client::Client) -> Result<(), tidings_client::PublishError> {
    /// use tidings_client::Message;
    /// client
    ///     .publish_message(Message::new("orders.created", "{}").header("content-type", "application/json"))
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn publish_message(&self, message: Message) -> Result<(), PublishError> {
        self.handle().publish_message(message).await
    }

    /// Publishes and waits for the broker's confirm: the message is durable in every
    /// queue it was routed to.
    ///
    /// ```no_run
    /// # async fn demo(client: tidings_client::Client) -> Result<(), tidings_client::PublishError> {
    /// use tidings_client::Message;
    /// let confirm = client.publish_confirmed(Message::new("orders.created", "{}").id("order-7")).await?;
    /// println!("stored in {} queues (duplicate: {})", confirm.queues, confirm.duplicate);
    /// # Ok(()) }
    /// ```
    pub async fn publish_confirmed(&self, message: Message) -> Result<Confirmation, PublishError> {
        let mut publish = message.to_publish();
        self.handle().check_publish(&publish)?;
        publish.confirm = true;
        let answer = self
            .handle()
            .call(|id| {
                publish.request_id = Some(id);
                Frame::Publish(publish)
            })
            .await?;
        match answer {
            Frame::Confirm(c) => Ok(Confirmation {
                queues: c.queues,
                rejected: c.rejected,
                duplicate: c.duplicate,
            }),
            other => Err(PublishError::Server(ServerError {
                raw_code: tidings_protocol::ErrorCode::UnexpectedFrame as u16,
                message: format!("expected CONFIRM, got {}", other.name()),
            })),
        }
    }

    /// Waits until everything queued so far is written to the socket.
    pub async fn flush(&self) -> Result<(), PublishError> {
        let handle = self.handle();
        handle
            .ready(Instant::now() + handle.shared.opts.offline_wait)
            .await?;
        let (tx, rx) = oneshot::channel();
        handle.send(Command::Flush { reply: tx })?;
        let timeout = handle.shared.opts.request_timeout;
        match tokio::time::timeout(timeout, rx).await {
            Err(_) => Err(PublishError::TimedOut { after: timeout }),
            Ok(Err(_)) | Ok(Ok(false)) => Err(PublishError::ConnectionLost),
            Ok(Ok(true)) => Ok(()),
        }
    }

    /// The broker's counters.
    pub async fn stats(&self) -> Result<Stats, QueueError> {
        match self
            .handle()
            .call(|request_id| Frame::Stats(StatsFrame { request_id }))
            .await?
        {
            Frame::StatsReply(reply) => Ok(Stats {
                entries: reply
                    .entries
                    .into_iter()
                    .map(|(name, value)| (name.to_string(), value))
                    .collect(),
            }),
            other => Err(QueueError::UnexpectedReply {
                frame: other.name(),
            }),
        }
    }

    /// The default request timeout, also the bound on answers from the broker.
    pub fn default_request_timeout(&self) -> Duration {
        self.handle().shared.opts.request_timeout
    }
}

/// The broker's confirm of a [`Client::publish_confirmed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Confirmation {
    /// Queues that hold the message (a duplicate counts as held).
    pub queues: u32,
    /// Queues that refused it because they were full (overflow reject-publish).
    pub rejected: u32,
    /// The message id had been seen within a queue's dedup window.
    pub duplicate: bool,
}

/// The broker's named counters, in the broker's order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Stats {
    /// `(name, value)` pairs.
    pub entries: Vec<(String, u64)>,
}

impl Stats {
    /// The value of a named counter.
    pub fn get(&self, name: &str) -> Option<u64> {
        self.entries
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
    }

    /// Every counter.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> {
        self.entries.iter().map(|(n, v)| (n.as_str(), *v))
    }
}
