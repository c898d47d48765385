//! Records of the queue log, and the batch record's payload.
//!
//! A record is `kind:u8 len:u32 crc:u32` then `len` bytes; the CRC-32 covers the
//! segment's id, the kind and the payload, so a record copied from another segment
//! never verifies. Kinds: `1` a chunk (its [`Location`] points at the payload), `2` a
//! batch, `3` the end of a segment (empty): the log goes on in the next one. A record
//! never spans two segments.
//!
//! A batch record holds every index write of one round ([`IndexBatch`]), so that a
//! replay can apply them again. Per write: `tree:u8 op:u8 key_len:u32 key`, then for a
//! put `value_len:u32 value`. A prefix removal (op 2) removes every key of the tree
//! that starts with `key`: a queue delete is one such write, so it is atomic.

use std::io;

use super::StoreError;
use super::index::{Index, Tree};

pub(crate) const HEADER: usize = 9;
pub(crate) const KIND_CHUNK: u8 = 1;
pub(crate) const KIND_BATCH: u8 = 2;
/// Written when a segment is closed: the log goes on in the next segment.
pub(crate) const KIND_END: u8 = 3;
pub(crate) const END_LEN: u64 = HEADER as u64;

const TREE_DATA: u8 = 0;
const TREE_DEFS: u8 = 1;
const OP_PUT: u8 = 0;
const OP_REMOVE: u8 = 1;
const OP_REMOVE_PREFIX: u8 = 2;

/// The record checksum: over the segment id too, so a stale record never verifies.
pub(crate) fn record_crc(segment: u64, kind: u8, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&segment.to_be_bytes());
    hasher.update(&[kind]);
    hasher.update(payload);
    hasher.finalize()
}

/// A record's header and payload appended to `buf`; returns its length and checksum.
pub(crate) fn encode_record(
    buf: &mut Vec<u8>,
    segment: u64,
    kind: u8,
    payload: &[u8],
) -> io::Result<(u32, u32)> {
    let len = u32::try_from(payload.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "record over 4 GiB"))?;
    let crc = record_crc(segment, kind, payload);
    buf.push(kind);
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(&crc.to_be_bytes());
    buf.extend_from_slice(payload);
    Ok((len, crc))
}

/// The fields of a record header: kind, payload length, checksum.
pub(crate) fn parse_header(header: &[u8; HEADER]) -> (u8, u32, u32) {
    let kind = header[0];
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    let crc = u32::from_be_bytes([header[5], header[6], header[7], header[8]]);
    (kind, len, crc)
}

