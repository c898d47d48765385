//! The queue log: append-only segment files under `<data-dir>/segments/`, beside
//! sled. Every group commit appends its chunks of message bodies and then one
//! *batch* record holding every index write of the round (the keys and values store.rs
//! puts into sled); a round is durable once the segments it wrote are `fdatasync`ed.
//! sled is the index, kept in memory and flushed to disk only at checkpoints; after a
//! crash the batch records written since the last checkpoint are replayed into it.
//!
//! # Why not all in sled
//!
//! sled 0.34 is log-structured: an insert appends the value to its log, and every
//! few updates it rewrites the whole tree node the value sits in, values included.
//! With 8 KiB chunk values a leaf carries 16–26 of them, so each payload byte was
//! written about seven times (measured with `strace` on the queue benchmark: 368 MB
//! of `pwrite` for 51 MB of payload), and sled's I/O threads spent more CPU than the
//! rest of the broker. Making sled durable is also slow: `Db::flush` plus an
//! `fdatasync` of its file took about 1.3 ms a round here, against about 0.6 ms for
//! one `fdatasync` of a segment. So a body is written once, by one `pwrite` per round,
//! sled's values shrink to a [`Location`] and a removal bitmap, and a round waits for
//! one sync of the log instead of a flush of the index.
//!
//! # Records
//!
//! `kind:u8 len:u32 crc:u32` then `len` bytes; the CRC-32 covers the segment's id, the
//! kind and the payload, so a record copied from another segment never verifies.
//! Kinds: `1` a chunk (its [`Location`] points at the payload), `2` a batch, `3` the
//! end of a segment (empty): the log goes on in the next one. A record never spans
//! two segments. New segments are preallocated files (spares.rs), so a segment's
//! length says nothing: its records end at an end record or at the first bytes that
//! are no valid record (zeros, or a reused file's old records).
//!
//! # Lifecycle
//!
//! The writer appends and writes a round's records *before* it applies the round to
//! sled, so no reader ever finds a location whose bytes are not in the file and sled
//! never runs ahead of the log. The sync thread `fdatasync`s every segment written
//! since its last sync (and the directory when a segment was created) before any
//! confirm of the round goes out. About once a second it checkpoints: flushes and
//! syncs sled, then records the log [`Position`] sled is known to hold.
//!
//! A segment is closed with an end record and the next one started when a record
//! would take it past `EngineConfig::segment_bytes`. The writer counts the
//! live chunks of every segment; the counts are index writes like any other, so they
//! agree with the chunk keys after any crash. A segment that is not the active one
//! and has no live chunk is *retired*, and deleted once a durable checkpoint lies
//! past both its own records and the round that retired it (then no replay needs it).
//! A segment only goes when all its chunks go, so one old unacked message keeps its
//! whole segment on disk.
//!
//! # Recovery
//!
//! [`replay`] reads the log from the last durable checkpoint and hands every batch to
//! store.rs to apply again; applying a suffix of the rounds in order to an index that
//! already holds some of them gives the same index, since each is a list of puts and
//! removes. The log ends at the first place, in a segment without an end record,
//! that holds no valid record: where the writes stopped, or a write the crash cut
//! off, never a confirmed one, since a confirm waits for the sync of every record
//! before it. Any later segment can only hold records written past such a tear and
//! is deleted. Then [`seal`] writes an end record there, so that a later replay from
//! an earlier checkpoint reads on into the segments of the next run. After a restart
//! nothing is appended to an old segment.
//!
//! sled may write its index to disk at any time, and a checkpoint flushes rounds the
//! writer applied after the last sync. So after a power loss (not after `kill -9`:
//! the operating system still holds every write) the index can point at a chunk of a
//! round that was never confirmed and whose bytes never reached the disk; its checksum
//! fails on read and it is skipped with an error, never misread.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use crate::queue::spares::Spares;

const EXTENSION: &str = "seg";
const HEADER: usize = 9;
const KIND_CHUNK: u8 = 1;
const KIND_BATCH: u8 = 2;
/// Written when a segment is closed: the log goes on in the next segment.
const KIND_END: u8 = 3;
const END_LEN: u64 = HEADER as u64;

/// The record checksum: over the segment id too, so a stale record never verifies.
fn record_crc(segment: u64, kind: u8, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&segment.to_be_bytes());
    hasher.update(&[kind]);
    hasher.update(payload);
    hasher.finalize()
}

