//! The consumer side of [`Queue`]: handing messages to consumers by credit, acks,
//! nacks, redelivery with backoff, ack timeouts, TTL expiry, and the work the
//! engine's timer runs when the queue is due.

use std::sync::Arc;

use smallvec::SmallVec;
use tidings_protocol::Delivery;

use crate::queue::consumers::Consumer;
use crate::queue::durable::{Departure, PendingEntry, Queue, State, delayed_slot};
use crate::queue::in_flight::Delivered;
use crate::queue::link::{Held, SessionLink};
use crate::queue::rates::Event;
use crate::queue::record::Message;
use crate::queue::window::Entry;
use crate::storage::Slot;

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

/// A consumer the queue ended (the queue was deleted).
pub(crate) struct Ended {
    pub link: Arc<SessionLink>,
    pub consumer_id: u32,
}

/// The sessions that hold deliveries of one [`Queue::serve`] pass, released when it
/// ends: each connection's writer wakes once per pass and sends its deliveries in
/// one write. Only the delivery that made a release owed adds its session, so many
/// consumers cost no search; a session is listed again each time another sender
/// paid its wake-up in the middle of the pass (the later releases find nothing
/// owed).
#[derive(Default)]
struct Owed(SmallVec<[Arc<SessionLink>; 2]>);

impl Drop for Owed {
    fn drop(&mut self) {
        for link in self.0.drain(..) {
            link.sink.release();
        }
    }
}

impl Queue {
    /// Hands ready messages to consumers with credit, drops expired ones, pages in
    /// more when the window runs low, and registers the next deadline. Runs after
    /// every change that can let a message out.
    pub(super) fn serve(&self, st: &mut State, now: u64) {
        if st.deleted {
            return;
        }
        // Released when this pass ends, however it ends.
        let mut owed = Owed::default();
        while let Some(ci) = st.consumers.pick() {
            let entry = if let Some(e) = st.retry.pop_front() {
                e
            } else {
                let Some(front) = st.ready.first() else {
                    break;
                };
                if front.msg.deliveries == 0 && front.slot.seq > st.marks.durable {
                    self.request_mark(st);
                    break;
                }
                let Some((_, e)) = st.ready.pop_first() else {
                    break;
                };
                e
            };
            if self.expired(&entry.msg, now) {
                self.expire(st, entry);
                continue;
            }
            self.deliver(st, ci, entry, now, &mut owed);
            st.consumers.served(ci);
        }
        drop(owed);
        self.request_mark(st);
        self.expire_head(st, now);
        self.maybe_page_ready(st);
        self.prune_skip(st);
        self.reschedule(st);
    }

    fn expired(&self, msg: &Message, now: u64) -> bool {
        self.settings
            .ttl_ms
            .is_some_and(|ttl| now >= msg.published_ms.saturating_add(ttl))
    }

    /// An expired message leaves: to the dead-letter queue if it exists (the engine
    /// decides), counted either way.
    fn expire(&self, st: &mut State, e: Entry) {
        st.stats.expired += 1;
        self.depart(st, e.slot, e.msg, "expired");
    }

    fn expire_head(&self, st: &mut State, now: u64) {
        if self.settings.ttl_ms.is_none() {
            return;
        }
        while st.retry.front().is_some_and(|e| self.expired(&e.msg, now)) {
            if let Some(e) = st.retry.pop_front() {
                self.expire(st, e);
            }
        }
        while st.ready.first().is_some_and(|e| self.expired(&e.msg, now)) {
            if let Some((_, e)) = st.ready.pop_first() {
                self.expire(st, e);
            }
        }
    }

    /// Queues a message to leave for the dead-letter queue; the engine's timer
    /// task takes it at once.
    pub(super) fn depart(
        &self,
        st: &mut State,
        slot: Slot,
        message: Message,
        reason: &'static str,
    ) {
        st.departures.push(Departure {
            slot,
            message,
            reason,
        });
        self.wake_at(st, 0);
    }

