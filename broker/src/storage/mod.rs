//! Durable storage for the queue engine: the queue log (segment files of records),
//! the index (sled), checkpoints, and the store thread that turns queued writes into
//! group commits.
//!
//! ```text
//!  queue.rs ──Store::batch──► Pending ──take──► writer (writer.rs) ──one pwrite──► log (segments.rs)
//!                                                   │ the round, on the same thread
//!                                                   ▼
//!  tickets, listeners, reads ◄──── syncer (syncer.rs): fdatasync, then apply to the index (index.rs)
//! ```
//!
//! One thread (`tidings-store`) runs both halves in turn: it takes what is queued,
//! writes it, syncs it, answers it, and only then takes again. What arrives meanwhile
//! could not have made that sync anyway, so it gathers into the next round, and a
//! round costs one wake-up of one thread. Writes nobody waits for (acks) are held
//! back for a few milliseconds so that they share the next round somebody does wait
//! for, instead of taking a sync of their own; a connection wakes the store thread
//! once per read, so that a read's publishes share a round (rounds.rs).
//!
//! # The durability contract
//!
//! With `--fsync always` (the default):
//!
//! - **A confirm means durable.** A round's confirms (its `Ticket` and its
//!   `CommitListener` calls) go out only after `fdatasync` of every segment the
//!   round wrote, and `fsync` of the segment directory when the round created a
//!   segment. One sync covers everything queued while the previous round was synced
//!   and answered (and a checkpoint ran, if one was due): group commit, one round,
//!   one `pwrite` and one `fdatasync` (two of each when the round fills a segment
//!   and rolls to the next).
//! - **The index never runs ahead of the log.** A round's index writes are logged as
//!   one batch record in the round, and applied to the index only after the round is
//!   durable. They go to an overlay in memory first (overlay.rs), which writes
//!   what is left of them to sled at the next checkpoint, so that a chunk acked
//!   within a second costs sled nothing (its keys are marked new to the index, so
//!   their removal leaves nothing to write either; replay marks nothing new, since
//!   after a crash sled may already hold part of what is replayed). The index is made durable only at
//!   checkpoints; between them it may write
//!   back any prefix of its writes on its own (sled does), and a restart replays the
//!   log from the last durable checkpoint, which brings every such state to the same
//!   one. So a round is atomic: a move done in one round (delayed to ready), a queue
//!   delete (one prefix removal) either happened or did not.
//! - **Rounds are durable in order.** A write queued after another is in the same
//!   round or a later one, and a sync covers a prefix of rounds. So a move that
//!   stores the new copy before it removes the old one (dead-lettering, redrive) can
//!   never lose the message to a crash: at worst both copies come back
//!   (at-least-once).
//! - **Fail-stop.** The first failed write, `fdatasync`, directory `fsync` or index
//!   checkpoint stops the store: it is logged once at error level with the path and
//!   the OS error, every pending and later confirm fails with `StorageFailure`, and
//!   every later write is refused with it (publishes that reach a queue included).
//!   No sync is ever retried: Linux reports a lost writeback once, and a retried
//!   `fdatasync` "succeeds" over data that never reached the disk. The log is synced
//!   in two places (the writer before a segment rolls, the syncer every round)
//!   through one shared descriptor per file, so a lost writeback is reported to one
//!   of them only: every sync goes through one gate (`Files::sync_file`) and, once
//!   one has failed, every later one fails too. Reads, pub/sub and
//!   deliveries of what is in memory go on. A write that fails before the kernel
//!   took the data (`ENOSPC`, `EIO` from `pwrite`) stops the store the same way, for
//!   two reasons: the queues have already counted the round in memory, so going on
//!   would make them disagree with the disk, and how much of a failed `pwrite` reached
//!   the file is unknown. Restarting recovers from what is on disk, once there is
//!   space again. A panic on the store thread (a bug) stops the store the same way,
//!   rather than leave every confirm waiting.
//! - **After a crash** a restart brings back every confirmed message. It may also
//!   bring back messages whose publish was answered with an error or never answered
//!   (a failed confirm means "maybe stored"), an acked message whose ack was not yet
//!   durable (as a redelivery, attempt >= 2), and both copies of a message that was
//!   moving.
//! - **Damage is not a torn write.** Only the tail of the newest segment may be cut
//!   off silently; a bad record anywhere else refuses the start, naming the file and
//!   offset (replay.rs), until the repair mode cuts the log there.
//!
//! With `--fsync interval:MS` or `never`, confirms go out once the round is written
//! to the log (the operating system holds it), and the index is applied at once: a
//! `kill -9` loses nothing, a power loss loses the last interval's rounds and may
//! leave the index pointing at chunks that never reached the disk (they are skipped
//! with an error on read).
//!
//! # Seams
//!
//! Every file operation of the log goes through [`Disk`] ([`RealDisk`], or
//! [`SimDisk`] in tests: durable vs written bytes, power loss, torn writes, injected
//! EIO/ENOSPC). The index goes through [`Index`] ([`SledIndex`], or [`MemoryIndex`]
//! in tests: at a power loss it keeps its last checkpoint plus a random prefix of
//! its writes since). [`StorageBackend`] picks them; the simulation test in
//! `sim_test.rs` runs the whole queue engine on the simulated pair.
//!
//! # Replication
//!
//! The writer talks to the log through one trait, `log::Log`. A replicated log would
//! implement it: appends and `write_out` send the round to the replicas, and the
//! syncer's wait for `fdatasync` becomes a wait for a quorum's acknowledgement. The
//! index, the checkpoints, the fail-stop rules and the queues above would not change;
//! replay would read the same records from a replica. Nothing of it is built yet.
//!
//! # Files
//!
//! - `disk.rs`, `sim_disk.rs`: the file-system seam and its simulation;
//! - `index.rs`: the index seam, sled (the only file that imports it) and memory;
//! - `keys.rs`: the index layout; `chunks.rs`: chunks and their removal bitmaps;
//! - `records.rs`: log records and the batch record; `segments.rs`: segment files;
//!   `spares.rs`: preallocated segment files; `log.rs`: the log boundary;
//! - `replay.rs`: recovery, torn tail vs damage, the repair cut;
//! - `open.rs`: the startup sequence and repair; `store.rs`: the handle, batches,
//!   tickets; `writer.rs`, `syncer.rs`: the store thread's two halves (writing a
//!   round out; syncing, applying and answering it); `scan.rs`: reads;
//!   `overlay.rs`: index writes held in memory until the next checkpoint;
//! - tests only: `sim_test.rs` (the power-loss simulation), `sim_model.rs` (the
//!   model and the check after each restart), `sim_checks.rs` (the simulation's
//!   self-checks and regressions of what its seeds found).

