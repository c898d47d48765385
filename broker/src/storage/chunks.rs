//! Chunks: the ready messages a queue receives in one group commit, stored together
//! as one log record, with a removal bitmap in the index.
//!
//! Every message a queue receives within one round goes into the same chunks (each up
//! to [`CHUNK_MAX_ENTRIES`] messages and [`CHUNK_MAX_BYTES`]), each written once to the
//! log. Acks, drops and moves set bits in the chunk's removal bitmap, one index write
//! per touched chunk per round; when every bit is set the chunk and its bitmap are
//! deleted. Seqs in a chunk need not be contiguous (delayed messages take seqs too):
//! the gaps start out set. A redelivered message keeps its place in its chunk; its new
//! attempt count goes to an `'a'` key (keys.rs). Per message this costs a fraction of
//! an index operation instead of an insert and a remove.
//!
//! A chunk body is `count:u16` then `count` × (`seq:u64 len:u32` record.rs layout),
//! `seq` ascending.

use super::keys::be_u64;
use super::records::Location;

/// Most messages in one chunk: its removal bitmap stays one or two words.
pub(crate) const CHUNK_MAX_ENTRIES: usize = 64;
/// Most bytes in one chunk, unless a single message is larger. Bodies live in
/// segment files, so this only sets how much a paging read fetches at once and how
/// many index keys a round writes: one per chunk.
pub(crate) const CHUNK_MAX_BYTES: usize = 64 << 10;
/// Most seqs one chunk spans (gaps included), bounding its bitmap.
const CHUNK_MAX_SPAN: u64 = 1024;

/// A `'b'` value: where the chunk's body is, and its removal state when written.
pub(crate) fn chunk_index_value(loc: &Location, state: &ChunkState) -> Vec<u8> {
    let mut out = Vec::with_capacity(Location::ENCODED_LEN + 4 + state.removed.len() * 8);
    out.extend_from_slice(&loc.encode());
    out.extend_from_slice(&state.encode());
    out
}

pub(crate) fn decode_chunk_index(value: &[u8]) -> Option<(Location, ChunkState)> {
    let loc = Location::decode(value)?;
    let state = ChunkState::decode(value.get(Location::ENCODED_LEN..)?)?;
    Some((loc, state))
}

/// The entries of a chunk body: `(seq, record)` in seq order; `None` if malformed.
pub(crate) fn chunk_entries(value: &[u8]) -> Option<Vec<(u64, &[u8])>> {
    let count = usize::from(u16::from_be_bytes(value.get(..2)?.try_into().ok()?));
    let mut out = Vec::with_capacity(count.min(CHUNK_MAX_ENTRIES));
    let mut at = 2usize;
    for _ in 0..count {
        let seq = be_u64(value.get(at..)?)?;
        let len = u32::from_be_bytes(value.get(at + 8..at + 12)?.try_into().ok()?);
        let start = at + 12;
        let end = start.checked_add(usize::try_from(len).ok()?)?;
        out.push((seq, value.get(start..end)?));
        at = end;
    }
    Some(out)
}

/// Which entries of one chunk are removed. Bit `seq - first` is set for a removed
/// message and for a seq the chunk never held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ChunkState {
    pub span: u32,
    pub removed: Vec<u64>,
    pub live: u32,
}

impl ChunkState {
    /// A chunk holding exactly `seqs` (ascending, starting at `first`), none removed.
    pub fn new(first: u64, seqs: impl Iterator<Item = u64>) -> Option<Self> {
        let mut held = Vec::new();
        let mut last = first;
        for seq in seqs {
            let off = usize::try_from(seq.checked_sub(first)?).ok()?;
            if off >= held.len() {
                held.resize(off + 1, false);
            }
            held[off] = true;
            last = last.max(seq);
        }
        let span = u32::try_from(last - first + 1).ok()?;
        let mut removed = vec![!0u64; usize::try_from(span.div_ceil(64)).ok()?];
        let mut live = 0;
        for (off, h) in held.iter().enumerate() {
            if *h {
                removed[off / 64] &= !(1u64 << (off % 64));
                live += 1;
            }
        }
        Some(Self {
            span,
            removed,
            live,
        })
    }

