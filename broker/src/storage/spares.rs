//! Spare segment files, made ready before the queue log needs them.
//!
//! Every confirm waits for an `fdatasync` of the log. After an append that grows a
//! file, the file system must also make the file's new size and newly allocated
//! blocks durable. Measured here (ext4, 100 KiB writes, median `fdatasync`): 0.25 ms
//! appending, 0.20 ms writing into blocks reserved with `fallocate`, 0.14 ms
//! overwriting blocks written before. So a new segment starts as a file whose blocks
//! are already there: a retired segment renamed for reuse (the steady state: it
//! takes the place of a reserved spare that is ready, since syncs into its written
//! blocks are the cheapest), or else one that a background thread
//! (`tidings-spares`) reserves with `fallocate` and syncs. Zero-filling instead would make the first pass over the log cost twice its
//! bytes in writes (it did: up to a quarter of the broker's CPU in a short
//! benchmark), for 0.06 ms a sync. Stale records in a reused file never verify,
//! since a record's checksum covers its segment id, and reserved blocks read as
//! zeros, which are no record at all, so replay ends the log where the writes end
//! (replay.rs). On a simulated disk ([`Disk::wants_spares`] false) no spares are
//! made.
//!
//! The thread starts when the log's first segment is half full and then keeps one
//! spare ready; a broker whose queues see little traffic writes no spares. Once the
//! log has drained, up to [`KEEP_RECYCLED`] retired files stay allocated as spares.

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use super::disk::Disk;

/// Spares the thread keeps ready.
const WANT: usize = 1;
/// Retired segments' files kept ready for reuse, at most: at full rate several
/// segments retire at one checkpoint, and each kept one spares a new segment the
/// costlier syncs of reserved blocks. Also what stays allocated once the log has
/// drained: this many segment files.
const KEEP_RECYCLED: usize = 2;
const PREFIX: &str = "spare-";

/// How a spare's blocks came to be there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A retired segment's file: its blocks are written, so writes into it are
    /// overwrites and their syncs commit no metadata.
    Recycled,
    /// Reserved with `fallocate`: the first write into each extent also commits
    /// its conversion from unwritten, so these syncs cost more.
    Reserved,
}

#[derive(Default)]
struct State {
    /// Recycled spares first: they are taken first.
    ready: VecDeque<(PathBuf, Kind)>,
    next_name: u64,
    started: bool,
    stop: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A fresh name in the segment directory, never a segment's.
    fn name(&self, dir: &Path) -> PathBuf {
        let mut state = self.lock();
        state.next_name += 1;
        dir.join(format!("{PREFIX}{}.tmp", state.next_name))
    }
}

