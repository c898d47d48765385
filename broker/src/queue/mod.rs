//! The durable-queue engine: queue registry and routing, the public API the
//! connection layer calls, and dead-letter moves between queues.
//!
//! ```text
//!  connection ──publish()──► QueueEngine ──routes──► Queue (queue.rs) ──batch──► Store (crate::storage)
//!  connection ◄─DeliverySink── Queue ◄──committed / page read callbacks──────────── storage threads
//!  QueueSession (session.rs): consume / credit / ack / nack, per connection
//! ```
//!
//! Every queue keeps a bounded window of its messages in memory and everything in
//! sled. Writes from all queues and connections meet in one group commit on the
//! store thread; confirms resolve when it is durable per the [`FsyncPolicy`].
//!
//! # What the limits count
//!
//! `max_length` and `max_bytes` count the messages a queue holds that no consumer
//! holds right now: ready ones (in memory or paged out), delayed ones, and ones
//! still waiting for their group commit; `max_bytes` counts their payload bytes
//! only (not topic or headers). Delivered, unacked messages do not count, as in
//! RabbitMQ, so a consumer's prefetch cannot make a queue refuse publishes; they do
//! count in [`QueueInfo`]'s `depth` and `bytes`, which can therefore exceed the
//! limits by what is in flight. A nacked or timed-out message coming back is never
//! refused. With drop-head a publish always fits by dropping the oldest ready
//! message (paged in from the store if needed; counted in the `dropped` stat) and is
//! refused only when everything counted is delayed.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use tidings_broker::queue::{EngineConfig, QueueEngine};
//! use tidings_protocol::{Publish, QueueOptions};
//!
//! let dir = tempfile::tempdir().unwrap();
//! let engine = QueueEngine::open(EngineConfig::new(dir.path())).unwrap();
//! let options = QueueOptions { bindings: vec!["orders.>".into()], ..Default::default() };
//! engine.declare("orders", &options).await.unwrap();
//! let outcome = engine.publish(&Publish::new("orders.created", &b"{}"[..])).await.unwrap();
//! assert_eq!(outcome.queues, 1);
//! assert_eq!(engine.info("orders").await.unwrap().depth, 1);
//! engine.shutdown().await;
//! # });
//! ```

mod config;
mod error;
mod inspect;
pub(crate) mod options;
#[allow(clippy::module_inception)]
mod queue;
pub(crate) mod record;
mod routing;
mod session;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, Weak};
use std::time::Duration;

use tidings_protocol::{DeadLetter, Pattern, Publish, QueueInfo, QueueOptions};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{EngineConfig, FsyncPolicy, QueueDefaults};
pub use error::QueueError;
pub use inspect::{ConsumerView, MAX_PEEK, PeekedMessage, QueueSettingsView, QueueView};
pub use session::{DeliverySink, QueueSession};

use crate::storage::{Range, Store, Ticket};
use options::{Settings, StoredDefinition};
use queue::{Appended, DeadLetterMove, Limits, Queue, dead_letter_copy, now_ms, redriven_copy};
use record::Message;
use routing::Routes;

/// Most dead letters one `dead_letters` call returns, whatever the limit.
pub const MAX_DEAD_LETTERS_LISTED: u32 = 10_000;

/// What [`QueueEngine::publish_now`] knows at once about a publish.
pub enum Published {
    /// No queue took it, or it was refused: the answer is known now.
    Done(Result<PublishOutcome, QueueError>),
    /// At least one queue took it; resolves once it is durable in all of them.
    Pending(Pin<Box<dyn Future<Output = Result<PublishOutcome, QueueError>> + Send>>),
}

impl std::fmt::Debug for Published {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Published::Done(result) => f.debug_tuple("Done").field(result).finish(),
            Published::Pending(_) => f.write_str("Pending"),
        }
    }
}

/// What a publish did to the queues.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PublishOutcome {
    /// Queues that hold the message (duplicates count as holding it).
    pub queues: u32,
    /// Queues that refused it because they were full (overflow reject-publish).
    pub rejected: u32,
    /// Its message id had been seen within a queue's dedup window.
    pub duplicate: bool,
}

