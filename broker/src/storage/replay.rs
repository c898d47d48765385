//! Recovery: reading the queue log back at start, telling a torn tail from damage,
//! and the repair that cuts the log at damage.
//!
//! [`replay`] reads every segment the store may still need: each one at or after the
//! last durable checkpoint, whose batch records it hands to the caller to apply to
//! the index again, and each older one that still holds live chunks, which it only
//! verifies. Applying a suffix of the rounds in order to an index that already holds
//! some of them gives the same index, since each is a list of puts and removes; and
//! since the index only ever receives rounds whose records were durable first
//! (syncer.rs), every state the index can be found in is such a prefix.
//!
//! # Torn tail or damage
//!
//! Every segment but the newest ends in an end record that was made durable before
//! the next segment was created (segments.rs). So:
//!
//! - in the newest segment, the first place that holds no valid record is where the
//!   writes stopped, or a write the crash tore: the end of the log. No confirm was
//!   answered for it, since a confirm waits for the sync of every record before it.
//!   The one exception: if that place has a plausible header whose payload fails its
//!   checksum and a valid record follows it, the bytes changed after they were
//!   written — damage;
//! - anywhere else, a record that fails is damage.
//!
//! Damage stops the start with [`Damage`], naming the file and offset. Nothing is
//! deleted. The repair mode (`tidings-broker --repair`) calls [`cut`]: the segment is
//! closed with an end record at the damage, and what followed in it is dropped;
//! later segments are kept. The store then removes the index entries that pointed
//! into the cut range and recounts every queue (store.rs `repair_index`).

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};

use super::disk::{self, Disk};
use super::records::{
    END_LEN, HEADER, KIND_BATCH, KIND_END, Position, parse_header, plausible, record_crc,
};
use super::segments::{list, segment_path};

/// A record that fails its checksum where no crash can have torn it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// The segment file.
    pub path: PathBuf,
    /// Its id.
    pub segment: u64,
    /// Where the bad record starts.
    pub offset: u64,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the queue log is damaged: {} holds a record at offset {} that fails its \
             checksum, and it is not the torn end of the log; nothing was changed. Restore \
             the data dir from a backup, or start once with --repair to cut the log at the \
             damage (the messages stored after it in that file are dropped and counted)",
            self.path.display(),
            self.offset
        )
    }
}

/// Why a replay stopped.
#[derive(Debug)]
pub(crate) enum ReplayError {
    Io(io::Error),
    Damage(Damage),
    /// Applying a batch failed.
    Apply(String),
}

/// What [`replay`] did.
#[derive(Debug, Default)]
pub(crate) struct Replayed {
    /// Batch records handed over.
    pub batches: u64,
    /// Where the log ends, in the newest segment; `None` with no segment at all.
    pub end: Option<Position>,
}

/// What one segment holds, as far as it verifies.
enum Walk {
    /// Closed by an end record.
    Closed,
    /// Ends at `at` without an end record.
    Open { at: u64, damage: bool },
}

/// Called with each verified record: kind, payload, offset.
type RecordFn<'a> = dyn FnMut(u8, &[u8], u64) -> Result<(), String> + 'a;

