//! The log boundary: what the writer needs from the log that makes rounds durable.
//!
//! [`Segments`](super::segments::Segments) is the local implementation: segment files
//! on one disk, made durable by `fdatasync`. A replicated log would stand here in its
//! place: `append_*` and `write_out` would send the round's records to the replicas,
//! [`Log::take_unsynced`] would name what the round still waits for, and the syncer's
//! "durable" would become "acknowledged by a quorum" instead of "fdatasync
//! returned". Chunk locations would stay opaque to everyone but the log, and replay
//! would read the same records back from any replica. Nothing else in the store
//! would change: the index is still applied only with durable rounds, and confirms
//! still wait for the round that holds them. Nothing of replication is built yet.

use std::io;

use super::records::{Location, Position};
use super::segments::Unsynced;

/// The writer's side of the queue log (see the module docs).
pub(crate) trait Log: Send {
    /// Queues a chunk record (message bodies); returns where it will be.
    fn append_chunk(&mut self, body: &[u8]) -> io::Result<Location>;
    /// Queues a batch record (the round's index writes).
    fn append_batch(&mut self, batch: &[u8]) -> io::Result<()>;
    /// Writes out what this round queued. After an error the store stops.
    fn write_out(&mut self) -> io::Result<()>;
    /// The position after everything appended so far.
    fn end(&self) -> Position;
    /// One chunk in `segment` is gone; returns how many stay live there.
    fn release(&mut self, segment: u64) -> u64;
    /// How many chunks are live in `segment`.
    fn live(&self, segment: u64) -> u64;
    /// What the rounds written since the last call still need to be durable.
    fn take_unsynced(&mut self) -> Unsynced;
    /// Space the rounds since the last call freed, to reclaim after a checkpoint.
    fn take_retired(&mut self) -> Vec<u64>;
}

impl Log for super::segments::Segments {
    fn append_chunk(&mut self, body: &[u8]) -> io::Result<Location> {
        super::segments::Segments::append_chunk(self, body)
    }

    fn append_batch(&mut self, batch: &[u8]) -> io::Result<()> {
        super::segments::Segments::append_batch(self, batch)
    }

    fn write_out(&mut self) -> io::Result<()> {
        super::segments::Segments::write_out(self)
    }

    fn end(&self) -> Position {
        super::segments::Segments::end(self)
    }

    fn release(&mut self, segment: u64) -> u64 {
        super::segments::Segments::release(self, segment)
    }

    fn live(&self, segment: u64) -> u64 {
        super::segments::Segments::live(self, segment)
    }

    fn take_unsynced(&mut self) -> Unsynced {
        super::segments::Segments::take_unsynced(self)
    }

    fn take_retired(&mut self) -> Vec<u64> {
        super::segments::Segments::take_retired(self)
    }
}