#[derive(Default)]
struct Registry {
    queues: BTreeMap<String, Arc<Queue>>,
    routes: Routes,
}

impl Registry {
    fn reroute(&mut self) {
        self.routes = Routes::build(self.queues.values());
    }
}

pub(crate) struct EngineInner {
    config: EngineConfig,
    store: Arc<Store>,
    limits: Limits,
    registry: RwLock<Registry>,
    next_qid: AtomicU32,
    next_session: AtomicU64,
    cancel: CancellationToken,
    tracker: TaskTracker,
    runtime: tokio::runtime::Handle,
    closed: AtomicBool,
    me: Weak<EngineInner>,
}

/// The durable-queue engine. A cheap `Clone` handle; every connection shares one.
#[derive(Clone)]
pub struct QueueEngine {
    inner: Arc<EngineInner>,
}

impl QueueEngine {
    /// Opens the store in `config.data_dir` (creating it if needed) and restores every
    /// queue: definitions, bindings, messages in order with their attempt counts,
    /// delayed messages with their due times, and dedup ids.
    ///
    /// Blocks while sled opens; must be called inside a tokio runtime (queue timers are
    /// spawned on it).
    pub fn open(config: EngineConfig) -> Result<QueueEngine, QueueError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            QueueError::Storage("QueueEngine::open must be called inside a tokio runtime".into())
        })?;
        let opened = Store::open(&config)?;
        let store = Arc::new(opened.store);
        let limits = Limits::from_config(&config);
        let cancel = CancellationToken::new();
        let inner = Arc::new_cyclic(|me| EngineInner {
            limits,
            store: store.clone(),
            registry: RwLock::new(Registry::default()),
            next_qid: AtomicU32::new(opened.next_qid),
            next_session: AtomicU64::new(1),
            cancel: cancel.clone(),
            tracker: TaskTracker::new(),
            runtime,
            closed: AtomicBool::new(false),
            me: me.clone(),
            config,
        });
        {
            let mut reg = inner.write();
            for loaded in opened.queues {
                let name = loaded.name.clone();
                let q = Queue::restore(loaded, store.clone(), limits, cancel.child_token());
                inner.spawn_timer(&q);
                reg.queues.insert(name, q);
            }
            reg.reroute();
        }
        tracing::info!(dir = %inner.config.data_dir.display(), fsync = %inner.config.fsync, "queue engine open");
        Ok(QueueEngine { inner })
    }

    /// Creates a queue, or checks that an existing one has these options. Idempotent;
    /// different options give `OptionsMismatch` naming the first difference. The
    /// bindings are added to the queue's bindings rather than compared, since they
    /// change through bind/unbind.
    pub async fn declare(&self, name: &str, options: &QueueOptions) -> Result<(), QueueError> {
        let settings = Settings::resolve(name, options, &self.inner.config.defaults)?;
        let patterns = options
            .bindings
            .iter()
            .map(|b| validate_pattern(b))
            .collect::<Result<Vec<_>, _>>()?;
        let ticket = self.inner.declare(name, settings, patterns)?;
        ticket.wait().await
    }

    /// Deletes a queue with all its messages; its consumers stop receiving and its
    /// outstanding deliveries become unknown. Its dead-letter queue is left alone.
    pub async fn delete(&self, name: &str) -> Result<(), QueueError> {
        self.inner.check_open()?;
        let q = {
            let mut reg = self.inner.write();
            let q = reg
                .queues
                .remove(name)
                .ok_or_else(|| QueueError::NotFound(name.to_owned()))?;
            reg.reroute();
            q
        };
        q.mark_deleted();
        let ticket = self.inner.store.batch(|b| {
            b.drop_queue(q.qid);
            b.remove_definition(name);
            b.ticket()
        });
        ticket.wait().await
    }

    /// Adds a binding pattern to a queue (idempotent).
    pub async fn bind(&self, name: &str, pattern: &str) -> Result<(), QueueError> {
        let pattern = validate_pattern(pattern)?;
        self.inner
            .rebind(name, |b| {
                if b.contains(&pattern) {
                    false
                } else {
                    b.push(pattern.clone());
                    true
                }
            })?
            .wait()
            .await
    }

    /// Removes a binding pattern from a queue (no error if it was not bound).
    pub async fn unbind(&self, name: &str, pattern: &str) -> Result<(), QueueError> {
        self.inner
            .rebind(name, |b| {
                let before = b.len();
                b.retain(|p| p != pattern);
                b.len() != before
            })?
            .wait()
            .await
    }

    /// How many queues exist (for `--max-queues`).
    pub fn queue_count(&self) -> usize {
        self.inner.read().queues.len()
    }

    /// One queue's figures.
    pub async fn info(&self, name: &str) -> Result<QueueInfo, QueueError> {
        Ok(self.inner.queue(name)?.info())
    }

    /// A queue's figures and its options, defaults filled in (bindings as in the
    /// figures).
    pub async fn info_with_options(
        &self,
        name: &str,
    ) -> Result<(QueueInfo, QueueOptions), QueueError> {
        let q = self.inner.queue(name)?;
        let info = q.info();
        let options = q.settings.to_options(info.bindings.clone());
        Ok((info, options))
    }

    /// Every queue's figures, by name.
    pub async fn list(&self) -> Vec<QueueInfo> {
        let queues: Vec<Arc<Queue>> = self.inner.read().queues.values().cloned().collect();
        queues.iter().map(|q| q.info()).collect()
    }

    /// The oldest dead letters of `queue` (at most `limit`, 0 meaning all, capped at
    /// [`MAX_DEAD_LETTERS_LISTED`]). Their ids are positions in the dead-letter queue.
    pub async fn dead_letters(
        &self,
        queue: &str,
        limit: u32,
    ) -> Result<Vec<DeadLetter>, QueueError> {
        let q = self.inner.queue(queue)?;
        let Ok(dlq) = self.inner.queue(&q.settings.dead_letter) else {
            return Ok(Vec::new());
        };
        let limit = if limit == 0 {
            MAX_DEAD_LETTERS_LISTED
        } else {
            limit.min(MAX_DEAD_LETTERS_LISTED)
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.inner.store.read(
            Range::Messages {
                qid: dlq.qid,
                from: 0,
            },
            usize::try_from(limit).unwrap_or(usize::MAX),
            usize::MAX,
            move |result| {
                let _ = tx.send(result);
            },
        );
        let loaded = rx.await.map_err(|_| QueueError::ShuttingDown)??;
        Ok(loaded
            .into_iter()
            .map(|l| {
                let (reason, attempts) = match l.message.dead {
                    Some(d) => (d.reason, d.attempts),
                    None => ("unknown".into(), l.message.deliveries),
                };
                DeadLetter {
                    id: l.key.1,
                    topic: l.message.topic,
                    attempts,
                    reason,
                    headers: l.message.headers,
                    payload: l.message.payload,
                }
            })
            .collect())
    }

    /// Moves up to `limit` (0: all) ready dead letters of `queue` back into it as
    /// fresh messages (attempt 1 again), oldest first. Returns how many moved, once
    /// they are durable. Dead letters currently delivered to a consumer of the
    /// dead-letter queue are not moved.
    pub async fn redrive(&self, queue: &str, limit: u32) -> Result<u64, QueueError> {
        let target = self.inner.queue(queue)?;
        let Ok(dlq) = self.inner.queue(&target.settings.dead_letter) else {
            return Ok(0);
        };
        let mut left = if limit == 0 {
            usize::MAX
        } else {
            usize::try_from(limit).unwrap_or(usize::MAX)
        };
        let mut moved = 0u64;
        let mut last_ticket = None;
        while left > 0 {
            let paged = dlq.paged.notified();
            let (batch, more) = dlq.take_ready(left.min(4096));
            if batch.is_empty() {
                if !more {
                    break;
                }
                // Wait for the page read take_ready started; bounded so a store that
                // stopped answering cannot hang the caller.
                if tokio::time::timeout(Duration::from_secs(5), paged)
                    .await
                    .is_err()
                {
                    break;
                }
                continue;
            }
            left -= batch.len();
            let now = now_ms();
            let mut done = Vec::with_capacity(batch.len());
            let mut failure = None;
            for (slot, msg) in batch {
                let size = msg.size();
                match target.append(redriven_copy(msg.clone()), None, now) {
                    Ok((Appended::Stored, ticket)) => {
                        last_ticket = ticket.or(last_ticket);
                        done.push((slot, size));
                        moved += 1;
                    }
                    Ok(_) => dlq.abort_move(slot, msg),
                    Err(err) => {
                        dlq.abort_move(slot, msg);
                        failure = Some(err);
                    }
                }
            }
            let stuck = done.is_empty();
            dlq.finish_move(&done, false);
            // A refused append (a full target, a failed store) puts the letters back:
            // taking them again would spin forever.
            if let Some(err) = failure {
                return Err(err);
            }
            if stuck {
                break;
            }
        }
        if let Some(ticket) = last_ticket {
            ticket.wait().await?;
        }
        Ok(moved)
    }

    /// Appends the message to every queue with a matching binding. The message is
    /// queued for storage when this is called, so publishes keep their call order;
    /// the returned future resolves once it is durable (per the fsync policy) in all
    /// of them, and should be awaited (or held) so that a fast publisher feels the
    /// store's pace. When no binding matches it is ready at once, without allocating.
    pub fn publish(
        &self,
        msg: &Publish,
    ) -> impl Future<Output = Result<PublishOutcome, QueueError>> + Send + use<> {
        let published = self.publish_now(msg);
        async move {
            match published {
                Published::Done(result) => result,
                Published::Pending(durable) => durable.await,
            }
        }
    }

    /// Like [`QueueEngine::publish`], but says at once whether the answer is already
    /// known. The connection layer uses it so that the common pub/sub publish (no
    /// binding matched) costs no allocation; only a publish that reached a queue
    /// boxes the future that waits for durability.
    pub fn publish_now(&self, msg: &Publish) -> Published {
        let (outcome, tickets) = match self.inner.route(msg) {
            Ok(None) => return Published::Done(Ok(PublishOutcome::default())),
            Ok(Some(r)) => r,
            Err(err) => return Published::Done(Err(err)),
        };
        Published::Pending(Box::pin(async move {
            for ticket in tickets {
                ticket.wait().await?;
            }
            Ok(outcome)
        }))
    }

    /// A session for one connection; `sink` receives its deliveries.
    pub fn session(&self, sink: Arc<dyn DeliverySink>) -> QueueSession {
        let id = self.inner.next_session.fetch_add(1, Ordering::Relaxed);
        QueueSession::new(self.inner.clone(), id, sink)
    }

    /// Per-queue figures as named entries (`queue.<name>.<figure>`) for the stats frame.
    pub fn stats(&self) -> Vec<(String, u64)> {
        let queues: Vec<Arc<Queue>> = self.inner.read().queues.values().cloned().collect();
        let mut out = Vec::with_capacity(queues.len() * 16);
        for q in queues {
            let i = q.info();
            let name = &q.name;
            for (figure, v) in [
                ("depth", i.depth),
                ("bytes", i.bytes),
                ("in_flight", i.in_flight),
                ("delayed", i.delayed),
                ("consumers", u64::from(i.consumers)),
                ("dead_lettered", i.dead_lettered),
                ("published", i.published),
                ("delivered", i.delivered),
                ("acked", i.acked),
                ("publish_rate", i.publish_rate),
                ("deliver_rate", i.deliver_rate),
                ("ack_rate", i.ack_rate),
            ]
            .into_iter()
            .chain(q.extra_stats())
            {
                out.push((format!("queue.{name}.{figure}"), v));
            }
        }
        // 1 once the store has failed (fail-stop); the log names the path and error.
        out.push((
            "storage.failed".into(),
            u64::from(self.storage_failure().is_some()),
        ));
        out
    }

    /// Why the store stopped taking writes, once a write or sync failed (fail-stop):
    /// the path and the OS error. Publishes that reach a queue, acks and confirms then
    /// fail with `StorageFailure` until the broker is restarted.
    pub fn storage_failure(&self) -> Option<String> {
        self.inner.store.failure().map(|e| e.to_string())
    }

    /// Stops the timers, writes out and `fdatasync`s everything queued (whatever the
    /// fsync policy), and closes the store. Later calls fail with `ShuttingDown`.
    pub async fn shutdown(&self) {
        if self.inner.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        self.inner.cancel.cancel();
        self.inner.tracker.close();
        self.inner.tracker.wait().await;
        let store = self.inner.store.clone();
        if tokio::task::spawn_blocking(move || store.shutdown())
            .await
            .is_err()
        {
            tracing::error!("store shutdown panicked");
        }
        tracing::info!("queue engine stopped");
    }
}

