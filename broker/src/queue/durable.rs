//! `Queue`: one durable queue's state and its publish side — appending, the
//! limits, deduplication — and its figures.
//!
//! The rest of `Queue`'s methods live next to the concept they serve:
//! `delivery.rs` (consumers, acks, nacks, redelivery, the timer's work),
//! `paging.rs` (windows paged in from the store, commit callbacks) and
//! `departures.rs` (messages leaving for another queue).
//!
//! The full backlog lives in the store; memory holds a bounded window of the ready
//! messages and one of the delayed ones ([`PagedWindow`]). Messages become visible
//! to consumers only once the batch that stored them has committed.
//!
//! Lock order: engine registry → queue → session link → store. A queue never takes
//! the registry or another queue's lock while holding its own; a message leaving for
//! another queue is therefore queued as a [`Departure`] and handed to the engine by
//! the timer task.

use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use tidings_protocol::{QueueInfo, Text};
use tokio::sync::Notify;

use crate::queue::Clock;
use crate::queue::config::EngineConfig;
use crate::queue::consumers::Consumers;
use crate::queue::deadlines::Deadlines;
use crate::queue::dedup::Dedup;
use crate::queue::error::QueueError;
use crate::queue::in_flight::InFlight;
use crate::queue::options::Settings;
use crate::queue::rates::{Event, Stats};
use crate::queue::record::Message;
use crate::queue::window::{Entry, PagedWindow};
use crate::storage::{CommitListener, Counters, LoadedQueue, Slot, Store, Ticket};

/// What a publish did to one queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Appended {
    Stored,
    Duplicate,
    Rejected,
    /// The queue was deleted meanwhile.
    Gone,
}

/// Whether an append checks and records the message id (a publish) or not (a copy
/// moved from another queue, whose id was already deduplicated once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DedupCheck {
    Check,
    Skip,
}

/// A message leaving its queue for another one (dead-lettering). It stays stored in
/// its queue until the engine has its new copy durable and calls
/// [`Queue::finish_departures`], so a crash in between duplicates it rather than
/// losing it.
pub(crate) struct Departure {
    pub slot: Slot,
    pub message: Message,
    /// `max_deliveries` or `expired`.
    pub reason: &'static str,
}

/// A message stored by a batch that has not committed yet.
pub(crate) struct PendingEntry {
    pub epoch: u64,
    /// Where a ready message went (`seq` alone matters for a delayed one).
    pub slot: Slot,
    pub due: Option<u64>,
    pub msg: Message,
    /// Set when this is the new copy of a move within the queue (delayed to ready,
    /// ready to delayed); its old copy's removal is in the same round.
    pub moved: bool,
    /// Its round also raised the delivery mark to its seq (see
    /// [`Queue::premark`]): once committed it may be delivered at once.
    pub marked: bool,
}

/// Which fresh messages the store has been told may be delivered (see store.rs on
/// `mark`): after a crash they come back counted as delivered once.
#[derive(Default)]
pub(crate) struct Marks {
    /// Fresh messages up to this seq may be delivered.
    pub durable: u64,
    /// A mark on its way to the store: `(epoch, seq)`.
    pub pending: Option<(u64, u64)>,
    /// Messages at or below this seq were stored before the last restart and may
    /// have been delivered then.
    pub restart: u64,
    /// The highest seq delivered since the start.
    pub delivered: u64,
    /// Set at a graceful shutdown, once the exact mark is written: no mark may
    /// rise any more (see [`Queue::settle_mark`]).
    pub settled: bool,
}

pub(crate) struct State {
    pub deleted: bool,
    /// The stored counters: every message stored, once per copy.
    pub c: Counters,
    pub listen_epoch: u64,
    /// Redeliveries, served before fresh messages.
    pub retry: VecDeque<Entry>,
    /// Fresh ready messages by `(0, seq)`.
    pub ready: PagedWindow,
    /// Delayed messages by `(due, seq)`.
    pub delayed: PagedWindow,
    /// Stored, waiting for their batch to commit before consumers may see them.
    pub pending: VecDeque<PendingEntry>,
    pub in_flight: InFlight,
    pub consumers: Consumers,
    pub marks: Marks,
    /// Every seq below this that went through `pending` has committed. Pages keep
    /// only such seqs: the store may already hold later rounds that are applied but
    /// not yet durable.
    pub committed_below: u64,
    /// Ready seqs taken out of the queue while not in memory (dropped while waiting
    /// for their commit, claimed by a redrive from the store): pages skip them.
    pub skip: BTreeSet<u64>,
    /// Messages waiting for the engine to move them to another queue.
    pub departures: Vec<Departure>,
    /// Seqs of dead letters whose move here is not finished: their origin has not
    /// yet issued the removal of its copy. A redrive must not claim them, or its
    /// fresh copy in the origin could become durable before that removal and a
    /// crash in between would leave the origin holding the message twice.
    pub arriving: BTreeSet<u64>,
    /// The deadline registered with the engine's timer (`u64::MAX`: none).
    pub wake_at: u64,
    pub dedup: Dedup,
    pub stats: Stats,
}

