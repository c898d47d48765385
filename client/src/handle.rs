//! `Handle`: the raw way to the connection task (a command channel and the state
//! shared with it), used by every public handle, and `Shared`, that state.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tidings_protocol::{Frame, Publish, Topic};
use tokio::sync::{Semaphore, broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::command::{Command, Reply};
use crate::error::{CallError, PublishError};
use crate::events::Event;
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
    /// The broker's max credit from WELCOME; 0 when it did not say (a 1.0 broker).
    pub(crate) max_credit: AtomicU32,
    /// `_INBOX.<random>`, or `_INBOX.<user>.<random>` when logged in as a user
    /// (the broker always lets a user read `_INBOX.<user>.>`): the prefix of every
    /// reply topic of this client.
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
            max_credit: AtomicU32::new(0),
            inbox: match &opts.user {
                Some(user) => format!("_INBOX.{user}.{}", random_token()),
                None => format!("_INBOX.{}", random_token()),
            },
            budget: Arc::new(Semaphore::new(opts.max_buffered_bytes)),
            events,
            opts,
        }
    }

    /// The broker's max credit, when it announced one.
    pub(crate) fn max_credit(&self) -> Option<u32> {
        match self.max_credit.load(Ordering::Relaxed) {
            0 => None,
            cap => Some(cap),
        }
    }

    /// `credit` clamped to the broker's max credit (unchanged when unknown), so the
    /// client never asks for more than the broker grants.
    pub(crate) fn clamp_credit(&self, credit: u32) -> u32 {
        self.max_credit().map_or(credit, |cap| credit.min(cap))
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
        Topic::validate(&publish.topic).map_err(|reason| PublishError::InvalidTopic {
            topic: publish.topic.to_string(),
            reason,
        })?;
        let envelope = publish.envelope_len();
        if envelope > tidings_protocol::MAX_ENVELOPE_LEN {
            return Err(PublishError::EnvelopeTooLarge {
                size: envelope,
                max: tidings_protocol::MAX_ENVELOPE_LEN,
            });
        }
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

    /// Sends a frame that the broker answers, and waits for the answer, at most
    /// `timeout`.
    pub(crate) async fn call(
        &self,
        timeout: Duration,
        make: impl FnOnce(u32) -> Frame,
    ) -> Result<Frame, CallError> {
        self.call_with(timeout, |id, reply| Command::Call {
            id,
            frame: make(id),
            reply,
        })
        .await
    }

    /// Like [`Handle::call`], for commands that carry more than a frame.
    pub(crate) async fn call_with(
        &self,
        timeout: Duration,
        make: impl FnOnce(u32, Reply) -> Command,
    ) -> Result<Frame, CallError> {
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