/// Whether a header names a known kind and a length that fits in `left` bytes.
pub(crate) fn plausible(kind: u8, len: u32, left: u64) -> bool {
    matches!(kind, KIND_CHUNK | KIND_BATCH | KIND_END)
        && left >= HEADER as u64
        && u64::from(len) <= left - HEADER as u64
        && (kind != KIND_END || len == 0)
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

/// Index writes of one round, logged as one batch record before they are applied
/// (see the module docs for the layout).
///
/// They are applied as single inserts and removes, not as a `sled::Batch`: sled seals
/// and writes out its log buffer after every batch, while crash atomicity comes from
/// the log (a replay re-applies every write since the last checkpoint).
///
/// Besides the record, a batch knows which of its inserts set a key the index holds
/// no value for (`new_ops`, by position among the batch's writes). That is not
/// logged: it holds when the store thread applies the round it built, not at a
/// replay, where the index may already have part of what is replayed.
#[derive(Default)]
pub(crate) struct IndexBatch {
    pub log: Vec<u8>,
    /// Positions (ascending) of the writes made with [`IndexBatch::insert_new`].
    pub new_ops: Vec<u32>,
    writes: u32,
}

impl IndexBatch {
    pub fn insert(&mut self, key: &[u8], value: &[u8]) {
        self.record(TREE_DATA, OP_PUT, key, Some(value));
    }

    /// An insert of a data key that the index holds no value for once the rounds
    /// before this one are applied (see [`Index::insert_new`]).
    pub fn insert_new(&mut self, key: &[u8], value: &[u8]) {
        self.new_ops.push(self.writes);
        self.record(TREE_DATA, OP_PUT, key, Some(value));
    }

    pub fn remove(&mut self, key: &[u8]) {
        self.record(TREE_DATA, OP_REMOVE, key, None);
    }

    /// Removes every data key starting with `prefix`.
    pub fn remove_prefix(&mut self, prefix: &[u8]) {
        self.record(TREE_DATA, OP_REMOVE_PREFIX, prefix, None);
    }

    pub fn insert_def(&mut self, key: &[u8], value: &[u8]) {
        self.record(TREE_DEFS, OP_PUT, key, Some(value));
    }

    pub fn remove_def(&mut self, key: &[u8]) {
        self.record(TREE_DEFS, OP_REMOVE, key, None);
    }

    pub fn is_empty(&self) -> bool {
        self.log.is_empty()
    }

    fn record(&mut self, tree: u8, op: u8, key: &[u8], value: Option<&[u8]>) {
        // Keys and values are far below 4 GiB: frames are capped well under that.
        let len = |b: &[u8]| u32::try_from(b.len()).unwrap_or(u32::MAX).to_be_bytes();
        self.writes += 1;
        self.log.push(tree);
        self.log.push(op);
        self.log.extend_from_slice(&len(key));
        self.log.extend_from_slice(key);
        if let Some(value) = value {
            self.log.extend_from_slice(&len(value));
            self.log.extend_from_slice(value);
        }
    }

    /// Applies the writes of a logged batch to the index, in order.
    pub fn apply(log: &[u8], index: &dyn Index) -> Result<(), StoreError> {
        Self::apply_knowing(log, &[], index)
    }

    /// [`IndexBatch::apply`], with the writes at positions `new_ops` (a batch's own
    /// [`IndexBatch::new_ops`]) made as [`Index::insert_new`]: only for the round the
    /// batch was built for, applied right after the rounds before it.
    pub fn apply_knowing(log: &[u8], new_ops: &[u32], index: &dyn Index) -> Result<(), StoreError> {
        let malformed = || StoreError("malformed batch record".into());
        let field = |at: &mut usize| -> Option<&[u8]> {
            let len = u32::from_be_bytes(log.get(*at..*at + 4)?.try_into().ok()?);
            let start = *at + 4;
            let end = start.checked_add(usize::try_from(len).ok()?)?;
            *at = end;
            log.get(start..end)
        };
        let mut at = 0usize;
        let mut position = 0u32;
        let mut new_ops = new_ops.iter().peekable();
        while at < log.len() {
            let new = new_ops.next_if_eq(&&position).is_some();
            position += 1;
            let (tree, op) = (log[at], *log.get(at + 1).ok_or_else(malformed)?);
            at += 2;
            let key = field(&mut at).ok_or_else(malformed)?;
            let tree = match tree {
                TREE_DATA => Tree::Data,
                TREE_DEFS => Tree::Defs,
                _ => return Err(malformed()),
            };
            match op {
                OP_PUT => {
                    let value = field(&mut at).ok_or_else(malformed)?;
                    if new {
                        index.insert_new(tree, key, value)?;
                    } else {
                        index.insert(tree, key, value)?;
                    }
                }
                OP_REMOVE => index.remove(tree, key)?,
                OP_REMOVE_PREFIX => remove_prefix(index, tree, key)?,
                _ => return Err(malformed()),
            }
        }
        Ok(())
    }
}

/// Removes every key of `tree` that starts with `prefix`, a bounded number at a time.
fn remove_prefix(index: &dyn Index, tree: Tree, prefix: &[u8]) -> Result<(), StoreError> {
    const STEP: usize = 10_000;
    let mut end = prefix.to_vec();
    // The first key past the prefix: increment its last byte that is not 0xff.
    while let Some(last) = end.pop() {
        if last != 0xff {
            end.push(last + 1);
            break;
        }
    }
    loop {
        let mut keys = Vec::new();
        let upper: &[u8] = if end.is_empty() { &[0xff; 64] } else { &end };
        index.range(tree, prefix, upper, &mut |k, _| {
            keys.push(k.to_vec());
            keys.len() < STEP
        })?;
        if keys.is_empty() {
            return Ok(());
        }
        for key in keys {
            index.remove(tree, &key)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::index::MemoryIndex;

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
    fn a_logged_batch_applies_its_writes_in_order() {
        let index = MemoryIndex::new();
        index.insert(Tree::Data, b"gone", b"x").unwrap();
        index.insert(Tree::Data, b"q1a", b"x").unwrap();
        index.insert(Tree::Data, b"q1b", b"x").unwrap();
        index.insert(Tree::Data, b"q2", b"x").unwrap();
        let mut batch = IndexBatch::default();
        batch.insert(b"k", b"1");
        batch.insert(b"k", b"2");
        batch.remove(b"gone");
        batch.remove_prefix(b"q1");
        batch.insert_def(b"queue", b"{}");
        batch.insert_def(b"old", b"{}");
        batch.remove_def(b"old");
        IndexBatch::apply(&batch.log, &index).unwrap();
        let get = |t, k: &[u8]| index.get(t, k).unwrap();
        assert_eq!(get(Tree::Data, b"k").unwrap(), b"2");
        assert!(get(Tree::Data, b"gone").is_none());
        assert!(get(Tree::Data, b"q1a").is_none() && get(Tree::Data, b"q1b").is_none());
        assert!(get(Tree::Data, b"q2").is_some(), "outside the prefix");
        assert_eq!(get(Tree::Defs, b"queue").unwrap(), b"{}");
        assert!(get(Tree::Defs, b"old").is_none());
        // Applying it again changes nothing: a replay may repeat a round the index has.
        IndexBatch::apply(&batch.log, &index).unwrap();
        assert_eq!(get(Tree::Data, b"k").unwrap(), b"2");
        for cut in 1..batch.log.len() {
            // A cut-off record is refused or applied up to the cut, never a panic.
            let _ = IndexBatch::apply(&batch.log[..cut], &index);
        }
        let mut bad = batch.log.clone();
        bad[0] = 9;
        assert!(IndexBatch::apply(&bad, &index).is_err(), "unknown tree");
    }

    /// The writes a batch marked new are applied as `insert_new`, the others as
    /// plain writes; replay's `apply` marks none.
    #[test]
    fn writes_marked_new_reach_the_index_as_new() {
        use std::sync::Arc;

        use crate::storage::overlay::OverlayIndex;
        let mut first = IndexBatch::default();
        first.remove(b"x");
        first.insert_new(b"a", b"1");
        first.insert(b"b", b"1");
        first.insert_new(b"c", b"1");
        assert_eq!(first.new_ops, [1, 3]);
        let mut second = IndexBatch::default();
        for key in [b"a", b"b", b"c"] {
            second.remove(key);
        }
        let overlay = OverlayIndex::new(Arc::new(MemoryIndex::new()), 100);
        IndexBatch::apply_knowing(&first.log, &first.new_ops, &overlay).unwrap();
        IndexBatch::apply_knowing(&second.log, &second.new_ops, &overlay).unwrap();
        // Only the removals of x and b are held: a and c were new.
        assert_eq!(overlay.held(), 2);
        let replayed = OverlayIndex::new(Arc::new(MemoryIndex::new()), 100);
        IndexBatch::apply(&first.log, &replayed).unwrap();
        IndexBatch::apply(&second.log, &replayed).unwrap();
        assert_eq!(replayed.held(), 4, "a replay knows nothing new");
    }
}
