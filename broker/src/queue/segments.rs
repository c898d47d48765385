//! Message bodies: append-only segment files under `<data-dir>/segments/`, beside
//! sled. sled keeps everything a queue needs to find, order and retire its messages
//! (see store.rs); the bodies of ready messages are written here, once, as whole
//! chunks.
//!
//! # Why not in sled
//!
//! sled 0.34 is log-structured: an insert appends the value to its log, and every
//! few updates it rewrites the whole tree node the value sits in, values included.
//! With 8 KiB chunk values a leaf carries 16–26 of them, so each payload byte was
//! written about seven times (measured with `strace` on the queue benchmark: 368 MB
//! of `pwrite` for 51 MB of payload), and sled's I/O threads spent more CPU than the
//! rest of the broker. Here a body is written once, by one `pwrite` per group commit,
//! and sled's values shrink to a [`Location`] and a removal bitmap.
//!
//! # Lifecycle
//!
//! The writer thread appends a round's chunks to the active segment and writes them
//! out *before* it applies the sled batch that points at them, so no reader ever
//! finds a location whose bytes are not in the file. The sync thread then
//! `fdatasync`s every segment written since its last sync (and the directory when a
//! segment was created) before it flushes sled, and only then are confirms sent.
//!
//! A segment is rolled when it passes [`SEGMENT_MAX`] bytes. The writer counts the
//! live chunks of every segment; the counts are stored in sled in the same batch as
//! the chunk keys, so after any crash they agree with them. A segment that is not
//! the active one and has no live chunk is *retired*: it is deleted once the batch
//! that removed its last chunk is durable. A segment only goes when all its chunks
//! go, so one old unacked message keeps its whole segment on disk.
//!
//! After a restart nothing is appended to an old segment (its tail may be torn);
//! segment files that no stored count refers to were written by a round whose sled
//! batch never became durable, and are deleted. Every chunk carries a CRC-32, checked
//! on read: after a power loss sled's index may outlive a body that was never
//! confirmed, and that chunk is skipped with an error rather than misread.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

/// Size at which the active segment is closed and a new one started. Small enough
/// that a segment pinned by one slow message wastes little, large enough that
/// creating files (and syncing their directory) is rare.
pub(crate) const SEGMENT_MAX: u64 = 32 << 20;

const EXTENSION: &str = "seg";

/// Where one chunk's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Location {
    pub segment: u64,
    pub offset: u64,
    pub len: u32,
    pub crc: u32,
}

impl Location {
    /// Bytes of [`Location::encode`].
    pub const ENCODED_LEN: usize = 24;

    pub fn encode(&self) -> [u8; Self::ENCODED_LEN] {
        let mut out = [0u8; Self::ENCODED_LEN];
        out[..8].copy_from_slice(&self.segment.to_be_bytes());
        out[8..16].copy_from_slice(&self.offset.to_be_bytes());
        out[16..20].copy_from_slice(&self.len.to_be_bytes());
        out[20..24].copy_from_slice(&self.crc.to_be_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let b = bytes.get(..Self::ENCODED_LEN)?;
        Some(Self {
            segment: u64::from_be_bytes(b[..8].try_into().ok()?),
            offset: u64::from_be_bytes(b[8..16].try_into().ok()?),
            len: u32::from_be_bytes(b[16..20].try_into().ok()?),
            crc: u32::from_be_bytes(b[20..24].try_into().ok()?),
        })
    }
}

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
    dir: PathBuf,
    open: RwLock<HashMap<u64, Arc<File>>>,
}

impl Files {
    fn path(&self, segment: u64) -> PathBuf {
        segment_path(&self.dir, segment)
    }

    fn get(&self, segment: u64) -> Option<Arc<File>> {
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
        file.read_exact_at(&mut buf, loc.offset)
            .map_err(|source| ReadError::Io {
                segment: loc.segment,
                source,
            })?;
        if crc32fast::hash(&buf) != loc.crc {
            return Err(ReadError::Checksum {
                segment: loc.segment,
                offset: loc.offset,
            });
        }
        Ok(Some(buf))
    }

    /// Closes and deletes retired segments; they no longer hold a live chunk.
    pub fn delete(&self, segments: &[u64]) {
        if segments.is_empty() {
            return;
        }
        let mut open = self.open.write().unwrap_or_else(PoisonError::into_inner);
        for segment in segments {
            open.remove(segment);
            match std::fs::remove_file(self.path(*segment)) {
                Ok(()) => tracing::debug!(segment, "segment deleted"),
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                // Left behind, it is deleted as an orphan at the next start.
                Err(err) => tracing::warn!(segment, error = %err, "cannot delete segment"),
            }
        }
    }

    /// `fsync` of the segment directory, so that new files survive a power loss.
    pub fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }
}

fn segment_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(format!("{segment:020}.{EXTENSION}"))
}

/// What the sync thread must make durable for the rounds handed to it.
#[derive(Default)]
pub(crate) struct Unsynced {
    /// Segments written to, each once.
    pub files: Vec<(u64, Arc<File>)>,
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