/// A place in the log: everything before it, in segment order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub(crate) struct Position {
    pub segment: u64,
    pub offset: u64,
}

impl Position {
    pub const ENCODED_LEN: usize = 16;

    pub fn encode(&self) -> [u8; Self::ENCODED_LEN] {
        let mut out = [0u8; Self::ENCODED_LEN];
        out[..8].copy_from_slice(&self.segment.to_be_bytes());
        out[8..].copy_from_slice(&self.offset.to_be_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let b = bytes.get(..Self::ENCODED_LEN)?;
        Some(Self {
            segment: u64::from_be_bytes(b[..8].try_into().ok()?),
            offset: u64::from_be_bytes(b[8..].try_into().ok()?),
        })
    }
}

/// Where one chunk's bytes are: the payload of a chunk record.
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
    spares: Spares,
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
        if record_crc(loc.segment, KIND_CHUNK, &buf) != loc.crc {
            return Err(ReadError::Checksum {
                segment: loc.segment,
                offset: loc.offset,
            });
        }
        Ok(Some(buf))
    }

    /// Closes and deletes retired segments (or keeps one as a spare); they no longer
    /// hold a live chunk.
    pub fn delete(&self, segments: &[u64]) {
        if segments.is_empty() {
            return;
        }
        {
            // Readers share this lock: no file I/O under it.
            let mut open = self.open.write().unwrap_or_else(PoisonError::into_inner);
            for segment in segments {
                open.remove(segment);
            }
        }
        for segment in segments {
            let path = self.path(*segment);
            if self.spares.recycle(&path) {
                tracing::debug!(segment, "segment kept as a spare");
                continue;
            }
            match std::fs::remove_file(&path) {
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

/// The ids of the segment files in `dir`, ascending.
fn list(dir: &Path) -> io::Result<Vec<u64>> {
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if let Some(id) = path
            .extension()
            .filter(|e| *e == EXTENSION)
            .and_then(|_| path.file_stem()?.to_str()?.parse::<u64>().ok())
        {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

/// What [`replay`] did.
#[derive(Debug, Default)]
pub(crate) struct Replayed {
    /// Batch records handed over.
    pub batches: u64,
    /// Where the log ends: the first place, in a segment not closed, that holds no
    /// valid record. `None` if no segment at or after the start was left open.
    pub end: Option<Position>,
    /// Segments found after the end and deleted: written past a tear.
    pub discarded: usize,
}

/// Reads the log from `from` on, in order, and hands every batch record to `apply`
/// (see the module docs). An error from `apply` stops the replay and is returned.
/// The caller then closes the log at [`Replayed::end`] with [`seal`].
pub(crate) fn replay(
    dir: &Path,
    from: Position,
    mut apply: impl FnMut(&[u8]) -> Result<(), String>,
) -> io::Result<Replayed> {
    std::fs::create_dir_all(dir)?;
    let ids: Vec<u64> = list(dir)?
        .into_iter()
        .filter(|id| *id >= from.segment)
        .collect();
    let mut out = Replayed::default();
    'segments: for (i, &id) in ids.iter().enumerate() {
        let mut file = File::open(segment_path(dir, id))?;
        let len = file.metadata()?.len();
        let mut at = if id == from.segment {
            from.offset.min(len)
        } else {
            0
        };
        io::Seek::seek(&mut file, io::SeekFrom::Start(at))?;
        let mut reader = io::BufReader::with_capacity(1 << 20, file);
        loop {
            match read_record(&mut reader, id, len - at)? {
                // Closed: the log goes on in the next segment.
                Some((KIND_END, _)) => continue 'segments,
                Some((kind, payload)) => {
                    if kind == KIND_BATCH {
                        apply(&payload).map_err(|e| {
                            io::Error::new(
                                io::ErrorKind::InvalidData,
                                format!("replaying the batch at {at} of segment {id}: {e}"),
                            )
                        })?;
                        out.batches += 1;
                    }
                    at += (HEADER + payload.len()) as u64;
                }
                None => {
                    let end = Position {
                        segment: id,
                        offset: at,
                    };
                    let later = &ids[i + 1..];
                    discard(dir, end, later)?;
                    out.end = Some(end);
                    out.discarded = later.len();
                    return Ok(out);
                }
            }
        }
    }
    Ok(out)
}

/// The next record, or `None` if the `left` bytes up to the end of the file do not
/// hold a whole valid one.
fn read_record(
    reader: &mut impl io::Read,
    segment: u64,
    left: u64,
) -> io::Result<Option<(u8, Vec<u8>)>> {
    if left < HEADER as u64 {
        return Ok(None);
    }
    let mut header = [0u8; HEADER];
    reader.read_exact(&mut header)?;
    let kind = header[0];
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    let crc = u32::from_be_bytes([header[5], header[6], header[7], header[8]]);
    if !matches!(kind, KIND_CHUNK | KIND_BATCH | KIND_END) || u64::from(len) > left - HEADER as u64
    {
        return Ok(None);
    }
    let mut payload = vec![0u8; len as usize];
    reader.read_exact(&mut payload)?;
    if record_crc(segment, kind, &payload) != crc {
        return Ok(None);
    }
    Ok(Some((kind, payload)))
}

/// Deletes the segments found after the end of the log: only a crash between the
/// writes of a round that never became durable can leave them.
fn discard(dir: &Path, end: Position, later: &[u64]) -> io::Result<()> {
    if later.is_empty() {
        return Ok(());
    }
    tracing::warn!(
        segment = end.segment,
        offset = end.offset,
        later = later.len(),
        "the queue log ends in a torn write (a crash cut it off); discarding what follows"
    );
    for id in later {
        std::fs::remove_file(segment_path(dir, *id))?;
    }
    File::open(dir)?.sync_all()
}

/// Closes the log at `end` (from [`replay`]): an end record there, durable, so that
/// a later replay from an earlier checkpoint goes on into the segments written
/// after this restart instead of stopping at this one's last write.
pub(crate) fn seal(dir: &Path, end: Position) -> io::Result<()> {
    let file = File::options()
        .write(true)
        .open(segment_path(dir, end.segment))?;
    let mut record = [0u8; HEADER];
    record[0] = KIND_END;
    record[5..].copy_from_slice(&record_crc(end.segment, KIND_END, &[]).to_be_bytes());
    file.write_all_at(&record, end.offset)?;
    // A spare's zeros or a torn write's remains beyond it are of no use.
    file.set_len(end.offset + END_LEN)?;
    file.sync_all()
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
    /// Size past which the active segment is rolled.
    max_bytes: u64,
    active: Option<Active>,
    next_id: u64,
    /// Appended this round, written out by [`Segments::write_out`].
    buf: Vec<u8>,
    unsynced: Unsynced,
    live: HashMap<u64, u64>,
    retired: Vec<u64>,
    /// A failed write could not be cut off: close the segment before appending more.
    must_roll: bool,
}

impl Segments {
    /// Opens the segment directory. `live` holds the stored chunk count of every
    /// segment sled refers to; any other segment file is an orphan and is deleted.
    pub fn open(dir: &Path, live: HashMap<u64, u64>, max_bytes: u64) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut open = HashMap::new();
        let mut next_id = live.keys().max().map_or(1, |m| m + 1);
        for id in list(dir)? {
            let path = segment_path(dir, id);
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
                spares: Spares::new(dir, max_bytes)?,
            }),
            max_bytes,
            active: None,
            next_id,
            buf: Vec::new(),
            unsynced: Unsynced::default(),
            live,
            retired: Vec::new(),
            must_roll: false,
        })
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
        let len = u32::try_from(payload.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "record over 4 GiB"))?;
        let record = (HEADER + payload.len()) as u64;
        let used = self.active.as_ref().map(|a| a.len + self.buf.len() as u64);
        // A record larger than a whole segment gets a segment of its own.
        let (segment, used) = match (used, self.active.as_ref()) {
            (Some(used), Some(a))
                if !self.must_roll && (used == 0 || used + record + END_LEN <= self.max_bytes) =>
            {
                (a.id, used)
            }
            _ => (self.roll()?.id, 0),
        };
        if used + record > self.max_bytes / 2 {
            self.files.spares.start();
        }
        let offset = used + HEADER as u64;
        let crc = record_crc(segment, kind, payload);
        self.buf.push(kind);
        self.buf.extend_from_slice(&len.to_be_bytes());
        self.buf.extend_from_slice(&crc.to_be_bytes());
        self.buf.extend_from_slice(payload);
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
        } else if let Err(err) = active.file.set_len(active.len) {
            // Whatever part of the write reached the file stays there, and a later
            // shorter write could leave some of it looking like records that follow:
            // the next append closes the segment with an end record right here.
            tracing::error!(segment = active.id, error = %err, "cannot truncate a failed write");
            self.must_roll = true;
        }
        // Otherwise the next round writes at the same offset again.
        self.buf.clear();
        result
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
        self.must_roll = false;
        if let Some(old) = self.active.take() {
            if self.live.get(&old.id).is_none_or(|n| *n == 0) {
                self.live.remove(&old.id);
                self.retired.push(old.id);
            }
        }
        let id = self.next_id;
        let path = self.files.path(id);
        let reused = self.files.spares.take().and_then(|spare| {
            let opened = std::fs::rename(&spare, &path)
                .and_then(|()| File::options().read(true).write(true).open(&path));
            opened
                .inspect_err(|err| tracing::warn!(error = %err, "cannot use a spare segment"))
                .ok()
        });
        let file = match reused {
            Some(file) => file,
            None => File::options()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)?,
        };
        let file = Arc::new(file);
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

    /// The live chunk count of `segment`.
    pub fn live(&self, segment: u64) -> u64 {
        self.live.get(&segment).copied().unwrap_or(0)
    }

    /// Replaces the live counts with stored ones, after a round failed half-way.
    /// The active segment stays: a round that failed before its write left nothing
    /// in it, and one that failed after is in the log and will be replayed.
    pub fn reset_live(&mut self, live: HashMap<u64, u64>) {
        self.live = live;
        // Retirements of the failed round are forgotten; at worst a segment waits for
        // the next start to be deleted as an orphan.
        self.retired.clear();
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

    const MAX: u64 = 1 << 20;

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
        let mut segs = Segments::open(dir.path(), HashMap::new(), MAX).unwrap();
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
        let mut segs = Segments::open(dir.path(), HashMap::new(), MAX).unwrap();
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

    #[test]
    fn reopening_deletes_orphans_and_never_appends_to_old_segments() {
        let dir = tempfile::tempdir().unwrap();
        let mut segs = Segments::open(dir.path(), HashMap::new(), MAX).unwrap();
        let kept = segs.append_chunk(b"kept").unwrap();
        segs.write_out().unwrap();
        segs.roll().unwrap();
        let orphan = segs.append_chunk(b"never indexed").unwrap();
        segs.write_out().unwrap();
        drop(segs);

        let live = HashMap::from([(kept.segment, 1)]);
        let mut segs = Segments::open(dir.path(), live, MAX).unwrap();
        assert!(!segment_path(dir.path(), orphan.segment).exists());
        assert_eq!(segs.files().read(&kept).unwrap().unwrap(), b"kept");
        let next = segs.append_chunk(b"new").unwrap();
        assert!(next.segment > orphan.segment, "ids are never reused");
    }

    /// Every batch record from `from` on, as replay hands them over.
    fn replayed(dir: &Path, from: Position) -> (Vec<Vec<u8>>, Replayed) {
        let mut batches = Vec::new();
        let out = replay(dir, from, |b| {
            batches.push(b.to_vec());
            Ok(())
        })
        .unwrap();
        (batches, out)
    }

    /// Two segments: chunk + batch "a" + batch "b" in the first, batch "c" in the
    /// second. Returns the position of "b"'s record and of the second segment.
    fn two_segments(dir: &Path) -> (Position, Position) {
        let mut segs = Segments::open(dir, HashMap::new(), MAX).unwrap();
        segs.append_chunk(b"body").unwrap();
        segs.append_batch(b"a").unwrap();
        let b = segs.end();
        segs.append_batch(b"b").unwrap();
        segs.write_out().unwrap();
        segs.roll().unwrap();
        let second = segs.end();
        segs.append_batch(b"c").unwrap();
        segs.write_out().unwrap();
        (b, second)
    }

    #[test]
    fn replay_hands_over_batches_in_order_from_a_position() {
        let dir = tempfile::tempdir().unwrap();
        let (b, second) = two_segments(dir.path());
        let (all, out) = replayed(dir.path(), Position::default());
        assert_eq!(all, vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);
        assert_eq!(out.batches, 3);
        assert_eq!(out.discarded, 0);
        assert_eq!(out.end.map(|e| e.segment), Some(second.segment));
        assert_eq!(
            replayed(dir.path(), b).0,
            vec![b"b".to_vec(), b"c".to_vec()]
        );
        assert_eq!(replayed(dir.path(), second).0, vec![b"c".to_vec()]);
        // A checkpoint in a segment that was since deleted starts at the next one.
        std::fs::remove_file(segment_path(dir.path(), 1)).unwrap();
        assert_eq!(
            replayed(dir.path(), Position::default()).0,
            vec![b"c".to_vec()]
        );
    }

    #[test]
    fn replay_ends_the_log_at_a_torn_record_and_sealing_lets_it_go_on() {
        for damage in ["end record cut short", "record flipped"] {
            let dir = tempfile::tempdir().unwrap();
            let (b, second) = two_segments(dir.path());
            let path = segment_path(dir.path(), 1);
            let len = std::fs::metadata(&path).unwrap().len();
            let file = File::options().write(true).open(&path).unwrap();
            let (expect, end) = if damage == "record flipped" {
                // Power loss left garbage where "b" was.
                file.write_all_at(b"X", b.offset + HEADER as u64).unwrap();
                (vec![b"a".to_vec()], b)
            } else {
                // The crash cut the segment's last write (its end record) short.
                file.set_len(len - 1).unwrap();
                let end = Position {
                    segment: 1,
                    offset: len - END_LEN,
                };
                (vec![b"a".to_vec(), b"b".to_vec()], end)
            };
            let (all, out) = replayed(dir.path(), Position::default());
            assert_eq!(all, expect, "{damage}: nothing past the tear");
            assert_eq!((out.end, out.discarded), (Some(end), 1), "{damage}");
            assert!(
                !segment_path(dir.path(), second.segment).exists(),
                "{damage}: a later segment cannot hold a confirmed write"
            );

            // Sealed, the log goes on into what the next run writes.
            seal(dir.path(), end).unwrap();
            let mut segs = Segments::open(dir.path(), HashMap::from([(1, 1)]), MAX).unwrap();
            segs.append_batch(b"next run").unwrap();
            segs.write_out().unwrap();
            let (again, out) = replayed(dir.path(), Position::default());
            let mut expect = expect.clone();
            expect.push(b"next run".to_vec());
            assert_eq!(again, expect, "{damage}");
            assert_eq!(out.discarded, 0, "{damage}");
        }
    }

    #[test]
    fn zeros_and_records_of_another_segment_end_the_log() {
        let dir = tempfile::tempdir().unwrap();
        two_segments(dir.path());
        // A reused file: segment 1's records under segment 3's name.
        let one = std::fs::read(segment_path(dir.path(), 1)).unwrap();
        std::fs::write(segment_path(dir.path(), 3), &one).unwrap();
        let start = Position {
            segment: 3,
            offset: 0,
        };
        let (all, out) = replayed(dir.path(), start);
        assert!(all.is_empty());
        assert_eq!(out.end, Some(start));
        // A zero-filled spare.
        std::fs::write(segment_path(dir.path(), 3), vec![0u8; 4096]).unwrap();
        let (all, out) = replayed(dir.path(), start);
        assert!(all.is_empty());
        assert_eq!(out.end, Some(start));
    }

    #[test]
    fn after_a_failed_write_the_log_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let mut segs = Segments::open(dir.path(), HashMap::new(), MAX).unwrap();
        segs.append_batch(b"kept").unwrap();
        segs.write_out().unwrap();
        // Make the next write fail (and the cut after it): a read-only handle.
        let active = segs.active.as_mut().unwrap();
        let writable = std::mem::replace(
            &mut active.file,
            Arc::new(File::open(segment_path(dir.path(), active.id)).unwrap()),
        );
        segs.append_batch(b"lost").unwrap();
        assert!(segs.write_out().is_err());
        segs.active.as_mut().unwrap().file = writable;
        segs.append_batch(b"next").unwrap();
        segs.write_out().unwrap();
        let (all, out) = replayed(dir.path(), Position::default());
        assert_eq!(all, vec![b"kept".to_vec(), b"next".to_vec()]);
        assert_eq!(out.discarded, 0);
    }
}
