//! The syncer, the second half of the store thread (`tidings-store`): takes the next
//! round from the writer (which writes it out), makes it durable with one
//! `fdatasync` per segment written (per the fsync policy), applies its batch to the
//! index and resolves its ticket (the confirms), and then tells its listeners and
//! serves its reads. Between rounds it runs the checkpoints and deletes the segments
//! they free.
//!
//! So the index only ever holds rounds that are durable in the log (under
//! `--fsync always`): whatever prefix of its writes the index has written back when
//! the power goes, a replay of the log brings it to the same state. While a sync and
//! its answers run, what arrives gathers, and the next round takes all of it: one
//! wake-up, one `pwrite` and one `fdatasync` for it all. (The two halves once ran on
//! threads of their own, the writer writing while a sync ran; what it wrote then
//! could only make the next sync anyway, and the hand-over between them cost two
//! wake-ups a round: with one thread, 1-to-1 `queue` runs did ~10 % more messages a
//! second with ~40 % fewer context switches.)
//!
//! Fail-stop: an error from a sync, from the index at a checkpoint, or reported
//! by the writer is fatal. It is recorded once (`Shared::fail`), the round that hit
//! it and every later one resolve with it, and no sync is ever retried: after a
//! failed `fdatasync` Linux reports the lost writeback once, and a retry would
//! "succeed" over data that never reached the disk.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::StoreError;
use super::index::{Index, Tree};
use super::keys::CHECKPOINT_KEY;
use super::records::{IndexBatch, Position};
use super::scan::scan;
use super::segments::{Files, Unsynced};
use super::store::{CommitListener, ReadRequest, Shared, TicketSender};
use super::writer::Writer;
use crate::queue::FsyncPolicy;

/// A round the writer has written out, for the syncer.
pub(crate) struct Written {
    pub epoch: u64,
    /// It wrote something, successfully.
    pub wrote: bool,
    pub result: Result<(), StoreError>,
    /// Its batch record's payload, applied to the index once durable.
    pub batch: Option<Vec<u8>>,
    /// Which of the batch's writes set keys new to the index (`IndexBatch::new_ops`).
    pub new_ops: Vec<u32>,
    pub listeners: Vec<Arc<dyn CommitListener>>,
    pub ticket: Option<TicketSender>,
    pub reads: Vec<ReadRequest>,
    pub shutdown: bool,
    /// Segments written by this round.
    pub unsynced: Unsynced,
    /// Segments this round retired.
    pub retired: Vec<u64>,
    /// The log's end after this round.
    pub log_end: Position,
}

/// When a syncer with no rounds to take wakes by itself: for the interval sync of
/// what was written since `dirty_since`, or for the checkpoint due at
/// `checkpoint_at`. A failed store does neither any more (no sync is retried, no
/// checkpoint runs), so it sleeps until rounds come: a deadline that stays in the
/// past would have it spin a core until the broker restarts (it did, after a disk
/// filled up).
fn next_wake(
    policy: FsyncPolicy,
    dirty_since: Option<Instant>,
    checkpoint_at: Option<Instant>,
    failed: bool,
) -> Option<Instant> {
    if failed {
        return None;
    }
    let sync = match (policy, dirty_since) {
        (FsyncPolicy::Interval(every), Some(last_sync)) => Some(last_sync + every),
        _ => None,
    };
    sync.into_iter().chain(checkpoint_at).min()
}

/// Makes written rounds durable, applies them to the index and releases their
/// confirms and reads; checkpoints the index and deletes segments no longer needed.
pub(crate) struct Syncer {
    pub shared: Arc<Shared>,
    /// Takes and writes out the rounds, on this same thread.
    pub writer: Writer,
    pub index: Arc<dyn Index>,
    pub segments: Arc<Files>,
    /// Segments written since the last sync.
    pub unsynced: Unsynced,
    /// Retired segments, each with the log end of the round that retired it.
    pub retired: Vec<(u64, Position)>,
    pub policy: FsyncPolicy,
    /// The log end of the last round applied to the index.
    pub log_end: Position,
    /// The checkpoint last written to the index, and the last one known durable.
    pub checkpoint: Position,
    pub durable: Position,
    pub last_checkpoint: Instant,
    pub checkpoint_every: Duration,
    /// Test only (`StorageBackend::simulated_index_ahead`): apply rounds before their
    /// sync, as this store once did. Never set outside the simulation's self-check.
    pub apply_early: bool,
}

