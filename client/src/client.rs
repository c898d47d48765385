//! `Client`: the cheap, cloneable handle every task uses to talk to the one
//! connection task that owns the socket.

use std::future::Future;
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
    /// Set by [`Client::with_timeout`]: the bound on every call through this handle.
    timeout: Option<Duration>,
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
        shared
            .max_credit
            .store(opened.max_credit(), Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        let handle = Handle { tx, shared };
        let close = CancellationToken::new();
        connection::spawn(opened, handle.clone(), rx, state_tx, close.clone());
        Ok(Client {
            inner: Arc::new(ClientInner {
                handle,
                _close: close.drop_guard(),
            }),
            timeout: None,
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

    /// The most credit the broker grants one consumer, as it announced in the
    /// handshake; `None` from a broker that does not say (protocol 1.0). Learned
    /// again on every reconnect.
    ///
    /// The client never asks for more: [`Client::consume`]'s `prefetch` and
    /// [`Consumer::add_credit`](crate::Consumer::add_credit) are clamped to it
    /// before they are sent, as the broker would clamp them anyway.
    ///
    /// ```no_run
    /// # async fn demo(client: tidings_client::Client) -> Result<(), tidings_client::Error> {
    /// let prefetch = 10_000;
    /// if let Some(cap) = client.max_credit() {
    ///     if cap < prefetch {
    ///         println!("the broker grants at most {cap} deliveries in flight");
    ///     }
    /// }
    /// let consumer = client.consume("jobs", prefetch).await?; // window: min(10,000, cap)
    /// # consumer.close().await?;
    /// # Ok(()) }
    /// ```
    pub fn max_credit(&self) -> Option<u32> {
        self.handle().shared.max_credit()
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
    /// A confirm that says the message is not stored anywhere is an error: with no
    /// queue bound to the topic, [`PublishError::Unroutable`]; when a queue refused
    /// it for being full (overflow reject-publish), [`PublishError::QueueFull`] with
    /// the counts. For publishes that may legitimately reach no queue, say so with
    /// [`ConfirmOptions::allow_unroutable`] and [`Client::publish_confirmed_with`].
    /// Bounded by the confirm timeout ([`ClientBuilder::confirm_timeout`],
    /// overridden by [`Client::with_timeout`]).
    ///
    /// ```no_run
    /// # async fn demo(client: tidings_client::Client) -> Result<(), tidings_client::PublishError> {
    /// use tidings_client::Message;
    /// let confirm = client.publish_confirmed(Message::new("orders.created", "{}").id("order-7")).await?;
    /// println!("stored in {} queues (duplicate: {})", confirm.queues, confirm.duplicate);
    /// # Ok(()) }
    /// ```
    pub async fn publish_confirmed(&self, message: Message) -> Result<Confirmation, PublishError> {
        self.publish_confirmed_with(message, ConfirmOptions::new())
            .await
    }

    /// [`Client::publish_confirmed`] with options: what counts as success.
    ///
    /// ```no_run
    /// # async fn demo(client: tidings_client::Client) -> Result<(), tidings_client::PublishError> {
    /// use tidings_client::{ConfirmOptions, Message};
    /// // An audit event: stored if some queue wants it, fine if none does.
    /// let options = ConfirmOptions::new().allow_unroutable();
    /// let confirm = client.publish_confirmed_with(Message::new("audit.login", "u7"), options).await?;
    /// # let _ = confirm;
    /// # Ok(()) }
    /// ```
    pub async fn publish_confirmed_with(
        &self,
        message: Message,
        options: ConfirmOptions,
    ) -> Result<Confirmation, PublishError> {
        self.enqueue_confirmed_with(message, options).await?.await
    }

    /// Queues a publish that asks for a confirm and returns at once with a future
    /// of that confirm: send now, await later. Awaiting the [`PendingConfirm`]
    /// gives what [`Client::publish_confirmed`] would have. Any number may be in
    /// flight; publishes are written in the order they were enqueued and the
    /// broker confirms them as they become durable (group commits make many
    /// durable at once). The confirm timeout counts from the enqueue.
    ///
    /// This `async fn` waits only while the connection is down (up to the offline
    /// wait); its result says whether the publish was queued. Dropping the
    /// [`PendingConfirm`] does not take the publish back.
    ///
    /// A producer keeping 256 confirms in flight:
    ///
    /// ```no_run
    /// # async fn demo(client: tidings_client::Client) -> Result<(), tidings_client::PublishError> {
    /// use futures::stream::{FuturesUnordered, StreamExt};
    /// use tidings_client::Message;
    ///
    /// let mut in_flight = FuturesUnordered::new();
    /// for n in 0..100_000u32 {
    ///     if in_flight.len() == 256 {
    ///         // Wait for one confirm before sending more; `?` stops at the first
    ///         // failure (unroutable, queue full, timeout, connection lost …).
    ///         in_flight.next().await.expect("256 in flight")?;
    ///     }
    ///     let message = Message::new("orders.created", n.to_string()).id(format!("order-{n}"));
    ///     in_flight.push(client.enqueue_confirmed(message).await?);
    /// }
    /// while let Some(confirm) = in_flight.next().await {
    ///     confirm?;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn enqueue_confirmed(
        &self,
        message: Message,
    ) -> Result<PendingConfirm, PublishError> {
        self.enqueue_confirmed_with(message, ConfirmOptions::new())
            .await
    }

    /// [`Client::enqueue_confirmed`] with options: what counts as success.
    pub async fn enqueue_confirmed_with(
        &self,
        message: Message,
        options: ConfirmOptions,
    ) -> Result<PendingConfirm, PublishError> {
        let handle = self.handle();
        let mut publish = message.to_publish();
        handle.check_publish(&publish)?;
        publish.confirm = true;
        let timeout = self.timeout(TimeoutKind::Confirm);
        if *handle.shared.state.borrow() != ConnState::Connected {
            handle.ready(handle.offline_deadline()).await?;
        }
        let id = handle.shared.next_id();
        publish.request_id = Some(id);
        // Kept for an error's message (a reference count, not a copy).
        let topic = publish.topic.clone();
        let (reply, answer) = oneshot::channel();
        handle.send(Command::Call {
            id,
            frame: Frame::Publish(publish),
            reply,
        })?;
        let confirm = async move {
            let answer = match tokio::time::timeout(timeout, answer).await {
                Err(_) => return Err(PublishError::TimedOut { after: timeout }),
                Ok(Err(_)) => return Err(PublishError::ConnectionLost),
                Ok(Ok(answer)) => answer?,
            };
            let Frame::Confirm(c) = answer else {
                return Err(PublishError::Server(ServerError {
                    raw_code: tidings_protocol::ErrorCode::UnexpectedFrame as u16,
                    message: format!("expected CONFIRM, got {}", answer.name()),
                }));
            };
            let confirmation = Confirmation {
                queues: c.queues,
                rejected: c.rejected,
                duplicate: c.duplicate,
            };
            options.check(topic, confirmation)
        };
        Ok(PendingConfirm {
            inner: Box::pin(confirm),
        })
    }

    /// Waits until everything queued so far is written to the socket.
    pub async fn flush(&self) -> Result<(), PublishError> {
        let handle = self.handle();
        handle
            .ready(Instant::now() + handle.shared.opts.offline_wait)
            .await?;
        let (tx, rx) = oneshot::channel();
        handle.send(Command::Flush { reply: tx })?;
        let timeout = self.timeout(TimeoutKind::Confirm);
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
            .call(self.timeout(TimeoutKind::Queue), |request_id| {
                Frame::Stats(StatsFrame { request_id })
            })
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

    /// A handle to the same connection whose every call (requests, confirms,
    /// subscribe, queue operations, flush, and the calls of the subscriptions and
    /// consumers it creates) is bounded by `timeout` instead of the per-kind
    /// defaults of the [`ClientBuilder`]: a per-call override.
    ///
    /// ```no_run
    /// # async fn demo(client: tidings_client::Client) -> Result<(), tidings_client::Error> {
    /// use std::time::Duration;
    /// use tidings_client::Message;
    /// // This one confirm may take up to a minute; the client's default stays.
    /// let slow = client.with_timeout(Duration::from_secs(60));
    /// slow.publish_confirmed(Message::new("reports.big", "…")).await?;
    /// # Ok(()) }
    /// ```
    pub fn with_timeout(&self, timeout: Duration) -> Client {
        Client {
            inner: self.inner.clone(),
            timeout: Some(timeout),
        }
    }

    /// The bound on a call of this kind through this handle.
    pub(crate) fn timeout(&self, kind: TimeoutKind) -> Duration {
        if let Some(timeout) = self.timeout {
            return timeout;
        }
        let opts = &self.handle().shared.opts;
        match kind {
            TimeoutKind::Request => opts.request_timeout,
            TimeoutKind::Confirm => opts.confirm_timeout,
            TimeoutKind::Subscribe => opts.subscribe_timeout,
            TimeoutKind::Queue => opts.queue_timeout,
        }
    }

    /// The timeout [`Client::request`] uses through this handle.
    pub fn default_request_timeout(&self) -> Duration {
        self.timeout(TimeoutKind::Request)
    }
}

/// Which default timeout of the [`ClientBuilder`] bounds a call.
#[derive(Debug, Clone, Copy)]
pub(crate) enum TimeoutKind {
    /// Waiting for a reply to a request.
    Request,
    /// Waiting for a publish confirm, or for a flush.
    Confirm,
    /// Waiting for the broker to take a subscribe or unsubscribe.
    Subscribe,
    /// Queue operations: declare, delete, bind, info, consume, cancel, acks
    /// awaited, dead letters, stats.
    Queue,
}

/// What a confirmed publish counts as success; by default only a message stored
/// in at least one queue, refused by none.
///
/// ```
/// use std::time::Duration;
/// use tidings_client::ConfirmOptions;
/// let options = ConfirmOptions::new().allow_unroutable().allow_queue_full();
/// # let _ = options;
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConfirmOptions {
    allow_unroutable: bool,
    allow_queue_full: bool,
}

impl ConfirmOptions {
    /// The default: no queue taking the message is [`PublishError::Unroutable`],
    /// a queue refusing it is [`PublishError::QueueFull`].
    pub fn new() -> Self {
        Self::default()
    }

    /// A confirm with no queue bound to the topic (`queues == 0`) is a success:
    /// for publishes that may legitimately reach no queue (events some services
    /// may or may not store).
    pub fn allow_unroutable(mut self) -> Self {
        self.allow_unroutable = true;
        self
    }

    /// A confirm in which some queues refused the message for being full is a
    /// success (the counts are in the [`Confirmation`]).
    pub fn allow_queue_full(mut self) -> Self {
        self.allow_queue_full = true;
        self
    }

    fn check(self, topic: Text, c: Confirmation) -> Result<Confirmation, PublishError> {
        if c.rejected > 0 && !self.allow_queue_full {
            return Err(PublishError::QueueFull {
                topic: topic.to_string(),
                queues: c.queues,
                rejected: c.rejected,
            });
        }
        if c.queues == 0 && c.rejected == 0 && !self.allow_unroutable {
            return Err(PublishError::Unroutable {
                topic: topic.to_string(),
            });
        }
        Ok(c)
    }
}

/// A confirm on its way: the future [`Client::enqueue_confirmed`] returns. It
/// resolves to what [`Client::publish_confirmed`] would have returned.
#[must_use = "a pending confirm does nothing unless awaited; dropping it does not take the publish back"]
pub struct PendingConfirm {
    inner: std::pin::Pin<Box<dyn Future<Output = Result<Confirmation, PublishError>> + Send>>,
}

impl std::fmt::Debug for PendingConfirm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingConfirm").finish_non_exhaustive()
    }
}

impl Future for PendingConfirm {
    type Output = Result<Confirmation, PublishError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
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