/// Memory bounds, copied from the engine config.
#[derive(Clone, Copy)]
pub(crate) struct Limits {
    pub ready_window: usize,
    pub ready_window_bytes: u64,
    pub delayed_window: usize,
    pub delayed_window_bytes: u64,
    pub dedup_capacity: usize,
    pub dedup_max_bytes: u64,
    pub max_pending_bytes: usize,
    pub max_credit: u32,
}

impl Limits {
    pub fn from_config(c: &EngineConfig) -> Self {
        Self {
            ready_window: c.ready_window.max(1),
            ready_window_bytes: (c.ready_window_bytes as u64).max(1),
            delayed_window: c.delayed_window.max(1),
            delayed_window_bytes: (c.delayed_window_bytes as u64).max(1),
            dedup_capacity: c.dedup_capacity.max(1),
            dedup_max_bytes: (c.dedup_max_bytes as u64).max(1),
            max_pending_bytes: c.max_pending_bytes,
            max_credit: c.max_credit.max(1),
        }
    }
}

/// One durable queue.
pub(crate) struct Queue {
    pub name: Text,
    pub qid: u32,
    pub settings: Settings,
    pub bindings: Mutex<Vec<String>>,
    pub(super) state: Mutex<State>,
    pub(super) store: Arc<Store>,
    pub(super) limits: Limits,
    pub(super) deadlines: Arc<Deadlines>,
    pub(super) clock: Clock,
    /// Signalled after every page read, for a redrive waiting on one.
    pub paged: Notify,
    me: Weak<Queue>,
}

/// What a queue needs from its engine.
pub(crate) struct QueueContext {
    pub store: Arc<Store>,
    pub limits: Limits,
    pub deadlines: Arc<Deadlines>,
    pub clock: Clock,
}

