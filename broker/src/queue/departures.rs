//! Messages leaving a [`Queue`] for another one — dead letters going to the
//! dead-letter queue, dead letters redriven back — seen from the queue they leave:
//! taken out (but still stored), then removed once their new copy is durable, or
//! given back if the move failed.

use crate::queue::durable::{Queue, State};
use crate::queue::record::Message;
use crate::queue::window::Entry;
use crate::storage::{Loaded, Slot};

/// A message taken out of a dead-letter queue for a redrive.
pub(crate) struct Claimed {
    pub slot: Slot,
    pub message: Message,
}

impl Queue {
    /// Completes moves out of this queue: their new copies are durable, so the old
    /// ones can be removed here.
    pub fn finish_departures(&self, moved: &[(Slot, u64)], dead_lettered: bool) {
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

    /// Gives a message back after its move failed: it is ready again.
    pub fn abort_departure(&self, slot: Slot, msg: Message) {
        let mut st = self.lock();
        if st.deleted {
            return;
        }
        if msg.deliveries == 0 && slot.seq > st.marks.durable {
            // Never delivered: back into the window in seq order, so that its first
            // delivery waits for a durable mark like any other (retry would skip it).
            st.skip.remove(&slot.seq);
            st.ready.add((0, slot.seq), Entry { slot, msg });
        } else {
            st.retry.push_back(Entry { slot, msg });
        }
        self.serve(&mut st, self.clock.now_ms());
    }

    /// Whether a move within the queue is waiting for its new copy's commit.
    pub fn has_moves_pending(&self) -> bool {
        self.lock().pending.iter().any(|p| p.moved)
    }

    /// Takes the messages waiting to move out, for a caller that can hand them to
    /// the engine at once (a nack or cancel, so that the dead-letter queue exists
    /// and holds the copy's write before the answer goes out).
    pub fn take_departures(&self) -> Vec<super::durable::Departure> {
        std::mem::take(&mut self.lock().departures)
    }

    /// Whether nothing of this queue is waiting on the store or the engine: no
    /// write waiting for its commit callback, no delivery mark on its way, no page
    /// read out, no message waiting to move out.
    pub fn is_quiet(&self) -> bool {
        let st = self.lock();
        st.pending.is_empty()
            && st.marks.pending.is_none()
            && !st.ready.paging
            && !st.delayed.paging
            && st.departures.is_empty()
    }

    /// Whether a message read from the store has committed here (a read may see
    /// rounds that are applied but not yet durable).
    pub fn is_committed(&self, seq: u64) -> bool {
        seq < self.lock().committed_below
    }

    /// Takes the stored ready messages of `page` that `wanted` accepts out of the
    /// queue for a move, if no consumer holds them: from memory when they are there,
    /// from the store (skipped by later pages) when they are not. Messages in
    /// flight, waiting for a commit or already leaving are passed over. They stay
    /// stored until [`Queue::finish_departures`].
    pub fn claim(
        &self,
        page: Vec<Loaded>,
        mut wanted: impl FnMut(&Message) -> bool,
    ) -> Vec<Claimed> {
        let mut st = self.lock();
        let mut out = Vec::new();
        if st.deleted {
            return out;
        }
        for loaded in page {
            let seq = loaded.key.1;
            if seq >= st.committed_below || st.arriving.contains(&seq) || !wanted(&loaded.message) {
                continue;
            }
            if let Some(e) = take_in_memory(&mut st, seq) {
                out.push(Claimed {
                    slot: e.slot,
                    message: e.msg,
                });
            } else if st.ready.beyond((0, seq)) && !st.skip.contains(&seq) {
                st.skip.insert(seq);
                st.ready.forget_unloaded();
                out.push(Claimed {
                    slot: loaded.slot(),
                    message: loaded.message,
                });
            }
        }
        out
    }
}

fn take_in_memory(st: &mut State, seq: u64) -> Option<Entry> {
    if let Some(i) = st.retry.iter().position(|e| e.slot.seq == seq) {
        return st.retry.remove(i);
    }
    st.ready.remove((0, seq))
}
