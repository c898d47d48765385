//! `QueueEngine`: the queue registry and the public API the connection layer calls —
//! declare, delete, bind, publish, figures — and the engine's one timer task.
//! Dead-letter moves are in `dead_letter.rs`, redrive in `redrive.rs`, consumers in
//! `session.rs`.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};
use std::time::Duration;

use smallvec::SmallVec;
use tidings_protocol::{
    CancelReason, ConsumerCancelled, Pattern, Publish, QueueInfo, QueueOptions,
};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::queue::Clock;
use crate::queue::config::EngineConfig;
use crate::queue::deadlines::Deadlines;
use crate::queue::durable::{Appended, DedupCheck, Limits, Queue, QueueContext};
use crate::queue::error::QueueError;
use crate::queue::link::DeliverySink;
use crate::queue::options::{Settings, StoredDefinition};
use crate::queue::record::Message;
use crate::queue::routing::Routes;
use crate::queue::session::ConsumerSession;
use crate::storage::{Store, Ticket};

/// What [`QueueEngine::publish_now`] knows at once about a publish.
pub enum Published {
    /// No queue took it, or it was refused: the answer is known now.
    Done(Result<PublishOutcome, QueueError>),
    /// At least one queue took it; [`Durable::wait`] resolves once it is durable in
    /// all of them.
    Pending(Durable),
}

/// A publish that reached queues, waiting for the commits that make it durable.
/// A plain value (no boxed future per publish): the connection's confirm task holds
/// these in order and awaits each in turn.
pub struct Durable {
    outcome: PublishOutcome,
    tickets: Tickets,
}

impl Durable {
    /// True when [`Durable::wait`] would not wait: every commit it needs is done.
    pub fn is_done(&self) -> bool {
        self.tickets.iter().all(Ticket::is_done)
    }

    /// What the publish did, once every queue that took it has made it durable; an
    /// error if a commit failed or the store stopped first.
    pub async fn wait(self) -> Result<PublishOutcome, QueueError> {
        for ticket in self.tickets {
            ticket.wait().await?;
        }
        Ok(self.outcome)
    }
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
pub(crate) struct Registry {
    pub queues: BTreeMap<String, Arc<Queue>>,
    pub by_id: HashMap<u32, Arc<Queue>>,
    pub routes: Routes,
    /// Whether any queue has a binding; shared with [`EngineInner::bound`], so a
    /// publish can know without the lock.
    bound: Arc<AtomicBool>,
}

impl Registry {
    /// Indexes every queue's bindings (at start).
    fn route_all(&mut self) {
        self.routes = Routes::build(self.queues.values());
        self.publish_bound();
    }

    /// Re-indexes one queue whose bindings change from `old` to `new` (none once
    /// it is deleted).
    fn reroute(&mut self, q: &Arc<Queue>, old: &[String], new: &[String]) {
        self.routes.rebind(q, old, new);
        self.publish_bound();
    }