    pub fn is_removed(&self, off: u64) -> bool {
        let Ok(off) = usize::try_from(off) else {
            return true;
        };
        self.removed
            .get(off / 64)
            .is_none_or(|w| w & (1u64 << (off % 64)) != 0)
    }

    /// Marks `off` removed; false if it already was (or is outside the chunk).
    pub fn remove(&mut self, off: u64) -> bool {
        if self.is_removed(off) {
            return false;
        }
        // is_removed checked the bounds.
        let off = usize::try_from(off).unwrap_or(usize::MAX);
        if let Some(w) = self.removed.get_mut(off / 64) {
            *w |= 1u64 << (off % 64);
            self.live -= 1;
        }
        true
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + self.removed.len() * 8);
        out.extend_from_slice(&self.span.to_be_bytes());
        for w in &self.removed {
            out.extend_from_slice(&w.to_be_bytes());
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let span = u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?);
        let words = usize::try_from(span.div_ceil(64)).ok()?;
        if bytes.len() != 4 + words * 8 {
            return None;
        }
        let removed: Vec<u64> = bytes[4..].chunks_exact(8).filter_map(be_u64).collect();
        let mut live = 0u32;
        for off in 0..span {
            let off = off as usize;
            if removed[off / 64] & (1u64 << (off % 64)) == 0 {
                live += 1;
            }
        }
        Some(Self {
            span,
            removed,
            live,
        })
    }
}

/// Ready messages of one queue written in one round, encoded as one chunk value.
pub(crate) struct ChunkBuf {
    pub qid: u32,
    pub first: u64,
    pub last: u64,
    pub count: u16,
    pub buf: Vec<u8>,
}

impl ChunkBuf {
    /// Whether a message `seq` whose record is `len` bytes may join this chunk.
    pub fn fits(&self, seq: u64, len: usize) -> bool {
        usize::from(self.count) < CHUNK_MAX_ENTRIES
            && self.buf.len() + 12 + len <= CHUNK_MAX_BYTES
            && seq > self.last
            && seq - self.first < CHUNK_MAX_SPAN
    }

    pub fn seqs(&self) -> impl Iterator<Item = u64> + '_ {
        chunk_entries(&self.buf)
            .unwrap_or_default()
            .into_iter()
            .map(|(seq, _)| seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_state_marks_gaps_and_round_trips() {
        // Seqs 10, 11 and 14: 12 and 13 were delayed messages, never in the chunk.
        let mut state = ChunkState::new(10, [10, 11, 14].into_iter()).unwrap();
        assert_eq!((state.span, state.live), (5, 3));
        assert!(state.is_removed(2) && state.is_removed(3) && !state.is_removed(4));
        assert!(state.remove(4));
        assert!(
            !state.remove(4),
            "a second removal of the same seq changes nothing"
        );
        assert!(!state.remove(99), "outside the chunk");
        assert_eq!(ChunkState::decode(&state.encode()), Some(state.clone()));
        assert!(state.remove(0) && state.remove(1));
        assert_eq!(state.live, 0);
        assert_eq!(
            ChunkState::decode(&[0, 0, 0, 70, 1, 2]),
            None,
            "wrong length"
        );
    }

    #[test]
    fn chunk_entries_parse_and_reject_truncation() {
        let mut chunk = ChunkBuf {
            qid: 1,
            first: 5,
            last: 5,
            count: 0,
            buf: vec![0, 0],
        };
        for (seq, body) in [(5u64, &b"ab"[..]), (7, &b"cde"[..])] {
            chunk.buf.extend_from_slice(&seq.to_be_bytes());
            chunk
                .buf
                .extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes());
            chunk.buf.extend_from_slice(body);
            chunk.count += 1;
        }
        chunk.buf[..2].copy_from_slice(&chunk.count.to_be_bytes());
        let entries = chunk_entries(&chunk.buf).unwrap();
        assert_eq!(entries, vec![(5, &b"ab"[..]), (7, &b"cde"[..])]);
        assert_eq!(chunk.seqs().collect::<Vec<_>>(), [5, 7]);
        for cut in 0..chunk.buf.len() {
            assert_eq!(chunk_entries(&chunk.buf[..cut]), None, "cut at {cut}");
        }
    }
}