/// Reads the segment at `path` record by record; hands each verified record at or
/// after `from_offset` to `each` (kind, payload, offset).
/// `bytes` is a buffer to read the file into (reused across segments, so a start
/// over many segments does not fault in fresh pages for each).
fn walk(
    disk: &dyn Disk,
    path: &Path,
    segment: u64,
    from_offset: Option<u64>,
    bytes: &mut Vec<u8>,
    each: &mut RecordFn<'_>,
) -> Result<Walk, ReplayError> {
    let file = disk
        .open(path)
        .map_err(|e| ReplayError::Io(disk::at(path, "opening", e)))?;
    let len = file
        .len()
        .map_err(|e| ReplayError::Io(disk::at(path, "reading", e)))?;
    bytes.resize(usize::try_from(len).unwrap_or(usize::MAX), 0);
    let bytes = &mut bytes[..];
    file.read_at(bytes, 0)
        .map_err(|e| ReplayError::Io(disk::at(path, "reading", e)))?;
    let mut at = 0u64;
    let walked = loop {
        let verified = record_at(bytes, segment, at);
        let Some((kind, payload)) = verified else {
            let damage = looks_damaged(bytes, segment, at);
            break Walk::Open { at, damage };
        };
        if kind == KIND_END {
            at += END_LEN;
            break Walk::Closed;
        }
        if from_offset.is_some_and(|from| at >= from) {
            each(kind, payload, at).map_err(|e| {
                ReplayError::Apply(format!(
                    "replaying the record at {at} of {}: {e}",
                    path.display()
                ))
            })?;
        }
        at += (HEADER + payload.len()) as u64;
    };
    // What was replayed is written again and synced: after a failed fdatasync the
    // kernel may hold records in its cache that never reached the disk (and will
    // not retry them); a restart that read them must not build on them until they
    // are durable.
    if let Some(from) = from_offset.filter(|from| *from < at) {
        let range =
            usize::try_from(from).unwrap_or(usize::MAX)..usize::try_from(at).unwrap_or(usize::MAX);
        let io = |what, e| ReplayError::Io(disk::at(path, what, e));
        file.write_at(&bytes[range], from)
            .map_err(|e| io("rewriting", e))?;
        file.sync_data().map_err(|e| io("fdatasync of", e))?;
    }
    Ok(walked)
}

/// The verified record at `at`, if there is one.
fn record_at(bytes: &[u8], segment: u64, at: u64) -> Option<(u8, &[u8])> {
    let start = usize::try_from(at).ok()?;
    let header: &[u8; HEADER] = bytes.get(start..start + HEADER)?.try_into().ok()?;
    let (kind, len, crc) = parse_header(header);
    if !plausible(kind, len, bytes.len() as u64 - at) {
        return None;
    }
    let payload = bytes.get(start + HEADER..start + HEADER + len as usize)?;
    (record_crc(segment, kind, payload) == crc).then_some((kind, payload))
}

/// Whether the invalid place `at` has a plausible header whose successor verifies:
/// then its bytes changed after they were written, which no torn write does.
fn looks_damaged(bytes: &[u8], segment: u64, at: u64) -> bool {
    let Some(header) = usize::try_from(at)
        .ok()
        .and_then(|s| bytes.get(s..s + HEADER))
        .and_then(|h| <&[u8; HEADER]>::try_from(h).ok())
    else {
        return false;
    };
    let (kind, len, _) = parse_header(header);
    if !plausible(kind, len, bytes.len() as u64 - at) {
        return false;
    }
    record_at(bytes, segment, at + HEADER as u64 + u64::from(len)).is_some()
}

/// Most threads verifying segments at a start.
const VERIFY_THREADS: usize = 4;

/// Verifies the segments `ids` (none of them replayed) on up to
/// [`VERIFY_THREADS`] threads, each taking a run of consecutive ids with one buffer;
/// their results in `ids`' order.
fn verify_all(disk: &dyn Disk, dir: &Path, ids: &[u64]) -> Vec<Result<Walk, ReplayError>> {
    if ids.is_empty() {
        return Vec::new();
    }
    let threads = std::thread::available_parallelism()
        .map_or(1, std::num::NonZeroUsize::get)
        .clamp(1, VERIFY_THREADS);
    let verify = |run: &[u64]| {
        let mut buf = Vec::new();
        run.iter()
            .map(|&id| {
                let path = segment_path(dir, id);
                walk(disk, &path, id, None, &mut buf, &mut |_, _, _| Ok(()))
            })
            .collect::<Vec<_>>()
    };
    std::thread::scope(|scope| {
        let runs: Vec<_> = ids
            .chunks(ids.len().div_ceil(threads))
            .map(|run| (run.len(), scope.spawn(move || verify(run))))
            .collect();
        runs.into_iter()
            .flat_map(|(len, thread)| {
                thread.join().unwrap_or_else(|_| {
                    (0..len)
                        .map(|_| {
                            Err(ReplayError::Apply(
                                "a thread verifying segments panicked".into(),
                            ))
                        })
                        .collect()
                })
            })
            .collect()
    })
}