    fn publish_bound(&self) {
        // Under the write lock, before the change is answered: a publish that
        // follows the answer sees it.
        self.bound.store(!self.routes.is_empty(), Ordering::Release);
    }
}

pub(crate) struct EngineInner {
    pub config: EngineConfig,
    pub store: Arc<Store>,
    pub limits: Limits,
    pub deadlines: Arc<Deadlines>,
    pub clock: Clock,
    registry: RwLock<Registry>,
    /// Whether any queue has a binding (kept by the registry).
    bound: Arc<AtomicBool>,
    next_qid: AtomicU32,
    next_session: AtomicU64,
    cancel: CancellationToken,
    pub tracker: TaskTracker,
    /// Work in motion outside any queue's lock: the timer running due queues, and
    /// dead-letter moves waiting for their copy's commit ([`QueueEngine::settle`]).
    pub moves: Arc<AtomicUsize>,
    pub runtime: tokio::runtime::Handle,
    closed: AtomicBool,
}

/// The durable-queue engine. A cheap `Clone` handle; every connection shares one.
#[derive(Clone)]
pub struct QueueEngine {
    pub(crate) inner: Arc<EngineInner>,
}

impl QueueEngine {
    /// Opens the store in `config.data_dir` (creating it if needed) and restores every
    /// queue: definitions, bindings, messages in order with their attempt counts,
    /// delayed messages with their due times, and dedup ids.
    ///
    /// Blocks while sled opens; must be called inside a tokio runtime (the engine's
    /// timer task is spawned on it).
    pub fn open(config: EngineConfig) -> Result<QueueEngine, QueueError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            QueueError::Storage("QueueEngine::open must be called inside a tokio runtime".into())
        })?;
        let opened = Store::open(&config)?;
        let store = Arc::new(opened.store);
        let limits = Limits::from_config(&config);
        let registry = Registry::default();
        let bound = registry.bound.clone();
        let inner = Arc::new(EngineInner {
            limits,
            store: store.clone(),
            deadlines: Arc::new(Deadlines::default()),
            clock: match &config.clock {
                Some(manual) => Clock::Manual(manual.clone()),
                None => Clock::System,
            },
            registry: RwLock::new(registry),
            bound,
            next_qid: AtomicU32::new(opened.next_qid),
            next_session: AtomicU64::new(1),
            cancel: CancellationToken::new(),
            tracker: TaskTracker::new(),
            moves: Arc::new(AtomicUsize::new(0)),
            runtime,
            closed: AtomicBool::new(false),
            config,
        });
        {
            let cx = inner.context();
            let mut reg = inner.write();
            for loaded in opened.queues {
                let name = loaded.name.clone();
                let q = Queue::restore(loaded, &cx);
                reg.by_id.insert(q.qid, q.clone());
                reg.queues.insert(name, q);
            }
            reg.route_all();
        }
        spawn_timer(&inner);
        tracing::info!(dir = %inner.config.data_dir.display(), fsync = %inner.config.fsync, "queue engine open");
        Ok(QueueEngine { inner })
    }

    /// Creates a queue, or checks that an existing one has these options. Idempotent;
    /// different options give `OptionsMismatch` naming the first difference. The
    /// bindings are added to the queue's bindings rather than compared, since they
    /// change through bind/unbind. A dead-letter cycle (`a` dead-letters into `b`,
    /// which dead-letters into `a`) is refused with `InvalidQueue`.
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

    /// Deletes a queue with all its messages. Each of its consumers is ended with a
    /// CONSUMER_CANCELLED notice to its connection and its id freed; its outstanding
    /// deliveries become unknown. Its dead-letter queue is a queue of its own (maybe
    /// shared with others) and is left alone, letters and all.
    pub async fn delete(&self, name: &str) -> Result<(), QueueError> {
        self.inner.check_open()?;
        let q = {
            let mut reg = self.inner.write();
            let q = reg
                .queues
                .remove(name)
                .ok_or_else(|| QueueError::NotFound(name.to_owned()))?;
            reg.by_id.remove(&q.qid);
            let old = q.bindings_now();
            reg.reroute(&q, &old, &[]);
            q
        };
        for ended in q.mark_deleted() {
            if ended.link.consumer_ended(ended.consumer_id, q.qid) {
                ended.link.sink.cancelled(ConsumerCancelled::new(
                    ended.consumer_id,
                    CancelReason::QueueDeleted,
                    format!("queue `{name}` was deleted"),
                ));
            }
        }
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

    /// How many (queue, binding) pairs the routing index holds: every distinct
    /// binding of every queue once. For tests and diagnostics: a binding left behind
    /// by an unbind or a delete would show here, where no publish can see it.
    pub fn routed_bindings(&self) -> usize {
        self.inner.read().routes.len()
    }

    /// One queue's figures.
    pub fn info(&self, name: &str) -> Result<QueueInfo, QueueError> {
        Ok(self.inner.queue(name)?.info())
    }

    /// A queue's figures and its options, defaults filled in (bindings as in the
    /// figures).
    pub fn info_with_options(&self, name: &str) -> Result<(QueueInfo, QueueOptions), QueueError> {
        let q = self.inner.queue(name)?;
        let info = q.info();
        let options = q.settings.to_options(info.bindings.clone());
        Ok((info, options))
    }

    /// Every queue's figures, by name.
    pub fn list(&self) -> Vec<QueueInfo> {
        let queues: Vec<Arc<Queue>> = self.inner.read().queues.values().cloned().collect();
        queues.iter().map(|q| q.info()).collect()
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
                Published::Pending(durable) => durable.wait().await,
            }
        }
    }

    /// Like [`QueueEngine::publish`], but says at once whether the answer is already
    /// known. The connection layer uses it so that the common pub/sub publish (no
    /// binding matched) is answered at once, and a publish that reached a queue
    /// joins its connection's confirm queue.
    pub fn publish_now(&self, msg: &Publish) -> Published {
        let (outcome, tickets) = match self.inner.route(msg) {
            Ok(None) => return Published::Done(Ok(PublishOutcome::default())),
            Ok(Some(r)) => r,
            Err(err) => return Published::Done(Err(err)),
        };
        Published::Pending(Durable { outcome, tickets })
    }

    /// A consumer session for one connection; `sink` receives its deliveries.
    pub fn session(&self, sink: Arc<dyn DeliverySink>) -> ConsumerSession {
        let id = self.inner.next_session.fetch_add(1, Ordering::Relaxed);
        ConsumerSession::new(self.inner.clone(), id, sink)
    }

    /// Until the guard is dropped, this thread's queue writes do not wake the store
    /// thread; the guard does, once (see `Store::defer_wakes`). Never held across
    /// an `.await`.
    pub(crate) fn defer_store_wakes(&self) -> crate::storage::DeferredWakes<'_> {
        self.inner.store.defer_wakes()
    }

    /// Most credit a consumer may have; larger requests are clamped to it.
    pub fn max_credit(&self) -> u32 {
        self.inner.limits.max_credit
    }

    /// Per-queue figures as named entries (`queue.<name>.<figure>`) for the stats frame.
    pub fn stats(&self) -> Vec<(String, u64)> {
        let queues: Vec<Arc<Queue>> = self.inner.read().queues.values().cloned().collect();
        let mut out = Vec::with_capacity(queues.len() * 19);
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

    /// Waits until nothing is in motion: every write queued so far is durable and
    /// its callbacks have run (messages visible, moves within queues finished),
    /// whatever is due at the current time has run, and dead-letter moves are done.
    /// For tests and tools that need a quiet point; gives up after about a second
    /// of continuous activity.
    pub async fn settle(&self) {
        let inner = &self.inner;
        let busy = || {
            let due = inner
                .deadlines
                .next()
                .is_some_and(|at| at <= inner.clock.now_ms());
            let queues: Vec<Arc<Queue>> = inner.read().queues.values().cloned().collect();
            due || inner.moves.load(Ordering::SeqCst) > 0 || queues.iter().any(|q| !q.is_quiet())
        };
        for _ in 0..1000 {
            // Quiet before the rounds are queued, not only after: work in motion
            // then (a dead-letter move finishing) may queue its writes after the
            // rounds and be quiet by the time they resolve, with nothing durable.
            let quiet_before = !busy();
            // Two rounds: the second is queued after the first resolved, so the
            // first round's callbacks have run when it resolves.
            for _ in 0..2 {
                if inner.store.batch(|b| b.ticket()).wait().await.is_err() {
                    return;
                }
            }
            if quiet_before && !busy() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Stops the timer, writes out and `fdatasync`s everything queued (whatever the
    /// fsync policy), and closes the store. Later calls fail with `ShuttingDown`.
    pub async fn shutdown(&self) {
        if self.inner.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        self.inner.cancel.cancel();
        self.inner.tracker.close();
        self.inner.tracker.wait().await;
        self.inner.finish_moves().await;
        for q in self.inner.read().queues.values() {
            q.settle_mark();
        }
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

/// The engine's one timer: runs each queue when its registered deadline comes,
/// and hands the messages leaving it to the dead-letter moves.
fn spawn_timer(inner: &Arc<EngineInner>) {
    let engine: Weak<EngineInner> = Arc::downgrade(inner);
    let deadlines = inner.deadlines.clone();
    let clock = inner.clock.clone();
    let in_motion = inner.moves.clone();
    let cancel = inner.cancel.clone();
    inner.tracker.spawn_on(
        async move {
            loop {
                let now = clock.now_ms();
                // Counted from before the due queues leave the schedule until their
                // departures are handed on, so `settle` never sees a gap.
                in_motion.fetch_add(1, Ordering::SeqCst);
                let due = deadlines.take_due(now);
                if !due.is_empty() {
                    let Some(engine) = engine.upgrade() else {
                        in_motion.fetch_sub(1, Ordering::SeqCst);
                        return;
                    };
                    for qid in due {
                        if let Some(q) = engine.queue_by_id(qid) {
                            let departures = q.run_due(now);
                            engine.move_departures(&q, departures);
                        }
                    }
                }
                in_motion.fetch_sub(1, Ordering::SeqCst);
                let sleep = match deadlines.next() {
                    Some(at) if !clock.is_manual() => {
                        Duration::from_millis(at.saturating_sub(clock.now_ms()))
                    }
                    Some(at) if at <= clock.now_ms() => Duration::ZERO,
                    _ => Duration::from_secs(3600),
                };
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = deadlines.changed.notified() => {}
                    () = clock.moved() => {}
                    () = tokio::time::sleep(sleep) => {}
                }
            }
        },
        &inner.runtime,
    );
}

/// What a publish that reached queues waits for: one ticket per queue that stored
/// it, inline for the usual one queue (no allocation per publish).
type Tickets = SmallVec<[Ticket; 1]>;
type Routed = Option<(PublishOutcome, Tickets)>;

impl EngineInner {
    pub fn read(&self) -> RwLockReadGuard<'_, Registry> {
        self.registry.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn write(&self) -> RwLockWriteGuard<'_, Registry> {
        self.registry
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub fn context(&self) -> QueueContext {
        QueueContext {
            store: self.store.clone(),
            limits: self.limits,
            deadlines: self.deadlines.clone(),
            clock: self.clock.clone(),
        }
    }

    pub fn check_open(&self) -> Result<(), QueueError> {
        if self.closed.load(Ordering::Relaxed) {
            Err(QueueError::ShuttingDown)
        } else {
            Ok(())
        }
    }

    pub fn queue(&self, name: &str) -> Result<Arc<Queue>, QueueError> {
        self.read()
            .queues
            .get(name)
            .cloned()
            .ok_or_else(|| QueueError::NotFound(name.to_owned()))
    }

    /// Lets the moves within queues that are waiting for their new copy's commit
    /// finish (their old copies removed), so that a graceful shutdown leaves no
    /// message stored twice. Bounded: a store that stopped answering cannot hold
    /// the shutdown up, and what is left is only a duplicate, never a loss.
    async fn finish_moves(&self) {
        for _ in 0..20 {
            let queues: Vec<Arc<Queue>> = self.read().queues.values().cloned().collect();
            let moving = queues.iter().any(|q| q.has_moves_pending());
            let ticket = self.store.batch(|b| b.ticket());
            if ticket.wait().await.is_err() || !moving {
                return;
            }
        }
    }

    pub fn queue_by_id(&self, qid: u32) -> Option<Arc<Queue>> {
        self.read().by_id.get(&qid).cloned()
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
            let (old, new, changed) = q.change_bindings(|b| {
                let before = b.len();
                for p in patterns {
                    if !b.contains(&p) {
                        b.push(p);
                    }
                }
                b.len() != before
            });
            if changed {
                reg.reroute(&q, &old, &new);
                return Ok(self.persist(&q, new));
            }
            return Ok(self.store.batch(|b| b.ticket()));
        }
        check_dead_letter_cycle(&reg, name, &settings)?;
        let q = self.create_locked(&mut reg, name, settings, patterns);
        let new = q.bindings_now();
        reg.reroute(&q, &[], &new);
        Ok(self.persist(&q, new))
    }

    pub fn create_locked(
        &self,
        reg: &mut Registry,
        name: &str,
        settings: Settings,
        bindings: Vec<String>,
    ) -> Arc<Queue> {
        let qid = self.next_qid.fetch_add(1, Ordering::Relaxed);
        let q = Queue::create(name, qid, settings, bindings, &self.context());
        reg.queues.insert(name.to_owned(), q.clone());
        reg.by_id.insert(qid, q.clone());
        tracing::info!(queue = name, qid, "queue created");
        q
    }

    /// Stores `q`'s definition with `bindings`, its bindings as they are now.
    pub fn persist(&self, q: &Arc<Queue>, bindings: Vec<String>) -> Ticket {
        let def = StoredDefinition {
            qid: q.qid,
            settings: q.settings.clone(),
            bindings,
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
        let (old, new, changed) = q.change_bindings(change);
        if changed {
            reg.reroute(&q, &old, &new);
            Ok(self.persist(&q, new))
        } else {
            Ok(self.store.batch(|b| b.ticket()))
        }
    }

    fn route(&self, msg: &Publish) -> Result<Routed, QueueError> {
        // Nothing bound anywhere (a broker used for pub/sub only): no lock, no clock.
        if !self.bound.load(Ordering::Acquire) {
            return Ok(None);
        }
        let reg = self.read();
        let mut result: Routed = None;
        let mut error = None;
        // Read once the first queue matched: a topic no queue binds costs no clock.
        let mut now = 0;
        // Each matching queue is appended to once the next match (or the end) is
        // known, so that the last one, nearly always the only one, takes the message
        // itself rather than a copy of its handles.
        let mut held: Option<(Arc<Queue>, Message)> = None;
        let mut append = |q: &Queue, message: Message, now: u64, error: &mut Option<QueueError>| {
            let (outcome, tickets) =
                result.get_or_insert_with(|| (PublishOutcome::default(), Tickets::new()));
            match q.append(message, msg.delay_ms, now, DedupCheck::Check) {
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
                Err(err) => *error = Some(err),
            }
        };
        reg.routes.for_each_match(&msg.topic, |q| {
            if error.is_some() {
                return;
            }
            match &mut held {
                None => {
                    let max = self.config.max_message_id_len;
                    if let Some(id) = msg.message_id.as_ref().filter(|id| id.len() > max) {
                        error = Some(QueueError::InvalidArgument(format!(
                            "message id is {} bytes, longer than the {max} a queued message may carry",
                            id.len()
                        )));
                        return;
                    }
                    now = self.clock.now_ms();
                    held = Some((q.clone(), Message::from_publish(msg, now)));
                }
                Some((previous, message)) => {
                    let previous = std::mem::replace(previous, q.clone());
                    append(&previous, message.clone(), now, &mut error);
                }
            }
        });
        if let (Some((q, message)), None) = (held, &error) {
            append(&q, message, now, &mut error);
        }
        match error {
            Some(err) => Err(err),
            None => Ok(result),
        }
    }
}

/// Refuses a new queue whose dead-letter chain (its dead-letter queue, that one's,
/// and so on, among the queues that exist) leads back to it: a message would
/// bounce between them forever.
fn check_dead_letter_cycle(
    reg: &Registry,
    name: &str,
    settings: &Settings,
) -> Result<(), QueueError> {
    let mut next = settings.dead_letter.as_str();
    let mut path = vec![name.to_owned()];
    while let Some(q) = reg.queues.get(next) {
        path.push(next.to_owned());
        next = q.settings.dead_letter.as_str();
        if next == name {
            path.push(name.to_owned());
            return Err(QueueError::InvalidQueue(format!(
                "dead_letter `{}` would make a dead-letter cycle: {}",
                settings.dead_letter,
                path.join(" -> ")
            )));
        }
        if path.len() > reg.queues.len() + 1 {
            break;
        }
    }
    Ok(())
}

impl Drop for EngineInner {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}