impl Syncer {
    pub fn run(mut self) {
        let mut last_sync = Instant::now();
        let mut dirty = false;
        loop {
            // The next round, written out; none when woken for an interval sync or
            // a checkpoint.
            let mut round = self.writer.produce(self.wake_at(dirty, last_sync));
            if let Some(round) = &mut round {
                self.unsynced.absorb(std::mem::take(&mut round.unsynced));
                let end = round.log_end;
                self.retired
                    .extend(round.retired.drain(..).map(|id| (id, end)));
            }
            let wrote = round.as_ref().is_some_and(|r| r.wrote);
            let shutdown = round.as_ref().is_some_and(|r| r.shutdown);
            dirty |= wrote;
            let failed = self.shared.failure();
            let sync_now = failed.is_none()
                && (match self.policy {
                    FsyncPolicy::Always => wrote,
                    FsyncPolicy::Interval(every) => dirty && last_sync.elapsed() >= every,
                    FsyncPolicy::Never => false,
                } || (shutdown && dirty));
            if self.apply_early
                && let Some(round) = &mut round
                && let (Ok(()), Some(batch)) = (&round.result, round.batch.take())
            {
                let _ = IndexBatch::apply(&batch, &*self.index);
                self.log_end = self.log_end.max(round.log_end);
            }
            let mut synced = match failed {
                Some(err) => Err(err),
                None => Ok(()),
            };
            if sync_now {
                let started = Instant::now();
                let result = self.unsynced.sync(&self.segments);
                self.shared.metrics.fsync(started.elapsed());
                if let Err(err) = result {
                    let err = StoreError::io("fdatasync of the queue log", err);
                    self.shared.fail(&err);
                    synced = Err(err);
                }
                last_sync = Instant::now();
                dirty = false;
            }
            if let Some(round) = round {
                self.answer(round, synced);
            }
            // After the confirms above, so that a checkpoint delays none of this
            // round's (the next round is taken after it, like after a sync).
            if self.shared.failure().is_none() && (shutdown || self.checkpoint_due()) {
                let started = Instant::now();
                if let Err(err) = self.run_checkpoint(shutdown) {
                    self.shared.fail(&err);
                }
                self.shared.metrics.checkpoint(started.elapsed());
            }
            if shutdown {
                break;
            }
        }
        self.shared
            .stop(&StoreError("the store is shut down".into()));
        tracing::info!("queue store closed");
    }

    /// The round's index writes once it is synced (`synced`), then its confirm, then
    /// its listeners (which make messages visible and deliver them) and reads: a
    /// confirm waits for its round's sync and index writes, so what it confirms can
    /// be read back at once, but not for its round's deliveries.
    fn answer(&mut self, round: Written, synced: Result<(), StoreError>) {
        let mut result = round.result.and(synced);
        if result.is_ok() {
            if let Some(batch) = &round.batch {
                // The writer marks keys new only where that holds (`Writer::new_keys`).
                if let Err(err) = IndexBatch::apply_knowing(batch, &round.new_ops, &*self.index) {
                    self.shared.fail(&err);
                    result = Err(err);
                }
            }
            if result.is_ok() {
                self.log_end = self.log_end.max(round.log_end);
            }
        }
        if let Some(ticket) = round.ticket {
            ticket.send_replace(Some(result.clone()));
        }
        for listener in &round.listeners {
            listener.committed(round.epoch, &result);
        }
        for read in round.reads {
            let loaded = scan(
                &*self.index,
                &self.segments,
                read.range,
                read.max_count,
                read.max_bytes,
            );
            (read.then)(loaded);
        }
    }

    /// Whether the index holds log records (or a checkpoint) not yet known durable,
    /// and the last checkpoint is old enough.
    fn checkpoint_due(&self) -> bool {
        self.checkpoint_pending() && self.last_checkpoint.elapsed() >= self.checkpoint_every
    }

    fn checkpoint_pending(&self) -> bool {
        self.log_end > self.checkpoint || self.durable < self.checkpoint
    }

    /// When to stop waiting for rounds: the next interval sync or checkpoint.
    fn wake_at(&self, dirty: bool, last_sync: Instant) -> Option<Instant> {
        next_wake(
            self.policy,
            dirty.then_some(last_sync),
            self.checkpoint_pending()
                .then(|| self.last_checkpoint + self.checkpoint_every),
            self.shared.failure().is_some(),
        )
    }

    /// Makes the index durable, so every log record before `log_end` is durable in
    /// it, and so is the checkpoint written last time; then records `log_end` as the
    /// new checkpoint (durable at the next one, or at once when `last`), and deletes
    /// the retired segments no replay can need any more.
    fn run_checkpoint(&mut self, last: bool) -> Result<(), StoreError> {
        let reached = self.log_end;
        self.index.checkpoint()?;
        self.durable = self.checkpoint;
        self.index
            .insert(Tree::Defs, CHECKPOINT_KEY, &reached.encode())?;
        self.checkpoint = reached;
        if last {
            self.index.checkpoint()?;
            self.durable = reached;
        }
        self.last_checkpoint = Instant::now();
        let durable = self.durable;
        let (gone, kept): (Vec<_>, Vec<_>) =
            self.retired.drain(..).partition(|(_, end)| *end <= durable);
        self.retired = kept;
        let gone: Vec<u64> = gone.into_iter().map(|(id, _)| id).collect();
        // Forgotten first: a file the syncer still holds counts as one in use.
        self.unsynced.forget(&gone);
        self.segments.delete(&gone);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_store_has_no_deadline_to_wake_for() {
        let past = Instant::now();
        let every = Duration::from_millis(5);
        let interval = FsyncPolicy::Interval(every);
        assert_eq!(
            next_wake(interval, Some(past), None, false),
            Some(past + every)
        );
        assert_eq!(
            next_wake(FsyncPolicy::Always, Some(past), Some(past), false),
            Some(past),
            "a pending checkpoint"
        );
        assert_eq!(next_wake(FsyncPolicy::Always, None, None, false), None);
        // Failed: the sync and the checkpoint it would wake for never run, and their
        // deadlines stay in the past.
        assert_eq!(next_wake(interval, Some(past), Some(past), true), None);
    }
}