    /// `fdatasync` of every file, then the directory if it changed.
    pub fn sync(&mut self, files: &Files) -> io::Result<()> {
        for (_, file) in &self.files {
            file.sync_data()?;
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
    file: Arc<File>,
    /// Bytes in the file.
    len: u64,
}

/// The writer's side: appends chunks and counts each segment's live ones.
pub(crate) struct Segments {
    files: Arc<Files>,
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
    /// segment sled refers to; any other segment file is an orphan and is deleted.
    pub fn open(dir: &Path, live: HashMap<u64, u64>) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut open = HashMap::new();
        let mut next_id = live.keys().max().map_or(1, |m| m + 1);
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let path = entry.path();
            let Some(id) = path
                .extension()
                .filter(|e| *e == EXTENSION)
                .and_then(|_| path.file_stem()?.to_str()?.parse::<u64>().ok())
            else {
                continue;
            };
            next_id = next_id.max(id + 1);
            if live.get(&id).is_some_and(|n| *n > 0) {
                open.insert(id, Arc::new(File::open(&path)?));
            } else {
                tracing::info!(segment = id, "deleting a segment no stored chunk refers to");
                std::fs::remove_file(&path)?;
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
        Ok(Self {
            files: Arc::new(Files {
                dir: dir.to_owned(),
                open: RwLock::new(open),
            }),
            active: None,
            next_id,
            buf: Vec::new(),
            unsynced: Unsynced::default(),
            live,
            retired: Vec::new(),
        })
    }

    /// The shared read side.
    pub fn files(&self) -> Arc<Files> {
        self.files.clone()
    }

    /// Queues `chunk` for the active segment (rolling it first if it is full) and
    /// counts it live. Nothing is in the file before [`Segments::write_out`].
    pub fn append(&mut self, chunk: &[u8]) -> io::Result<Location> {
        let len = u32::try_from(chunk.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "chunk over 4 GiB"))?;
        let full = self.active.as_ref().is_none_or(|a| {
            let used = a.len + self.buf.len() as u64;
            used > 0 && used + u64::from(len) > SEGMENT_MAX
        });
        if full {
            self.roll()?;
        }
        let active = self.active.as_ref().expect("roll leaves an active segment");
        let loc = Location {
            segment: active.id,
            offset: active.len + self.buf.len() as u64,
            len,
            crc: crc32fast::hash(chunk),
        };
        self.buf.extend_from_slice(chunk);
        *self.live.entry(loc.segment).or_insert(0) += 1;
        Ok(loc)
    }

    /// Writes what this round appended to the file (one `pwrite`).
    pub fn write_out(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        let result = active.file.write_all_at(&self.buf, active.len);
        if result.is_ok() {
            active.len += self.buf.len() as u64;
            if !self.unsynced.files.iter().any(|(id, _)| *id == active.id) {
                self.unsynced.files.push((active.id, active.file.clone()));
            }
        } else {
            // Whatever part reached the file is garbage no location points to; later
            // rounds start a new segment rather than write after it.
            self.active = None;
        }
        self.buf.clear();
        result
    }

    fn roll(&mut self) -> io::Result<()> {
        self.write_out()?;
        if let Some(old) = self.active.take() {
            if self.live.get(&old.id).is_none_or(|n| *n == 0) {
                self.live.remove(&old.id);
                self.retired.push(old.id);
            }
        }
        let id = self.next_id;
        let path = self.files.path(id);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        let file = Arc::new(file);
        self.next_id += 1;
        self.files
            .open
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, file.clone());
        self.unsynced.dir = true;
        self.active = Some(Active { id, file, len: 0 });
        Ok(())
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

    /// The live chunk count of `segment`.
    pub fn live(&self, segment: u64) -> u64 {
        self.live.get(&segment).copied().unwrap_or(0)
    }

    /// Replaces the live counts with stored ones, after a round failed half-way.
    pub fn reset_live(&mut self, live: HashMap<u64, u64>) {
        self.live = live;
        self.retired.clear();
        // The active segment may hold chunks of the failed round: start afresh.
        self.active = None;
        self.buf.clear();
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

    #[test]
    fn location_round_trips() {
        let loc = Location {
            segment: 7,
            offset: 1 << 40,
            len: 8192,
            crc: 0xdead_beef,
        };
        assert_eq!(Location::decode(&loc.encode()), Some(loc));
        assert_eq!(Location::decode(&loc.encode()[..23]), None);
    }

    #[test]
    fn append_write_read_release_retire() {
        let dir = tempfile::tempdir().unwrap();
        let mut segs = Segments::open(dir.path(), HashMap::new()).unwrap();
        let a = segs.append(b"first chunk").unwrap();
        let b = segs.append(b"second").unwrap();
        assert_eq!((a.segment, b.segment), (1, 1));
        assert_eq!(b.offset, a.offset + 11);
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
        let mut segs = Segments::open(dir.path(), HashMap::new()).unwrap();
        let big = vec![7u8; usize::try_from(SEGMENT_MAX / 2 + 1).unwrap()];
        let a = segs.append(&big).unwrap();
        let b = segs.append(&big).unwrap();
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

    #[test]
    fn reopening_deletes_orphans_and_never_appends_to_old_segments() {
        let dir = tempfile::tempdir().unwrap();
        let mut segs = Segments::open(dir.path(), HashMap::new()).unwrap();
        let kept = segs.append(b"kept").unwrap();
        segs.write_out().unwrap();
        segs.roll().unwrap();
        let orphan = segs.append(b"never indexed").unwrap();
        segs.write_out().unwrap();
        drop(segs);

        let live = HashMap::from([(kept.segment, 1)]);
        let mut segs = Segments::open(dir.path(), live).unwrap();
        assert!(!segment_path(dir.path(), orphan.segment).exists());
        assert_eq!(segs.files().read(&kept).unwrap().unwrap(), b"kept");
        let next = segs.append(b"new").unwrap();
        assert!(next.segment > orphan.segment, "ids are never reused");
    }
}