/// Reads the log (see the module docs): verifies every segment at or after `from`
/// and every one in `live`, hands each batch record at or after `from` to `apply`,
/// and finds the end of the log. Deletes nothing.
///
/// The live segments before `from` are only verified, so they are read on several
/// threads at once (a broker holding millions of messages starts in a fraction of
/// the time); what they find is judged in segment order, as if read one by one.
pub(crate) fn replay(
    disk: &dyn Disk,
    dir: &Path,
    from: Position,
    live: &HashSet<u64>,
    mut apply: impl FnMut(&[u8]) -> Result<(), String>,
) -> Result<Replayed, ReplayError> {
    disk.create_dir_all(dir).map_err(ReplayError::Io)?;
    let ids = list(disk, dir).map_err(|e| ReplayError::Io(disk::at(dir, "listing", e)))?;
    let mut out = Replayed::default();
    let newest = ids.last().copied();
    let verified_only: Vec<u64> = ids
        .iter()
        .copied()
        .filter(|id| *id < from.segment && live.contains(id))
        .collect();
    let mut verified = verify_all(disk, dir, &verified_only).into_iter();
    let mut buf = Vec::new();
    for &id in &ids {
        let replayed = id >= from.segment;
        if !replayed && !live.contains(&id) {
            continue;
        }
        let path = segment_path(dir, id);
        let walked = if replayed {
            let from_offset = if id == from.segment { from.offset } else { 0 };
            let mut batches = 0u64;
            let walked = walk(
                disk,
                &path,
                id,
                Some(from_offset),
                &mut buf,
                &mut |kind, payload, _| {
                    if kind == KIND_BATCH {
                        batches += 1;
                        apply(payload)
                    } else {
                        Ok(())
                    }
                },
            )?;
            out.batches += batches;
            walked
        } else {
            verified
                .next()
                .unwrap_or_else(|| Err(ReplayError::Apply("a segment was not verified".into())))?
        };
        match walked {
            Walk::Closed => {}
            Walk::Open { at, damage } if Some(id) == newest && !damage => {
                out.end = Some(Position {
                    segment: id,
                    offset: at,
                });
            }
            Walk::Open { at, .. } => {
                return Err(ReplayError::Damage(Damage {
                    path,
                    segment: id,
                    offset: at,
                }));
            }
        }
    }
    Ok(out)
}

/// Closes the log at `end` (from [`replay`]): an end record there, durable, so that
/// a later replay from an earlier checkpoint goes on into the segments written
/// after this restart instead of stopping at this one's last write.
pub(crate) fn seal(disk: &dyn Disk, dir: &Path, end: Position) -> io::Result<()> {
    let path = segment_path(dir, end.segment);
    let file = disk
        .open(&path)
        .map_err(|e| disk::at(&path, "opening", e))?;
    let mut record = [0u8; HEADER];
    record[0] = KIND_END;
    record[5..].copy_from_slice(&record_crc(end.segment, KIND_END, &[]).to_be_bytes());
    file.write_at(&record, end.offset)
        .map_err(|e| disk::at(&path, "writing", e))?;
    // A spare's zeros or a torn write's remains beyond it are of no use.
    file.set_len(end.offset + END_LEN)
        .map_err(|e| disk::at(&path, "truncating", e))?;
    file.sync_data()
        .map_err(|e| disk::at(&path, "fdatasync of", e))
}

/// What the repair cut dropped.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Cut {
    /// Bytes dropped from the damaged segment.
    pub bytes: u64,
    /// Records dropped: the damaged one and those that could still be read after it.
    pub records: u64,
}

