//! `Queue`: one durable queue's state — the in-memory window of ready messages, the
//! next delayed ones, what is in flight to which consumer — and every operation on it.
//!
//! The full backlog lives in the store; memory holds at most `ready_window` ready
//! messages and `delayed_window` delayed ones, and pages in more by key range when
//! consumers get to them. Messages become visible to consumers only once the batch
//! that stored them has committed.
//!
//! Lock order: engine registry → queue → session → store. A queue never takes the
//! registry or another queue's lock while holding its own; moving a message to a
//! dead-letter queue is therefore handed back to the caller as a [`DeadLetterMove`].

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Instant;

use tidings_protocol::{Delivery, QueueInfo, Text};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::queue::config::EngineConfig;
use crate::queue::error::QueueError;
use crate::queue::options::Settings;
use crate::queue::record::{DeadInfo, Message};
use crate::queue::session::SessionInner;
use crate::storage::{
    CommitListener, Counters, Loaded, LoadedQueue, Range, Slot, Store, StoreError, Ticket,
};

/// How often the timer wakes with nothing else to do, to sample rates.
const RATE_TICK_MS: u64 = 1000;
/// Rate samples kept (one per tick): rates cover about this many seconds.
const RATE_SAMPLES: usize = 5;

/// Wall-clock milliseconds: due times and publish times are stored, so they cannot
/// be `Instant`s.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// How a returned delivery is requeued.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Requeue {
    /// Ready again at once (consumer gone).
    Now,
    /// After this many milliseconds (nack with a delay).
    After(u64),
    /// After the queue's backoff for the attempt (nack, ack timeout).
    Backoff,
}

/// A message leaving its queue for the dead-letter queue. It stays stored in its queue
/// until [`Queue::finish_move`] runs, after the dead-letter queue has taken it, so a
/// crash in between duplicates it rather than losing it.
pub(crate) struct DeadLetterMove {
    pub slot: Slot,
    pub message: Message,
}

/// What a publish did to one queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Appended {
    Stored,
    Duplicate,
    Rejected,
    /// The queue was deleted meanwhile.
    Gone,
}

struct Entry {
    slot: Slot,
    msg: Message,
}

struct PendingEntry {
    epoch: u64,
    /// Where a ready message went (`seq` alone matters for a delayed one).
    slot: Slot,
    due: Option<u64>,
    msg: Message,
}

struct InFlight {
    msg: Message,
    slot: Slot,
    session: Arc<SessionInner>,
    consumer_id: u32,
    delivery_id: u64,
    deadline: u64,
}

struct Consumer {
    session: Arc<SessionInner>,
    id: u32,
    window: u32,
    outstanding: u32,
    /// Deliveries it may still get in all (CONSUME's `limit`), `None` unlimited.
    remaining: Option<u32>,
    alive: bool,
}

impl Consumer {
    fn available(&self) -> u32 {
        if self.alive {
            let window = self.window.saturating_sub(self.outstanding);
            self.remaining.map_or(window, |left| window.min(left))
        } else {
            0
        }
    }
}

#[derive(Default)]
struct Dedup {
    ids: HashMap<Text, u64>,
    order: VecDeque<(u64, Text)>,
}

#[derive(Default, Clone, Copy)]
struct Totals {
    published: u64,
    delivered: u64,
    acked: u64,
}

#[derive(Default)]
struct Stats {
    totals: Totals,
    dead_lettered: u64,
    rejected: u64,
    dropped: u64,
    expired: u64,
    duplicates: u64,
    /// Deliveries with an attempt number above 1.
    redelivered: u64,
    samples: VecDeque<(Instant, Totals)>,
}

struct State {
    deleted: bool,
    c: Counters,
    listen_epoch: u64,
    /// Redeliveries, served before fresh messages.
    retry: VecDeque<Entry>,
    /// Fresh ready messages in `seq` order: every stored ready message below
    /// `paged_upto` is here, in `retry`, in flight or on its way to the DLQ.
    window: VecDeque<Entry>,
    window_bytes: usize,
    paged_upto: u64,
    /// Ready messages in the store at or above `paged_upto`.
    unloaded: u64,
    paging: bool,
    /// Stored, waiting for their batch to commit before consumers may see them.
    pending: VecDeque<PendingEntry>,
    /// The next delayed messages by `(due, seq)`; all stored ones below
    /// `delayed_upto` are here (all of them when it is `None`).
    delayed: BTreeMap<(u64, u64), Message>,
    delayed_upto: Option<(u64, u64)>,
    delayed_unloaded: u64,
    delayed_paging: bool,
    in_flight: HashMap<u64, InFlight>,
    in_flight_bytes: u64,
    deadlines: BTreeSet<(u64, u64)>,
    consumers: Vec<Consumer>,
    next_consumer: usize,
    /// Fresh messages up to this seq may be delivered: the store knows they may have
    /// been (see store.rs on `mark`).
    mark_durable: u64,
    mark_pending: Option<(u64, u64)>,
    /// Messages at or below this seq were stored before the last restart and may have
    /// been delivered then: they come back counted as delivered once.
    restart_mark: u64,
    /// Every seq below this that went through `pending` has committed. Pages keep
    /// only such seqs: the store may already hold later rounds that are applied but
    /// not yet durable.
    committed_below: u64,
    /// Seqs dropped (drop-head) while waiting for their commit, whose removal may not
    /// have reached the store when a page read runs: pages skip them.
    dropped: BTreeSet<u64>,
    timer_at: u64,
    dedup: Dedup,
    stats: Stats,
}

