//! The queue log's segment files under `<data-dir>/segments/`: the writer's side
//! ([`Segments`]: appends, rolls, counts live chunks) and the shared read side
//! ([`Files`]). Every file operation goes through the [`Disk`] seam.
//!
//! Every group commit appends its chunks of message bodies and then one batch
//! record holding every index write of the round (records.rs), written out with one
//! `pwrite`; a round is durable once the segments it wrote are `fdatasync`ed (and
//! their directory `fsync`ed when a segment was created).
//!
//! # Why not all in sled
//!
//! sled 0.34 is log-structured: an insert appends the value to its log, and every
//! few updates it rewrites the whole tree node the value sits in, values included.
//! With 8 KiB chunk values a leaf carries 16–26 of them, so each payload byte was
//! written about seven times (measured with `strace` on the queue benchmark: 368 MB
//! of `pwrite` for 51 MB of payload). So a body is written once, by one `pwrite` per
//! round, the index's values shrink to a [`Location`] and a removal bitmap, and a
//! round waits for one sync of the log instead of a flush of the index.
//!
//! # Lifecycle
//!
//! New segments are preallocated files (spares.rs), so a segment's length says
//! nothing: its records end at an end record or at the first bytes that are no valid
//! record (zeros, or a reused file's old records). A segment is closed with an end
//! record, and that record is `fdatasync`ed *before* the next segment is created:
//! so every segment but the newest ends in a durable end record, and a bad record
//! anywhere but in the newest one is damage, never a torn write (replay.rs).
//!
//! The writer counts the live chunks of every segment; the counts are index writes
//! like any other, so they agree with the chunk keys after any crash. A segment that
//! is not the active one and has no live chunk is *retired*, and deleted once a
//! durable checkpoint lies past both its own records and the round that retired it
//! (then no replay needs it). A segment only goes when all its chunks go, so one old
//! unacked message keeps its whole segment on disk.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use super::disk::{self, Disk, DiskFile};
use super::records::{
    END_LEN, HEADER, KIND_BATCH, KIND_CHUNK, KIND_END, Location, Position, encode_record,
    record_crc,
};
use super::spares::Spares;

const EXTENSION: &str = "seg";

/// A chunk that could not be read back.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    #[error("reading segment {segment}: {source}")]
    Io { segment: u64, source: io::Error },
    #[error("chunk at {offset} of segment {segment} fails its checksum")]
    Checksum { segment: u64, offset: u64 },
}

/// The open segment files, shared by the writer (which adds and retires them) and
/// every reader.
pub(crate) struct Files {
    disk: Arc<dyn Disk>,
    dir: PathBuf,
    open: RwLock<HashMap<u64, Arc<dyn DiskFile>>>,
    spares: Spares,
    /// The first failed sync of a segment or the directory, held while every sync
    /// runs; see [`Files::sync_file`].
    sync_failure: Mutex<Option<(io::ErrorKind, String)>>,
}

impl Files {
    pub fn path(&self, segment: u64) -> PathBuf {
        segment_path(&self.dir, segment)
    }

