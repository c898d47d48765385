//! The index layout: which keys the store writes, and the per-queue counters.
//!
//! Two trees. [`Tree::Defs`](super::index::Tree) maps a queue name to its JSON
//! definition (id, resolved options, bindings), plus the store's own keys below.
//! [`Tree::Data`](super::index::Tree) holds every queue's data under big-endian keys
//! that start with the queue id, so a queue is a key range:
//!
//! | key | value |
//! | --- | --- |
//! | `qid:u32 'a' seq:u64` | attempt override: `deliveries:u32` of a requeued ready message |
//! | `qid:u32 'b' first_seq:u64` | a chunk of ready or in-flight messages: its log [`Location`](super::records::Location) (24 bytes), then its removal bitmap as written (same layout as `'x'`) |
//! | `qid:u32 'c'` | counters: `m_count m_bytes d_count d_bytes next_seq mark` (u64 each) |
//! | `qid:u32 'd' due_ms:u64 seq:u64` | a delayed message (record.rs layout) |
//! | `qid:u32 'i' message_id` | dedup entry: `seen_ms:u64` |
//! | `qid:u32 'x' first_seq:u64` | removed entries of chunk `first_seq`: `span:u32` then a bitmap of `span` bits (u64 words), bit `seq - first_seq` set when removed |
//! | `0:u32 'g' segment:u64` | live chunks in that segment file: `count:u64` (queue ids start at 1) |
//!
//! The counters travel in the same round as the data they count, so after any crash
//! (and replay) they agree with the keys, and a restart needs no scan of a
//! 10-million-message queue. `mark` is the highest `seq` that may have been
//! delivered: a message at or below it comes back after a restart as a redelivery.
//!
//! The layout changed before 1.0; there is no released data, so no migration: a data
//! dir written by another layout is refused with an error that says so.

use super::StoreError;
use super::index::{Index, Tree};

pub(crate) const TAG_ATTEMPTS: u8 = b'a';
pub(crate) const TAG_CHUNK: u8 = b'b';
pub(crate) const TAG_COUNTERS: u8 = b'c';
pub(crate) const TAG_DELAYED: u8 = b'd';
pub(crate) const TAG_DEDUP: u8 = b'i';
pub(crate) const TAG_REMOVED: u8 = b'x';
pub(crate) const TAG_SEGMENT: u8 = b'g';
/// Where segment counts live: no queue has id 0.
pub(crate) const SEGMENT_QID: u32 = 0;
pub(crate) const LAYOUT_KEY: &[u8] = b"\0layout";
/// Bumped whenever stored data would be misread by an older or newer broker.
/// 5: queue deletes are one range removal, segments are synced before the next starts.
pub(crate) const LAYOUT_VERSION: u32 = 5;
pub(crate) const NEXT_QID_KEY: &[u8] = b"\0next_qid";
/// In `Defs`: the log position the index held at its last checkpoint.
pub(crate) const CHECKPOINT_KEY: &[u8] = b"\0checkpoint";
/// In `Defs`, once the data dir has run under `--fsync interval` or `never`: after a
/// power loss then, the index may hold writes of rounds the log lost, whose seqs are
/// used again, so chunk keys are never marked new to the index (writer.rs) again.
pub(crate) const RELAXED_KEY: &[u8] = b"\0relaxed";

/// Per-queue figures stored next to its data (see the module docs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counters {
    pub m_count: u64,
    pub m_bytes: u64,
    pub d_count: u64,
    pub d_bytes: u64,
    pub next_seq: u64,
    pub mark: u64,
}