impl Queue {
    /// A copy of its bindings as they are now.
    pub fn bindings_now(&self) -> Vec<String> {
        self.bindings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Changes its bindings with `change` (true if it changed them); returns them
    /// before and after, and whether they changed.
    pub fn change_bindings(
        &self,
        change: impl FnOnce(&mut Vec<String>) -> bool,
    ) -> (Vec<String>, Vec<String>, bool) {
        let mut bindings = self
            .bindings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let old = bindings.clone();
        let changed = change(&mut bindings);
        (old, bindings.clone(), changed)
    }

    /// A new, empty queue.
    pub fn create(
        name: &str,
        qid: u32,
        settings: Settings,
        bindings: Vec<String>,
        cx: &QueueContext,
    ) -> Arc<Queue> {
        Self::build(name, qid, settings, bindings, cx, Counters::default())
    }

    /// A queue as found in the store at start.
    pub fn restore(loaded: LoadedQueue, cx: &QueueContext) -> Arc<Queue> {
        let def = loaded.definition;
        let q = Self::build(
            &loaded.name,
            def.qid,
            def.settings,
            def.bindings,
            cx,
            loaded.counters,
        );
        let now = q.clock.now_ms();
        {
            let mut st = q.lock();
            st.marks.restart = loaded.counters.mark;
            st.marks.durable = loaded.counters.mark;
            st.ready.start_unloaded(loaded.counters.m_count);
            st.delayed.start_unloaded(loaded.counters.d_count);
            q.take_ready_page((0, 0), loaded.ready, q.limits.ready_window, &mut st);
            q.take_delayed_page((0, 0), loaded.delayed, q.limits.delayed_window, &mut st);
            let window = q.settings.dedup_window_ms;
            let mut ids: Vec<(String, u64)> = loaded.dedup;
            ids.sort_by_key(|(_, ts)| *ts);
            let mut stale = Vec::new();
            for (id, ts) in ids {
                if now < ts.saturating_add(window) {
                    st.dedup.insert(Text::from(id), ts);
                } else {
                    stale.push(Text::from(id));
                }
            }
            stale.extend(st.dedup.prune(
                now,
                window,
                q.limits.dedup_capacity,
                q.limits.dedup_max_bytes,
            ));
            q.forget_ids(&stale);
            q.reschedule(&mut st);
        }
        q
    }

    fn build(
        name: &str,
        qid: u32,
        settings: Settings,
        bindings: Vec<String>,
        cx: &QueueContext,
        c: Counters,
    ) -> Arc<Queue> {
        let limits = cx.limits;
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
                ready: PagedWindow::new(limits.ready_window, limits.ready_window_bytes),
                delayed: PagedWindow::new(limits.delayed_window, limits.delayed_window_bytes),
                pending: VecDeque::new(),
                in_flight: InFlight::default(),
                consumers: Consumers::default(),
                marks: Marks::default(),
                committed_below: c.next_seq,
                skip: BTreeSet::new(),
                departures: Vec::new(),
                arriving: BTreeSet::new(),
                wake_at: u64::MAX,
                dedup: Dedup::default(),
                stats: Stats::default(),
            }),
            store: cx.store.clone(),
            limits,
            deadlines: cx.deadlines.clone(),
            clock: cx.clock.clone(),
            paged: Notify::new(),
            me: me.clone(),
        })
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn arc(&self) -> Arc<Queue> {
        // `self` is only ever reached through an `Arc<Queue>` built by `build`.
        self.me
            .upgrade()
            .expect("a queue is always owned by an Arc")
    }

    pub(super) fn listener(&self) -> Arc<dyn CommitListener> {
        self.arc()
    }

    /// Asks the engine's timer to run this queue at `at`, if that is earlier than
    /// what it has.
    pub(super) fn wake_at(&self, st: &mut State, at: u64) {
        if at < st.wake_at {
            st.wake_at = at;
            self.deadlines.schedule(self.qid, at);
        }
    }

    /// Registers the earliest moment something in the queue falls due.
    pub(super) fn reschedule(&self, st: &mut State) {
        if st.deleted {
            return;
        }
        let mut next = u64::MAX;
        if !st.departures.is_empty() {
            next = 0;
        }
        if let Some(d) = st.in_flight.next_deadline() {
            next = next.min(d);
        }
        if let Some((due, _)) = st.delayed.first_key() {
            next = next.min(due);
        }
        if let Some(ttl) = self.settings.ttl_ms {
            let oldest = st.retry.front().or_else(|| st.ready.first());
            if let Some(e) = oldest {
                next = next.min(e.msg.published_ms.saturating_add(ttl));
            }
        }
        if let Some(at) = st.dedup.next_expiry(self.settings.dedup_window_ms) {
            next = next.min(at);
        }
        if next != u64::MAX {
            self.wake_at(st, next);
        }
    }

    // ---------------------------------------------------------------- publish

    /// Appends a message (a publish, a dead letter, a redriven message). Returns what
    /// happened and, when something was written, a ticket for its commit.
    pub fn append(
        &self,
        msg: Message,
        delay_ms: Option<u64>,
        now: u64,
        dedup: DedupCheck,
    ) -> Result<(Appended, Option<Ticket>), QueueError> {
        self.append_inner(msg, delay_ms, now, dedup, false)
            .map(|(appended, ticket, _)| (appended, ticket))
    }

    /// Appends a dead letter that is still arriving: a redrive passes it over until
    /// [`Queue::arrived`] is called with the seq returned (once the origin has
    /// issued the removal of its copy).
    pub fn append_arriving(
        &self,
        msg: Message,
        now: u64,
    ) -> Result<(Appended, Option<Ticket>, Option<u64>), QueueError> {
        self.append_inner(msg, None, now, DedupCheck::Skip, true)
    }

    /// The move of these letters here is finished (or given up): a redrive may
    /// claim them.
    pub fn arrived(&self, seqs: &[u64]) {
        let mut st = self.lock();
        for seq in seqs {
            st.arriving.remove(seq);
        }
    }

    fn append_inner(
        &self,
        mut msg: Message,
        delay_ms: Option<u64>,
        now: u64,
        dedup: DedupCheck,
        arriving: bool,
    ) -> Result<(Appended, Option<Ticket>, Option<u64>), QueueError> {
        let mut st = self.lock();
        if st.deleted {
            return Ok((Appended::Gone, None, None));
        }
        let window = self.settings.dedup_window_ms;
        let record_id = match (&msg.message_id, dedup) {
            (Some(id), DedupCheck::Check) => {
                self.prune_dedup(&mut st, now);
                if st.dedup.seen(id, now, window) {
                    st.stats.duplicates += 1;
                    // The first copy may still be waiting for its commit: the
                    // duplicate's confirm waits for the current batch, which comes
                    // after it.
                    let ticket = self.store.batch(|b| b.ticket());
                    return Ok((Appended::Duplicate, Some(ticket), None));
                }
                Some(id.clone())
            }
            _ => None,
        };
        let msg_had_id = record_id.is_some();
        let size = msg.size();
        if !self.make_room(&mut st, size) {
            st.stats.rejected += 1;
            return Ok((Appended::Rejected, None, None));
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
            let marked = due.is_none() && self.premark(st, seq);
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
            if let Some(id) = record_id {
                b.put_dedup(self.qid, &id, now);
                st.dedup.insert(id, now);
            }
            b.set_counters(self.qid, st.c);
            b.listen(listener, &mut st.listen_epoch);
            st.pending.push_back(PendingEntry {
                epoch: b.epoch(),
                slot,
                due,
                msg,
                moved: false,
                marked,
            });
            Ok((b.ticket(), seq))
        })?;
        let (ticket, seq) = ticket;
        if arriving {
            st.arriving.insert(seq);
        }
        if msg_had_id {
            // Keeps the table within its bounds right after it grew.
            self.prune_dedup(st, now);
        }
        st.stats.count(Event::Published, now);
        Ok((Appended::Stored, Some(ticket), Some(seq)))
    }

    /// Raises the delivery mark to `seq`, a fresh ready message about to be stored,
    /// when fewer than twice the consumers' credit of messages are ahead of it: it
    /// will go out within about two credit windows, so the mark rides in its round
    /// (whose counters are written anyway) instead of costing a round of its own
    /// before the delivery. After a crash such a message comes back as a
    /// redelivery even if its delivery never went out; that over-count is bounded
    /// by twice the consumers' credit, as for `request_mark`'s marks.
    ///
    /// (It used to mark only a message a consumer had credit for at that moment.
    /// With one consumer keeping up, its window is mostly full of unacked
    /// deliveries when a message arrives, so most messages were stored unmarked
    /// and their delivery waited for a mark's round of its own: about one sync in
    /// ten of a 1-to-1 `queue` run.)
    fn premark(&self, st: &mut State, seq: u64) -> bool {
        if st.marks.settled || st.ready.unloaded() > 0 || st.marks.durable.max(st.c.mark) >= seq {
            return false;
        }
        let ahead = st.retry.len() + st.ready.len() + st.pending.len();
        if ahead >= st.consumers.total_credit().saturating_mul(2) {
            return false;
        }
        st.c.mark = seq;
        true
    }

    /// At a graceful shutdown: lowers the stored delivery mark from where it ran
    /// ahead (`request_mark`, `premark`) to the last message actually delivered, so
    /// that after a clean restart only messages that were delivered come back as
    /// redeliveries. From then on no mark rises, so no fresh message is delivered
    /// past it.
    pub fn settle_mark(&self) {
        let mut st = self.lock();
        if st.deleted || st.marks.settled {
            return;
        }
        st.marks.settled = true;
        st.marks.pending = None;
        let exact = st.marks.restart.max(st.marks.delivered);
        st.marks.durable = st.marks.durable.min(exact);
        if st.c.mark > exact {
            st.c.mark = exact;
            let c = st.c;
            self.store.batch(|b| b.set_counters(self.qid, c));
        }
    }

    /// Messages and bytes the queue holds: ready (in memory, in the store, waiting
    /// for their commit), delayed, in flight and on their way out, each once.
    pub(super) fn held(&self, st: &State) -> (u64, u64) {
        (st.c.m_count + st.c.d_count, st.c.m_bytes + st.c.d_bytes)
    }

    /// Applies max_length / max_bytes before a message of `size` bytes is added.
    ///
    /// The limits count every message the queue holds (ready, delayed, in flight,
    /// waiting for its commit or for its move out), and max_bytes counts each one's
    /// [`Message::size`]. A message that could never fit (larger than max_bytes, or
    /// max_length 0) is refused without touching what is stored. Otherwise
    /// drop-head drops the oldest ready messages until the new one fits, paging them
    /// in from the store if needed, and refuses only when what is left is delayed or
    /// in flight (those are never dropped).
    fn make_room(&self, st: &mut State, size: u64) -> bool {
        let s = &self.settings;
        if s.max_length.is_none() && s.max_bytes.is_none() {
            return true;
        }
        if s.max_length == Some(0) || s.max_bytes.is_some_and(|m| size > m) {
            return false;
        }
        loop {
            let (count, bytes) = self.held(st);
            let over = s.max_length.is_some_and(|m| count + 1 > m)
                || s.max_bytes.is_some_and(|m| bytes + size > m);
            if !over {
                return true;
            }
            if !s.drop_head {
                return false;
            }
            let Some(head) = self.take_oldest_ready(st) else {
                return false;
            };
            st.stats.dropped += 1;
            self.remove_stored(st, head.slot, head.msg.size());
        }
    }

    /// The oldest ready message no consumer holds, for drop-head: a redelivery, the
    /// window's first, one paged in for this, or one still waiting for its commit.
    fn take_oldest_ready(&self, st: &mut State) -> Option<Entry> {
        loop {
            if let Some(e) = st.retry.pop_front() {
                return Some(e);
            }
            if let Some((_, e)) = st.ready.pop_first() {
                return Some(e);
            }
            if st.ready.unloaded() > 0 {
                if !self.page_now(st) {
                    return None;
                }
                continue;
            }
            // The oldest left is still waiting for its commit: it is dropped as it
            // lands (its publisher is confirmed, as for any message dropped later).
            // The new copy of a move is not dropped: its old copy's removal waits
            // on its commit.
            let i = st
                .pending
                .iter()
                .position(|p| p.due.is_none() && !p.moved)?;
            let p = st.pending.remove(i)?;
            st.skip.insert(p.slot.seq);
            return Some(Entry {
                slot: p.slot,
                msg: p.msg,
            });
        }
    }

    /// Removes one stored ready message for good (ack, drop, expiry, a finished move).
    pub(super) fn remove_stored(&self, st: &mut State, slot: Slot, size: u64) {
        st.c.m_count = st.c.m_count.saturating_sub(1);
        st.c.m_bytes = st.c.m_bytes.saturating_sub(size);
        let c = st.c;
        self.store.batch(|b| {
            b.remove_ready(self.qid, slot);
            b.set_counters(self.qid, c);
        });
    }

    pub(super) fn prune_dedup(&self, st: &mut State, now: u64) {
        let gone = st.dedup.prune(
            now,
            self.settings.dedup_window_ms,
            self.limits.dedup_capacity,
            self.limits.dedup_max_bytes,
        );
        self.forget_ids(&gone);
    }

    fn forget_ids(&self, ids: &[Text]) {
        if !ids.is_empty() {
            self.store.batch(|b| {
                for id in ids {
                    b.remove_dedup(self.qid, id);
                }
            });
        }
    }

    // ---------------------------------------------------------------- figures

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
        let (depth, bytes) = self.held(&st);
        let (publish_rate, deliver_rate, ack_rate) = st.stats.rates(self.clock.now_ms());
        QueueInfo {
            name: self.name.clone(),
            bindings,
            depth,
            bytes,
            in_flight: st.in_flight.len() as u64,
            delayed: st.c.d_count,
            consumers: u32::try_from(st.consumers.len()).unwrap_or(u32::MAX),
            dead_lettered: st.stats.dead_lettered,
            published: st.stats.published,
            delivered: st.stats.delivered,
            acked: st.stats.acked,
            publish_rate,
            deliver_rate,
            ack_rate,
        }
    }

    /// Figures beyond `QueueInfo`, for the stats frame.
    pub fn extra_stats(&self) -> [(&'static str, u64); 8] {
        let st = self.lock();
        [
            ("rejected", st.stats.rejected),
            ("dropped", st.stats.dropped),
            ("expired", st.stats.expired),
            ("duplicates", st.stats.duplicates),
            ("ready_in_memory", (st.ready.len() + st.retry.len()) as u64),
            ("dedup_ids", st.dedup.len() as u64),
            ("dedup_bytes", st.dedup.bytes()),
            ("in_flight_bytes", st.in_flight.bytes()),
        ]
    }
}

/// The slot of a delayed message: only its seq means anything.
pub(crate) fn delayed_slot(seq: u64) -> Slot {
    Slot {
        seq,
        chunk: seq,
        attempts_key: false,
    }
}