    /// Lets the store know which fresh messages are about to be delivered, so that
    /// after a crash they come back marked as redeliveries.
    ///
    /// The mark runs ahead of the deliveries: it covers up to twice the consumers'
    /// credit of the ready messages in memory, and the next mark is asked for once
    /// fewer than one credit's worth of marked messages are left. So while
    /// consumers keep up, deliveries never wait for a mark's round; the price is
    /// that after a crash up to twice the consumers' credit of messages that were
    /// never delivered come back counted as delivered once. A message stored while
    /// a consumer had credit for it was marked in its own round instead
    /// (`Queue::premark`).
    fn request_mark(&self, st: &mut State) {
        if st.marks.pending.is_some() || st.marks.settled {
            return;
        }
        // Everything in memory marked already (the usual case when consumers keep
        // up): no walk over the window.
        if st
            .ready
            .last_key()
            .is_none_or(|(_, seq)| seq <= st.marks.durable)
        {
            return;
        }
        let credit = st.consumers.total_credit();
        if credit == 0 {
            return;
        }
        let len = st.ready.len();
        let (near, far) = (credit.min(len), credit.saturating_mul(2).min(len));
        let mut keys = st.ready.keys().map(|(_, seq)| *seq);
        // Still a credit's worth marked ahead: no round needed yet.
        let Some(low) = keys.nth(near - 1) else {
            return;
        };
        if low <= st.marks.durable {
            return;
        }
        let target = if far > near {
            keys.nth(far - near - 1).unwrap_or(low)
        } else {
            low
        };
        st.c.mark = st.c.mark.max(target);
        let c = st.c;
        let listener = self.listener();
        let epoch = self.store.batch(|b| {
            b.set_counters(self.qid, c);
            b.listen(listener, &mut st.listen_epoch);
            b.epoch()
        });
        st.marks.pending = Some((epoch, target));
    }

    fn deliver(&self, st: &mut State, ci: usize, mut entry: Entry, now: u64, owed: &mut Owed) {
        let Some((link, consumer_id)) = st.consumers.get(ci).map(|c| (c.link.clone(), c.id)) else {
            st.retry.push_front(entry);
            return;
        };
        let Some(delivery_id) = link.register(self.qid, entry.slot.seq) else {
            st.consumers.update(ci, |c| c.alive = false);
            st.retry.push_front(entry);
            return;
        };
        entry.msg.deliveries = entry.msg.deliveries.saturating_add(1);
        st.marks.delivered = st.marks.delivered.max(entry.slot.seq);
        st.consumers.update(ci, |c| {
            c.outstanding += 1;
            if let Some(left) = &mut c.remaining {
                *left = left.saturating_sub(1);
            }
        });
        let entry_attempt = entry.msg.deliveries;
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
        st.in_flight.insert(
            entry.slot.seq,
            Delivered {
                msg: entry.msg,
                slot: entry.slot,
                link: link.clone(),
                consumer_id,
                delivery_id,
                deadline,
            },
        );
        st.stats.count(Event::Delivered, now);
        if entry_attempt > 1 {
            st.stats.redelivered += 1;
        }
        match link.sink.deliver_held(delivery) {
            Held::Sent | Held::Queued => {}
            Held::Owed => owed.0.push(link),
            Held::Gone => {
                // The connection is gone; its session's drop (or the ack timeout)
                // returns what it holds. Stop feeding it meanwhile.
                st.consumers.update(ci, |c| c.alive = false);
            }
        }
    }

    /// Takes a delivery back from its consumer and requeues or dead-letters it.
    fn take_back(&self, st: &mut State, seq: u64, how: Requeue, now: u64) {
        let Some(d) = st.in_flight.remove(seq) else {
            return;
        };
        st.consumers.returned(d.link.id, d.consumer_id);
        self.requeue(st, d.slot, d.msg, how, now);
    }