/// Memory bounds, copied from the engine config.
#[derive(Clone, Copy)]
pub(crate) struct Limits {
    pub ready_window: usize,
    pub ready_window_bytes: usize,
    pub delayed_window: usize,
    pub dedup_capacity: usize,
    pub max_pending_bytes: usize,
}

impl Limits {
    pub fn from_config(c: &EngineConfig) -> Self {
        Self {
            ready_window: c.ready_window.max(1),
            ready_window_bytes: c.ready_window_bytes.max(1),
            delayed_window: c.delayed_window.max(1),
            dedup_capacity: c.dedup_capacity.max(1),
            max_pending_bytes: c.max_pending_bytes,
        }
    }
}

/// One durable queue.
pub(crate) struct Queue {
    pub name: Text,
    pub qid: u32,
    pub settings: Settings,
    pub bindings: Mutex<Vec<String>>,
    state: Mutex<State>,
    store: Arc<Store>,
    limits: Limits,
    /// Wakes the timer task when something is due earlier than it planned.
    pub timer: Notify,
    /// Signalled after every page read, for redrive waiting on one.
    pub paged: Notify,
    pub cancel: CancellationToken,
    me: Weak<Queue>,
}

impl Queue {
    /// A new, empty queue.
    pub fn create(
        name: &str,
        qid: u32,
        settings: Settings,
        bindings: Vec<String>,
        store: Arc<Store>,
        limits: Limits,
        cancel: CancellationToken,
    ) -> Arc<Queue> {
        Self::build(
            name,
            qid,
            settings,
            bindings,
            store,
            limits,
            cancel,
            Counters::default(),
        )
    }

