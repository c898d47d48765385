//! How the store thread takes its rounds ([`Shared::take`]): everything queued, in
//! one go, once somebody waits for some of it — and writes nobody waits for held
//! back a little, so that they ride in the next round somebody does wait for.
//!
//! Somebody waits for a round when it holds a confirm's ticket, a queue's commit
//! callback (fresh messages waiting to be delivered, a delivery mark), a read, or
//! the shutdown. Nobody waits for acks, nacks without delay and attempt counts:
//! they are applied in memory at once, and their answers never wait for the disk.
//! Written at once, though, each gap between publishes made a round and an
//! `fdatasync` of its own for them, which the next publishes then waited out: with
//! one producer and one consumer paced at 10,000 msgs/s, a third of all syncs.
//! Held back (at most [`UNAWAITED_HOLD`], and never past [`UNAWAITED_MAX_BYTES`] of
//! them), they go with the next publishes' round. Nothing is applied early or reordered: a write queued
//! after another is in the same round or a later one, as before. What the hold
//! risks is what at-least-once allows: after a crash, acks from its last few
//! milliseconds are not on disk, so those messages come back as redeliveries.
//!
//! The hold needs its companion, [`Store::defer_wakes`](super::Store::defer_wakes):
//! a connection wakes the store thread once per read, not once per publish. Before
//! the hold, the ack round's sync was what gathered a burst of publishes (a paced
//! producer's, say) into one round; with the store thread idle when the burst came,
//! its first publish woke it and went alone, and the rest waited for a second sync
//! (p99 at 10,000 msgs/s up to 4x).

use std::sync::PoisonError;
use std::time::{Duration, Instant};

use super::store::{Pending, Round, Shared};

/// How long writes nobody waits for may wait for a round somebody waits for before
/// they are written and synced as a round of their own.
pub(crate) const UNAWAITED_HOLD: Duration = Duration::from_millis(5);
/// Writes nobody waits for are taken at once past this many bytes: the hold never
/// keeps much (a removal counts 20 bytes, so this is some 13,000 acks).
const UNAWAITED_MAX_BYTES: usize = 256 * 1024;

impl Pending {
    /// Whether somebody waits for what is queued, or there is too much of it to
    /// hold back: then the store thread takes it at once.
    pub(super) fn awaited(&self) -> bool {
        self.ticket.is_some()
            || !self.listeners.is_empty()
            || !self.reads.is_empty()
            || self.shutdown
            || self.bytes >= UNAWAITED_MAX_BYTES
    }
}

