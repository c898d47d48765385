//! `Client`: the cheap, cloneable handle every task uses to talk to the one
//! connection task that owns the socket.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tidings_protocol::{Frame, Publish, Stats as StatsFrame, Text, Topic};
use tokio::sync::{Semaphore, broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::connection::{self, Command};
use crate::error::{CallError, ConnectError, PublishError, QueueError, ServerError};
use crate::events::{Event, Events};
use crate::message::Message;
use crate::options::ClientBuilder;

/// What the connection task tells handles about the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConnState {
    Connected,
    Disconnected,
    Closed,
}

/// State shared by the handles and the connection task.
pub(crate) struct Shared {
    pub(crate) opts: ClientBuilder,
    pub(crate) state: watch::Receiver<ConnState>,
    next_id: AtomicU32,
    next_sid: AtomicU32,
    next_token: AtomicU64,
    /// Bumped on every successful (re)connect; deliveries remember theirs so that
    /// acks for a dead connection are refused instead of confusing the new one.
    pub(crate) epoch: AtomicU64,
    pub(crate) max_payload: AtomicUsize,
    /// `_INBOX.<random>`: the prefix of every reply topic of this client.
    pub(crate) inbox: String,
    /// Payload bytes queued but not yet written (see `max_buffered_bytes`).
    pub(crate) budget: Arc<Semaphore>,
    pub(crate) events: broadcast::Sender<Event>,
}

impl Shared {
    pub(crate) fn new(
        opts: ClientBuilder,
        state: watch::Receiver<ConnState>,
        max_payload: usize,
    ) -> Self {
        let (events, _) = broadcast::channel(64);
        Shared {
            state,
            next_id: AtomicU32::new(1),
            next_sid: AtomicU32::new(1),
            next_token: AtomicU64::new(1),
            epoch: AtomicU64::new(1),
            max_payload: AtomicUsize::new(max_payload),
            inbox: format!("_INBOX.{}", random_token()),
            budget: Arc::new(Semaphore::new(opts.max_buffered_bytes)),
            events,
            opts,
        }
    }

    /// A request id, never 0 (0 means "not tied to a request" on the wire).
    pub(crate) fn next_id(&self) -> u32 {
        loop {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            if id != 0 {
                return id;
            }
        }
    }

    /// A subscription or consumer id; 0 is the inbox's.
    pub(crate) fn next_sid(&self) -> u32 {
        loop {
            let id = self.next_sid.fetch_add(1, Ordering::Relaxed);
            if id != 0 {
                return id;
            }
        }
    }

    pub(crate) fn next_token(&self) -> u64 {
        self.next_token.fetch_add(1, Ordering::Relaxed)
    }
}

/// The raw way to the connection task. Unlike [`Client`] it does not keep the
/// connection alive, so the messages and deliveries that carry one cannot keep a
/// dropped client's connection open.
#[derive(Clone)]
pub(crate) struct Handle {
    pub(crate) tx: mpsc::UnboundedSender<Command>,
    pub(crate) shared: Arc<Shared>,
}

impl Handle {
    /// Waits until the connection is up, at most until `deadline`.
    pub(crate) async fn ready(&self, deadline: Instant) -> Result<(), CallError> {
        // Fast path for the common case: no receiver clone, no await.
        if *self.shared.state.borrow() == ConnState::Connected {
            return Ok(());
        }
        let mut state = self.shared.state.clone();
        let started = Instant::now();
        loop {
            match *state.borrow_and_update() {
                ConnState::Connected => return Ok(()),
                ConnState::Closed => return Err(CallError::Closed),
                ConnState::Disconnected => {}
            }
            match tokio::time::timeout_at(deadline, state.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(CallError::Closed),
                Err(_) => return Err(CallError::Disconnected(started.elapsed())),
            }
        }
    }

    pub(crate) fn offline_deadline(&self) -> Instant {
        Instant::now() + self.shared.opts.offline_wait
    }

    pub(crate) fn send(&self, cmd: Command) -> Result<(), CallError> {
        self.tx.send(cmd).map_err(|_| CallError::Closed)
    }

    pub(crate) fn check_publish(&self, publish: &Publish) -> Result<(), PublishError> {
        Topic::validate(&publish.topic).map_err(|source| PublishError::InvalidTopic {
            topic: publish.topic.to_string(),
            source,
        })?;
        let max = self.shared.max_payload.load(Ordering::Relaxed);
        if publish.payload.len() > max {
            return Err(PublishError::PayloadTooLarge {
                size: publish.payload.len(),
                max,
            });
        }
        Ok(())
    }

    /// Queues a fire-and-forget publish.
    pub(crate) async fn publish_message(&self, msg: Message) -> Result<(), PublishError> {
        // A publish that finds room completes without ever returning Pending, so a
        // tight publish loop would hold its worker thread and starve every other
        // task on it (the connection task, subscriptions). Spending tokio's
        // cooperative budget makes it yield now and then, like any channel send.
        tokio::task::consume_budget().await;
        let publish = msg.to_publish();
        self.check_publish(&publish)?;
        // Deadlines only on the slow paths: reading the clock was a visible part of a
        // publish's cost.
        if *self.shared.state.borrow() != ConnState::Connected {
            self.ready(self.offline_deadline()).await?;
        }
        let cost = publish.payload.len() + publish.topic.len() + 16;
        let max = self.shared.opts.max_buffered_bytes;
        let permits = u32::try_from(cost.min(max)).unwrap_or(u32::MAX);
        let permit = match self.shared.budget.clone().try_acquire_many_owned(permits) {
            Ok(permit) => permit,
            Err(_) => tokio::time::timeout_at(
                self.offline_deadline(),
                self.shared.budget.clone().acquire_many_owned(permits),
            )
            .await
            .map_err(|_| PublishError::Disconnected {
                waited: self.shared.opts.offline_wait,
            })?
            .map_err(|_| PublishError::Closed)?,
        };
        self.send(Command::Publish {
            frame: publish,
            permit,
        })?;
        Ok(())
    }

    /// Sends a frame that the broker answers, and waits for the answer (bounded by
    /// the request timeout).
    pub(crate) async fn call(&self, make: impl FnOnce(u32) -> Frame) -> Result<Frame, CallError> {
        self.call_with(|id, reply| Command::Call {
            id,
            frame: make(id),
            reply,
        })
        .await
    }

    /// Like [`Handle::call`], for commands that carry more than a frame.
    pub(crate) async fn call_with(
        &self,
        make: impl FnOnce(u32, crate::connection::Reply) -> Command,
    ) -> Result<Frame, CallError> {
        let timeout = self.shared.opts.request_timeout;
        self.ready(self.offline_deadline()).await?;
        let id = self.shared.next_id();
        let (reply_tx, reply_rx) = oneshot::channel();
        self.send(make(id, reply_tx))?;
        match tokio::time::timeout(timeout, reply_rx).await {
            Err(_) => Err(CallError::TimedOut(timeout)),
            Ok(Err(_)) => Err(CallError::ConnectionLost),
            Ok(Ok(answer)) => answer,
        }
    }
}

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

    /// Connection events (connected, disconnected, reconnected, slow subscription).
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

/// 64 random bits from the standard library's per-process random hasher keys,
/// enough to make inbox topics unguessable by other clients and unique per client.
fn random_token() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    format!("{:016x}", hasher.finish())
}