/// The spare files of one segment directory.
pub(crate) struct Spares {
    disk: Arc<dyn Disk>,
    /// False on a simulated disk: no spares are made or kept.
    enabled: bool,
    dir: PathBuf,
    size: u64,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Spares {
    /// Spares for segments of `size` bytes in `dir`. Spares left by an earlier run
    /// may never have been synced: they are deleted.
    pub fn new(disk: Arc<dyn Disk>, dir: &Path, size: u64) -> io::Result<Self> {
        for name in disk.list(dir)? {
            if name.starts_with(PREFIX) {
                disk.remove(&dir.join(name))?;
            }
        }
        Ok(Self {
            enabled: disk.wants_spares(),
            disk,
            dir: dir.to_owned(),
            size,
            shared: Arc::default(),
            thread: Mutex::new(None),
        })
    }

    /// A ready spare, if there is one, to be renamed into a segment; asks for the
    /// next one.
    pub fn take(&self) -> Option<PathBuf> {
        let spare = self.shared.lock().ready.pop_front();
        self.shared.wake.notify_one();
        spare.map(|(path, _)| path)
    }

    /// Starts making spares, if that has not started yet.
    pub fn start(&self) {
        let mut state = self.shared.lock();
        if self.enabled && !state.started && !state.stop {
            state.started = true;
            let (shared, dir, size) = (self.shared.clone(), self.dir.clone(), self.size);
            let disk = self.disk.clone();
            let spawned = std::thread::Builder::new()
                .name("tidings-spares".into())
                .spawn(move || prepare(&*disk, &shared, &dir, size));
            match spawned {
                Ok(handle) => {
                    *self.thread.lock().unwrap_or_else(PoisonError::into_inner) = Some(handle)
                }
                // The log works without spares, only its syncs are slower.
                Err(err) => tracing::warn!(error = %err, "cannot start the spares thread"),
            }
        }
    }

    /// Keeps the file of a retired segment as a spare while fewer than
    /// [`KEEP_RECYCLED`] retired files are ready, in place of a reserved spare once
    /// that many spares of any kind are (the reserved one is deleted); false if it
    /// was not taken (the caller deletes it). A retired file kept only while no
    /// spare at all was ready was nearly never kept: the thread's reserved spare
    /// was there first.
    pub fn recycle(&self, segment: &Path) -> bool {
        if !self.enabled {
            return false;
        }
        // Only the store thread recycles, so the count cannot grow under us.
        let recycled = {
            let state = self.shared.lock();
            state
                .ready
                .iter()
                .filter(|(_, k)| *k == Kind::Recycled)
                .count()
        };
        if recycled >= KEEP_RECYCLED {
            return false;
        }
        let spare = self.shared.name(&self.dir);
        if let Err(err) = self.disk.rename(segment, &spare) {
            tracing::debug!(error = %err, "cannot recycle a segment");
            return false;
        }
        let displaced = {
            let mut state = self.shared.lock();
            let displaced = if state.ready.len() >= KEEP_RECYCLED {
                let at = state.ready.iter().position(|(_, k)| *k == Kind::Reserved);
                at.and_then(|i| state.ready.remove(i)).map(|(path, _)| path)
            } else {
                None
            };
            state.ready.push_front((spare, Kind::Recycled));
            displaced
        };
        if let Some(path) = displaced {
            if let Err(err) = self.disk.remove(&path) {
                // Left behind, it is deleted with the other leftovers at the next start.
                tracing::debug!(error = %err, "cannot delete a reserved spare");
            }
        }
        true
    }

    fn stop(&self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_all();
        let handle = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }
}

impl Drop for Spares {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The spares thread: prepares a spare whenever fewer than [`WANT`] are ready.
fn prepare(disk: &dyn Disk, shared: &Shared, dir: &Path, size: u64) {
    loop {
        {
            let mut state = shared.lock();
            while !state.stop && state.ready.len() >= WANT {
                state = shared
                    .wake
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            if state.stop {
                return;
            }
        }
        let path = shared.name(dir);
        match reserve(disk, shared, &path, size) {
            Ok(true) => shared.lock().ready.push_back((path, Kind::Reserved)),
            Ok(false) => {
                let _ = disk.remove(&path);
                return;
            }
            Err(err) => {
                let _ = disk.remove(&path);
                tracing::warn!(error = %err, "cannot prepare a spare segment; going on without");
                return;
            }
        }
    }
}

/// Allocates `size` bytes to a new file and syncs it (its size and blocks are
/// then durable, so the log's writes into it need no metadata at their sync);
/// false if told to stop first.
fn reserve(disk: &dyn Disk, shared: &Shared, path: &Path, size: u64) -> io::Result<bool> {
    let file = disk.create_new(path)?;
    if shared.lock().stop {
        return Ok(false);
    }
    file.allocate(size)?;
    file.sync_data()?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::disk::RealDisk;

    /// The first ready spare, once the thread has made one (10 s at most).
    fn first_ready(spares: &Spares) -> (PathBuf, Kind) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if let Some(first) = spares.shared.lock().ready.front().cloned() {
                return first;
            }
            assert!(std::time::Instant::now() < deadline, "no spare was made");
            let state = spares.shared.lock();
            drop(
                spares
                    .shared
                    .wake
                    .wait_timeout(state, std::time::Duration::from_millis(10))
                    .unwrap(),
            );
        }
    }

