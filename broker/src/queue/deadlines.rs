//! `Deadlines`: the one timer of the queue engine. Each queue registers the next
//! moment it has something to do (an ack timeout, a delayed message falling due, a
//! message expiring, a dedup id to forget); a single task sleeps until the earliest
//! of them and runs the queues that are due. An idle queue registers nothing and
//! costs nothing.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard, PoisonError};

use tokio::sync::Notify;

#[derive(Default)]
struct Schedule {
    /// `(due_ms, qid)`, earliest first.
    by_time: BTreeSet<(u64, u32)>,
    /// Each queue's one entry in `by_time`.
    by_queue: HashMap<u32, u64>,
}

/// When each queue next needs to run.
#[derive(Default)]
pub(crate) struct Deadlines {
    schedule: Mutex<Schedule>,
    /// Wakes the timer task when a deadline earlier than its sleep was added.
    pub changed: Notify,
}

impl Deadlines {
    fn lock(&self) -> MutexGuard<'_, Schedule> {
        self.schedule.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Asks for queue `qid` to run at `at` (wall-clock ms), unless it is already
    /// due earlier.
    pub fn schedule(&self, qid: u32, at: u64) {
        let mut s = self.lock();
        if let Some(&old) = s.by_queue.get(&qid) {
            if old <= at {
                return;
            }
            s.by_time.remove(&(old, qid));
        }
        let earliest = s.by_time.first().is_none_or(|(first, _)| at < *first);
        s.by_time.insert((at, qid));
        s.by_queue.insert(qid, at);
        drop(s);
        if earliest {
            self.changed.notify_one();
        }
    }

    /// Forgets queue `qid` (deleted).
    pub fn cancel(&self, qid: u32) {
        let mut s = self.lock();
        if let Some(old) = s.by_queue.remove(&qid) {
            s.by_time.remove(&(old, qid));
        }
    }

    /// Takes out every queue due at `now`.
    pub fn take_due(&self, now: u64) -> Vec<u32> {
        let mut s = self.lock();
        let mut due = Vec::new();
        while let Some(&(at, qid)) = s.by_time.first() {
            if at > now {
                break;
            }
            s.by_time.pop_first();
            s.by_queue.remove(&qid);
            due.push(qid);
        }
        due
    }

    /// The earliest deadline, if any.
    pub fn next(&self) -> Option<u64> {
        self.lock().by_time.first().map(|(at, _)| *at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn earliest_wins_and_due_ones_come_out_once() {
        let d = Deadlines::default();
        d.schedule(1, 500);
        d.schedule(1, 900);
        d.schedule(2, 100);
        d.schedule(1, 300);
        assert_eq!(d.next(), Some(100));
        assert_eq!(d.take_due(99), Vec::<u32>::new());
        assert_eq!(d.take_due(300), vec![2, 1]);
        assert_eq!(d.next(), None);
        d.schedule(3, 10);
        d.cancel(3);
        assert_eq!(d.take_due(u64::MAX), Vec::<u32>::new());
    }
}