    fn get(&self, segment: u64) -> Option<Arc<dyn DiskFile>> {
        self.open
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&segment)
            .cloned()
    }

    /// The chunk at `loc`; `Ok(None)` when its segment is gone, which happens only
    /// once every chunk in it was removed (a reader that looked the location up
    /// before the removal may still ask).
    pub fn read(&self, loc: &Location) -> Result<Option<Vec<u8>>, ReadError> {
        let Some(file) = self.get(loc.segment) else {
            return Ok(None);
        };
        let mut buf = vec![0u8; loc.len as usize];
        file.read_at(&mut buf, loc.offset)
            .map_err(|source| ReadError::Io {
                segment: loc.segment,
                source,
            })?;
        if record_crc(loc.segment, KIND_CHUNK, &buf) != loc.crc {
            return Err(ReadError::Checksum {
                segment: loc.segment,
                offset: loc.offset,
            });
        }
        Ok(Some(buf))
    }

    /// Closes and deletes retired segments (or keeps them as spares, spares.rs);
    /// they no longer hold a live chunk.
    ///
    /// A file still held by a reader is deleted, never kept: a reader that looked
    /// the segment up before it retired (a page read that then stalled) would read
    /// whatever the reused file holds next. It fails the checksum, since that
    /// covers the segment id, but that is a failed read. An unlinked file keeps
    /// its old bytes for the descriptors still open on it, so the late read just
    /// gets a chunk that is no longer live. Once out of `open` nobody can take the
    /// file again, so the count can only fall after it is read.
    pub fn delete(&self, segments: &[u64]) {
        if segments.is_empty() {
            return;
        }
        let closed: Vec<_> = {
            // Readers share this lock: no file I/O under it.
            let mut open = self.open.write().unwrap_or_else(PoisonError::into_inner);
            segments.iter().map(|s| open.remove(s)).collect()
        };
        for (segment, file) in segments.iter().zip(closed) {
            let path = self.path(*segment);
            let in_use = file.is_some_and(|f| Arc::strong_count(&f) > 1);
            if in_use {
                tracing::debug!(segment, "segment still read: deleted, not kept as a spare");
            } else if self.spares.recycle(&path) {
                tracing::debug!(segment, "segment kept as a spare");
                continue;
            }
            match self.disk.remove(&path) {
                Ok(()) => tracing::debug!(segment, "segment deleted"),
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                // Left behind, it is deleted as an orphan at the next start.
                Err(err) => tracing::warn!(segment, error = %err, "cannot delete segment"),
            }
        }
    }

    /// `fdatasync` of segment `id`'s file. Segments are synced in two places: by
    /// the writer (a segment's end record, before it rolls) and by the syncer
    /// (every round). They share each file's descriptor, and Linux reports a lost
    /// writeback to the first sync after it only: the next sync of the file
    /// "succeeds" over data that never reached the disk. So every sync runs under
    /// one lock that also records the first failure, and once one has failed
    /// every later sync fails with it, whoever asks.
    pub fn sync_file(&self, id: u64, file: &dyn DiskFile) -> io::Result<()> {
        self.gated(|| {
            file.sync_data()
                .map_err(|e| disk::at(&self.path(id), "fdatasync of", e))
        })
    }

    /// `fsync` of the segment directory, so that new files survive a power loss.
    pub fn sync_dir(&self) -> io::Result<()> {
        self.gated(|| {
            self.disk
                .sync_dir(&self.dir)
                .map_err(|e| disk::at(&self.dir, "fsync of", e))
        })
    }

    fn gated(&self, sync: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        let mut failure = self
            .sync_failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some((kind, text)) = &*failure {
            return Err(io::Error::new(
                *kind,
                format!("an earlier sync of the queue log failed: {text}"),
            ));
        }
        let result = sync();
        if let Err(err) = &result {
            *failure = Some((err.kind(), err.to_string()));
        }
        result
    }
}

pub(crate) fn segment_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(format!("{segment:020}.{EXTENSION}"))
}

/// The ids of the segment files in `dir`, ascending.
pub(crate) fn list(disk: &dyn Disk, dir: &Path) -> io::Result<Vec<u64>> {
    let mut ids: Vec<u64> = disk
        .list(dir)?
        .iter()
        .filter_map(|name| name.strip_suffix(".seg")?.parse::<u64>().ok())
        .collect();
    ids.sort_unstable();
    Ok(ids)
}

/// What the syncer must make durable for the rounds the writer wrote.
#[derive(Default)]
pub(crate) struct Unsynced {
    /// Segments written to, each once.
    pub files: Vec<(u64, Arc<dyn DiskFile>)>,
    /// A segment was created: its directory needs an `fsync`.
    pub dir: bool,
}

impl Unsynced {
    pub fn absorb(&mut self, other: Unsynced) {
        for (id, file) in other.files {
            if !self.files.iter().any(|(i, _)| *i == id) {
                self.files.push((id, file));
            }
        }
        self.dir |= other.dir;
    }

    /// Forgets deleted segments, so their files close.
    pub fn forget(&mut self, deleted: &[u64]) {
        self.files.retain(|(id, _)| !deleted.contains(id));
    }

    /// `fdatasync` of every file, then the directory if it changed. The error names
    /// the file.
    pub fn sync(&mut self, files: &Files) -> io::Result<()> {
        for (id, file) in &self.files {
            files.sync_file(*id, &**file)?;
        }
        if self.dir {
            files.sync_dir()?;
        }
        *self = Self::default();
        Ok(())
    }
}

struct Active {
    id: u64,
    file: Arc<dyn DiskFile>,
    /// Bytes in the file.
    len: u64,
}

/// The writer's side: appends chunks and counts each segment's live ones.
pub(crate) struct Segments {
    files: Arc<Files>,
    /// Size past which the active segment is rolled.
    max_bytes: u64,
    active: Option<Active>,
    next_id: u64,
    /// Appended this round, written out by [`Segments::write_out`].
    buf: Vec<u8>,
    unsynced: Unsynced,
    live: HashMap<u64, u64>,
    retired: Vec<u64>,
}