    #[test]
    fn the_first_take_starts_reserving_and_recycling_tops_up() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("spare-9.tmp"), b"left over").unwrap();
        let spares = Spares::new(Arc::new(RealDisk), dir.path(), 3 << 20).unwrap();
        assert!(!dir.path().join("spare-9.tmp").exists(), "leftovers go");
        assert!(spares.take().is_none(), "nothing is made before start");
        spares.start();
        // The thread fills one.
        first_ready(&spares);
        let spare = spares.take().expect("the spare made");
        let bytes = std::fs::read(&spare).unwrap();
        assert_eq!(bytes.len(), 3 << 20);
        assert!(bytes.iter().all(|b| *b == 0));
        // Its blocks are reserved, not a sparse file's holes.
        use std::os::unix::fs::MetadataExt;
        let allocated = std::fs::metadata(&spare).unwrap().blocks() * 512;
        assert!(allocated >= 3 << 20, "only {allocated} bytes allocated");

        // Retired segments are kept up to KEEP_RECYCLED, and no more.
        drop(spares);
        let spares = Spares::new(Arc::new(RealDisk), dir.path(), 1 << 20).unwrap();
        let segment = dir.path().join("00000000000000000001.seg");
        std::fs::write(&segment, b"old records").unwrap();
        assert!(spares.recycle(&segment));
        assert!(!segment.exists());
        for n in 2..=KEEP_RECYCLED {
            let next = dir.path().join(format!("{n:020}.seg"));
            std::fs::write(&next, b"more").unwrap();
            assert!(spares.recycle(&next));
        }
        let other = dir.path().join("00000000000000000099.seg");
        std::fs::write(&other, b"more").unwrap();
        assert!(!spares.recycle(&other), "{KEEP_RECYCLED} spares are enough");
        assert!(other.exists(), "left for the caller to delete");
        // The last kept is taken first; the first kept comes last.
        let taken: Vec<Vec<u8>> = (0..KEEP_RECYCLED)
            .map(|_| std::fs::read(spares.take().expect("a recycled file")).unwrap())
            .collect();
        assert_eq!(taken.last().map(Vec::as_slice), Some(&b"old records"[..]));
        assert!(spares.take().is_none());
    }

    /// A retired segment takes the place of a reserved spare that is ready (which
    /// is deleted), and is the one taken next.
    #[test]
    fn a_retired_segment_displaces_a_reserved_spare() {
        let dir = tempfile::tempdir().unwrap();
        let spares = Spares::new(Arc::new(RealDisk), dir.path(), 1 << 20).unwrap();
        spares.start();
        let (reserved, kind) = first_ready(&spares);
        assert_eq!(kind, Kind::Reserved);
        // Room for KEEP_RECYCLED: the first retired files are added beside it.
        for n in 1..KEEP_RECYCLED {
            let segment = dir.path().join(format!("{n:020}.seg"));
            std::fs::write(&segment, b"kept beside").unwrap();
            assert!(spares.recycle(&segment));
            assert!(reserved.exists());
        }
        let segment = dir.path().join("00000000000000000099.seg");
        std::fs::write(&segment, b"old records").unwrap();
        assert!(spares.recycle(&segment), "a reserved spare makes way");
        assert!(!reserved.exists(), "the reserved spare is deleted");
        let taken = spares.take().expect("the recycled file");
        assert_eq!(
            std::fs::read(taken).unwrap(),
            b"old records",
            "the last kept first"
        );
        assert_eq!(spares.shared.lock().ready.len(), KEEP_RECYCLED - 1);
        assert!(
            spares
                .shared
                .lock()
                .ready
                .iter()
                .all(|(_, k)| *k == Kind::Recycled),
            "no reserved spare is left"
        );
    }
}