/// The repair: closes the damaged segment at the damage, dropping what followed it
/// there. Later segments are kept.
pub(crate) fn cut(disk: &dyn Disk, dir: &Path, damage: &Damage) -> io::Result<Cut> {
    let path = segment_path(dir, damage.segment);
    let file = disk
        .open(&path)
        .map_err(|e| disk::at(&path, "opening", e))?;
    let len = file.len()?;
    let mut bytes = vec![0u8; usize::try_from(len).unwrap_or(usize::MAX)];
    file.read_at(&mut bytes, 0)?;
    // Count what can still be followed by its headers after the bad record.
    let mut records = 0u64;
    let mut at = damage.offset;
    while let Some(header) = usize::try_from(at)
        .ok()
        .and_then(|s| bytes.get(s..s + HEADER))
        .and_then(|h| <&[u8; HEADER]>::try_from(h).ok())
    {
        let (kind, len, _) = parse_header(header);
        if !plausible(kind, len, bytes.len() as u64 - at) || kind == KIND_END {
            break;
        }
        records += 1;
        at += HEADER as u64 + u64::from(len);
    }
    seal(
        disk,
        dir,
        Position {
            segment: damage.segment,
            offset: damage.offset,
        },
    )?;
    Ok(Cut {
        bytes: len.saturating_sub(damage.offset),
        records: records.max(1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::disk::RealDisk;
    use crate::storage::segments::Segments;
    use std::collections::HashMap;
    use std::sync::Arc;

    const MAX: u64 = 1 << 20;

    fn replayed(dir: &Path, from: Position) -> Result<(Vec<Vec<u8>>, Replayed), ReplayError> {
        let mut batches = Vec::new();
        let out = replay(&RealDisk, dir, from, &HashSet::new(), |b| {
            batches.push(b.to_vec());
            Ok(())
        })?;
        Ok((batches, out))
    }

    /// Two segments: chunk + batch "a" + batch "b" in the first (closed), batch "c"
    /// in the second. Returns the position of "b"'s record and of the second segment.
    fn two_segments(dir: &Path) -> (Position, Position) {
        let (mut segs, _) = Segments::open(Arc::new(RealDisk), dir, HashMap::new(), MAX).unwrap();
        segs.append_chunk(b"body").unwrap();
        segs.append_batch(b"a").unwrap();
        let b = segs.end();
        segs.append_batch(b"b").unwrap();
        segs.write_out().unwrap();
        // A record that does not fit rolls the segment.
        let big = vec![1u8; usize::try_from(MAX).unwrap() - 20];
        segs.append_batch(&big).unwrap();
        segs.write_out().unwrap();
        let second = Position {
            segment: 2,
            offset: 0,
        };
        (b, second)
    }

    #[test]
    fn replay_hands_over_batches_in_order_from_a_position() {
        let dir = tempfile::tempdir().unwrap();
        let (b, second) = two_segments(dir.path());
        let (all, out) = replayed(dir.path(), Position::default()).unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!((&all[0][..], &all[1][..]), (&b"a"[..], &b"b"[..]));
        assert_eq!(out.end.map(|e| e.segment), Some(second.segment));
        assert_eq!(replayed(dir.path(), b).unwrap().0.len(), 2);
        assert_eq!(replayed(dir.path(), second).unwrap().0.len(), 1);
    }

    #[test]
    fn a_torn_tail_of_the_newest_segment_ends_the_log() {
        let dir = tempfile::tempdir().unwrap();
        two_segments(dir.path());
        let path = segment_path(dir.path(), 2);
        let len = std::fs::metadata(&path).unwrap().len();
        // The crash cut the last write short.
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(len - 100).unwrap();
        let (all, out) = replayed(dir.path(), Position::default()).unwrap();
        assert_eq!(all.len(), 2, "nothing past the tear");
        assert_eq!(
            out.end,
            Some(Position {
                segment: 2,
                offset: 0
            })
        );
        // Sealed, the log goes on into what the next run writes.
        seal(&RealDisk, dir.path(), out.end.unwrap()).unwrap();
        let (mut segs, _) =
            Segments::open(Arc::new(RealDisk), dir.path(), HashMap::from([(1, 1)]), MAX).unwrap();
        segs.append_batch(b"next run").unwrap();
        segs.write_out().unwrap();
        let (again, _) = replayed(dir.path(), Position::default()).unwrap();
        assert_eq!(again.last().unwrap(), b"next run");
    }

    #[test]
    fn a_flipped_byte_in_a_closed_segment_is_damage_and_cut_repairs_it() {
        let dir = tempfile::tempdir().unwrap();
        let (b, _) = two_segments(dir.path());
        let path = segment_path(dir.path(), 1);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[usize::try_from(b.offset).unwrap() + HEADER] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let Err(ReplayError::Damage(damage)) = replayed(dir.path(), Position::default()) else {
            panic!("damage must be reported");
        };
        assert_eq!((damage.segment, damage.offset), (1, b.offset));
        assert!(damage.to_string().contains(&path.display().to_string()));
        assert!(segment_path(dir.path(), 2).exists(), "nothing deleted");
        let cut = cut(&RealDisk, dir.path(), &damage).unwrap();
        assert_eq!(cut.records, 1);
        let (all, _) = replayed(dir.path(), Position::default()).unwrap();
        assert_eq!(
            all.len(),
            2,
            "\"a\" and the later segment's record are kept"
        );
        assert_eq!(all[0], b"a");
    }

    /// The live segments before the checkpoint are verified on several threads; what
    /// they find is judged in order: the first damaged segment is the one named.
    #[test]
    fn live_segments_before_the_checkpoint_are_verified_and_the_first_damage_named() {
        let dir = tempfile::tempdir().unwrap();
        let (mut segs, _) =
            Segments::open(Arc::new(RealDisk), dir.path(), HashMap::new(), 4096).unwrap();
        let mut chunks = Vec::new();
        for i in 0..12u8 {
            chunks.push(segs.append_chunk(&[i; 3000]).unwrap());
            segs.write_out().unwrap();
        }
        let from = segs.end();
        segs.append_batch(b"after the checkpoint").unwrap();
        segs.write_out().unwrap();
        drop(segs);
        let live: HashSet<u64> = chunks.iter().map(|c| c.segment).collect();
        assert!(live.len() >= 10, "one chunk a segment: {live:?}");
        let run = |live: &HashSet<u64>| {
            let mut batches = Vec::new();
            replay(&RealDisk, dir.path(), from, live, |b| {
                batches.push(b.to_vec());
                Ok(())
            })
            .map(|_| batches)
        };
        assert_eq!(run(&live).unwrap(), vec![b"after the checkpoint".to_vec()]);
        for c in [&chunks[7], &chunks[3]] {
            let path = segment_path(dir.path(), c.segment);
            let mut bytes = std::fs::read(&path).unwrap();
            bytes[usize::try_from(c.offset).unwrap() + 10] ^= 1;
            std::fs::write(&path, &bytes).unwrap();
        }
        let Err(ReplayError::Damage(damage)) = run(&live) else {
            panic!("damage in a verified segment must refuse the start");
        };
        assert_eq!(damage.segment, chunks[3].segment, "the first in order");
        // A segment no chunk lives in is not read at all.
        let without: HashSet<u64> = live
            .iter()
            .copied()
            .filter(|s| *s != chunks[3].segment && *s != chunks[7].segment)
            .collect();
        assert!(run(&without).is_ok());
    }

    #[test]
    fn a_flipped_byte_mid_newest_segment_is_damage_too() {
        let dir = tempfile::tempdir().unwrap();
        let (mut segs, _) =
            Segments::open(Arc::new(RealDisk), dir.path(), HashMap::new(), MAX).unwrap();
        segs.append_batch(b"first").unwrap();
        segs.append_batch(b"second").unwrap();
        segs.write_out().unwrap();
        drop(segs);
        let path = segment_path(dir.path(), 1);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[HEADER + 1] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            replayed(dir.path(), Position::default()),
            Err(ReplayError::Damage(Damage { offset: 0, .. }))
        ));
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
        let (all, out) = replayed(dir.path(), start).unwrap();
        assert!(all.is_empty());
        assert_eq!(out.end, Some(start));
        std::fs::write(segment_path(dir.path(), 3), vec![0u8; 4096]).unwrap();
        let (all, out) = replayed(dir.path(), start).unwrap();
        assert!(all.is_empty());
        assert_eq!(out.end, Some(start));
    }
}