impl Segments {
    /// Opens the segment directory. `live` holds the stored chunk count of every
    /// segment the index refers to; every other segment file is an orphan, returned
    /// for the caller to delete once its new checkpoint is durable. New segments get
    /// ids above every file present.
    pub fn open(
        disk: Arc<dyn Disk>,
        dir: &Path,
        live: HashMap<u64, u64>,
        max_bytes: u64,
    ) -> io::Result<(Self, Vec<u64>)> {
        disk.create_dir_all(dir)?;
        let mut open = HashMap::new();
        let mut orphans = Vec::new();
        let mut next_id = live.keys().max().map_or(1, |m| m + 1);
        for id in list(&*disk, dir)? {
            let path = segment_path(dir, id);
            next_id = next_id.max(id + 1);
            if live.get(&id).is_some_and(|n| *n > 0) {
                open.insert(
                    id,
                    disk.open(&path)
                        .map_err(|e| disk::at(&path, "opening", e))?,
                );
            } else {
                orphans.push(id);
            }
        }
        for id in live.keys() {
            if !open.contains_key(id) {
                tracing::error!(
                    segment = id,
                    "segment file missing: the messages stored in it are lost"
                );
            }
        }
        let spares = Spares::new(disk.clone(), dir, max_bytes)?;
        let segments = Self {
            files: Arc::new(Files {
                disk,
                dir: dir.to_owned(),
                open: RwLock::new(open),
                spares,
                sync_failure: Mutex::new(None),
            }),
            max_bytes,
            active: None,
            next_id,
            buf: Vec::new(),
            unsynced: Unsynced::default(),
            live,
            retired: Vec::new(),
        };
        Ok((segments, orphans))
    }

    /// The shared read side.
    pub fn files(&self) -> Arc<Files> {
        self.files.clone()
    }

    /// Queues a chunk record for the active segment (rolling it first if it is full)
    /// and counts it live. Nothing is in the file before [`Segments::write_out`].
    pub fn append_chunk(&mut self, chunk: &[u8]) -> io::Result<Location> {
        let loc = self.append(KIND_CHUNK, chunk)?;
        *self.live.entry(loc.segment).or_insert(0) += 1;
        Ok(loc)
    }

    /// Queues a batch record: index writes to replay after a crash.
    pub fn append_batch(&mut self, batch: &[u8]) -> io::Result<()> {
        self.append(KIND_BATCH, batch).map(|_| ())
    }

    fn append(&mut self, kind: u8, payload: &[u8]) -> io::Result<Location> {
        let record = (HEADER + payload.len()) as u64;
        let used = self.active.as_ref().map(|a| a.len + self.buf.len() as u64);
        // A record larger than a whole segment gets a segment of its own.
        let (segment, used) = match (used, self.active.as_ref()) {
            (Some(used), Some(a)) if used == 0 || used + record + END_LEN <= self.max_bytes => {
                (a.id, used)
            }
            _ => (self.roll()?.id, 0),
        };
        if used + record > self.max_bytes / 2 {
            self.files.spares.start();
        }
        let offset = used + HEADER as u64;
        let (len, crc) = encode_record(&mut self.buf, segment, kind, payload)?;
        Ok(Location {
            segment,
            offset,
            len,
            crc,
        })
    }

    /// The log position after everything appended so far.
    pub fn end(&self) -> Position {
        match &self.active {
            Some(a) => Position {
                segment: a.id,
                offset: a.len + self.buf.len() as u64,
            },
            None => Position {
                segment: self.next_id,
                offset: 0,
            },
        }
    }

    /// Writes what this round appended to the file (one `pwrite`). After an error the
    /// store stops (fail-stop): what part of the write reached the file is unknown.
    pub fn write_out(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        let result = active.file.write_at(&self.buf, active.len);
        let written = self.buf.len() as u64;
        self.buf.clear();
        if let Err(err) = result {
            return Err(disk::at(&self.files.path(active.id), "writing", err));
        }
        active.len += written;
        if !self.unsynced.files.iter().any(|(id, _)| *id == active.id) {
            self.unsynced.files.push((active.id, active.file.clone()));
        }
        Ok(())
    }