fn validate_pattern(p: &str) -> Result<String, QueueError> {
    Pattern::new(p).map_err(|e| QueueError::InvalidPattern {
        pattern: p.to_owned(),
        reason: e.to_string(),
    })?;
    Ok(p.to_owned())
}

type Routed = Option<(PublishOutcome, Vec<Ticket>)>;

impl EngineInner {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Registry> {
        self.registry.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Registry> {
        self.registry
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn check_open(&self) -> Result<(), QueueError> {
        if self.closed.load(Ordering::Relaxed) {
            Err(QueueError::ShuttingDown)
        } else {
            Ok(())
        }
    }

    pub(crate) fn queue(&self, name: &str) -> Result<Arc<Queue>, QueueError> {
        self.read()
            .queues
            .get(name)
            .cloned()
            .ok_or_else(|| QueueError::NotFound(name.to_owned()))
    }

    fn spawn_timer(&self, q: &Arc<Queue>) {
        let q = q.clone();
        let engine = self.me.clone();
        self.tracker.spawn_on(
            async move {
                loop {
                    let mut outbox = Vec::new();
                    let now = now_ms();
                    let next = q.on_timer(now, &mut outbox);
                    if !outbox.is_empty() {
                        match engine.upgrade() {
                            Some(engine) => engine.move_dead_letters(&q, outbox),
                            None => return,
                        }
                    }
                    let wait = Duration::from_millis(next.saturating_sub(now_ms()));
                    tokio::select! {
                        () = q.cancel.cancelled() => return,
                        () = q.timer.notified() => {}
                        () = tokio::time::sleep(wait) => {}
                    }
                }
            },
            &self.runtime,
        );
    }

    fn declare(
        &self,
        name: &str,
        settings: Settings,
        patterns: Vec<String>,
    ) -> Result<Ticket, QueueError> {
        self.check_open()?;
        let mut reg = self.write();
        if let Some(q) = reg.queues.get(name).cloned() {
            if let Some(difference) = q.settings.difference(&settings) {
                return Err(QueueError::OptionsMismatch {
                    name: name.to_owned(),
                    difference,
                });
            }
            let changed = {
                let mut b = q.bindings.lock().unwrap_or_else(PoisonError::into_inner);
                let before = b.len();
                for p in patterns {
                    if !b.contains(&p) {
                        b.push(p);
                    }
                }
                b.len() != before
            };
            if changed {
                reg.reroute();
                return Ok(self.persist(&q));
            }
            return Ok(self.store.batch(|b| b.ticket()));
        }
        let q = self.create_locked(&mut reg, name, settings, patterns);
        reg.reroute();
        Ok(self.persist(&q))
    }

    fn create_locked(
        &self,
        reg: &mut Registry,
        name: &str,
        settings: Settings,
        bindings: Vec<String>,
    ) -> Arc<Queue> {
        let qid = self.next_qid.fetch_add(1, Ordering::Relaxed);
        let q = Queue::create(
            name,
            qid,
            settings,
            bindings,
            self.store.clone(),
            self.limits,
            self.cancel.child_token(),
        );
        self.spawn_timer(&q);
        reg.queues.insert(name.to_owned(), q.clone());
        tracing::info!(queue = name, qid, "queue created");
        q
    }

    fn persist(&self, q: &Arc<Queue>) -> Ticket {
        let def = StoredDefinition {
            qid: q.qid,
            settings: q.settings.clone(),
            bindings: q
                .bindings
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        };
        self.store.batch(|b| {
            b.put_definition(&q.name, &def);
            b.ticket()
        })
    }

    fn rebind(
        &self,
        name: &str,
        change: impl FnOnce(&mut Vec<String>) -> bool,
    ) -> Result<Ticket, QueueError> {
        self.check_open()?;
        let mut reg = self.write();
        let q = reg
            .queues
            .get(name)
            .cloned()
            .ok_or_else(|| QueueError::NotFound(name.to_owned()))?;
        let changed = change(&mut q.bindings.lock().unwrap_or_else(PoisonError::into_inner));
        if changed {
            reg.reroute();
            Ok(self.persist(&q))
        } else {
            Ok(self.store.batch(|b| b.ticket()))
        }
    }

    /// The dead-letter queue of `source`, created with default options if missing.
    fn dead_letter_queue(&self, source: &Queue) -> Result<Arc<Queue>, QueueError> {
        let name = &source.settings.dead_letter;
        if let Ok(q) = self.queue(name) {
            return Ok(q);
        }
        self.check_open()?;
        let settings = Settings::resolve(name, &QueueOptions::default(), &self.config.defaults)?;
        let mut reg = self.write();
        if let Some(q) = reg.queues.get(name) {
            return Ok(q.clone());
        }
        let q = self.create_locked(&mut reg, name, settings, Vec::new());
        drop(reg);
        let _ = self.persist(&q);
        Ok(q)
    }

    /// Moves messages that used up their deliveries into the dead-letter queue:
    /// stored there first, removed here after, so a crash in between duplicates
    /// rather than loses.
    pub(crate) fn move_dead_letters(&self, source: &Arc<Queue>, outbox: Vec<DeadLetterMove>) {
        if outbox.is_empty() {
            return;
        }
        let dlq = match self.dead_letter_queue(source) {
            Ok(q) => q,
            Err(err) => {
                tracing::error!(queue = %source.name, error = %err, "cannot create the dead-letter queue");
                for m in outbox {
                    source.abort_move(m.slot, m.message);
                }
                return;
            }
        };
        let now = now_ms();
        let mut done = Vec::with_capacity(outbox.len());
        for m in outbox {
            let size = m.message.size();
            let mut copy = dead_letter_copy(m.message.clone(), "max_deliveries");
            // A dead letter keeps its original publish time for the record, but the
            // dead-letter queue's own TTL counts from its arrival there.
            copy.published_ms = m.message.published_ms;
            match dlq.append(copy, None, now) {
                Ok((Appended::Stored | Appended::Duplicate, _)) => done.push((m.slot, size)),
                Ok((Appended::Rejected | Appended::Gone, _)) | Err(_) => {
                    tracing::warn!(queue = %source.name, dlq = %dlq.name, "dead-letter queue refused a message; kept in its queue");
                    source.abort_move(m.slot, m.message);
                }
            }
        }
        tracing::debug!(queue = %source.name, count = done.len(), "dead-lettered");
        source.finish_move(&done, true);
    }

    fn route(&self, msg: &Publish) -> Result<Routed, QueueError> {
        let reg = self.read();
        let mut result: Routed = None;
        let mut error = None;
        let now = now_ms();
        reg.routes.for_each_match(&msg.topic, |q| {
            if error.is_some() {
                return;
            }
            let (outcome, tickets) =
                result.get_or_insert_with(|| (PublishOutcome::default(), Vec::new()));
            let message = Message {
                topic: msg.topic.clone(),
                headers: msg.headers.clone(),
                payload: msg.payload.clone(),
                message_id: msg.message_id.clone(),
                reply_to: msg.reply_to.clone(),
                published_ms: now,
                deliveries: 0,
                dead: None,
            };
            match q.append(message, msg.delay_ms, now) {
                Ok((appended, ticket)) => {
                    match appended {
                        Appended::Stored => outcome.queues += 1,
                        Appended::Duplicate => {
                            outcome.queues += 1;
                            outcome.duplicate = true;
                        }
                        Appended::Rejected => outcome.rejected += 1,
                        Appended::Gone => {}
                    }
                    if let Some(t) = ticket {
                        tickets.push(t);
                    }
                }
                Err(err) => error = Some(err),
            }
        });
        match error {
            Some(err) => Err(err),
            None => Ok(result),
        }
    }
}

impl Drop for EngineInner {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}