mod chunks;
mod disk;
mod index;
mod keys;
mod log;
mod open;
mod overlay;
mod records;
mod replay;
mod rounds;
mod scan;
mod segments;
mod sim_disk;
mod spares;
mod store;
mod syncer;
mod writer;

#[cfg(test)]
mod sim_checks;
#[cfg(test)]
mod sim_model;
#[cfg(test)]
mod sim_test;

pub use disk::{Disk, DiskFile, RealDisk};
pub use index::{Index, MemoryIndex, SledIndex, Tree};
pub use open::{RepairReport, StorageBackend};
pub use replay::{Cut, Damage};
pub use sim_disk::{SECTOR, SimDisk, SimError, SimRng};

pub(crate) use keys::Counters;
pub(crate) use store::{
    CommitListener, DeferredWakes, Loaded, LoadedQueue, Range, Slot, Store, Ticket,
};

/// A storage failure, as text so it can be handed to every waiter of a batch.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error("{0}")]
pub struct StoreError(pub(crate) String);

impl StoreError {
    pub(crate) fn io(context: &str, err: impl std::fmt::Display) -> Self {
        StoreError(format!("{context}: {err}"))
    }
}

impl From<StoreError> for crate::queue::QueueError {
    fn from(err: StoreError) -> Self {
        crate::queue::QueueError::Storage(err.0)
    }
}