    /// A queue as found in the store at start.
    pub fn restore(
        loaded: LoadedQueue,
        store: Arc<Store>,
        limits: Limits,
        cancel: CancellationToken,
    ) -> Arc<Queue> {
        let def = loaded.definition;
        let q = Self::build(
            &loaded.name,
            def.qid,
            def.settings,
            def.bindings,
            store,
            limits,
            cancel,
            loaded.counters,
        );
        let now = now_ms();
        {
            let mut st = q.lock();
            st.restart_mark = loaded.counters.mark;
            st.mark_durable = loaded.counters.mark;
            st.unloaded = loaded.counters.m_count;
            st.delayed_unloaded = loaded.counters.d_count;
            q.take_page(&mut st, loaded.ready);
            q.take_delayed_page(&mut st, (0, 0), loaded.delayed);
            let mut stale = Vec::new();
            let mut ids: Vec<(String, u64)> = loaded.dedup;
            ids.sort_by_key(|(_, ts)| *ts);
            for (id, ts) in ids {
                if now < ts.saturating_add(q.settings.dedup_window_ms) {
                    let id = Text::from(id);
                    st.dedup.ids.insert(id.clone(), ts);
                    st.dedup.order.push_back((ts, id));
                } else {
                    stale.push(id);
                }
            }
            if !stale.is_empty() {
                q.store.batch(|b| {
                    for id in &stale {
                        b.remove_dedup(q.qid, id);
                    }
                });
            }
        }
        q
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        name: &str,
        qid: u32,
        settings: Settings,
        bindings: Vec<String>,
        store: Arc<Store>,
        limits: Limits,
        cancel: CancellationToken,
        c: Counters,
    ) -> Arc<Queue> {
        Arc::new_cyclic(|me| Queue {
            name: Text::from(name),
            qid,
            settings,
            bindings: Mutex::new(bindings),
            state: Mutex::new(State {
                deleted: false,
                c,
                listen_epoch: 0,
                retry: VecDeque::new(),
                window: VecDeque::new(),
                window_bytes: 0,
                paged_upto: 0,
                unloaded: 0,
                paging: false,
                pending: VecDeque::new(),
                delayed: BTreeMap::new(),
                delayed_upto: None,
                delayed_unloaded: 0,
                delayed_paging: false,
                in_flight: HashMap::new(),
                in_flight_bytes: 0,
                deadlines: BTreeSet::new(),
                consumers: Vec::new(),
                next_consumer: 0,
                mark_durable: 0,
                mark_pending: None,
                restart_mark: 0,
                committed_below: c.next_seq,
                dropped: BTreeSet::new(),
                timer_at: u64::MAX,
                dedup: Dedup::default(),
                stats: Stats::default(),
            }),
            store,
            limits,
            timer: Notify::new(),
            paged: Notify::new(),
            cancel,
            me: me.clone(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn arc(&self) -> Arc<Queue> {
        // `self` is only ever reached through an `Arc<Queue>` built by `build`.
        self.me
            .upgrade()
            .expect("a queue is always owned by an Arc")
    }

    fn listener(&self) -> Arc<dyn CommitListener> {
        self.arc()
    }

    fn wake_timer_at(&self, st: &mut State, at: u64) {
        if at < st.timer_at {
            st.timer_at = at;
            self.timer.notify_one();
        }
    }

    // ---------------------------------------------------------------- publish

    /// Appends a message (a publish, a dead letter, a redriven message). Returns what
    /// happened and, when something was written, a ticket for its commit.
    pub fn append(
        &self,
        mut msg: Message,
        delay_ms: Option<u64>,
        now: u64,
    ) -> Result<(Appended, Option<Ticket>), QueueError> {
        let mut st = self.lock();
        if st.deleted {
            return Ok((Appended::Gone, None));
        }
        let window = self.settings.dedup_window_ms;
        if let Some(id) = &msg.message_id {
            self.prune_dedup(&mut st, now);
            if st
                .dedup
                .ids
                .get(id)
                .is_some_and(|seen| now < seen.saturating_add(window))
            {
                st.stats.duplicates += 1;
                // The first copy may still be waiting for its commit: the duplicate's
                // confirm waits for the current batch, which comes after it.
                let ticket = self.store.batch(|b| b.ticket());
                return Ok((Appended::Duplicate, Some(ticket)));
            }
        }
        let size = msg.size();
        if !self.make_room(&mut st, size) {
            st.stats.rejected += 1;
            return Ok((Appended::Rejected, None));
        }
        msg.published_ms = now;
        let due = delay_ms.filter(|d| *d > 0).map(|d| now.saturating_add(d));
        let max_pending = self.limits.max_pending_bytes;
        let listener = self.listener();
        let st = &mut *st;
        let ticket = self.store.batch(|b| {
            // Fail-stop: a failed store refuses with StorageFailure, never drops.
            if let Some(refusal) = b.refusal() {
                return Err(refusal);
            }
            if b.pending_bytes() > max_pending {
                return Err(QueueError::Overloaded {
                    pending: b.pending_bytes(),
                });
            }
            let seq = st.c.next_seq;
            st.c.next_seq += 1;
            let slot = match due {
                Some(due) => {
                    b.put_delayed(self.qid, due, seq, &msg);
                    st.c.d_count += 1;
                    st.c.d_bytes += size;
                    delayed_slot(seq)
                }
                None => {
                    st.c.m_count += 1;
                    st.c.m_bytes += size;
                    b.put_ready(self.qid, seq, &msg)
                }
            };
            if let Some(id) = &msg.message_id {
                b.put_dedup(self.qid, id, now);
                st.dedup.ids.insert(id.clone(), now);
                st.dedup.order.push_back((now, id.clone()));
            }
            b.set_counters(self.qid, st.c);
            b.listen(listener, &mut st.listen_epoch);
            st.pending.push_back(PendingEntry {
                epoch: b.epoch(),
                slot,
                due,
                msg,
            });
            Ok(b.ticket())
        })?;
        st.stats.totals.published += 1;
        Ok((Appended::Stored, Some(ticket)))
    }

    /// Applies max_length / max_bytes before a message of `size` bytes is added.
    ///
    /// What the limits count: every message the queue holds that no consumer holds
    /// right now — ready ones (in memory or paged out to the store), delayed ones, and
    /// ones still waiting for their group commit — and, for max_bytes, their payload
    /// bytes (topic and headers are not counted). Delivered, unacked messages do not
    /// count (as in RabbitMQ): a slow consumer's prefetch cannot make a queue refuse
    /// publishes. `QueueInfo::depth` and `bytes` do include them, so depth may exceed
    /// max_length by at most what is in flight.
    ///
    /// drop-head drops the oldest ready message, paging it in from the store if it is
    /// not in memory, or taking it from the messages waiting for their commit; it
    /// rejects only when everything counted is delayed (delayed messages are not
    /// "ready", and dropping one would drop out of order).
    fn make_room(&self, st: &mut State, size: u64) -> bool {
        let s = &self.settings;
        if s.max_length.is_none() && s.max_bytes.is_none() {
            return true;
        }
        loop {
            let count = (st.c.m_count + st.c.d_count).saturating_sub(st.in_flight.len() as u64);
            let bytes = (st.c.m_bytes + st.c.d_bytes).saturating_sub(st.in_flight_bytes);
            let over = s.max_length.is_some_and(|m| count + 1 > m)
                || s.max_bytes.is_some_and(|m| bytes + size > m);
            if !over {
                return true;
            }
            if !s.drop_head {
                return false;
            }
            let head = match st.retry.pop_front() {
                Some(e) => e,
                None => match st.window.pop_front() {
                    Some(e) => {
                        st.window_bytes -= e.msg.payload.len();
                        e
                    }
                    None if st.unloaded > 0 => {
                        if !self.page_now(st) {
                            return false;
                        }
                        continue;
                    }
                    // The oldest left is still waiting for its commit: it is dropped
                    // as it lands (its publisher is confirmed, as for any message
                    // dropped later).
                    None => match st.pending.iter().position(|p| p.due.is_none()) {
                        Some(i) => match st.pending.remove(i) {
                            Some(p) => {
                                st.dropped.insert(p.slot.seq);
                                Entry {
                                    slot: p.slot,
                                    msg: p.msg,
                                }
                            }
                            None => return false,
                        },
                        // Nothing ready to drop (all delayed): refuse rather than
                        // drop out of order.
                        None => return false,
                    },
                },
            };
            st.stats.dropped += 1;
            self.remove_stored(st, head.slot, head.msg.size());
        }
    }

    fn remove_stored(&self, st: &mut State, slot: Slot, size: u64) {
        st.c.m_count = st.c.m_count.saturating_sub(1);
        st.c.m_bytes = st.c.m_bytes.saturating_sub(size);
        let c = st.c;
        self.store.batch(|b| {
            b.remove_ready(self.qid, slot);
            b.set_counters(self.qid, c);
        });
    }

    fn prune_dedup(&self, st: &mut State, now: u64) {
        let window = self.settings.dedup_window_ms;
        let cap = self.limits.dedup_capacity;
        let mut gone: Vec<Text> = Vec::new();
        while let Some((ts, _)) = st.dedup.order.front() {
            let expired = now >= ts.saturating_add(window);
            if !expired && st.dedup.order.len() <= cap {
                break;
            }
            let Some((ts, id)) = st.dedup.order.pop_front() else {
                break;
            };
            // The id may have been seen again since; only the latest sighting counts.
            if st.dedup.ids.get(&id) == Some(&ts) {
                st.dedup.ids.remove(&id);
                gone.push(id);
            }
        }
        if !gone.is_empty() {
            self.store.batch(|b| {
                for id in &gone {
                    b.remove_dedup(self.qid, id);
                }
            });
        }
    }

    // ---------------------------------------------------------------- visibility

    fn add_ready(&self, st: &mut State, slot: Slot, msg: Message) {
        let fits = st.window.len() < self.limits.ready_window
            && st.window_bytes + msg.payload.len() <= self.limits.ready_window_bytes;
        if st.unloaded == 0 && slot.seq >= st.paged_upto && fits {
            st.window_bytes += msg.payload.len();
            st.window.push_back(Entry { slot, msg });
            st.paged_upto = slot.seq + 1;
            forget_dropped_below(st);
        } else {
            // It stays in the store only; a page read brings it in when its turn comes.
            st.unloaded += 1;
        }
    }

    fn add_delayed(&self, st: &mut State, due: u64, seq: u64, msg: Message) {
        let key = (due, seq);
        if st.delayed_upto.is_none_or(|upto| key < upto) {
            st.delayed.insert(key, msg);
            if st.delayed.len() > self.limits.delayed_window {
                if let Some((evicted, _)) = st.delayed.pop_last() {
                    st.delayed_upto = Some(evicted);
                    st.delayed_unloaded += 1;
                }
            }
            self.wake_timer_at(st, due);
        } else {
            st.delayed_unloaded += 1;
        }
    }

    /// Adds a page of stored ready messages to the window, stopping at the first one
    /// not yet committed here. Returns how many it took.
    fn take_page(&self, st: &mut State, page: Vec<Loaded>) -> usize {
        let mut taken = 0;
        for loaded in page {
            let slot = loaded.slot();
            if slot.seq >= st.committed_below {
                break;
            }
            if slot.seq < st.paged_upto {
                continue;
            }
            st.paged_upto = slot.seq + 1;
            if st.dropped.remove(&slot.seq) {
                continue;
            }
            let mut msg = loaded.message;
            if slot.seq <= st.restart_mark {
                msg.deliveries = msg.deliveries.max(1);
            }
            st.window_bytes += msg.payload.len();
            st.window.push_back(Entry { slot, msg });
            st.unloaded = st.unloaded.saturating_sub(1);
            taken += 1;
        }
        forget_dropped_below(st);
        taken
    }

    fn take_delayed_page(&self, st: &mut State, from: (u64, u64), page: Vec<Loaded>) {
        let full = page.len() >= self.limits.delayed_window;
        let mut last = None;
        for loaded in page {
            // Not yet committed here: its commit callback will place it.
            if loaded.key < from || loaded.key.1 >= st.committed_below {
                continue;
            }
            last = Some(loaded.key);
            st.delayed.insert(loaded.key, loaded.message);
            st.delayed_unloaded = st.delayed_unloaded.saturating_sub(1);
        }
        st.delayed_upto = match last {
            Some((due, seq)) if full || st.delayed_unloaded > 0 => Some((due, seq + 1)),
            _ => {
                st.delayed_unloaded = 0;
                None
            }
        };
    }

    /// Pages in the oldest stored ready messages at once, on the calling thread, for
    /// a drop-head that found none in memory. A page read already on its way is then
    /// ignored (`page_loaded` checks `paged_upto`). False if nothing came.
    fn page_now(&self, st: &mut State) -> bool {
        let count = self.limits.ready_window.min(256);
        let range = Range::Messages {
            qid: self.qid,
            from: st.paged_upto,
        };
        match self
            .store
            .read_now(range, count, self.limits.ready_window_bytes)
        {
            Ok(page) => {
                if self.take_page(st, page) > 0 {
                    return true;
                }
                tracing::warn!(queue = %self.name, unloaded = st.unloaded, "store holds fewer ready messages than counted");
                st.unloaded = 0;
                false
            }
            Err(err) => {
                tracing::error!(queue = %self.name, error = %err, "paging messages in failed");
                false
            }
        }
    }

    fn maybe_page(&self, st: &mut State) {
        let low = st.window.len() < self.limits.ready_window / 2;
        if low && st.unloaded > 0 && !st.paging {
            st.paging = true;
            let from = st.paged_upto;
            let count = self.limits.ready_window - st.window.len();
            let bytes = self
                .limits
                .ready_window_bytes
                .saturating_sub(st.window_bytes)
                .max(1);
            let me = self.arc();
            self.store.read(
                Range::Messages {
                    qid: self.qid,
                    from,
                },
                count,
                bytes,
                move |result| {
                    me.page_loaded(from, result);
                },
            );
        }
    }

    fn page_loaded(&self, from: u64, result: Result<Vec<Loaded>, StoreError>) {
        let mut st = self.lock();
        st.paging = false;
        match result {
            Ok(page) if st.paged_upto == from && !st.deleted => {
                if self.take_page(&mut st, page) == 0 && st.unloaded > 0 {
                    tracing::warn!(queue = %self.name, unloaded = st.unloaded, "store holds fewer ready messages than counted");
                    st.unloaded = 0;
                }
                self.dispatch(&mut st, now_ms());
            }
            // Overtaken (a drop-head paged in meanwhile): ask again from where it is.
            Ok(_) if !st.deleted => self.maybe_page(&mut st),
            Ok(_) => {}
            Err(err) => {
                tracing::error!(queue = %self.name, error = %err, "paging messages in failed")
            }
        }
        drop(st);
        self.paged.notify_waiters();
    }

    fn maybe_page_delayed(&self, st: &mut State) {
        let low = st.delayed.len() < self.limits.delayed_window / 2 + 1;
        if low && st.delayed_unloaded > 0 && !st.delayed_paging {
            let Some(from) = st.delayed_upto else {
                st.delayed_unloaded = 0;
                return;
            };
            st.delayed_paging = true;
            let count = self.limits.delayed_window - st.delayed.len();
            let me = self.arc();
            self.store.read(Range::Delayed { qid: self.qid, from }, count, usize::MAX, move |result| {
                let mut st = me.lock();
                st.delayed_paging = false;
                match result {
                    Ok(page) if st.delayed_upto == Some(from) && !st.deleted => {
                        me.take_delayed_page(&mut st, from, page);
                        if let Some((&(due, _), _)) = st.delayed.first_key_value() {
                            me.wake_timer_at(&mut st, due);
                        }
                    }
                    Ok(_) => {}
                    Err(err) => tracing::error!(queue = %me.name, error = %err, "paging delayed messages in failed"),
                }
            });
        }
    }

    // ---------------------------------------------------------------- delivery

    fn pick_consumer(&self, st: &mut State) -> Option<usize> {
        let n = st.consumers.len();
        for i in 0..n {
            let idx = (st.next_consumer + i) % n;
            if st.consumers[idx].available() > 0 {
                st.next_consumer = (idx + 1) % n;
                return Some(idx);
            }
        }
        None
    }

    fn expired(&self, msg: &Message, now: u64) -> bool {
        self.settings
            .ttl_ms
            .is_some_and(|ttl| now >= msg.published_ms.saturating_add(ttl))
    }

    fn dispatch(&self, st: &mut State, now: u64) {
        if st.deleted {
            return;
        }
        while let Some(ci) = self.pick_consumer(st) {
            let entry = if let Some(e) = st.retry.pop_front() {
                e
            } else {
                let Some(front) = st.window.front() else {
                    break;
                };
                if front.msg.deliveries == 0 && front.slot.seq > st.mark_durable {
                    self.request_mark(st);
                    break;
                }
                let Some(e) = st.window.pop_front() else {
                    break;
                };
                st.window_bytes -= e.msg.payload.len();
                e
            };
            if self.expired(&entry.msg, now) {
                st.stats.expired += 1;
                self.remove_stored(st, entry.slot, entry.msg.size());
                continue;
            }
            self.deliver(st, ci, entry, now);
        }
        self.expire_head(st, now);
        self.maybe_page(st);
    }

    /// Lets the store know which fresh messages are about to be delivered, so that
    /// after a crash they come back marked as redeliveries. Covers exactly what the
    /// consumers' credit lets out, so undelivered messages are not marked.
    fn request_mark(&self, st: &mut State) {
        if st.mark_pending.is_some() {
            return;
        }
        let credit: usize = st
            .consumers
            .iter()
            .map(|c| usize::try_from(c.available()).unwrap_or(usize::MAX))
            .fold(0, usize::saturating_add);
        let n = credit.min(st.window.len());
        let Some(target) = n
            .checked_sub(1)
            .and_then(|i| st.window.get(i))
            .map(|e| e.slot.seq)
        else {
            return;
        };
        if target <= st.mark_durable {
            return;
        }
        st.c.mark = st.c.mark.max(target);
        let c = st.c;
        let listener = self.listener();
        let epoch = self.store.batch(|b| {
            b.set_counters(self.qid, c);
            b.listen(listener, &mut st.listen_epoch);
            b.epoch()
        });
        st.mark_pending = Some((epoch, target));
    }

    fn deliver(&self, st: &mut State, ci: usize, mut entry: Entry, now: u64) {
        let me = self.arc();
        let consumer = &mut st.consumers[ci];
        let session = consumer.session.clone();
        let Some(delivery_id) = session.register(&me, entry.slot.seq) else {
            consumer.alive = false;
            st.retry.push_front(entry);
            return;
        };
        entry.msg.deliveries = entry.msg.deliveries.saturating_add(1);
        consumer.outstanding += 1;
        if let Some(left) = &mut consumer.remaining {
            *left = left.saturating_sub(1);
        }
        let consumer_id = consumer.id;
        let delivery = Delivery {
            reply_to: entry.msg.reply_to.clone(),
            message_id: entry.msg.message_id.clone(),
            consumer_id,
            delivery_id,
            attempt: entry.msg.deliveries,
            queue: self.name.clone(),
            topic: entry.msg.topic.clone(),
            headers: entry.msg.headers.clone(),
            payload: entry.msg.payload.clone(),
        };
        let deadline = now.saturating_add(self.settings.ack_timeout_ms);
        st.deadlines.insert((deadline, entry.slot.seq));
        st.in_flight_bytes += entry.msg.size();
        st.in_flight.insert(
            entry.slot.seq,
            InFlight {
                msg: entry.msg,
                slot: entry.slot,
                session: session.clone(),
                consumer_id,
                delivery_id,
                deadline,
            },
        );
        st.stats.totals.delivered += 1;
        if delivery.attempt > 1 {
            st.stats.redelivered += 1;
        }
        self.wake_timer_at(st, deadline);
        if !session.sink.deliver(delivery) {
            // The connection is gone; its session's drop (or the ack timeout) returns
            // what it holds. Stop feeding it meanwhile.
            if let Some(c) = st.consumers.get_mut(ci) {
                c.alive = false;
            }
        }
    }

    fn expire_head(&self, st: &mut State, now: u64) {
        if self.settings.ttl_ms.is_none() {
            return;
        }
        while let Some(front) = st.window.front() {
            if !self.expired(&front.msg, now) {
                break;
            }
            let Some(e) = st.window.pop_front() else {
                break;
            };
            st.window_bytes -= e.msg.payload.len();
            st.stats.expired += 1;
            self.remove_stored(st, e.slot, e.msg.size());
        }
    }

    /// Takes a delivery back from its consumer and requeues or dead-letters it.
    fn take_back(
        &self,
        st: &mut State,
        seq: u64,
        how: Requeue,
        now: u64,
        outbox: &mut Vec<DeadLetterMove>,
    ) {
        let Some(f) = st.in_flight.remove(&seq) else {
            return;
        };
        st.deadlines.remove(&(f.deadline, seq));
        st.in_flight_bytes = st.in_flight_bytes.saturating_sub(f.msg.size());
        if let Some(c) = st
            .consumers
            .iter_mut()
            .find(|c| c.session.id == f.session.id && c.id == f.consumer_id)
        {
            c.outstanding = c.outstanding.saturating_sub(1);
        }
        self.requeue(st, f.slot, f.msg, how, now, outbox);
    }

    fn requeue(
        &self,
        st: &mut State,
        mut slot: Slot,
        msg: Message,
        how: Requeue,
        now: u64,
        outbox: &mut Vec<DeadLetterMove>,
    ) {
        if msg.deliveries >= self.settings.max_deliveries {
            outbox.push(DeadLetterMove { slot, message: msg });
            return;
        }
        let delay = match how {
            Requeue::Now => 0,
            Requeue::After(ms) => ms,
            Requeue::Backoff => self.settings.backoff_after(msg.deliveries),
        };
        if delay == 0 {
            // Recorded so the attempt count survives a restart.
            self.store
                .batch(|b| b.set_attempts(self.qid, &mut slot, msg.deliveries));
            st.retry.push_back(Entry { slot, msg });
            return;
        }
        let due = now.saturating_add(delay);
        let size = msg.size();
        let listener = self.listener();
        let new_seq = st.c.next_seq;
        st.c.next_seq += 1;
        st.c.m_count = st.c.m_count.saturating_sub(1);
        st.c.m_bytes = st.c.m_bytes.saturating_sub(size);
        st.c.d_count += 1;
        st.c.d_bytes += size;
        let c = st.c;
        let epoch = self.store.batch(|b| {
            b.remove_ready(self.qid, slot);
            b.put_delayed(self.qid, due, new_seq, &msg);
            b.set_counters(self.qid, c);
            b.listen(listener, &mut st.listen_epoch);
            b.epoch()
        });
        st.pending.push_back(PendingEntry {
            epoch,
            slot: delayed_slot(new_seq),
            due: Some(due),
            msg,
        });
    }

    /// Completes a move out of this queue (dead letter, redrive): the message is now
    /// stored in its new queue, so it can be removed here.
    pub fn finish_move(&self, moved: &[(Slot, u64)], dead_lettered: bool) {
        let mut st = self.lock();
        if st.deleted {
            return;
        }
        for (slot, size) in moved {
            self.remove_stored(&mut st, *slot, *size);
            if dead_lettered {
                st.stats.dead_lettered += 1;
            }
        }
    }

    /// Gives a message back after its move failed.
    pub fn abort_move(&self, slot: Slot, msg: Message) {
        let mut st = self.lock();
        if st.deleted {
            return;
        }
        if msg.deliveries == 0 && slot.seq > st.mark_durable {
            // Never delivered: back into the window, in seq order, so that its first
            // delivery waits for a durable mark like any other (retry skips it).
            let at = st.window.partition_point(|e| e.slot.seq < slot.seq);
            st.window_bytes += msg.payload.len();
            st.window.insert(at, Entry { slot, msg });
        } else {
            st.retry.push_back(Entry { slot, msg });
        }
        self.dispatch(&mut st, now_ms());
    }

    // ---------------------------------------------------------------- consumers

    pub fn add_consumer(
        &self,
        session: &Arc<SessionInner>,
        id: u32,
        credit: u32,
        limit: Option<u32>,
    ) {
        let mut st = self.lock();
        st.consumers.push(Consumer {
            session: session.clone(),
            id,
            window: credit,
            outstanding: 0,
            remaining: limit,
            alive: true,
        });
        self.dispatch(&mut st, now_ms());
    }

    pub fn add_credit(&self, session_id: u64, id: u32, credit: u32) {
        let mut st = self.lock();
        if let Some(c) = st
            .consumers
            .iter_mut()
            .find(|c| c.session.id == session_id && c.id == id)
        {
            c.window = c.window.saturating_add(credit);
        }
        self.dispatch(&mut st, now_ms());
    }

    /// Detaches a consumer; everything it had in flight is ready again at once.
    pub fn remove_consumer(&self, session_id: u64, id: u32) -> Vec<DeadLetterMove> {
        let mut st = self.lock();
        st.consumers
            .retain(|c| !(c.session.id == session_id && c.id == id));
        let mut held: Vec<u64> = st
            .in_flight
            .iter()
            .filter(|(_, f)| f.session.id == session_id && f.consumer_id == id)
            .map(|(seq, _)| *seq)
            .collect();
        held.sort_unstable();
        let now = now_ms();
        let mut outbox = Vec::new();
        for seq in held {
            self.take_back(&mut st, seq, Requeue::Now, now, &mut outbox);
        }
        self.dispatch(&mut st, now);
        outbox
    }

    /// Acks `(delivery id, seq)` pairs of one session; returns the ids that were not
    /// outstanding there.
    pub fn ack(&self, session_id: u64, items: &[(u64, u64)]) -> Vec<u64> {
        let mut st = self.lock();
        let mut unknown = Vec::new();
        let mut removed = Vec::with_capacity(items.len());
        for &(id, seq) in items {
            let ok = st
                .in_flight
                .get(&seq)
                .is_some_and(|f| f.session.id == session_id && f.delivery_id == id);
            if !ok {
                unknown.push(id);
                continue;
            }
            let Some(f) = st.in_flight.remove(&seq) else {
                continue;
            };
            st.deadlines.remove(&(f.deadline, seq));
            let size = f.msg.size();
            st.in_flight_bytes = st.in_flight_bytes.saturating_sub(size);
            if let Some(c) = st
                .consumers
                .iter_mut()
                .find(|c| c.session.id == session_id && c.id == f.consumer_id)
            {
                c.outstanding = c.outstanding.saturating_sub(1);
            }
            st.c.m_count = st.c.m_count.saturating_sub(1);
            st.c.m_bytes = st.c.m_bytes.saturating_sub(size);
            st.stats.totals.acked += 1;
            removed.push(f.slot);
        }
        if !removed.is_empty() && !st.deleted {
            let c = st.c;
            self.store.batch(|b| {
                for slot in &removed {
                    b.remove_ready(self.qid, *slot);
                }
                b.set_counters(self.qid, c);
            });
        }
        self.dispatch(&mut st, now_ms());
        unknown
    }

    /// Nacks `(delivery id, seq)` pairs of one session.
    pub fn nack(
        &self,
        session_id: u64,
        items: &[(u64, u64)],
        how: Requeue,
    ) -> (Vec<u64>, Vec<DeadLetterMove>) {
        let mut st = self.lock();
        let now = now_ms();
        let mut unknown = Vec::new();
        let mut outbox = Vec::new();
        for &(id, seq) in items {
            let ok = st
                .in_flight
                .get(&seq)
                .is_some_and(|f| f.session.id == session_id && f.delivery_id == id);
            if ok {
                self.take_back(&mut st, seq, how, now, &mut outbox);
            } else {
                unknown.push(id);
            }
        }
        self.dispatch(&mut st, now);
        (unknown, outbox)
    }

    // ---------------------------------------------------------------- timers

    /// Handles everything due at `now`; returns when to run next.
    pub fn on_timer(&self, now: u64, outbox: &mut Vec<DeadLetterMove>) -> u64 {
        let mut st = self.lock();
        if st.deleted {
            return now + RATE_TICK_MS;
        }
        // Ack timeouts.
        while let Some(&(deadline, seq)) = st.deadlines.first() {
            if deadline > now {
                break;
            }
            if let Some(f) = st.in_flight.get(&seq) {
                f.session.forget(f.delivery_id);
            }
            self.take_back(&mut st, seq, Requeue::Backoff, now, outbox);
            // take_back removed the deadline; make sure a stale one cannot spin.
            st.deadlines.remove(&(deadline, seq));
        }
        // Delayed messages that are due move to the ready queue, at its end.
        let mut due_now = Vec::new();
        while let Some((&key, _)) = st.delayed.first_key_value() {
            if key.0 > now {
                break;
            }
            if let Some(msg) = st.delayed.remove(&key) {
                due_now.push((key, msg));
            }
        }
        if !due_now.is_empty() {
            let listener = self.listener();
            let st = &mut *st;
            self.store.batch(|b| {
                for ((due, seq), msg) in due_now {
                    let size = msg.size();
                    let new_seq = st.c.next_seq;
                    st.c.next_seq += 1;
                    st.c.d_count = st.c.d_count.saturating_sub(1);
                    st.c.d_bytes = st.c.d_bytes.saturating_sub(size);
                    st.c.m_count += 1;
                    st.c.m_bytes += size;
                    b.remove_delayed(self.qid, due, seq);
                    let slot = b.put_ready(self.qid, new_seq, &msg);
                    st.pending.push_back(PendingEntry {
                        epoch: b.epoch(),
                        slot,
                        due: None,
                        msg,
                    });
                }
                b.set_counters(self.qid, st.c);
                b.listen(listener, &mut st.listen_epoch);
            });
        }
        self.maybe_page_delayed(&mut st);
        self.prune_dedup(&mut st, now);
        // Rates.
        let sample_due = st
            .stats
            .samples
            .back()
            .is_none_or(|(at, _)| at.elapsed().as_millis() >= u128::from(RATE_TICK_MS));
        if sample_due {
            let totals = st.stats.totals;
            st.stats.samples.push_back((Instant::now(), totals));
            if st.stats.samples.len() > RATE_SAMPLES {
                st.stats.samples.pop_front();
            }
        }
        self.dispatch(&mut st, now);
        let mut next = now + RATE_TICK_MS;
        if let Some(&(deadline, _)) = st.deadlines.first() {
            next = next.min(deadline);
        }
        if let Some((&(due, _), _)) = st.delayed.first_key_value() {
            next = next.min(due);
        }
        if let (Some(ttl), Some(front)) = (self.settings.ttl_ms, st.window.front()) {
            next = next.min(front.msg.published_ms.saturating_add(ttl));
        }
        st.timer_at = next;
        next
    }

    // ---------------------------------------------------------------- admin

    /// Marks the queue deleted and forgets its state; the caller deletes its keys.
    pub fn mark_deleted(&self) {
        let mut st = self.lock();
        st.deleted = true;
        for (_, f) in st.in_flight.drain() {
            f.session.forget(f.delivery_id);
        }
        st.consumers.clear();
        st.retry.clear();
        st.window.clear();
        st.pending.clear();
        st.delayed.clear();
        st.dedup = Dedup::default();
        st.deadlines.clear();
        self.cancel.cancel();
    }

    /// Takes up to `limit` ready messages out for a move (redrive). They stay stored
    /// here until [`Queue::finish_move`]. Returns them and whether more are stored
    /// but not yet paged in.
    pub fn take_ready(&self, limit: usize) -> (Vec<(Slot, Message)>, bool) {
        let mut st = self.lock();
        let mut out = Vec::new();
        while out.len() < limit {
            let e = match st.retry.pop_front() {
                Some(e) => e,
                None => match st.window.pop_front() {
                    Some(e) => {
                        st.window_bytes -= e.msg.payload.len();
                        e
                    }
                    None => break,
                },
            };
            out.push((e.slot, e.msg));
        }
        let more = st.unloaded > 0;
        self.maybe_page(&mut st);
        (out, more)
    }

    /// The queue's figures.
    pub fn info(&self) -> QueueInfo {
        let bindings = self
            .bindings
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(Text::from)
            .collect();
        let st = self.lock();
        let (publish_rate, deliver_rate, ack_rate) = rates(&st.stats);
        QueueInfo {
            name: self.name.clone(),
            bindings,
            depth: st.c.m_count + st.c.d_count,
            bytes: st.c.m_bytes + st.c.d_bytes,
            in_flight: st.in_flight.len() as u64,
            delayed: st.c.d_count,
            consumers: u32::try_from(st.consumers.len()).unwrap_or(u32::MAX),
            dead_lettered: st.stats.dead_lettered,
            published: st.stats.totals.published,
            delivered: st.stats.totals.delivered,
            acked: st.stats.totals.acked,
            publish_rate,
            deliver_rate,
            ack_rate,
        }
    }

    /// Deliveries with an attempt number above 1, since the broker started.
    pub fn redelivered(&self) -> u64 {
        self.lock().stats.redelivered
    }

    /// The attached consumers, for operators.
    pub fn consumer_views(&self) -> Vec<crate::queue::inspect::ConsumerView> {
        self.lock()
            .consumers
            .iter()
            .map(|c| crate::queue::inspect::ConsumerView {
                session_id: c.session.id,
                consumer_id: c.id,
                unacked: c.outstanding,
                window: c.window,
            })
            .collect()
    }

    /// Figures beyond `QueueInfo`, for the stats frame.
    pub fn extra_stats(&self) -> [(&'static str, u64); 5] {
        let st = self.lock();
        [
            ("rejected", st.stats.rejected),
            ("dropped", st.stats.dropped),
            ("expired", st.stats.expired),
            ("duplicates", st.stats.duplicates),
            ("ready_in_memory", (st.window.len() + st.retry.len()) as u64),
        ]
    }
}

fn rates(stats: &Stats) -> (u64, u64, u64) {
    let Some((at, then)) = stats.samples.front() else {
        return (0, 0, 0);
    };
    let secs = at.elapsed().as_secs_f64();
    if secs < 0.5 {
        return (0, 0, 0);
    }
    let now = stats.totals;
    let rate = |a: u64, b: u64| {
        let per_sec = a.saturating_sub(b) as f64 / secs;
        // Saturating float → int conversion is the intent here.
        #[allow(clippy::cast_possible_truncation)]
        let r = per_sec.round() as u64;
        r
    };
    (
        rate(now.published, then.published),
        rate(now.delivered, then.delivered),
        rate(now.acked, then.acked),
    )
}

impl CommitListener for Queue {
    fn committed(&self, epoch: u64, result: &Result<(), StoreError>) {
        let mut st = self.lock();
        if let Err(err) = result {
            // The publishers get the error; the messages stay visible, since they may
            // well be stored (an error confirm means "maybe", never "no").
            tracing::error!(queue = %self.name, error = %err, "commit failed");
        }
        while st.pending.front().is_some_and(|p| p.epoch <= epoch) {
            let Some(p) = st.pending.pop_front() else {
                break;
            };
            if result.is_err() {
                // The round failed: its message ids are forgotten, so a retry is
                // stored instead of being answered as a duplicate of nothing.
                if let Some(id) = &p.msg.message_id {
                    st.dedup.ids.remove(id);
                }
            }
            st.committed_below = st.committed_below.max(p.slot.seq + 1);
            match p.due {
                Some(due) => self.add_delayed(&mut st, due, p.slot.seq, p.msg),
                None => self.add_ready(&mut st, p.slot, p.msg),
            }
        }
        if let Some((mark_epoch, target)) = st.mark_pending {
            if mark_epoch <= epoch {
                st.mark_pending = None;
                // A mark whose round failed is not on disk: nothing past the old one
                // may be delivered as a first delivery (fail-stop).
                if result.is_ok() {
                    st.mark_durable = st.mark_durable.max(target);
                }
            }
        }
        self.dispatch(&mut st, now_ms());
    }
}

/// Dropped seqs the window has passed can no longer turn up in a page.
fn forget_dropped_below(st: &mut State) {
    while st.dropped.first().is_some_and(|s| *s < st.paged_upto) {
        st.dropped.pop_first();
    }
}

/// The slot of a delayed message: only its seq means anything.
fn delayed_slot(seq: u64) -> Slot {
    Slot {
        seq,
        chunk: seq,
        attempts_key: false,
    }
}

/// Builds the dead-letter copy of a message.
pub(crate) fn dead_letter_copy(mut msg: Message, reason: &str) -> Message {
    msg.dead = Some(DeadInfo {
        reason: Text::from(reason),
        attempts: msg.deliveries,
    });
    msg.deliveries = 0;
    msg
}

/// Prepares a dead letter for redrive: a fresh message again.
pub(crate) fn redriven_copy(mut msg: Message) -> Message {
    msg.dead = None;
    msg.deliveries = 0;
    // Its id is still in the origin queue's dedup window (from its first publish):
    // kept, the copy would be refused as a duplicate of itself and stay dead.
    msg.message_id = None;
    msg
}