    /// Closes the active segment and starts the next one.
    fn roll(&mut self) -> io::Result<&Active> {
        if let Some(active) = &self.active {
            let crc = record_crc(active.id, KIND_END, &[]);
            self.buf.push(KIND_END);
            self.buf.extend_from_slice(&0u32.to_be_bytes());
            self.buf.extend_from_slice(&crc.to_be_bytes());
        }
        self.write_out()?;
        if let Some(old) = self.active.take() {
            // Its end record is durable before the next segment exists: a segment
            // other than the newest always ends in one (see the module docs).
            self.files.sync_file(old.id, &*old.file)?;
            if self.live.get(&old.id).is_none_or(|n| *n == 0) {
                self.live.remove(&old.id);
                self.retired.push(old.id);
            }
        }
        let id = self.next_id;
        let path = self.files.path(id);
        let disk = self.files.disk.clone();
        let reused = self.files.spares.take().and_then(|spare| {
            let opened = disk.rename(&spare, &path).and_then(|()| disk.open(&path));
            opened
                .inspect_err(|err| tracing::warn!(error = %err, "cannot use a spare segment"))
                .ok()
        });
        let file = match reused {
            Some(file) => file,
            None => disk
                .create_new(&path)
                .map_err(|e| disk::at(&path, "creating", e))?,
        };
        self.next_id += 1;
        self.files
            .open
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, file.clone());
        self.unsynced.dir = true;
        Ok(self.active.insert(Active { id, file, len: 0 }))
    }
    /// One chunk of `segment` is gone; returns the segment's remaining live count.
    pub fn release(&mut self, segment: u64) -> u64 {
        let Some(n) = self.live.get_mut(&segment) else {
            return 0;
        };
        *n = n.saturating_sub(1);
        let n = *n;
        if n == 0 && self.active.as_ref().is_none_or(|a| a.id != segment) {
            self.live.remove(&segment);
            self.retired.push(segment);
        }
        n
    }

    /// Replaces the live chunk counts (after a repair recounted them).
    pub fn set_live(&mut self, live: HashMap<u64, u64>) {
        self.live = live;
    }

    /// The live chunk count of `segment`.
    pub fn live(&self, segment: u64) -> u64 {
        self.live.get(&segment).copied().unwrap_or(0)
    }

    /// The files to sync for the rounds since the last call.
    pub fn take_unsynced(&mut self) -> Unsynced {
        std::mem::take(&mut self.unsynced)
    }

    /// Segments retired since the last call: to delete once this round is durable.
    pub fn take_retired(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.retired)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::disk::RealDisk;

    const MAX: u64 = 1 << 20;

    fn open(dir: &Path, live: HashMap<u64, u64>) -> (Segments, Vec<u64>) {
        Segments::open(Arc::new(RealDisk), dir, live, MAX).unwrap()
    }

    #[test]
    fn append_write_read_release_retire() {
        let dir = tempfile::tempdir().unwrap();
        let (mut segs, _) = open(dir.path(), HashMap::new());
        let a = segs.append_chunk(b"first chunk").unwrap();
        let b = segs.append_chunk(b"second").unwrap();
        assert_eq!((a.segment, b.segment), (1, 1));
        assert_eq!(
            b.offset,
            a.offset + 11 + HEADER as u64,
            "each record has a header"
        );
        segs.write_out().unwrap();
        let files = segs.files();
        assert_eq!(files.read(&a).unwrap().unwrap(), b"first chunk");
        assert_eq!(files.read(&b).unwrap().unwrap(), b"second");
        let unsynced = segs.take_unsynced();
        assert_eq!((unsynced.files.len(), unsynced.dir), (1, true));
        // A corrupted location fails its checksum instead of returning garbage.
        let bad = Location {
            crc: a.crc ^ 1,
            ..a
        };
        assert!(matches!(files.read(&bad), Err(ReadError::Checksum { .. })));
        // The active segment is never retired, even when empty.
        assert_eq!(segs.release(1), 1);
        assert_eq!(segs.release(1), 0);
        assert!(segs.take_retired().is_empty());
    }

    #[test]
    fn a_full_segment_rolls_and_is_retired_when_its_chunks_go() {
        let dir = tempfile::tempdir().unwrap();
        let (mut segs, _) = open(dir.path(), HashMap::new());
        let big = vec![7u8; usize::try_from(MAX / 2 + 1).unwrap()];
        let a = segs.append_chunk(&big).unwrap();
        let b = segs.append_chunk(&big).unwrap();
        assert_eq!((a.segment, b.segment), (1, 2), "the second does not fit");
        segs.write_out().unwrap();
        let files = segs.files();
        assert_eq!(files.read(&a).unwrap().unwrap().len(), big.len());
        assert_eq!(segs.release(1), 0);
        assert_eq!(segs.take_retired(), vec![1]);
        files.delete(&[1]);
        assert!(
            files.read(&a).unwrap().is_none(),
            "a deleted segment reads as gone"
        );
        assert!(!segment_path(dir.path(), 1).exists());
        assert_eq!(files.read(&b).unwrap().unwrap().len(), big.len());
    }

    /// A page read that looked a segment up before it retired, and stalled, must
    /// not read the file after it was reused as a new segment: a file still held is
    /// deleted (its descriptor keeps the old bytes), and only a free one is kept.
    #[test]
    fn a_retired_segment_still_read_is_deleted_not_kept_as_a_spare() {
        let dir = tempfile::tempdir().unwrap();
        let (mut segs, _) = open(dir.path(), HashMap::new());
        let big = vec![7u8; usize::try_from(MAX / 2 + 1).unwrap()];
        let a = segs.append_chunk(&big).unwrap();
        let b = segs.append_chunk(&big).unwrap();
        let _ = segs.append_chunk(&big).unwrap();
        assert_eq!((a.segment, b.segment), (1, 2));
        segs.write_out().unwrap();
        // As the syncer does after a sync: its handles close.
        drop(segs.take_unsynced());
        let files = segs.files();
        // Whether any file in the directory is (still) this inode: a file kept
        // as a spare is renamed, not copied.
        use std::os::unix::fs::MetadataExt;
        let inode = |segment| {
            std::fs::metadata(segment_path(dir.path(), segment))
                .unwrap()
                .ino()
        };
        let present = |ino| {
            std::fs::read_dir(dir.path())
                .unwrap()
                .any(|e| e.unwrap().metadata().unwrap().ino() == ino)
        };
        let (ino1, ino2) = (inode(1), inode(2));
        assert_eq!((segs.release(1), segs.release(2)), (0, 0));
        assert_eq!(segs.take_retired(), vec![1, 2]);

        let held = files.get(1).expect("segment 1 is open");
        files.delete(&[1]);
        assert!(!segment_path(dir.path(), 1).exists());
        assert!(!present(ino1), "a file a reader holds is never reused");
        let mut late = vec![0u8; 16];
        held.read_at(&mut late, a.offset).unwrap();
        assert_eq!(
            late,
            vec![7u8; 16],
            "the late reader still sees the old bytes"
        );

        files.delete(&[2]);
        assert!(!segment_path(dir.path(), 2).exists());
        assert!(present(ino2), "a file nobody holds is kept as a spare");
    }

    /// The writer's sync before a roll and the syncer's sync of the same file share
    /// its descriptor; a lost writeback is reported once. The rounds the syncer is
    /// about to confirm were in the lost data, so its sync must fail too.
    #[test]
    fn a_failed_sync_of_a_segment_fails_every_later_sync() {
        let disk = crate::storage::SimDisk::new();
        let dir = Path::new("/sim/gate");
        let (mut segs, _) =
            Segments::open(Arc::new(disk.clone()), dir, HashMap::new(), MAX).unwrap();
        segs.append_chunk(b"a round the syncer is to confirm")
            .unwrap();
        segs.write_out().unwrap();
        let mut syncers_part = segs.take_unsynced();
        disk.fail_sync(0, crate::storage::SimError::Io);
        // The writer rolls: its sync of the old segment fails, and the disk drops
        // the chunk the syncer has not synced yet.
        assert!(segs.roll().is_err());
        let files = segs.files();
        let err = syncers_part
            .sync(&files)
            .expect_err("the syncer's sync after the writer's failed one");
        assert!(err.to_string().contains("an earlier sync"), "{err}");
        assert!(files.sync_dir().is_err(), "directory syncs fail too");
    }

    #[test]
    fn reopening_names_orphans_and_never_appends_to_old_segments() {
        let dir = tempfile::tempdir().unwrap();
        let (mut segs, _) = open(dir.path(), HashMap::new());
        let kept = segs.append_chunk(b"kept").unwrap();
        segs.write_out().unwrap();
        segs.roll().unwrap();
        let orphan = segs.append_chunk(b"never indexed").unwrap();
        segs.write_out().unwrap();
        drop(segs);

        let (mut segs, orphans) = open(dir.path(), HashMap::from([(kept.segment, 1)]));
        assert_eq!(orphans, vec![orphan.segment], "named, not yet deleted");
        assert_eq!(segs.files().read(&kept).unwrap().unwrap(), b"kept");
        let next = segs.append_chunk(b"new").unwrap();
        assert!(next.segment > orphan.segment, "ids are never reused");
    }
}