impl Shared {
    /// Waits for work (until `wake_at`, if given), then takes everything queued as
    /// one round; `None` if `wake_at` passed first with nothing queued.
    ///
    /// The store thread calls it once it has answered the last round: what arrived
    /// during that round's `fdatasync` and answers is written and synced together.
    /// Work nobody waits for is held for up to [`Shared::hold`] from when this call
    /// first sees it (see the module docs), never past `wake_at`.
    pub fn take(&self, wake_at: Option<Instant>) -> Option<Round> {
        let mut p = self.lock();
        let mut held_since: Option<Instant> = None;
        loop {
            let until = if p.has_work() {
                if p.awaited() {
                    break;
                }
                let since = *held_since.get_or_insert_with(Instant::now);
                let release = since + self.hold;
                Some(wake_at.map_or(release, |at| at.min(release)))
            } else {
                wake_at
            };
            p.writer_waiting = true;
            p.writer_holding = held_since.is_some();
            p = match until {
                None => self.wake.wait(p).unwrap_or_else(PoisonError::into_inner),
                Some(at) => {
                    let left = at.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        p.writer_waiting = false;
                        p.writer_holding = false;
                        if p.has_work() {
                            break;
                        }
                        return None;
                    }
                    self.wake
                        .wait_timeout(p, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
            p.writer_waiting = false;
            p.writer_holding = false;
        }
        Some(p.take_round())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::mpsc;

    use super::*;
    use crate::storage::store::Slot;
    use crate::telemetry::StorageMetrics;

    fn shared(hold: Duration) -> Arc<Shared> {
        let mut shared = Shared::new(Arc::new(StorageMetrics::default()));
        shared.hold = hold;
        Arc::new(shared)
    }

    /// An ack's write: a ready message of queue 1 removed.
    fn remove(shared: &Shared, seq: u64) {
        let slot = Slot {
            seq,
            chunk: 0,
            attempts_key: false,
        };
        shared.batch(|b| b.remove_ready(1, slot));
    }

    /// Takes the next round on a thread of its own; the round comes back on the
    /// channel.
    fn take_on_thread(shared: &Arc<Shared>) -> mpsc::Receiver<Option<Round>> {
        let (tx, rx) = mpsc::channel();
        let shared = shared.clone();
        std::thread::spawn(move || {
            let _ = tx.send(shared.take(None));
        });
        rx
    }

    /// Waits until the store thread sleeps in `take`, holding what it has seen;
    /// fails if it took a round instead.
    fn until_holding(shared: &Shared, taken: &mpsc::Receiver<Option<Round>>) {
        while !shared.lock().writer_holding {
            assert!(taken.try_recv().is_err(), "taken without a hold");
            std::thread::yield_now();
        }
    }

    #[test]
    fn the_protocol_spec_states_the_hold() {
        let spec = include_str!("../../../protocol/PROTOCOL.md");
        let said = format!("at most {} ms", UNAWAITED_HOLD.as_millis());
        assert!(
            spec.contains(&said),
            "PROTOCOL.md's ACK section must say {said:?}"
        );
    }

    fn wakes(shared: &Shared) -> usize {
        shared.wakes.load(std::sync::atomic::Ordering::Relaxed)
    }

    #[test]
    fn a_deferral_wakes_the_store_thread_once_at_its_end() {
        let shared = shared(Duration::from_secs(3600));
        // As if the store thread waited for work.
        shared.lock().writer_waiting = true;
        {
            let _outer = shared.defer_wakes();
            let _ticket = shared.batch(|b| b.ticket());
            {
                let _inner = shared.defer_wakes();
                remove(&shared, 1);
            }
            let _ticket = shared.batch(|b| b.ticket());
            assert_eq!(wakes(&shared), 0, "woken before the deferral ended");
        }
        assert_eq!(wakes(&shared), 1, "one wake-up for the deferred batches");
        let round = shared.take(None).expect("a round");
        assert_eq!(round.removals.len(), 1, "all of it in one round");
        // Without a deferral every batch wakes a waiting store thread.
        shared.lock().writer_waiting = true;
        let _ticket = shared.batch(|b| b.ticket());
        let _ticket = shared.batch(|b| b.ticket());
        assert_eq!(wakes(&shared), 3);
    }

    #[test]
    fn a_deferral_with_nothing_queued_wakes_nobody() {
        let shared = shared(Duration::from_secs(3600));
        shared.lock().writer_waiting = true;
        drop(shared.defer_wakes());
        assert_eq!(wakes(&shared), 0);
    }

    #[test]
    fn work_somebody_waits_for_is_taken_at_once() {
        let shared = shared(Duration::from_secs(3600));
        let _ticket = shared.batch(|b| b.ticket());
        let round = shared.take(None).expect("a round");
        assert!(round.ticket.is_some());
    }

    #[test]
    fn acks_wait_for_the_next_round_somebody_waits_for_and_go_with_it() {
        // An hour's hold: the round can only end because a confirm came.
        let shared = shared(Duration::from_secs(3600));
        remove(&shared, 1);
        let rx = take_on_thread(&shared);
        until_holding(&shared, &rx);
        remove(&shared, 2);
        assert!(rx.try_recv().is_err(), "an ack alone ended the hold");
        let _ticket = shared.batch(|b| b.ticket());
        let round = rx
            .recv()
            .expect("the store thread answers")
            .expect("a round");
        assert!(round.ticket.is_some());
        let seqs: Vec<u64> = round.removals.iter().map(|r| r.2).collect();
        assert_eq!(
            seqs,
            [1, 2],
            "the held acks ride in the confirm's round, in order"
        );
        assert!(!shared.lock().has_work(), "nothing is left behind");
    }

    #[test]
    fn held_acks_are_written_by_themselves_once_the_hold_ends() {
        let hold = Duration::from_millis(20);
        let shared = shared(hold);
        remove(&shared, 7);
        let started = Instant::now();
        let round = shared.take(None).expect("a round");
        assert!(started.elapsed() >= hold, "taken before the hold ended");
        assert_eq!(round.removals, [(1, 0, 7)]);
        assert!(round.ticket.is_none());
    }

    #[test]
    fn the_hold_never_outlasts_the_interval_sync_or_checkpoint_due() {
        let shared = shared(Duration::from_secs(3600));
        remove(&shared, 1);
        let round = shared.take(Some(Instant::now() + Duration::from_millis(10)));
        assert_eq!(round.expect("a round").removals.len(), 1);
        // With nothing queued, `wake_at` passing ends the wait with no round.
        assert!(shared.take(Some(Instant::now())).is_none());
    }

    #[test]
    fn too_much_held_work_is_taken_at_once() {
        let shared = shared(Duration::from_secs(3600));
        let removals = UNAWAITED_MAX_BYTES.div_ceil(20);
        {
            let mut p = shared.lock();
            for seq in 0..removals as u64 {
                p.removals.push((1, 0, seq));
                p.bytes += 20;
            }
        }
        let round = shared.take(None).expect("a round");
        assert_eq!(round.removals.len(), removals);
    }

    #[test]
    fn a_held_slot_removal_keeps_its_attempts_key_removal_with_it() {
        // Removals and the ops queued with them leave in the same round.
        let shared = shared(Duration::from_millis(1));
        shared.batch(|b| {
            b.remove_ready(
                3,
                Slot {
                    seq: 9,
                    chunk: 8,
                    attempts_key: true,
                },
            )
        });
        let round = shared.take(None).expect("a round");
        assert_eq!(round.removals, [(3, 8, 9)]);
        assert_eq!(round.ops.len(), 1);
    }
}
