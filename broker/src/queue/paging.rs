//! The store side of [`Queue`]: paging its windows in from the store, and the
//! commit callback that makes stored messages visible and completes moves within
//! the queue.

use crate::queue::durable::{Queue, State};
use crate::queue::window::{Entry, Key, PageVerdict};
use crate::storage::{CommitListener, Loaded, Range, StoreError};

impl Queue {
    /// Adds a page of stored ready messages read from `from` to the window, up to
    /// the first one not yet committed here. Returns how many it took.
    pub(super) fn take_ready_page(
        &self,
        from: Key,
        page: Vec<Loaded>,
        requested: usize,
        st: &mut State,
    ) -> usize {
        let committed_below = st.committed_below;
        let restart = st.marks.restart;
        let skip = &mut st.skip;
        let taken = st.ready.take_page(
            from,
            page,
            requested,
            |l| {
                let seq = l.key.1;
                if seq >= committed_below {
                    PageVerdict::Stop
                } else if skip.remove(&seq) {
                    PageVerdict::Skip
                } else {
                    PageVerdict::Keep
                }
            },
            |(_, seq), msg| {
                // Stored before the last restart at or below its delivery mark: it
                // may have been delivered then, so it comes back as a redelivery.
                if seq <= restart {
                    msg.deliveries = msg.deliveries.max(1);
                }
            },
        );
        self.prune_skip(st);
        taken
    }

    /// Forgets skipped seqs no page read can bring any more: those below where the
    /// next read starts, or all of them when everything is in memory. Kept while a
    /// read is on its way, since it started where the window was then.
    pub(super) fn prune_skip(&self, st: &mut State) {
        if st.skip.is_empty() || st.ready.paging {
            return;
        }
        match st.ready.read_start() {
            None => st.skip.clear(),
            Some((_, seq)) => {
                while st.skip.first().is_some_and(|s| *s < seq) {
                    st.skip.pop_first();
                }
            }
        }
    }

    /// Adds a page of stored delayed messages read from `from`.
    pub(super) fn take_delayed_page(
        &self,
        from: Key,
        page: Vec<Loaded>,
        requested: usize,
        st: &mut State,
    ) {
        let committed_below = st.committed_below;
        st.delayed.take_page(
            from,
            page,
            requested,
            // Not yet committed here: its commit callback will place it.
            |l| {
                if l.key.1 >= committed_below {
                    PageVerdict::Skip
                } else {
                    PageVerdict::Keep
                }
            },
            |_, _| {},
        );
    }

    /// Pages in the oldest stored ready messages at once, on the calling thread, for
    /// a drop-head that found none in memory. A page read already on its way is then
    /// ignored (it no longer starts where the window ends). False if nothing came.
    pub(super) fn page_now(&self, st: &mut State) -> bool {
        let (from, count, bytes) = st.ready.page_request();
        let count = count.min(256);
        let range = Range::Messages {
            qid: self.qid,
            from: from.1,
        };
        match self.store.read_now(range, count, bytes) {
            Ok(page) => {
                if self.take_ready_page(from, page, count, st) > 0 {
                    return true;
                }
                if st.ready.len() == 0 && st.ready.unloaded() > 0 {
                    tracing::warn!(queue = %self.name, unloaded = st.ready.unloaded(), "store holds fewer ready messages than counted");
                    st.ready.give_up_unloaded();
                }
                st.ready.len() > 0
            }
            Err(err) => {
                tracing::error!(queue = %self.name, error = %err, "paging messages in failed");
                false
            }
        }
    }

    pub(super) fn maybe_page_ready(&self, st: &mut State) {
        if !st.ready.wants_page() {
            return;
        }
        st.ready.paging = true;
        let (from, count, bytes) = st.ready.page_request();
        let me = self.arc();
        self.store.read(
            Range::Messages {
                qid: self.qid,
                from: from.1,
            },
            count,
            bytes,
            move |result| me.ready_page_loaded(from, count, result),
        );
    }

    fn ready_page_loaded(&self, from: Key, count: usize, result: Result<Vec<Loaded>, StoreError>) {
        let mut st = self.lock();
        st.ready.paging = false;
        match result {
            Ok(page) if st.ready.expects(from) && !st.deleted => {
                if self.take_ready_page(from, page, count, &mut st) == 0
                    && st.ready.len() == 0
                    && st.ready.unloaded() > 0
                {
                    tracing::warn!(queue = %self.name, unloaded = st.ready.unloaded(), "store holds fewer ready messages than counted");
                    st.ready.give_up_unloaded();
                }
                self.serve(&mut st, self.clock.now_ms());
            }
            // Overtaken (a drop-head paged in meanwhile): ask again from where it is.
            Ok(_) if !st.deleted => self.maybe_page_ready(&mut st),
            Ok(_) => {}
            Err(err) => {
                tracing::error!(queue = %self.name, error = %err, "paging messages in failed")
            }
        }
        drop(st);
        self.paged.notify_waiters();
    }

    pub(super) fn maybe_page_delayed(&self, st: &mut State) {
        if !st.delayed.wants_page() {
            return;
        }
        st.delayed.paging = true;
        let (from, count, bytes) = st.delayed.page_request();
        let me = self.arc();
        self.store.read(
            Range::Delayed { qid: self.qid, from },
            count,
            bytes,
            move |result| {
                let mut st = me.lock();
                st.delayed.paging = false;
                match result {
                    Ok(page) if st.delayed.expects(from) && !st.deleted => {
                        me.take_delayed_page(from, page, count, &mut st);
                        me.reschedule(&mut st);
                    }
                    Ok(_) => {}
                    Err(err) => {
                        tracing::error!(queue = %me.name, error = %err, "paging delayed messages in failed")
                    }
                }
            },
        );
    }
}

impl CommitListener for Queue {
    fn committed(&self, epoch: u64, result: &Result<(), StoreError>) {
        let mut st = self.lock();
        if st.deleted {
            return;
        }
        if let Err(err) = result {
            // The publishers get the error; the messages stay visible, since they may
            // well be stored (an error confirm means "maybe", never "no").
            tracing::error!(queue = %self.name, error = %err, "commit failed");
        }
        while st.pending.front().is_some_and(|p| p.epoch <= epoch) {
            let Some(p) = st.pending.pop_front() else {
                break;
            };
            st.committed_below = st.committed_below.max(p.slot.seq + 1);
            if p.marked && result.is_ok() && !st.marks.settled {
                st.marks.durable = st.marks.durable.max(p.slot.seq);
            }
            if result.is_err() && !p.moved {
                // A publish whose round failed may not be stored: forget its id, so
                // that the publisher's retry is stored rather than called a duplicate.
                if let Some(id) = &p.msg.message_id {
                    st.dedup.forget(id, p.msg.published_ms);
                }
            }
            let entry = Entry {
                slot: p.slot,
                msg: p.msg,
            };
            match p.due {
                Some(due) => st.delayed.add((due, p.slot.seq), entry),
                None => st.ready.add((0, p.slot.seq), entry),
            }
        }
        if let Some((mark_epoch, target)) = st.marks.pending {
            if mark_epoch <= epoch {
                st.marks.pending = None;
                // A mark whose round failed is not on disk: nothing past the old one
                // may be delivered as a first delivery (fail-stop).
                if result.is_ok() && !st.marks.settled {
                    st.marks.durable = st.marks.durable.max(target);
                }
            }
        }
        self.serve(&mut st, self.clock.now_ms());
    }
}