impl Counters {
    pub fn encode(&self) -> [u8; 48] {
        let mut out = [0u8; 48];
        let fields = [
            self.m_count,
            self.m_bytes,
            self.d_count,
            self.d_bytes,
            self.next_seq,
            self.mark,
        ];
        for (chunk, v) in out.chunks_exact_mut(8).zip(fields) {
            chunk.copy_from_slice(&v.to_be_bytes());
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != 48 {
            return None;
        }
        let f = |i: usize| be_u64(&bytes[i * 8..]).unwrap_or(0);
        Some(Self {
            m_count: f(0),
            m_bytes: f(1),
            d_count: f(2),
            d_bytes: f(3),
            next_seq: f(4),
            mark: f(5),
        })
    }
}

pub(crate) fn prefix(qid: u32, tag: u8) -> [u8; 5] {
    let mut k = [0u8; 5];
    k[..4].copy_from_slice(&qid.to_be_bytes());
    k[4] = tag;
    k
}

pub(crate) fn seq_key(qid: u32, tag: u8, seq: u64) -> [u8; 13] {
    let mut k = [0u8; 13];
    k[..5].copy_from_slice(&prefix(qid, tag));
    k[5..].copy_from_slice(&seq.to_be_bytes());
    k
}

pub(crate) fn delayed_key(qid: u32, due_ms: u64, seq: u64) -> [u8; 21] {
    let mut k = [0u8; 21];
    k[..5].copy_from_slice(&prefix(qid, TAG_DELAYED));
    k[5..13].copy_from_slice(&due_ms.to_be_bytes());
    k[13..].copy_from_slice(&seq.to_be_bytes());
    k
}

pub(crate) fn dedup_key(qid: u32, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(5 + id.len());
    k.extend_from_slice(&prefix(qid, TAG_DEDUP));
    k.extend_from_slice(id.as_bytes());
    k
}

pub(crate) fn segment_key(segment: u64) -> [u8; 13] {
    seq_key(SEGMENT_QID, TAG_SEGMENT, segment)
}

pub(crate) fn be_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?))
}

/// The stored live chunk count of every segment.
pub(crate) fn stored_segments(
    index: &dyn Index,
) -> Result<std::collections::HashMap<u64, u64>, StoreError> {
    let mut live = std::collections::HashMap::new();
    let (start, end) = (
        prefix(SEGMENT_QID, TAG_SEGMENT),
        prefix(SEGMENT_QID, TAG_SEGMENT + 1),
    );
    index.range(Tree::Data, &start, &end, &mut |k, v| {
        if let (Some(segment), Some(count)) = (be_u64(&k[5..]), be_u64(v)) {
            live.insert(segment, count);
        }
        true
    })?;
    Ok(live)
}

/// Refuses a data dir written in another layout; stamps a new one with ours.
pub(crate) fn check_layout(index: &dyn Index) -> Result<(), StoreError> {
    let stored = index
        .get(Tree::Defs, LAYOUT_KEY)?
        .and_then(|v| Some(u32::from_be_bytes(v.get(..4)?.try_into().ok()?)));
    match stored {
        Some(LAYOUT_VERSION) => Ok(()),
        None if index.is_empty(Tree::Data)? => {
            index.insert(Tree::Defs, LAYOUT_KEY, &LAYOUT_VERSION.to_be_bytes())
        }
        found => Err(StoreError(format!(
            "the data dir holds queues in storage layout {}, this broker reads layout \
             {LAYOUT_VERSION}; there is no migration before 1.0: move the data dir away",
            found.map_or_else(|| "1 (unversioned)".to_owned(), |v| v.to_string())
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::index::MemoryIndex;

    #[test]
    fn a_data_dir_of_another_layout_is_refused() {
        let index = MemoryIndex::new();
        // A new store is stamped with the current layout and opens again.
        check_layout(&index).unwrap();
        index.insert(Tree::Data, b"k", b"v").unwrap();
        check_layout(&index).unwrap();
        // Data without a stamp, or with another one, is not guessed at.
        index.remove(Tree::Defs, LAYOUT_KEY).unwrap();
        let err = check_layout(&index).unwrap_err();
        assert!(err.0.contains("layout 1 (unversioned)"), "{err}");
        index
            .insert(Tree::Defs, LAYOUT_KEY, &2u32.to_be_bytes())
            .unwrap();
        let err = check_layout(&index).unwrap_err();
        assert!(
            err.0.contains("layout 2") && err.0.contains("move the data dir away"),
            "{err}"
        );
    }

    #[test]
    fn counters_round_trip() {
        let c = Counters {
            m_count: 1,
            m_bytes: 2,
            d_count: 3,
            d_bytes: 4,
            next_seq: 5,
            mark: 6,
        };
        assert_eq!(Counters::decode(&c.encode()), Some(c));
        assert_eq!(Counters::decode(&[0; 47]), None);
    }
}