    fn requeue(&self, st: &mut State, mut slot: Slot, msg: Message, how: Requeue, now: u64) {
        if msg.deliveries >= self.settings.max_deliveries {
            self.depart(st, slot, msg, "max_deliveries");
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
        // One round: the delayed copy and the ready one's removal become durable
        // together (the store applies a round to its index only once the round's
        // log records are durable), so a crash leaves the message in exactly one
        // place — never none, never both.
        let due = now.saturating_add(delay);
        let size = msg.size();
        let listener = self.listener();
        let new_seq = st.c.next_seq;
        st.c.next_seq += 1;
        st.c.d_count += 1;
        st.c.d_bytes += size;
        st.c.m_count = st.c.m_count.saturating_sub(1);
        st.c.m_bytes = st.c.m_bytes.saturating_sub(size);
        let c = st.c;
        let epoch = self.store.batch(|b| {
            b.put_delayed(self.qid, due, new_seq, &msg);
            b.remove_ready(self.qid, slot);
            b.set_counters(self.qid, c);
            b.listen(listener, &mut st.listen_epoch);
            b.epoch()
        });
        st.pending.push_back(PendingEntry {
            epoch,
            slot: delayed_slot(new_seq),
            due: Some(due),
            msg,
            moved: true,
            marked: false,
        });
    }

    // ---------------------------------------------------------------- consumers

    /// Attaches a consumer with `credit` (already capped) and at most `limit`
    /// deliveries in all; false if the queue was deleted meanwhile.
    pub fn add_consumer(
        &self,
        link: &Arc<SessionLink>,
        id: u32,
        credit: u32,
        limit: Option<u32>,
    ) -> bool {
        let mut st = self.lock();
        if st.deleted {
            return false;
        }
        st.consumers.add(Consumer {
            link: link.clone(),
            id,
            window: credit,
            outstanding: 0,
            remaining: limit,
            alive: true,
        });
        self.serve(&mut st, self.clock.now_ms());
        true
    }

    /// Raises a consumer's window by `credit`, up to the engine's cap; returns the
    /// window it now has.
    pub fn add_credit(&self, session_id: u64, id: u32, credit: u32) -> Option<u32> {
        let mut st = self.lock();
        let cap = self.limits.max_credit;
        let slot = st.consumers.find(session_id, id)?;
        let window = st.consumers.update(slot, |c| {
            c.window = c.window.saturating_add(credit).min(cap);
            c.window
        })?;
        self.serve(&mut st, self.clock.now_ms());
        Some(window)
    }

    /// Detaches a consumer; everything it had in flight is ready again at once.
    pub fn remove_consumer(&self, session_id: u64, id: u32) {
        let mut st = self.lock();
        st.consumers.remove(session_id, id);
        let now = self.clock.now_ms();
        for seq in st.in_flight.held_by(session_id, id) {
            self.take_back(&mut st, seq, Requeue::Now, now);
        }
        self.serve(&mut st, now);
    }

    /// Acks `(delivery id, seq)` pairs of one session; returns the ids that were not
    /// outstanding there.
    pub fn ack(&self, session_id: u64, items: &[(u64, u64)]) -> Vec<u64> {
        let mut st = self.lock();
        let now = self.clock.now_ms();
        let mut unknown = Vec::new();
        let mut removed = Vec::with_capacity(items.len());
        for &(id, seq) in items {
            if !st.in_flight.is_out(seq, session_id, id) {
                unknown.push(id);
                continue;
            }
            let Some(d) = st.in_flight.remove(seq) else {
                continue;
            };
            st.consumers.returned(session_id, d.consumer_id);
            let size = d.msg.size();
            st.c.m_count = st.c.m_count.saturating_sub(1);
            st.c.m_bytes = st.c.m_bytes.saturating_sub(size);
            st.stats.count(Event::Acked, now);
            removed.push(d.slot);
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
        self.serve(&mut st, now);
        unknown
    }

    /// Nacks `(delivery id, seq)` pairs of one session; returns the unknown ids.
    pub fn nack(&self, session_id: u64, items: &[(u64, u64)], how: Requeue) -> Vec<u64> {
        let mut st = self.lock();
        let now = self.clock.now_ms();
        let mut unknown = Vec::new();
        for &(id, seq) in items {
            if st.in_flight.is_out(seq, session_id, id) {
                self.take_back(&mut st, seq, how, now);
            } else {
                unknown.push(id);
            }
        }
        self.serve(&mut st, now);
        unknown
    }

    // ---------------------------------------------------------------- timer

    /// Everything due at `now`: ack timeouts, delayed messages falling due, dedup
    /// ids to forget, expiry. Returns the messages leaving for another queue, for
    /// the engine to move.
    pub fn run_due(&self, now: u64) -> Vec<Departure> {
        let mut st = self.lock();
        st.wake_at = u64::MAX;
        if st.deleted {
            return Vec::new();
        }
        while let Some(seq) = st.in_flight.overdue(now) {
            if let Some(d) = st.in_flight.remove(seq) {
                d.link.forget(d.delivery_id);
                st.consumers.returned(d.link.id, d.consumer_id);
                self.requeue(&mut st, d.slot, d.msg, Requeue::Backoff, now);
            }
        }
        self.promote_due(&mut st, now);
        self.maybe_page_delayed(&mut st);
        self.prune_dedup(&mut st, now);
        self.serve(&mut st, now);
        let departures = std::mem::take(&mut st.departures);
        // `serve` rescheduled with the departures still queued (at 0); now that
        // they are handed over, register the real next deadline.
        st.wake_at = u64::MAX;
        self.reschedule(&mut st);
        departures
    }

    /// Delayed messages that are due move to the end of the ready queue: the ready
    /// copy and the delayed one's removal go into one round, atomic after a crash.
    fn promote_due(&self, st: &mut State, now: u64) {
        let mut due_now = Vec::new();
        while st.delayed.first_key().is_some_and(|(due, _)| due <= now) {
            if let Some((key, e)) = st.delayed.pop_first() {
                due_now.push((key, e.msg));
            }
        }
        if due_now.is_empty() {
            return;
        }
        let listener = self.listener();
        self.store.batch(|b| {
            for ((due, seq), msg) in due_now {
                let size = msg.size();
                let new_seq = st.c.next_seq;
                st.c.next_seq += 1;
                st.c.m_count += 1;
                st.c.m_bytes += size;
                st.c.d_count = st.c.d_count.saturating_sub(1);
                st.c.d_bytes = st.c.d_bytes.saturating_sub(size);
                // One round with the delayed copy's removal: atomic after a crash.
                let slot = b.put_ready(self.qid, new_seq, &msg);
                b.remove_delayed(self.qid, due, seq);
                st.pending.push_back(PendingEntry {
                    epoch: b.epoch(),
                    slot,
                    due: None,
                    msg,
                    moved: true,
                    marked: false,
                });
            }
            b.set_counters(self.qid, st.c);
            b.listen(listener, &mut st.listen_epoch);
        });
    }

    // ---------------------------------------------------------------- delete

    /// Marks the queue deleted and forgets its state; returns its consumers, for
    /// the engine to tell. The caller deletes its keys.
    pub fn mark_deleted(&self) -> Vec<Ended> {
        let mut st = self.lock();
        st.deleted = true;
        for d in st.in_flight.drain() {
            d.link.forget(d.delivery_id);
        }
        let ended = st
            .consumers
            .drain()
            .into_iter()
            .map(|c| Ended {
                link: c.link,
                consumer_id: c.id,
            })
            .collect();
        st.retry.clear();
        st.ready.clear();
        st.pending.clear();
        st.delayed.clear();
        st.departures.clear();
        st.arriving.clear();
        st.dedup.clear();
        self.deadlines.cancel(self.qid);
        ended
    }
}
